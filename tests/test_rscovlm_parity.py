"""--prompts rscovlm / rscovlm-json against RSCoVLM's own arithmetic (issue 21): the zoom-in call, the rotated box
(OpenCV's float32 minAreaRect, re-derived in boxes.py), the JSON answer form, and the prompts RSCoVLM's evaluation
writes for VRSBench, GeoChat-Bench and VHM.

Expected values are computed by hand from VisionXLab/RSCoVLM's code (file:line cited at each), or, for rotated
boxes, recorded from opencv-python-headless 4.10.0.84 (cv2.minAreaRect of the integer corners, then RSCoVLM's
swap / wrap / int() of dense_det_dataset.py:216-232), never with the code under test."""
import hashlib
import json
import random
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

import bench_prep
import boxes
import model
import prompts
from common import read_records


def qwen25(max_pixels=1280 * 28 * 28):
    """What model.coord_kwargs reads of a Qwen2.5-VL processor (no tokenizer needed for coordinates)."""
    return SimpleNamespace(family="qwen2.5", patch_size=14, merge_size=2, min_pixels=3136, max_pixels=max_pixels)


# -----------------------------------------------------------------------------
# Zoom-in call: RSCoVLM truncates (rscovlm/training/data/visual_cot_dataset.py:73-76, 85)


def zoom_record(bbox, style):
    meta = {"answer": "red", "zoom": {"bbox": bbox}, **({"answer_style": style} if style else {})}
    msgs = [{"role": "system", "content": prompts.ZOOM_SYSTEM},
            {"role": "user", "content": "<image>What colour is the car?" + prompts.ZOOM_ASK},
            {"role": "assistant", "content": "call"}, {"role": "user", "content": "<image>" + prompts.ZOOM_REPLY},
            {"role": "assistant", "content": "red"}]
    return {"id": "z", "task": "vqa", "images": ["a.png", "a.png"], "messages": msgs, "meta": meta}


def call_box(text):
    return json.loads(re.search(r"\{.*\}", text, re.S).group(0))["arguments"]["bbox"]


def test_zoom_call_truncates_under_rscovlm_and_rounds_by_default():
    """1200x900 at max_pixels 1280*28*28 -> 1148x840 (smart_resize: beta = sqrt(1080000/1003520); 900/beta/28 =
    30.98 -> 30*28; 1200/beta/28 = 41.3 -> 41*28). RSCoVLM: int(107*1148/1200) = int(102.36) = 102,
    int(211*840/900) = int(196.93) = 196, int(523*1148/1200) = int(500.32) = 500, int(607*840/900) = int(566.53) = 566.
    Rounded half up: 102, 197, 500, 567."""
    proc = qwen25()
    assert model.coord_kwargs(proc, 1200, 900)["resized_hw"] == (840, 1148)
    box = [107, 211, 523, 607]
    assert model.zoom_box_to_model(box, 1200, 900, proc, "rscovlm") == [102, 196, 500, 566]
    assert model.zoom_box_to_model(box, 1200, 900, proc) == [102, 197, 500, 567]
    for style, want in (("rscovlm", [102, 196, 500, 566]), ("rscovlm-json", [102, 196, 500, 566]), (None, [102, 197, 500, 567])):
        msgs = model.target_messages(zoom_record(box, style), proc, images_hw=[(900, 1200), (396, 416)])
        assert call_box(msgs[2]["content"]) == want
    # Qwen3-VL (no RSCoVLM code): the same rule in 0..1000: int(107000/1200) = 89, int(211000/900) = 234, ...
    q3 = SimpleNamespace(family="qwen3")
    assert model.zoom_box_to_model(box, 1200, 900, q3, "rscovlm") == [89, 234, 435, 674]


def test_zoom_crop_of_a_float_box_is_pils_rounding_under_rscovlm():
    """RSCoVLM crops with PIL.Image.crop(crop_hbox[0]) (visual_cot_dataset.py:69), which rounds each value with
    Python's round (107.5 -> 108, 211.5 -> 212: to even); the call: int(107.5*1148/1200) = int(102.84) = 102,
    int(211.5*840/900) = int(197.4) = 197, int(523.4*1148/1200) = int(500.72) = 500, int(607.6*840/900) = 567."""
    box = [107.5, 211.5, 523.4, 607.6]
    assert model.zoom_crops(zoom_record(box, "rscovlm"), sizes=[(900, 1200)]) == {1: [108, 212, 523, 608]}
    assert model.zoom_crops(zoom_record(box, None), sizes=[(900, 1200)]) == {1: [107, 211, 524, 608]}  # floor / ceil
    assert model.zoom_box_to_model(box, 1200, 900, qwen25(), "rscovlm") == [102, 197, 500, 567]


def test_lrs_vqa_rscovlm_training_chain_keeps_the_box_as_given(tmp_path):
    from PIL import Image

    Image.new("RGB", (1200, 900)).save(tmp_path / "img.png")
    entry = {"id": "t1", "image": "img.png", "image_ori_width": 1200, "image_ori_height": 900, "question": "Colour?",
             "answer": "red", "bbox_info": {"crop_hbox": [[107.5, 211.5, 523.4, 607.6]]}}
    (tmp_path / "train.json").write_text(json.dumps([entry]))
    for preset, want in (("rscovlm", [107.5, 211.5, 523.4, 607.6]), ("default", [107, 211, 524, 608])):
        out = tmp_path / preset
        bench_prep.main(["lrs-vqa", "--json", str(tmp_path / "train.json"), "--images", str(tmp_path), "--split",
                         "train", "--prompts", preset, "--out", str(out), "--workers", "1"])
        (rec,) = read_records(out / "lrs_vqa_train.jsonl")
        assert rec["meta"]["zoom"]["bbox"] == want
        assert rec["meta"].get("answer_style") == (None if preset == "default" else "rscovlm")


# -----------------------------------------------------------------------------
# Rotated boxes: OpenCV's float32 minAreaRect


CV2_410 = [  # (corners, RSCoVLM's ints from cv2 4.10) ; float64 geometry gives the value in the comment
    ([(10, 10), (117, 10), (117, 50), (10, 50)], [63, 29, 106, 39, 0]),  # 107 px measures 106.99998: f64 63,30,107,40,0
    ([(0, 0), (4, 0), (4, 4), (0, 4)], [2, 2, 4, 4, -90]),  # cv2 angle 90 -> wrapped
    ([(5, 0), (10, 5), (5, 10), (0, 5)], [5, 5, 7, 7, 45]),
    ([(3, 3), (9, 7), (6, 5), (3, 3)], [6, 5, 7, 0, 33]),  # a segment: cv2 angle -146.31 -> + 180
    ([(7, 7), (7, 7), (7, 7), (7, 7)], [7, 7, 0, 0, 0]),  # a point: f64 gave -90
    ([(10, 10), (20, 10), (20, 10), (10, 18)], [15, 14, 10, 8, 0]),  # a repeated corner
    ([(0, 0), (10, 10), (10, 0), (0, 10)], [5, 5, 10, 10, -90]),  # a bow-tie
    ([(809, 288), (816, 296), (793, 316), (786, 309)], [800, 302, 31, 10, -41]),  # P0706 ship; f64 801,302,31,10,-42
    ([(991, 516), (983, 508), (1003, 489), (1010, 497)], [996, 502, 27, 11, -45]),  # P0706 ship; f64 angle -43
    ([(896, 443), (905, 451), (883, 471), (875, 463)], [890, 457, 29, 12, -43]),  # P0706 ship; f64 w 30
    ([(672, 648), (681, 659), (650, 683), (641, 671)], [661, 665, 39, 15, -36]),  # P0706 ship; f64 660,665,39,14,-37
    ([(248, 666), (248, 687), (191, 685), (192, 669)], [219, 675, 57, 20, 2]),  # P1088 small vehicle; f64 219,676,57,21,0
    ([(504, 216), (494, 217), (490, 176), (498, 174)], [496, 195, 42, 10, 84]),  # P1888 large vehicle; f64 angle 81
    ([(1282, 3434), (1323, 3434), (1323, 3475), (1282, 3475)], [1302, 3454, 40, 40, -90]),  # P1234 tank; f64 41,41
    ([(2035, 58), (2034, 42), (2074, 42), (2076, 58)], [2054, 49, 41, 15, 0]),  # P2598 vehicle; f64 2055,50,42,16,0
    ([(359, 663), (369, 497), (543, 509), (531, 677)], [450, 586, 174, 168, 4]),  # P2805 patch plane; f64 angle 3
]


@pytest.mark.parametrize("corners, want", CV2_410)
def test_rbox_equals_opencv_410(corners, want):
    assert boxes.rscovlm_rbox(corners) == want


def test_raw_min_area_rect_is_opencvs_float32_tuple():
    """cv2.minAreaRect([(809,288),(816,296),(793,316),(786,309)]) in 4.10, bit for bit."""
    assert boxes.cv_min_area_rect([(809, 288), (816, 296), (793, 316), (786, 309)]) == (
        (800.783203125, 302.252197265625), (10.630146026611328, 31.137861251831055), 48.8140754699707)
    # cv2.convexHull(points, clockwise=False, returnPoints=False) of 4.10: the repeated corner appears once, as index 0
    assert boxes.cv_hull([(7, 3), (10, 2), (8, 1), (7, 3)]) == [2, 1, 0]


def shared_corner_sets(root):
    """Every box of ../shared/data (DOTA label files, the patch, DIOR robndbox) at scales 1, 1008/1024, 0.5, 0.9,
    int() after scaling, as RSCoVLM's resize does."""
    polys = []
    for f in sorted(root.glob("dota*/labelTxt/*.txt")):
        polys += [o["poly"] for o in boxes.read_dota_labels(f)]
    keys = ["x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
            "x_left_bottom", "y_left_bottom"]
    for f in sorted(root.glob("dior/Annotations/*.xml")):
        polys += [[float(o.findtext(k)) for k in keys] for o in ET.parse(f).getroot().iter("robndbox")]
    return [[(int(x * s), int(y * s)) for x, y in zip(p[0::2], p[1::2])] for s in (1.0, 1008 / 1024, 0.5, 0.9)
            for p in polys]


def test_every_shared_box_equals_opencv(shared_data):
    """3,956 corner sets (989 boxes x 4 scales); the SHA-256 of their RSCoVLM rboxes one per line, computed with
    cv2 4.10.0, 4.12.0 and 4.13.0 (all three agree here)."""
    sets = shared_corner_sets(shared_data)
    text = "\n".join(",".join(map(str, boxes.rscovlm_rbox(c))) for c in sets)
    assert len(sets) == 3956
    assert hashlib.sha256(text.encode()).hexdigest() == "449e591662c10760721acb681e126f87d9c437fc3e800d072e7ad2ce255fcd60"


def test_live_against_installed_opencv():
    """When OpenCV is installed (it is not a dependency): 2,000 random integer quadrilaterals, the raw tuples."""
    cv2 = pytest.importorskip("cv2")
    np = pytest.importorskip("numpy")
    major, minor = (int(v) for v in cv2.__version__.split(".")[:2])
    if (major, minor) >= (4, 13) or (major, minor) < (4, 5):
        pytest.skip(f"OpenCV {cv2.__version__}: the re-derivation follows 4.5.4-4.12")
    rng = random.Random(0)
    for _ in range(2000):
        c, size = rng.randint(-20, 2000), rng.choice((8, 40, 400))
        pts = [(c + rng.randint(0, size), c + rng.randint(0, size)) for _ in range(4)]
        assert boxes.cv_min_area_rect(pts) == cv2.minAreaRect(np.array(pts, dtype=np.int32)), pts


# -----------------------------------------------------------------------------
# RSCoVLM's JSON form (dense_det_dataset.py:168-189, 250-264, 322-337; refgeo_dataset.py:108-118, 163-166)


def obj(poly, label, **kw):
    return {"poly": poly, "label": label, "difficult": 0, **kw}


def test_json_form_detection_answers_and_prompts():
    """100x80 resized to 50x40: plane [60,7,90,19] -> int(30.0), int(3.5), 45, int(9.5) = 30,3,45,9; small vehicle
    [11,21,41,41] -> 5,10,20,20; sorted by class rank (plane < small vehicle). json.dumps spacing."""
    objs = [obj([11, 21, 41, 21, 41, 41, 11, 41], "small-vehicle"), obj([60, 7, 90, 7, 90, 19, 60, 19], "plane")]
    text = boxes.render_answer(objs, 100, 80, resized_hw=(40, 50), box_format="hbox", style="rscovlm-json")
    assert text == ('```json\n[\n\t{"bbox_2d": [30, 3, 45, 9], "label": "plane"},\n'
                    '\t{"bbox_2d": [5, 10, 20, 20], "label": "small vehicle"}\n]\n```')
    rb = boxes.render_answer([obj([0, 0, 8, 6, 5, 10, -3, 4], "ship")], 20, 20, box_format="rbox", style="rscovlm-json")
    assert rb == '```json\n[\n\t{"oriented bbox": [2, 5, 10, 5, 36], "label": "ship"}\n]\n```'  # minAreaRect (10, 5, 36.87)
    assert boxes.render_answer([], 20, 20, style="rscovlm-json") == "There are none."
    back, _ = boxes.parse_answer(text, 100, 80, resized_hw=(40, 50), classes=["plane", "small-vehicle"])
    assert [o["label"] for o in back] == ["plane", "small-vehicle"] and back[0]["poly"][:2] == [60.0, 6.0]
    hb = prompts.det_prompt(["small-vehicle", "plane"], "hbox", "rscovlm-json")
    assert hb == [{"role": "user", "content": "<image>Locate every item from the category list in the image and output "
                   "the coordinates in JSON format. The category set includes plane, small vehicle."}]
    ob = prompts.det_prompt(["ship"], "poly", "rscovlm-json", train=False)
    assert ob[0]["content"].endswith("quadrant bbox: the corrdinates of each vertices of the oriented bounding boxes in "
                                     "clock-wise order.")
    assert ob[1]["content"] == ("<image>Locate every item from the category list in the image and output the oriented "
                                "bbox coordinates in JSON format. The category set includes ship.")
    assert prompts.answer_style("rscovlm-json") == {"answer_style": "rscovlm-json"}


def test_json_form_grounding_pastes_the_expression():
    """refgeo_dataset.py:111 builds the answer by hand: the expression is not JSON-escaped. int(int(10.6)*200/100)."""
    o = obj([10.6, 10, 30, 10, 30, 20, 10.6, 20], "", expression='the "big" tank')
    text = boxes.render_answer([o], 100, 100, resized_hw=(200, 200), box_format="hbox", with_label=False,
                               style="rscovlm-json")
    assert text == '```json\n[\n\t{"bbox_2d": [20, 20, 60, 40], "label": "the "big" tank"}\n]\n```'
    assert prompts.ground_prompt("dam on the left", "hbox", "rscovlm-json") == [
        {"role": "user", "content": "<image>Locate the dam on the left, output the bbox coordinates using JSON format"}]
    sys_turn, user = prompts.ground_prompt("dam", "rbox", "rscovlm-json")
    assert user["content"] == "<image>Locate the dam, output the oriented bbox coordinates using JSON format"
    assert sys_turn["content"].startswith("You are an AI assistant specializing in oriented object detection.")


# -----------------------------------------------------------------------------
# The referring benchmarks as RSCoVLM asks them, and VHM's "<image>" text


def test_referring_prompts_of_rscovlms_evaluation():
    """eval/data/vrsbench.py:57-63 and geochat_bench.py:80-96: no system turn."""
    assert prompts.referring_prompt("vrsbench", "white ship", "rscovlm") == (
        "<image>find the white ship, delivering coordinates in plain text format 'x1,y1,x2,y2 object'")
    assert prompts.referring_prompt("geochat", "cars", "rscovlm") == (
        "<image>Find all cars, delivering each oriented coordinates in plain text format 'x1,y1,x2,y2,x3,y3,x4,y4 object'")
    assert prompts.referring_prompt("geochat", "cars", "rscovlm-json") == (
        "<image>Represent all cars with quadrant bbox coordinates in a JSON format, represent objects with quadrant "
        "bbox: the corrdinates of each")
    assert prompts.referring_prompt("vrsbench", "white ship") == prompts.ground_prompt("white ship", "hbox")
    # format_vrsbench.py:128-130: "the " (4 characters) and a final '.' go only when the caption starts with "the "
    assert bench_prep._vrsbench_caption("The white ship.", "rscovlm") == "white ship"
    assert bench_prep._vrsbench_caption("A white ship.", "rscovlm") == "A white ship."
    assert bench_prep._vrsbench_caption("The white ship.", "default") == "The white ship."


def test_vhm_keeps_the_datas_image_tag_as_text(tmp_path):
    """vhm_bench.py:25-30: the guard tests a dict's keys, the question keeps "<image>\\n" after the image."""
    from PIL import Image

    base = tmp_path / "VHM_eval_dataset" / "datasets_eval"
    (base / "presence_mo_dota").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(base / "presence_mo_dota" / "a.png")
    rows = [{"image": "a.png", "image_path": "presence_mo_dota",
             "conversations": [{"from": "human", "value": "<image>\nIs there a plane?"}, {"from": "gpt", "value": "yes"}]}]
    (base / "presence_mo_dota.json").write_text(json.dumps(rows))
    for preset, want in (("rscovlm", "<image><image/>\nIs there a plane?"), ("default", "<image>\nIs there a plane?")):
        bench_prep.main(["vhm", "--root", str(tmp_path / "VHM_eval_dataset"), "--parts", "presence", "--prompts", preset,
                         "--out", str(tmp_path / preset), "--workers", "1"])
        (rec,) = read_records(tmp_path / preset / "vhm_presence.jsonl")  # one image tag: the record is valid
        assert rec["messages"][0]["content"] == want
    parts = model._to_template_messages(rec_msgs := [{"role": "user", "content": "<image><image/>\nIs there a plane?"}])
    assert parts[0]["content"] == [{"type": "image"}, {"type": "text", "text": "<image>\nIs there a plane?"}]
    assert rec_msgs[0]["content"].count("<image>") == 1


def test_geochat_bench_parts_as_rscovlm_formats_them(tmp_path):
    """eval/data/data_prepare/format_geochat.py:52-93 then geochat_bench.py: the class list lower-cased as written
    after "Classes:", the LRBEN question lower-cased, GeoChat's suffix replaced by RSCoVLM's."""
    from test_benchmarks import image, jsonl, read, run

    image(tmp_path / "AID" / "airport_3.jpg", 40, 40)
    text = "Classify the image. Classes: Airport, BareLand, MediumResidential\nAnswer in one word or a short phrase."
    aid = jsonl(tmp_path / "aid.jsonl", [{"question_id": "a", "image": "airport_3.png", "text": text,
                                           "ground_truth": "Airportgt"}])
    run("geochat", "--json", aid, "--images", tmp_path / "AID", "--prompts", "rscovlm", "--out", tmp_path / "o")
    (r,) = read(tmp_path / "o" / "geochat_aid.jsonl")
    assert r["messages"][0]["content"] == ("<image>Classify the image within one of the given classes:airport, bareland, "
                                           "mediumresidential")
    assert r["meta"]["label"] == "airport" and r["meta"]["classes"] == ["airport", "bare land", "medium residential"]
    image(tmp_path / "LR" / "0.tif", 32, 32)
    lrben = jsonl(tmp_path / "lrben.jsonl", [{"question_id": 10, "image": "0.tif", "category": "presence",
                                              "text": "Is there a Road?\nAnswer the question using a single word or phrase."}])
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"answers": [{"question_id": 10, "answer": "yes", "active": True}]}))
    run("geochat", "--json", lrben, "--images", tmp_path / "LR", "--answers", answers, "--prompts", "rscovlm",
        "--out", tmp_path / "o")
    (q,) = read(tmp_path / "o" / "geochat_lrben.jsonl")
    assert q["messages"][0]["content"] == "<image>is there a road? Answer the question using a single word or a short phrase."


def test_refgeo_with_the_json_preset(tmp_path):
    """bench_prep refgeo --prompts rscovlm-json: geoground.py's JSON wording (no system turn) and
    refgeo_dataset.py:111's answer, int() of the pixels at the file's own size (no resize here)."""
    from test_benchmarks import _refgeo, read, run

    run("refgeo", "--root", _refgeo(tmp_path), "--sets", "dior_rsvg_test", "--prompts", "rscovlm-json", "--out", tmp_path / "o")
    r = read(tmp_path / "o" / "refgeo_dior_rsvg_test.jsonl")[0]
    assert r["messages"][0] == {"role": "user", "content": "<image>Locate the dam on the left, output the bbox "
                                                           "coordinates using JSON format"}
    assert r["messages"][1]["content"] == '```json\n[\n\t{"bbox_2d": [5, 5, 50, 40], "label": "dam on the left"}\n]\n```'
    assert r["meta"]["answer_style"] == "rscovlm-json"
