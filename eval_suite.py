"""
eval_suite.py — score one or more checkpoints on a folder of prepared benchmarks, one table per checkpoint; or
follow a training run and score each of its checkpoints as it appears (--watch).

    python eval_suite.py --ckpt runs/x/final --bench data/bench --out eval/suite
    python eval_suite.py --ckpt ckpt/RSCoVLM-7B runs/x/final --bench data/bench --out eval/suite --only "dota*" "rsvqa*"
    torchrun --nproc-per-node 8 eval_suite.py --ckpt runs/x/final --bench data/bench --out eval/suite
    python eval_suite.py --watch runs/x --bench data/bench --out eval/watch      # beside the training, one process

Every *.jsonl record file under --bench (data_prep.py's output, found recursively; or --bench one such file) is
one benchmark split, named by its path relative to --bench without ".jsonl". Its tasks decide what scores it: det/ground records go
through eval_det.py's run(), vqa/cls/caption records through eval_vqa.py's run() (a file with both goes through
both), each called with the namespace its own parser makes from the flags given here, so predicting, resuming
and scoring are exactly those scripts' (no scoring code here). Outputs:

    OUT/NAME/BENCHMARK/eval_det/   predictions.jsonl, metrics.json (eval_det.py --out)
    OUT/NAME/BENCHMARK/eval_vqa/   predictions.jsonl, metrics.json (eval_vqa.py --out)
    OUT/NAME/suite.md, suite.json  the checkpoint's table: benchmark, split, metric, value, n
    OUT/suite.md, suite.json       several checkpoints side by side

Resumable per benchmark: a benchmark whose metrics.json was written with the same arguments is read back, not
run again; an unfinished one continues its predictions.jsonl (model.predict skips the answered records).
Under torchrun every rank walks the same list (rank 0's) and model.predict shards each benchmark over the
ranks; rank 0 scores and writes the tables.

--watch RUN (a train.py --out folder) scores the model the run started from as step 0, each RUN/export/step_N as
it appears and RUN/final, each as one suite run named step_N (OUT/step_N/...), and writes a line per step to
OUT/metrics_by_step.jsonl ({"step", "ckpt", "headline": {"BENCHMARK: task/dataset: metric": value},
"seconds": scoring time}) and a PNG of each headline against the step; it waits for a run that has not started
yet, resumes, and ends once final is scored.

Both eval scripts write fractions (0..1) into metrics.json; the tables show them x 100 (percent), except values
in their own units (TABLE_UNITS: MAE). Each task/dataset gives its headline metric (the eval script's
"headline") first, then the secondary ones listed in SECONDARY.
"""

import fnmatch
import json
import os
import re
import time
from pathlib import Path

import torch

import eval_det
import eval_vqa
import model
from common import (OneLineParser, UserError, add_debug_flag, add_model_flags, check_checkpoint, check_output_paths,
                    check_path, dist_info, end_dist, is_main, load_kwargs, max_new_tokens_arg, positive_int, print0,
                    read_records, run_cli)


# -----------------------------------------------------------------------------
# Scorers: which eval script reads which tasks; the tables' unit

SCORERS = {  # name (also the output subfolder): (tasks it scores, its parser, its run)
    "eval_det": (("det", "ground"), eval_det.get_args, eval_det.run),
    "eval_vqa": (("vqa", "cls", "caption"), eval_vqa.get_args, eval_vqa.run),
}

TABLE_UNITS = ("MAE",)  # metrics in their own units; every other value is a fraction, shown x 100


def table_value(label, value):
    """A metrics.json value as the tables show it: fractions in percent, TABLE_UNITS as they are."""
    return value if label in TABLE_UNITS else 100 * value


# The headline metric of each section, for the row of a task that --limit left without records (n = 0).
HEADLINE_LABEL = {"det": "mAP", "ground": "Acc@0.5", "vqa": "OA", "cls": "accuracy", "caption": "CIDEr-D",
                  **{s: f"{label} ({rule})" for s, (label, rule) in eval_vqa.BENCHMARK_HEADLINES.items()}}

# The secondary metrics of each section of a metrics.json, after its headline: (label, getter of one dataset's
# result). A getter that finds no number (METEOR without Java, a key an older metrics.json lacks) adds no row.
SECONDARY = {
    "det": [("mAP_hbb", lambda r: r["hbb"]["mAP"]), ("mF1", lambda r: r["mF1"])],
    "ground": [("meanIoU", lambda r: r["meanIoU"]), ("Acc@0.7", lambda r: r["Acc@0.7"]),
               # VRSBench referring: its own script's grid rule beside the headline's continuous IoU
               ("Acc@0.5 (official)", lambda r: r["official"]["Acc@0.5"]),
               ("Acc@0.7 (official)", lambda r: r["official"]["Acc@0.7"])],
    "vqa": [("AA", lambda r: r["exact"]["AA"]), ("OA contain", lambda r: r["contain"]["OA"])],
    "cls": [("accuracy contain", lambda r: r["contain"])],
    "caption": [("BLEU-4", lambda r: r["BLEU-4"]), ("ROUGE-L", lambda r: r["ROUGE-L"]), ("METEOR", lambda r: r["METEOR"])],
    # the benchmarks scored by two rules: the headline is the rscovlm one (RSCoVLM's paper), the official one here
    "lrs_vqa": [("average (official)", lambda r: r["official"]["average"]),
                ("overall (rscovlm)", lambda r: r["rscovlm"]["overall"]),
                ("overall (official)", lambda r: r["official"]["overall"]),
                ("average contain", lambda r: r["contain"]["average"])],
    "mme_realworld": [("overall (official)", lambda r: r["official"]["overall"])],
    "vhm": [("accuracy (official)", lambda r: r["official"])],
    "xlrs_bench": [("macro (official)", lambda r: r["official"]["macro"])],
}

# -----------------------------------------------------------------------------
# Benchmarks: the record files under --bench


SPLIT_WORDS = ("trainval", "train", "val", "valid", "validation", "test", "testdev", "dev")


def split_of(path):
    """The split of a record file: args.split of the NAME.info.json data_prep.py wrote beside it, else the last
    split word among the name's "_"-separated parts (dota_val_512 -> val), else "-"."""
    info = path.with_name(path.stem + ".info.json")
    try:
        split = json.loads(info.read_text())["args"]["split"]
        if isinstance(split, str) and split:
            return split
    except (OSError, ValueError, KeyError, TypeError):
        pass
    words = [w for w in path.stem.lower().split("_") if w in SPLIT_WORDS]
    return words[-1] if words else "-"


def find_benchmarks(bench, only, out):
    """[{"name", "path", "split", "scorers", "parts"}] of the *.jsonl files under bench (name order; or bench
    itself, one file), those matching a --only glob when given; parts: the (task, section, dataset) its records
    are scored in. Every file is read (read_records checks each line) before any model loads, so a bad file
    stops the run at once, naming it."""
    root = Path(bench)
    if not root.exists():
        raise UserError(f"--bench {bench}: no such folder or file")
    if root.is_file() and root.suffix != ".jsonl":
        raise UserError(f"--bench {bench} is a file: give the folder of record files or one record file (.jsonl)")
    out = Path(out).resolve()
    files = [root] if root.is_file() else [p for p in sorted(root.rglob("*.jsonl"))
                                           if out not in p.resolve().parents]  # our own predictions, when --out is inside --bench
    root = root.parent if root.is_file() else root
    if not files:
        there = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        raise UserError(f"--bench {bench}: no benchmark files (*.jsonl record files, searched recursively) in it; "
                              f"it holds {', '.join(there[:10]) + (', ...' if len(there) > 10 else '') if there else 'nothing'}")
    names = {p: p.relative_to(root).with_suffix("").as_posix() for p in files}
    if only:
        files = [p for p in files if any(fnmatch.fnmatch(names[p], g) for g in only)]
        if not files:
            listed = ", ".join(list(names.values())[:10]) + (", ..." if len(names) > 10 else "")
            raise UserError(f"--only {' '.join(only)}: matches none of the benchmarks in {bench} ({listed})")
    benchmarks = []
    for p in files:
        try:
            records = read_records(p)
        except UserError as e:
            raise UserError(f"{e} (choose the benchmarks to run with --only GLOB)") from None
        tasks = {r["task"] for r in records}
        scorers = [s for s, (scored, *_) in SCORERS.items() if tasks & set(scored)]
        if not scorers:
            raise UserError(f"{p}: no record to score (its tasks: {', '.join(sorted(tasks))}; scored are det, "
                                  f"ground, vqa, cls, caption); choose the benchmarks to run with --only GLOB")
        parts = sorted({(r["task"], section_of(r), r["dataset"]) for r in records if r["task"] in HEADLINE_LABEL})
        benchmarks.append({"name": names[p], "path": str(p), "split": split_of(p), "scorers": scorers, "parts": parts})
    return benchmarks


def section_of(record):
    """The metrics.json section a record is scored in: its task, or for LRS-VQA / MME-RealWorld / XLRS-Bench
    questions the benchmark's own (eval_vqa.evaluate's routing)."""
    bench = (record.get("meta") or {}).get("benchmark")
    return bench if record["task"] == "vqa" and bench in eval_vqa.BENCHMARK_HEADLINES else record["task"]


# -----------------------------------------------------------------------------
# Checkpoints: a name each, for its output folder and its column


def checkpoint_names(ckpts, names):
    """--names, else each folder's name; train.py's final and export/step_N get the run's name in front
    (runs/x/final -> x_final), so two runs' finals do not meet in one folder. Stable across runs of the suite
    (a checkpoint keeps its folder whatever else is on the command line)."""
    if names:
        if len(names) != len(ckpts):
            raise UserError(f"--names gives {len(names)} names for {len(ckpts)} checkpoints: give one per --ckpt")
    else:
        names = []
        for c in ckpts:
            p = Path(os.path.abspath(c))  # as given: a symlinked checkpoint keeps the name it was given by
            if p.parent.name == "export" and (p.parent.parent / "args.json").is_file():
                names.append(f"{p.parent.parent.name}_{p.name}")
            elif (p.parent / "args.json").is_file():
                names.append(f"{p.parent.name}_{p.name}")
            else:
                names.append(p.name)
    for n in names:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", n) or n in (".", ".."):
            raise UserError(f"checkpoint name {n!r} cannot name a folder: give --names with letters, digits, _ . + -")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"two checkpoints are both named {twice[0]!r} ({', '.join(c for c, n in zip(ckpts, names) if n == twice[0])}): "
                              f"give --names, one per --ckpt")
    return names


# -----------------------------------------------------------------------------
# One benchmark through an eval script's own run()


def scorer_args(scorer, ckpt, data, out, args):
    """The namespace `python SCORER.py --ckpt CKPT --data DATA --out OUT [the flags given here]` would run with:
    built by that script's parser, so its defaults (eval_det auto tokens, eval_vqa 128) and checks apply."""
    argv = ["--ckpt", ckpt, "--data", data, "--out", out]
    for flag in ("batch_size", "max_new_tokens", "backend", "tensor_parallel", "min_pixels", "max_pixels", "dtype",
                 "attn", "limit") + (("prior",) if scorer == "eval_det" else ()):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.vis:  # eval_det draws N images per dataset, eval_vqa its confusion matrices
        argv += ["--vis", str(args.vis)] if scorer == "eval_det" else ["--vis"]
    if args.no_meteor and scorer == "eval_vqa":
        argv.append("--no-meteor")
    return SCORERS[scorer][1](argv)


def finished(ns):
    """The metrics.json of an earlier run of exactly these arguments (ns), or None: then the benchmark runs (its
    predictions resume). Another --limit, token limit or pixel budget is another result, so it runs again."""
    path = Path(ns.out) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or cut short while being written
        return None
    said = metrics.get("args", {})  # where the file is says --out; --debug changes no number
    want = json.loads(json.dumps({k: v for k, v in vars(ns).items() if k not in ("out", "json_out", "debug")}, default=str))
    same = all(said.get(k) == v for k, v in want.items() if k in said)
    return metrics if same and "headline" in metrics else None


# -----------------------------------------------------------------------------
# Table rows from the metrics.json files


def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def table_rows(bench, scorer, metrics):
    """Rows {benchmark, split, metric, value, n, headline, scorer} of one eval run: every headline metric (in the
    script's order; value = the headline's, in percent) followed by its task/dataset's SECONDARY metrics, then
    the SECONDARY sections not named by a headline key (vhm). metric = "task/dataset: name" as the headline
    keys are written; n = the records scored for that task/dataset."""
    rows, done = [], set()

    def add(section, ds, label, value, is_headline):
        res = metrics.get(section, {}).get(ds, {})
        n = res.get("n", res.get("images")) if isinstance(res, dict) else None
        rows.append({"benchmark": bench["name"], "split": bench["split"], "metric": f"{section}/{ds}: {label}",
                     "value": table_value(label, value), "n": n, "headline": is_headline, "scorer": scorer})

    def add_secondary(section, ds):
        done.add((section, ds))
        for label, get in SECONDARY.get(section, []):
            if f"{section}/{ds}: {label}" in metrics.get("headline", {}):
                continue
            try:
                value = get(metrics[section][ds])
            except (KeyError, TypeError):
                continue
            if number(value):
                add(section, ds, label, value, False)

    side = [s for s in SECONDARY if not any(k.startswith(f"{s}/") for k in metrics.get("headline", {}))]
    for key, value in metrics.get("headline", {}).items():  # "det/dota: mAP"
        section, rest = key.split("/", 1)
        ds, label = rest.rsplit(": ", 1)
        if number(value):
            add(section, ds, label, value, True)
        for sec in [section] + side:  # and a section without headline keys of its own that has this dataset (vhm)
            if (sec, ds) not in done and ds in (metrics.get(sec) or {}):
                add_secondary(sec, ds)
    for section in SECONDARY:
        for ds in metrics.get(section, {}) if isinstance(metrics.get(section), dict) else []:
            if (section, ds) not in done:
                add_secondary(section, ds)
    return rows


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def write_table(out_dir, name, ckpt, rows, runs, args):
    """OUT/NAME/suite.md and suite.json of one checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {name}", "", f"checkpoint `{ckpt}`, benchmarks in `{args.bench}`"
          + (f", first {args.limit} records of each (n = 0: none of that task among them)" if args.limit else "")
          + ". Values in percent (metrics.json's fractions x 100; MAE in its own units); each task/dataset's "
            "headline metric first.", "",
          "| benchmark | split | metric | value | n |", "|---|---|---|---:|---:|"]
    md += [f"| {r['benchmark']} | {r['split']} | {r['metric']} | {fmt(r['value'])} | {'-' if r['n'] is None else r['n']} |"
           for r in rows]
    (out_dir / "suite.md").write_text("\n".join(md) + "\n")
    (out_dir / "suite.json").write_text(json.dumps({"checkpoint": ckpt, "name": name, "bench": args.bench,
                                                    "rows": rows, "metrics_json": runs, "args": vars(args)}, indent=1))
    return "\n".join(md)


def write_side_by_side(out, names, tables):
    """OUT/suite.md and suite.json: one row per (benchmark, split, metric), one value column per checkpoint."""
    keys, by = [], {}
    for name in names:
        for r in tables[name]:
            key = (r["benchmark"], r["split"], r["metric"])
            if key not in by:
                keys.append(key)
                by[key] = {"benchmark": key[0], "split": key[1], "metric": key[2], "n": r["n"], "values": {}}
            by[key]["values"][name] = r["value"]
    md = [f"Checkpoints side by side (values in percent; `{Path(out) / '<name>' / 'suite.md'}` for each).", "",
          "| benchmark | split | metric | n | " + " | ".join(names) + " |", "|---|---|---|---:|" + "---:|" * len(names)]
    for key in keys:
        row = by[key]
        md.append(f"| {key[0]} | {key[1]} | {key[2]} | {'-' if row['n'] is None else row['n']} | "
                  + " | ".join(fmt(row["values"].get(n)) for n in names) + " |")
    Path(out, "suite.md").write_text("\n".join(md) + "\n")
    Path(out, "suite.json").write_text(json.dumps({"checkpoints": names, "rows": [by[k] for k in keys]}, indent=1))
    return "\n".join(md)


def rows_without_records(bench, scorer, rows):
    """A row with n = 0 for each task/dataset of the benchmark that this scorer reads but that has no row (--limit
    left it without records), so a quick run's table lists the same tasks as a full one."""
    have = {r["metric"].split(": ")[0] for r in rows}
    return [{"benchmark": bench["name"], "split": bench["split"], "metric": f"{section}/{ds}: {HEADLINE_LABEL[section]}",
             "value": None, "n": 0, "headline": True, "scorer": scorer}
            for task, section, ds in bench["parts"] if task in SCORERS[scorer][0] and f"{section}/{ds}" not in have]


# -----------------------------------------------------------------------------
# Running: every (checkpoint, benchmark, scorer), a checkpoint loaded once, then the tables


def run_benchmarks(args, ckpts, benchmarks):
    """{(checkpoint name, benchmark name, scorer): metrics} of ckpts [(folder, name)] on every benchmark, each
    through its eval script's run(); metrics.json files of an earlier run with the same arguments are read back.
    Under torchrun every rank walks rank 0's list and predicts its shard; rank 0 scores (None on the others)."""
    plan = []  # (checkpoint name, benchmark, scorer, namespace, the metrics.json to reuse or None)
    for ckpt, name in ckpts:
        for b in benchmarks:
            for scorer in b["scorers"]:
                # absolute paths: a later run from another folder resumes the same predictions (model.predict
                # refuses a file made with another checkpoint path) and reuses the same metrics.json
                ns = scorer_args(scorer, os.path.abspath(ckpt), os.path.abspath(b["path"]),
                                 str(Path(args.out, name, b["name"], scorer)), args)
                plan.append((name, b, scorer, ns, finished(ns)))
    run_it = [metrics is None for *_, metrics in plan]
    if torch.distributed.is_initialized():  # rank 0 decides what runs: a rank that ran another list would hang
        box = [run_it]
        torch.distributed.broadcast_object_list(box, src=0)
        run_it = box[0]
    print0(f"{len(benchmarks)} benchmarks x {len(ckpts)} checkpoints in {args.bench}: {len(plan)} evaluations, "
           f"{len(plan) - sum(run_it)} already scored (their metrics.json is read back)")
    metrics_of, loaded = {}, {}
    for k, ((name, b, scorer, ns, metrics), run) in enumerate(zip(plan, run_it), 1):
        if run:
            print0(f"\n=== [{k}/{len(plan)}] {name}: {b['name']} ({scorer}.py -> {ns.out})")
            if ns.ckpt not in loaded:  # one checkpoint at a time: the plan goes checkpoint by checkpoint
                loaded.clear()
                loaded[ns.ckpt] = model.load_for_generation(ns.ckpt, ns.backend, **load_kwargs(ns))
            metrics = SCORERS[scorer][2](ns, loaded[ns.ckpt])  # None on the other ranks: rank 0 scores
        else:
            print0(f"\n=== [{k}/{len(plan)}] {name}: {b['name']} ({scorer}): scored before, {ns.out}/metrics.json")
        metrics_of[(name, b["name"], scorer)] = metrics
    return metrics_of


def write_tables(args, ckpts, benchmarks, metrics_of):
    """OUT/NAME/suite.md and suite.json per checkpoint, OUT/suite.md side by side for several; {name: rows}."""
    tables = {}
    for ckpt, name in ckpts:
        rows, runs = [], {}
        for b in benchmarks:
            for scorer in b["scorers"]:
                found = table_rows(b, scorer, metrics_of[(name, b["name"], scorer)])
                rows += found + rows_without_records(b, scorer, found)
                runs.setdefault(b["name"], {})[scorer] = str(Path(args.out, name, b["name"], scorer, "metrics.json"))
        tables[name] = rows
        print0(f"\n{write_table(Path(args.out, name), name, ckpt, rows, runs, args)}")
        print0(f"-> {Path(args.out, name, 'suite.md')}, suite.json")
    if len(ckpts) > 1:
        print0(f"\n{write_side_by_side(args.out, [n for _, n in ckpts], tables)}")
        print0(f"-> {Path(args.out, 'suite.md')}, suite.json")
    return tables


# -----------------------------------------------------------------------------
# Following a training run (--watch): its start, each export as it appears, final


WATCH_SAY_S = 60  # while waiting, a line at least this often: a log file (nohup, Slurm) never goes silent


def watch(args, benchmarks):
    """--watch RUN: each checkpoint of the run scored on every benchmark as one suite run named step_N, its
    headlines ("BENCHMARK: task/dataset: metric") a line of OUT/metrics_by_step.jsonl (watch_run)."""
    if dist_info()[1] > 1:
        raise UserError("--watch runs as one process (not under torchrun): it scores checkpoints one after another")

    def evaluate(step, ckpt):
        ckpts = [(ckpt, f"step_{step}")]
        metrics_of = run_benchmarks(args, ckpts, benchmarks)
        write_tables(args, ckpts, benchmarks, metrics_of)
        return {f"{bench}: {key}": value for (_, bench, _), metrics in metrics_of.items()
                for key, value in metrics["headline"].items()}

    return watch_run(args.watch, args.out, evaluate, args.watch_poll, args.watch_idle)


def run_started(run_dir):
    """Whether RUN holds a train.py run (its args.json); False while there is none yet (the watcher was started
    together with launch.sh). A folder that is something else is a UserError naming what it is."""
    run = Path(run_dir)
    if (run / "args.json").is_file():
        return True
    if run.is_file():
        raise UserError(f"--watch {run_dir} is a file: give a train.py --out folder")
    if (run / "config.json").is_file() and (run.parent.name == "export" or run.name == "final"):
        raise UserError(f"--watch {run_dir} is one export of a run: give the run folder "
                        f"{run.parent if run.name == 'final' else run.parent.parent}")
    below = sorted(str(p.parent) for p in run.glob("*/args.json"))
    if below:
        raise UserError(f"--watch {run_dir}: not a train.py run folder (no args.json); runs below it: {', '.join(below[:5])}")
    return False


def run_checkpoints(run_dir):
    """[(step, checkpoint folder)] of a started train.py run, step order: the --model it started from at step 0,
    each complete export/step_N, and final at the last logged step (when written)."""
    run = Path(run_dir)
    start = json.loads((run / "args.json").read_text())["model"]
    if not Path(start).is_dir():
        raise UserError(f"--watch {run_dir}: the model it started from, {start} (args.json), is not a folder here")
    found = [(0, str(start))]
    for p in (run / "export").glob("step_*"):  # export_hf writes step_N.tmp, then renames: step_N is complete
        m = re.fullmatch(r"step_(\d+)", p.name)
        if m and (p / "config.json").is_file():
            found.append((int(m.group(1)), str(p)))
    if (run / "final" / "config.json").is_file():
        # final's step: the run's last logged step (train.py logs every step by default)
        log = run / "metrics.jsonl"
        steps = [json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip()] if log.exists() else []
        found.append((steps[-1] if steps else max(s for s, _ in found) + 1, str(run / "final")))
    return sorted(found)


def watch_run(run_dir, out_dir, evaluate, poll_s=30, idle_minutes=60):
    """Score a training run while it goes: evaluate(step, checkpoint) -> {headline name: value} for each
    checkpoint of run_checkpoints, in step order, each a line {"step", "ckpt", "headline", "seconds"} of
    OUT/metrics_by_step.jsonl (steps already there are skipped: a stopped watcher resumes) and a point of
    OUT/metrics_by_step.png. Waits for a run that has not started; gives up (UserError) after idle_minutes
    without a new export while the run's metrics.jsonl does not grow either. Returns the lines once final is
    scored."""
    out, run = Path(out_dir), Path(run_dir)
    run_started(run)  # a folder that is something else: said before anything is written
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "metrics_by_step.jsonl"
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] if log_path.exists() else []
    last_news, last_said, seen_size = time.time(), 0.0, -1  # says at once that it waits (a typo shows), then every WATCH_SAY_S
    while True:
        started = run_started(run)
        done = {line["step"] for line in lines}
        for step, ckpt in [(s, c) for s, c in run_checkpoints(run) if s not in done] if started else []:
            print(f"\n=== watch {run}: step {step} ({ckpt})", flush=True)
            t0 = time.time()
            headline = evaluate(step, ckpt)
            lines.append({"step": step, "ckpt": ckpt, "headline": headline, "seconds": round(time.time() - t0, 1)})
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(lines[-1]) + "\n")
            plot_metrics_by_step(lines, out / "metrics_by_step.png", title=str(run))
            last_news = last_said = time.time()
        if any(Path(line["ckpt"]).name == "final" for line in lines):
            print(f"watch: final scored; {log_path}, {out / 'metrics_by_step.png'}", flush=True)
            return sorted(lines, key=lambda line: line["step"])
        size = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0
        if size != seen_size:
            seen_size, last_news = size, time.time()
        waited, scored = time.time() - last_news, sorted(line["step"] for line in lines)
        if waited > 60 * idle_minutes:
            raise UserError(f"--watch {run}: no new export and no training progress ({run / 'metrics.jsonl'}) for "
                            f"{idle_minutes:g} min; scored steps {scored} are in {log_path}" if started else
                            f"--watch {run}: no train.py run started there (no args.json) in {idle_minutes:g} min "
                            f"(--watch-idle): give the run's --out folder")
        if time.time() - last_said >= WATCH_SAY_S:
            print(f"watch {run}: " + (f"waiting for the next export (scored steps {scored})" if started else
                                      "waiting for the run to start (its args.json)")
                  + f", {waited / 60:.0f} of --watch-idle {idle_minutes:g} min without news", flush=True)
            last_said = time.time()
        time.sleep(poll_s)


def plot_metrics_by_step(lines, png_path, title=""):
    """One panel per headline metric against the training step (matplotlib, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sorted(lines, key=lambda line: line["step"])
    names = sorted({k for line in lines for k in line["headline"]})
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.6 * max(len(names), 1), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        pts = [(line["step"], line["headline"][name]) for line in lines if line["headline"].get(name) is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Main


def get_args(argv=None):
    ap = OneLineParser(description="Score checkpoints on every benchmark file of a folder, one table per checkpoint "
                                   "(benchmark, split, metric, value, n); or each checkpoint of a training run (--watch).")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ckpt", nargs="+", help="one or more checkpoint folders (Hugging Face format)")
    mode.add_argument("--watch", metavar="RUN", help="a train.py --out folder: score its start model (step 0), each "
                                                     "RUN/export/step_N as it appears and RUN/final; resumable")
    ap.add_argument("--bench", required=True, help="folder of prepared benchmark files (every *.jsonl below it is one "
                                                   "benchmark split, named by its relative path), or one such file")
    ap.add_argument("--out", required=True, help="output folder: OUT/NAME/BENCHMARK/eval_{det,vqa}/, OUT/NAME/suite.md "
                                                 "(NAME: the checkpoint's, or step_N with --watch)")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="run only the benchmarks whose name matches one of these "
                                                              "globs (e.g. 'dota*' 'rsvqa/*'; * also matches /)")
    ap.add_argument("--names", nargs="+", help="a name per --ckpt for its output folder and column (default: the "
                                               "folder's name; runs/x/final and runs/x/export/step_N: x_final, x_step_N)")
    ap.add_argument("--watch-poll", type=float, default=30, metavar="S", help="--watch: seconds between looks for a new export")
    ap.add_argument("--watch-idle", type=float, default=60, metavar="MIN", help="--watch: give up after this many minutes "
                                                                                "without a new export or training progress")
    # passed to eval_det.py and eval_vqa.py as given; left out, each script's own default applies
    ap.add_argument("--batch-size", type=positive_int, help="generation batch size per process (default: the eval scripts' 8)")
    ap.add_argument("--max-new-tokens", type=max_new_tokens_arg,
                    help="generation limit per answer, a number or auto (default: eval_det.py's auto, eval_vqa.py's 128)")
    ap.add_argument("--backend", choices=["fast", "hf", "vllm"], help="generation loop (default: fast; see eval_det.py --help)")
    ap.add_argument("--tensor-parallel", type=positive_int, help="with --backend vllm: GPUs vLLM spreads the model over (default 1)")
    add_model_flags(ap)  # --dtype, --attn, --min-pixels, --max-pixels: the eval scripts' own
    ap.add_argument("--limit", type=positive_int, help="only the first N scored records of each benchmark and scorer (quick checks)")
    ap.add_argument("--prior", metavar="TRAIN_JSONL", help="eval_det.py --prior: the grounding text prior of this training file")
    ap.add_argument("--vis", type=int, default=0, help="eval_det.py --vis N (drawings per dataset); eval_vqa.py --vis (confusion PNGs)")
    ap.add_argument("--no-meteor", action="store_true", help="captions: skip METEOR (saves the ~5 s Java start per benchmark)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.names and args.watch:
        ap.error("--names goes with --ckpt (--watch names each checkpoint step_N)")
    return args


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()

    # ---- everything the user gave, checked before a model loads (on every rank: the same files)
    for ckpt in args.ckpt or []:
        check_checkpoint("--ckpt", ckpt)
    names = checkpoint_names(args.ckpt, args.names) if args.ckpt else []
    check_output_paths(args.out)
    check_path("--prior", args.prior, "file")
    benchmarks = find_benchmarks(args.bench, args.only, args.out)
    if args.watch:
        return watch(args, benchmarks)

    # ---- run each benchmark (the eval script predicts, resumably and sharded, then scores on rank 0) in one
    # torchrun group (none when run plainly): the eval scripts' run() leave it up, and a second group would hang
    model.init_dist()
    try:
        metrics_of = run_benchmarks(args, list(zip(args.ckpt, names)), benchmarks)
    finally:
        end_dist()
    if not is_main():  # ---- tables, rank 0 only
        return None
    tables = write_tables(args, list(zip(args.ckpt, names)), benchmarks, metrics_of)
    print0(f"suite done in {time.time() - t0:.0f} s")
    return tables


if __name__ == "__main__":
    run_cli(main)  # a UserError: one line "error: ..." on stderr, exit 2
