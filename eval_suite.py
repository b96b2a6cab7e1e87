"""
eval_suite.py — score one or more checkpoints on a folder of prepared benchmarks, one table per checkpoint.

    python eval_suite.py --ckpt runs/x/final --bench data/bench --out eval/suite
    python eval_suite.py --ckpt ckpt/RSCoVLM-7B runs/x/final --bench data/bench --out eval/suite --only "dota*" "rsvqa*"
    torchrun --nproc-per-node 8 eval_suite.py --ckpt runs/x/final --bench data/bench --out eval/suite

Every *.jsonl record file under --bench (data_prep.py's output, found recursively) is one benchmark split,
named by its path relative to --bench without ".jsonl". Its tasks decide what scores it: det/ground records go
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

Values are percentages: eval_vqa.py's as it reports them, eval_det.py's fractions x 100. Each task/dataset
gives its headline metric (the eval script's "headline") first, then the secondary ones listed in SECONDARY.
"""

import argparse
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
from common import (UserError, add_debug_flag, check_output_paths, is_main, max_new_tokens_arg, print0, read_records,
                    run_cli)


# -----------------------------------------------------------------------------
# Scorers: which eval script reads which tasks, and how its numbers become percentages

SCORERS = {  # name (also the output subfolder): (tasks it scores, its parser, its run, factor to percent)
    "eval_det": (("det", "ground"), eval_det.get_args, eval_det.run, 100.0),
    "eval_vqa": (("vqa", "cls", "caption"), eval_vqa.parse_args, eval_vqa.run, 1.0),
}

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
    """[{"name", "path", "split", "scorers"}] of the *.jsonl files under bench (name order), those matching a
    --only glob when given. Every file is read (read_records checks each line) before any model loads, so
    a bad file stops the run at once, naming it."""
    root = Path(bench)
    if not root.is_dir():
        raise UserError(f"--bench {bench}: no such folder" if not root.exists() else f"--bench {bench} is a file: give the folder of record files")
    out = Path(out).resolve()
    files = [p for p in sorted(root.rglob("*.jsonl"))
             if out not in p.resolve().parents]  # our own predictions, when --out is inside --bench
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
            tasks = {r["task"] for r in read_records(p)}
        except UserError as e:
            raise UserError(f"{e} (choose the benchmarks to run with --only GLOB)") from None
        scorers = [s for s, (scored, *_) in SCORERS.items() if tasks & set(scored)]
        if not scorers:
            raise UserError(f"{p}: no record to score (its tasks: {', '.join(sorted(tasks))}; scored are det, "
                                  f"ground, vqa, cls, caption); choose the benchmarks to run with --only GLOB")
        benchmarks.append({"name": names[p], "path": str(p), "split": split_of(p), "scorers": scorers})
    return benchmarks


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


def check_checkpoint(ckpt):
    """A checkpoint folder with a config.json of a supported family, said before any benchmark runs."""
    if not Path(ckpt).is_dir():
        raise UserError(f"--ckpt {ckpt}: no such folder" if not Path(ckpt).exists() else f"--ckpt {ckpt} is a file: give a checkpoint folder")
    try:
        model.family(ckpt)
    except UserError as e:  # names the folder and the checkpoints below it
        raise UserError(f"--ckpt {e}") from None


# -----------------------------------------------------------------------------
# One benchmark through an eval script's own run()


def scorer_args(scorer, ckpt, data, out, args):
    """The namespace `python SCORER.py --ckpt CKPT --data DATA --out OUT [the flags given here]` would run with:
    built by that script's parser, so its defaults (eval_det auto tokens, eval_vqa 128) and checks apply."""
    argv = ["--ckpt", ckpt, "--data", data, "--out", out]
    for flag in ("batch_size", "max_new_tokens", "backend", "tensor_parallel", "min_pixels", "max_pixels", "dtype",
                 "attn", "limit"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
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
    factor = SCORERS[scorer][3]
    rows, done = [], set()

    def add(section, ds, label, value, is_headline):
        res = metrics.get(section, {}).get(ds, {})
        n = res.get("n", res.get("images")) if isinstance(res, dict) else None
        rows.append({"benchmark": bench["name"], "split": bench["split"], "metric": f"{section}/{ds}: {label}",
                     "value": value * factor, "n": n, "headline": is_headline, "scorer": scorer})

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
          + (f", first {args.limit} records of each" if args.limit else "")
          + ". Values in percent (eval_det.py's fractions x 100); each task/dataset's headline metric first.", "",
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


# -----------------------------------------------------------------------------
# Main


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="Score checkpoints on every benchmark file of a folder; one table per "
                                             "checkpoint (benchmark, split, metric, value, n).")
    ap.add_argument("--ckpt", nargs="+", required=True, help="one or more checkpoint folders (Hugging Face format)")
    ap.add_argument("--bench", required=True, help="folder of prepared benchmark files: every *.jsonl below it "
                                                   "(recursively) is one benchmark split, named by its relative path")
    ap.add_argument("--out", required=True, help="output folder: OUT/NAME/BENCHMARK/eval_{det,vqa}/, OUT/NAME/suite.md "
                                                 "and suite.json per checkpoint, OUT/suite.md side by side")
    ap.add_argument("--only", nargs="+", metavar="GLOB", help="run only the benchmarks whose name matches one of these "
                                                              "globs (e.g. 'dota*' 'rsvqa/*'; * also matches /)")
    ap.add_argument("--names", nargs="+", help="a name per --ckpt for its output folder and column (default: the "
                                               "folder's name; runs/x/final and runs/x/export/step_N: x_final, x_step_N)")
    # passed to eval_det.py and eval_vqa.py as given; left out, each script's own default applies
    ap.add_argument("--batch-size", type=int, help="generation batch size per process (default: the eval scripts' 8)")
    ap.add_argument("--max-new-tokens", type=max_new_tokens_arg,
                    help="generation limit per answer, a number or auto (default: eval_det.py's auto, eval_vqa.py's 128)")
    ap.add_argument("--backend", choices=["fast", "hf", "vllm"], help="generation loop (default: fast; see eval_det.py --help)")
    ap.add_argument("--tensor-parallel", type=int, help="with --backend vllm: GPUs vLLM spreads the model over (default 1)")
    ap.add_argument("--min-pixels", type=int, help="pixel budget override (default: the checkpoint's processor's)")
    ap.add_argument("--max-pixels", type=int, help="pixel budget override (default: the checkpoint's processor's)")
    ap.add_argument("--dtype", help="model dtype, e.g. bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--attn", help="attention implementation (default: flash_attention_2 when installed on GPU, else sdpa)")
    ap.add_argument("--limit", type=int, help="only the first N scored records of each benchmark and scorer (quick checks)")
    ap.add_argument("--no-meteor", action="store_true", help="captions: skip METEOR (saves the ~5 s Java start per benchmark)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    return args


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()

    # ---- everything the user gave, checked before a model loads (on every rank: the same files)
    for ckpt in args.ckpt:
        check_checkpoint(ckpt)
    names = checkpoint_names(args.ckpt, args.names)
    check_output_paths(args.out)
    benchmarks = find_benchmarks(args.bench, args.only, args.out)

    # the torchrun group (none when run plainly), one for every benchmark: the eval scripts' run() leave it up,
    # and a second group in one torchrun job would hang
    model.init_dist()
    try:
        # ---- the plan: (checkpoint, benchmark, scorer, namespace, the metrics.json to reuse or None)
        plan = []
        for ckpt, name in zip(args.ckpt, names):
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
        print0(f"{len(benchmarks)} benchmarks x {len(names)} checkpoints in {args.bench}: {len(plan)} evaluations, "
               f"{len(plan) - sum(run_it)} already scored (their metrics.json is read back)")

        # ---- run each benchmark (the eval script predicts, resumably and sharded, then scores on rank 0); a
        # checkpoint is loaded once for all its benchmarks (one at a time: the plan goes checkpoint by checkpoint)
        metrics_of, loaded = {}, {}
        for k, ((name, b, scorer, ns, metrics), run) in enumerate(zip(plan, run_it), 1):
            if run:
                print0(f"\n=== [{k}/{len(plan)}] {name}: {b['name']} ({scorer}.py -> {ns.out})")
                if ns.ckpt not in loaded:
                    loaded.clear()
                    loaded[ns.ckpt] = model.load_for_generation(ns.ckpt, ns.backend, dtype=ns.dtype, attn=ns.attn,
                                                                min_pixels=ns.min_pixels, max_pixels=ns.max_pixels)
                metrics = SCORERS[scorer][2](ns, loaded[ns.ckpt])  # None on the other ranks: rank 0 scores
            else:
                print0(f"\n=== [{k}/{len(plan)}] {name}: {b['name']} ({scorer}): scored before, {ns.out}/metrics.json")
            metrics_of[(name, b["name"], scorer)] = metrics
    finally:
        loaded = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ---- tables, rank 0 only
    if not is_main():
        return None
    tables = {}
    for ckpt, name in zip(args.ckpt, names):
        rows, runs = [], {}
        for b in benchmarks:
            for scorer in b["scorers"]:
                rows += table_rows(b, scorer, metrics_of[(name, b["name"], scorer)])
                runs.setdefault(b["name"], {})[scorer] = str(Path(args.out, name, b["name"], scorer, "metrics.json"))
        tables[name] = rows
        print0(f"\n{write_table(Path(args.out, name), name, ckpt, rows, runs, args)}")
        print0(f"-> {Path(args.out, name, 'suite.md')}, suite.json")
    if len(names) > 1:
        print0(f"\n{write_side_by_side(args.out, names, tables)}")
        print0(f"-> {Path(args.out, 'suite.md')}, suite.json")
    print0(f"suite done in {time.time() - t0:.0f} s")
    return tables


if __name__ == "__main__":
    run_cli(main)  # a UserError: one line "error: ..." on stderr, exit 2
