"""eval_vqa.py: every metric against hand-computed values, captions against pycocoevalcap called directly,
bad inputs, the CLI, and an interrupted + resumed evaluation on a tiny checkpoint."""
import functools
import json
import re
import shutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

import cli_helpers
import common
import eval_vqa as ev
import model
from common import UserError


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
    assert hr["types"]["presence"] == {"n": 4, "exact": 2 / 4, "contain": 3 / 4}
    assert hr["types"]["comp"] == {"n": 2, "exact": 0.0, "contain": 0.0}
    assert hr["types"]["count"] == {"n": 4, "exact": 1 / 4, "contain": 1 / 4}
    # unbalanced mix: AA (mean of per-type) != OA (all correct / all)
    assert hr["exact"]["AA"] == pytest.approx((2 / 4 + 0 + 1 / 4) / 3) and hr["exact"]["OA"] == pytest.approx(3 / 10)
    assert hr["contain"]["AA"] == pytest.approx((3 / 4 + 0 + 1 / 4) / 3) and hr["contain"]["OA"] == pytest.approx(4 / 10)
    assert hr["count"] == {"n": 4, "numeric": 3, "mae": pytest.approx(11 / 3), "gt_not_numeric": 0,
                           "pred_not_numeric": 1}

    lr = res["rsvqa_lr"]
    assert lr["n"] == 6 and lr["missing"] == 0 and lr["bucketed"] == 5
    assert lr["types"]["count"] == {"n": 5, "exact": 4 / 5, "contain": 1 / 5}
    assert lr["exact"]["AA"] == pytest.approx((4 / 5 + 1) / 2) and lr["exact"]["OA"] == pytest.approx(5 / 6)
    assert lr["contain"]["AA"] == pytest.approx((1 / 5 + 1) / 2) and lr["contain"]["OA"] == pytest.approx(2 / 6)
    assert lr["count"] == {"n": 5, "numeric": 1, "mae": 2.0, "gt_not_numeric": 2, "pred_not_numeric": 2}


def test_vqa_ground_truth_from_assistant_turn_when_meta_lacks_it():
    r = rec("q", "vqa", "d", {"type": "presence"}, answer="Yes")
    assert ev.score_vqa([r], {"q": "yes"})["d"]["exact"]["OA"] == 1.0
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
    assert aid["exact"] == 2 / 5 and aid["contain"] == 3 / 5
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
    # Fractions, as pycocoevalcap gives them. BLEU-1 = 3/4, BLEU-2 = sqrt(3/4 * 2/3), ROUGE-L = F(P=3/4, R=3/4) = 3/4;
    # BLEU-4 ~ 0 (no 4-gram match).
    # CIDEr-D of a one-image corpus is 0: idf = log(#images / df) = log(1/1) = 0 for every n-gram.
    one = [("i1", ["Red roof, white car."], "red roof white boat")]
    # two images, prediction = reference: cosine 1 for n = 1..4, no length penalty, x10 (pycocoevalcap's) -> CIDEr-D 10
    two = [("p1", ["A plane is parked."], "a plane is parked"),
           ("p2", ["Many green trees near a river!"], "many green trees near a river")]
    rows = one + two
    res = ev.score_captions(cap_records(one, "one") + cap_records(two, "two"),
                            {i: p for i, _, p in rows}, meteor=False)
    assert res["one"]["BLEU-1"] == pytest.approx(0.75, abs=1e-8)
    assert res["one"]["BLEU-2"] == pytest.approx((0.75 * 2 / 3) ** 0.5, abs=1e-8)
    assert res["one"]["BLEU-4"] < 0.001
    assert res["one"]["ROUGE-L"] == pytest.approx(0.75)
    assert res["one"]["CIDEr-D"] == 0.0
    assert res["one"]["METEOR"] == "skipped: --no-meteor"
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert res["two"][k] == pytest.approx(1.0, abs=1e-8)
    assert res["two"]["CIDEr-D"] == pytest.approx(10.0)


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
        assert ours[f"BLEU-{k + 1}"] == bleu[k]  # pycocoevalcap's numbers as it gives them
    assert ours["ROUGE-L"] == rouge and ours["CIDEr-D"] == cider
    assert 0 < ours["CIDEr-D"] and 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1  # the data is not degenerate


@pytest.mark.slow  # METEOR's Java start (its paraphrase tables): 10-30 s
def test_meteor_equals_pycocoevalcap(monkeypatch):
    """score_captions' METEOR equals pycocoevalcap's on the inputs pycocoevalcap's own evaluation makes. One Java
    process serves both (each start loads the paraphrase tables): score_captions gets the same scorer."""
    if shutil.which("java") is None:
        pytest.skip("no java: METEOR is skipped (test_meteor_without_java_says_skipped)")
    from pycocoevalcap.meteor.meteor import Meteor

    records = cap_records(CAPTIONS[:3], "rsicd")
    preds = {i: p for i, _, p in CAPTIONS[:3]}
    gts, res = direct_inputs()
    gts, res = {k: gts[k] for k in preds}, {k: res[k] for k in preds}
    try:
        meteor = Meteor()
        direct = meteor.compute_score(gts, res)[0]
    except Exception as e:
        pytest.skip(f"pycocoevalcap METEOR does not run here: {e}")
    monkeypatch.setattr(ev, "start_meteor", lambda: (meteor, None))
    assert ev.score_captions(records, preds)["rsicd"]["METEOR"] == direct


def test_meteor_without_java_says_skipped(monkeypatch):
    monkeypatch.setattr(ev.shutil, "which", lambda name: None)
    res = ev.score_captions(cap_records(CAPTIONS[:3], "rsicd"), {i: p for i, _, p in CAPTIONS[:3]})["rsicd"]
    assert res["METEOR"] == "skipped: no java" and res["BLEU-1"] > 0


# -----------------------------------------------------------------------------
# LRS-VQA's WordNet rule, with a tiny stand-in for NLTK's WordNet (nltk and its corpus need not be installed)


class FakeWordNet:
    """nltk.corpus.wordnet's two calls the rule makes: synsets(word), and path_similarity between synsets.
    As in WordNet 3.0, "car" and "automobile" share car.n.01 and "grey" is a spelling of "gray"."""
    SYNSETS = {"car": ["car.n.01", "car.n.02"], "automobile": ["car.n.01"], "gray": ["gray.n.01"], "grey": ["gray.n.01"],
               "white": ["white.n.01"], "yellow": ["yellow.n.01"], "ivory": ["ivory.n.01"]}
    SIMILAR = {frozenset(["white.n.01", "ivory.n.01"]): 0.8}  # close, but the rule needs > 0.8

    class Synset:
        def __init__(self, name):
            self.name = name

        def path_similarity(self, other):
            return 1.0 if self.name == other.name else FakeWordNet.SIMILAR.get(frozenset([self.name, other.name]), 0.1)

    def synsets(self, word):
        return [self.Synset(n) for n in self.SYNSETS.get(word, [])]


def test_lrs_vqa_wordnet_rule_with_a_stand_in_wordnet(monkeypatch):
    wn = FakeWordNet()
    assert ev.lrs_match("Automobile.", "car", wn) and ev.lrs_match("grey", "Gray", wn)  # synonyms after lrs_clean
    assert not ev.lrs_match("ivory", "white", wn)  # path similarity 0.8 is not > 0.8
    assert not ev.lrs_match("yellow", "white", wn) and not ev.lrs_match("", "gray", wn)
    assert ev.lrs_match("White.", "white", None) and not ev.lrs_match("automobile", "car", None)  # no WordNet: equality
    recs = [{"id": str(i), "task": "vqa", "dataset": "lrs_vqa", "messages": [],
             "meta": {"answer": gt, "type": t, "source": "FAIR", "benchmark": "lrs_vqa"}}
            for i, (gt, t) in enumerate([("gray", "color"), ("car", "category"), ("white", "color")])]
    monkeypatch.setattr(ev, "_WORDNET", [(wn, "a stand-in WordNet")])
    res = ev.evaluate(recs, {"0": "Grey.", "1": "automobile", "2": "ivory"})
    lrs = res["lrs_vqa"]["lrs_vqa"]
    assert lrs["synonyms"] and lrs["rscovlm"]["overall"] == pytest.approx(2 / 3)  # "ivory" is not "white"
    assert lrs["rscovlm"]["tasks"] == {"category": 1.0, "color": 0.5}
    assert lrs["official"]["overall"] == pytest.approx(1 / 3)  # the official rule keeps "grey."'s '.': no synset
    assert lrs["wordnet"] == "a stand-in WordNet"  # the metrics say which WordNet was used


def test_load_wordnet_says_why_there_is_none(monkeypatch):
    monkeypatch.setattr(ev, "_WORDNET", [])
    monkeypatch.setitem(sys.modules, "nltk", None)  # not installed: importing it fails
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    assert ev.load_wordnet() == (None, "nltk is not installed (pip install nltk, then nltk.download('wordnet'))")
    # installed, but its 'wordnet' corpus not downloaded: NLTK's lazy loader raises LookupError
    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = types.SimpleNamespace(ensure_loaded=lambda: (_ for _ in ()).throw(LookupError("Resource wordnet not found")))
    monkeypatch.setitem(sys.modules, "nltk", types.ModuleType("nltk"))
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    monkeypatch.setattr(ev, "_WORDNET", [])
    wn, why = ev.load_wordnet()
    assert wn is None and "nltk.download('wordnet')" in why and "not downloaded" in why
    assert ev.load_wordnet() == (wn, why)  # once per process


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
    assert m["vqa"]["d"]["exact"]["OA"] == 0.5 and m["counts"]["missing"] == 0 and m["counts"]["unknown_ids"] == 0
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
    assert saved["vqa"]["rsvqa_hr"]["exact"]["OA"] == pytest.approx(3 / 10)
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


def test_cli_argument_errors():
    """Flags argparse checks: one UserError line (run_cli prints it, exit 2) naming the flag and what to give."""
    for argv, names in ((["--data", "x"], ["--ckpt", "--preds"]), (["--data", "x", "--ckpt", "c", "--preds", "p"], ["--preds"]),
                        (["--data", "x", "--ckpt", "c"], ["--ckpt needs --out"]),
                        (["--data", "x", "--preds", "p", "--vis"], ["--vis needs --out"]),
                        (["--data", "x", "--preds", "p", "--tasks", "det"], ["--tasks", "vqa,cls,caption"]),
                        (["--data", "x", "--preds", "p", "--limit", "-1"], ["--limit", "'-1'"]),
                        (["--data", "x", "--preds", "p", "--dtype", "bfloat16"], ["--dtype", "did you mean 'bf16'?"]),
                        (["--data", "x", "--preds", "p", "--attn", "sdap"], ["--attn", "did you mean 'sdpa'?"])):
        with pytest.raises(UserError) as e:
            ev.get_args(argv)
        assert all(n in str(e.value) for n in names), (argv, str(e.value))
    assert ev.get_args(["--data", "x", "--preds", "p", "--dtype", "bf16"]).dtype == "bf16"  # train.py's spelling


# -----------------------------------------------------------------------------
# The CLI: every user mistake is one line on stderr naming the input, exit code 2

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
    "ckpt_training": ("--data {d}/val.jsonl --ckpt {d}/train/ckpt/step_00000004 --out {d}/o",
                      ["--ckpt {d}/train/ckpt/step_00000004", "training checkpoint", "{d}/train/export/step_4",
                       "{d}/train/final"]),
    "dtype_typo": ("--data {d}/val.jsonl --preds {d}/p.jsonl --dtype bf61", ["--dtype", "'bf61'", "did you mean 'bf16'?"]),
    "attn_typo": ("--data {d}/val.jsonl --preds {d}/p.jsonl --attn sdap", ["--attn", "'sdap'", "did you mean 'sdpa'?"]),
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
    cli_helpers.training_run(d / "train")
    return d


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2(case, bad_inputs, monkeypatch, capsys):
    argv, names = BAD_INPUTS[case]
    d = bad_inputs
    result = cli_helpers.run_main("eval_vqa.py", ev.main, argv.format(d=d).split(), monkeypatch, capsys)
    cli_helpers.one_error_line(result, [n.format(d=d) for n in names])


def test_cli_script(bad_inputs):
    """The script itself (its __main__ uses run_cli): GOOD scores, bad inputs (a bad flag value too) end in one
    line with exit 2 and no traceback, --debug brings the traceback back."""
    d = bad_inputs
    cases = ("data_det_only", "dtype_typo")
    argvs = [GOOD.format(d=d).split()] + [BAD_INPUTS[c][0].format(d=d).split() for c in cases]
    argvs += [f"--data {d}/nope.jsonl --preds {d}/p.jsonl --debug".split()]
    with ThreadPoolExecutor(2) as pool:
        (ok, *bad, debug) = pool.map(lambda argv: cli_helpers.run_script("eval_vqa.py", argv), argvs)
    assert ok[0] == 0 and "[vqa] d" in ok[1], ok
    for case, res in zip(cases, bad):
        cli_helpers.one_error_line(res, [n.format(d=d) for n in BAD_INPUTS[case][1]])
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
    with monkeypatch.context() as m:
        m.setattr(model, "load_for_generation", lambda *a, **k: pytest.fail("the model loaded before the images were checked"))
        cli_helpers.one_error_line(cli_helpers.run_main("eval_vqa.py", ev.main, argv, monkeypatch, capsys),
                                   [f"{data}:2 (record 'v1')", "gone.png", "not found"])
    # an unreadable one is found when generation loads it (model.py): the last line names the record, no traceback
    write_jsonl(data, [recs[0], recs[2]])
    code, _, err = cli_helpers.run_main("eval_vqa.py", ev.main, argv, monkeypatch, capsys)
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
    # a log file (capsys: not a terminal) gets plain progress lines; every 30 s, here after every batch
    monkeypatch.setattr(model, "Progress", functools.partial(common.Progress, every=0))
    argv = ["--ckpt", tiny_qwen25, "--data", str(data), "--batch-size", "2", "--no-meteor"]
    capsys.readouterr()
    full = ev.main(argv + ["--out", str(tmp_path / "full")])
    assert sorted(calls) == sorted(answers)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predict: ")]
    assert [line.split(",")[0] for line in progress] == ["predict: 2/5 (40%)", "predict: 4/5 (80%)",
                                                         "predict: 5/5 (100%)", "predict: 5/5 (100%)"]
    assert full["vqa"]["rsvqa_hr"]["types"]["presence"]["exact"] == 1.0
    assert full["vqa"]["rsvqa_hr"]["count"]["mae"] == 1.0
    assert full["cls"]["aid"]["exact"] == 1.0 and full["caption"]["rsicd"]["BLEU-1"] > 0.5

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
    with pytest.raises(UserError, match="--max-new-tokens"):
        ev.get_args(["--data", "x", "--preds", "p", "--max-new-tokens", "0"])
    assert ev.get_args(["--data", "x", "--preds", "p"]).max_new_tokens == 128
