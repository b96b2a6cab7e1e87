"""Issue 21: both papers' scoring rules, labelled "official" / "rscovlm", and the converters on the real releases'
forms (refGeo folders and pretty-printed metainfo, AID label spellings, VRSBench grid boxes without area, GeoChat
4-number answers, XLRS-Bench, FAIR1M submissions, DOTA v1.5/v2.0 lists).

Every expected number is computed by hand in the comments from the rule's source: the benchmark's own script
(repo and path cited) and RSCoVLM's (VisionXLab/RSCoVLM rscovlm/eval/metric/*.py)."""
import json
import zipfile

import numpy as np
import pytest
from test_benchmarks import _geochat_referring, det_scores, image, jsonl, read, run, sq, vqa_scores

import bench_prep
import boxes
import data_prep
import det_files
import eval_det
import eval_suite
import eval_vqa
import model
import prompts
from common import UserError


def vqa_rec(rid, gt, meta, dataset="d"):
    return {"id": rid, "task": "vqa", "dataset": dataset, "messages": [], "meta": {"answer": gt, **meta}}


# -----------------------------------------------------------------------------
# LRS-VQA: VisionXLab/LRS-VQA Script/evaluation_LRSVQA.py:42-56 (lower-case; the answer stripped by its
# inference, llava_eval_LRSVQA.py:126) vs RSCoVLM large_image_bench.py:8-35 (.lower().strip().strip("."))


def test_lrs_vqa_official_and_rscovlm_rules(monkeypatch):
    monkeypatch.setattr(eval_vqa, "_WORDNET", [(None, "off in this test")])
    rows = [("FAIR_1", "count", "3", "3."), ("FAIR_2", "object color", "white", "White"),
            ("FAIR_3", "object shape", "round", "square"), ("FAIR_4", "object category", "ship", "ship"),
            ("STAR_1", "count", "2", " 2 "), ("STAR_2", "object background", "water", "land"),
            ("STAR_3", "object status", "moving", "static"), ("STAR_4", "reasoning", "no", "No.")]
    recs = [vqa_rec(q, gt, {"type": t, "question_id": q, "benchmark": "lrs_vqa"}, "lrs") for q, t, gt, _ in rows]
    preds = {q: p for q, _, _, p in rows}
    res = eval_vqa.score_lrs_vqa(recs, preds, {})["lrs"]
    off, rs = res["official"], res["rscovlm"]
    # official: FAIR_2, FAIR_4, STAR_1 = 3/8 ("3." and "no." keep their '.'); rscovlm adds FAIR_1, STAR_4: 5/8
    assert off["overall"] == 3 / 8 and rs["overall"] == 5 / 8
    # per task, rscovlm: count 1, color 1, shape 0, category 1, background 0, status 0, reasoning 1 -> 4/7
    assert rs["average"] == pytest.approx(4 / 7) and off["average"] == pytest.approx(2.5 / 7)  # count 1/2, reasoning 0
    # per source (the official script's datasets): FAIR OA 2/4, AA (0+1+0+1)/4; STAR 1/4, (1+0+0+0)/4
    assert off["sources"]["FAIR"]["overall"] == off["sources"]["FAIR"]["average"] == 1 / 2
    assert off["sources"]["STAR"]["overall"] == off["sources"]["STAR"]["average"] == 1 / 4
    assert rs["sources"]["FAIR"]["average"] == 3 / 4 and rs["sources"]["STAR"]["average"] == 1 / 2
    m = eval_vqa.evaluate(recs, preds)
    assert eval_vqa.headline(m) == {"lrs_vqa/lrs: average (rscovlm)": pytest.approx(4 / 7)}
    assert set(m["rules"]["lrs_vqa"]) >= {"official", "rscovlm"}


# -----------------------------------------------------------------------------
# MME-RealWorld: yfzhang114/MME-RealWorld evaluation/eval_your_results.py:23-46 vs RSCoVLM's contain
# (large_image_bench.py:38-44, metric.py:34-48)


def test_mme_official_extractor_and_rscovlm_contain():
    ch = ["(A) red", "(B) blue", "(C) green", "(D) white", "(E) none of the above"]
    rows = [("A", ""),                  # official: '' is in every choice -> the first, A (right); contain: wrong
            ("A", "A"),                 # both right
            ("B", "The answer is B"),   # the prefix goes: B; contain right
            ("C", "Best answer: C"),    # "Best answer:" is glued to the next prefix, not removed: the B of Best
            ("D", "(D) white"),         # both right
            ("E", "none"),              # no capital A-E: the choice holding "none" is E; contain: 'e' in 'none'
            ("A", "Bad answer")]        # official B; contain: 'a' in 'bad answer'
    recs = [vqa_rec(str(i), gt, {"type": "color", "choices": ch, "benchmark": "mme_realworld"}, "mme")
            for i, (gt, _) in enumerate(rows)]
    res = eval_vqa.score_mme(recs, {str(i): p for i, (_, p) in enumerate(rows)}, {})["mme"]
    assert res["official"]["overall"] == pytest.approx(5 / 7)  # rows 0, 1, 2, 4, 5
    assert res["rscovlm"]["overall"] == pytest.approx(6 / 7)   # rows 1-6
    assert res["chose_E"] == 1 and res["no_letter"] == 0
    m = eval_vqa.evaluate(recs, {str(i): p for i, (_, p) in enumerate(rows)})
    assert eval_vqa.headline(m) == {"mme_realworld/mme: overall (rscovlm)": pytest.approx(6 / 7)}


# -----------------------------------------------------------------------------
# VHM: fitzpchao/RSEvalKit model_eval_mp.py:126-307 (official) vs RSCoVLM rscovlm/eval/metric/vhm_bench.py:5-40


@pytest.mark.parametrize("pred, gt, official, rscovlm", [
    ("No.", "no", False, True),          # official: 'no' looked for case-sensitively in the raw answer
    ("Not present", "no", False, True),
    ("TRUE", "yes", False, True),        # official: only 'yes' counts for yes
    ("Yes, there is.", "yes", True, True),
    ("There is snow", "yes", False, False),  # both: 'no' in 'snow'
    ("no", "No", True, True),
])
def test_vhm_presence_rules(pred, gt, official, rscovlm):
    assert eval_vqa.vhm_presence(pred, gt, "official") is official
    assert eval_vqa.vhm_presence(pred, gt, "rscovlm") is rscovlm


def test_vhm_choice_and_colour_rules():
    # both scripts: the first capital A-E, lower-cased, inside the GT
    assert not eval_vqa.vhm_choice("Answer: B", "B", "official") and not eval_vqa.vhm_choice("Answer: B", "B", "rscovlm")
    assert eval_vqa.vhm_choice("Both", "B", "official") and eval_vqa.vhm_choice("Both", "B", "rscovlm")
    assert not eval_vqa.vhm_choice("none", "A", "official")  # RSEvalKit stops on None: counted wrong here
    # colour: the GT "white,red." keeps its '.' officially: 'red.' is not in 'whiteandred' -> 1/2; rscovlm 2/2
    assert eval_vqa.vhm_color("white and red", "white,red.", "official") == 0.5
    assert eval_vqa.vhm_color("white and red", "white,red.", "rscovlm") == 1.0
    recs = [vqa_rec(f"p{i}", gt, {"vhm_part": "presence", "benchmark": "vhm"}, "vhm_presence")
            for i, gt in enumerate(["no", "no", "yes"])]
    preds = {"p0": "No.", "p1": "no", "p2": "yes"}
    res = eval_vqa.score_vhm(recs, preds)["vhm_presence"]
    assert res["official"] == pytest.approx(2 / 3) and res["rscovlm"] == res["accuracy"] == 1.0
    m = eval_vqa.evaluate(recs, preds)
    m["headline"] = eval_vqa.headline(m)
    rows = [r["metric"] for r in eval_suite.table_rows({"name": "h", "split": "test"}, "eval_vqa", m)]
    assert rows[:2] == ["vqa/vhm_presence: accuracy (rscovlm)", "vqa/vhm_presence: AA"]
    assert "vhm/vhm_presence: accuracy (official)" in rows


# -----------------------------------------------------------------------------
# VRSBench referring: lx709/VRSBench eval_fianl/compute_metrics.ipynb (cell 5) + eval_utils.computeIoU


def _vrsbench_grid(tmp_path):
    image(tmp_path / "Images_val" / "00001_0000.png", 100, 100)
    gts = ["{<10><10><50><50>}", "{<92><0><96><0>}", "{<10><10><12><12>}", "{<60><60><80><80>}"]
    rows = [{"image_id": "00001_0000.png", "question": f"The object {i}.", "ground_truth": g, "question_id": i,
             "type": "ref", "unique": True} for i, g in enumerate(gts)]
    path = tmp_path / "VRSBench_EVAL_referring.json"
    path.write_text(json.dumps(rows))
    return path


def test_vrsbench_grid_rule_and_targets_without_area(tmp_path):
    summary = run("vrsbench", "--json", _vrsbench_grid(tmp_path), "--images", tmp_path / "Images_val", "--out", tmp_path / "o")
    assert summary["counts"][bench_prep.DEGENERATE] == 1  # counted, not fatal for the file
    ref = read(tmp_path / "o" / "vrsbench_referring.jsonl")
    assert ref[1]["meta"]["grid_box"] == [92, 0, 96, 0] and ref[1]["meta"]["degenerate"] is True
    m = det_scores(tmp_path, ref, {"vrsbench_referring_0": "10,10,50,50", "vrsbench_referring_1": "92,0,96,1",
                                   "vrsbench_referring_2": "10,10,12,13"})
    g = m["ground"]["vrsbench_referring"]
    # official, +1 areas: 0: 1.0; 1: inter 5*1 = 5, union 5 + 10 - 5 = 10 -> 0.5; 2: 9 / (9 + 12 - 9) = 0.75; 3: none
    o = g["official"]
    assert (o["Acc@0.5"], o["Acc@0.7"]) == (0.75, 0.5) and o["meanIoU"] == pytest.approx((1 + 0.5 + 0.75) / 4)
    # continuous (the headline): 0: 1.0; 1: a target without area, 0; 2: 4 / 6 = 0.667; 3: none
    assert (g["Acc@0.5"], g["Acc@0.7"]) == (0.5, 0.25) and g["degenerate_targets"] == 1
    assert m["headline"]["ground/vrsbench_referring: Acc@0.5"] == 0.5
    rows = {r["metric"]: r["value"] for r in eval_suite.table_rows({"name": "v", "split": "val"}, "eval_det", m)}
    assert rows["ground/vrsbench_referring: Acc@0.5"] == 50.0 and rows["ground/vrsbench_referring: Acc@0.5 (official)"] == 75.0
    assert eval_det.grid_iou([10, 10, 12, 12], [10, 10, 12, 13])[0] == 0.75


# -----------------------------------------------------------------------------
# GeoChat-Bench referring: RSCoVLM reads 4-number boxes when an answer has no polygon (metric.py:283-297)


def test_geochat_referring_reads_boxes_without_polygons(tmp_path):
    ref = _geochat_referring(tmp_path)
    run("geochat", "--json", ref, "--images", tmp_path / "GeoChat_Instruct", "--out", tmp_path / "o")
    recs = read(tmp_path / "o" / "geochat_referring.jsonl")
    m = det_scores(tmp_path, recs, {recs[0]["id"]: "10,10,30,30 plane\n10,50,30,70 plane",
                                    recs[1]["id"]: "50,20,90,80 ship", recs[2]["id"]: "no tank here"})
    res = m["ground"]["geochat_referring"]["referring"]
    # both planes and the ship found as boxes (GIoU 1 each); the tank answer has no number
    assert res["correct"] == 2 and res["precision"] == pytest.approx(2 / 3) and res["hbox_fallback"] == 2
    assert m["parse"]["ground/geochat_referring"]["sum_hbox_fallback"] == 2


# -----------------------------------------------------------------------------
# refGeo as released: images/{DIOR-RSVG,...} (RSCoVLM training/data/refgeo_dataset.py:98) and pretty-printed lines


def test_refgeo_release_folders_and_pretty_printed_metainfo(tmp_path):
    root = tmp_path / "refGeo"
    image(root / "images" / "DIOR-RSVG" / "00001.jpg", 64, 48)
    image(root / "images" / "VRSBench" / "v1.png", 40, 40)
    recs = [{"image_id": "00001.jpg", "question": "dam on the left", "bbox": [5, 5, 50, 40]},
            {"image_id": "00001.jpg", "question": "white vehicle", "bbox": [30, 10, 40, 20]}]
    (root / "metainfo").mkdir(parents=True)
    (root / "metainfo" / "dior_rsvg_test.jsonl").write_text("".join(json.dumps(r, indent=2) + "\n" for r in recs))
    jsonl(root / "metainfo" / "vrsbench_test.jsonl", [{"image_id": "v1.png", "question": "car", "bbox": [1, 1, 9, 9],
                                                       "dataset": "VRSBench"}])
    s = run("refgeo", "--root", root, "--out", tmp_path / "o")
    assert [r["meta"]["objects"][0]["poly"] for r in read(tmp_path / "o" / "refgeo_dior_rsvg_test.jsonl")] == [
        sq(5, 5, 50, 40), sq(30, 10, 40, 20)]
    assert s["counts"][bench_prep.DEGENERATE] == 0
    jsonl(root / "metainfo" / "avvg_test.jsonl", [{"image_id": "v1.png", "question": "a line", "bbox": [5, 5, 5, 9]}])
    image(root / "images" / "AVVG" / "v1.png", 40, 40)
    s2 = run("refgeo", "--root", root, "--sets", "avvg_test", "--out", tmp_path / "flat")
    (flat,) = read(tmp_path / "flat" / "refgeo_avvg_test.jsonl")  # a box without area: kept, counted
    assert s2["counts"][bench_prep.DEGENERATE] == 1 and flat["meta"]["degenerate"] is True
    assert any(n.endswith("images/DIOR-RSVG") for n in s["notes"]) and any(n.endswith("images/VRSBench") for n in s["notes"])
    (root / "metainfo" / "dior_rsvg_test.jsonl").write_text('{\n  "image_id": "00001.jpg",\n  "question": "x"\n\n{"a": 1}\n')
    with pytest.raises(UserError, match=r"bad JSON at .*dior_rsvg_test\.jsonl:1: "):
        run("refgeo", "--root", root, "--sets", "dior_rsvg_test", "--out", tmp_path / "o2")
    jsonl(root / "metainfo" / "rsvg_test.jsonl", [{"image_id": "r.png", "question": "x", "bbox": [1, 1, 2, 2]}])
    with pytest.raises(UserError, match=r"refGeo set rsvg_test: no image folder .*images/\{rsvg,RSVG\} \(folders there: "
                                        r"AVVG, DIOR-RSVG, VRSBench\)"):
        run("refgeo", "--root", root, "--sets", "rsvg_test", "--out", tmp_path / "o3")


# -----------------------------------------------------------------------------
# AID spelled CamelCase (the release: "BareLand") or spaced ("Bare Land"): one target, one prompt, one split


def test_aid_label_spellings_give_one_target(tmp_path):
    got = {}
    for form in ("BareLand", "Bare Land"):
        root = tmp_path / form.replace(" ", "_") / "AID"
        for cls in (form, "Airport", "Beach"):
            for k in range(5):
                image(root / cls / f"{cls.lower().replace(' ', '')}_{k}.jpg", 8, 8)
        for preset in ("default", "rscovlm"):
            out = tmp_path / "o" / form.replace(" ", "_") / preset
            data_prep.main(["cls", "--root", str(root), "--train-ratio", "0.4", "--seed", "0", "--prompts", preset,
                            "--out", str(out), "--workers", "1"])
            test = read(out / "aid_test.jsonl")
            got[form, preset] = ([(r["images"][0].rsplit("/", 1)[1], r["meta"]["label"]) for r in test],
                                 test[0]["messages"][0]["content"])
    for preset, labels in (("default", {"airport", "bare land", "beach"}), ("rscovlm", {"Airport", "BareLand", "Beach"})):
        assert got["BareLand", preset] == got["Bare Land", preset]  # the same test images, labels and prompt
        assert {label for _, label in got["BareLand", preset][0]} == labels
    assert got["Bare Land", "rscovlm"][1] == prompts.RSCOVLM_CLS_PROMPT.format(classes="Airport,BareLand,Beach")


# -----------------------------------------------------------------------------
# XLRS-Bench: lmms-eval lmms_eval/tasks/xlrs/mcq_utils.py (prompt, extraction, micro / macro)


def test_xlrs_bench_converter_prompt_and_official_rule(tmp_path):
    image(tmp_path / "img" / "a.png", 16, 16)
    image(tmp_path / "img" / "b.png", 16, 16)
    opts = ["(A) 1", "(B) 2", "(C) 3", "(D) 4"]
    rows = [{"index": 1, "image": ["a.png"], "question": "How many ships?", "multi-choice options": opts,
             "answer": "B", "category": "Counting/Overall counting", "l2-category": "counting"},
            {"index": 2, "image": ["a.png"], "question": "How many cars?", "multi-choice options": opts,
             "answer": "B", "category": "Counting/Overall counting", "l2-category": "counting"},
            {"index": 3, "image": ["a.png", "b.png"], "question": "Which land uses?", "multi-choice options": opts,
             "answer": "AC", "category": "Land use classification/Overall Land use classification", "l2-category": "lu"},
            {"index": 4, "image": ["b.png"], "question": "Colour?", "multi-choice options": opts, "answer": "D",
             "category": "Object properties/Object color", "l2-category": "color"}]
    jsonl(tmp_path / "xlrs.jsonl", rows)
    run("xlrs-bench", "--json", tmp_path / "xlrs.jsonl", "--images", tmp_path / "img", "--out", tmp_path / "o")
    recs = read(tmp_path / "o" / "xlrs_bench.jsonl")
    assert recs[0]["messages"][0]["content"] == (
        "<image>How many ships?The choices are listed below:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n\nSelect the best answer for "
        "the multiple-choice question based on the image. Only respond with the letter corresponding to the correct "
        "answer (A, B, C, D).\nThe answer is:")
    assert recs[2]["messages"][0]["content"].startswith("<image><image>Which land uses?")
    assert recs[2]["messages"][0]["content"].endswith("with multiple choices separated by spaces.The answer(s) is(are):")
    # extraction: prefix removed; every a-e letter when no "(X)" ("B. The bridge" -> B, E, D); no capital: nothing
    assert [eval_vqa.xlrs_letters(t) for t in ("The answer is B", "B. The bridge", "(A) and (C)", "d", "A B")] == [
        "B", "BDE", "AC", "", "AB"]
    preds = {"xlrs_1": "The answer is B", "xlrs_2": "B. The bridge", "xlrs_3": "(A) and (C)", "xlrs_4": "d"}
    m = vqa_scores(tmp_path, recs, preds)
    o = m["xlrs_bench"]["xlrs_bench"]["official"]
    # micro 2/4; subtasks: overall counting 1/2, overall land use 1, object colour 0; macro over all 13 subtasks
    assert o["micro"] == 1 / 2 and o["macro"] == pytest.approx(1.5 / 13)
    assert m["xlrs_bench"]["xlrs_bench"]["subtasks_present"] == 3
    assert m["headline"] == {"xlrs_bench/xlrs_bench: micro (official)": 1 / 2}
    table = [(r["metric"], r["headline"]) for r in eval_suite.table_rows({"name": "x", "split": "test"}, "eval_vqa", m)]
    assert table == [("xlrs_bench/xlrs_bench: micro (official)", True), ("xlrs_bench/xlrs_bench: macro (official)", False)]
    jsonl(tmp_path / "bad.jsonl", [{**rows[0], "answer": "maybe"}])
    with pytest.raises(UserError, match=r"bad\.jsonl:1: answer 'maybe' is not option letters A-E"):
        run("xlrs-bench", "--json", tmp_path / "bad.jsonl", "--images", tmp_path / "img", "--out", tmp_path / "o2")


# -----------------------------------------------------------------------------
# FAIR1M: the submission (one XML per image) and a local score of a split


FAIR1M_GT = ("<annotation><objects>"
             "<object><possibleresult><name>Small Car</name></possibleresult><points><point>10,10</point>"
             "<point>30,10</point><point>30,20</point><point>10,20</point><point>10,10</point></points></object>"
             "<object><possibleresult><name>Bus</name></possibleresult><points><point>50,50</point><point>90,50</point>"
             "<point>90,70</point><point>50,70</point><point>50,50</point></points></object>"
             "</objects></annotation>")


def test_fair1m_submission_round_trip_and_local_score(tmp_path):
    gt_dir = tmp_path / "labelXml"
    gt_dir.mkdir()
    (gt_dir / "0.xml").write_text(FAIR1M_GT)
    classes = boxes.FAIR1M_CLASSES
    dets = {"image": np.array([0, 0]), "label": np.array([classes.index("small-car"), classes.index("bus")]),
            "score": np.array([1.0, 1.0]), "poly": np.array([sq(10, 10, 30, 20), sq(0, 80, 20, 95)], float)}
    paths = det_files.write_fair1m(tmp_path / "sub", classes, ["0"], dets, zip_path=tmp_path / "sub.zip")
    text = paths[0].read_text()
    assert "<filename>0.tif</filename>" in text and "<name>Small Car</name>" in text and "<name>Bus</name>" in text
    assert text.count("<point>") == 10 and "<point>10.000000,10.000000</point>" in text  # 5 points, closing repeated
    assert zipfile.ZipFile(tmp_path / "sub.zip").namelist() == ["0.xml"]
    back = det_files.read_fair1m_submission(tmp_path / "sub", classes, {"0": 0})
    assert back["label"].tolist() == dets["label"].tolist() and back["poly"].tolist() == dets["poly"].tolist()
    gt, names = det_files.gt_from_labels(gt_dir, classes)
    res = eval_det.score_det(gt, back, classes)
    # small car: one GT, one TP -> AP 1; bus: one GT, one FP -> AP 0; DOTA rule: mean over all 37 classes
    assert res["AP"]["small-car"] == pytest.approx(1.0) and res["AP"]["bus"] == 0.0
    assert res["mAP_gt_classes"] == pytest.approx(0.5) and res["mAP"] == pytest.approx(1 / 37)
    m = eval_det.main(["--dota-task1", str(tmp_path / "sub"), "--gt", str(gt_dir), "--classes", "fair1m"])
    assert m["mAP"] == pytest.approx(1 / 37)


def test_fair1m_merged_predictions_write_the_submission(tmp_path):
    recs = [{"id": "0__256__0___0", "task": "det", "dataset": "fair1m", "images": [], "messages": [],
             "meta": {"width": 256, "height": 256, "classes": boxes.FAIR1M_CLASSES, "source": "0", "offset": [0, 0],
                      "objects": [{"poly": sq(10, 10, 30, 20), "label": "small-car", "difficult": 0}]}}]
    jsonl(tmp_path / "recs.jsonl", recs)
    jsonl(tmp_path / "preds.jsonl", [{"id": "0__256__0___0", "text": "10,10,30,10,30,20,10,20 small car"}])
    (tmp_path / "labelXml").mkdir()
    (tmp_path / "labelXml" / "0.xml").write_text(FAIR1M_GT)
    m = eval_det.main(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(tmp_path / "recs.jsonl"), "--coords",
                       "abs", "--merge", "--gt", str(tmp_path / "labelXml"), "--out", str(tmp_path / "e")])
    merged = m["det"]["fair1m"]["merged"]
    assert zipfile.ZipFile(merged["fair1m_zip"]).namelist() == ["0.xml"]
    assert merged["AP"]["small-car"] == pytest.approx(1.0) and merged["AP"]["bus"] == 0.0  # the bus was not detected


# -----------------------------------------------------------------------------
# DOTA v1.5 / v2.0 class lists (boxes.DOTA_CLASSES): data_prep.py dota --version, eval_det.py --classes


def test_dota_v2_class_list_reaches_the_converter_and_the_scorer(tmp_path):
    image(tmp_path / "DOTA" / "images" / "P1.png", 64, 64)
    (tmp_path / "DOTA" / "labelTxt").mkdir()
    (tmp_path / "DOTA" / "labelTxt" / "P1.txt").write_text("10 10 30 10 30 30 10 30 helipad 0\n"
                                                           "40 40 60 40 60 60 40 60 container-crane 0\n")
    with pytest.raises(UserError, match=r"unknown class 'helipad'"):
        data_prep.main(["dota", "--root", str(tmp_path / "DOTA"), "--split", "val", "--patch", "64", "--gap", "0",
                        "--out", str(tmp_path / "o1"), "--workers", "1"])
    data_prep.main(["dota", "--root", str(tmp_path / "DOTA"), "--split", "val", "--version", "2.0", "--patch", "64", "--gap", "0",
                    "--out", str(tmp_path / "o2"), "--workers", "1"])
    (rec,) = read(next((tmp_path / "o2").glob("*.jsonl")))
    assert rec["meta"]["classes"] == boxes.DOTA_CLASSES["2.0"] and len(boxes.DOTA_CLASSES["2.0"]) == 18
    assert [o["label"] for o in rec["meta"]["objects"]] == ["helipad", "container-crane"]
    assert det_files.read_class_list("dota1.5")[-1] == "container-crane" and len(det_files.read_class_list("dota1.5")) == 16


def test_xlrs_bench_parquet_release_with_embedded_images(tmp_path):
    """The Hugging Face release: parquet rows whose "image" holds {"bytes", "path"} (read with pyarrow)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 10)).save(buf, format="PNG")
    rows = [{"index": 7, "image": [{"bytes": buf.getvalue(), "path": "x.png"}], "question": "Q?",
             "multi-choice options": ["(A) a", "(B) b"], "answer": "A", "category": "Counting/Overall counting",
             "l2-category": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-0.parquet")
    run("xlrs-bench", "--json", tmp_path / "train-0.parquet", "--out", tmp_path / "o")
    (r,) = read(tmp_path / "o" / "xlrs_bench.jsonl")
    assert r["images"] == ["images/xlrs/7_0.png"] and (tmp_path / "o" / "images" / "xlrs" / "7_0.png").is_file()
