"""The benchmarks RSCoVLM reports on (bench_prep.py refgeo / vrsbench / geochat / vhm) and their metrics: each
converter on small samples written to the published formats, one-line errors for a wrong folder or a bad line,
and each metric against hand-computed values (eval_det.py GIoU greedy matching and grouped Acc@0.5,
eval_vqa.py VHM measures and the contain headline)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bench_prep
import eval_det
import eval_vqa
import model
import prompts
from common import UserError


REPO = Path(__file__).resolve().parents[1]


def run(*argv):
    return bench_prep.main([str(a) for a in argv] + ["--workers", "1"])


def image(path, w, h):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def sq(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def det_scores(tmp_path, recs, preds):
    """eval_det's --preds path (coordinates as written: original pixels) on these records and answers."""
    jsonl(tmp_path / "recs.jsonl", recs)
    jsonl(tmp_path / "preds.jsonl", [{"id": k, "text": v} for k, v in preds.items()])
    return eval_det.main(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(tmp_path / "recs.jsonl"),
                          "--coords", "abs"])


def vqa_scores(tmp_path, recs, preds):
    jsonl(tmp_path / "vrecs.jsonl", recs)
    jsonl(tmp_path / "vpreds.jsonl", [{"id": k, "text": v} for k, v in preds.items()])
    return eval_vqa.main(["--preds", str(tmp_path / "vpreds.jsonl"), "--data", str(tmp_path / "vrecs.jsonl"),
                          "--no-meteor"])


# -----------------------------------------------------------------------------
# refGeo: metainfo/{set}.jsonl + images/{folder}/ (RSCoVLM's rscovlm/eval/data/geoground.py layout)


def _refgeo(tmp_path):
    root = tmp_path / "refGeo"
    image(root / "images" / "dior_rsvg" / "00001.jpg", 64, 48)
    image(root / "images" / "avvg" / "a7.png", 32, 32)
    jsonl(root / "metainfo" / "dior_rsvg_test.jsonl", [
        {"image_id": "00001.jpg", "question": "dam on the left", "bbox": [5, 5, 50, 40], "image_width": 64,
         "image_height": 48, "poly": [[5, 5], [5, 40], [50, 40], [50, 5]]},  # counter-clockwise, as refGeo writes
        {"image_id": "00001.jpg", "question": "white vehicle", "bbox": [30, 10, 40, 20], "image_width": 64,
         "image_height": 48, "poly": [[30, 10], [30, 20], [40, 20], [40, 10]]}])
    jsonl(root / "metainfo" / "avvg_test.jsonl", [{"image_id": "a7.png", "question": "the red roof", "bbox": [1, 2, 9, 12]}])
    return root


def test_refgeo_lines_become_ground_records_per_set(tmp_path):
    root = _refgeo(tmp_path)
    run("refgeo", "--root", root, "--out", tmp_path / "o")
    dior = read(tmp_path / "o" / "refgeo_dior_rsvg_test.jsonl")
    (avvg,) = read(tmp_path / "o" / "refgeo_avvg_test.jsonl")
    assert [r["id"] for r in dior] == ["dior_rsvg_test_0", "dior_rsvg_test_1"]
    r = dior[0]
    assert r["task"] == "ground" and r["dataset"] == "refgeo_dior_rsvg_test" and r["images"][0].endswith("00001.jpg")
    assert r["meta"]["objects"][0]["poly"] == sq(5, 5, 50, 40) and r["meta"]["box_format"] == "hbox"
    assert r["messages"][0]["content"] == prompts.ground_prompt("dam on the left", "hbox")
    assert r["messages"][-1]["content"] == "5,5,50,40"
    assert avvg["meta"]["objects"][0]["poly"] == sq(1, 2, 9, 12) and avvg["meta"]["width"] == 32
    # --box-format poly takes the line's polygon (its vertices as given; scoring uses the shape)
    run("refgeo", "--root", root, "--sets", "dior_rsvg_test", "--box-format", "poly", "--out", tmp_path / "p")
    (p0, _) = read(tmp_path / "p" / "refgeo_dior_rsvg_test.jsonl")
    assert p0["meta"]["objects"][0]["poly"] == [5, 5, 5, 40, 50, 40, 50, 5] and p0["meta"]["box_format"] == "poly"
    assert p0["messages"][0]["content"] == prompts.ground_prompt("dam on the left", "poly")


def test_refgeo_wrong_folder_and_bad_lines_are_one_line_errors(tmp_path):
    root = _refgeo(tmp_path)
    with pytest.raises(UserError, match=r"has no metainfo/ folder .*; did you mean .*refGeo\?"):
        run("refgeo", "--root", tmp_path, "--out", tmp_path / "o")
    with pytest.raises(UserError, match=r"no .*metainfo/rsvg_test\.jsonl \(sets there: avvg_test, dior_rsvg_test\)"):
        run("refgeo", "--root", root, "--sets", "rsvg_test", "--out", tmp_path / "o")
    lines = (root / "metainfo" / "dior_rsvg_test.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["bbox"] = [30, 10, 40]
    (root / "metainfo" / "dior_rsvg_test.jsonl").write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match=r"dior_rsvg_test\.jsonl:2: bbox must be 4 numbers, got \[30, 10, 40\]"):
        run("refgeo", "--root", root, "--out", tmp_path / "o")
    s = run("refgeo", "--root", root, "--out", tmp_path / "o", "--skip-bad")
    assert s["counts"]["skipped"] == 1 and s["counts"]["records refgeo_dior_rsvg_test"] == 1
    jsonl(root / "metainfo" / "avvg_test.jsonl", [{"image_id": "a7.png", "question": "roof", "bbox": [1, 2, 9, 12],
                                                   "image_width": 64, "image_height": 64}])
    with pytest.raises(UserError, match=r"avvg_test\.jsonl:1: line says 64x64 but .*a7\.png is 32x32"):
        run("refgeo", "--root", root, "--sets", "avvg_test", "--out", tmp_path / "o2")


# -----------------------------------------------------------------------------
# VRSBench: VRSBench_EVAL_{Cap,vqa,referring}.json (lx709/VRSBench prepare_eval_all.ipynb)


def _vrsbench(tmp_path):
    image(tmp_path / "Images_val" / "00001_0000.png", 100, 50)
    image(tmp_path / "Images_val" / "00002_0000.png", 100, 50)
    cap = [{"image_id": f"0000{i}_0000.png", "ground_truth": text, "question": "Describe the image in detail",
            "dataset": "RSBench", "question_id": i, "type": "caption"}
           for i, text in ((1, "A harbor with two white ships."), (2, "A large airport with three planes."))]
    vqa = [{"image_id": "00001_0000.png", "question": "What color is the ship?", "ground_truth": "white",
            "dataset": "RSBench", "question_id": 0, "type": "object color"},
           {"image_id": "00002_0000.png", "question": "Is there a plane?", "ground_truth": "yes",
            "dataset": "RSBench", "question_id": 1, "type": "object existence"}]
    ref = [{"image_id": "00001_0000.png", "question": "The white ship at the top left.", "ground_truth": "{<10><20><50><60>}",
            "dataset": "RSBench", "question_id": 0, "type": "ref", "unique": True,
            "obj_corner": [0.1, 0.2, 0.5, 0.2, 0.5, 0.6, 0.1, 0.6], "obj_cls": "ship", "obj_ids": [0], "size_group": "small"},
           {"image_id": "00001_0000.png", "question": "The ship on the right.", "ground_truth": "{<60><20><90><80>}",
            "dataset": "RSBench", "question_id": 1, "type": "ref", "unique": False,
            "obj_corner": [0.6, 0.2, 0.9, 0.2, 0.9, 0.8, 0.6, 0.8], "obj_cls": "ship", "obj_ids": [0], "size_group": "large"},
           {"image_id": "00002_0000.png", "question": "The plane.", "ground_truth": "{<20><40><60><80>}",
            "dataset": "RSBench", "question_id": 2, "type": "ref", "unique": True, "obj_cls": "airplane",
            "obj_ids": [0], "size_group": "small"}]  # no obj_corner: the 0..100 string
    files = {}
    for name, rows in (("VRSBench_EVAL_Cap.json", cap), ("VRSBench_EVAL_vqa.json", vqa),
                       ("VRSBench_EVAL_referring.json", ref)):
        files[name] = tmp_path / name
        files[name].write_text(json.dumps(rows, indent=4))
    return files


def test_vrsbench_files_and_their_scores(tmp_path):
    files = _vrsbench(tmp_path)
    run("vrsbench", "--json", *files.values(), "--images", tmp_path / "Images_val", "--out", tmp_path / "o")
    cap, vqa, ref = (read(tmp_path / "o" / f"vrsbench_{k}.jsonl") for k in ("caption", "vqa", "referring"))
    assert [r["meta"]["references"] for r in cap] == [["A harbor with two white ships."],
                                                       ["A large airport with three planes."]]
    assert cap[0]["messages"][0]["content"] == prompts.vqa_prompt("Describe the image in detail", suffix=False)
    assert [(r["meta"]["answer"], r["meta"]["type"], r["meta"]["headline_rule"]) for r in vqa] == [
        ("white", "object color", "contain"), ("yes", "object existence", "contain")]
    assert vqa[0]["messages"][0]["content"] == prompts.vqa_prompt("What color is the ship?")
    # boxes in pixels of the 100x50 image: obj_corner (normalised) when given, else the 0..100 string
    assert [r["meta"]["objects"][0]["poly"] for r in ref] == [sq(10, 10, 50, 30), sq(60, 10, 90, 40), sq(20, 20, 60, 40)]
    assert [r["meta"]["groups"] for r in ref] == [{"unique": "unique", "size": "small"},
                                                 {"unique": "non-unique", "size": "large"}, {"unique": "unique", "size": "small"}]
    assert ref[0]["messages"][0]["content"] == prompts.ground_prompt("The white ship at the top left.", "hbox")
    # referring: Acc@0.5 on the first box, overall and per group; 1 hit, 1 IoU 0.25, 1 without prediction
    m = det_scores(tmp_path, ref, {"vrsbench_referring_0": "10,10,50,30", "vrsbench_referring_1": "60,10,90,20"})
    g = m["ground"]["vrsbench_referring"]
    assert g["Acc@0.5"] == pytest.approx(1 / 3) and m["headline"]["ground/vrsbench_referring: Acc@0.5"] == pytest.approx(1 / 3)
    assert g["groups"]["unique"] == {"non-unique": {"rate": 0.0, "n": 1}, "unique": {"rate": 0.5, "n": 2}}
    assert g["groups"]["size"] == {"large": {"rate": 0.0, "n": 1}, "small": {"rate": 0.5, "n": 2}}
    # VQA: the headline is RSCoVLM's contain rule (a fraction), not the exact-match OA
    v = vqa_scores(tmp_path, vqa + cap, {"vrsbench_vqa_0": "The ship is white.", "vrsbench_vqa_1": "no",
                                        "vrsbench_caption_1": "A harbor with two white ships.",
                                        "vrsbench_caption_2": "An airport."})
    assert v["headline"]["vqa/vrsbench_vqa: OA (contain)"] == 1 / 2 and "vqa/vrsbench_vqa: OA" not in v["headline"]
    assert v["vqa"]["vrsbench_vqa"]["exact"]["OA"] == 0.0
    assert v["headline"]["caption/vrsbench_caption: CIDEr-D"] == v["caption"]["vrsbench_caption"]["CIDEr-D"] > 0


def test_vrsbench_bad_entry_and_wrong_images_folder(tmp_path):
    files = _vrsbench(tmp_path)
    with pytest.raises(UserError, match=r"none of the 2 images .* under --images .*; did you mean .*Images_val\?"):
        run("vrsbench", "--json", files["VRSBench_EVAL_vqa.json"], "--images", tmp_path, "--out", tmp_path / "o")
    rows = json.loads(files["VRSBench_EVAL_referring.json"].read_text())
    del rows[2]["ground_truth"]
    files["VRSBench_EVAL_referring.json"].write_text(json.dumps(rows))
    with pytest.raises(UserError, match=r"VRSBench_EVAL_referring\.json entry 2: not a VRSBench entry"):
        run("vrsbench", "--json", files["VRSBench_EVAL_referring.json"], "--images", tmp_path / "Images_val",
            "--out", tmp_path / "o")


# -----------------------------------------------------------------------------
# GeoChat-Bench (MBZUAI/GeoChat-Bench: aid.jsonl, UCmerced.jsonl, lrben.jsonl, hrben.jsonl,
# region_captioning.jsonl, referring.jsonl)


def test_geochat_scene_classification_fixes_aid_labels_and_extensions(tmp_path):
    image(tmp_path / "AID" / "mediumresidential_1.jpg", 40, 40)  # AID ships .jpg; aid.jsonl says .png
    image(tmp_path / "AID" / "airport_3.jpg", 40, 40)
    text = ("Classify the image from the following classes. Classes: Airport, BareLand, MediumResidential\n"
            "Answer in one word or a short phrase.")
    aid = jsonl(tmp_path / "GeoChat-Bench" / "aid.jsonl", [
        {"question_id": "MediumResidential/mediumresidential_1", "image": "mediumresidential_1.png", "text": text,
         "ground_truth": "MediumResidentialgt"},
        {"question_id": "Airport/airport_3", "image": "airport_3.png", "text": text, "ground_truth": "Airportgt"}])
    run("geochat", "--json", aid, "--images", tmp_path / "AID", "--out", tmp_path / "o")
    recs = read(tmp_path / "o" / "geochat_aid.jsonl")
    assert [(r["meta"]["label"], r["images"][0].endswith(".jpg")) for r in recs] == [("medium residential", True),
                                                                                      ("airport", True)]
    assert recs[0]["meta"]["classes"] == ["airport", "bare land", "medium residential"]
    assert recs[0]["messages"][0]["content"] == prompts.cls_prompt(["airport", "bare land", "medium residential"])
    m = vqa_scores(tmp_path, recs, {recs[0]["id"]: "Medium residential area.", recs[1]["id"]: "bare land"})
    assert m["cls"]["geochat_aid"]["exact"] == 0.0
    assert m["headline"] == {"cls/geochat_aid: accuracy (contain)": 1 / 2}
    jsonl(aid, [{"question_id": "x", "image": "airport_3.png", "text": text, "ground_truth": "Forestgt"}])
    with pytest.raises(UserError, match=r"aid\.jsonl:1: ground_truth 'Forestgt' is not one of the classes"):
        run("geochat", "--json", aid, "--images", tmp_path / "AID", "--out", tmp_path / "o2")


def test_geochat_lrben_needs_the_rsvqa_answers(tmp_path):
    image(tmp_path / "Images_LR" / "0.tif", 32, 32)
    lrben = jsonl(tmp_path / "lrben.jsonl", [
        {"question_id": 10, "image": "0.tif", "category": "presence",
         "text": "Is there a road?\nAnswer the question using a single word or phrase."},
        {"question_id": 11, "image": "0.tif", "category": "rural_urban", "text": "Is it a rural or an urban area?"}])
    answers = tmp_path / "LR_split_test_answers.json"
    answers.write_text(json.dumps({"answers": [{"id": 10, "question_id": 10, "answer": "yes", "active": True},
                                               {"id": 11, "question_id": 11, "answer": "rural", "active": True}]}))
    with pytest.raises(UserError, match=r"lrben/hrben: give --answers"):
        run("geochat", "--json", lrben, "--images", tmp_path / "Images_LR", "--out", tmp_path / "o")
    run("geochat", "--json", lrben, "--images", tmp_path / "Images_LR", "--answers", answers, "--out", tmp_path / "o")
    recs = read(tmp_path / "o" / "geochat_lrben.jsonl")
    assert [(r["meta"]["answer"], r["meta"]["type"]) for r in recs] == [("yes", "presence"), ("rural", "rural_urban")]
    assert recs[0]["messages"][0]["content"] == prompts.vqa_prompt("Is there a road?")  # GeoChat's suffix
    m = vqa_scores(tmp_path, recs, {recs[0]["id"]: "Yes, there is.", recs[1]["id"]: "urban"})
    assert m["headline"] == {"vqa/geochat_lrben: OA (contain)": 1 / 2}


def _geochat_referring(tmp_path):
    image(tmp_path / "GeoChat_Instruct" / "P0002_0.png", 100, 100)
    return jsonl(tmp_path / "referring.jsonl", [
        {"question_id": 0, "image_id": "P0002_0", "question": "two planes on the left", "type": "ref",
         "dataset": "SOTA", "obj_ids": [1, 2], "size_group": "small",
         "ground_truth": [[[10, 10], [30, 10], [30, 30], [10, 30]], [[10, 50], [30, 50], [30, 70], [10, 70]]]},
        {"question_id": 1, "image_id": "P0002_0", "question": "the large ship", "type": "ref", "dataset": "SOTA",
         "obj_ids": [7], "size_group": "large", "ground_truth": [[[50, 20], [90, 20], [90, 80], [50, 80]]]},
        {"question_id": 2, "image_id": "P0002_0", "question": "the tank", "type": "grounding", "dataset": "SOTA",
         "obj_ids": [9], "size_group": "small", "ground_truth": [[40, 40, 50, 40, 50, 50, 40, 50]]}])


def test_geochat_referring_records_and_precision(tmp_path):
    ref = _geochat_referring(tmp_path)
    run("geochat", "--json", ref, "--images", tmp_path / "GeoChat_Instruct", "--out", tmp_path / "o")
    recs = read(tmp_path / "o" / "geochat_referring.jsonl")
    assert [len(r["meta"]["objects"]) for r in recs] == [2, 1, 1]
    assert recs[0]["meta"]["objects"][1]["poly"] == sq(10, 50, 30, 70) and recs[0]["meta"]["box_format"] == "poly"
    assert [r["meta"]["groups"] for r in recs] == [{"size": "small", "type": "ref", "count": "multiple"},
                                                  {"size": "large", "type": "ref", "count": "single"},
                                                  {"size": "small", "type": "grounding", "count": "single"}]
    assert recs[0]["messages"][0]["content"] == prompts.ground_prompt("two planes on the left", "poly")
    # both planes found, in the other order -> correct; the ship found plus an extra box -> wrong (F1 < 1);
    # the tank without any box -> wrong
    m = det_scores(tmp_path, recs, {
        recs[0]["id"]: "10,50,30,50,30,70,10,70\n10,10,30,10,30,30,10,30",
        recs[1]["id"]: "50,20,90,20,90,80,50,80\n0,0,5,0,5,5,0,5",
        recs[2]["id"]: "I do not see a tank."})
    ref_res = m["ground"]["geochat_referring"]["referring"]
    assert ref_res["precision"] == pytest.approx(1 / 3) and ref_res["correct"] == 1
    assert ref_res["groups"]["count"] == {"multiple": {"rate": 1.0, "n": 1}, "single": {"rate": 0.0, "n": 2}}
    assert ref_res["groups"]["type"]["grounding"] == {"rate": 0.0, "n": 1}
    assert m["headline"] == {"ground/geochat_referring: precision@GIoU0.5": pytest.approx(1 / 3)}
    rows = [json.loads(line) for line in ref.read_text().splitlines()]
    rows[1]["ground_truth"] = [[[50, 20], [190, 20], [190, 80], [50, 80]]]  # not this 100x100 image's pixels
    jsonl(ref, rows)
    with pytest.raises(UserError, match=r"referring\.jsonl:2: box .* is outside the 100x100 image"):
        run("geochat", "--json", ref, "--images", tmp_path / "GeoChat_Instruct", "--out", tmp_path / "o2")


def test_geochat_region_captioning_keeps_geochat_question(tmp_path):
    image(tmp_path / "GeoChat_Instruct" / "P0003_1.png", 64, 64)
    rc = jsonl(tmp_path / "region_captioning.jsonl", [
        {"question_id": 0, "image_id": "P0003_1", "question": "{<10><20><50><60>|0}", "ground_truth": "a white plane"}])
    run("geochat", "--json", rc, "--images", tmp_path / "GeoChat_Instruct", "--out", tmp_path / "o")
    (r,) = read(tmp_path / "o" / "geochat_region_captioning.jsonl")
    assert r["task"] == "caption" and r["meta"]["references"] == ["a white plane"]
    assert r["messages"][0]["content"] == prompts.vqa_prompt(
        "[identify] What is the object present at {<10><20><50><60>|0}", suffix=False)
    with pytest.raises(UserError, match=r"cannot tell the GeoChat-Bench part .*give --part"):
        run("geochat", "--json", jsonl(tmp_path / "mine.jsonl", []), "--images", tmp_path, "--out", tmp_path / "o")


# -----------------------------------------------------------------------------
# The metrics on hand-computed cases


def test_giou_and_greedy_matching_by_hand():
    assert eval_det.poly_giou(sq(0, 0, 10, 10), sq(0, 0, 10, 10)) == pytest.approx(1.0)
    # disjoint 10x10 squares 10 px apart: IoU 0, union 200, hull 300 -> -100/300
    assert eval_det.poly_giou(sq(0, 0, 10, 10), sq(20, 0, 30, 10)) == pytest.approx(-1 / 3)
    # half of a square: IoU 0.5, the hull is the union -> 0.5 (exactly the threshold, which matches)
    assert eval_det.poly_giou(sq(0, 0, 10, 10), sq(0, 0, 10, 5)) == pytest.approx(0.5)
    # shifted by 5 of 10: IoU 50/150, hull 10x15 = 150 = union -> 1/3
    assert eval_det.poly_giou(sq(0, 0, 10, 10), sq(5, 0, 15, 10)) == pytest.approx(1 / 3)
    # a bow-tie answer is its convex hull (the square)
    assert eval_det.poly_giou([0, 0, 10, 10, 10, 0, 0, 10], sq(0, 0, 10, 10)) == pytest.approx(1.0)
    # greedy differs from the best assignment: box 0 takes target 0 (0.9), box 1 is then left with 0.3 < 0.5;
    # the assignment (0, 1) + (1, 0) would match both
    assert eval_det.greedy_matches([[0.9, 0.6], [0.7, 0.3]]) == [(0, 0)]
    # greedy differs from best-first in answer order: answer order would pair (0, 0) at 0.6 and (1, 1) at 0.55;
    # greedy takes the highest score first, (1, 0) at 0.9, and box 0 is left with 0.1
    assert eval_det.greedy_matches([[0.6, 0.1], [0.9, 0.55]]) == [(1, 0)]
    assert eval_det.greedy_matches([[0.5]]) == [(0, 0)] and eval_det.greedy_matches([[0.49]]) == []
    assert eval_det.greedy_matches([]) == []


def test_referring_precision_by_hand():
    def rec(rid, targets, **groups):
        return {"id": rid, "meta": {"objects": [{"poly": t} for t in targets], "groups": groups}}

    a, b = sq(0, 0, 10, 10), sq(40, 0, 50, 10)
    recs = [rec("all", [a, b], count="multiple"), rec("missing", [a, b], count="multiple"),
            rec("extra", [a], count="single"), rec("loose", [a], count="single"), rec("empty", [a], count="single")]
    answers = {"all": ([{"poly": b}, {"poly": a}], None), "missing": ([{"poly": a}], None),
               "extra": ([{"poly": a}, {"poly": b}], None), "empty": ([], None),
               "loose": ([{"poly": sq(5, 0, 15, 10)}], None)}  # GIoU 1/3 < 0.5
    res = eval_det.score_referring(recs, answers)
    assert (res["correct"], res["n"]) == (1, 5) and res["precision"] == pytest.approx(0.2)
    assert res["groups"]["count"] == {"multiple": {"rate": 0.5, "n": 2}, "single": {"rate": 0.0, "n": 3}}


# -----------------------------------------------------------------------------
# VHM (VHM_eval_dataset/datasets_eval/*.json, as RSCoVLM's rscovlm/eval/data/vhm_bench.py reads it)


def _vhm(tmp_path, parts):
    base = tmp_path / "VHM_eval_dataset" / "datasets_eval"
    for part, qa in parts.items():
        folder = bench_prep.VHM_FILES[part][:-len(".json")]
        rows = []
        for k, (q, a) in enumerate(qa):
            image(base / folder / f"{k}.png", 16, 16)
            rows.append({"id": k, "image": f"{k}.png", "image_path": folder,
                         "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        (base / bench_prep.VHM_FILES[part]).write_text(json.dumps(rows))
    return tmp_path / "VHM_eval_dataset"


def test_vhm_parts_and_their_measures(tmp_path):
    root = _vhm(tmp_path, {
        "counting": [("How many planes are there?", 4), ("How many ships?", 10), ("How many tanks?", 0),
                     ("How many cars?", 5)],
        "imgtype": [("What is the image type? A. SAR B. optical C. infrared", "B"), ("Image type? ...", "B")],
        "presence": [("Is there a plane?", "yes"), ("Is there a vehicle?", "no"), ("Is there a ship?", "yes")],
        "color": [("What color is the roof?", "white, red"), ("What color is the car?", "blue")]})
    run("vhm", "--root", root, "--parts", "counting,imgtype,presence,color", "--out", tmp_path / "o")
    counting = read(tmp_path / "o" / "vhm_counting.jsonl")
    assert [r["meta"]["answer"] for r in counting] == ["4", "10", "0", "5"]
    assert counting[0]["messages"][0]["content"] == prompts.vqa_prompt("How many planes are there?", suffix=False)
    recs = [r for p in ("counting", "imgtype", "presence", "color") for r in read(tmp_path / "o" / f"vhm_{p}.jsonl")]
    preds = {"vhm_counting_0": "There are 6 planes.", "vhm_counting_1": "ten", "vhm_counting_2": "2",
             "vhm_counting_3": "many",
             "vhm_imgtype_0": "Answer: B", "vhm_imgtype_1": "(C) infrared",
             "vhm_presence_0": "Yes, there is.", "vhm_presence_1": "There is snow in the north, no vehicles.",
             "vhm_presence_2": "yes and no",
             "vhm_color_0": "It is white.", "vhm_color_1": "Blue"}
    m = vqa_scores(tmp_path, recs, preds)
    c = m["vhm"]["vhm_counting"]
    # |6-4| + |10-10| + |2-0| over 3 numeric answers; MAPE over GT != 0: (2/4 + 0) / 2; "many" has no number
    assert c["MAE"] == pytest.approx(4 / 3) and c["MAPE"] == pytest.approx(1 / 4)
    assert (c["numeric"], c["pred_not_numeric"], c["gt_zero"]) == (3, 1, 1)
    # both VHM scripts take the first capital A-E: "Answer: B" reads A, "(C) infrared" C (tests/test_bench_rules.py)
    assert m["vhm"]["vhm_imgtype"]["rscovlm"] == m["vhm"]["vhm_imgtype"]["official"] == 0.0
    assert m["vhm"]["vhm_presence"]["rscovlm"] == pytest.approx(2 / 3)  # "yes and no" is neither
    assert m["vhm"]["vhm_color"]["rscovlm"] == m["vhm"]["vhm_color"]["official"] == pytest.approx(3 / 4)  # (1/2 + 1) / 2
    h = m["headline"]
    assert h["vqa/vhm_counting: MAE"] == pytest.approx(4 / 3) and h["vqa/vhm_counting: MAPE"] == pytest.approx(1 / 4)
    assert h["vqa/vhm_imgtype: accuracy (rscovlm)"] == 0.0 and not any(k.endswith(": OA") for k in h)
    assert eval_vqa.vhm_count("twenty-one cars") == 21 and eval_vqa.vhm_count("seven") == 7
    assert eval_vqa.vhm_count("none") is None
    with pytest.raises(UserError, match=r"no .*presence_mo_dota\.json .*; did you mean .*VHM_eval_dataset\?"):
        run("vhm", "--root", tmp_path, "--parts", "presence", "--out", tmp_path / "o2")
    with pytest.raises(UserError, match=r"--parts sizes: choose from counting,"):
        run("vhm", "--root", root, "--parts", "sizes", "--out", tmp_path / "o2")


# -----------------------------------------------------------------------------
# --prompts rscovlm reaches the benchmark converters (RSCoVLM's wording as its eval/data/*.py prompts)


def test_rscovlm_preset_applies_to_benchmark_records(tmp_path):
    run("refgeo", "--root", _refgeo(tmp_path), "--sets", "dior_rsvg_test", "--prompts", "rscovlm", "--out", tmp_path / "o")
    r = read(tmp_path / "o" / "refgeo_dior_rsvg_test.jsonl")[0]
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
    assert r["messages"][0]["content"] == prompts.RSCOVLM_SYSTEM["hbox"]  # geoground.py's plain form
    assert r["messages"][1]["content"] == "<image>find the dam on the left" and r["meta"]["answer_style"] == "rscovlm"
    files = _vrsbench(tmp_path)
    run("vrsbench", "--json", *files.values(), "--images", tmp_path / "Images_val", "--prompts", "rscovlm",
        "--out", tmp_path / "v")
    ref = read(tmp_path / "v" / "vrsbench_referring.jsonl")
    # RSCoVLM's VRSBench wording, no system turn (eval/data/vrsbench.py:57-63); "The " and "." dropped
    assert [m["role"] for m in ref[0]["messages"]] == ["user", "assistant"]
    assert ref[0]["messages"][0]["content"] == ("<image>find the white ship at the top left, delivering coordinates in "
                                                "plain text format 'x1,y1,x2,y2 object'")
    assert read(tmp_path / "v" / "vrsbench_caption.jsonl")[0]["messages"][0]["content"] == "<image>Describe the image in detail"
    # scored the same way: one of three boxes right
    m = det_scores(tmp_path, ref, {"vrsbench_referring_0": "10,10,50,30 white ship at the top left\n"})
    assert m["ground"]["vrsbench_referring"]["Acc@0.5"] == pytest.approx(1 / 3)


# -----------------------------------------------------------------------------
# The CLI: one line, exit code 2, nothing written


def test_cli_missing_file_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RSCOVLM_DEBUG", None)
    p = subprocess.run([sys.executable, "bench_prep.py", "vrsbench", "--json", str(tmp_path / "VRSBench_EVAL_vqa.json"),
                        "--images", str(tmp_path), "--out", str(tmp_path / "o")], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert p.stderr.startswith("error: --json ") and "VRSBench_EVAL_vqa.json: no such file" in p.stderr
    assert not (tmp_path / "o").exists()
