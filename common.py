"""
common.py — what every rscovlm script stands on, without torch (imports in a fraction of a second).

The one-line error rule (UserError, run_cli), rank-aware printing from torchrun's environment, progress that
speaks in a log file, and the two files that pass between stages: records (JSONL, one sample per line,
docs/data.md "Record format") and predictions (JSONL lines {"id", "text", ...}). Also the flags and checks
the evaluation scripts share.

    from common import UserError, read_records, read_predictions, print0, progress
"""

import argparse
import difflib
import json
import os
import re
import sys
import time
from pathlib import Path


# -----------------------------------------------------------------------------
# User errors: one line on stderr, exit code 2 (docs/troubleshooting.md)

class UserError(ValueError):
    """A mistake in what the user gave (a path, a flag, a line of an input file). The message names the input
    (file:line, record id, flag) and says what to do. Scripts run under `run_cli` print it as one line and exit
    with 2; programming errors (any other exception) keep their tracebacks. A ValueError, so callers that
    catch ValueError still do."""


def run_cli(main):
    """Run a script's main() with the project's error rule: a UserError prints `error: MESSAGE` as one line on
    stderr and exits 2 (no traceback; `--debug` or RSCOVLM_DEBUG=1 brings it back). (train.py under launch.sh
    reports through launch.sh's status files instead: train.launched.)"""
    debug = "--debug" in sys.argv[1:] or os.environ.get("RSCOVLM_DEBUG", "") not in ("", "0")
    try:
        main()
    except UserError as e:
        if debug:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)  # one line, whatever the message held
        sys.exit(2)
    sys.exit(0)


def add_debug_flag(parser):
    """--debug on a script's parser (read by run_cli)."""
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of input errors too")


# -----------------------------------------------------------------------------
# Ranks and progress: rank-aware printing (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), plain progress lines
# in log files


def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main():
    return dist_info()[0] == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


class Progress:
    """Progress of a long loop, on stdout: a tqdm bar on a terminal; in a log file (nohup, Slurm) a plain line
    "DESC: done/total (pct), rate/s, ETA" at most every `every` seconds and once at the end, so a job that
    runs for hours never goes silent. Rank 0 only. Use as a context manager: `with Progress(n, "predict") as
    bar: ... bar.update(k)`."""

    def __init__(self, total, desc, unit="it", every=30.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stdout
        self.on, self.done, self.t0 = is_main(), 0, time.time()
        self.last = self.t0
        self.bar = None
        if self.on and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.on and time.time() - self.last >= self.every:
            self.line()

    def line(self):
        self.last = time.time()
        dt = max(self.last - self.t0, 1e-9)
        rate = self.done / dt
        left = (self.total - self.done) / rate if rate > 0 and self.total else None
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {format_seconds(left)}" if left is not None and self.done < self.total else ""
        print(f"{self.desc}: {self.done}/{self.total}{pct}, {rate:.2f} {self.unit}/s, {format_seconds(dt)} so far{eta}",
              file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.on and self.done:
            self.line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(items, desc, total=None, unit="it"):
    """Iterate over items with a Progress (total: len(items) unless given)."""
    with Progress(len(items) if total is None else total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()


def format_seconds(s):
    """'42 s', '7 min 05 s', '3 h 12 min'."""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# -----------------------------------------------------------------------------
# Records: JSONL, one sample per line (docs/data.md "Record format")


IMAGE_PLACEHOLDER = "<image>"


TASKS = ("det", "ground", "vqa", "caption", "cls", "chat")


def read_records(path):
    """Read a JSONL file of records. Image paths become absolute (relative ones are relative to the JSONL's
    folder). Any problem raises UserError naming the file and line. Each record remembers where it came from in
    rec["_where"] ("file:line"), so later errors (a missing image) can name it."""
    path = Path(path)
    if path.is_dir():
        found = sorted(q.name for q in path.glob("*.jsonl"))[:5]
        raise UserError(f"{path} is a folder: give a record file (.jsonl)"
                        + (f", e.g. {path / found[0]} (in it: {', '.join(found)})" if found else ""))
    if not path.is_file():
        raise UserError(f"record file {path} not found")
    root = path.resolve().parent
    records, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"bad JSON at {where}: {e}") from None
            if not isinstance(rec, dict):
                raise UserError(f"bad record at {where}: expected a JSON object")
            for key in ("id", "messages"):
                if key not in rec:
                    raise UserError(f"bad record at {where}: missing key '{key}'")
            rec["id"] = str(rec["id"])
            rec.setdefault("task", "chat")
            rec.setdefault("dataset", path.stem)
            rec.setdefault("images", [])
            rec.setdefault("meta", {})
            if rec["task"] not in TASKS:
                raise UserError(f"bad record at {where}: task '{rec['task']}' is not one of {TASKS}")
            if rec["id"] in seen:
                raise UserError(f"bad record at {where}: duplicate id '{rec['id']}'")
            seen.add(rec["id"])
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in msgs):
                raise UserError(f"bad record at {where}: messages must be a list of {{'role', 'content': str}}")
            n_tags = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs)
            if n_tags != len(rec["images"]):
                raise UserError(f"bad record at {where}: {n_tags} '<image>' tags but {len(rec['images'])} images")
            if not isinstance(rec["images"], list) or not all(isinstance(p, str) for p in rec["images"]):
                raise UserError(f"bad record at {where}: images must be a list of paths")
            rec["images"] = [str(p) if os.path.isabs(p) else str(root / p) for p in rec["images"]]
            rec["_where"] = where
            records.append(rec)
    if not records:
        raise UserError(f"{path} has no records (an empty file)")
    return records


def record_where(record):
    """How messages name a record: "file.jsonl:17 (record 'P0001__1024__0___0')", or the id alone for a record
    that was not read from a file."""
    rid = f"record '{record.get('id')}'"
    return f"{record['_where']} ({rid})" if record.get("_where") else rid


# -----------------------------------------------------------------------------
# Predictions: JSONL lines {"id", "text", ...} (model.predict writes them; any model's or API's answers read the same)


def read_predictions(path, repair=False):
    """{id (str): line dict} from a predictions JSONL: ours (model.predict) or any file whose lines carry "id"
    and "text", so answers of other models and APIs are read the same way. "text": null (what APIs return for
    a refusal) is read as "". A missing file is {} (nothing predicted yet). A last line cut off by an
    interrupted run (no newline at the end, not JSON) is ignored; repair=True removes it from the file, so
    appending can go on. Any other bad line, and an id seen twice, raises UserError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    preds, first_line = {}, {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if lineno == len(lines):  # no newline after it: the partial write of an interrupted run
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(len(data) - len(line))
                break
            raise UserError(f"bad JSON at {where}: {e}") from None
        if not isinstance(rec, dict) or "id" not in rec or "text" not in rec:
            raise UserError(f"bad prediction line {where}: needs 'id' and 'text' (a JSON object)")
        if rec["text"] is None:
            rec["text"] = ""
        if not isinstance(rec["text"], str):
            raise UserError(f"bad prediction line {where}: 'text' must be a string, got {type(rec['text']).__name__}")
        rec["id"] = str(rec["id"])
        if rec["id"] in preds:
            raise UserError(f"bad prediction line {where}: duplicate id '{rec['id']}' (first on line {first_line[rec['id']]})")
        preds[rec["id"]], first_line[rec["id"]] = rec, lineno
    return preds


def not_predicted(records, out_path):
    """The records without an answer in out_path yet, nor in the per-rank part files an interrupted torchrun
    run leaves next to it: what predict will generate."""
    out_path = Path(out_path)
    done = set(read_predictions(out_path))
    for part in sorted(out_path.parent.glob(out_path.name + ".rank*")):
        done |= set(read_predictions(part))
    return [r for r in records if r["id"] not in done]


def check_record_images(records):
    """Every image of the records about to be generated for exists: a missing one stops the run before the
    model loads, not hours into generation, naming the record's file:line and id."""
    for r in records:
        for path in r["images"]:
            if not Path(path).is_file():
                raise UserError(f"{record_where(r)}: image {path} not found")


def generation_settings(pred_path):
    """{"max_new_tokens": N} from the .settings.json predict writes next to a predictions file, or None (a file of
    another model)."""
    try:
        return {"max_new_tokens": json.loads(Path(f"{pred_path}.settings.json").read_text())["max_new_tokens"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -----------------------------------------------------------------------------
# Flags and checks the evaluation scripts share (eval_det.py, eval_vqa.py, eval_suite.py)


class OneLineParser(argparse.ArgumentParser):
    """argparse under the project's error rule: a bad flag is a UserError, which run_cli prints as one line
    (exit 2) instead of the usage block, with the closest valid choice named ("--attn sdap": did you mean
    'sdpa'?)."""

    def error(self, message):
        m = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)", message)  # choices quoted or not (Python 3.12+)
        choices = [c.strip().strip("'") for c in m[2].split(",")] if m else []
        close = ([c for c in choices if m[1] and c.startswith(m[1])] or difflib.get_close_matches(m[1], choices, n=1, cutoff=0.5)) if m else []
        raise UserError(message + (f"; did you mean '{close[0]}'?" if close else ""))


DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # train.py's spelling -> the torch dtype model.load takes
ATTN = ("sdpa", "flash_attention_2", "eager")  # transformers' implementations (varlen is for packed training)


def positive_int(text):
    """argparse type of counts (--limit, --batch-size): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a whole number >= 1, not {text!r}")
    return value


def max_new_tokens_arg(text):
    """argparse type of the eval scripts' --max-new-tokens: 'auto' or a whole number >= 1."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"give 'auto' or a number of tokens >= 1, not {text!r}") from None


def add_model_flags(parser):
    """How a checkpoint is loaded: --dtype and --attn (train.py's spelling), --min-pixels / --max-pixels."""
    parser.add_argument("--dtype", choices=list(DTYPES), help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--attn", choices=ATTN, help="attention implementation (default: flash_attention_2 when "
                                                     "installed on GPU, else sdpa)")
    parser.add_argument("--min-pixels", type=positive_int, help="pixel budget override (default: the checkpoint's processor's)")
    parser.add_argument("--max-pixels", type=positive_int, help="pixel budget override (default: the checkpoint's processor's)")


def load_kwargs(args):
    """model.load's keyword arguments from add_model_flags' flags."""
    return {"dtype": DTYPES.get(args.dtype), "attn": args.attn, "min_pixels": args.min_pixels,
            "max_pixels": args.max_pixels}


def add_generation_flags(parser, max_new_tokens_default, max_new_tokens_help):
    """The eval scripts' generation flags: --batch-size, --max-new-tokens (a number or auto), --backend,
    --tensor-parallel."""
    parser.add_argument("--batch-size", type=positive_int, default=8, help="generation batch size per process (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=max_new_tokens_default,
                        help=f"generation limit per answer: a number, or auto = the longest reference answer x 1.25 + 32 "
                             f"(default %(default)s: {max_new_tokens_help})")
    parser.add_argument("--backend", choices=["fast", "hf", "vllm"], default="fast",
                        help="generation loop: model.py's greedy loop, transformers' generate, or vLLM (default %(default)s)")
    parser.add_argument("--tensor-parallel", type=positive_int, default=1, help="with --backend vllm: GPUs vLLM spreads the model over")


def check_path(flag, path, kind):
    """UserError unless path (when given) is an existing file or folder (kind), naming the flag; a folder given
    for --preds suggests a .jsonl file in it (predictions.jsonl, what --ckpt writes, first)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {path}: no such {kind}")
    if kind == "file" and p.is_dir():
        inside = sorted(q.name for q in p.glob("*.jsonl")) if flag == "--preds" else []
        inside = ["predictions.jsonl"] if "predictions.jsonl" in inside else inside
        raise UserError(f"{flag} {path} is a folder: give a file" + (f", e.g. {p / inside[0]}" if inside else ""))
    if kind == "folder" and not p.is_dir():
        raise UserError(f"{flag} {path} is a file: give a folder")


def check_checkpoint(flag, path):
    """--ckpt / --processor: a Hugging Face checkpoint folder. A train.py checkpoint (RUN/ckpt/step_N: sharded
    weights + loop.pt, what --resume reads) is named as one, with the exports of its run to give instead; a
    folder without config.json lists the checkpoints below it (model.family; model.py is imported only here,
    when a checkpoint is used)."""
    check_path(flag, path, "folder")
    p = Path(path)
    if (p / "loop.pt").is_file() or (p.parent.name == "ckpt" and (p.parent.parent / "args.json").is_file()):
        run = p.parent.parent
        step = re.fullmatch(r"step_0*(\d+)", p.name)
        exports = sorted((q for q in run.glob("export/step_*") if re.fullmatch(r"step_\d+", q.name)),
                         key=lambda q: int(q.name[5:]))
        same = [q for q in exports if step and q.name == f"step_{step[1]}"]
        there = same + ([run / "final"] if (run / "final" / "config.json").is_file() else []) or exports[-2:]
        raise UserError(f"{flag} {path} is a training checkpoint (what train.py --resume reads); evaluate "
                        f"{run / 'export' / 'step_N'} or {run / 'final'}: "
                        + (", ".join(map(str, there)) + " exist" if there else "none written yet (train.py --export-every N)"))
    import model

    try:
        model.family(p)
    except UserError as e:
        raise UserError(f"{flag} {e}") from None


def check_output_paths(out=None, json_out=None):
    """An eval script's --out must be a folder (made if missing) and --json-out a file name: said before any
    work, not after hours of generation."""
    if out and Path(out).is_file():
        raise UserError(f"--out {out} is a file: give a folder (it is created if missing)")
    if json_out and Path(json_out).is_dir():
        raise UserError(f"--json-out {json_out} is a folder: give a file name, e.g. {Path(json_out) / 'metrics.json'}")


def check_overlap(preds, records, pred_path, data, limit=None):
    """A predictions file that is empty or shares no id with the records to score would score every answer as
    missing (all 0): a wrong pair of files, said with examples of both kinds of id."""
    if not preds:
        raise UserError(f"{pred_path} has no predictions (an empty file)")
    ids = [r["id"] for r in records]
    if not set(ids) & preds.keys():
        show = lambda xs: ", ".join(repr(i) for i in list(xs)[:3]) + (", ..." if len(xs) > 3 else "")  # noqa: E731
        raise UserError(f"none of the {len(preds)} predictions in {pred_path} has the id of a "
                        f"{'/'.join(sorted({r['task'] for r in records}))} record of {data}"
                        f"{f' (first {limit})' if limit else ''}: prediction ids {show(preds)}, record ids {show(ids)}; "
                        f"give the predictions made for this --data")


# -----------------------------------------------------------------------------
# Predicting with a checkpoint, and answers cut at the generation limit (the eval scripts' shared steps)


def predict_for_eval(args, records, loaded=None, make_postprocess=None, **predict_kwargs):
    """--ckpt: answers for the records into OUT/predictions.jsonl by model.predict (resumable: ids already in the
    file are skipped; sharded over torchrun's ranks). Images are checked before the model loads. loaded: (model,
    processor) already loaded with these flags (eval_suite.py loads a checkpoint once for all its benchmarks);
    make_postprocess(processor) -> model.predict's postprocess. Returns (the predictions path on rank 0, None on
    the others; {id: line}; the generation settings for metrics.json). The process group stays up: the caller
    ends it (end_dist), since eval_suite.py runs many benchmarks in one group."""
    import model  # here, not at the top: scoring a predictions file never loads torch

    out_path = Path(args.out) / "predictions.jsonl"
    todo = not_predicted(records, out_path)
    check_record_images(todo)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    net, processor = loaded or model.load_for_generation(args.ckpt, args.backend, **load_kwargs(args))
    print0(f"{len(records)} records: {len(records) - len(todo)} already predicted in {out_path}, {len(todo)} to generate")
    limit, how = model.resolve_max_new_tokens(args.max_new_tokens, records, processor, model.context_length(net))
    print0(how)
    lines = model.predict(net, processor, records, out_path, batch_size=args.batch_size, max_new_tokens=limit,
                          postprocess=make_postprocess(processor) if make_postprocess else None, backend=args.backend,
                          vllm_args={"tensor_parallel_size": args.tensor_parallel}, **predict_kwargs)
    generation = {"max_new_tokens": limit, "requested": args.max_new_tokens, "how": how, "backend": args.backend}
    return (out_path if is_main() else None), lines, generation


def run_eval(run, args):
    """An eval script's main after parsing: run(args), then end torchrun's process group, which run() leaves up
    (eval_suite.py runs many benchmarks in one group; a second group in one torchrun job would hang)."""
    try:
        return run(args)
    finally:
        end_dist()  # under torchrun: the other ranks left after predicting


def end_dist():
    """End torchrun's process group, if a model load started one (torch is never imported here for it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def count_cut(records, preds, cut):
    """(how many of the records' answers hit the generation limit, how many of their predictions do not say).
    preds: the ids answered; cut: {id: the prediction line's "cut"}. model.predict writes "cut": true when an
    answer reached --max-new-tokens without ending; files of other models or older runs have no "cut": when
    none of these records' predictions says, the count is "unknown"."""
    said = [cut.get(r["id"]) for r in records if r["id"] in preds]
    known = [c for c in said if isinstance(c, bool)]
    return (sum(known) if known else "unknown"), len(said) - len(known)


def format_cut(cut, unknown, n):
    """count_cut as a line, e.g. "cut at the generation limit: 3 of 120 answers"."""
    if cut == "unknown":
        return "cut at the generation limit: unknown (the predictions file does not say; model.predict writes it)"
    return f"cut at the generation limit: {cut:,} of {n:,} answers" + (f" ({unknown:,} without a 'cut' field)" if unknown else "")


def warn_cut(name, cut, n, generation):
    """A warning on stderr when answers were cut (what follows the cut is missing from the scores), saying what
    happened: when most answers ran to auto's limit (already 1.25 x the longest reference + 32 tokens) the model
    does not stop yet, as an untrained one does, and a larger limit would only lengthen them."""
    if cut == "unknown" or not cut:
        return
    limit, requested = (generation or {}).get("max_new_tokens"), (generation or {}).get("requested")
    head = (f"WARNING: {name}: {cut} of {n} answers hit the generation limit" + (f" of {limit} tokens" if limit else "")
            + " without an end token")
    if requested == "auto" and 2 * cut > n:
        why = ("the model does not stop yet (untrained?): auto's limit is already 1.25 x the longest reference answer "
               "+ 32 tokens, so a larger --max-new-tokens would only make these answers longer")
    elif requested == "auto":
        why = ("auto's limit was too small for these answers, what follows the cut is missing from the scores: "
               "generate again with a larger --max-new-tokens N into a new --out")
    else:
        why = ("what follows the cut is missing from the scores: generate again with a larger --max-new-tokens (or "
               "auto) into a new --out" + ("; with most answers cut, the model may not stop yet (untrained?)" if 2 * cut > n else ""))
    print(f"{head}; {why}", file=sys.stderr)


def write_metrics(metrics, args):
    """metrics (with the arguments) to --json-out, else OUT/metrics.json when --out is given; the path or None."""
    path = Path(args.json_out) if args.json_out else (Path(args.out) / "metrics.json" if args.out else None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=1, default=str))
        print(f"\nmetrics -> {path}")
    return path
