"""
bench_eval_det.py — scoring time of eval_det.py on a DOTA-val-sized input, against a straightforward loop.

Synthetic but shaped like DOTA-v1.0 val: ~450 images, ~28k ground-truth objects with a skewed class mix and a
few crowded images (thousands of small vehicles), ~100k detections (jittered hits, duplicates, background
false positives, 2% bow-ties, scores rounded to 0.01 so ties occur). Times, for Task1 (polygons):
  * eval_det.score_det (vectorised: numpy pair enumeration + shapely 2 array ops)
  * the full CLI (`--dota-task1`: reading the label and Task1 files, scoring, table)
  * a straightforward per-detection, per-pair loop (the devkit's voc_eval with shapely per pair)
and checks that both give the same per-class AP to 1e-9. Also times Task2 (horizontal boxes).

    python bench/bench_eval_det.py                        # full size (the baseline loop takes a while)
    python bench/bench_eval_det.py --baseline-frac 0.2    # time the loop on 20% of the images, extrapolate
"""

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: model, train, ...

import eval_det


ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
ap.add_argument("--images", type=int, default=450, help="number of images")
ap.add_argument("--objects", type=int, default=28000, help="total ground-truth objects (approximate)")
ap.add_argument("--dets", type=int, default=100000, help="total detections (approximate)")
ap.add_argument("--baseline-frac", type=float, default=1.0, help="fraction of images the per-pair loop is timed on (then extrapolated)")
ap.add_argument("--seed", type=int, default=0, help="random seed")
args = ap.parse_args()

# -----------------------------------------------------------------------------
# Synthetic DOTA-val-like data

rng = np.random.default_rng(args.seed)
classes = eval_det.DOTA_CLASSES["dota1.0"]
# DOTA-v1.0 val instance shares, roughly (small-vehicle, large-vehicle, ship dominate)
share = np.array([2.8, 0.8, 1.6, 0.6, 19.0, 14.5, 28.0, 2.6, 0.5, 8.0, 0.5, 0.6, 7.5, 1.5, 0.4])
share /= share.sum()
sizes = np.array([60, 90, 80, 200, 12, 30, 25, 50, 50, 30, 150, 120, 60, 30, 40], float)  # typical length, px
per_image = rng.lognormal(0, 1.2, args.images)
per_image = np.maximum(1, np.round(per_image / per_image.sum() * args.objects)).astype(int)
img_size = rng.choice([1024, 2048, 4000], args.images, p=[0.3, 0.4, 0.3])


def rect(cx, cy, w, h, a):
    c, s = np.cos(a), np.sin(a)
    dx = np.stack([w / 2 * c, w / 2 * s], -1)
    dy = np.stack([-h / 2 * s, h / 2 * c], -1)
    ctr = np.stack([cx, cy], -1)
    return np.stack([ctr - dx - dy, ctr + dx - dy, ctr + dx + dy, ctr - dx + dy], 1).reshape(-1, 8)


gt_img, gt_lab, gt_poly, gt_diff = [], [], [], []
for i, n in enumerate(per_image):
    lab = rng.choice(len(classes), n, p=share)
    length = sizes[lab] * rng.uniform(0.6, 1.4, n)
    poly = rect(*rng.uniform(0, img_size[i], (2, n)), length, length * rng.uniform(0.3, 0.8, n), rng.uniform(0, np.pi, n))
    gt_img += [i] * n
    gt_lab += lab.tolist()
    gt_poly.append(poly)
    gt_diff += (rng.random(n) < 0.08).tolist()
gt = {"image": np.array(gt_img), "label": np.array(gt_lab), "poly": np.concatenate(gt_poly), "difficult": np.array(gt_diff)}
n_gt = len(gt_img)

# detections: jittered copies of GT (0..4 each: misses, hits, duplicates) + background false positives
copies = rng.choice(5, n_gt, p=[0.15, 0.35, 0.25, 0.15, 0.10])
src = np.repeat(np.arange(n_gt), copies)
scale = np.ptp(gt["poly"][src][:, 0::2], 1)[:, None]
d_poly = gt["poly"][src] + rng.normal(0, 0.1, (len(src), 1)) * scale + rng.normal(0, 0.03, (len(src), 8)) * scale
d_lab = np.where(rng.random(len(src)) < 0.95, gt["label"][src], rng.integers(0, len(classes), len(src)))
d_img = gt["image"][src]
n_bg = max(0, args.dets - len(src))
bg_img = rng.choice(args.images, n_bg, p=per_image / per_image.sum())
bg_lab = rng.choice(len(classes), n_bg, p=share)
bg_len = sizes[bg_lab] * rng.uniform(0.6, 1.4, n_bg)
bg_poly = rect(*(rng.random((2, n_bg)) * img_size[bg_img]), bg_len, bg_len * 0.5, rng.uniform(0, np.pi, n_bg))
dets = {"image": np.r_[d_img, bg_img], "label": np.r_[d_lab, bg_lab], "poly": np.r_[d_poly, bg_poly]}
bow = rng.random(len(dets["image"])) < 0.02
dets["poly"][bow] = dets["poly"][bow][:, [0, 1, 4, 5, 2, 3, 6, 7]]  # vertices 2 and 3 swapped: a bow-tie
dets["score"] = np.round(rng.random(len(dets["image"])), 2)
perm = rng.permutation(len(dets["image"]))  # files are not in image order
dets = {k: v[perm] for k, v in dets.items()}
n_det = len(dets["image"])
crowd = np.bincount(gt["image"]).max()
print(f"{args.images} images, {n_gt} ground-truth objects (most crowded image: {crowd}), {n_det} detections "
      f"({int(bow.sum())} bow-ties)")

# -----------------------------------------------------------------------------
# 1. eval_det: the scorer alone, then the whole CLI on files

t0 = time.perf_counter()
res = eval_det.score_det(gt, dets, classes, task=1)
t_score = time.perf_counter() - t0
t0 = time.perf_counter()
res2 = eval_det.score_det(gt, dets, classes, task=2)
t_score2 = time.perf_counter() - t0
print(f"eval_det.score_det Task1: {t_score:.2f} s (mAP {res['mAP']:.4f})   Task2: {t_score2:.2f} s (mAP {res2['mAP']:.4f})")

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    (tmp / "labelTxt").mkdir()
    (tmp / "dets").mkdir()
    names = [f"P{i:04d}" for i in range(args.images)]
    for i, name in enumerate(names):
        sel = np.nonzero(gt["image"] == i)[0]
        (tmp / "labelTxt" / f"{name}.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n" + "".join(
            " ".join(f"{v:.1f}" for v in gt["poly"][k]) + f" {classes[gt['label'][k]]} {int(gt['difficult'][k])}\n" for k in sel))
    for c, cname in enumerate(classes):
        sel = np.nonzero(dets["label"] == c)[0]
        (tmp / "dets" / f"Task1_{cname}.txt").write_text("".join(
            f"{names[dets['image'][k]]} {dets['score'][k]:.2f} " + " ".join(f"{v:.1f}" for v in dets["poly"][k]) + "\n" for k in sel))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        cli = eval_det.main(["--dota-task1", str(tmp / "dets"), "--gt", str(tmp / "labelTxt")])
    t_cli = time.perf_counter() - t0
    print(f"eval_det --dota-task1 (read {args.images} label files + 15 Task1 files, score): {t_cli:.2f} s (mAP {cli['mAP']:.4f})")

# -----------------------------------------------------------------------------
# 2. The straightforward loop: per class, per detection in score order, shapely per (detection, GT) pair


def loop_ap(gt, dets, c, images):
    gsel = np.nonzero((gt["label"] == c) & np.isin(gt["image"], images))[0]
    by_img = {}
    for k in gsel:
        by_img.setdefault(gt["image"][k], []).append(k)
    recs = {i: {"poly": gt["poly"][ks], "diff": gt["difficult"][ks], "det": [False] * len(ks)} for i, ks in by_img.items()}
    npos = int(np.sum(~gt["difficult"][gsel]))
    dsel = np.nonzero((dets["label"] == c) & np.isin(dets["image"], images))[0]
    order = dsel[np.argsort(-dets["score"][dsel], kind="stable")]
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for n, d in enumerate(order):
        R = recs.get(dets["image"][d])
        bb = dets["poly"][d]
        ovmax, jmax = -np.inf, -1
        if R is not None:
            G = R["poly"]
            iw = np.minimum(G[:, 0::2].max(1), bb[0::2].max()) - np.maximum(G[:, 0::2].min(1), bb[0::2].min())
            ih = np.minimum(G[:, 1::2].max(1), bb[1::2].max()) - np.maximum(G[:, 1::2].min(1), bb[1::2].min())
            keep = np.nonzero((iw > 0) & (ih > 0))[0]
            if len(keep):
                p = shapely.Polygon(bb.reshape(4, 2))
                if not p.is_valid:
                    p = p.convex_hull
                ious = []
                for k in keep:
                    g = shapely.Polygon(G[k].reshape(4, 2))
                    inter = g.intersection(p).area
                    ious.append(inter / (g.area + p.area - inter))
                ovmax, jmax = max(ious), keep[int(np.argmax(ious))]
        if ovmax > 0.5:
            if not R["diff"][jmax]:
                if not R["det"][jmax]:
                    tp[n], R["det"][jmax] = 1, True
                else:
                    fp[n] = 1
        else:
            fp[n] = 1
    if npos == 0:
        return 0.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return eval_det.voc_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(np.float64).eps), "voc07")


images = np.arange(args.images) if args.baseline_frac >= 1 else rng.choice(args.images, max(1, int(args.images * args.baseline_frac)), replace=False)
t0 = time.perf_counter()
loop = {cname: loop_ap(gt, dets, c, images) for c, cname in enumerate(classes)}
t_loop = time.perf_counter() - t0
if args.baseline_frac < 1:
    sub_dets = {k: v[np.isin(dets["image"], images)] for k, v in dets.items()}
    sub_gt = {k: v[np.isin(gt["image"], images)] for k, v in gt.items()}
    n_sub = len(sub_dets["image"])
    t0 = time.perf_counter()
    ref = eval_det.score_det(sub_gt, sub_dets, classes)
    t_sub = time.perf_counter() - t0
    t_loop_full = t_loop * n_det / max(n_sub, 1)
    print(f"per-pair loop on {len(images)} images ({n_sub} detections): {t_loop:.2f} s (eval_det on the same: {t_sub:.2f} s); "
          f"extrapolated to all: {t_loop_full:.1f} s")
else:
    ref, t_loop_full = res, t_loop
    print(f"per-pair loop: {t_loop:.2f} s")
worst = max(abs(ref["AP"][c] - loop[c]) for c in classes)
print(f"max |AP difference| vs the loop: {worst:.2e}")
assert worst < 1e-9, "vectorised scorer disagrees with the per-pair loop"
print(f"speed-up of score_det over the per-pair loop: {t_loop_full / t_score:.1f}x")
