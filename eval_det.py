"""
eval_det.py — oriented detection and visual grounding evaluation with the official protocols.

Three ways in, one scorer:

    # 1. predict with a checkpoint (resumable: re-running with the same --out skips finished records), then score
    python eval_det.py --ckpt ckpt/final --data data/dota_val512.jsonl --out eval/dota_val512
    torchrun --nproc-per-node 8 eval_det.py --ckpt ckpt/final --data data/dota_val512.jsonl --out eval/dota_val512

    # 2. score an existing predictions file (any JSONL with "id" and "text"; ours also carries parsed boxes)
    python eval_det.py --preds eval/dota_val512/predictions.jsonl --data data/dota_val512.jsonl
    python eval_det.py --preds other_model.jsonl --data val.jsonl --processor Qwen2.5-VL-7B-Instruct  # its pixel budget
    python eval_det.py --preds answers.jsonl --data val.jsonl --coords norm1000                       # Qwen3-VL style

    # 3. score DOTA-format Task1_{class}.txt / Task2_{class}.txt files from any detector
    python eval_det.py --dota-task1 results/ --gt DOTA/val/labelTxt --classes dota1.0 --task 1

Detection follows the DOTA devkit (dota_evaluation_task1.py / task2.py, docs/reference.md#dota-metric): per class,
detections of all images sorted by descending score, each takes the ground truth of maximum IoU in its image
(polygon IoU; Task2: horizontal boxes with the devkit's +1 pixel convention), IoU > threshold strictly,
difficult ground truth ignored, used ground truth makes a duplicate a false positive; AP is VOC07 11-point
(default) or the all-point area. Two rscovlm rules on top: the sort is stable (equal scores keep the input
order, image order then answer order: this defines mAP_nc for VLM answers, which all score 1.0), and a
self-intersecting ("bow-tie") quadrilateral is scored as its convex hull (boxes.fix_poly).
Headline "mAP" = mean AP over the whole class list (the DOTA rule; a class with no ground truth counts 0);
"mAP_gt_classes" = mean over classes with ground truth (MMRotate's averaging, with the devkit's matching).
mF1: per image one-to-one greedy matching in score order at IoU > threshold, difficult ground truth ignored,
precision/recall/F1 per class, averaged over classes with ground truth.
Grounding: Acc@0.5 / Acc@0.7 (IoU > t with the first box of the answer; unparseable = wrong; denominator =
all samples), meanIoU, cumIoU (sum of intersections / sum of unions), per dataset.
Answer length: Qwen writes one token per digit, so a dense patch's answer runs to thousands of tokens;
--max-new-tokens auto (the default) sizes the limit from the longest reference answer, and every dataset
reports how many answers were cut at the limit ("cut"; a warning on stderr when any were).
metrics.json holds fractions (0..1), as the devkit does; the printed tables show percent.
"""

import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import shapely

import boxes
import det_files
from common import (OneLineParser, UserError, add_debug_flag, add_generation_flags, add_model_flags, check_checkpoint,
                    check_output_paths, check_overlap, check_path, count_cut, format_cut, generation_settings,
                    positive_int, predict_for_eval, read_predictions, read_records, record_where, run_cli, run_eval,
                    track, warn_cut, write_metrics)


# model.py (and with it torch) is imported only where a checkpoint or its processor is used (--ckpt, --processor):
# scoring a predictions file or a DOTA submission folder never loads it.


MERGE_NMS_IOU = 0.1  # MMRotate's per-class polygon NMS threshold when merging patch results

# -----------------------------------------------------------------------------
# Geometry: arrays of quadrilaterals -> shapely polygons, candidate pairs, best ground truth per detection


def hboxes(polys):
    """(n, 8) polygons -> (n, 4) [xmin, ymin, xmax, ymax]: boxes.poly_to_hbox, vectorised."""
    polys = np.asarray(polys, dtype=float).reshape(-1, 8)
    return np.stack([polys[:, 0::2].min(1), polys[:, 1::2].min(1), polys[:, 0::2].max(1), polys[:, 1::2].max(1)], 1)


def quad_geoms(polys):
    """(n, 8) polygons -> object array of shapely polygons. Valid quadrilaterals are used as they are; the rest
    go through boxes.fix_poly: a bow-tie becomes its convex hull, a degenerate or non-finite one None (which
    has IoU 0 with everything, so such a detection is a false positive and such ground truth is never found)."""
    polys = np.asarray(polys, dtype=float).reshape(-1, 8)
    geoms = np.full(len(polys), None, dtype=object)
    finite = np.isfinite(polys).all(1)
    geoms[finite] = shapely.polygons(polys[finite].reshape(-1, 4, 2))
    for i in np.nonzero(~finite | ~shapely.is_valid(geoms))[0]:  # few: only these pay for a Python call
        fixed = boxes.fix_poly(polys[i].tolist())
        geoms[i] = None if fixed is None else shapely.polygons(np.reshape(fixed, (4, 2)))
    return geoms


def poly_pair_iou(det_polys, gt_polys, min_iou=0.0):
    """Returns f(d, g) -> polygon IoU of detection d[k] with ground truth g[k] (index arrays), computed exactly
    (shapely) for the pairs that can reach IoU > min_iou and 0 for the rest: like the devkit, pairs whose
    horizontal boxes do not overlap are skipped, and so are pairs whose upper bound
    min(box intersection, smaller area) / (area_d + area_g - that) is below min_iou (they cannot decide a
    match; the 1e-9 slack keeps float rounding on the safe side)."""
    dg, gg = quad_geoms(det_polys), quad_geoms(gt_polys)
    da, ga = shapely.area(dg), shapely.area(gg)
    db, gb = hboxes(det_polys), hboxes(gt_polys)

    def f(d, g):
        iou = np.zeros(len(d))
        iw = np.minimum(db[d, 2], gb[g, 2]) - np.maximum(db[d, 0], gb[g, 0])
        ih = np.minimum(db[d, 3], gb[g, 3]) - np.maximum(db[d, 1], gb[g, 1])
        cand = (iw > 0) & (ih > 0)
        if min_iou > 0:
            with np.errstate(invalid="ignore"):
                bound = np.minimum(np.minimum(iw * ih, da[d]), ga[g])
                cand &= bound / (da[d] + ga[g] - bound) >= min_iou - 1e-9
        d, g = d[cand], g[cand]
        try:
            inter = shapely.area(shapely.intersection(dg[d], gg[g]))
        except shapely.errors.GEOSException:  # a near-degenerate pair GEOS cannot intersect: redo one by one
            inter = np.array([_safe_inter_area(a, b) for a, b in zip(dg[d], gg[g])])
        with np.errstate(invalid="ignore", divide="ignore"):
            iou[cand] = inter / (da[d] + ga[g] - inter)  # the devkit's polyiou: inter / (a1 + a2 - inter)
        return np.nan_to_num(iou, nan=0.0)

    return f


def _safe_inter_area(a, b):
    try:
        return shapely.area(shapely.intersection(a, b))
    except shapely.errors.GEOSException:
        return shapely.area(shapely.intersection(shapely.make_valid(a), shapely.make_valid(b)))


def hbox_pair_iou(det_boxes, gt_boxes):
    """Returns f(d, g) -> horizontal-box IoU exactly as dota_evaluation_task2.py computes it (+1 pixel)."""
    db, gb = np.asarray(det_boxes, float).reshape(-1, 4), np.asarray(gt_boxes, float).reshape(-1, 4)

    def f(d, g):
        iw = np.maximum(np.minimum(gb[g, 2], db[d, 2]) - np.maximum(gb[g, 0], db[d, 0]) + 1.0, 0.0)
        ih = np.maximum(np.minimum(gb[g, 3], db[d, 3]) - np.maximum(gb[g, 1], db[d, 1]) + 1.0, 0.0)
        inters = iw * ih
        uni = ((db[d, 2] - db[d, 0] + 1.0) * (db[d, 3] - db[d, 1] + 1.0)
               + (gb[g, 2] - gb[g, 0] + 1.0) * (gb[g, 3] - gb[g, 1] + 1.0) - inters)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nan_to_num(inters / uni, nan=0.0)

    return f


def best_match(det_key, gt_key, pair_iou, keep_above, max_pairs=1_000_000):
    """For every detection, the ground truth of highest IoU among those with the same key (image, class).

    Instead of the devkit's loop over detections, all (detection, ground truth) pairs sharing a key are
    enumerated at once (in chunks of at most max_pairs, to bound memory on crowded images) and scored with
    one vectorised pair_iou call. Returns ovmax (m,) (-inf: no ground truth overlaps), jmax (m,) (-1: none;
    among equal IoUs the lowest ground-truth index, like np.argmax in the devkit) and the pairs with
    IoU > keep_above as (d, g, iou) sorted by detection, then IoU descending, then ground truth index."""
    m = len(det_key)
    ovmax, jmax = np.full(m, -np.inf), np.full(m, -1, dtype=np.int64)
    kept = []
    order = np.argsort(gt_key, kind="stable")  # ground truth grouped by key, file order inside a group
    sorted_keys = gt_key[order]
    lo = np.searchsorted(sorted_keys, det_key, "left")
    cnt = np.searchsorted(sorted_keys, det_key, "right") - lo
    cum = np.cumsum(cnt)
    s = 0
    while s < m:
        base = cum[s - 1] if s else 0
        e = max(s + 1, int(np.searchsorted(cum, base + max_pairs, "right")))
        c = cnt[s:e]
        n = int(c.sum())
        if n:
            d = np.repeat(np.arange(s, e), c)
            g = order[np.repeat(lo[s:e], c) + np.arange(n) - np.repeat(np.cumsum(c) - c, c)]
            iou = pair_iou(d, g)
            pos = iou > 0  # only overlapping pairs can decide anything (thresholds are >= 0)
            d, g, iou = d[pos], g[pos], iou[pos]
            o = np.lexsort((g, -iou, d))
            d, g, iou = d[o], g[o], iou[o]
            head = np.r_[True, d[1:] != d[:-1]] if len(d) else np.zeros(0, bool)
            ovmax[d[head]], jmax[d[head]] = iou[head], g[head]
            above = iou > keep_above
            kept.append((d[above], g[above], iou[above]))
        s = e
    if kept:
        pairs = tuple(np.concatenate(x) for x in zip(*kept))
    else:
        pairs = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    return ovmax, jmax, pairs


# -----------------------------------------------------------------------------
# Detection scoring (the DOTA devkit's voc_eval, vectorised, stable sort) + mF1


def voc_ap(rec, prec, rule="voc07"):
    """AP from recall/precision arrays: 'voc07' = 11-point (devkit default), 'area' = all-point with the
    precision envelope. Written as in the devkit so the floating-point results are the same."""
    if rule == "voc07":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = np.max(prec[rec >= t]) if np.sum(rec >= t) > 0 else 0.0
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def score_det(gt, dets, classes, *, task=1, ap_rule="voc07", iou_thr=0.5, f1_score_thr=0.0):
    """Per-class AP, mAP and mF1.

    gt:   {"image": (n,) int, "label": (n,) int index into classes (-1 = not scored), "poly": (n, 8),
           "difficult": (n,) bool}
    dets: {"image": (m,) int, "label": (m,) int, "score": (m,), "poly": (m, 8)} and for task 2 optionally
          "hbox": (m, 4) (else the polygons' horizontal boxes). Row order is the input order that breaks ties.
    task 1: polygon IoU. task 2: horizontal boxes as dota_evaluation_task2.py: ground truth box = the
    polygon's min/max truncated to int (the devkit reads int(float(.)) of its HBB label files), +1 pixel IoU."""
    C = len(classes)
    g_img, g_lab = np.asarray(gt["image"], np.int64), np.asarray(gt["label"], np.int64)
    g_diff = np.asarray(gt["difficult"], bool)
    g_poly = np.asarray(gt["poly"], float).reshape(-1, 8)
    d_img, d_lab = np.asarray(dets["image"], np.int64), np.asarray(dets["label"], np.int64)
    d_score = np.asarray(dets["score"], float)
    if task == 1:
        pair_iou = poly_pair_iou(np.asarray(dets["poly"], float).reshape(-1, 8), g_poly, min_iou=iou_thr)
    else:
        d_box = dets.get("hbox")
        d_box = hboxes(dets["poly"]) if d_box is None else np.asarray(d_box, float).reshape(-1, 4)
        pair_iou = hbox_pair_iou(d_box, np.trunc(hboxes(g_poly)))
    # key = (image, class); ground truth of classes outside the list (label -1) matches nothing
    ovmax, jmax, (pd, pg, _) = best_match(d_img * C + d_lab, np.where(g_lab >= 0, g_img * C + g_lab, -1),
                                          pair_iou, keep_above=iou_thr)
    g_diff_pad = np.r_[g_diff, False]  # jmax = -1 (no ground truth) reads the padding
    # candidates for the one-to-one (F1) matching, per detection in (IoU desc, gt index) order
    cand = defaultdict(list)
    for d, g in zip(pd.tolist(), pg.tolist()):
        cand[d].append(g)

    AP, npos_c, ndet_c, P, R, F1 = {}, {}, {}, {}, {}, {}
    for c, name in enumerate(classes):
        sel = np.nonzero(d_lab == c)[0]
        o = sel[np.argsort(-d_score[sel], kind="stable")]  # stable: equal scores keep the input order
        npos = int(np.sum((g_lab == c) & ~g_diff))
        npos_c[name], ndet_c[name] = npos, len(o)
        # --- AP, the devkit's rule: best GT over all (used or not) GT of the image
        hit = ovmax[o] > iou_thr
        j = jmax[o]
        on_difficult = hit & g_diff_pad[j]
        tp = np.zeros(len(o))
        first_use = np.nonzero(hit & ~on_difficult)[0]
        _, first = np.unique(j[first_use], return_index=True)  # the first detection to claim a GT gets it
        tp[first_use[first]] = 1.0
        fp = ((~hit) | (hit & ~on_difficult & (tp == 0))).astype(float)
        if npos > 0:
            tpc, fpc = np.cumsum(tp), np.cumsum(fp)
            rec = tpc / float(npos)
            prec = tpc / np.maximum(tpc + fpc, np.finfo(np.float64).eps)
            AP[name] = voc_ap(rec, prec, ap_rule)
        else:
            AP[name] = 0.0  # the devkit gives 0 (voc07) or nan (area) here; 0 either way, listed below
        P[name], R[name], F1[name] = one_to_one_prf(o[d_score[o] >= f1_score_thr], cand, g_diff, npos)

    with_gt = [n for n in classes if npos_c[n] > 0]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    return {
        "mAP": mean([AP[n] for n in classes]),
        "mAP_gt_classes": mean([AP[n] for n in with_gt]),
        "headline": "mAP",
        "headline_rule": f"mean AP over all {C} classes of the class list (DOTA devkit; classes without ground "
                         f"truth count 0); mAP_gt_classes averages the {len(with_gt)} classes with ground truth",
        "mF1": mean([F1[n] for n in with_gt]), "mP": mean([P[n] for n in with_gt]), "mR": mean([R[n] for n in with_gt]),
        "AP": AP, "F1": F1, "P": P, "R": R, "npos": npos_c, "ndet": ndet_c,
        "classes_without_gt": [n for n in classes if npos_c[n] == 0],
        "protocol": {"task": task, "geometry": "polygon" if task == 1 else "hbox (+1 px, int GT)", "ap": ap_rule,
                     "iou": f"IoU > {iou_thr}", "sort": "stable by descending score (ties: input order)",
                     "difficult": "ignored", "f1": f"one-to-one greedy, IoU > {iou_thr}, score >= {f1_score_thr}"},
    }


def one_to_one_prf(dets, cand, g_diff, npos):
    """Precision, recall, F1 of one class: its detections (score order) matched one to one, each taking the best
    ground truth still free among its candidates (cand: detection -> ground truth, IoU order; difficult ground
    truth is never used up and counts neither way). None where undefined (no ground truth)."""
    used, n_tp, n_fp = set(), 0, 0
    for d in dets.tolist():
        pick = next((g for g in cand.get(d, ()) if g_diff[g] or g not in used), None)
        if pick is None:
            n_fp += 1
        elif not g_diff[pick]:
            n_tp += 1
            used.add(pick)
    p = n_tp / (n_tp + n_fp) if n_tp + n_fp else (0.0 if npos else None)
    r = n_tp / npos if npos else None
    return p, r, None if r is None else (2 * p * r / (p + r) if p + r > 0 else 0.0)


# -----------------------------------------------------------------------------
# Patch merging: patch polygons -> whole-image polygons, per-class polygon NMS


def nms_poly(polys, scores, iou_thr=MERGE_NMS_IOU):
    """Greedy polygon NMS: indices kept, in stable descending-score order; suppresses IoU > iou_thr."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    n = len(order)
    if n == 0:
        return order
    f = poly_pair_iou(polys, polys, min_iou=iou_thr)
    i, j = np.triu_indices(n, 1)
    iou = np.zeros((n, n))
    iou[i, j] = f(i, j)
    iou = np.maximum(iou, iou.T)
    suppressed = np.zeros(n, bool)
    keep = []
    for k in order:
        if suppressed[k]:
            continue
        keep.append(k)
        suppressed |= iou[k] > iou_thr
    return np.array(keep, np.int64)


def merge_patches(dets, image_names, patch_info, iou_thr=MERGE_NMS_IOU):
    """Shift patch detections to whole images and run per-image, per-class NMS.
    patch_info[i] = (source name, (ox, oy), rate) for patch image i. Returns (dets, source names)."""
    sources = list(dict.fromkeys(src for src, _, _ in patch_info))
    src_idx = {s: i for i, s in enumerate(sources)}
    off = np.array([o for _, o, _ in patch_info], float).reshape(-1, 2)
    rate = np.array([r for _, _, r in patch_info], float)
    img = dets["image"]
    poly = (dets["poly"] + np.tile(off[img], 4)) / rate[img, None]  # MMRotate: (patch + offset) / rate
    new_img = np.array([src_idx[patch_info[i][0]] for i in img.tolist()], np.int64)
    keep = []
    groups = defaultdict(list)
    for k, key in enumerate(zip(new_img.tolist(), dets["label"].tolist())):
        groups[key].append(k)
    for key in sorted(groups):
        idx = np.array(groups[key])
        keep.extend(idx[nms_poly(poly[idx], dets["score"][idx], iou_thr)].tolist())
    keep = np.sort(np.array(keep, np.int64))  # back to input order, so ties still break by patch order
    merged = {"image": new_img[keep], "label": dets["label"][keep], "score": dets["score"][keep], "poly": poly[keep]}
    return merged, sources


# -----------------------------------------------------------------------------
# Records: ground truth and parsed answers of det / ground records


def read_det_records(args):
    """The det and ground records of --data (read_records), checked for what scoring needs, --limit
    applied. A file without any is a UserError saying which tasks it has and which script scores them."""
    all_recs = read_records(args.data)
    recs = [r for r in all_recs if r["task"] in ("det", "ground")]
    if not recs:
        have = Counter(r["task"] for r in all_recs)
        hint = ("vqa, cls and caption records are scored by eval_vqa.py" if set(have) & {"vqa", "cls", "caption"}
                else "chat records are not scored")
        raise UserError(f"{args.data} has no det or ground records to score (it has "
                              f"{', '.join(f'{n} {t}' for t, n in have.most_common())}): {hint}")
    for r in recs:
        check_record(r)
    return recs[:args.limit] if args.limit else recs


def check_record(r):
    """What scoring needs from a det/ground record's meta; else UserError naming its file:line and id (found
    before any generation, not after it)."""
    meta, task = r["meta"], r["task"]

    def bad(why):
        return UserError(f"{record_where(r)}: {task} record {why}")

    if not isinstance(meta, dict):
        raise bad("needs meta (a JSON object with width, height, objects)")
    for key in ("width", "height"):
        if not isinstance(meta.get(key), (int, float)) or meta[key] <= 0:
            raise bad(f"needs meta['{key}'] (the image's size in pixels)")
    if meta.get("box_format") not in (None, *boxes.BOX_FORMATS):
        raise bad(f"has meta['box_format'] {meta['box_format']!r}: expected one of {list(boxes.BOX_FORMATS)}")
    objects = meta.get("objects", [])
    if task == "ground" and not objects:
        raise bad("needs meta['objects'] with one object (the one referred to)")
    if not isinstance(objects, list):
        raise bad("needs meta['objects'] as a list")
    for k, o in enumerate(objects):
        poly = o.get("poly") if isinstance(o, dict) else None
        if not (isinstance(poly, list) and len(poly) == 8 and all(isinstance(v, (int, float)) for v in poly)):
            raise bad(f"needs a 'poly' of 8 numbers in meta['objects'][{k}]")
        if task == "det" and not isinstance(o.get("label"), str):
            raise bad(f"needs a 'label' in meta['objects'][{k}]")


def dataset_classes(recs, override=None):
    """The class list of a dataset: --classes, else meta["classes"] of its records (first seen order),
    else the ground-truth labels sorted."""
    if override:
        return list(override)
    names = {}
    for r in recs:
        for c in r["meta"].get("classes") or []:
            names.setdefault(c, None)
    if not names:
        for r in recs:
            for o in r["meta"].get("objects", []):
                names.setdefault(o["label"], None)
        return sorted(names)
    return list(names)


def parse_pred(rec, pred, classes, coord_fn, reparse=False):
    """Objects (original-image pixels) and parse stats of one record's prediction. Uses the stored parse when
    the predictions file has one (written by --ckpt), so rescoring needs no model. GeoChat-Bench referring: an
    answer without a polygon is read again as horizontal boxes (RSCoVLM's fallback, metric.py:284-288), counted
    in the stats as hbox_fallback."""
    if pred is None:
        return [], None
    w, h = rec["meta"]["width"], rec["meta"]["height"]

    def kw():
        return {"coords": pred["coords"], "resized_hw": pred.get("resized_hw")} if "coords" in pred else coord_fn(w, h)

    if not reparse and isinstance(pred.get("objects"), list):
        objs, stats = pred["objects"], pred.get("parse")
    else:
        objs, stats = boxes.parse_answer(pred["text"], w, h, **kw(), box_format=rec["meta"].get("box_format"),
                                         classes=classes)
    if not objs and rec["meta"].get("benchmark") == "geochat_referring" and pred.get("text"):
        boxed, boxed_stats = boxes.parse_answer(pred["text"], w, h, **kw(), box_format="hbox", classes=classes)
        if boxed:
            objs, stats = boxed, {**boxed_stats, "hbox_fallback": 1}
    return objs, stats


def det_arrays(recs, preds, classes, coord_fn, reparse=False):
    """GT and detection arrays over det records (one image per record, data order; VLM score = 1.0)."""
    cls_idx = {c: i for i, c in enumerate(classes)}
    g = defaultdict(list)
    d = defaultdict(list)
    answers = {}
    for i, r in enumerate(track(recs, f"parse det/{recs[0]['dataset']}" if recs else "parse")):
        for o in r["meta"].get("objects", []):
            g["image"].append(i)
            g["label"].append(cls_idx.get(o["label"], -1))
            g["poly"].append(o["poly"])
            g["difficult"].append(int(o.get("difficult", 0)) != 0)
        objs, stats = parse_pred(r, preds.get(r["id"]), classes, coord_fn, reparse)
        answers[r["id"]] = (objs, stats)
        for o in objs:
            if o.get("label") in cls_idx:
                d["image"].append(i)
                d["label"].append(cls_idx[o["label"]])
                d["score"].append(float(o.get("score", 1.0)))
                d["poly"].append(o["poly"])
    gt = {"image": np.array(g["image"], np.int64), "label": np.array(g["label"], np.int64),
          "poly": np.array(g["poly"], float).reshape(-1, 8), "difficult": np.array(g["difficult"], bool)}
    dets = {"image": np.array(d["image"], np.int64), "label": np.array(d["label"], np.int64),
            "score": np.array(d["score"], float), "poly": np.array(d["poly"], float).reshape(-1, 8)}
    return gt, dets, answers


def score_ground(recs, preds, coord_fn, reparse=False):
    """Acc@0.5, Acc@0.7, meanIoU, cumIoU over ground records: the first box of the answer against the first
    object. hbox records (the default) use continuous horizontal-box IoU, poly/rbox records polygon IoU."""
    ious, inters, unions, unparseable, answers = [], [], [], 0, {}
    for r in track(recs, f"parse ground/{recs[0]['dataset']}" if recs else "parse"):
        gt = r["meta"]["objects"][0]["poly"]
        objs, stats = parse_pred(r, preds.get(r["id"]), None, coord_fn, reparse)
        answers[r["id"]] = (objs, stats)
        hbox = r["meta"].get("box_format", "hbox") == "hbox"
        g_geom = shapely.box(*hboxes(gt)[0]) if hbox else quad_geoms(gt)[0]
        g_area = 0.0 if g_geom is None else g_geom.area
        if not objs:
            unparseable += 1
            ious.append(0.0), inters.append(0.0), unions.append(g_area)
            continue
        p_geom = shapely.box(*hboxes(objs[0]["poly"])[0]) if hbox else quad_geoms(objs[0]["poly"])[0]
        inter = 0.0 if p_geom is None or g_geom is None else shapely.intersection(p_geom, g_geom).area
        union = g_area + (0.0 if p_geom is None else p_geom.area) - inter
        ious.append(inter / union if union > 0 else 0.0), inters.append(inter), unions.append(union)
    ious = np.array(ious)
    n = len(recs)
    return {
        "n": n, "Acc@0.5": float(np.mean(ious > 0.5)) if n else 0.0, "Acc@0.7": float(np.mean(ious > 0.7)) if n else 0.0,
        "meanIoU": float(ious.mean()) if n else 0.0, "cumIoU": float(sum(inters) / sum(unions)) if sum(unions) else 0.0,
        "no_box": unparseable,
        "protocol": "IoU > t with the first box of the answer vs the first object; no box = IoU 0; denominator = all samples",
    }, answers


def expression(rec):
    """What a grounding record asks for: the object's expression in meta, else the last user text."""
    expr = rec["meta"]["objects"][0].get("expression") if rec["meta"].get("objects") else None
    if expr is None:
        expr = next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user").replace("<image>", "").strip()
    return expr


def score_text_prior(train_recs, recs):
    """The grounding score of a model that ignores the image: each record answered with the mean training box of
    its expression (relative to the image size; the mean of all training boxes for an unseen expression). A model
    that looks should beat it by a wide margin. Acc@0.5 and meanIoU as score_ground counts them."""
    by_expr = defaultdict(list)
    for r in train_recs:
        x1, y1, x2, y2 = hboxes(r["meta"]["objects"][0]["poly"])[0]
        w, h = r["meta"]["width"], r["meta"]["height"]
        by_expr[expression(r)].append((x1 / w, y1 / h, x2 / w, y2 / h))
    if not by_expr:
        raise UserError("--prior: the file has no ground records to take boxes from")
    mean_all = np.mean([b for bs in by_expr.values() for b in bs], axis=0)
    ious, seen = [], 0
    for r in recs:
        bs = by_expr.get(expression(r))
        seen += bs is not None
        rx1, ry1, rx2, ry2 = np.mean(bs, axis=0) if bs else mean_all
        w, h = r["meta"]["width"], r["meta"]["height"]
        p_geom = shapely.box(rx1 * w, ry1 * h, rx2 * w, ry2 * h)
        gt = r["meta"]["objects"][0]["poly"]
        g_geom = shapely.box(*hboxes(gt)[0]) if r["meta"].get("box_format", "hbox") == "hbox" else quad_geoms(gt)[0]
        inter = 0.0 if g_geom is None else shapely.intersection(p_geom, g_geom).area
        union = p_geom.area + (0.0 if g_geom is None else g_geom.area) - inter
        ious.append(inter / union if union > 0 else 0.0)
    ious = np.array(ious)
    return {"Acc@0.5": float(np.mean(ious > 0.5)) if len(ious) else 0.0,
            "meanIoU": float(ious.mean()) if len(ious) else 0.0, "n": len(recs),
            "expressions_seen_in_training": seen, "train_records": sum(len(bs) for bs in by_expr.values()),
            "rule": "the mean training box (relative to the image) of the record's expression, else of all"}


# -----------------------------------------------------------------------------
# Benchmark grounding rules (records of data_prep.py refgeo / vrsbench / geochat): Acc@0.5 per group of
# meta["groups"] (VRSBench unique / non-unique, object size) and GeoChat-Bench referring (meta["benchmark"]
# "geochat_referring"), whose targets can be several objects.

REFERRING_RULE = ("GeoChat-Bench referring, RSCoVLM's rule: an answer without a polygon is read as horizontal boxes "
                  "(hbox_fallback counts them); per sample, the GIoU of every answer box with every "
                  "target (polygons in original pixels); greedy matching takes the highest GIoU left while it is "
                  ">= 0.5 (both leave); the sample is correct when every box and every target are matched (F1 = 1); "
                  "precision = correct / samples, overall and per object size, type and single/multiple target; an "
                  "answer without a box is wrong")


def poly_giou(a, b):
    """Generalised IoU of two quadrilaterals (8 numbers each): IoU - (C - U) / C with C the area of the convex
    hull of both and U their union. A degenerate quadrilateral gives -1 (it can match nothing)."""
    ga, gb = quad_geoms([a, b])
    if ga is None or gb is None:
        return -1.0
    inter = _safe_inter_area(ga, gb)
    union = ga.area + gb.area - inter
    hull = shapely.convex_hull(shapely.geometrycollections([ga, gb])).area
    if union <= 0 or hull <= 0:
        return -1.0
    return float(inter / union - (hull - union) / hull)


def greedy_matches(scores, thr=0.5):
    """[(prediction, target)] pairs of a (predictions x targets) score matrix, RSCoVLM's GeoChat-Bench rule: the
    highest score left, while >= thr, pairs its row and column, which both leave (ties: lowest row, then column).
    Greedy, not an optimal assignment: a box taking the target another box needed can leave that box unmatched."""
    m = np.array(scores, dtype=float)
    if m.size == 0:
        return []
    pairs = []
    for _ in range(min(m.shape)):
        i, j = np.unravel_index(np.argmax(m), m.shape)
        if m[i, j] < thr:
            break
        pairs.append((int(i), int(j)))
        m[i, :], m[:, j] = -np.inf, -np.inf
    return pairs


def group_rates(rows):
    """{group: {value: {"rate", "n"}}} of rows (record, correct) by the record's meta["groups"]."""
    counts = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r, ok in rows:
        for key, value in (r["meta"].get("groups") or {}).items():
            c = counts[key][str(value)]
            c[0], c[1] = c[0] + bool(ok), c[1] + 1
    return {k: {v: {"rate": c[0] / c[1], "n": c[1]} for v, c in sorted(vs.items())} for k, vs in sorted(counts.items())}


def score_referring(recs, answers, thr=0.5):
    """GeoChat-Bench referring precision (REFERRING_RULE) over ground records whose meta["objects"] are all the
    targets, with answers {id: (objects, stats)} as score_ground returns them."""
    rows = []
    for r in recs:
        targets = [o["poly"] for o in r["meta"]["objects"]]
        boxes_ = [o["poly"] for o in answers[r["id"]][0]]
        matched = len(greedy_matches([[poly_giou(p, t) for t in targets] for p in boxes_], thr)) if boxes_ else 0
        rows.append((r, matched == len(boxes_) == len(targets)))
    n = len(rows)
    fallback = sum(bool((answers[r["id"]][1] or {}).get("hbox_fallback")) for r in recs)
    return {"precision": sum(ok for _, ok in rows) / n if n else 0.0, "n": n, "correct": sum(ok for _, ok in rows),
            "groups": group_rates(rows), "hbox_fallback": fallback, "rule": REFERRING_RULE}


def first_box_ious(recs, answers):
    """Per record the IoU score_ground counts: the answer's first box against the first object (horizontal boxes
    for hbox records, polygons otherwise; no box = 0)."""
    ious = []
    for r in recs:
        objs = answers[r["id"]][0]
        if not objs:
            ious.append(0.0)
            continue
        gt, pred = r["meta"]["objects"][0]["poly"], objs[0]["poly"]
        if r["meta"].get("box_format", "hbox") == "hbox":
            g, p = shapely.box(*hboxes(gt)[0]), shapely.box(*hboxes(pred)[0])
        else:
            g, p = quad_geoms([gt, pred])
        inter = 0.0 if g is None or p is None else _safe_inter_area(g, p)
        union = (0.0 if g is None else g.area) + (0.0 if p is None else p.area) - inter
        ious.append(inter / union if union > 0 else 0.0)
    return ious


VRSBENCH_RULES = {
    "rscovlm": "the headline (Acc@0.5 above): continuous IoU > t of the answer's first box with the target in original "
               "pixels, all samples (RSCoVLM's own VRSBench code compares pixel answers with the 0..100 grid numbers: "
               "not reproduced); a target without area scores 0 (degenerate_targets)",
    "official": "VRSBench's script (eval_fianl/compute_metrics.ipynb, eval_utils.computeIoU): the answer's first box "
                "on the 0..100 grid, int(x * 100 / W), against the entry's {<x1><y1><x2><y2>} integers; IoU with "
                "+1-pixel areas (inter = max(0, x2' - x1' + 1) * ...), Acc@t = IoU >= t over all samples (no box = "
                "wrong), meanIoU over all, cumIoU = sum I / sum U over the answered",
}


def grid_iou(a, b):
    """(IoU, intersection, union) of two integer boxes with VRSBench's +1-pixel convention (eval_utils.computeIoU)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return (inter / union if union else 0.0), inter, union


def score_grid(recs, answers):
    """VRSBench's official referring scores (VRSBENCH_RULES["official"]) over records with meta["grid_box"]."""
    ious, inters, unions = [], 0, 0
    for r in recs:
        objs = answers[r["id"]][0]
        if not objs:
            ious.append(0.0)
            continue
        w, h = r["meta"]["width"], r["meta"]["height"]
        x1, y1, x2, y2 = hboxes([objs[0]["poly"]])[0]
        grid = [int(x1 * 100 / w), int(y1 * 100 / h), int(x2 * 100 / w), int(y2 * 100 / h)]  # 29*100/100 is 29
        iou, i, u = grid_iou(grid, r["meta"]["grid_box"])
        ious.append(iou)
        inters, unions = inters + i, unions + u
    n = len(ious)
    return {"n": n, "Acc@0.5": sum(v >= 0.5 for v in ious) / n, "Acc@0.7": sum(v >= 0.7 for v in ious) / n,
            "meanIoU": sum(ious) / n, "cumIoU": inters / unions if unions else 0.0}


def ground_benchmark(recs, answers, ds):
    """What a benchmark's grounding records add to score_ground (printed, and returned for metrics.json):
    GeoChat-Bench referring precision, or Acc@0.5 per group of meta["groups"], VRSBench's official grid rule,
    and how many targets have no area (bench_prep keeps and counts them; no IoU can match them)."""
    extra = {}
    n_flat = sum(bool(r["meta"].get("degenerate")) for r in recs)
    if n_flat:
        extra["degenerate_targets"] = n_flat
        print(f"   targets without area: {n_flat} (kept; scored as written)")
    if recs and all("grid_box" in r["meta"] for r in recs):
        extra.update(official=score_grid(recs, answers), rules=VRSBENCH_RULES)
        o = extra["official"]
        print(f"   official (VRSBench grid, +1 IoU, >=): Acc@0.5 {100 * o['Acc@0.5']:.2f}  Acc@0.7 {100 * o['Acc@0.7']:.2f}"
              f"  meanIoU {100 * o['meanIoU']:.2f}")
    if any(r["meta"].get("benchmark") == "geochat_referring" for r in recs):
        res = score_referring(recs, answers)
        print(f"   referring (GeoChat-Bench): precision@GIoU0.5 {100 * res['precision']:.2f} (n={res['n']}); "
              + "; ".join(f"{k} " + ", ".join(f"{v} {100 * x['rate']:.2f} (n={x['n']})" for v, x in vs.items())
                          for k, vs in res["groups"].items()))
        return {**extra, "referring": res}
    if not any(r["meta"].get("groups") for r in recs):
        return extra
    groups = group_rates([(r, iou > 0.5) for r, iou in zip(recs, first_box_ious(recs, answers))])
    print(f"   Acc@0.5 by group ({ds}): " + "; ".join(
        f"{k} " + ", ".join(f"{v} {100 * x['rate']:.2f} (n={x['n']})" for v, x in vs.items()) for k, vs in groups.items()))
    return {**extra, "groups": groups}


def headline(metrics):
    """The one number per task and dataset that a curve or a paper table shows: det mAP, ground Acc@0.5, and for
    GeoChat-Bench referring its precision (the first box's Acc@0.5 says little when a sample has several
    targets)."""
    heads = {f"det/{ds}: mAP": r["mAP"] for ds, r in metrics["det"].items()}
    for ds, r in metrics["ground"].items():
        if "referring" in r:
            heads[f"ground/{ds}: precision@GIoU0.5"] = r["referring"]["precision"]
        else:
            heads[f"ground/{ds}: Acc@0.5"] = r["Acc@0.5"]
    return heads


def parse_report(recs, preds, answers, classes=None):
    """Counts of parse failures: answers with junk lines, with unknown labels, with no usable box although
    they wrote something (an empty answer or "There are none." is counted apart), plus the summed counters
    of boxes.parse_answer (sum_*)."""
    rep = Counter()
    for r in recs:
        objs, stats = answers[r["id"]]
        rep["answers"] += 1
        if preds.get(r["id"]) is None:
            rep["missing_predictions"] += 1
            continue
        stats = stats or {}
        rep["answers_with_junk_lines"] += stats.get("junk_lines", 0) > 0
        rep["answers_with_unknown_labels"] += stats.get("unknown_labels", 0) > 0
        rep["answers_with_invalid_boxes"] += stats.get("invalid_boxes", 0) > 0
        rep["answers_none_or_empty"] += stats.get("lines", 0) == 0
        rep["answers_with_no_boxes"] += stats.get("lines", 0) > 0 and not objs
        if classes is not None:  # det: a box whose label is missing cannot be scored
            rep["boxes_without_class"] += sum(o.get("label") not in classes for o in objs)
        for k, v in stats.items():
            if isinstance(v, (int, float)):
                rep[f"sum_{k}"] += v
    return dict(rep)


# What parse_report's counts are called in the printed line (zero counts are left out of it).
ANSWER_COUNTS = {"missing_predictions": "without prediction", "answers_none_or_empty": "none or empty",
                 "answers_with_no_boxes": "with no usable box", "answers_with_junk_lines": "with junk lines",
                 "answers_with_invalid_boxes": "with invalid boxes", "answers_with_unknown_labels": "with unknown labels"}
LINE_COUNTS = {"sum_boxes": "boxes", "sum_junk_lines": "junk", "sum_invalid_boxes": "invalid boxes",
               "sum_unknown_labels": "unknown labels", "sum_duplicates": "duplicates"}
NOTE_COUNTS = {"sum_extra_numbers": "with extra numbers dropped", "sum_mapped_labels": "with a misspelt label matched",
               "boxes_without_class": "without a class (not scored)"}


def format_parse(rep):
    """parse_report as one readable line, e.g. "120 answers (3 without prediction, 2 with junk lines);
    1,310 lines: 1,290 boxes, 12 junk, 8 invalid boxes; boxes: 5 with extra numbers dropped"."""
    def part(counts):
        return ", ".join(f"{rep[k]:,} {name}" for k, name in counts.items() if rep.get(k))

    text = f"{rep.get('answers', 0):,} answers" + (f" ({part(ANSWER_COUNTS)})" if part(ANSWER_COUNTS) else "")
    text += f"; {rep.get('sum_lines', 0):,} lines" + (f": {part(LINE_COUNTS)}" if part(LINE_COUNTS) else "")
    return text + (f"; boxes {part(NOTE_COUNTS)}" if part(NOTE_COUNTS) else "")


# -----------------------------------------------------------------------------
# Reporting: per-class table, drawings


def print_det_table(title, res, res_hbb=None):
    print(f"\n== {title}: mAP {100 * res['mAP']:.2f} (all {len(res['AP'])} classes, headline)  "
          f"mAP_gt_classes {100 * res['mAP_gt_classes']:.2f}  mF1 {100 * res['mF1']:.2f}"
          + (f"  mAP_hbb {100 * res_hbb['mAP']:.2f}" if res_hbb else "")
          + f"  [{res['protocol']['ap']}, {res['protocol']['iou']}]")
    fmt = lambda v: "   -  " if v is None else f"{100 * v:6.2f}"  # noqa: E731
    print(f"{'class':<28}{'GT':>7}{'dets':>8}{'AP':>8}" + (f"{'AP_hbb':>8}" if res_hbb else "") + f"{'P':>8}{'R':>8}{'F1':>8}")
    for c in res["AP"]:
        print(f"{c:<28}{res['npos'][c]:>7}{res['ndet'][c]:>8}  {fmt(res['AP'][c])}"
              + (f"  {fmt(res_hbb['AP'][c])}" if res_hbb else "")
              + f"  {fmt(res['P'][c])}  {fmt(res['R'][c])}  {fmt(res['F1'][c])}")


def draw(image_path, gt_objs, pred_objs, out_png, scale=1.0):
    """ground truth in green, predictions in red, each with its label; scale maps polygon pixels to the image."""
    from PIL import Image, ImageDraw, ImageOps

    try:
        with Image.open(image_path) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")  # upright, as the model saw it
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {image_path}: {e}") from None
    canvas = ImageDraw.Draw(img)
    for objs, colour in ((gt_objs, (0, 220, 0)), (pred_objs, (255, 40, 40))):
        for o in objs:
            pts = [(o["poly"][k] * scale, o["poly"][k + 1] * scale) for k in range(0, 8, 2)]
            canvas.polygon(pts, outline=colour, width=2)
            if o.get("label"):
                canvas.text((pts[0][0] + 2, pts[0][1] - 11), str(o["label"]), fill=colour)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    img.save(out_png)


def safe_name(s):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s))


# -----------------------------------------------------------------------------
# Prediction with a checkpoint (common.predict_for_eval: model.predict's resumable loop)


def predict_records(args, recs, class_list=None, loaded=None):
    """Greedy answers for det/ground records into OUT/predictions.jsonl. Each line also carries the parsed
    geometry in original-image pixels and the coordinate convention, so --preds can rescore without a model.
    Returns (the predictions path on the main rank, None on the others; the generation settings used)."""
    det_recs = defaultdict(list)
    for r in recs:
        if r["task"] == "det":
            det_recs[r["dataset"]].append(r)
    classes = {ds: dataset_classes(rs, class_list) for ds, rs in det_recs.items()}

    def make_postprocess(processor):
        import model

        def parsed(rec, text):
            w, h = rec["meta"]["width"], rec["meta"]["height"]
            kw = model.coord_kwargs(processor, w, h)
            objs, stats = boxes.parse_answer(text, w, h, **kw, box_format=rec["meta"].get("box_format"),
                                             classes=classes.get(rec["dataset"]) if rec["task"] == "det" else None)
            return {"task": rec["task"], "dataset": rec["dataset"], "objects": objs, "parse": stats,
                    "coords": kw["coords"], "resized_hw": list(kw["resized_hw"]) if kw["resized_hw"] else None}
        return parsed

    pred_path, _, generation = predict_for_eval(args, recs, loaded, make_postprocess)
    return pred_path, generation


def make_coord_fn(args):
    """(width, height) -> coord kwargs for boxes.parse_answer, for answers stored without parsed boxes."""
    if args.processor or args.ckpt:
        proc = []

        def from_processor(w, h):  # the processor decides the resized size (Qwen2.5-VL) or norm1000 (Qwen3-VL)
            import model

            if not proc:
                proc.append(model.load_processor(args.processor or args.ckpt, min_pixels=args.min_pixels, max_pixels=args.max_pixels))
            return model.coord_kwargs(proc[0], w, h)
        return from_processor
    if args.coords:
        return lambda w, h: {"coords": args.coords, "resized_hw": None}

    def missing(w, h):
        raise UserError(f"{args.preds} holds answer text only (no parsed boxes): say how to read its "
                        f"coordinates with --coords abs|norm1000 or --processor DIR (the checkpoint the "
                        f"answers were made with: its family and pixel budget)")
    return missing


# -----------------------------------------------------------------------------
# Scoring: a DOTA submission folder, or records against a predictions file


def run_dota_task1(args):
    classes = det_files.read_class_list(args.classes or "dota1.0")
    names = None
    if args.imageset:
        names = [ln.strip() for ln in boxes.read_text(args.imageset).splitlines() if ln.strip()]
        if not names:
            raise UserError(f"--imageset {args.imageset}: no image names in it (one per line)")
    gt, names = det_files.gt_from_labels(args.gt, classes, names)
    if not len(gt["label"]):  # every AP would be 0 whatever the detections
        raise UserError(f"--gt {args.gt}: its {len(names)} label files hold no objects")
    dets = det_files.read_task_files(args.dota_task1, args.task, classes, {n: i for i, n in enumerate(names)})
    res = score_det(gt, dets, classes, task=args.task, ap_rule=args.ap, iou_thr=args.iou, f1_score_thr=args.f1_score_thr)
    res["images"] = len(names)
    print_det_table(f"Task{args.task} {args.dota_task1} vs {args.gt} ({len(names)} images, {len(dets['score'])} detections)", res)
    if args.vis and args.images and args.task == 1:
        out = Path(args.out or args.dota_task1) / "vis"
        for i, name in enumerate(names[:args.vis]):
            img = next((p for p in Path(args.images).glob(f"{name}.*")), None)
            if img is None:
                continue
            gsel, dsel = gt["image"] == i, dets["image"] == i
            g = [{"poly": p, "label": classes[c] if c >= 0 else None} for p, c in zip(gt["poly"][gsel].tolist(), gt["label"][gsel].tolist())]
            d = [{"poly": p, "label": classes[c]} for p, c in zip(dets["poly"][dsel].tolist(), dets["label"][dsel].tolist())]
            draw(img, g, d, out / f"{safe_name(name)}.png")
    return res


def run_records(args, recs, pred_path, generation=None, class_list=None, prior_records=()):
    """Score det and ground records (read_det_records) against a predictions file, one dataset at a time.
    generation: the settings predict_records used (None for --preds: then read from the file's .settings.json
    when it has one). class_list: --classes; prior_records: the ground records of --prior."""
    out_dir = Path(args.out) if args.out else Path(pred_path).parent
    preds = read_predictions(pred_path)
    generation = generation or generation_settings(pred_path)
    check_overlap(preds, recs, pred_path, args.data, args.limit)
    coord_fn = make_coord_fn(args)
    metrics = {"det": {}, "ground": {}, "parse": {}, "predictions": str(pred_path), "data": str(args.data),
               "generation": generation}
    by_ds = defaultdict(list)
    for r in recs:
        by_ds[(r["task"], r["dataset"])].append(r)
    for (task, ds), rs in by_ds.items():
        if task == "det":
            res, answers = score_det_dataset(args, ds, rs, preds, coord_fn, class_list, out_dir)
        else:
            res, answers = score_ground_dataset(args, ds, rs, preds, coord_fn, prior_records)
        metrics[task][ds] = res
        metrics["parse"][f"{task}/{ds}"] = report_answers(args, f"{task}/{ds}", rs, preds, answers, res, generation,
                                                          out_dir)
    metrics["headline"] = headline(metrics)
    unknown_ids = [k for k in preds if k not in {r["id"] for r in recs}]
    if unknown_ids:
        metrics["predictions_not_in_data"] = len(unknown_ids)
        print(f"note: {len(unknown_ids)} predictions have ids that are not det/ground records of {args.data}", file=sys.stderr)
    return metrics


def score_det_dataset(args, ds, rs, preds, coord_fn, class_list, out_dir):
    """One det dataset: devkit AP (polygons, and horizontal boxes as "hbb"), printed as a table; --merge."""
    classes = dataset_classes(rs, class_list)
    if not classes:
        raise UserError(f"the det records of dataset '{ds}' in {args.data} name no classes (no meta['classes'], no "
                        f"objects): give --classes")
    objects = [o for r in rs for o in r["meta"].get("objects", [])]
    det_files.check_classes_match(Counter(o["label"] for o in objects if o["label"] not in classes), len(objects),
                        classes, f"det/{ds} of {args.data}")
    if not objects:
        print(f"note: det/{ds} has no ground-truth objects (a test split?): its AP is 0 by definition", file=sys.stderr)
    gt, dets, answers = det_arrays(rs, preds, classes, coord_fn, args.reparse)
    kw = dict(ap_rule=args.ap, iou_thr=args.iou, f1_score_thr=args.f1_score_thr)
    res = score_det(gt, dets, classes, task=1, **kw)
    res["hbb"] = {k: v for k, v in score_det(gt, dets, classes, task=2, **kw).items()
                  if k in ("mAP", "mAP_gt_classes", "mF1", "AP", "protocol")}
    res["images"] = len(rs)
    res["level"] = "patch" if any("offset" in r["meta"] for r in rs) else "image"
    print_det_table(f"det {ds} ({len(rs)} {'patches' if res['level'] == 'patch' else 'images'})", res, res["hbb"])
    if args.merge:
        res["merged"] = merge_and_score(args, rs, dets, classes, out_dir / "merged" / safe_name(ds))
    return res, answers


def score_ground_dataset(args, ds, rs, preds, coord_fn, prior_records):
    """One ground dataset: Acc@0.5 etc., a benchmark's groups or referring precision, the --prior beside it."""
    res, answers = score_ground(rs, preds, coord_fn, args.reparse)
    print(f"\n== ground {ds}: Acc@0.5 {100 * res['Acc@0.5']:.2f}  Acc@0.7 {100 * res['Acc@0.7']:.2f}  "
          f"meanIoU {100 * res['meanIoU']:.2f}  cumIoU {100 * res['cumIoU']:.2f}  (n={res['n']}, no box: {res['no_box']})")
    res.update(ground_benchmark(rs, answers, ds))  # benchmark records: per-group Acc@0.5, referring
    if args.prior:
        res["prior"] = score_text_prior([t for t in prior_records if t["task"] == "ground"], rs)
        print(f"   text prior ({args.prior}): Acc@0.5 {100 * res['prior']['Acc@0.5']:.2f}  "
              f"meanIoU {100 * res['prior']['meanIoU']:.2f}")
    return res, answers


def report_answers(args, name, rs, preds, answers, res, generation, out_dir):
    """What the answers of one dataset were: the parse report and the cut count (into res, printed, a warning
    when any were cut or missing), and --vis drawings. Returns the parse report."""
    rep = parse_report(rs, preds, answers, list(res["AP"]) if "AP" in res else None)
    print(f"   parse: {format_parse(rep)}")
    n = sum(r["id"] in preds for r in rs)
    res["cut"], res["cut_unknown"] = count_cut(rs, preds, {i: line.get("cut") for i, line in preds.items()})
    print(f"   {format_cut(res['cut'], res['cut_unknown'], n)}")
    warn_cut(name, res["cut"], n, generation)
    if rep.get("missing_predictions"):
        where = args.preds or Path(args.out) / "predictions.jsonl"
        print(f"WARNING: {rep['missing_predictions']} {name} records have no prediction in {where} "
              f"(scored as empty answers)", file=sys.stderr)
    for r in rs[:args.vis]:
        if r.get("images"):
            try:
                draw(r["images"][0], r["meta"].get("objects", []), answers[r["id"]][0], out_dir / "vis" / f"{safe_name(r['id'])}.png")
            except UserError as e:
                raise UserError(f"{record_where(r)}: --vis: {e}") from None
    return rep


def merge_and_score(args, rs, dets, classes, out_dir):
    """--merge: patch detections -> whole images -> zipped Task1 files; scored when --gt has the labels."""
    info = []
    for r in rs:
        m = r["meta"]
        info.append((m.get("source", r["id"]), tuple(m.get("offset", (0, 0))), float(m.get("rate", 1.0))))
    merged, sources = merge_patches(dets, [r["id"] for r in rs], info)
    det_files.write_task1(out_dir, classes, sources, merged, zip_path=out_dir.with_suffix(".zip"))
    res = {"images": len(sources), "detections": int(len(merged["score"])), "task1_zip": str(out_dir.with_suffix(".zip"))}
    print(f"   merged {len(rs)} patches -> {len(sources)} images, {res['detections']} detections -> {res['task1_zip']}")
    if set(classes) <= set(boxes.FAIR1M_CLASSES):  # FAIR1M's own submission too
        xml_dir = out_dir.with_name(out_dir.name + "_fair1m")
        det_files.write_fair1m(xml_dir, classes, sources, merged, zip_path=xml_dir.with_suffix(".zip"))
        res["fair1m_zip"] = str(xml_dir.with_suffix(".zip"))
        print(f"   FAIR1M submission (one XML per image) -> {res['fair1m_zip']}")
    if args.gt:
        gt, names = det_files.gt_from_labels(args.gt, classes, sources)
        kw = dict(ap_rule=args.ap, iou_thr=args.iou, f1_score_thr=args.f1_score_thr)
        res.update(score_det(gt, merged, classes, task=1, **kw))
        print_det_table(f"merged vs {args.gt}", res)
    return res


# -----------------------------------------------------------------------------
# Main


def get_args(argv=None):
    ap = OneLineParser(description="Detection / grounding evaluation (DOTA protocol, Acc@0.5).")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ckpt", help="checkpoint folder: predict every det/ground record of --data, then score")
    mode.add_argument("--preds", help="predictions JSONL (lines with 'id' and 'text') to score against --data")
    mode.add_argument("--dota-task1", help="folder of Task1_{class}.txt (or Task2_ with --task 2) files to score against --gt")
    ap.add_argument("--data", help="records JSONL with the ground truth (det and ground records are used)")
    ap.add_argument("--out", help="output folder: predictions.jsonl, metrics.json, merged/, vis/ (required with --ckpt; "
                                  "default with --preds: the predictions file's folder)")
    ap.add_argument("--json-out", help="metrics file (default: OUT/metrics.json when --out is given)")
    ap.add_argument("--gt", help="ground-truth folder (DOTA labelTxt or FAIR1M labelXml) for --dota-task1 and --merge")
    ap.add_argument("--imageset", help="file with one image name per line: score only these (default: every label file in --gt)")
    ap.add_argument("--task", type=int, choices=[1, 2], default=1, help="--dota-task1: 1 = oriented polygons, 2 = horizontal boxes (default %(default)s)")
    ap.add_argument("--classes", help="class list: dota1.0 | dota1.5 | dota2.0 | dior | fair1m | a file with one class per line "
                                      "(default: dota1.0 for --dota-task1, else the records' meta['classes'])")
    ap.add_argument("--ap", choices=["voc07", "area"], default="voc07", help="AP rule: VOC07 11-point (DOTA devkit) or all-point area (default %(default)s)")
    ap.add_argument("--iou", type=float, default=0.5, help="IoU threshold: a match needs IoU > this, strictly (default %(default)s)")
    ap.add_argument("--f1-score-thr", type=float, default=0.0, help="mF1 counts only detections with score >= this (default %(default)s; VLM answers score 1.0)")
    ap.add_argument("--merge", action="store_true", help="merge patch records (meta source/offset) to whole images, write "
                                                          "zipped Task1 files, score them against --gt if given")
    ap.add_argument("--vis", type=int, default=0, help="draw ground truth and predictions on this many images of each task and dataset into OUT/vis")
    ap.add_argument("--images", help="--dota-task1 with --vis: folder of the images (NAME.png/.jpg/.tif)")
    ap.add_argument("--coords", choices=["abs", "norm1000"], help="coordinates of answers without parsed boxes: abs = original "
                                                                  "pixels (resized pixels with --processor), norm1000 = 0..1000")
    ap.add_argument("--processor", help="checkpoint whose family and pixel budget the answers were made with (--preds)")
    ap.add_argument("--reparse", action="store_true", help="parse the answer text again even when the predictions file has parsed boxes")
    ap.add_argument("--prior", metavar="TRAIN_JSONL", help="also score the grounding text prior: the mean training box of "
                                                           "each expression in this file")
    add_generation_flags(ap, "auto", "a dense 1024-px DOTA patch needs over 15k tokens, one per digit")
    add_model_flags(ap)
    ap.add_argument("--limit", type=positive_int, help="only the first N det/ground records (quick checks)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if not 0 <= args.iou < 1:
        ap.error("argument --iou: give a number in [0, 1)")
    if args.dota_task1 and not args.gt:
        ap.error("--dota-task1 needs --gt LABEL_DIR")
    if (args.ckpt or args.preds) and not args.data:
        ap.error("--ckpt and --preds need --data (the records with the ground truth)")
    if args.ckpt and not args.out:
        ap.error("--ckpt needs --out (where predictions.jsonl is written and resumed from)")
    return args


def check_paths(args):
    """Every path flag names what it should, checked before anything is read or loaded: one line naming the
    flag and the path (read_records does the same for --data)."""
    for flag in ("preds", "imageset"):
        check_path(f"--{flag}", getattr(args, flag), "file")
    for flag in ("dota_task1", "gt", "images"):
        check_path(f"--{flag.replace('_', '-')}", getattr(args, flag), "folder")
    for flag in ("ckpt", "processor"):
        if getattr(args, flag):
            check_checkpoint(f"--{flag}", getattr(args, flag))
    check_output_paths(args.out, args.json_out)


def main(argv=None):
    return run_eval(run, get_args(argv))


def run(args, loaded=None):
    """One evaluation (--ckpt, --preds or --dota-task1); the metrics dict, also written to OUT/metrics.json (None
    on the ranks other than 0 under torchrun). loaded: (model, processor) already loaded for --ckpt with these
    settings (eval_suite.py loads a checkpoint once for all its benchmarks)."""
    check_paths(args)
    class_list = det_files.read_class_list(args.classes) if args.classes and not args.dota_task1 else None
    prior_records = read_records(args.prior) if args.prior else []
    t0 = time.time()
    if args.dota_task1:
        metrics = run_dota_task1(args)
    else:
        recs = read_det_records(args)
        pred_path, generation = args.preds, None
        if args.ckpt:
            pred_path, generation = predict_records(args, recs, class_list, loaded)
            if pred_path is None:  # not the main rank: rank 0 scores
                return None
        metrics = run_records(args, recs, pred_path, generation, class_list, prior_records)
    metrics["args"] = dict(vars(args))
    metrics["seconds"] = round(time.time() - t0, 3)
    write_metrics(metrics, args)
    return metrics


if __name__ == "__main__":
    run_cli(main)  # a UserError: one line "error: ..." on stderr, exit 2
