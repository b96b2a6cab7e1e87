"""eval_vqa.py: every metric against hand-computed values, captions against pycocoevalcap called directly,
bad inputs, the CLI, and an interrupted + resumed evaluation on a tiny checkpoint."""
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import cli_helpers
import eval_vqa as ev
import model
from common import UserError, read_predictions, run_cli


def rec(rid, task, dataset, meta, question="<image>Question?", answer="x"):
    return {"id": rid, "task": task, "dataset": dataset, "images": ["img.png"],
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "meta": meta}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -----------------------------------------------------------------------------
# normalisation and the two matching rules


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"),
    ("The answer is TWO!", "answer is 2"),
    ("twenty-one buildings", "21 buildings"),
    ("a thousand", "1000"),
    ("1,000 m²", "1000 m2"),
    ("500m2", "500 m2"),
    ("Between 11m2 and 100m2.", "between 11 m2 and 100 m2"),
    ("Dense_Residential", "dense residential"),
    ("3.0", "3"),
    ("007", "7"),
    ("none", "0"),
    ("", ""),
    ("!!!###\n\t", ""),
])
def test_normalize(text, expected):
    assert ev.normalize(text) == expected


def test_exact_and_contain_rules():
    # yes/no: a prediction starting with yes/no is cut to that word for exact; contain is a substring test
    assert ev.exact_match("Yes, there is a road.", "yes")
    assert not ev.exact_match("There is a road, yes", "yes") and ev.contain_match("There is a road, yes", "yes")
    assert not ev.exact_match("yes", "no") and not ev.contain_match("yes", "no")
    # RSCoVLM's contain rule is loose on purpose: "no" is in "not sure", "1" is in "10"
    assert ev.contain_match("Not sure", "no") and not ev.exact_match("Not sure", "no")
    assert ev.contain_match("10", "1") and not ev.exact_match("10", "1")
    # number words and articles
    assert ev.exact_match("Three.", "3") and not ev.contain_match("Three.", "3")
    assert ev.exact_match("The forest", "forest")
    # empty and junk answers are wrong under both rules
    for junk in ("", "   ", "\u0000@@##", "<|im_end|>"):
        assert not ev.exact_match(junk, "yes") and not ev.contain_match(junk, "yes")


def test_rsvqa_buckets():
    # LR buckets: 0 | 1-10 | 11-100 | 101-1000 | >1000, written "0", "between 0 and 10", ..., "more than 1000"
    assert [ev.bucket_of_number(x) for x in (0, 1, 10, 11, 100, 101, 1000, 1001)] == [0, 1, 1, 2, 2, 3, 3, 4]
    assert ev.exact_match("34", "between 11 and 100", bucketed=True)
    assert ev.exact_match("thirty four", "between 11 and 100", bucketed=True)
    assert ev.exact_match("between 1 and 10", "between 0 and 10", bucketed=True)  # same bucket, other wording
    assert not ev.exact_match("0", "between 0 and 10", bucketed=True)  # 0 is its own bucket
    assert ev.exact_match("2000", "more than 1000", bucketed=True)
    assert not ev.exact_match("1000", "more than 1000", bucketed=True)
    assert ev.exact_match("500 m2", "between 101m2 and 1000m2", bucketed=True)  # HR areas
    assert not ev.exact_match("many", "between 11 and 100", bucketed=True)
    assert not ev.exact_match("", "0", bucketed=True)
    # raw LR count GTs are bucketed by dataset name + type; a bucket-phrase GT is bucketed anywhere
    lr = rec("q", "vqa", "rsvqa_lr", {"type": "count", "answer": "34"})
    hr = rec("q", "vqa", "rsvqa_hr", {"type": "count", "answer": "34"})
    assert ev.is_bucketed(lr, "34") and not ev.is_bucketed(hr, "34")
    assert ev.is_bucketed(hr, ev.normalize("between 11m2 and 100m2"))


# -----------------------------------------------------------------------------
# VQA: per type, AA vs OA on an unbalanced type mix, counting MAE, buckets, missing / empty / junk

HR = [  # (id, type, GT, prediction or None = missing): exact, contain, |error|
    ("h1", "presence", "yes", "Yes."),                   # 1 1
    ("h2", "presence", "no", "no"),                      # 1 1
    ("h3", "presence", "yes", "I think yes"),            # 0 1
    ("h4", "presence", "no", ""),                        # 0 0   empty answer
    ("h5", "comp", "yes", "no"),                         # 0 0
    ("h6", "comp", "no", None),                          # 0 0   missing
    ("h7", "count", "3", "three"),                       # 1 0   |3-3| = 0
    ("h8", "count", "12", "There are 10 cars."),         # 0 0   |10-12| = 2
    ("h9", "count", "1", "10"),                          # 0 1   |10-1| = 9
    ("h10", "count", "5", "@@##junk"),                   # 0 0   prediction not numeric
]
LR = [
    ("l1", "count", "34", "between 11 and 100"),         # 1 0   pred is a bucket: not numeric
    ("l2", "count", "between 11 and 100", "57"),         # 1 0   GT not numeric
    ("l3", "count", "0", "between 0 and 10"),            # 0 1   pred not numeric
    ("l4", "count", "more than 1000", "1500"),           # 1 0   GT not numeric
    ("l5", "rural_urban", "urban", "Urban."),            # 1 1
    ("l6", "count", "7", "5"),                           # 1 0   |5-7| = 2, same bucket 1-10
]


def vqa_case():
    records = [rec(i, "vqa", "rsvqa_hr", {"type": t, "answer": g}) for i, t, g, _ in HR]
    records += [rec(i, "vqa", "rsvqa_lr", {"type": t, "answer": g}) for i, t, g, _ in LR]
    preds = {i: p for i, _, _, p in HR + LR if p is not None}
    return records, preds


def test_vqa_hand_computed():
    records, preds = vqa_case()
    res = ev.score_vqa(records, preds)
    hr = res["rsvqa_hr"]
    assert hr["n"] == 10 and hr["missing"] == 1 and hr["bucketed"] == 0
    assert hr["types"]["presence"] == {"n": 4, "exact": 50.0, "contain": 75.0}
    assert hr["types"]["comp"] == {"n": 2, "exact": 0.0, "contain": 0.0}
    assert hr["types"]["count"] == {"n": 4, "exact": 25.0, "contain": 25.0}
    # unbalanced mix: AA (mean of per-type) != OA (all correct / all)
    assert hr["exact"]["AA"] == pytest.approx((50 + 0 + 25) / 3) and hr["exact"]["OA"] == pytest.approx(30.0)
    assert hr["contain"]["AA"] == pytest.approx((75 + 0 + 25) / 3) and hr["contain"]["OA"] == pytest.approx(40.0)
    assert hr["count"] == {"n": 4, "numeric": 3, "mae": pytest.approx(11 / 3), "gt_not_numeric": 0,
                           "pred_not_numeric": 1}

    lr = res["rsvqa_lr"]
    assert lr["n"] == 6 and lr["missing"] == 0 and lr["bucketed"] == 5
    assert lr["types"]["count"] == {"n": 5, "exact": 80.0, "contain": 20.0}
    assert lr["exact"]["AA"] == pytest.approx(90.0) and lr["exact"]["OA"] == pytest.approx(500 / 6)
    assert lr["contain"]["AA"] == pytest.approx(60.0) and lr["contain"]["OA"] == pytest.approx(200 / 6)
    assert lr["count"] == {"n": 5, "numeric": 1, "mae": 2.0, "gt_not_numeric": 2, "pred_not_numeric": 2}


def test_vqa_ground_truth_from_assistant_turn_when_meta_lacks_it():
    r = rec("q", "vqa", "d", {"type": "presence"}, answer="Yes")
    assert ev.score_vqa([r], {"q": "yes"})["d"]["exact"]["OA"] == 100.0
    bare = {"id": "q", "task": "vqa", "dataset": "d", "messages": [{"role": "user", "content": "?"}], "meta": {}}
    with pytest.raises(UserError, match=r"^record 'q': vqa record has no ground truth: needs meta\['answer'\]"):
        ev.score_vqa([bare], {})


# -----------------------------------------------------------------------------
# classification


def test_cls_hand_computed():
    classes = ["airport", "dense_residential", "forest"]
    rows = [("c1", "forest", "Forest."),                 # exact, contain; column forest
            ("c2", "forest", "It is a forest"),          # contain only; column (other)
            ("c3", "dense_residential", "dense residential"),  # both; column dense_residential
            ("c4", "airport", "forest"),                 # wrong; column forest
            ("c5", "airport", None)]                     # missing; column (other)
    records = [rec(i, "cls", "aid", {"label": g, "classes": classes}) for i, g, _ in rows]
    records.append(rec("u1", "cls", "ucm", {"label": "beach", "classes": ["beach", "river"]}))
    preds = {i: p for i, _, p in rows if p is not None} | {"u1": "river"}
    res = ev.score_cls(records, preds)
    aid = res["aid"]
    assert aid["n"] == 5 and aid["missing"] == 1
    assert aid["exact"] == 40.0 and aid["contain"] == 60.0
    assert aid["confusion_columns"] == classes + ["(other)"]
    assert aid["confusion"] == [[0, 0, 1, 1],   # airport
                                [0, 1, 0, 0],   # dense_residential
                                [0, 0, 1, 1]]   # forest
    # per dataset, not pooled
    assert res["ucm"]["exact"] == 0.0 and res["ucm"]["confusion"] == [[0, 1, 0], [0, 0, 0]]


# -----------------------------------------------------------------------------
# captioning


def cap_records(rows, dataset):
    return [rec(i, "caption", dataset, {"references": refs}) for i, refs, _ in rows]


def test_caption_hand_computed():
    # one image: "red roof white boat" vs "red roof white car"
    # BLEU-1 = 3/4, BLEU-2 = sqrt(3/4 * 2/3), ROUGE-L = F(P=3/4, R=3/4) = 3/4; BLEU-4 ~ 0 (no 4-gram match).
    # CIDEr-D of a one-image corpus is 0: idf = log(#images / df) = log(1/1) = 0 for every n-gram.
    one = [("i1", ["Red roof, white car."], "red roof white boat")]
    # two images, prediction = reference: cosine 1 for n = 1..4, no length penalty, x10 -> CIDEr-D 10 (1000 x100)
    two = [("p1", ["A plane is parked."], "a plane is parked"),
           ("p2", ["Many green trees near a river!"], "many green trees near a river")]
    rows = one + two
    res = ev.score_captions(cap_records(one, "one") + cap_records(two, "two"),
                            {i: p for i, _, p in rows}, meteor=False)
    assert res["one"]["BLEU-1"] == pytest.approx(75.0, abs=1e-6)
    assert res["one"]["BLEU-2"] == pytest.approx(100 * (0.75 * 2 / 3) ** 0.5, abs=1e-6)
    assert res["one"]["BLEU-4"] < 0.1
    assert res["one"]["ROUGE-L"] == pytest.approx(75.0)
    assert res["one"]["CIDEr-D"] == 0.0
    assert res["one"]["METEOR"] == "skipped: --no-meteor"
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert res["two"][k] == pytest.approx(100.0, abs=1e-6)
    assert res["two"]["CIDEr-D"] == pytest.approx(1000.0)


CAPTIONS = [
    ("k1", ["Many buildings and some green trees are around a playground.",
            "A playground is surrounded by many buildings.", "There is a playground with a red track."],
     "Many buildings are around a playground with green trees"),
    ("k2", ["Several white planes are parked at the airport.", "Some planes are near the terminal."],
     "Some white planes are parked near a terminal."),
    ("k3", ["A river goes through the forest.", "Dark green trees on both sides of a river."],
     ""),                                                          # empty answer
    ("k4", ["Lots of cars are parked in the parking lot."], "<|im_end|> ### 123"),  # junk
    ("k5", ["A bridge is over the river.", "A long bridge crosses a wide river."], None),  # missing
]


def direct_inputs():
    """The same data tokenised independently of eval_vqa: lower-case, non-word characters to spaces."""
    def tok(s):
        return " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())
    gts = {i: [tok(r) for r in refs] for i, refs, _ in CAPTIONS}
    res = {i: [tok(p or "")] for i, _, p in CAPTIONS}
    return gts, res


def test_caption_scores_equal_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = direct_inputs()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    ours = ev.score_captions(cap_records(CAPTIONS, "rsicd"), {i: p for i, _, p in CAPTIONS if p is not None},
                             meteor=False)["rsicd"]
    assert ours["n"] == 5 and ours["missing"] == 1
    for k in range(4):
        assert ours[f"BLEU-{k + 1}"] == pytest.approx(100 * bleu[k], rel=1e-12)
    assert ours["ROUGE-L"] == pytest.approx(100 * rouge, rel=1e-12)
    assert ours["CIDEr-D"] == pytest.approx(100 * cider, rel=1e-12)
    assert 0 < ours["CIDEr-D"] and 0 < ours["BLEU-4"] < ours["BLEU-1"] < 100  # the data is not degenerate


def test_meteor_equals_pycocoevalcap_or_says_skipped(monkeypatch):
    records = cap_records(CAPTIONS[:3], "rsicd")
    preds = {i: p for i, _, p in CAPTIONS[:3]}
    if shutil.which("java") is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        gts, res = direct_inputs()
        gts, res = {k: gts[k] for k in preds}, {k: res[k] for k in preds}
        try:
            direct = Meteor().compute_score(gts, res)[0]
        except Exception as e:
            pytest.skip(f"pycocoevalcap METEOR does not run here: {e}")
        ours = ev.score_captions(records, preds)["rsicd"]["METEOR"]
        assert ours == pytest.approx(100 * direct)
    monkeypatch.setattr(ev.shutil, "which", lambda name: None)
    assert ev.score_captions(records, preds)["rsicd"]["METEOR"] == "skipped: no java"


# -----------------------------------------------------------------------------
# files, bad input and the CLI


def test_cli_prediction_file_problems(tmp_path):
    """Predictions are read by read_predictions (tested in test_model.py); here: what the CLI makes of it."""
    data = write_jsonl(tmp_path / "d.jsonl", [rec("q1", "vqa", "d", {"type": "presence", "answer": "yes"}),
                                              rec(2, "vqa", "d", {"type": "presence", "answer": "no"})])
    argv = ["--data", str(data), "--no-meteor", "--preds"]
    # int ids in either file match; a null text (a refusal) is a wrong answer, not a missing one
    pred = write_jsonl(tmp_path / "p.jsonl", [{"id": "q1", "text": "Yes"}, {"id": "2", "text": None}])
    m = ev.main(argv + [str(pred)])
    assert m["vqa"]["d"]["exact"]["OA"] == 50.0 and m["counts"]["missing"] == 0 and m["counts"]["unknown_ids"] == 0
    # a repeated id is an error naming the file and line, not a silent choice between two answers
    write_jsonl(pred, [{"id": "q1", "text": "yes"}, {"id": 2, "text": "no"}, {"id": "q1", "text": "no"}])
    with pytest.raises(UserError, match=r"p\.jsonl:3: duplicate id 'q1'"):
        ev.main(argv + [str(pred)])
    with pytest.raises(UserError, match=r"--preds .*nope\.jsonl: no such file"):  # not "every answer missing"
        ev.main(argv + [str(tmp_path / "nope.jsonl")])


def test_cli_preds_scoring(tmp_path, capsys):
    records, preds = vqa_case()
    records += [rec("c1", "cls", "aid", {"label": "forest", "classes": ["forest", "river"]}),
                rec("k1", "caption", "rsicd", {"references": ["a river in a forest"]}),
                rec("d1", "det", "dota", {"objects": []}),
                rec("g1", "chat", "sharegpt", {})]
    data = write_jsonl(tmp_path / "val.jsonl", records)
    lines = [{"id": i, "text": t} for i, t in preds.items()]
    lines += [{"id": "c1", "text": "River"}, {"id": "k1", "text": "a forest river"}, {"id": "zz", "text": "?"}]
    pred_file = write_jsonl(tmp_path / "other_model.jsonl", lines)
    out = tmp_path / "out"
    metrics = ev.main(["--preds", str(pred_file), "--data", str(data), "--out", str(out), "--vis", "--no-meteor"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["vqa"] == json.loads(json.dumps(metrics["vqa"]))
    assert saved["vqa"]["rsvqa_hr"]["exact"]["OA"] == pytest.approx(30.0)
    assert saved["cls"]["aid"]["confusion"] == [[0, 1, 0], [0, 0, 0]]
    assert saved["counts"] == {"records": 20, "scored": 18, "missing": 1, "unknown_ids": 1,
                               "skipped": {"chat": 1, "det": 1}}
    assert saved["args"]["preds"] == str(pred_file) and saved["args"]["vis"] is True
    assert "contain" in saved["rules"] and "RSCoVLM" in saved["rules"]["contain"]
    assert (out / "confusion_aid.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "[vqa] rsvqa_hr" in table and re.search(r"AA\s+25\.00\s+33\.33", table)
    assert "unknown prediction ids 1" in table

    # --tasks and --limit select records; --json-out alone writes only the JSON
    only = ev.main(["--preds", str(pred_file), "--data", str(data), "--tasks", "cls", "--no-meteor",
                    "--json-out", str(tmp_path / "m.json")])
    assert set(only) & {"vqa", "cls", "caption"} == {"cls"} and (tmp_path / "m.json").exists()


def test_cli_argument_errors(tmp_path):
    for argv in (["--data", "x"], ["--data", "x", "--ckpt", "c", "--preds", "p"], ["--data", "x", "--ckpt", "c"],
                 ["--data", "x", "--preds", "p", "--vis"], ["--data", "x", "--preds", "p", "--tasks", "det"],
                 ["--data", "x", "--preds", "p", "--limit", "-1"]):
        with pytest.raises(SystemExit):
            ev.parse_args(argv)


# -----------------------------------------------------------------------------
# The CLI: every user mistake is one line on stderr naming the input, exit code 2

REPO = Path(__file__).resolve().parents[1]

# name -> (command line, what the one error line must contain); {d} is the folder bad_inputs() fills
BAD_INPUTS = {
    "data_folder": ("--data {d}/only --preds {d}/p.jsonl", ["{d}/only is a folder", "{d}/only/val.jsonl"]),
    "data_missing": ("--data {d}/nope.jsonl --preds {d}/p.jsonl", ["{d}/nope.jsonl", "not found"]),
    "data_empty": ("--data {d}/empty.jsonl --preds {d}/p.jsonl", ["{d}/empty.jsonl", "no records"]),
    "data_det_only": ("--data {d}/det_only.jsonl --preds {d}/p.jsonl", ["{d}/det_only.jsonl", "1 det", "eval_det.py"]),
    "tasks_select_none": ("--data {d}/val.jsonl --preds {d}/p.jsonl --tasks caption", ["{d}/val.jsonl", "caption",
                                                                                       "2 vqa", "1 cls", "--tasks"]),
    "record_without_gt": ("--data {d}/nogt.jsonl --preds {d}/p.jsonl", ["{d}/nogt.jsonl:2", "record 'c2'", "meta['label']"]),
    "preds_folder": ("--data {d}/val.jsonl --preds {d}/run", ["--preds {d}/run is a folder", "{d}/run/predictions.jsonl"]),
    "preds_missing": ("--data {d}/val.jsonl --preds {d}/nope.jsonl", ["--preds {d}/nope.jsonl: no such file"]),
    "preds_empty": ("--data {d}/val.jsonl --preds {d}/empty.jsonl", ["{d}/empty.jsonl", "no predictions"]),
    "preds_other_ids": ("--data {d}/val.jsonl --preds {d}/other.jsonl", ["{d}/other.jsonl", "{d}/val.jsonl", "'z1'", "'q1'"]),
    "preds_bad_line": ("--data {d}/val.jsonl --preds {d}/bad.jsonl", ["{d}/bad.jsonl:1", "bad JSON"]),
    "ckpt_missing": ("--data {d}/val.jsonl --ckpt {d}/nope --out {d}/o", ["--ckpt {d}/nope: no such folder"]),
    "ckpt_not_ckpt": ("--data {d}/val.jsonl --ckpt {d}/ckpts --out {d}/o", ["--ckpt {d}/ckpts", "no config.json",
                                                                           "{d}/ckpts/run1"]),
    "out_is_file": ("--data {d}/val.jsonl --preds {d}/p.jsonl --out {d}/p.jsonl", ["--out {d}/p.jsonl is a file"]),
    "json_out_is_folder": ("--data {d}/val.jsonl --preds {d}/p.jsonl --json-out {d}", ["--json-out {d} is a folder"]),
}
GOOD = "--data {d}/val.jsonl --preds {d}/p.jsonl --no-meteor"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """One folder with every file BAD_INPUTS needs (GOOD scores: see test_cli_script)."""
    d = tmp_path_factory.mktemp("bad")
    for name in ("only", "run", "ckpts/run1"):
        (d / name).mkdir(parents=True)
    records = [rec("q1", "vqa", "d", {"type": "presence", "answer": "yes"}), rec("q2", "vqa", "d", {"type": "presence"}),
               rec("c1", "cls", "aid", {"label": "forest", "classes": ["forest", "river"]})]
    write_jsonl(d / "val.jsonl", records)
    write_jsonl(d / "only" / "val.jsonl", records)
    write_jsonl(d / "p.jsonl", [{"id": "q1", "text": "yes"}, {"id": "c1", "text": "river"}])
    write_jsonl(d / "run" / "predictions.jsonl", [{"id": "q1", "text": "yes"}])
    write_jsonl(d / "run" / "other.jsonl", [{"id": "q1", "text": "yes"}])
    write_jsonl(d / "other.jsonl", [{"id": "z1", "text": "yes"}])
    (d / "bad.jsonl").write_text("{'id': 'q1', 'text': 'yes'}\n")
    (d / "empty.jsonl").write_text("")
    write_jsonl(d / "det_only.jsonl", [rec("d1", "det", "dota", {"width": 10, "height": 10})])
    write_jsonl(d / "nogt.jsonl", [records[2], {**rec("c2", "cls", "aid", {"classes": ["forest"]}), "messages": [
        {"role": "user", "content": "<image>Classify."}]}])
    (d / "ckpts" / "run1" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    return d


def run_script(argv):
    return cli_helpers.run_script("eval_vqa.py", argv)


def run_main(argv, monkeypatch, capsys):
    return cli_helpers.run_main("eval_vqa.py", ev.main, argv, monkeypatch, capsys)


one_error_line = cli_helpers.one_error_line


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(case, bad_inputs, monkeypatch, capsys):
    argv, names = BAD_INPUTS[case]
    d = bad_inputs
    one_error_line(run_main(argv.format(d=d).split(), monkeypatch, capsys), [n.format(d=d) for n in names])


def test_cli_script(bad_inputs):
    """The script itself (its __main__ uses run_cli): GOOD scores, bad inputs end in one line with exit 2
    and no traceback, --debug brings the traceback back."""
    d = bad_inputs
    cases = ("data_det_only", "preds_other_ids")
    argvs = [GOOD.format(d=d).split()] + [BAD_INPUTS[c][0].format(d=d).split() for c in cases]
    argvs += [f"--data {d}/nope.jsonl --preds {d}/p.jsonl --debug".split()]
    with ThreadPoolExecutor(2) as pool:  # each run pays ~2 s of imports
        (ok, *bad, debug) = pool.map(run_script, argvs)
    assert ok[0] == 0 and "[vqa] d" in ok[1], ok
    for case, res in zip(cases, bad):
        one_error_line(res, [n.format(d=d) for n in BAD_INPUTS[case][1]])
    assert debug[0] == 1 and "Traceback" in debug[2] and "UserError" in debug[2] and f"{d}/nope.jsonl" in debug[2]


def test_cli_missing_or_unreadable_image_names_the_record(tiny_qwen25, tmp_path, monkeypatch, capsys):
    from PIL import Image

    Image.new("RGB", (56, 56), (40, 120, 60)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    recs = [{**rec(f"v{i}", "vqa", "d", {"type": "presence", "answer": "yes"}), "images": [img]}
            for i, img in enumerate(["ok.png", "gone.png", "broken.png"])]
    data = write_jsonl(tmp_path / "val.jsonl", recs)
    argv = ["--ckpt", tiny_qwen25, "--data", data, "--out", tmp_path / "out", "--max-new-tokens", "2"]
    # a missing file: found before the model loads; one line with the record's file:line and id
    one_error_line(run_script(argv), [f"{data}:2 (record 'v1')", "gone.png", "not found"])
    # an unreadable one is found when generation loads it (model.py; run in-process, the model load is the slow
    # part): after the progress bars on stderr, the last line names the record, no traceback
    write_jsonl(data, [recs[0], recs[2]])
    code, _, err = run_main(argv, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and last.startswith("error: "), err
    assert f"{data}:2 (record 'v2')" in last and "broken.png" in last


# -----------------------------------------------------------------------------
# end to end with a tiny checkpoint: interrupted + resumed == one uninterrupted run


def test_ckpt_run_resumes_to_the_same_metrics(tmp_path, tiny_qwen25, capsys):
    from PIL import Image

    Image.new("RGB", (56, 56), (40, 120, 60)).save(tmp_path / "img.png")
    q = "<image>Is there a ship in the image? Answer the question using a single word or phrase."
    records = [rec("v1", "vqa", "rsvqa_hr", {"type": "presence", "answer": "yes"}, question=q),
               rec("v2", "vqa", "rsvqa_hr", {"type": "count", "answer": "3"}, question="<image>How many vehicles are there?"),
               rec("c1", "cls", "aid", {"label": "forest", "classes": ["forest", "river"]},
                   question="<image>Classify the image from the following classes: forest, river."),
               rec("k1", "caption", "rsicd", {"references": ["a satellite image with a forest"]},
                   question="<image>Describe the image.")]
    data = write_jsonl(tmp_path / "val.jsonl", records)
    argv = ["--ckpt", tiny_qwen25, "--data", str(data), "--max-new-tokens", "8", "--batch-size", "1", "--no-meteor"]

    def strip(m):  # the scores (a --preds run knows only the limit of the generation settings)
        return {k: v for k, v in m.items() if k not in ("args", "seconds", "generation")}

    full = ev.main(argv + ["--out", str(tmp_path / "full")])
    pred_lines = (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(l)["id"] for l in pred_lines) == ["c1", "k1", "v1", "v2"]
    assert full["counts"]["missing"] == 0 and full["counts"]["scored"] == 4
    assert "_where" not in "".join(p.read_text() for p in (tmp_path / "full").iterdir())  # nothing internal leaks

    # interrupted after one answer: the first line survives, the rest is generated on the re-run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "predictions.jsonl").write_text(pred_lines[0] + "\n")
    capsys.readouterr()
    resumed = ev.main(argv + ["--out", str(resumed_dir)])
    assert f"4 records: 1 already predicted in {resumed_dir / 'predictions.jsonl'}, 3 to generate" in capsys.readouterr().out
    assert strip(resumed) == strip(full)
    got = [json.loads(l) for l in (resumed_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(got) == 4 and {g["id"]: g["text"] for g in got} == {json.loads(l)["id"]: json.loads(l)["text"] for l in pred_lines}

    # the file eval_vqa wrote scores the same through --preds (no model)
    rescored = ev.main(["--preds", str(resumed_dir / "predictions.jsonl"), "--data", str(data), "--no-meteor"])
    assert strip(rescored) == strip(full)


def test_resume_with_scripted_answers(tmp_path, tiny_qwen25, monkeypatch, capsys):
    """The tiny random model answers only whitespace, so script the answers (model.generate replaced) to
    check that a resumed run generates only what is missing and scores non-trivial answers identically."""
    from PIL import Image

    import model

    Image.new("RGB", (56, 56), (40, 120, 60)).save(tmp_path / "img.png")
    records = [rec("v1", "vqa", "rsvqa_hr", {"type": "presence", "answer": "yes"}),
               rec("v2", "vqa", "rsvqa_hr", {"type": "count", "answer": "3"}),
               rec("c1", "cls", "aid", {"label": "forest", "classes": ["forest", "river"]}),
               rec("k1", "caption", "rsicd", {"references": ["a satellite image with a forest", "green trees"]}),
               rec("k2", "caption", "rsicd", {"references": ["a river next to a road"]})]
    data = write_jsonl(tmp_path / "val.jsonl", records)
    answers = {"v1": "Yes.", "v2": "two", "c1": "Forest", "k1": "a satellite image of a forest",
               "k2": "a road near the river"}
    calls = []

    def scripted(net, processor, recs, batch_size=8, max_new_tokens=512, backend="fast", details=False, vllm_args=None):
        calls.extend(r["id"] for r in recs)
        return [{"text": answers[r["id"]], "new_tokens": 3, "cut": False} if details else answers[r["id"]] for r in recs]

    monkeypatch.setattr(model, "generate", scripted)
    argv = ["--ckpt", tiny_qwen25, "--data", str(data), "--batch-size", "2", "--no-meteor"]
    full = ev.main(argv + ["--out", str(tmp_path / "full")])
    assert sorted(calls) == sorted(answers)
    assert full["vqa"]["rsvqa_hr"]["types"]["presence"]["exact"] == 100.0
    assert full["vqa"]["rsvqa_hr"]["count"]["mae"] == 1.0
    assert full["cls"]["aid"]["exact"] == 100.0 and full["caption"]["rsicd"]["BLEU-1"] > 50

    first = (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()[0]
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "predictions.jsonl").write_text(first + "\n" + first[:15])  # + a cut-off line
    calls.clear()
    resumed = ev.main(argv + ["--out", str(tmp_path / "resumed")])
    assert sorted(calls) == sorted(set(answers) - {json.loads(first)["id"]})  # only the missing ones
    calls.clear()
    capsys.readouterr()
    ev.main(argv + ["--out", str(tmp_path / "resumed")])  # nothing left: says so, generates nothing
    assert calls == [] and "5 records: 5 already predicted in " in capsys.readouterr().out
    drop = ("args", "seconds")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in full.items() if k not in drop}


# -----------------------------------------------------------------------------
# answer length: answers cut at --max-new-tokens, --max-new-tokens auto, --backend


scripted_generate = cli_helpers.scripted_generate


LONG_CAPTION = "a satellite image of a dense forest with a river, a road and several buildings near the river"


def length_case(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56), (40, 120, 60)).save(tmp_path / "img.png")
    records = [rec("v1", "vqa", "rsvqa_hr", {"type": "presence", "answer": "yes"}, answer="yes"),
               rec("v2", "vqa", "rsvqa_hr", {"type": "count", "answer": "3"}, answer="3"),
               rec("c1", "cls", "aid", {"label": "forest", "classes": ["forest", "river"]}, answer="forest"),
               rec("k1", "caption", "rsicd", {"references": ["a forest", LONG_CAPTION]}, answer="a forest")]
    answers = {"v1": "Yes.", "v2": "3", "c1": "Forest", "k1": LONG_CAPTION}
    return write_jsonl(tmp_path / "val.jsonl", records), answers


def test_answers_longer_than_the_limit_are_counted_as_cut_and_warned(tmp_path, tiny_qwen25, monkeypatch, capsys):
    data, answers = length_case(tmp_path)
    tok = model.load_processor(tiny_qwen25).tokenizer
    need = {k: len(tok.encode(a, add_special_tokens=False)) + 1 for k, a in answers.items()}
    limit = max(need[k] for k in ("v1", "v2", "c1"))
    assert need["k1"] > limit  # only the caption needs more than the limit
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(answers, calls))
    capsys.readouterr()
    m = ev.main(["--ckpt", tiny_qwen25, "--data", str(data), "--out", str(tmp_path / "out"), "--no-meteor",
                 "--max-new-tokens", str(limit)])
    out, err = capsys.readouterr()
    assert {c["max_new_tokens"] for c in calls} == {limit} and {c["backend"] for c in calls} == {"fast"}
    assert (m["vqa"]["rsvqa_hr"]["cut"], m["cls"]["aid"]["cut"], m["caption"]["rsicd"]["cut"]) == (0, 0, 1)
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "caption/rsicd: 1 of 1 answers hit the generation limit" in warnings[0]
    assert f"of {limit} tokens" in warnings[0] and "--max-new-tokens" in warnings[0]
    assert "[vqa] rsvqa_hr  n=2 missing=0 bucketed=0 cut=0" in out
    assert re.search(r"\nrsicd .* 1\n", out) and re.search(r"\naid .* 0 +0\n", out)  # the cut columns
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["caption"]["rsicd"]["cut"] == 1 and saved["generation"]["max_new_tokens"] == limit

    # another model's file (no "cut"): unknown everywhere, no warning
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": k, "text": v} for k, v in answers.items()])
    capsys.readouterr()
    m = ev.main(["--preds", str(other), "--data", str(data), "--no-meteor", "--json-out", str(tmp_path / "o.json")])
    out, err = capsys.readouterr()
    assert {m[t][d]["cut"] for t, d in (("vqa", "rsvqa_hr"), ("cls", "aid"), ("caption", "rsicd"))} == {"unknown"}
    assert "cut=unknown" in out and "WARNING" not in err
    assert json.loads((tmp_path / "o.json").read_text())["cls"]["aid"]["cut"] == "unknown"


def test_max_new_tokens_auto_and_backend_reach_predict(tmp_path, tiny_qwen25, monkeypatch, capsys):
    data, answers = length_case(tmp_path)
    tok = model.load_processor(tiny_qwen25).tokenizer
    refs = ["yes", "3", "forest", "a forest", LONG_CAPTION]  # assistant turns and caption references
    longest = max(len(tok.encode(a, add_special_tokens=False)) + 1 for a in refs)  # + <|im_end|>
    calls = []
    monkeypatch.setattr(model, "generate", scripted_generate(answers, calls))
    capsys.readouterr()
    m = ev.main(["--ckpt", tiny_qwen25, "--data", str(data), "--out", str(tmp_path / "out"), "--no-meteor",
                 "--max-new-tokens", "auto", "--backend", "hf"])
    out, err = capsys.readouterr()
    (n,) = {c["max_new_tokens"] for c in calls}
    assert n >= longest and {c["backend"] for c in calls} == {"hf"} and f"--max-new-tokens auto = {n}" in out
    assert json.loads((tmp_path / "out" / "predictions.jsonl.settings.json").read_text())["max_new_tokens"] == n
    assert m["generation"] == {"max_new_tokens": n, "requested": "auto", "how": m["generation"]["how"], "backend": "hf"}
    assert m["caption"]["rsicd"]["cut"] == 0 and "WARNING" not in err
    with pytest.raises(SystemExit):
        ev.parse_args(["--data", "x", "--preds", "p", "--max-new-tokens", "0"])
    assert ev.parse_args(["--data", "x", "--preds", "p"]).max_new_tokens == 128
