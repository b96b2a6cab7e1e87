"""eval_suite.py: two small synthetic benchmarks (det and vqa, synth.py data) scored by the tiny models through
eval_det.py / eval_vqa.py, interrupted and resumed, side by side for two checkpoints, under torchrun, and its input
errors; --watch: every checkpoint of a training run, in step order, as it appears, resumable."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import boxes
import cli_helpers
import eval_det
import eval_suite
import eval_vqa
import model
import synth
from cli_helpers import REPO, one_error_line, run_main
from common import UserError, read_records


# The tiny random models answer "" to everything; so that the table holds numbers other than 0, generate gives
# (after the real model has run) the ground truth for some records: det_val_00000 and det_val_00001 get their
# objects, every presence question and the count question of val_00000 the right answer.
RIGHT = ("det_val_00000", "det_val_00001", "vqa_val_00000_presence", "vqa_val_00001_presence",
         "vqa_val_00002_presence", "vqa_val_00000_count")


def install_fake_answers(log=None, stop_after_vqa=None):
    """model.generate -> the real answers with RIGHT replaced by the truth. log: a list the ids generated go to.
    stop_after_vqa: raise (an interruption) once that many vqa records have been answered."""
    real = model.generate

    def generate(net, processor, records, *a, **k):
        done_vqa = sum(i.startswith("vqa") for i in log or [])
        if stop_after_vqa is not None and any(r["task"] == "vqa" for r in records) and done_vqa >= stop_after_vqa:
            raise RuntimeError("interrupted")
        answers = real(net, processor, records, *a, **k)
        for r, ans in zip(records, answers):
            if log is not None:
                log.append(r["id"])
            if r["id"] in RIGHT:
                m = r["meta"]
                ans["text"] = (m["answer"] if r["task"] == "vqa" else boxes.render_answer(
                    m["objects"], m["width"], m["height"], **model.coord_kwargs(processor, m["width"], m["height"])))
        return answers

    model.generate = generate
    return real


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.main(["data", "--out", str(root), "--train", "0", "--val", "3"])
    return root


@pytest.fixture(scope="module")
def bench(synth_data, tmp_path_factory):
    """A folder of two benchmarks: synth_det_val (3 det records) and synth_vqa_val (9 vqa records)."""
    root = synth_data
    bench = tmp_path_factory.mktemp("bench")
    shutil.copytree(root / "images", bench / "images")
    for name in ("synth_det_val.jsonl", "synth_vqa_val.jsonl"):
        shutil.copy(root / name, bench / name)
    return bench


def suite_args(ckpts, bench, out, *extra):
    # batch 1: a resumed record sees the same computation as in one go
    return ["--ckpt", *map(str, ckpts), "--bench", str(bench), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "1", *extra]


@pytest.fixture(scope="module")
def full_run(tiny_qwen3, bench, tmp_path_factory):
    """The suite in one go on the tiny Qwen3-VL model: (OUT, the ids generated)."""
    out, log = tmp_path_factory.mktemp("full") / "out", []
    real = install_fake_answers(log)
    try:
        eval_suite.main(suite_args([tiny_qwen3], bench, out))
    finally:
        model.generate = real
    return out, log


def read(path):
    return json.loads(Path(path).read_text())


def test_suite_json_equals_each_benchmarks_metrics_json(full_run):
    out, log = full_run
    assert sorted(log) == sorted({*log}) and len(log) == 12  # every record answered once
    suite = read(out / "qwen3" / "suite.json")
    det = read(out / "qwen3" / "synth_det_val" / "eval_det" / "metrics.json")
    vqa = read(out / "qwen3" / "synth_vqa_val" / "eval_vqa" / "metrics.json")
    value = {r["metric"]: r["value"] for r in suite["rows"]}
    n = {r["metric"]: r["n"] for r in suite["rows"]}
    # both scripts' fractions x 100; n = the records scored
    assert value == {"det/synth: mAP": 100 * det["det"]["synth"]["mAP"],
                     "det/synth: mAP_hbb": 100 * det["det"]["synth"]["hbb"]["mAP"],
                     "det/synth: mF1": 100 * det["det"]["synth"]["mF1"],
                     "vqa/synth: OA": 100 * vqa["vqa"]["synth"]["exact"]["OA"],
                     "vqa/synth: AA": 100 * vqa["vqa"]["synth"]["exact"]["AA"],
                     "vqa/synth: OA contain": 100 * vqa["vqa"]["synth"]["contain"]["OA"]}
    assert value["det/synth: mAP"] == 100 * det["headline"]["det/synth: mAP"]
    assert vqa["headline"]["vqa/synth: OA"] == pytest.approx(4 / 9)  # 3 presence + 1 count
    assert value["vqa/synth: OA"] == 100 * vqa["headline"]["vqa/synth: OA"]
    assert 0 < value["det/synth: mAP"] < 100  # two of the three images answered right
    assert n == {**{k: 3 for k in value if k.startswith("det")}, **{k: 9 for k in value if k.startswith("vqa")}}
    assert [(r["benchmark"], r["split"], r["headline"]) for r in suite["rows"]] == \
        [("synth_det_val", "val", True)] + [("synth_det_val", "val", False)] * 2 + \
        [("synth_vqa_val", "val", True)] + [("synth_vqa_val", "val", False)] * 2
    md = (out / "qwen3" / "suite.md").read_text()
    assert f"| synth_det_val | val | det/synth: mAP | {value['det/synth: mAP']:.2f} | 3 |" in md
    assert "| synth_vqa_val | val | vqa/synth: OA | 44.44 | 9 |" in md
    assert not (out / "suite.md").exists()  # one checkpoint: no side-by-side table


def test_benchmarks_names_splits_and_scorers(synth_data, tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(synth_data / "synth_all_val.jsonl", tmp_path / "a")  # every task: both scorers
    (tmp_path / "b").mkdir()
    shutil.copy(synth_data / "synth_ground_val.jsonl", tmp_path / "b" / "rsvg_x.jsonl")
    (tmp_path / "b" / "rsvg_x.info.json").write_text(json.dumps({"args": {"split": "test"}}))  # data_prep's --split
    (tmp_path / "out" / "m" / "b").mkdir(parents=True)  # the suite's own output inside --bench is not a benchmark
    (tmp_path / "out" / "m" / "b" / "predictions.jsonl").write_text('{"id": "x", "text": ""}\n')
    found = eval_suite.find_benchmarks(tmp_path, None, tmp_path / "out")
    assert [(b["name"], b["split"], b["scorers"]) for b in found] == [
        ("a/synth_all_val", "val", ["eval_det", "eval_vqa"]), ("b/rsvg_x", "test", ["eval_det"])]
    assert [b["name"] for b in eval_suite.find_benchmarks(tmp_path, ["b/*", "c*"], tmp_path / "out")] == ["b/rsvg_x"]
    assert eval_suite.split_of(Path("x/dota_trainval_512.jsonl")) == "trainval"
    assert eval_suite.split_of(Path("x/aid.jsonl")) == "-"


def test_flags_reach_each_scorer_as_its_own_parser_reads_them(tmp_path):
    """What demo.sh and a user give eval_suite.py reaches eval_det.py / eval_vqa.py (their parsers, so their
    defaults and checks): --prior and --vis N to eval_det, --vis and --no-meteor to eval_vqa, the rest to both."""
    args = eval_suite.get_args(["--watch", "run", "--bench", "b", "--out", "o", "--prior", "train.jsonl", "--vis", "3",
                                "--batch-size", "25", "--no-meteor", "--dtype", "bf16", "--limit", "5"])
    det = eval_suite.scorer_args("eval_det", "ck", "d.jsonl", "o/x", args)
    vqa = eval_suite.scorer_args("eval_vqa", "ck", "d.jsonl", "o/x", args)
    assert (det.prior, det.vis, det.batch_size, det.dtype, det.limit, det.max_new_tokens) == ("train.jsonl", 3, 25, "bf16", 5, "auto")
    assert (vqa.vis, vqa.no_meteor, vqa.batch_size, vqa.dtype, vqa.limit, vqa.max_new_tokens) == (True, True, 25, "bf16", 5, 128)
    assert (det.ckpt, det.data, det.out) == (vqa.ckpt, vqa.data, vqa.out) == ("ck", "d.jsonl", "o/x")
    plain = eval_suite.get_args(["--ckpt", "a", "--bench", "b", "--out", "o"])
    assert eval_suite.scorer_args("eval_det", "ck", "d", "o", plain).vis == 0 and not eval_suite.scorer_args("eval_vqa", "ck", "d", "o", plain).vis


def test_rows_of_every_task_are_the_scripts_numbers(synth_data, tmp_path, monkeypatch):
    """Each task's rows (headline, then SECONDARY) read from metrics the eval scripts compute (--preds, no model)."""
    import eval_det
    import eval_vqa

    monkeypatch.setattr(eval_vqa, "load_wordnet", lambda: (None, "not loaded in this test"))  # LRS-VQA: no synonyms
    data = synth_data / "synth_all_val.jsonl"
    preds = []
    for r in read_records(data):
        m, right = r["meta"], r["id"].endswith(("0", "0_presence", "0_count", "1_presence"))
        text = {"det": lambda: boxes.render_answer(m["objects"], m["width"], m["height"]),
                "ground": lambda: boxes.render_answer(m["objects"], m["width"], m["height"], box_format="hbox", with_label=False),
                "vqa": lambda: m["answer"], "cls": lambda: m["label"], "caption": lambda: m["references"][0]}[r["task"]]()
        preds.append({"id": r["id"], "text": text if right else "no"})
    large = [{"id": f"l{i}", "task": "vqa", "dataset": "lrs", "messages": [{"role": "user", "content": "q"}],
              "meta": {"benchmark": "lrs_vqa", "answer": a, "type": t, "source": "FAIR"}}
             for i, (a, t) in enumerate([("no", "color"), ("red", "color"), ("no", "presence")])]
    large += [{"id": f"m{i}", "task": "vqa", "dataset": "mme", "messages": [{"role": "user", "content": "q"}],
               "meta": {"benchmark": "mme_realworld", "answer": a, "type": "position", "choices": ["(A) x", "(B) y"]}}
              for i, a in enumerate("AB")]
    (tmp_path / "large.jsonl").write_text("".join(json.dumps(r) + "\n" for r in large))
    preds += [{"id": r["id"], "text": "no" if r["id"] != "m0" else "A"} for r in large]
    (tmp_path / "preds.jsonl").write_text("".join(json.dumps(x) + "\n" for x in preds))
    det = eval_det.run(eval_det.get_args(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(data), "--coords", "abs",
                                          "--json-out", str(tmp_path / "d.json")]))
    vqa = eval_vqa.run(eval_vqa.get_args(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(data), "--no-meteor"]))
    big = eval_vqa.run(eval_vqa.get_args(["--preds", str(tmp_path / "preds.jsonl"), "--data", str(tmp_path / "large.jsonl")]))
    b = {"name": "all", "split": "val"}
    rows = [(r["metric"], r["value"], r["n"], r["headline"]) for r in
            eval_suite.table_rows(b, "eval_det", det) + eval_suite.table_rows(b, "eval_vqa", vqa)
            + eval_suite.table_rows(b, "eval_vqa", big)]
    d, g, v, c, cap = det["det"]["synth"], det["ground"]["synth"], vqa["vqa"]["synth"], vqa["cls"]["synth"], vqa["caption"]["synth"]
    lrs, mme = big["lrs_vqa"]["lrs"], big["mme_realworld"]["mme"]
    assert rows == [
        ("det/synth: mAP", 100 * d["mAP"], 3, True), ("det/synth: mAP_hbb", 100 * d["hbb"]["mAP"], 3, False),
        ("det/synth: mF1", 100 * d["mF1"], 3, False),
        ("ground/synth: Acc@0.5", 100 * g["Acc@0.5"], 3, True), ("ground/synth: meanIoU", 100 * g["meanIoU"], 3, False),
        ("ground/synth: Acc@0.7", 100 * g["Acc@0.7"], 3, False),
        ("vqa/synth: OA", 100 * v["exact"]["OA"], 9, True), ("vqa/synth: AA", 100 * v["exact"]["AA"], 9, False),
        ("vqa/synth: OA contain", 100 * v["contain"]["OA"], 9, False),
        ("cls/synth: accuracy", 100 * c["exact"], 3, True), ("cls/synth: accuracy contain", 100 * c["contain"], 3, False),
        ("caption/synth: CIDEr-D", 100 * cap["CIDEr-D"], 3, True), ("caption/synth: BLEU-4", 100 * cap["BLEU-4"], 3, False),
        ("caption/synth: ROUGE-L", 100 * cap["ROUGE-L"], 3, False),  # METEOR skipped (--no-meteor): no row
        # two rules labelled, RSCoVLM's (rscovlm) the headline, the benchmark's own (official) beside it
        ("lrs_vqa/lrs: average (rscovlm)", 100 * lrs["rscovlm"]["average"], 3, True),
        ("lrs_vqa/lrs: average (official)", 100 * lrs["official"]["average"], 3, False),
        ("lrs_vqa/lrs: overall (rscovlm)", 100 * lrs["rscovlm"]["overall"], 3, False),
        ("lrs_vqa/lrs: overall (official)", 100 * lrs["official"]["overall"], 3, False),
        ("lrs_vqa/lrs: average contain", 100 * lrs["contain"]["average"], 3, False),
        ("mme_realworld/mme: overall (rscovlm)", 100 * mme["rscovlm"]["overall"], 2, True),
        ("mme_realworld/mme: overall (official)", 100 * mme["official"]["overall"], 2, False)]
    assert 0 < d["mAP"] < 1 and 0 < v["exact"]["OA"] < 1 and mme["official"]["overall"] == 0.5
    assert lrs["rscovlm"]["average"] == 0.75 and lrs["rscovlm"]["overall"] == pytest.approx(2 / 3)  # color 1/2, presence 1/1
    assert eval_suite.table_value("MAE", 1.25) == 1.25  # VHM counting's MAE is in counts, not a fraction


def test_interrupted_suite_resumes_to_the_same_table(full_run, tiny_qwen3, bench, tmp_path):
    full_out, _ = full_run
    out, log = tmp_path / "out", []
    real = install_fake_answers(log, stop_after_vqa=4)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):  # during the second benchmark, 4 of its 9 answered
            eval_suite.main(suite_args([tiny_qwen3], bench, out))
    finally:
        model.generate = real
    det_dir, vqa_dir = out / "qwen3" / "synth_det_val" / "eval_det", out / "qwen3" / "synth_vqa_val" / "eval_vqa"
    assert (det_dir / "metrics.json").exists() and not (vqa_dir / "metrics.json").exists()
    assert not (out / "qwen3" / "suite.json").exists()
    answered = [json.loads(x)["id"] for x in (vqa_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(answered) == 4
    det_stamp = (det_dir / "metrics.json").stat().st_mtime_ns, (det_dir / "predictions.jsonl").stat().st_mtime_ns

    log.clear()
    real = install_fake_answers(log)
    try:
        eval_suite.main(suite_args([tiny_qwen3], bench, out))
    finally:
        model.generate = real
    # only the 5 vqa questions left were generated; the finished det benchmark was read back, not run again
    assert sorted(log) == sorted(r["id"] for r in read_records(bench / "synth_vqa_val.jsonl") if r["id"] not in answered)
    assert ((det_dir / "metrics.json").stat().st_mtime_ns, (det_dir / "predictions.jsonl").stat().st_mtime_ns) == det_stamp
    assert read(out / "qwen3" / "suite.json")["rows"] == read(full_out / "qwen3" / "suite.json")["rows"]
    assert (out / "qwen3" / "suite.md").read_text() == (full_out / "qwen3" / "suite.md").read_text()


def test_two_checkpoints_side_by_side(full_run, tiny_qwen25, tiny_qwen3, bench, tmp_path, capsys):
    """Qwen2.5-VL next to the Qwen3-VL of full_run, whose outputs are reused: with --limit 2 its metrics.json
    (made without a limit) is another result, so it is scored again from the predictions already there."""
    out = tmp_path / "out"
    shutil.copytree(full_run[0], out)
    log = []
    real = install_fake_answers(log)
    try:
        eval_suite.main(suite_args([tiny_qwen3, tiny_qwen25], bench, out, "--limit", "2"))
    finally:
        model.generate = real
    assert all(i.startswith(("det_val_0000", "vqa_val_00000")) for i in log) and len(log) == 4  # qwen2.5 only
    assert "4 evaluations, 0 already scored" in capsys.readouterr().out
    q3, q25 = (read(out / name / "suite.json")["rows"] for name in ("qwen3", "qwen2.5"))
    assert {r["n"] for r in q3} == {r["n"] for r in q25} == {2}
    assert [r["metric"] for r in q3] == [r["metric"] for r in q25]
    lines = (out / "suite.md").read_text().splitlines()
    assert "| benchmark | split | metric | n | qwen3 | qwen2.5 |" in lines
    for a, b in zip(q3, q25):
        assert f"| {a['benchmark']} | {a['split']} | {a['metric']} | 2 | {a['value']:.2f} | {b['value']:.2f} |" in lines
    side = read(out / "suite.json")
    assert side["checkpoints"] == ["qwen3", "qwen2.5"]
    assert [r["values"] for r in side["rows"]] == [{"qwen3": a["value"], "qwen2.5": b["value"]} for a, b in zip(q3, q25)]
    assert any(a["value"] != 0 for a in q3)  # the fake right answers are in both columns
    assert any(b["value"] != 0 for b in q25)


@pytest.mark.slow  # two gloo processes, each importing torch and loading the model
def test_torchrun_two_ranks_equal_one_process(full_run, tiny_qwen3, bench, tmp_path):
    """2 gloo ranks (the same right answers, through a wrapper that installs them): every benchmark runs (the
    eval scripts' ending of the process group must not stop the second one), predictions sharded and merged,
    the same table as one process."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(f"import sys\nsys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
                       "import test_suite, eval_suite, model\ntest_suite.install_fake_answers()\n"
                       "import common\ncommon.run_cli(eval_suite.main)\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
                        *suite_args([tiny_qwen3], bench, out)],
                       cwd=REPO, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("| synth_vqa_val | val | vqa/synth: OA |") == 1  # rank 0 alone prints (and writes) the table
    assert read(out / "qwen3" / "suite.json")["rows"] == read(full_run[0] / "qwen3" / "suite.json")["rows"]
    for bench_dir in ("synth_det_val/eval_det", "synth_vqa_val/eval_vqa"):
        texts = [{x["id"]: x["text"] for x in map(json.loads, (o / "qwen3" / bench_dir / "predictions.jsonl").read_text().splitlines())}
                 for o in (out, full_run[0])]
        assert texts[0] == texts[1]
        assert not list((out / "qwen3" / bench_dir).glob("predictions.jsonl.rank*"))  # merged by rank 0


@pytest.fixture
def bad_inputs(tmp_path, bench, tiny_qwen3):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("x")
    (tmp_path / "nothing" / "images").mkdir()
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "talk.jsonl").write_text(json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("")
    (tmp_path / "noconfig" / "sub").mkdir(parents=True)
    for run in ("a", "b"):  # two checkpoints both called qwen3
        (tmp_path / run).mkdir()
        os.symlink(tiny_qwen3, tmp_path / run / "qwen3")
    cli_helpers.training_run(tmp_path / "train")
    return tmp_path


BAD = {  # case: (argv given tmp path t, bench, ckpt; what the line names)
    "no_files": (lambda t, b, c: ["--ckpt", c, "--bench", t / "nothing", "--out", t / "o"],
                 lambda t: [t / "nothing", "no benchmark files", "images/, notes.txt"]),
    "no_bench": (lambda t, b, c: ["--ckpt", c, "--bench", t / "missing", "--out", t / "o"], lambda t: [t / "missing"]),
    "chat_only": (lambda t, b, c: ["--ckpt", c, "--bench", t / "chat", "--out", t / "o"],
                  lambda t: [t / "chat" / "talk.jsonl", "no record to score", "chat"]),
    "empty_file": (lambda t, b, c: ["--ckpt", c, "--bench", t / "empty", "--out", t / "o"], lambda t: [t / "empty" / "a.jsonl"]),
    "no_config": (lambda t, b, c: ["--ckpt", t / "noconfig", "--bench", b, "--out", t / "o"],
                  lambda t: ["--ckpt", t / "noconfig", "config.json"]),
    "only_none": (lambda t, b, c: ["--ckpt", c, "--bench", b, "--out", t / "o", "--only", "dota*"],
                  lambda t: ["--only dota*", "synth_det_val", "synth_vqa_val"]),
    "same_name": (lambda t, b, c: ["--ckpt", t / "a" / "qwen3", t / "b" / "qwen3", "--bench", b, "--out", t / "o"],
                  lambda t: ["'qwen3'", "--names"]),
    "names_count": (lambda t, b, c: ["--ckpt", c, "--bench", b, "--out", t / "o", "--names", "x", "y"], lambda t: ["--names", "2 names for 1"]),
    "out_is_file": (lambda t, b, c: ["--ckpt", c, "--bench", b, "--out", t / "chat" / "talk.jsonl"], lambda t: ["--out", "talk.jsonl"]),
    "training_ckpt": (lambda t, b, c: ["--ckpt", t / "train" / "ckpt" / "step_00000004", "--bench", b, "--out", t / "o"],
                      lambda t: ["training checkpoint", t / "train" / "export" / "step_4", t / "train" / "final"]),
    "dtype_typo": (lambda t, b, c: ["--ckpt", c, "--bench", b, "--out", t / "o", "--dtype", "bf61"],
                   lambda t: ["--dtype", "did you mean 'bf16'?"]),
    "ckpt_and_watch": (lambda t, b, c: ["--ckpt", c, "--watch", t / "train", "--bench", b, "--out", t / "o"],
                       lambda t: ["--watch", "--ckpt"]),
    "watch_an_export": (lambda t, b, c: ["--watch", t / "train" / "final", "--bench", b, "--out", t / "o"],
                        lambda t: ["one export of a run: give the run folder", t / "train"]),
    "watch_above_runs": (lambda t, b, c: ["--watch", t, "--bench", b, "--out", t / "o"],
                         lambda t: ["not a train.py run folder", f"runs below it: {t / 'train'}"]),
    "prior_missing": (lambda t, b, c: ["--ckpt", c, "--bench", b, "--out", t / "o", "--prior", t / "nope.jsonl"],
                      lambda t: ["--prior", t / "nope.jsonl", "no such file"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(case, bad_inputs, bench, tiny_qwen3, monkeypatch, capsys):
    argv, names = BAD[case]
    result = run_main("eval_suite.py", eval_suite.main, argv(bad_inputs, bench, tiny_qwen3), monkeypatch, capsys)
    one_error_line(result, names(bad_inputs))
    assert not (bad_inputs / "o").exists()  # said before anything is written


def test_limit_keeps_a_row_for_tasks_left_without_records(synth_data, tmp_path):
    """--limit 2 on a file of every task: eval_det takes 2 det records (no ground left), eval_vqa 2 vqa questions
    (no cls, no caption); those tasks keep a row with n = 0 instead of vanishing from the table."""
    data = synth_data / "synth_all_val.jsonl"
    (b,) = eval_suite.find_benchmarks(data, None, tmp_path / "out")  # --bench: one record file
    assert (b["name"], b["scorers"]) == ("synth_all_val", ["eval_det", "eval_vqa"])
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"id": r["id"], "text": "no"}) + "\n" for r in read_records(data)))
    argv = ["--preds", str(preds), "--data", str(data), "--limit", "2", "--json-out", str(tmp_path / "m.json")]
    det = eval_det.run(eval_det.get_args(argv + ["--coords", "abs"]))
    vqa = eval_vqa.run(eval_vqa.get_args(argv + ["--no-meteor"]))
    rows = []
    for scorer, metrics in (("eval_det", det), ("eval_vqa", vqa)):
        found = eval_suite.table_rows(b, scorer, metrics)
        rows += found + eval_suite.rows_without_records(b, scorer, found)
    by_metric = {r["metric"]: (r["value"], r["n"]) for r in rows}
    assert by_metric["det/synth: mAP"][1] == 2 and by_metric["vqa/synth: OA"][1] == 2
    for metric in ("ground/synth: Acc@0.5", "cls/synth: accuracy", "caption/synth: CIDEr-D"):
        assert by_metric[metric] == (None, 0), metric
    assert eval_suite.fmt(None) == "-"


def test_benchmark_sections_get_their_own_rows_and_no_stray_vqa_row():
    """LRS-VQA / MME-RealWorld / XLRS-Bench questions are scored in their own metrics.json sections: a table of a
    full run has their headline rows and no extra "vqa/...: OA" row with n = 0; under --limit their empty rows
    carry the headline's rule label, as a full run's rows do."""
    parts = [("vqa", eval_suite.section_of({"task": "vqa", "meta": {"benchmark": b}}), b) for b in
             ("lrs_vqa", "mme_realworld", "xlrs_bench")]
    assert [p[1] for p in parts] == ["lrs_vqa", "mme_realworld", "xlrs_bench"]
    bench = {"name": "b", "split": "test", "parts": parts}
    full = [{"metric": f"{s}/{ds}: x"} for _, s, ds in parts]  # every section has rows
    assert eval_suite.rows_without_records(bench, "eval_vqa", full) == []
    empty = [r["metric"] for r in eval_suite.rows_without_records(bench, "eval_vqa", [])]
    assert empty == ["lrs_vqa/lrs_vqa: average (rscovlm)", "mme_realworld/mme_realworld: overall (rscovlm)",
                     "xlrs_bench/xlrs_bench: micro (official)"]


# -----------------------------------------------------------------------------
# --watch: every checkpoint of a run, in step order, as it appears, resumable


def fake_run(run, base, steps=12):
    """A train.py --out folder without training: args.json naming the start model, metrics.jsonl."""
    base.mkdir(exist_ok=True)
    (run / "export").mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, steps + 1)))
    (run / "args.json").write_text(json.dumps({"model": str(base)}))  # last: train.py's first file of a run
    return run


def export(path):
    """What export_hf leaves: a folder with config.json, written as NAME.tmp and then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text("{}")
    os.replace(tmp, path)


def test_watch_waits_for_the_run_scores_exports_as_they_appear_and_resumes(tmp_path, monkeypatch, capsys):
    """Started together with launch.sh: the run folder appears late, then its exports one by one."""
    run, base = tmp_path / "run", tmp_path / "base"
    seen, said = [], []

    def evaluate(step, ckpt):
        seen.append(ckpt)
        time.sleep(0.3 if step == 4 else 0)  # each line records its scoring time
        return {"b: ground/d: Acc@0.5": len(seen) / 10}

    def saying(*a, **k):  # eval_suite's print, recorded: the run goes on once the watcher has said it waits
        said.append(" ".join(map(str, a)))
        print(*a, **k)

    def wait_until_said(text):  # however long the watcher takes (a busy machine: seconds), not a fixed sleep
        t0 = time.time()
        while not any(text in line for line in said):
            assert time.time() - t0 < 30, (text, said)
            time.sleep(0.05)

    def training_goes_on():
        wait_until_said("waiting for the run to start")
        fake_run(run, base)
        export(run / "export" / "step_4")
        (run / "export" / "step_8.tmp").mkdir()  # an export being written: not a checkpoint yet
        wait_until_said("waiting for the next export (scored steps [0, 4])")
        shutil.rmtree(run / "export" / "step_8.tmp")
        export(run / "export" / "step_8")
        wait_until_said("waiting for the next export (scored steps [0, 4, 8])")
        export(run / "final")

    monkeypatch.setattr(eval_suite, "print", saying, raising=False)
    monkeypatch.setattr(eval_suite, "WATCH_SAY_S", 0.15)  # its "still waiting" line (every 60 s in a log file)
    t = threading.Thread(target=training_goes_on)
    t.start()
    lines = eval_suite.watch_run(run, tmp_path / "out", evaluate, poll_s=0.1, idle_minutes=1)
    t.join()
    out = capsys.readouterr().out
    assert f"watch {run}: waiting for the run to start (its args.json)" in out
    assert f"watch {run}: waiting for the next export (scored steps [0, 4])" in out
    assert seen == [str(base), str(run / "export" / "step_4"), str(run / "export" / "step_8"), str(run / "final")]
    assert [line["step"] for line in lines] == [0, 4, 8, 12]  # final at the run's last logged step
    assert lines[1]["seconds"] >= 0.3 and all(0 <= line["seconds"] < 0.3 for line in lines[::2])
    logged = [json.loads(x) for x in (tmp_path / "out" / "metrics_by_step.jsonl").read_text().splitlines()]
    assert logged == lines and (tmp_path / "out" / "metrics_by_step.png").stat().st_size > 0
    # a watcher stopped after step 8 resumes with the final export only
    (tmp_path / "out" / "metrics_by_step.jsonl").write_text("".join(json.dumps(x) + "\n" for x in logged[:3]))
    seen.clear()
    again = eval_suite.watch_run(run, tmp_path / "out", evaluate, poll_s=0.1, idle_minutes=1)
    assert seen == [str(run / "final")] and [x["step"] for x in again] == [0, 4, 8, 12]


def test_watch_gives_up_on_a_dead_run_or_one_that_never_starts(tmp_path):
    with pytest.raises(UserError, match=r"no train.py run started there \(no args.json\) in 0.005 min"):
        eval_suite.watch_run(tmp_path / "never", tmp_path / "out", lambda s, c: {}, poll_s=0.05, idle_minutes=0.005)
    run = fake_run(tmp_path / "run", tmp_path / "base")
    with pytest.raises(UserError, match=r"no new export .* scored steps \[0\]"):
        eval_suite.watch_run(run, tmp_path / "out", lambda s, c: {}, poll_s=0.05, idle_minutes=0.005)


def test_watch_cli_scores_each_checkpoint_on_every_benchmark(tmp_path, tiny_qwen3, synth_data, capsys):
    """eval_suite.py --watch on one record file of every task: each checkpoint through both eval scripts, the
    headlines in metrics_by_step.jsonl; the untrained model's answers all run to the limit, and the warning
    says that the model may not stop yet."""
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"model": tiny_qwen3}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    shutil.copytree(tiny_qwen3, run / "final")
    data = synth_data / "synth_all_val.jsonl"
    lines = eval_suite.main(["--watch", str(run), "--bench", str(data), "--out", str(tmp_path / "w"), "--limit", "1",
                             "--max-new-tokens", "6", "--no-meteor", "--watch-poll", "0.1"])
    assert [x["step"] for x in lines] == [0, 3]
    assert set(lines[0]["headline"]) == {"synth_all_val: det/synth: mAP", "synth_all_val: vqa/synth: OA"}  # --limit 1
    for step, line in zip((0, 3), lines):  # each checkpoint's own suite run and metrics.json
        det = json.loads((tmp_path / "w" / f"step_{step}" / "synth_all_val" / "eval_det" / "metrics.json").read_text())
        assert line["headline"]["synth_all_val: det/synth: mAP"] == det["headline"]["det/synth: mAP"]
        assert (tmp_path / "w" / f"step_{step}" / "suite.md").is_file()
    assert (tmp_path / "w" / "metrics_by_step.png").is_file()
    err = capsys.readouterr().err
    assert "det/synth: 1 of 1 answers hit the generation limit of 6 tokens" in err and "may not stop yet (untrained?)" in err
