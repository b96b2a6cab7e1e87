"""
common.py — what every rscovlm script stands on, without torch (imports in a fraction of a second).

The one-line error rule (UserError, run_cli), rank-aware printing from torchrun's environment, progress that
speaks in a log file, and the two files that pass between stages: records (JSONL, one sample per line,
docs/data.md "Record format") and predictions (JSONL lines {"id", "text", ...}). Also the flags and checks
the evaluation scripts share.

    from common import UserError, read_records, read_predictions, print0, progress
"""

import argparse
import json
import os
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
# Flags and checks the evaluation scripts share


def check_output_paths(out=None, json_out=None):
    """An eval script's --out must be a folder (made if missing) and --json-out a file name: said before any
    work, not after hours of generation."""
    if out and Path(out).is_file():
        raise UserError(f"--out {out} is a file: give a folder (it is created if missing)")
    if json_out and Path(json_out).is_dir():
        raise UserError(f"--json-out {json_out} is a folder: give a file name, e.g. {Path(json_out) / 'metrics.json'}")


def max_new_tokens_arg(text):
    """argparse type of the eval scripts' --max-new-tokens: 'auto' or a whole number >= 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"give 'auto' or a number of tokens >= 1, not {text!r}")
    return value


def add_generation_flags(parser, max_new_tokens_default, max_new_tokens_help):
    """The eval scripts' generation flags: --batch-size, --max-new-tokens (a number or auto), --backend,
    --tensor-parallel."""
    parser.add_argument("--batch-size", type=int, default=8, help="generation batch size per process (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=max_new_tokens_arg, default=max_new_tokens_default,
                        help=f"generation limit per answer: a number, or auto = the longest reference answer (rendered "
                             f"for the checkpoint) x 1.25 + 32, within the model's context (default %(default)s; "
                             f"{max_new_tokens_help})")
    parser.add_argument("--backend", choices=["fast", "hf", "vllm"], default="fast",
                        help="generation loop: fast = model.py's greedy loop, finished answers leave the batch; hf = "
                             "transformers' generate (the same tokens, slower on mixed lengths); vllm = vLLM when "
                             "installed (one process; the same prompts and pixels) (default %(default)s)")
    parser.add_argument("--tensor-parallel", type=int, default=1, help="with --backend vllm: GPUs vLLM spreads the model over")
