"""--prompts rscovlm: RSCoVLM's own wording and answer conventions (docs/prompts.md#prompt-presets).

Every expected string is written out by hand from VisionXLab/RSCoVLM's code (rscovlm/training/data/
dense_det_dataset.py, refgeo_dataset.py, rscovlm/eval/data/dense_det.py, geoground.py, geochat_bench.py,
scene_cls.py, data_prepare/format_image_caption.py), never computed with the code under test. The oriented
boxes are cases where OpenCV 4.10's float32 minAreaRect gives whole numbers (checked by hand against it), so
RSCoVLM's int() of its output is the value written here."""
import json

import numpy as np
import pytest
from PIL import Image

import boxes
import data_prep
import eval_det
import model
import prompts
from common import UserError, read_records
from test_data_prep import _caption_set, _dior_root, _rsvg_root, _rsvqa_root, read_jsonl, run, run_synth, write_png


SYS_HBOX = ("As an AI assistant, you specialize in accurate image object detection, delivering coordinates in plain "
            "text format 'x1,y1,x2,y2 object'.")
SYS_RBOX = ("As an AI assistant, you specialize in accurate oriented object detection, delivering coordinates in "
            "plain text format 'x,y,w,h,a object'.")
SYS_POLY = ("As an AI assistant, you specialize in accurate oriented object detection, delivering coordinates of the "
            "polygon vertices in plain text format 'x1,y1,x2,y2,x3,y3,x4,y4 object'.")
DOTA_FIND = ("<image>find the baseball diamond, basketball court, bridge, ground track field, harbor, helicopter, "
             "large vehicle, plane, roundabout, ship, small vehicle, soccer ball field, storage tank, swimming pool, "
             "tennis court")


def obj(poly, label, **kw):
    return {"poly": poly, "label": label, "difficult": 0, **kw}


# -----------------------------------------------------------------------------
# Answer conventions on hand-computed cases


def test_truncation_sort_ties_and_no_clipping():
    """100x80 image resized to 50x40 (s = 0.5). Input order A, B, C, D, E."""
    A = obj([11, 21, 41, 21, 41, 41, 11, 41], "small-vehicle")  # x 5.5 -> 5, 20.5 -> 20; y 10.5 -> 10, 20.5 -> 20
    B = obj([60, 7, 90, 7, 90, 19, 60, 19], "plane")          # y 3.5 -> 3: key (plane, 3, 30)
    C = obj([20, 60, 30, 60, 30, 70, 20, 70], "plane")        # key (plane, 30, 10)
    D = obj([61, 7, 70, 7, 70, 12, 61, 12], "plane")          # x 30.5 -> 30: the same key as B, comes after it
    E = obj([-3, 50, 10, 50, 10, 60, -3, 60], "ship")         # -1.5 -> -1 (toward zero), not clipped to 0
    text = boxes.render_answer([A, B, C, D, E], 100, 80, resized_hw=(40, 50), style="rscovlm")
    assert text == ("30,3,45,3,45,9,30,9 plane\n"
                    "30,3,35,3,35,6,30,6 plane\n"
                    "10,30,15,30,15,35,10,35 plane\n"
                    "-1,25,5,25,5,30,-1,30 ship\n"
                    "5,10,20,10,20,20,5,20 small vehicle\n")
    # the default preset rounds, clips and orders ties by their numbers
    assert boxes.render_answer([A, B, C, D, E], 100, 80, resized_hw=(40, 50)).splitlines()[:2] == [
        "30,4,45,4,45,10,30,10 plane", "31,4,35,4,35,6,31,6 plane"]
    assert boxes.render_answer([], 100, 80, style="rscovlm") == "There are none."


def test_hbox_far_corner_is_truncated_before_scaling():
    """COCO's x + w is int()ed before the resize: 10.7 -> 10 -> 20 at s = 2, where the polygon has int(21.4)."""
    o = [obj([1.2, 2, 10.7, 2, 10.7, 6.6, 1.2, 6.6], "ship")]
    assert boxes.render_answer(o, 50, 50, resized_hw=(100, 100), box_format="hbox", style="rscovlm") == "2,4,20,12 ship\n"
    assert boxes.render_answer(o, 50, 50, resized_hw=(100, 100), box_format="poly", style="rscovlm") == \
        "2,4,21,4,21,13,2,13 ship\n"


@pytest.mark.parametrize("poly, expected", [
    ([0, 0, 5, 0, 5, 3, 0, 3], "2,1,5,3,0"),             # minAreaRect (3, 5, 90) -> swap -> 180 -> 0
    ([0, 0, 3, 0, 3, 5, 0, 5], "1,2,5,3,-90"),           # (5, 3, 90): no swap, 90 wraps to -90
    ([0, 0, 4, 0, 4, 4, 0, 4], "2,2,4,4,-90"),           # a square keeps OpenCV 4.x's 90 -> -90
    ([0, 0, 8, 6, 5, 10, -3, 4], "2,5,10,5,36"),         # (10, 5, 36.87): int() of the angle
    ([0, 3, 4, 0, 10, 8, 6, 11], "5,5,10,5,53"),         # (10, 5, 53.13)
])
def test_oriented_box_as_rscovlm_derives_it(poly, expected):
    assert boxes.render_answer([obj(poly, "ship")], 20, 20, box_format="rbox", style="rscovlm") == expected + " ship\n"


def test_grounding_truncates_first_writes_the_expression_and_goes_counter_clockwise():
    """refgeo: int(int(v) * 200 / 100): 10.6 -> 10 -> 20 (the det rule would give int(21.2) = 21)."""
    g = [obj([10.6, 20, 30, 20, 30, 40, 10.6, 40], "ship", expression="The red ship at the top left")]
    kw = {"resized_hw": (200, 200), "with_label": False, "style": "rscovlm"}
    assert boxes.render_answer(g, 100, 100, box_format="hbox", **kw) == "20,40,60,80 The red ship at the top left\n"
    assert boxes.render_answer(g, 100, 100, box_format="poly", **kw) == \
        "20,40,20,80,60,80,60,40 The red ship at the top left\n"
    assert boxes.render_answer(g, 100, 100, box_format="rbox", **kw) == "40,60,40,40,-90 The red ship at the top left\n"


# -----------------------------------------------------------------------------
# Wording


def test_prompt_helpers_write_rscovlm_wording_and_keep_the_default():
    classes = ["small-vehicle", "plane", "baseball-diamond"]
    assert prompts.det_prompt(classes, "poly", preset="rscovlm") == [
        {"role": "system", "content": SYS_POLY},
        {"role": "user", "content": "<image>find the baseball diamond, plane, small vehicle"}]
    assert prompts.det_prompt(classes, "hbox", preset="rscovlm", train=False)[1]["content"] == \
        "<image>find the baseball diamond, plane, small vehicle."
    assert prompts.det_prompt(classes, "rbox", preset="rscovlm")[0]["content"] == SYS_RBOX
    assert prompts.ground_prompt(" the dam on the left ", "hbox", preset="rscovlm") == [
        {"role": "system", "content": SYS_HBOX}, {"role": "user", "content": "<image>find the the dam on the left"}]
    assert prompts.vqa_prompt("Is there a road?", preset="rscovlm") == \
        "<image>Is there a road? Answer the question using a single word or a short phrase."
    assert prompts.cls_prompt(["BareLand", "Beach"], "rscovlm") == \
        "<image>Classify the image within one of the given classes:BareLand,Beach."
    assert prompts.caption_prompt("rscovlm") == "<image>Describe the image"
    # the default preset and the old signatures are unchanged
    assert prompts.det_prompt(classes) == prompts.det_prompt(classes, "poly", preset="default")
    assert prompts.det_prompt(classes).startswith("<image>\nDetect all objects of the following categories")
    assert prompts.vqa_prompt("Is there a road?") == "<image>\nIs there a road? " + prompts.VQA_SUFFIX
    assert prompts.caption_prompt() == prompts.CAPTION_PROMPT
    with pytest.raises(ValueError, match="unknown prompt preset 'geochat'"):
        prompts.vqa_prompt("q", preset="geochat")


# -----------------------------------------------------------------------------
# Converters on real-format samples


def test_dota_real_sample_three_box_forms(shared_data, tmp_path):
    """P1888 (64 vehicles, 712x557: one padded 1024 patch); val = RSCoVLM's evaluation wording (a period)."""
    root = tmp_path / "dota"
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    (root / "images" / "P1888.png").symlink_to(shared_data / "dota" / "images" / "P1888.png")
    (root / "labelTxt" / "P1888.txt").symlink_to(shared_data / "dota" / "labelTxt" / "P1888.txt")
    run("dota", "--root", root, "--split", "val", "--out", tmp_path / "o", "--workers", 1,
        "--prompts", "rscovlm", "--box-forms", "hbox,rbox,poly")
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "o" / "dota_val.jsonl")}
    assert sorted(recs) == ["P1888__1024__0___0#hbox", "P1888__1024__0___0#poly", "P1888__1024__0___0#rbox"]
    assert len({r["images"][0] for r in recs.values()}) == 1
    for form, system in (("hbox", SYS_HBOX), ("rbox", SYS_RBOX), ("poly", SYS_POLY)):
        r = recs[f"P1888__1024__0___0#{form}"]
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == system and r["messages"][1]["content"] == DOTA_FIND + "."
        assert r["meta"]["box_format"] == form and r["meta"]["answer_style"] == "rscovlm"
    # label lines: large vehicle before small vehicle, then the hbox's y1, x1 (read off labelTxt/P1888.txt)
    poly = recs["P1888__1024__0___0#poly"]["messages"][-1]["content"]
    assert poly.startswith("512,172,517,213,507,215,502,174 large vehicle\n"   # 517 213 507 215 502 174 512 172
                           "484,174,490,216,481,217,474,176 large vehicle\n")  # 490 216 481 217 474 176 484 174
    assert poly.endswith("674,375,683,375,684,394,675,395 small vehicle\n") and poly.count("\n") == 64
    assert recs["P1888__1024__0___0#hbox"]["messages"][-1]["content"].startswith("502,172,517,215 large vehicle\n")


def test_dior_real_sample_and_training_wording(shared_data, tmp_path):
    run("dior", "--root", shared_data / "dior", "--split", "all", "--out", tmp_path, "--workers", 1,
        "--prompts", "rscovlm", "--box-forms", "poly,rbox,hbox")
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "dior_all.jsonl")}
    assert recs["00001#poly"]["messages"][-1]["content"] == "133,237,684,237,684,672,133,672 golffield\n"
    assert recs["00001#rbox"]["messages"][-1]["content"] == "408,454,551,435,0 golffield\n"  # 408.5, 454.5 -> int
    assert recs["00001#hbox"]["messages"][-1]["content"] == "133,237,684,672 golffield\n"
    assert recs["00001#poly"]["messages"][1]["content"].endswith("trainstation, vehicle, windmill.")
    root = _dior_root(tmp_path / "d", ["00002"])
    (root / "ImageSets" / "Main" / "train.txt").write_text("00002\n")
    run("dior", "--root", root, "--split", "train", "--out", tmp_path / "t", "--workers", 1, "--prompts", "rscovlm")
    (r,) = read_jsonl(tmp_path / "t" / "dior_train.jsonl")
    assert r["id"] == "00002" and r["messages"][0]["content"] == SYS_POLY
    assert r["messages"][1]["content"] == (
        "<image>find the airplane, airport, baseballfield, basketballcourt, bridge, chimney, dam, expressway service "
        "area, expressway toll station, golffield, groundtrackfield, harbor, overpass, ship, stadium, storagetank, "
        "tenniscourt, trainstation, vehicle, windmill")  # training: no period
    assert r["messages"][-1]["content"] == "1,2,11,2,11,8,1,8 expressway service area\n"


def test_rsvg_vqa_captions_cls_converters(tmp_path):
    root = _rsvg_root(tmp_path)
    (root / "test.txt").write_text("2\n")
    run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "g", "--workers", 1, "--prompts", "rscovlm",
        "--box-forms", "hbox,poly")
    g = {r["id"]: r for r in read_jsonl(tmp_path / "g" / "rsvg_test.jsonl")}
    assert g["rsvg_2#hbox"]["messages"] == [
        {"role": "system", "content": SYS_HBOX}, {"role": "user", "content": "<image>find the a small white car"},
        {"role": "assistant", "content": "30,10,40,20 a small white car\n"}]
    assert g["rsvg_2#poly"]["messages"][-1]["content"] == "30,10,30,20,40,20,40,10 a small white car\n"

    run("rsvqa", "--root", _rsvqa_root(tmp_path), "--variant", "LR", "--split", "test", "--out", tmp_path / "v",
        "--workers", 1, "--prompts", "rscovlm")
    v = read_jsonl(tmp_path / "v" / "rsvqa_lr_test.jsonl")
    assert v[4]["messages"] == [
        {"role": "user", "content": "<image>Is there a road? Answer the question using a single word or a short phrase."},
        {"role": "assistant", "content": "yes"}]

    js = _caption_set(tmp_path / "UCM_captions")
    run("captions", "--json", js, "--images", tmp_path / "UCM_captions" / "imgs", "--split", "test",
        "--out", tmp_path / "c", "--workers", 1, "--prompts", "rscovlm")
    (c,) = read_jsonl(tmp_path / "c" / "ucm_captions_test.jsonl")
    assert c["messages"][0] == {"role": "user", "content": "<image>Describe the image"}

    for cls in ("BareLand", "basketball_court"):
        for i in range(2):
            write_png(tmp_path / "AID" / cls / f"{cls}_{i}.jpg", 8, 8, seed=i)
    run("cls", "--root", tmp_path / "AID", "--train-ratio", "0.5", "--out", tmp_path / "k", "--workers", 1,
        "--prompts", "rscovlm")
    k = read_jsonl(tmp_path / "k" / "aid_test.jsonl")
    assert k[0]["messages"][0]["content"] == \
        "<image>Classify the image within one of the given classes:BareLand,basketball_court."
    assert [r["messages"][-1]["content"] for r in k] == ["BareLand", "basketball_court"]
    assert k[0]["meta"]["classes"] == ["BareLand", "basketball_court"]


def test_bad_box_forms_name_the_flag(tmp_path):
    root = _rsvg_root(tmp_path)
    (root / "test.txt").write_text("2\n")
    with pytest.raises(UserError, match=r"--box-forms 'hbox,obb'"):
        run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "g", "--box-forms", "hbox,obb")


# -----------------------------------------------------------------------------
# Tokenize (both families) and scoring


def _record(tmp_path, task, form):
    """A 300x200 image: Qwen2.5-VL resizes it to 308x196 (28-px multiples), Qwen3-VL writes 0..1000."""
    img = tmp_path / "img.png"
    if not img.exists():
        Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(img)
    o = obj([10, 20, 50, 20, 50, 40, 10, 40], "ship", expression="the ship")
    if task == "det":
        prompt = prompts.det_prompt(["ship", "plane"], form, preset="rscovlm")
    else:
        prompt = prompts.ground_prompt("the ship", form, preset="rscovlm")
    return data_prep.make_record("r", task, "toy", [str(img)], prompt, "stale text, re-rendered from meta",
                                 {"width": 300, "height": 200, "objects": [o], "classes": ["ship", "plane"],
                                  "box_format": form, "answer_style": "rscovlm"})


@pytest.mark.parametrize("family, task, form, target", [
    # 10 * 308/300 = 10.27 -> 10, 50 -> 51.33 -> 51; 20 * 196/200 = 19.6 -> 19 (rounding would give 20), 40 -> 39
    ("qwen2.5", "det", "poly", "10,19,51,19,51,39,10,39 ship\n"),
    ("qwen2.5", "ground", "hbox", "10,19,51,39 the ship\n"),
    # 0..1000: 10 * 1000/300 = 33.3 -> 33, 50 -> 166.7 -> 166 (rounding: 167); y 100, 200
    ("qwen3", "det", "poly", "33,100,166,100,166,200,33,200 ship\n"),
    ("qwen3", "ground", "hbox", "33,100,166,200 the ship\n"),
])
def test_tokenize_renders_rscovlm_answers_for_both_families(tmp_path, request, family, task, form, target):
    tiny = request.getfixturevalue("tiny_qwen25" if family == "qwen2.5" else "tiny_qwen3")
    processor = model.load_processor(tiny, min_pixels=28 * 28, max_pixels=100_000)
    t = model.tokenize(_record(tmp_path, task, form), processor)
    tok = processor.tokenizer
    assert tok.decode(t["labels"][t["labels"] != -100].tolist()) == target + "<|im_end|>"
    prompt = tok.decode(t["input_ids"][t["labels"] == -100].tolist())
    assert prompt.startswith("<|im_start|>system\n" + (SYS_POLY if form == "poly" else SYS_HBOX) + "<|im_end|>")
    assert "You are a helpful assistant" not in prompt  # RSCoVLM's system turn replaces Qwen's default
    assert "<|vision_end|>find the " in prompt  # the text follows the image directly


def test_synth_rscovlm_records_read_tokenize_and_parse_back(tmp_path, tiny_qwen25):
    """Every synth task under --prompts rscovlm: read_records accepts the system turns, the supervised
    text is the rscovlm rendering, and it parses back to within a pixel of the ground truth."""
    run_synth("--out", tmp_path, "--train", 2, "--val", 1, "--prompts", "rscovlm")
    processor = model.load_processor(tiny_qwen25)
    records = read_records(tmp_path / "synth_all_train.jsonl")
    assert {r["task"] for r in records} == {"det", "ground", "vqa", "caption", "cls"}
    for r in records:
        t = model.tokenize(r, processor)
        text = processor.tokenizer.decode(t["labels"][t["labels"] != -100].tolist())[: -len("<|im_end|>")]
        if r["task"] not in ("det", "ground"):
            assert text == r["messages"][-1]["content"] and r["messages"][0]["content"].startswith("<image>")
            continue
        assert r["messages"][0]["role"] == "system" and r["messages"][1]["content"].startswith("<image>find the ")
        m = r["meta"]
        kw = model.coord_kwargs(processor, m["width"], m["height"])
        assert text.endswith("\n") and text == boxes.render_answer(
            m["objects"], m["width"], m["height"], **kw, box_format=m["box_format"], style="rscovlm",
            with_label=r["task"] == "det")
        objs, _ = boxes.parse_answer(text, m["width"], m["height"], **kw, box_format=m["box_format"])
        assert len(objs) == len(m["objects"])
        if r["task"] == "ground":
            assert text.rstrip("\n").endswith(m["objects"][0]["expression"])
            assert np.allclose(boxes.poly_to_hbox(objs[0]["poly"]), boxes.poly_to_hbox(m["objects"][0]["poly"]), atol=1.5)


def test_eval_det_scores_rscovlm_answers(shared_data, tmp_path):
    """DIOR 00001's golffield (133,237)-(684,672) in an 800-px image, as a checkpoint at a 400x400 budget
    writes it (s = 0.5: 66.5 -> 66, 118.5 -> 118), in RSCoVLM's plain and JSON forms; and a grounding answer."""
    run("dior", "--root", shared_data / "dior", "--split", "all", "--out", tmp_path, "--workers", 1,
        "--prompts", "rscovlm")
    answers = {"plain": "66,118,342,118,342,336,66,336 golffield\n",
               "json": '```json\n[\n\t{"quadrant bbox": [66, 118, 342, 118, 342, 336, 66, 336], "label": "golffield"}\n]\n```',
               "rbox_json": '```json\n[\n\t{"oriented bbox": [204, 227, 276, 218, 0], "label": "golffield"}\n]\n```',
               "wrong": "There are none."}
    for name, text in answers.items():
        (tmp_path / "p.jsonl").write_text(json.dumps({"id": "00001", "text": text, "coords": "abs",
                                                      "resized_hw": [400, 400]}) + "\n")
        m = eval_det.main(["--preds", str(tmp_path / "p.jsonl"), "--data", str(tmp_path / "dior_all.jsonl")])
        assert m["det"]["dior-r"]["AP"]["golffield"] == pytest.approx(0.0 if name == "wrong" else 1.0), name

    root = _rsvg_root(tmp_path)
    (root / "test.txt").write_text("1\n2\n")
    run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "g", "--workers", 1, "--prompts", "rscovlm")
    preds = [{"id": "rsvg_1", "text": "5,5,50,40 the dam on the left\n"},  # exact
             {"id": "rsvg_2", "text": "0,0,9,9 a small white car\n"}]      # misses (30,10)-(40,20)
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    g = eval_det.main(["--preds", str(tmp_path / "g.jsonl"), "--data", str(tmp_path / "g" / "rsvg_test.jsonl"),
                       "--coords", "abs"])["ground"]["dior-rsvg"]
    assert g["Acc@0.5"] == 0.5 and g["no_box"] == 0
