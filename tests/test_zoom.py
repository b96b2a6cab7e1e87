"""The zoom-in chain (model.py "Zoom-in chain", bench_prep.py lrs-vqa / mme-realworld, eval_vqa.py's large-image
scorers): tokenization of the tool turns for both families, the inference loop with a scripted generator (exact
crops of the original image, malformed calls, the round cap, mixed batches), data_prep on real-format entries,
the metric rules on hand-computed cases, and the tiny model trained on zoom records generating through the loop."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench_prep
import data_prep
import eval_vqa
import model
import prompts
from common import UserError, read_records
from test_train import in_process


def save_image(path, w, h, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def chain_record(rid, image, bbox, question="Is the ship moored?", answer="yes"):
    """A training record of the chain as data_prep writes it."""
    return bench_prep.zoom_vqa_record(rid, "lrs_vqa", image, question, answer, {"answer": answer, "type": "status"},
                                     True, bbox)


def supervised_runs(labels):
    """The contiguous runs of supervised label ids."""
    runs, cur = [], []
    for t in labels.tolist() + [-100]:
        if t != -100:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs


# -----------------------------------------------------------------------------
# tokenization

@pytest.mark.parametrize("fam, call", [("qwen2.5", "[41, 29, 144, 108]"), ("qwen3", "[133, 150, 467, 550]")])
def test_tokenize_chain_renders_the_call_in_the_family_frame_and_supervises_both_turns(fam, call, request, tmp_path):
    """A 300x200 image, crop box [40, 30, 140, 110]. Qwen2.5-VL (tiny budget: resized to 308x196): 40*308/300 =
    41.07 -> 41, 30*196/200 = 29.4 -> 29, 143.7 -> 144, 107.8 -> 108; Qwen3-VL: x/300*1000, y/200*1000 -> 133, 150,
    467, 550. The labels are exactly the two assistant turns, each with its <|im_end|>; the second image is the
    crop of the original at full resolution."""
    tiny = request.getfixturevalue("tiny_qwen25" if fam == "qwen2.5" else "tiny_qwen3")
    processor = model.load_processor(tiny)
    img = save_image(tmp_path / "big.png", 300, 200, 0)
    rec = chain_record("r0", img, [40, 30, 140, 110])
    sample = model.tokenize(rec, processor)
    tok = processor.tokenizer
    expected_call = '<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox": ' + call + '}}\n</tool_call>'
    runs = supervised_runs(sample["labels"])
    assert [tok.decode(r) for r in runs] == [expected_call + "<|im_end|>", "yes<|im_end|>"]
    # the system block and both user turns are in the input, unsupervised
    text = tok.decode(sample["input_ids"])
    assert prompts.ZOOM_SYSTEM in text and "Is the ship moored?" + prompts.ZOOM_ASK in text and prompts.ZOOM_REPLY in text
    assert text.count("<|vision_start|>") == 2
    # image 1 = the original's crop, through the same processor
    crop = Image.open(img).convert("RGB").crop((40, 30, 140, 110))
    want = processor.image_processor(images=[Image.open(img).convert("RGB"), crop], return_tensors="pt")
    assert torch.equal(sample["pixel_values"], want["pixel_values"])
    assert torch.equal(sample["image_grid_thw"], want["image_grid_thw"])
    assert model.sample_length(rec, processor) == len(sample["input_ids"])


def test_bad_crop_box_in_a_record_is_a_user_error(tiny_qwen25, tmp_path):
    processor = model.load_processor(tiny_qwen25)
    img = save_image(tmp_path / "a.png", 120, 90, 1)
    for box, why in (([130, 10, 200, 50], "outside"), ([30, 30, 30, 60], "empty")):
        rec = chain_record("r", img, [0, 0, 10, 10])
        rec["meta"]["zoom"]["bbox"] = box
        with pytest.raises(UserError, match=f"record 'r'.*{why}"):
            model.tokenize(rec, processor)


# -----------------------------------------------------------------------------
# the inference loop with a scripted generator

def call(*box):
    return model.zoom_call_text(box)


@pytest.fixture
def scripted(tiny_qwen25, tmp_path):
    """Six records on different images; a step() that answers from a script keyed by (record id, round) and logs
    which records each round saw."""
    processor = model.load_processor(tiny_qwen25)
    sizes = {"a": (600, 400), "b": (500, 500), "c": (600, 400), "d": (400, 300), "e": (600, 400), "f": (600, 400)}
    recs = []
    for k, (w, h) in sizes.items():
        path = save_image(tmp_path / f"{k}.png", w, h, ord(k))
        recs.append(bench_prep.zoom_vqa_record(k, "lrs_vqa", path, f"question {k}", None, {"answer": "x"}, True))
    script = {("a", 0): call(56, 28, 112, 84), ("a", 1): "yes",
              ("b", 0): "no",  # answers at once
              ("c", 0): call(0, 112, 336, 224), ("c", 1): "two",
              ("d", 0): '<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox": [1, 2]}}\n</tool_call>', ("d", 1): "red",
              ("e", 0): call(340, 230, 400, 300), ("e", 1): "blue",
              ("f", 0): call(10, 10, 60, 60), ("f", 1): call(0, 0, 30, 30), ("f", 2): call(5, 5, 20, 20)}
    seen = []

    def step(states):
        seen.append([s["record"]["id"] for s in states])
        return [{"text": script[(s["record"]["id"], len(s["turns"]))], "new_tokens": 3, "cut": False} for s in states]

    return processor, recs, step, seen


def test_chain_crops_the_original_and_keeps_each_samples_images(scripted):
    """600x400 images at the tiny budget resize to 336x224 (s = 0.56): the call [56, 28, 112, 84] is the original's
    [100, 50, 200, 150], and [0, 112, 336, 224] its bottom half [0, 200, 600, 400]. Each sample's crop is its own
    image's (a, c and e are different images of one size, b answers in round one of the mixed batch), round two runs
    only the samples that called, and the reply turn is RSCoVLM's."""
    processor, recs, step, seen = scripted
    assert model.coord_kwargs(processor, 600, 400)["resized_hw"] == (224, 336)
    states = [model.zoom_start(r, processor) for r in recs]
    results = model.zoom_chain(states, step, processor, max_zoom_rounds=1)
    assert seen == [list("abcdef"), list("acdef")]
    by = {r["id"]: (s, res) for r, s, res in zip(recs, states, results)}

    def crop_tensors(rid, box):
        return model._image_tensors(processor, model.load_image(by[rid][0]["path"]).crop(box), "x")

    for rid, box in (("a", (100, 50, 200, 150)), ("c", (0, 200, 600, 400))):
        s, res = by[rid]
        assert res["zoom"]["calls"][0]["crop"] == list(box) and res["zoom"]["calls"][0]["size"] == [box[2] - box[0], box[3] - box[1]]
        pv, grid = crop_tensors(rid, box)
        assert torch.equal(s["images"][1][0], pv) and torch.equal(s["images"][1][1], grid)
        assert s["messages"][-1] == {"role": "user", "content": "<image>" + prompts.ZOOM_REPLY}
        assert s["messages"][-2] == {"role": "assistant", "content": res["zoom"]["turns"][0]}
    a_pv = by["a"][0]["images"][1][0]
    other = model._image_tensors(processor, model.load_image(by["c"][0]["path"]).crop((100, 50, 200, 150)), "x")[0]
    assert not torch.equal(a_pv, other)  # same box on another sample's image differs: a got its own
    assert [res["text"] for _, res in by.values()] == ["yes", "no", "two", "red", "blue", call(0, 0, 30, 30)]
    assert by["b"][1]["zoom"] == {"rounds": 0, "calls": [], "over_cap": False, "turns": ["no"]}
    assert by["a"][1]["new_tokens"] == 6
    # the second round's prompt holds both images' pads, the reply text and ends with the generation prompt
    p = model.zoom_prompt(by["a"][0], processor)
    n_pads = sum(int(g.prod()) // 4 for _, g in by["a"][0]["images"])
    assert p["input_ids"].count(processor.image_token_id) == n_pads
    assert processor.tokenizer.decode(p["input_ids"]).endswith(prompts.ZOOM_REPLY + "<|im_end|>\n<|im_start|>assistant\n")


def test_malformed_outside_and_empty_calls_get_the_whole_image_and_are_counted(scripted):
    processor, recs, step, _ = scripted
    states = [model.zoom_start(r, processor) for r in recs]
    results = model.zoom_chain(states, step, processor, max_zoom_rounds=1)
    d, e = states[3], states[4]
    assert results[3]["zoom"]["calls"] == [{"bbox": None, "crop": None, "size": None, "problem": "malformed"}]
    assert results[4]["zoom"]["calls"][0]["problem"] == "outside" and results[4]["text"] == "blue"
    for s in (d, e):
        assert torch.equal(s["images"][1][0], s["images"][0][0])  # the whole image again
    # boxes in original pixels -> crops, by hand
    assert model.zoom_crop_box([10.2, 5.7, 20.1, 30.0], 100, 50) == ([10, 5, 21, 30], None)
    assert model.zoom_crop_box([-5, -5, 20, 80], 100, 50) == ([0, 0, 20, 50], None)  # clipped
    assert model.zoom_crop_box([30, 10, 30, 40], 100, 50) == (None, "empty")
    assert model.zoom_crop_box([40, 10, 20, 40], 100, 50) == (None, "empty")  # reversed
    assert model.zoom_crop_box([100, 10, 120, 40], 100, 50) == (None, "outside")
    assert model.zoom_crop_box([0, 10, 100, 10.2], 100, 50) == ([0, 10, 100, 11], None)  # 100 x 1
    assert model.zoom_crop_box([0, 10, 500, 10.2], 500, 50) == (None, "empty")  # 500 x 1: Qwen-VL refuses it
    for text, want in (("yes", (None, None)), (call(1, 2, 3, 4), ([1.0, 2.0, 3.0, 4.0], None)),
                       ("<tool_call>\nnot json\n</tool_call>", (None, "malformed")),
                       ('<tool_call>\n{"name": "crop", "arguments": {"bbox": [1, 2, 3, 4]}}\n</tool_call>', (None, "malformed")),
                       ('<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox": [1, 2, 3, 4]}}', (None, "malformed")),
                       ('<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox": [1, true, 3, 4]}}\n</tool_call>',
                        (None, "malformed"))):
        assert model.parse_zoom_call(text) == want, text


def test_round_cap(scripted):
    """f calls every round: with the cap at 1 it gets one reply and its second call is the answer (over_cap); at 2,
    two replies; at 0 the first turn is the answer."""
    processor, recs, step, seen = scripted
    f = recs[5]
    for cap, rounds, text in ((0, 0, call(10, 10, 60, 60)), (1, 1, call(0, 0, 30, 30)), (2, 2, call(5, 5, 20, 20))):
        res = model.zoom_chain([model.zoom_start(f, processor)], step, processor, max_zoom_rounds=cap)[0]
        assert (res["zoom"]["rounds"], res["zoom"]["over_cap"], res["text"]) == (rounds, True, text)
    assert model.zoom_crop_box(model.zoom_box_from_model([10, 10, 60, 60], 600, 400, processor), 600, 400)[0] == \
        [math.floor(10 / 0.56), math.floor(10 / 0.56), math.ceil(60 / 0.56), math.ceil(60 / 0.56)]


# -----------------------------------------------------------------------------
# data_prep on real-format entries

LRS_BENCH = [  # LRS_VQA_merged.jsonl lines (values as published; images made here)
    {"question_id": "FAIR_1", "image": "LRS_VQA/image/15565.tif", "category": "reasoning",
     "text": "Is the bottom-most and largest bridge crossing a river?\n Answer the question using a single word or phrase.",
     "ground_truth": "yes", "hbox": [282, 340, 763, 405], "rbox": [282.0, 401.0, 334.0, 405.0, 763.0, 345.0, 713.0, 340.0],
     "abs_size": "large", "image_size": [800, 500], "size_bin": "256x256"},
    {"question_id": "STAR_7", "image": "LRS_VQA/image/0000.png", "category": "count",
     "text": "How many ships are there?\n Answer the question using a single word or phrase.", "ground_truth": "3",
     "hbox": [10, 10, 20, 20], "rbox": [10, 10, 20, 10, 20, 20, 10, 20], "abs_size": "small", "image_size": [800, 500]}]
LRS_TRAIN = [  # the training files with zoom boxes (5_22_GPT4V_..._with_boxx_info_*.json)
    {"id": "DOTAv2_train_wh1400_P1521-6", "image": "RS_ObjectDetection/DOTA2.0/train/images/P1521.png",
     "image_ori_width": 1600, "image_ori_height": 1400,
     "question": "Does the top-most ground-track-field have lights around it?\n Answer the question using a single word or phrase.",
     "answer": "yes", "bbox_info": {"rbox": [[1238.0, 841.0, 1296.0, 829.0, 1319.0, 1002.0, 1257.0, 1013.0]],
                                     "crop_hbox": [[1038, 629, 1519, 1213]]}},
    {"id": "0000_qs_17", "image": "RS_ObjectDetection/DOTA2.0/train/images/P1521.png", "image_ori_width": 1600,
     "image_ori_height": 1400, "question": "Is the number of ships less than the number of boats? \nAnswer the question using a single word or phrase.",
     "answer": "Yes", "bbox_info": {"rbox": [], "crop_hbox": [[10, 10, 100, 100], [200, 200, 300, 300]]}}]
LRS_TRAIN_OLD = {"id": "DOTAv2_train_wh1400_P3397-3", "image": "RS_ObjectDetection/DOTA2.0/train/images/P1521.png",
                 "bbox_info": {"image_name": "P1521.png", "image_width": 1600, "image_height": 1400, "hbox": [1153, 1168, 1201, 1196],
                               "rbox": [1153.0, 1168.0, 1201.0, 1168.0, 1201.0, 1196.0, 1153.0, 1196.0],
                               "crop_hbox": [953, 968, 1401, 1396]},
                 "conversations": [{"from": "human", "value": "<image>\nIs the area surrounding the bottom-most and the smaller roundabout urban?\n Answer the question using a single word or phrase."},
                                   {"from": "gpt", "value": "yes"}]}
MME = [  # MME_RealWorld.json entries
    {"Question_id": "perception/remote_sensing/color/0001", "Image": "remote_sensing/03553_Toronto.png",
     "Text": "What color is the roof of the square building in the lower right area of the picture?",
     "Question Type": "Multiple Choice", "Answer choices": ["(A) Yellow", "(B) Blue", "(C) Gray", "(D) White",
                                                            "(E) The image does not feature the color."],
     "Ground truth": "D", "Category": "color", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "perception/remote_sensing/position/0002", "Image": "remote_sensing/03553_Toronto.png",
     "Text": "Where is the triangular area surrounded by buildings in the picture?", "Question Type": "Multiple Choice",
     "Answer choices": ["(A) In the upper left area of the picture", "(B) In the upper right area of the picture",
                        "(C) In the lower left area of the picture", "(D) In the lower right area of the picture",
                        "(E) This image doesn't feature the position."],
     "Ground truth": "B", "Category": "position", "Subtask": "Remote Sensing", "Task": "Perception"},
    {"Question_id": "perception/monitoring/count/0001", "Image": "monitoring/x.png", "Text": "How many cars?",
     "Answer choices": ["(A) 1", "(B) 2"], "Ground truth": "A", "Category": "count", "Subtask": "Monitoring",
     "Task": "Perception"}]


@pytest.fixture(scope="module")
def lrs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrs")
    (root / "LRS_VQA/image").mkdir(parents=True)
    (root / "RS_ObjectDetection/DOTA2.0/train/images").mkdir(parents=True)
    save_image(root / "LRS_VQA/image/15565.tif", 800, 500, 2)
    save_image(root / "LRS_VQA/image/0000.png", 800, 500, 3)
    save_image(root / "RS_ObjectDetection/DOTA2.0/train/images/P1521.png", 1600, 1400, 4)
    (root / "LRS_VQA_merged.jsonl").write_text("".join(json.dumps(e) + "\n" for e in LRS_BENCH))
    (root / "train_part_0.json").write_text(json.dumps(LRS_TRAIN + [LRS_TRAIN_OLD]))
    (root / "remote_sensing").mkdir()
    save_image(root / "remote_sensing/03553_Toronto.png", 700, 460, 5)
    (root / "MME_RealWorld.json").write_text(json.dumps(MME))
    return root


def test_lrs_vqa_benchmark_and_training_entries(lrs_root, tmp_path, capsys):
    out = tmp_path / "out"
    summary = bench_prep.main(["lrs-vqa", "--json", str(lrs_root / "LRS_VQA_merged.jsonl"), "--images", str(lrs_root),
                              "--split", "test", "--out", str(out), "--workers", "1"])
    recs = read_records(out / "lrs_vqa_test.jsonl")
    fair, star = recs
    assert fair["messages"] == [{"role": "system", "content": prompts.ZOOM_SYSTEM},
                                {"role": "user", "content": "<image>" + LRS_BENCH[0]["text"] + prompts.ZOOM_ASK}]
    assert fair["meta"] == {"answer": "yes", "type": "reasoning", "benchmark": "lrs_vqa", "source": "FAIR",
                            "question_id": "FAIR_1", "evidence_hbox": [282, 340, 763, 405], "zoom": {}}
    assert star["messages"] == [{"role": "user", "content": "<image>" + LRS_BENCH[1]["text"]},  # count: no zoom
                                {"role": "assistant", "content": "3"}]
    assert "zoom" not in star["meta"] and summary["counts"]["zoom prompts"] == 1
    summary = bench_prep.main(["lrs-vqa", "--json", str(lrs_root / "train_part_0.json"), "--images", str(lrs_root),
                              "--split", "train", "--out", str(out), "--workers", "1"])
    one, several, old = read_records(out / "lrs_vqa_train.jsonl")
    assert one["meta"]["zoom"] == {"bbox": [1038, 629, 1519, 1213]} and one["images"][0] == one["images"][1]
    assert [m["role"] for m in one["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert one["messages"][2]["content"] == call(1038, 629, 1519, 1213) and one["messages"][4]["content"] == "yes"
    assert several["messages"][0]["role"] == "user" and len(several["images"]) == 1  # two regions: plain VQA
    assert old["meta"]["zoom"] == {"bbox": [953, 968, 1401, 1396]}
    assert old["messages"][1]["content"].startswith("<image>Is the area surrounding")
    assert summary["counts"]["zoom chains (with crop)"] == 2 and summary["counts"]["plain vqa"] == 1
    assert "wrote" in capsys.readouterr().out


def test_lrs_vqa_input_errors_are_one_line(lrs_root, tmp_path, monkeypatch, capsys):
    from cli_helpers import one_error_line, run_main

    bad = dict(LRS_TRAIN[0], bbox_info={"crop_hbox": [[1700, 10, 1800, 40]]})
    (tmp_path / "bad.json").write_text(json.dumps([LRS_TRAIN[1], bad]))
    r = run_main("bench_prep.py", bench_prep.main, ["lrs-vqa", "--json", tmp_path / "bad.json", "--images", lrs_root,
                                                 "--out", tmp_path / "o", "--workers", "1"], monkeypatch, capsys)
    one_error_line(r, [f"{tmp_path / 'bad.json'} entry 1", "outside", "1600x1400"])
    # the folder one level up: every image missing, the line suggests the folder that holds them
    r = run_main("bench_prep.py", bench_prep.main, ["lrs-vqa", "--json", lrs_root / "LRS_VQA_merged.jsonl", "--images",
                                                 lrs_root.parent, "--out", tmp_path / "o2", "--workers", "1"],
                 monkeypatch, capsys)
    one_error_line(r, ["none of the 2 images", f"did you mean {lrs_root}"])
    # a size that disagrees with the image would cut the crop from the wrong place: skipped with --skip-bad
    wrong = dict(LRS_TRAIN[0], image_ori_width=4000)
    (tmp_path / "wrong.json").write_text(json.dumps([wrong, LRS_TRAIN[1]]))
    s = bench_prep.main(["lrs-vqa", "--json", str(tmp_path / "wrong.json"), "--images", str(lrs_root), "--out",
                        str(tmp_path / "o3"), "--workers", "1", "--skip-bad"])
    assert s["counts"]["skipped"] == 1 and "4000x1400" in s["skipped"][0]["reason"] and s["counts"]["records"] == 1


def test_mme_realworld(lrs_root, tmp_path):
    out = tmp_path / "mme"
    summary = bench_prep.main(["mme-realworld", "--json", str(lrs_root / "MME_RealWorld.json"), "--out", str(out),
                              "--workers", "1"])
    color, position = read_records(out / "mme_realworld_rs.jsonl")
    want_q = ("What color is the roof of the square building in the lower right area of the picture? The choices are "
              "listed below: \n(A) Yellow\n(B) Blue\n(C) Gray\n(D) White\n(E) The image does not feature the color.\n"
              "Select the best answer to the above multiple-choice question based on the image. Respond with only the "
              "letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")
    assert color["messages"] == [{"role": "system", "content": prompts.ZOOM_SYSTEM},
                                 {"role": "user", "content": "<image>" + want_q + prompts.ZOOM_ASK}]
    assert color["meta"]["benchmark"] == "mme_realworld" and color["meta"]["zoom"] == {}
    assert [m["role"] for m in position["messages"]] == ["user", "assistant"]  # position: no zoom (RSCoVLM)
    assert summary["counts"]["other subtasks (not remote sensing)"] == 1 and summary["counts"]["records"] == 2


# -----------------------------------------------------------------------------
# metrics

def test_lrs_vqa_rule_with_wordnet_and_without(monkeypatch):
    recs = [{"id": str(i), "task": "vqa", "dataset": "lrs_vqa", "messages": [],
             "meta": {"answer": gt, "type": t, "source": s, "benchmark": "lrs_vqa"}}
            for i, (gt, t, s) in enumerate([("gray", "color", "FAIR"), ("yes", "status", "FAIR"),
                                            ("white", "color", "STAR"), ("no", "status", "STAR")])]
    preds = {"0": "Grey.", "1": "yes", "2": "yellow and white", "3": "yes"}
    monkeypatch.setattr(eval_vqa, "_WORDNET", [(None, "none here")])
    res = eval_vqa.score_lrs_vqa(recs, preds, {})["lrs_vqa"]
    # without synonyms both rules: only "1"; contain: "1" and "2" (white in "yellow and white")
    assert not res["synonyms"] and res["rscovlm"]["overall"] == res["official"]["overall"] == 1 / 4
    assert res["rscovlm"]["tasks"] == {"color": 0.0, "status": 1 / 2} and res["rscovlm"]["average"] == 1 / 4
    assert res["contain"]["tasks"] == {"color": 1 / 2, "status": 1 / 2} and res["contain"]["overall"] == 1 / 2
    assert res["rscovlm"]["sources"]["FAIR"] == {"overall": 1 / 2, "average": 1 / 2, "tasks": {"color": 0.0, "status": 1.0}}
    metrics = eval_vqa.evaluate(recs, preds)
    assert "no WordNet is found" in metrics["rules"]["lrs_vqa"]["synonyms"] and "vqa" not in metrics
    monkeypatch.setattr(eval_vqa, "_WORDNET", [])
    wn, where = eval_vqa.load_wordnet()
    if wn is None:
        pytest.skip(f"no WordNet here ({where}): the WordNet half of the rule is untested")
    assert eval_vqa.lrs_match("Grey.", "gray", wn) and eval_vqa.lrs_match("automobile", "car", wn)
    assert not eval_vqa.lrs_match("yellow", "white", wn) and not eval_vqa.lrs_match("", "gray", wn)
    res = eval_vqa.score_lrs_vqa(recs, preds, {})["lrs_vqa"]
    assert res["synonyms"] and res["rscovlm"]["overall"] == 1 / 2 and res["rscovlm"]["tasks"]["color"] == 1 / 2
    assert res["official"]["tasks"]["color"] == 0.0  # "grey." keeps its '.' there: no synset


def test_mme_letter_rule():
    ch = MME[0]["Answer choices"]
    cases = {"D": "D", "(D) White": "D", "The best answer is C": "C", "Best answer: C": "B", "": "A", "  ": "A",
             "white": "D", "gray": "C", "it is a very hard question to answer from this small picture": "",
             "the roof looks white to me": "D" if False else ""}
    for text, want in cases.items():
        assert eval_vqa.mme_letter(text, ch) == want, text
    recs = [{"id": str(i), "task": "vqa", "dataset": "mme", "messages": [],
             "meta": {"answer": gt, "type": cat, "choices": ch, "benchmark": "mme_realworld"}}
            for i, (gt, cat) in enumerate([("D", "color"), ("C", "color"), ("E", "position")])]
    res = eval_vqa.score_mme(recs, {"0": "D", "1": "Best answer: C", "2": "E"}, {})["mme"]
    assert res["official"] == {"overall": pytest.approx(2 / 3), "categories": {"color": 1 / 2, "position": 1.0}}
    assert res["rscovlm"]["overall"] == 1.0 and res["chose_E"] == 1


def test_zoom_stats():
    recs = [{"id": "a", "dataset": "d", "meta": {"evidence_hbox": [10, 10, 30, 30]}}, {"id": "b", "dataset": "d", "meta": {}}]
    zoom = {"a": {"calls": [{"crop": [0, 0, 40, 50], "size": [40, 50], "problem": None},
                            {"crop": None, "size": None, "problem": "malformed"}], "over_cap": True},
            "b": {"calls": [{"crop": [50, 0, 70, 10], "size": [20, 10], "problem": None}], "over_cap": False}}
    z = eval_vqa.zoom_stats(recs, zoom)["d"]
    assert z["rounds"] == {"1": 1, "2": 1} and z["calls"] == {"cropped": 2, "malformed": 1} and z["over_cap"] == 1
    assert z["crop_size"] == {"n": 2, "median_w": 40, "median_h": 50, "min": [20, 10], "max": [40, 50]}
    assert z["crops_on_evidence"] == {"n": 1, "rate": 1.0}


# -----------------------------------------------------------------------------
# the tiny model: trains on zoom records, generates through the loop (resumable)

def test_tiny_model_trains_on_zoom_records_and_generates_through_the_loop(tiny_qwen25, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    img = save_image(d / "big.png", 600, 400, 9)
    train = [chain_record(f"t{i}", img, [100, 50, 200, 150]) for i in range(2)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    run = tmp_path / "run"
    # train.py's entry point in this process (test_train.in_process: ~5 s of imports saved); 50 steps memorise the
    # chain (loss ~6.2 -> ~0.04; 30 do not)
    code, _, stderr = in_process(["--model", tiny_qwen25, "--data", f"{d}/train.jsonl*50", "--out", run,
                                  "--max-steps", "50", "--lr", "1e-2", "--warmup-ratio", "0.1", "--save-every", "1000",
                                  "--max-length", "2048", "--num-workers", "0", "--seed", "0"])
    assert code == 0, stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.5 * losses[0], losses
    net, processor = model.load(run / "final")
    ev = [dict(r, id=f"e{i}", messages=r["messages"][:2], images=r["images"][:1],
               meta={"answer": "yes", "type": "status", "source": "FAIR", "benchmark": "lrs_vqa", "zoom": {},
                     "evidence_hbox": [140, 90, 160, 110]}) for i, r in enumerate(train)]
    out = tmp_path / "preds.jsonl"
    got = model.predict(net, processor, ev, out, batch_size=2, max_new_tokens=128)
    line = got["e0"]
    # the memorised chain: the call (in the model's frame: [56, 28, 112, 84]), the crop, then the answer
    assert line["zoom"]["turns"][0] == call(56, 28, 112, 84), line
    assert line["zoom"]["calls"][0]["crop"] == [100, 50, 200, 150] and line["text"] == "yes"
    settings = json.loads(Path(f"{out}.settings.json").read_text())
    assert settings["max_zoom_rounds"] == 1
    # resumable: a lost line is generated again, the kept one is not; another round cap is refused
    out.write_text(out.read_text().splitlines()[0] + "\n")
    again = model.predict(net, processor, ev, out, batch_size=2, max_new_tokens=128)
    assert again.keys() == {"e0", "e1"} and again["e1"]["text"] == "yes"
    with pytest.raises(UserError, match="max_zoom_rounds"):
        model.predict(net, processor, ev, out, batch_size=2, max_new_tokens=128, max_zoom_rounds=2)
    # scored by eval_vqa from the predictions file: LRS-VQA accuracy and the zoom statistics
    (d / "ev.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_where"}) + "\n" for r in ev))
    m = eval_vqa.main(["--preds", str(out), "--data", str(d / "ev.jsonl"), "--json-out", str(tmp_path / "m.json")])
    assert m["lrs_vqa"]["lrs_vqa"]["rscovlm"]["overall"] == 1.0
    assert m["zoom"]["lrs_vqa"]["calls"] == {"cropped": 2} and m["zoom"]["lrs_vqa"]["rounds"] == {"1": 2}
    assert m["zoom"]["lrs_vqa"]["crops_on_evidence"] == {"n": 2, "rate": 1.0}
