"""Convert remote-sensing datasets to rscovlm records (JSONL, one sample per line; see README "Record format").

One subcommand per source. Each writes `OUT/{name}.jsonl` (+ `OUT/images/` for tiled sources and synth) and
`OUT/{name}.info.json` (the arguments and the summary printed at the end: records, objects, empty patches,
skipped items and why).

    python data_prep.py dota --root DOTA/train DOTA/val --split train --name dota_trainval --out data/dota
    python data_prep.py dota --root DOTA/train DOTA/val --split train --patch 512 --out data/dota   # RSCoVLM's 512
    python data_prep.py dota --root DOTA/val --split val --out data/dota          # keeps empty patches + ground truth
    python data_prep.py dota --root DOTA/test --split test --out data/dota        # no labels, every patch
    python data_prep.py dota --root DOTA/train --split train --rates 0.5,1.0,1.5 --gap 500 --out data/dota_ms
    python data_prep.py fair1m --root FAIR1M/train/part1 --split train --out data/fair1m
    python data_prep.py dior --root DIOR-R --split trainval --out data/dior
    python data_prep.py rsvg --root DIOR-RSVG --split test --out data/rsvg
    python data_prep.py rsvqa --root RSVQA_LR --variant LR --split test --out data/rsvqa
    python data_prep.py captions --json RSICD/dataset_rsicd.json --images RSICD/RSICD_images --split test --out data/cap
    python data_prep.py cls --root AID --train-ratio 0.2 --out data/aid
    python data_prep.py dota --root DOTA/train --split train --patch 512 --prompts rscovlm --box-forms hbox,rbox,poly --out data/rs
    python data_prep.py lrs-vqa --json LRS_VQA/LRS_VQA_merged.jsonl --images ROOT --split test --out data/lrs
    python data_prep.py mme-realworld --json MME-RealWorld/MME_RealWorld_remote_sensing.json --out data/mme
    python data_prep.py refgeo --root refGeo --out data/refgeo
    python data_prep.py vrsbench --json VRSBench_EVAL_Cap.json VRSBench_EVAL_vqa.json VRSBench_EVAL_referring.json --images Images_val --out data/vrsbench
    python data_prep.py geochat --json GeoChat-Bench/referring.jsonl --images GeoChat_Instruct/images --out data/geochat
    python data_prep.py vhm --root VHM_eval_dataset --out data/vhm
    python data_prep.py synth --out data/synth --train 200 --val 50 --seed 0

Tiling (dota, fair1m) follows MMRotate's tools/data/dota/split/img_split.py:
  * windows of --patch px with step patch - gap; the last window of a row/column is shifted to end at the
    border; an image smaller than the window gets one window, padded with --pad-value (0 = MMRotate's CLI
    default; its split configs use the BGR mean 104,116,124, i.e. --pad-value 124,116,104 in RGB);
    windows with <= img-rate-thr of their area on the image are dropped unless none is above it.
  * an object goes to a window when (area inside the window) / (object area) >= --iof-thr (0.7), computed on
    the polygon (its convex hull if the label is self-intersecting); objects not wholly inside get difficult 2
    and keep their original, unclipped corners shifted into the patch (as MMRotate does).
  * multi-scale (--rates): the whole image is resized by the rate first and tiled with the same --patch and
    --gap (the DOTA devkit's way, so every patch is --patch px); MMRotate instead crops windows of patch/rate
    px and resizes them at training time; the patches differ only by rounding.
  * patch names: rate 1 -> `{name}__{patch}__{x}___{y}` (MMRotate); other rates -> `{name}__{rate}__{x}___{y}`
    (the devkit's, e.g. P0001__0.5__0___824). Never parse names: meta carries "source", "offset" [x, y]
    (patch origin in the image resized by the rate), "rate" and "source_size" [W, H]; a polygon in patch
    pixels maps back to the original image as (patch_xy + offset) / rate.
  * --split train drops patches with no object (keep them with --keep-empty); val keeps every patch with its
    ground truth (difficult included, for patch-level scoring); test needs no labels, keeps every patch and
    writes prompt-only records (no assistant turn, no meta.objects).
Re-running skips patch images that already exist; every file is written to a temporary name and renamed,
so an interrupted run leaves no half-written patch or JSONL that a later run would trust.

Bad input (unreadable image, malformed label line, NaN or missing corners, unknown class, a split index
past the last object) stops with one line `error: ...` naming the file and line (exit code 2; --debug shows
the traceback); with --skip-bad the image (never just one of its objects, which would teach the model to
miss it) is skipped and listed in the summary. A run that would write no record stops the same way, saying
what it looked at (and, when the data sits one folder down, which folder to give), and a run never
overwrites the output of another input: OUT/NAME.info.json remembers which --root / --json it was made from.

Answers in det/ground records are rendered with boxes.render_answer in the record's own pixels, for people
to read; model.tokenize re-renders them from meta in the model's coordinate convention. The det/ground
subcommands (dota, fair1m, dior, rsvg, synth) report per split how many answers need more than
--answer-budget tokens (Qwen writes one token per digit: a dense 1024-px DOTA patch takes over 15k), estimated
(one token per digit, punctuation run, word and line break) or, with --processor DIR, counted exactly.

synth writes `synth_{det,ground,vqa,caption,cls,all}_{train,val}.jsonl` and `images/{split}_{i:05d}.png`.
"""
import argparse
import json
import math
import os
import random
import re
import xml.etree.ElementTree as ET
from collections import Counter
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from shapely.geometry import MultiPoint, Polygon, box as shapely_box
from tqdm import tqdm

import boxes
import model

Image.MAX_IMAGE_PIXELS = None  # DOTA-v2 has 20000 x 20000 images

# -----------------------------------------------------------------------------
# Class lists (canonical names: lower case, hyphenated)

DOTA_CLASSES = {
    "1.0": ["plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
            "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
            "swimming-pool", "helicopter"],
}
DOTA_CLASSES["1.5"] = DOTA_CLASSES["1.0"] + ["container-crane"]
DOTA_CLASSES["2.0"] = DOTA_CLASSES["1.5"] + ["airport", "helipad"]
DIOR_CLASSES = ["airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney",
                "expressway-service-area", "expressway-toll-station", "dam", "golffield", "groundtrackfield",
                "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle",
                "windmill"]
# FAIR1M-1.0 names ("Liquid Cargo Ship") lower-cased with spaces -> hyphens
FAIR1M_CLASSES = ["boeing737", "boeing747", "boeing777", "boeing787", "c919", "a220", "a321", "a330", "a350",
                  "arj21", "other-airplane", "passenger-ship", "motorboat", "fishing-boat", "tugboat",
                  "engineering-ship", "liquid-cargo-ship", "dry-cargo-ship", "warship", "other-ship", "small-car",
                  "bus", "cargo-truck", "dump-truck", "van", "trailer", "tractor", "excavator", "truck-tractor",
                  "other-vehicle", "basketball-court", "tennis-court", "football-field", "baseball-field",
                  "intersection", "roundabout", "bridge"]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# -----------------------------------------------------------------------------
# Prompts (RSCoVLM / GeoChat practice). "<image>" marks where the image goes.

DET_PROMPT = "<image>\nDetect all objects of the following categories in the image: {categories}. {fmt}"
DET_FORMAT = {
    "poly": "Output one object per line as its four corner points x1,y1,x2,y2,x3,y3,x4,y4 followed by its category.",
    "hbox": "Output one object per line as its box x1,y1,x2,y2 followed by its category.",
    "rbox": "Output one object per line as its rotated box cx,cy,w,h,angle followed by its category.",
}
GROUND_PROMPT = '<image>\nLocate the object described as "{expression}". {fmt}'
GROUND_FORMAT = {
    "poly": "Output its four corner points x1,y1,x2,y2,x3,y3,x4,y4.",
    "hbox": "Output its box x1,y1,x2,y2.",
    "rbox": "Output its rotated box cx,cy,w,h,angle.",
}
VQA_SUFFIX = "Answer the question using a single word or phrase."  # GeoChat-Bench
CAPTION_PROMPT = "<image>\nDescribe this remote sensing image in one sentence."
CLS_PROMPT = "<image>\nClassify the image from the following classes: {classes}. Answer in one word or a short phrase."


# --prompts rscovlm: RSCoVLM's own wording (VisionXLab/RSCoVLM, plain-text form, its default): detection and
# grounding from rscovlm/training/data/dense_det_dataset.py and refgeo_dataset.py (and eval/data/dense_det.py,
# geoground.py), VQA from eval/data/geochat_bench.py and vrsbench.py, scene classification from
# eval/data/scene_cls.py, captions from eval/data/data_prepare/format_image_caption.py. Its image comes
# right before the text (its chat data strips the '\n' after <image>); det/ground get a system turn per box
# form, and their answers RSCoVLM's conventions (meta.answer_style "rscovlm", boxes.render_rscovlm).
PRESETS = ("default", "rscovlm")
RSCOVLM_SYSTEM = {
    "hbox": "As an AI assistant, you specialize in accurate image object detection, delivering coordinates in "
            "plain text format 'x1,y1,x2,y2 object'.",
    "rbox": "As an AI assistant, you specialize in accurate oriented object detection, delivering coordinates in "
            "plain text format 'x,y,w,h,a object'.",
    "poly": "As an AI assistant, you specialize in accurate oriented object detection, delivering coordinates of "
            "the polygon vertices in plain text format 'x1,y1,x2,y2,x3,y3,x4,y4 object'.",
}
RSCOVLM_FIND = "<image>find the {}"  # det: the categories (evaluation adds '.'); ground: the expression
RSCOVLM_VQA_SUFFIX = "Answer the question using a single word or a short phrase."  # not GeoChat's "or phrase."
RSCOVLM_CAPTION_PROMPT = "<image>Describe the image"
RSCOVLM_CLS_PROMPT = "<image>Classify the image within one of the given classes:{classes}."  # joined by ','


def _check_preset(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown prompt preset {preset!r}: expected one of {PRESETS}")


def det_prompt(classes, box_format="poly", preset="default", train=True):
    """Categories as text (hyphens as spaces, lower case), alphabetical. The default preset returns the user
    text; rscovlm returns [system turn, user turn] (make_record takes either). train=False: the evaluation
    wording (RSCoVLM's ends with a period; the default preset has one wording)."""
    _check_preset(preset)
    if preset == "rscovlm":
        cats = ", ".join(sorted(boxes.rscovlm_label(c) for c in classes))
        return [{"role": "system", "content": RSCOVLM_SYSTEM[box_format]},
                {"role": "user", "content": RSCOVLM_FIND.format(cats) + ("" if train else ".")}]
    return DET_PROMPT.format(categories=", ".join(sorted(boxes.class_to_text(c) for c in classes)),
                             fmt=DET_FORMAT[box_format])


def ground_prompt(expression, box_format="hbox", preset="default"):
    """The user text (default) or [system turn, user turn] (rscovlm: the same wording to train and evaluate)."""
    _check_preset(preset)
    if preset == "rscovlm":
        return [{"role": "system", "content": RSCOVLM_SYSTEM[box_format]},
                {"role": "user", "content": RSCOVLM_FIND.format(expression.strip())}]
    return GROUND_PROMPT.format(expression=expression.strip(), fmt=GROUND_FORMAT[box_format])


def vqa_prompt(question, suffix=True, preset="default"):
    _check_preset(preset)
    if preset == "rscovlm":
        return "<image>" + question.strip() + (" " + RSCOVLM_VQA_SUFFIX if suffix else "")
    return "<image>\n" + question.strip() + (" " + VQA_SUFFIX if suffix else "")


def cls_prompt(classes, preset="default"):
    """rscovlm: give the class folder names as they are (RSCoVLM lists and scores those)."""
    _check_preset(preset)
    if preset == "rscovlm":
        return RSCOVLM_CLS_PROMPT.format(classes=",".join(classes))
    return CLS_PROMPT.format(classes=", ".join(classes))


def caption_prompt(preset="default"):
    _check_preset(preset)
    return RSCOVLM_CAPTION_PROMPT if preset == "rscovlm" else CAPTION_PROMPT


def answer_style(preset):
    """meta.answer_style of det/ground records under a preset (the default preset leaves it out: plain)."""
    return {"answer_style": "rscovlm"} if preset == "rscovlm" else {}


def box_forms(args, default):
    """--box-forms as a list (one record per form), else [default]."""
    if not getattr(args, "box_forms", None):
        return [default]
    forms = [f.strip() for f in args.box_forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in DET_FORMAT]
    if bad or not forms or len(set(forms)) != len(forms):
        raise BadInput(f"--box-forms {args.box_forms!r}: give distinct forms from {', '.join(DET_FORMAT)}, "
                       "e.g. hbox,rbox,poly")
    return forms


def form_id(rid, form, forms):
    """Record id of one box form: the plain id when there is one form, else 'id#form'."""
    return rid if len(forms) == 1 else f"{rid}#{form}"


def make_record(rid, task, dataset, images, prompt, answer, meta):
    """prompt: the user text, or the messages before the answer (e.g. [system, user]); answer None ->
    prompt-only record (no assistant turn)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": rid, "task": task, "dataset": dataset, "images": images, "messages": messages, "meta": meta}


def det_answer(objects, width, height, box_format="poly", preset="default"):
    """Human-readable rendering in the record's own pixels (model.tokenize re-renders from meta)."""
    return boxes.render_answer(objects, width, height, coords="abs", box_format=box_format,
                               style="rscovlm" if preset == "rscovlm" else "plain")


# -----------------------------------------------------------------------------
# Files, errors, summaries


class BadInput(model.UserError):
    """A problem with the input data or flags; the message names the file (and line) and says what to do.
    run_cli prints it as one line and exits 2."""


def progress(items, **kwargs):
    """tqdm bars on a terminal only (disable=None): logs and pipes get the summary, not bar redraws."""
    return tqdm(items, **{"disable": None, **kwargs})


def did_you_mean(folder, looks_right):
    """'; did you mean A or B?' naming the sub-folders of `folder` (one level down) that pass looks_right,
    for the common slip of giving the folder an archive unzips to instead of the one inside it."""
    folder = Path(folder)
    hits = [d for d in sorted(folder.iterdir()) if d.is_dir() and looks_right(d)] if folder.is_dir() else []
    return f"; did you mean {' or '.join(str(d) for d in hits[:4])}?" if hits else ""


def list_images(folder):
    """Image files directly in folder, sorted (hidden files such as macOS' ._name.jpg left out)."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def atomic_write_bytes(path, data):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one


def save_image_atomic(img, path):
    """PNG at compress level 1 (OpenCV's default, what MMRotate writes) or JPEG quality 95."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".png":
        img.save(tmp, format="PNG", compress_level=1)
    else:
        img.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def write_jsonl(path, records):
    """Whole file to a temporary name, then renamed: a crash never leaves a truncated last line."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, text.encode("utf-8"))


def new_summary():
    return {"counts": Counter(), "skipped": [], "notes": []}


def skip_or_raise(summary, skip_bad, item, reason):
    """--skip-bad: count and list the skip; otherwise stop with the reason (which names the file)."""
    if not skip_bad:
        raise BadInput(reason)
    summary["counts"]["skipped"] += 1
    summary["skipped"].append({"item": str(item), "reason": reason})


def print_summary(title, summary, out_files):
    c = summary["counts"]
    print(f"\n{title}")
    for note in summary["notes"]:
        print(f"  note: {note}")
    for k in sorted(c):
        print(f"  {k:<28} {c[k]}")
    if "answer_tokens" in summary:
        print(format_answer_tokens(summary["answer_tokens"]))
    if summary["skipped"]:
        reasons = Counter(re.sub(r"\d+", "N", s["reason"].split(":")[-1].strip())[:60] for s in summary["skipped"])
        print(f"  skipped items ({len(summary['skipped'])}), by reason:")
        for r, n in reasons.most_common():
            print(f"    {n:>6}  {r}")
        for s in summary["skipped"][:10]:
            print(f"    e.g. {s['reason']}")
    for f in out_files:
        print(f"  wrote {f}")


def write_outputs(out, name, args, summary, records, title, why_empty):
    """OUT/NAME.jsonl (atomically), OUT/NAME.info.json and the printed summary: how every subcommand ends.
    No record is an error (why_empty says what to check), never an empty file and exit 0."""
    require_records(len(records), name, summary, title, why_empty)
    jsonl = out / f"{name}.jsonl"
    write_jsonl(jsonl, records)
    write_info(out, name, args, summary)
    print_summary(title, summary, [jsonl])


def require_records(n, name, summary, title, why_empty):
    """Stop (after printing the summary, which says what was counted) when a run would write no record."""
    if n:
        return
    print_summary(title, summary, [])
    skipped = summary["skipped"]
    if skipped:
        why_empty += f"; {len(skipped)} skipped as bad input (--skip-bad), e.g. {skipped[0]['reason']}"
    raise BadInput(f"no records for {name}, nothing written: {why_empty}")


def input_paths(args):
    """What a run reads (--root, --json), as absolute paths: recorded in OUT/NAME.info.json."""
    paths = {}
    for key in ("root", "json"):
        value = getattr(args, key, None)
        if value:
            paths[key] = sorted(str(Path(v).resolve()) for v in (value if isinstance(value, list) else [value]))
    return paths


def claim_output(out, name, args):
    """Refuse to overwrite OUT/NAME made from another input (two caption sets both called dataset.json, the
    same --split of two DOTA copies): the earlier output would be lost without a word."""
    info = Path(out) / f"{name}.info.json"
    if not info.exists():
        return
    old = json.loads(info.read_text()).get("inputs")
    new = input_paths(args)
    if old is not None and old != new:
        old_s, new_s = (", ".join(v for vs in d.values() for v in vs) for d in (old, new))
        raise BadInput(f"{Path(out) / name}.* was made from {old_s}; this run reads {new_s} and would overwrite "
                       f"it: give --name (or another --out), or delete {info} if that output is no longer wanted")


def write_info(out, name, args, summary=None):
    info = {"args": vars(args), "inputs": input_paths(args)}
    if summary is not None:
        info["summary"] = {"counts": dict(summary["counts"]), "skipped": summary["skipped"],
                           "notes": summary["notes"]}
        if "answer_tokens" in summary:
            info["summary"]["answer_tokens"] = summary["answer_tokens"]
    atomic_write_bytes(Path(out) / f"{name}.info.json", json.dumps(info, indent=2).encode())


# -----------------------------------------------------------------------------
# Answer length in tokens (det/ground). A dense patch's answer can outgrow what generation allows
# (eval_det.py --max-new-tokens) and what training keeps (train.py --max-length skips longer samples): one
# DOTA 1024-px patch of the P0706 harbour holds ~500 ships, over 15k tokens, because Qwen writes one token
# per digit. Every det/ground subcommand reports, per split, how many answers need more than --answer-budget.

_QWEN_PIECES = []  # Qwen2's pre-tokenizer split (model.QWEN_SPLIT), compiled on first use


def estimate_answer_tokens(text):
    """Tokens a Qwen-VL answer takes, without a tokenizer: the pieces Qwen2's pre-tokenizer cuts the text into
    (model.QWEN_SPLIT: every digit alone, a run of punctuation, a word with its leading space, a line break),
    one token each, + 1 for the <|im_end|> that ends the answer. BPE merges only inside a piece, so this is
    exact for the digits, commas and line breaks that make up a box answer, and counts each word as one token
    (a word Qwen's vocabulary splits takes more: a lower bound there; --processor counts exactly)."""
    if not _QWEN_PIECES:
        import regex  # \p{L} / \p{N} classes (installed with transformers)

        _QWEN_PIECES.append(regex.compile(model.QWEN_SPLIT))
    return len(_QWEN_PIECES[0].findall(text)) + 1


def answer_token_counter(args):
    """records -> {id: tokens of the record's answer, <|im_end|> included} for the records that have one, and
    a sentence saying how they were counted. --processor DIR: exact, the det/ground answer rendered from meta
    in that checkpoint's coordinates at its pixel budget (what model.tokenize trains on) and tokenized by its
    tokenizer. Without: estimate_answer_tokens of the answer as stored (record pixels; the model's frame
    differs a little, e.g. 1008 instead of 1024 px, which rarely changes a number's digit count)."""
    if not args.processor:
        def estimate(records):
            return {r["id"]: estimate_answer_tokens(answer) for r in records
                    if (answer := _final_answer(r["messages"])) is not None}

        return estimate, ("estimated: one token per digit, punctuation run, word and line break, as Qwen's "
                          "pre-tokenizer splits them, + <|im_end|>; --processor DIR counts exactly")
    if not Path(args.processor).is_dir():
        raise BadInput(f"--processor {args.processor}: no such folder (give a checkpoint folder with its tokenizer)")
    try:
        processor = model.load_processor(args.processor)
    except model.UserError as e:
        raise BadInput(f"--processor {e}") from None

    def exact(records):
        ids, texts = [], []
        for r in records:
            answer = _final_answer(model.target_messages(r, processor))
            if answer is not None:
                ids.append(r["id"])
                texts.append(answer)
        counts = []
        for start in range(0, len(texts), 512):  # the fast tokenizer encodes a batch in parallel
            counts += [len(t) + 1 for t in processor.tokenizer(texts[start:start + 512], add_special_tokens=False)["input_ids"]]
        return dict(zip(ids, counts))

    return exact, (f"exact: {args.processor}'s tokenizer, boxes in its {model.COORDS[processor.family]} coordinates "
                   f"at max_pixels {processor.max_pixels}, + <|im_end|>")


def _final_answer(messages):
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None


def report_answer_tokens(summary, split, records, counter, budget, hint=""):
    """summary["answer_tokens"]: per split, how many answers need more than `budget` tokens (+ the longest and
    the median), for the printed summary and NAME.info.json. counter: answer_token_counter(args); hint: what
    else the note suggests when some answers are over."""
    count, method = counter
    tokens = count(records)
    report = summary.setdefault("answer_tokens", {"budget": budget, "method": method, "splits": {}})
    lengths = sorted(tokens.values())
    longest = max(tokens, key=tokens.get) if tokens else None
    over = sum(n > budget for n in lengths)
    report["splits"][split] = {"answers": len(lengths), "over_budget": over,
                               "longest": tokens.get(longest, 0), "longest_id": longest,
                               "median": lengths[len(lengths) // 2] if lengths else 0}
    if over:
        summary["notes"].append(
            f"{split}: {over} of {len(lengths)} answers need more than {budget} tokens (--answer-budget): "
            f"generating them needs eval_det.py --max-new-tokens above that (its default, auto, sizes the limit to "
            f"the longest answer), and train.py skips a sample longer than --max-length{hint}")


def format_answer_tokens(report):
    """The printed lines of report_answer_tokens' summary["answer_tokens"]."""
    lines = [f"  answer tokens ({report['method']}):"]
    for split, s in report["splits"].items():
        if not s["answers"]:
            lines.append(f"    {split}: no answers (prompt-only records)")
            continue
        lines.append(f"    {split}: {s['over_budget']:,} of {s['answers']:,} answers over --answer-budget "
                     f"{report['budget']:,} tokens; longest {s['longest']:,} ({s['longest_id']}), median {s['median']:,}")
    return "\n".join(lines)


def read_image_size(path, full=True):
    """(width, height). full=True decodes the whole image, so truncated or corrupt files are caught."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            return im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"cannot read image {path}: {e}") from None


def _check_one(path):
    try:
        return path, read_image_size(path), None
    except BadInput as e:
        return path, None, str(e)


def check_images(paths, workers, desc):
    """{path: (w, h) or error message}, decoding every image (several processes)."""
    paths = sorted(set(paths))
    out = {}
    with Pool(workers) if workers > 1 else _NoPool() as pool:
        for path, size, err in progress(pool.imap(_check_one, paths, chunksize=8), total=len(paths), desc=desc):
            out[path] = size if err is None else err
    return out


class _NoPool:
    """Stand-in for multiprocessing.Pool when --workers 1 (easier to debug, no fork)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


def rel(path, out):
    """Image path as written in records: relative to the JSONL's folder when inside it, else absolute."""
    path, out = Path(path).resolve(), Path(out).resolve()
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


# -----------------------------------------------------------------------------
# Label parsing: DOTA labelTxt, FAIR1M XML, DIOR-R XML. Each returns [{"poly", "label", "difficult"}].


def check_numbers(tokens, where, n=8):
    """n finite numbers (8 = a 4-point polygon) -> list of floats, else BadInput naming `where`."""
    if len(tokens) != n:
        raise BadInput(f"{where}: polygon has {len(tokens) // 2} points, expected 4" if n == 8
                       else f"{where}: expected {n} numbers, got {len(tokens)}")
    out = []
    for tok in tokens:
        try:
            v = float(tok)
        except (TypeError, ValueError):
            raise BadInput(f"{where}: coordinate {tok!r} is not a number") from None
        if not math.isfinite(v):
            raise BadInput(f"{where}: coordinate {tok!r} is not finite")
        out.append(v)
    return out


def _is_number(tok):
    try:
        float(tok)
        return True
    except ValueError:
        return False


def parse_dota_txt(path, classes):
    """DOTA labelTxt: `imagesource:`/`gsd:` headers, then `x1 y1 ... x4 y4 class [difficult]` lines."""
    objects = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            where = f"bad label line {lineno} in {path}"
            if not parts or (len(parts) < 9 and ":" in line):  # blank or a header
                continue
            n_num = next((i for i, t in enumerate(parts) if not _is_number(t)), len(parts))
            if n_num < 8 and len(parts) - n_num <= 2:  # the numbers stop early, then class [difficult]
                raise BadInput(f"{where}: polygon has fewer than 4 points ({n_num} numbers before the class)")
            if len(parts) not in (9, 10):
                raise BadInput(f"{where}: expected 9 or 10 fields (x1 y1 .. x4 y4 class [difficult]), got {len(parts)}")
            poly = check_numbers(parts[:8], where)
            label = parts[8]
            if label not in classes:
                raise BadInput(f"{where}: unknown class {label!r}")
            try:
                difficult = int(parts[9]) if len(parts) == 10 else 0
            except ValueError:
                raise BadInput(f"{where}: difficult flag {parts[9]!r} is not an integer") from None
            objects.append({"poly": poly, "label": label, "difficult": difficult})
    return objects


def _xml_root(path):
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise BadInput(f"cannot parse {path}: {e}") from None


def parse_fair1m_xml(path, classes):
    """FAIR1M: <object><possibleresult><name>Liquid Cargo Ship</name></possibleresult>
    <points><point>x,y</point> x5</points> (the fifth point repeats the first)."""
    objects = []
    for k, obj in enumerate(_xml_root(path).iter("object"), 1):
        where = f"bad object {k} in {path}"
        name = obj.findtext("possibleresult/name")
        if not name or not name.strip():
            raise BadInput(f"{where}: no possibleresult/name")
        label = "-".join(name.strip().lower().split())
        if label not in classes:
            raise BadInput(f"{where}: unknown class {name!r}")
        pts = [p.text.split(",") for p in obj.findall("points/point") if p.text]
        if any(len(p) != 2 for p in pts):
            raise BadInput(f"{where}: a point is not 'x,y'")
        xy = check_numbers([v for p in pts for v in p], where, n=2 * len(pts))
        # the closing point repeats the first, written as "1.0,2.0" or "1.000000,2" alike: compare numbers
        if len(pts) == 5 and math.dist(xy[:2], xy[8:]) <= 1e-3:
            xy = xy[:8]
        if len(xy) != 8:
            raise BadInput(f"{where}: polygon has {len(pts)} points, expected 4 (+ the first repeated)")
        objects.append({"poly": xy, "label": label, "difficult": 0})
    return objects


DIOR_CORNERS = ["x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
                "x_left_bottom", "y_left_bottom"]


def parse_dior_xml(path, classes):
    """DIOR-R: VOC XML, <object><name>, <difficult>, <robndbox> with the four corners. Also returns the size."""
    root = _xml_root(path)
    objects = []
    for k, obj in enumerate(root.iter("object"), 1):
        where = f"bad object {k} in {path}"
        label = (obj.findtext("name") or "").strip().lower()
        if label not in classes:
            raise BadInput(f"{where}: unknown class {obj.findtext('name')!r}")
        rb = obj.find("robndbox")
        if rb is None:
            raise BadInput(f"{where}: no <robndbox>")
        poly = check_numbers([rb.findtext(t) for t in DIOR_CORNERS if rb.findtext(t) is not None], where)
        diff = (obj.findtext("difficult") or "0").strip()
        objects.append({"poly": poly, "label": label, "difficult": int(diff) if diff.isdigit() else 0})
    size = (int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0))
    return objects, size


# -----------------------------------------------------------------------------
# Tiling (MMRotate img_split rules; see the module docstring)


def window_starts(length, patch, step):
    if length <= patch:
        return [0]
    n = math.ceil((length - patch) / step + 1)
    starts = [step * i for i in range(n)]
    if starts[-1] + patch > length:
        starts[-1] = length - patch  # last window ends at the border
    return starts


def sliding_windows(width, height, patch, gap, img_rate_thr=0.6):
    """[(x0, y0, x1, y1)], x-major order like MMRotate."""
    assert patch > gap, f"--patch {patch} must be larger than --gap {gap}"
    step = patch - gap
    wins = [(x, y, x + patch, y + patch) for x in window_starts(width, patch, step)
            for y in window_starts(height, patch, step)]
    rates = [(min(x1, width) - x0) * (min(y1, height) - y0) / (patch * patch) for x0, y0, x1, y1 in wins]
    if not any(r > img_rate_thr for r in rates):
        rates = [1.0 if abs(r - max(rates)) < 0.01 else r for r in rates]
    return [w for w, r in zip(wins, rates) if r > img_rate_thr]


def object_shapes(objects):
    """(hbox, shapely polygon, area) per object; a self-intersecting label polygon is measured by its hull."""
    out = []
    for o in objects:
        pts = list(zip(o["poly"][0::2], o["poly"][1::2]))
        poly = Polygon(pts)
        if not poly.is_valid:
            poly = MultiPoint(pts).convex_hull
        xs, ys = o["poly"][0::2], o["poly"][1::2]
        out.append(((min(xs), min(ys), max(xs), max(ys)), poly, poly.area))
    return out


def objects_in_window(objects, shapes, win, iof_thr):
    """Objects kept in window (x0, y0, x1, y1), shifted into it; truncated ones (iof < 1) get difficult 2."""
    x0, y0, x1, y1 = win
    wbox, kept = None, []
    for o, ((bx0, by0, bx1, by1), poly, area) in zip(objects, shapes):
        if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1 or area <= 0:
            continue
        inside = bx0 >= x0 and by0 >= y0 and bx1 <= x1 and by1 <= y1
        if not inside:
            wbox = wbox or shapely_box(x0, y0, x1, y1)
            if poly.intersection(wbox).area / area < iof_thr:
                continue
        shifted = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(o["poly"])]
        kept.append({"poly": [round(v, 3) for v in shifted], "label": o["label"],
                     "difficult": o["difficult"] if inside else 2})
    return kept


def patch_name(name, patch, rate, x, y):
    tag = str(patch) if rate == 1 else f"{rate:g}"
    return f"{name}__{tag}__{x}___{y}"


def tile_image(job, cfg):
    """One source image -> patch records (+ patch PNGs not written yet). Runs in a worker process.
    Returns {"records", "counts", "skipped"}."""
    counts, skipped = Counter(), []
    try:
        width, height = read_image_size(job["image"], full=False)
    except BadInput as e:
        if not cfg["skip_bad"]:
            raise
        return {"records": [], "counts": Counter(skipped=1), "skipped": [{"item": job["name"], "reason": str(e)}]}
    objects = job["objects"]  # None for the test split
    plans = []  # (rate, scaled size, window, patch name, objects in patch or None)
    for rate in cfg["rates"]:
        sw, sh = (width, height) if rate == 1 else (round(width * rate), round(height * rate))
        scaled = None
        if objects is not None:
            scaled = objects if rate == 1 else [dict(o, poly=[v * rate for v in o["poly"]]) for o in objects]
            shapes = object_shapes(scaled)
            if rate == cfg["rates"][0]:
                counts["zero-area objects dropped"] += sum(1 for s in shapes if s[2] <= 0)
        for win in sliding_windows(sw, sh, cfg["patch"], cfg["gap"], cfg["img_rate_thr"]):
            objs = None if scaled is None else objects_in_window(scaled, shapes, win, cfg["iof_thr"])
            if objs is not None and not objs:
                counts["empty patches"] += 1
                if cfg["split"] == "train" and not cfg["keep_empty"]:
                    counts["empty patches dropped"] += 1
                    continue
            plans.append((rate, (sw, sh), win, patch_name(job["name"], cfg["patch"], rate, win[0], win[1]), objs))

    images_dir = Path(cfg["images_dir"])
    todo = [p for p in plans if not (images_dir / (p[3] + cfg["ext"])).exists()]
    counts["patches reused"] += len(plans) - len(todo)
    if todo:
        try:
            with Image.open(job["image"]) as im:
                full = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            if not cfg["skip_bad"]:
                raise BadInput(f"cannot read image {job['image']}: {e}") from None
            return {"records": [], "counts": Counter(skipped=1),
                    "skipped": [{"item": job["name"], "reason": f"cannot read image {job['image']}: {e}"}]}
        arrays = {}
        for rate, size, (x0, y0, x1, y1), pname, _ in todo:
            if rate not in arrays:
                img = full if rate == 1 else full.resize(size, Image.BICUBIC)  # devkit: cv2 INTER_CUBIC
                arrays[rate] = np.asarray(img)
            arr = arrays[rate]
            crop = arr[y0:y1, x0:x1]
            if crop.shape[:2] != (y1 - y0, x1 - x0):  # image smaller than the window: pad right/bottom
                padded = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
                padded[...] = cfg["pad_value"]
                padded[: crop.shape[0], : crop.shape[1]] = crop
                crop = padded
            save_image_atomic(Image.fromarray(crop), images_dir / (pname + cfg["ext"]))
        counts["patches written"] += len(todo)

    records = []
    for rate, _, (x0, y0, x1, y1), pname, objs in plans:
        pw, ph = x1 - x0, y1 - y0
        meta = {"width": pw, "height": ph}
        if objs is not None:
            meta["objects"] = objs
            counts["objects"] += len(objs)
            counts["objects truncated (difficult 2)"] += sum(o["difficult"] == 2 for o in objs)
        meta.update({"classes": cfg["classes"], "source": job["name"], "offset": [x0, y0], "rate": rate,
                     "source_size": [width, height], **answer_style(cfg["prompts"])})
        for form in cfg["box_forms"]:  # one record per box form, all on the same patch image
            answer = None if objs is None else det_answer(objs, pw, ph, form, cfg["prompts"])
            records.append(make_record(form_id(pname, form, cfg["box_forms"]), "det", cfg["dataset"],
                                       [f"images/{pname}{cfg['ext']}"],
                                       det_prompt(cfg["classes"], form, cfg["prompts"], train=cfg["split"] == "train"),
                                       answer, dict(meta, box_format=form)))
    counts["images"] += 1
    counts["records"] += len(records)
    return {"records": records, "counts": counts, "skipped": skipped}


def run_tiling(args, source):
    """Shared driver of `dota` and `fair1m`: list images + labels, tile in --workers processes, write JSONL."""
    if source == "dota":
        classes, label_dir, label_ext, parse = DOTA_CLASSES[args.version], "labelTxt", ".txt", parse_dota_txt
        dataset = f"dota{args.version}"
    else:
        classes, label_dir, label_ext, parse = FAIR1M_CLASSES, "labelXml", ".xml", parse_fair1m_xml
        dataset = "fair1m"
    try:
        rates = [float(r) for r in args.rates.split(",")]
        pad = [int(v) for v in args.pad_value.split(",")]
    except ValueError:
        raise BadInput(f"--rates {args.rates!r} / --pad-value {args.pad_value!r}: give comma-separated numbers, "
                       "e.g. --rates 0.5,1.0 --pad-value 0 (or R,G,B integers)") from None
    if len(pad) not in (1, 3) or not all(0 <= v <= 255 for v in pad):
        raise BadInput(f"--pad-value {args.pad_value!r}: give 1 or 3 integers in 0..255")
    if not all(r > 0 and math.isfinite(r) for r in rates):
        raise BadInput(f"--rates {args.rates!r}: every rate must be a positive number")
    if not 0 <= args.gap < args.patch:
        raise BadInput(f"--gap {args.gap} must be at least 0 and smaller than --patch {args.patch}")
    name = args.name or f"{source}_{args.split}" + ("" if args.patch == 1024 else f"_{args.patch}") + (
        "_ms" if rates != [1.0] else "")
    forms = box_forms(args, args.box_format)
    counter = answer_token_counter(args)  # a bad --processor stops here, before anything is written

    # list the images (and labels) first: a wrong --root stops before anything is written
    summary = new_summary()
    jobs = []
    for root in args.root:
        root = Path(root)
        img_dir, lbl_dir = root / "images", root / label_dir
        if not img_dir.is_dir():
            raise BadInput(f"{img_dir} is not a folder (--root must hold images/ and {label_dir}/)"
                           + did_you_mean(root, lambda d: (d / "images").is_dir()))
        image_files = list_images(img_dir)
        if not image_files:
            raise BadInput(f"{img_dir} has no images ({', '.join(IMAGE_EXTS)})")
        if args.split != "test":
            if not lbl_dir.is_dir():
                raise BadInput(f"{lbl_dir} is not a folder: --split {args.split} needs the labels "
                               f"(for images without labels use --split test)")
            label_files = {p.stem for p in lbl_dir.glob(f"*{label_ext}")}
            if not label_files:
                raise BadInput(f"{lbl_dir} has no {label_ext} label files: --split {args.split} needs the labels "
                               f"(for images without labels use --split test)")
            summary["counts"]["label files without an image"] += len(label_files - {p.stem for p in image_files})
        for img in progress(image_files, desc=f"labels {root}", disable=True if len(image_files) < 50 else None):
            objects = None
            if args.split != "test":
                label = root / label_dir / (img.stem + label_ext)
                try:
                    if not label.is_file():
                        raise BadInput(f"no label file {label} for image {img}")
                    objects = parse(label, classes)
                except BadInput as e:
                    skip_or_raise(summary, args.skip_bad, img, str(e))
                    continue
            jobs.append({"name": img.stem, "image": str(img), "objects": objects})
    names = Counter(j["name"] for j in jobs)
    dup = [n for n, k in names.items() if k > 1]
    if dup:
        raise BadInput(f"image names occur in more than one --root: {dup[:5]}")

    out = Path(args.out)
    images_dir = out / "images"
    claim_output(out, name, args)
    check_resume(out, name, args, ["patch", "gap", "rates", "pad_value", "iof_thr", "img_rate_thr", "ext",
                                   "version", "split", "keep_empty", "box_format", "box_forms", "prompts"])
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob(".*.tmp"):  # leftovers of an interrupted run (never renamed, never trusted)
        stale.unlink(missing_ok=True)
    write_info(out, name, args)

    cfg = {"classes": classes, "dataset": dataset, "rates": rates, "patch": args.patch, "gap": args.gap,
           "img_rate_thr": args.img_rate_thr, "iof_thr": args.iof_thr, "pad_value": pad if len(pad) == 3 else pad[0],
           "images_dir": str(images_dir), "ext": "." + args.ext, "split": args.split, "keep_empty": args.keep_empty,
           "skip_bad": args.skip_bad, "box_forms": forms, "prompts": args.prompts}
    records = []
    with Pool(args.workers) if args.workers > 1 else _NoPool() as pool:
        for res in progress(pool.imap(partial(tile_image, cfg=cfg), jobs), total=len(jobs), desc=f"tiling {name}"):
            records += res["records"]
            summary["counts"].update(res["counts"])
            summary["skipped"] += res["skipped"]
    if records:
        report_answer_tokens(summary, args.split, records, counter, args.answer_budget,
                             hint=f"; patches smaller than --patch {args.patch} hold fewer objects, shorter answers")
    roots = " ".join(args.root)
    if summary["counts"]["empty patches dropped"]:
        why = (f"every patch of the images in {roots} is empty (no {dataset} object kept) and --split train drops "
               f"empty patches: check {label_dir}/" + (" and --version" if source == "dota" else "")
               + ", or keep empty patches with --keep-empty")
    else:
        why = f"no image in {roots} gave a patch"
    write_outputs(out, name, args, summary, records,
                  f"{source} {args.split}: {len(records)} records from {len(jobs)} images", why)
    return summary


def check_resume(out, name, args, keys):
    """Refuse to reuse patches cut with other settings (they would be trusted as they are)."""
    info = Path(out) / f"{name}.info.json"
    if not info.exists():
        return
    old = json.loads(info.read_text()).get("args", {})
    diff = {k: (old.get(k), getattr(args, k)) for k in keys if k in old and old.get(k) != getattr(args, k)}
    if diff:
        raise BadInput(f"{out} holds a run of {name} with other settings {diff}; use another --out or --name")


# -----------------------------------------------------------------------------
# dior: DIOR-R oriented boxes, whole 800x800 images (no tiling)


def find_first(candidates, what):
    for c in candidates:
        if c.exists():
            return c
    raise BadInput(f"cannot find {what}; looked at " + ", ".join(str(c) for c in candidates))


def read_id_list(path):
    """Image ids of a split list (one per line), as a list in file order."""
    try:
        ids = Path(path).read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read split list {path}: {e}") from None
    if not ids:
        raise BadInput(f"split list {path} has no image ids")
    return ids


def dior_split_ids(root, args, summary):
    """Image ids of --split (or --split-file). DIOR-R ships ImageSets/Main/{train,val,test}.txt and no
    trainval.txt: --split trainval then reads train.txt + val.txt, as MMRotate and LMMRotate train on."""
    if args.split_file:
        return read_id_list(args.split_file)
    folders = [root / "ImageSets" / "Main", root / "ImageSets", root / "Main"]
    for folder in folders:
        if (folder / f"{args.split}.txt").is_file():
            return read_id_list(folder / f"{args.split}.txt")
    for folder in folders:
        if args.split == "trainval" and (folder / "train.txt").is_file() and (folder / "val.txt").is_file():
            summary["notes"].append(f"no trainval.txt: trainval = {folder / 'train.txt'} + {folder / 'val.txt'}")
            return read_id_list(folder / "train.txt") + read_id_list(folder / "val.txt")
    lists = sorted(p.stem for f in folders if f.is_dir() for p in f.glob("*.txt"))
    raise BadInput(f"cannot find the {args.split} split list {args.split}.txt; looked in "
                   + ", ".join(str(f) for f in folders)
                   + (f" (lists there: {', '.join(lists)})" if lists else "")
                   + "; give --split with one of those, --split all, or --split-file")


def run_dior(args):
    root, out = Path(args.root), Path(args.out)
    ann_dir = find_first([root / "Annotations" / "Oriented Bounding Boxes", root / "Annotations"], "DIOR-R annotations")
    img_dirs = [d for d in (root / "JPEGImages-trainval", root / "JPEGImages-test", root / "JPEGImages") if d.is_dir()]
    if not img_dirs:
        raise BadInput(f"{root} has no JPEGImages-trainval/, JPEGImages-test/ or JPEGImages/ folder")
    summary, records, items = new_summary(), [], []
    if args.split == "all":
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise BadInput(f"{ann_dir} has no .xml annotations")
    else:
        ids = dior_split_ids(root, args, summary)
    if len(set(ids)) != len(ids):  # one record per image: an id listed twice would give two records of it
        summary["counts"]["repeated ids in the split list(s), kept once"] = len(ids) - len(set(ids))
        ids = list(dict.fromkeys(ids))
    name = args.name or f"dior_{args.split}"
    claim_output(out, name, args)
    counter = answer_token_counter(args)
    out.mkdir(parents=True, exist_ok=True)
    for i in ids:
        try:
            xml = ann_dir / f"{i}.xml"
            if not xml.is_file():
                raise BadInput(f"no annotation {xml} for image id {i}")
            objects, size = parse_dior_xml(xml, DIOR_CLASSES)
            image = next((d / f"{i}.jpg" for d in img_dirs if (d / f"{i}.jpg").is_file()), None)
            if image is None:
                raise BadInput(f"no image {i}.jpg in " + ", ".join(str(d) for d in img_dirs))
            items.append((i, image, objects, size))
        except BadInput as e:
            skip_or_raise(summary, args.skip_bad, i, str(e))
    sizes = check_images([str(it[1]) for it in items], args.workers, "checking images")
    forms = box_forms(args, args.box_format)
    for i, image, objects, size in items:
        got = sizes[str(image)]
        if isinstance(got, str):
            skip_or_raise(summary, args.skip_bad, i, got)
            continue
        if size != (0, 0) and tuple(got) != tuple(size):
            skip_or_raise(summary, args.skip_bad, i, f"{image} is {got[0]}x{got[1]} but its XML says {size[0]}x{size[1]}")
            continue
        w, h = got
        for form in forms:  # one record per box form
            meta = {"width": w, "height": h, "objects": objects, "classes": DIOR_CLASSES, "box_format": form,
                    "source": i, **answer_style(args.prompts)}
            prompt = det_prompt(DIOR_CLASSES, form, args.prompts, train=args.split in ("train", "trainval"))
            records.append(make_record(form_id(i, form, forms), "det", "dior-r", [rel(image, out)], prompt,
                                       det_answer(objects, w, h, form, args.prompts), meta))
        summary["counts"]["objects"] += len(objects)
    summary["counts"]["records"] = len(records)
    summary["counts"]["empty images"] = sum(not r["meta"]["objects"] for r in records
                                            if r["meta"]["box_format"] == forms[0])
    if records:
        report_answer_tokens(summary, args.split, records, counter, args.answer_budget)
    write_outputs(out, name, args, summary, records, f"dior {args.split}: {len(records)} records",
                  f"none of the {len(ids)} listed images could be read")
    return summary


# -----------------------------------------------------------------------------
# rsvg: DIOR-RSVG grounding. One XML per image (sorted by name); every <object> has a <bndbox> and a
# <description>; the split files list global object indices (0-based, counted over the sorted XMLs in order),
# as RSVG-pytorch's data_loader does.


def run_rsvg(args):
    root, out = Path(args.root), Path(args.out)
    ann_dir = find_first([root / "Annotations"], "DIOR-RSVG Annotations/")
    img_dir = find_first([root / "JPEGImages"], "DIOR-RSVG JPEGImages/")
    split_file = Path(args.split_file) if args.split_file else find_first(
        [root / f"{args.split}.txt", root / "DIOR_RSVG" / f"{args.split}.txt"], f"the {args.split} index file")
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise BadInput(f"{ann_dir} has no .xml annotations")
    summary = new_summary()
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read index file {split_file}: {e}") from None
    wanted = {}  # object index -> line of the index file
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.strip().isdecimal():
            skip_or_raise(summary, args.skip_bad, f"line {lineno}",
                          f"bad index line {lineno} in {split_file}: {line.strip()!r} is not an integer")
        elif int(line) in wanted:
            summary["counts"]["repeated indices, kept once"] += 1
        else:
            wanted[int(line)] = lineno
    if not wanted and not summary["skipped"]:
        raise BadInput(f"index file {split_file} lists no object index")
    name = args.name or f"rsvg_{args.split}"
    forms = box_forms(args, "hbox")
    claim_output(out, name, args)
    counter = answer_token_counter(args)
    out.mkdir(parents=True, exist_ok=True)
    items, index = [], 0
    for xml in xmls:
        root_el = _xml_root(xml)
        filename = root_el.findtext("filename") or f"{xml.stem}.jpg"
        for k, obj in enumerate(root_el.iter("object"), 1):
            idx, index = index, index + 1
            if idx not in wanted:
                continue
            where = f"bad object {k} in {xml}"
            try:
                b = obj.find("bndbox")
                if b is None:
                    raise BadInput(f"{where}: no <bndbox>")
                x0, y0, x1, y1 = check_numbers([b.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")], where, n=4)
                if not (x1 > x0 and y1 > y0):
                    raise BadInput(f"{where}: empty box {x0},{y0},{x1},{y1}")
                text = (obj.findtext("description") or "").strip()
                if not text:
                    raise BadInput(f"{where}: no <description>")
                label = (obj.findtext("name") or "").strip().lower()
                items.append((idx, img_dir / filename, {"poly": boxes.hbox_to_poly([x0, y0, x1, y1]), "label": label,
                                                        "difficult": 0, "expression": text}))
            except BadInput as e:
                skip_or_raise(summary, args.skip_bad, f"object {idx}", str(e))
    for idx, lineno in sorted(wanted.items(), key=lambda kv: kv[1]):
        if idx >= index:  # a wrong index file, or Annotations/ of another DIOR-RSVG release
            skip_or_raise(summary, args.skip_bad, f"object {idx}",
                          f"bad index line {lineno} in {split_file}: object {idx} does not exist ({ann_dir} has "
                          f"{index} objects, numbered from 0 over the sorted XML files)")
    sizes = check_images([str(it[1]) for it in items], args.workers, "checking images")
    records = []
    for idx, image, obj in items:
        got = sizes[str(image)]
        if isinstance(got, str):
            skip_or_raise(summary, args.skip_bad, f"object {idx}", got)
            continue
        w, h = got
        for form in forms:  # one record per box form
            meta = {"width": w, "height": h, "objects": [obj], "box_format": form, "source": image.stem,
                    **answer_style(args.prompts)}
            answer = boxes.render_answer([obj], w, h, coords="abs", box_format=form, with_label=False,
                                         style="rscovlm" if args.prompts == "rscovlm" else "plain")
            records.append(make_record(form_id(f"rsvg_{idx}", form, forms), "ground", "dior-rsvg", [rel(image, out)],
                                       ground_prompt(obj["expression"], form, args.prompts), answer, meta))
    summary["counts"]["records"] = len(records)
    if records:
        report_answer_tokens(summary, args.split, records, counter, args.answer_budget)
    write_outputs(out, name, args, summary, records, f"rsvg {args.split}: {len(records)} records",
                  f"no object of {split_file} could be used")
    return summary


# -----------------------------------------------------------------------------
# rsvqa: RSVQA-LR / -HR. Files {LR|USGS}_split_{split}_{questions|answers|images}.json; images {id}.tif.
# Bucketing as in the published code (syvlo/RSVQA VocabEncoder): LR counts and areas (m2) go to
# 0 | between 0 and 10 | between 10 and 100 | between 100 and 1000 | more than 1000.


def bucket_number(n, unit=""):
    if n == 0:
        return f"0{unit}"
    if n <= 10:
        return f"between 0{unit} and 10{unit}"
    if n <= 100:
        return f"between 10{unit} and 100{unit}"
    if n <= 1000:
        return f"between 100{unit} and 1000{unit}"
    return f"more than 1000{unit}"


def rsvqa_answer(answer, qtype, variant, bucket):
    a = answer.strip()
    if bucket and qtype == "count" and variant == "LR" and a.isdigit():
        return bucket_number(int(a))
    if bucket and qtype == "area" and a.endswith("m2") and a[:-2].isdigit():
        return bucket_number(int(a[:-2]), "m2")
    return a


def run_rsvqa(args):
    root, out = Path(args.root), Path(args.out)
    prefix = "LR" if args.variant == "LR" else "USGS"
    files = {k: root / f"{prefix}_split_{args.split}_{k}.json" for k in ("questions", "answers", "images")}
    data = {}
    for k, f in files.items():
        if not f.is_file():
            raise BadInput(f"no {f} (--root holds {prefix}_split_{{split}}_{{questions,answers,images}}.json)"
                           + did_you_mean(root, lambda d: (d / f.name).is_file()))
        try:
            data[k] = {e["id"]: e for e in json.loads(f.read_text())[k]}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadInput(f"cannot read {f}: {e!r}") from None
    img_dir = Path(args.images) if args.images else find_first(
        [root / "Images_LR", root / "Data", root / "images"], "RSVQA images (give --images)")
    if not img_dir.is_dir():
        raise BadInput(f"--images {img_dir} is not a folder")
    types = set(args.types.split(",")) if args.types else None
    name = args.name or f"rsvqa_{args.variant.lower()}_{args.split}"
    claim_output(out, name, args)
    out.mkdir(parents=True, exist_ok=True)
    summary, items, types_seen = new_summary(), [], Counter()
    # as the published loader: the questions listed by active images, in image order; inactive questions dropped
    for img_id in sorted(data["images"]):
        im = data["images"][img_id]
        if not im.get("active", True):
            summary["counts"]["inactive images"] += 1
            continue
        for qid in im.get("questions_ids", []):
            q = data["questions"].get(qid)
            try:
                if q is None:
                    raise BadInput(f"image {img_id} in {files['images']} lists question {qid}, "
                                   f"which is not in {files['questions']}")
                if not q.get("active", True):
                    summary["counts"]["inactive questions"] += 1
                    continue
                types_seen[q.get("type")] += 1
                if types and q.get("type") not in types:
                    continue
                ans = next((data["answers"][a] for a in q.get("answers_ids") or [] if a in data["answers"]), None)
                if ans is None or not isinstance(ans.get("answer"), str) or not q.get("question") or not q.get("type"):
                    raise BadInput(f"question {qid} in {files['questions']}: no question text, type or answer "
                                   f"(in {files['answers']})")
                items.append((qid, q, ans["answer"], img_dir / f"{img_id}.tif"))
            except BadInput as e:
                skip_or_raise(summary, args.skip_bad, qid, str(e))
    sizes = check_images([str(it[3]) for it in items], args.workers, "checking images")
    records = []
    for qid, q, answer, image in items:
        got = sizes[str(image)]
        if isinstance(got, str):
            skip_or_raise(summary, args.skip_bad, qid, got)
            continue
        a = rsvqa_answer(answer, q["type"], args.variant, not args.no_bucket)
        summary["counts"][f"type {q['type']}"] += 1
        records.append(make_record(f"{args.variant}_{qid}", "vqa", f"rsvqa-{args.variant.lower()}", [rel(image, out)],
                                   vqa_prompt(q["question"], not args.no_suffix, args.prompts), a,
                                   {"answer": a, "type": q["type"], "raw_answer": answer, "image_id": q["img_id"]}))
    summary["counts"]["records"] = len(records)
    if types and types_seen and not types & set(types_seen):
        why = f"no question of --types {args.types} (types in {files['questions']}: {', '.join(map(str, types_seen))})"
    else:
        why = f"{files['images']} lists no active image with an active question"
    write_outputs(out, name, args, summary, records, f"rsvqa {args.variant} {args.split}: {len(records)} records", why)
    return summary


# -----------------------------------------------------------------------------
# captions: Karpathy-style JSON {"images": [{"filename", "imgid", "split", "sentences": [{"raw"}...]}]}


def caption_dataset_name(json_path):
    """Default dataset name: the JSON's name without 'dataset_' (dataset_rsicd.json -> rsicd); a file called
    just dataset.json (UCM-captions and Sydney-captions both ship one) is named by its folder
    (UCM_captions/dataset.json -> ucm_captions). The JSON's own "dataset" key is not used: Karpathy-style
    files carry whatever their converter wrote there, so two sets could share it."""
    path = Path(json_path).resolve()
    stem = path.stem.lower()
    if stem.startswith("dataset_"):
        stem = stem[len("dataset_"):]
    if stem in ("dataset", "captions", "data", ""):
        stem = path.parent.name.lower()
    return re.sub(r"[^a-z0-9.+-]+", "_", stem).strip("_") or "captions"


def run_captions(args):
    out = Path(args.out)
    try:
        entries = json.loads(Path(args.json).read_text())["images"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadInput(f"cannot read {args.json}: {e!r} (expected a Karpathy-style JSON with an \"images\" list)"
                       ) from None
    if not isinstance(entries, list) or not entries:
        raise BadInput(f"{args.json} has no image entries (its \"images\" list is empty)")
    if not Path(args.images).is_dir():
        raise BadInput(f"--images {args.images} is not a folder")
    dataset = args.dataset or caption_dataset_name(args.json)
    name = args.name or f"{dataset}_{args.split}"
    claim_output(out, name, args)
    out.mkdir(parents=True, exist_ok=True)
    splits = set(args.split.split("+"))  # e.g. train+val
    summary, items = new_summary(), []
    for k, e in enumerate(entries):
        where = f"image entry {k} in {args.json}"
        if not isinstance(e, dict) or "filename" not in e:
            skip_or_raise(summary, args.skip_bad, k, f"{where}: no filename")
            continue
        if e.get("split") not in splits:
            continue
        refs = [s.get("raw", "").strip() for s in e.get("sentences", []) if isinstance(s, dict)]
        refs = [r for r in refs if r]
        if not refs:
            skip_or_raise(summary, args.skip_bad, e["filename"], f"{where} ({e['filename']}): no reference sentences")
            continue
        items.append((e, refs, Path(args.images) / e["filename"]))
    sizes = check_images([str(it[2]) for it in items], args.workers, "checking images")
    records = []
    for e, refs, image in items:
        if isinstance(sizes[str(image)], str):
            skip_or_raise(summary, args.skip_bad, e["filename"], sizes[str(image)])
            continue
        rid = str(e.get("imgid", Path(e["filename"]).stem))
        meta = {"references": refs, "filename": e["filename"], "split": e["split"]}
        targets = enumerate(refs) if args.per_reference else [(None, refs[0])]
        for j, ref in targets:
            records.append(make_record(rid if j is None else f"{rid}#{j}", "caption", dataset, [rel(image, out)],
                                       caption_prompt(args.prompts), ref, meta))
        summary["counts"]["references"] += len(refs)
    summary["counts"]["records"] = len(records)
    in_json = Counter(str(e.get("split")) for e in entries if isinstance(e, dict))
    if splits & set(in_json):
        why = f"no image of split {args.split!r} in {args.json} could be used"
    else:
        why = (f"no image in {args.json} has split {args.split!r} (splits there: "
               + ", ".join(f"{k} ({n})" for k, n in sorted(in_json.items())) + ")")
    write_outputs(out, name, args, summary, records, f"captions {dataset} {args.split}: {len(records)} records", why)
    return summary


# -----------------------------------------------------------------------------
# cls: one folder per class (AID, UCMerced, NWPU-RESISC45), seeded per-class split


def class_text(folder):
    """'BareLand' -> 'bare land', 'basketball_court' -> 'basketball court', 'baseballdiamond' unchanged."""
    return boxes.class_to_text(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder))


def class_folders(root):
    """Sub-folders of root that hold images ({folder: sorted image files}), hidden and __MACOSX left out."""
    found = {}
    for d in sorted(Path(root).iterdir()):
        if d.is_dir() and not d.name.startswith((".", "__")):
            files = list_images(d)
            if files:
                found[d] = files
    return found


def run_cls(args):
    root, out = Path(args.root), Path(args.out)
    if not root.is_dir():
        raise BadInput(f"--root {root} is not a folder")
    if not 0 <= args.train_ratio <= 1:
        raise BadInput(f"--train-ratio {args.train_ratio} must be between 0 and 1")
    by_class = class_folders(root)
    if not by_class:
        # UCMerced_LandUse.zip unzips to UCMerced_LandUse/Images/<class>/; a class folder itself has images
        hint = did_you_mean(root, lambda d: bool(class_folders(d)))
        if not hint and list_images(root):
            hint = f"; {root} holds images itself: give the folder whose sub-folders are the classes ({root.parent}?)"
        raise BadInput(f"{root} has no class folders with images ({', '.join(IMAGE_EXTS)}){hint}")
    folders = list(by_class)
    # rscovlm: the folder names as they are (RSCoVLM's prompt lists them and its ground truth is the folder name)
    classes = [d.name if args.prompts == "rscovlm" else class_text(d.name) for d in folders]
    if len(set(classes)) != len(classes):
        raise BadInput(f"class folders in {root} collide after normalisation: {classes}")
    dataset = args.dataset or root.name.lower()
    claim_output(out, args.name or dataset, args)
    out.mkdir(parents=True, exist_ok=True)
    summary = new_summary()
    ignored = [d.name for d in sorted(root.iterdir()) if d.is_dir() and d not in by_class]
    if ignored:
        summary["notes"].append(f"folders without images, not classes: {', '.join(ignored)}")
    rng = random.Random(args.seed)
    split_files = {"train": [], "test": []}
    for d, label in zip(folders, classes):
        files = list(by_class[d])
        rng.shuffle(files)  # one generator, classes in sorted order: same split for the same seed
        n_train = round(len(files) * args.train_ratio)
        split_files["train"] += [(p, label) for p in files[:n_train]]
        split_files["test"] += [(p, label) for p in files[n_train:]]
    sizes = check_images([str(p) for s in split_files.values() for p, _ in s], args.workers, "checking images")
    records = {}
    for split, items in split_files.items():
        records[split] = []
        for p, label in items:
            if isinstance(sizes[str(p)], str):
                skip_or_raise(summary, args.skip_bad, p, sizes[str(p)])
                continue
            records[split].append(make_record(f"{p.parent.name}/{p.stem}", "cls", dataset, [rel(p, out)],
                                              cls_prompt(classes, args.prompts), label,
                                              {"label": label, "classes": classes}))
        summary["counts"][f"records {split}"] = len(records[split])
    summary["counts"]["classes"] = len(classes)
    title = f"cls {dataset}: {len(classes)} classes"
    # one split may be empty by design (--train-ratio 0 or 1), not both
    require_records(sum(map(len, records.values())), args.name or dataset, summary, title,
                    f"none of the images in the class folders of {root} could be read")
    written = []
    for split, recs in records.items():
        jsonl = out / f"{args.name or dataset}_{split}.jsonl"
        write_jsonl(jsonl, recs)
        written.append(jsonl)
    write_info(out, args.name or dataset, args, summary)
    print_summary(title, summary, written)
    return summary


# -----------------------------------------------------------------------------
# synth: a seeded, download-free remote-sensing-like dataset for the demo and the tests.
# 224 px images (8x8 tokens of 28 px for Qwen2.5-VL, 7x7 of 32 px for Qwen3-VL), textured ground of one of
# three scene types, 1-4 objects of four classes with distinct shapes and colours at random rotations.
# A localisation level for the CPU demo (--objects 1,1 --object-size 64,96 --ground-expr class): one large
# object per image and a prompt naming only its class, which a tiny model learns to find in minutes.

SYNTH_SIZE = 224
SYNTH_CLASSES = ["plane", "ship", "storage-tank", "vehicle"]
SYNTH_COLOURS = {"plane": ("white", (245, 245, 245)), "ship": ("red", (215, 35, 35)),
                 "storage-tank": ("purple", (150, 60, 210)), "vehicle": ("blue", (35, 75, 235))}
SYNTH_PLURAL = {"plane": "planes", "ship": "ships", "storage-tank": "storage tanks", "vehicle": "vehicles"}
SYNTH_GROUNDS = {"desert": ((196, 176, 128), "a desert"), "meadow": ((72, 128, 62), "a green meadow"),
                 "urban": ((118, 118, 124), "an urban area")}
SYNTH_SCENES = sorted(SYNTH_GROUNDS)
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six"]


def synth_ground(rng, scene):
    """(S, S, 3) uint8: base colour + coarse blotches + fine grain (+ roads for urban)."""
    S = SYNTH_SIZE
    coarse = Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32), mode="F").resize((S, S), Image.BILINEAR)
    img = np.array(SYNTH_GROUNDS[scene][0], np.float32) + 16 * np.asarray(coarse)[..., None] \
        + 6 * rng.normal(0, 1, (S, S, 1))
    if scene == "urban":  # a few darker roads
        for _ in range(2):
            p, w = int(rng.integers(20, S - 20)), int(rng.integers(6, 12))
            if rng.random() < 0.5:
                img[p:p + w] *= 0.6
            else:
                img[:, p:p + w] *= 0.6
    elif scene == "meadow":  # field stripes
        img[(np.arange(S) // 18) % 2 == 0] *= 0.9
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(pts, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def synth_shape(cls, rng):
    """(annotation half-extents (hl, hw), [(fill colour, local polygon or ('circle', r))], rotates)."""
    colour = SYNTH_COLOURS[cls][1]
    dark = tuple(int(v * 0.55) for v in colour)
    if cls == "plane":
        L = float(rng.uniform(44, 64))
        span = 0.9 * L
        parts = [(colour, _rect(-L / 2, -L / 14, L / 2, L / 14)),             # fuselage, nose along +x
                 (colour, [(-L / 12, -span / 2), (L / 8, -span / 2), (L / 5, 0), (L / 8, span / 2), (-L / 12, span / 2)]),
                 (colour, _rect(-L / 2, -span / 5, -L / 2 + L / 8, span / 5))]  # tail
        return (L / 2, span / 2), parts, True
    if cls == "ship":
        L = float(rng.uniform(40, 60))
        W = L / 3.2
        hull = [(-L / 2, -W / 2), (L / 4, -W / 2), (L / 2, 0), (L / 4, W / 2), (-L / 2, W / 2)]
        return (L / 2, W / 2), [(colour, hull), (dark, _rect(-L / 3, -W / 4, 0, W / 4))], True
    if cls == "storage-tank":
        r = float(rng.uniform(12, 20))
        return (r, r), [(colour, ("circle", r)), (dark, ("circle", 0.55 * r))], False
    L = float(rng.uniform(20, 28))
    return (L / 2, L / 4), [(colour, _rect(-L / 2, -L / 4, L / 2, L / 4)), (dark, _rect(L / 8, -L / 5, L / 3, L / 5))], True


def synth_region(cx, cy):
    S = SYNTH_SIZE
    row = "top" if cy < S / 3 else "bottom" if cy > 2 * S / 3 else ""
    col = "left" if cx < S / 3 else "right" if cx > 2 * S / 3 else ""
    return f"{row} {col}".strip() or "center"


def scale_shape(extent, parts, k):
    """synth_shape's extent and parts scaled by k about the object's centre."""
    scaled = [(fill, ("circle", shape[1] * k) if shape[0] == "circle" else [(x * k, y * k) for x, y in shape])
              for fill, shape in parts]
    return (extent[0] * k, extent[1] * k), scaled


def synth_image(rng, n_objects=(1, 4), size=None):
    """(image array, scene, objects [{"poly", "label", "difficult", "region"}]). n_objects: (least, most) objects
    drawn; size: (least, most) longer side of an object's box in pixels, or None for each class's own sizes."""
    S = SYNTH_SIZE
    scene = SYNTH_SCENES[int(rng.integers(len(SYNTH_SCENES)))]
    img = Image.fromarray(synth_ground(rng, scene))
    draw = ImageDraw.Draw(img)
    objects, placed = [], []  # placed: (cx, cy, radius)
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        cls = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
        (hl, hw), parts, rotates = synth_shape(cls, rng)
        if size is not None:  # the box's longer side (2 * hl) drawn uniformly from size
            (hl, hw), parts = scale_shape((hl, hw), parts, float(rng.uniform(*size)) / (2 * hl))
        radius = math.hypot(hl, hw)
        for _try in range(50):  # rejection sampling: inside the image, not touching another object
            angle = float(rng.uniform(0, math.pi)) if rotates else 0.0
            cx, cy = (float(v) for v in rng.uniform(radius + 2, S - radius - 2, 2))
            if all(math.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        for fill, shape in parts:
            if shape[0] == "circle":
                r = shape[1]
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon(_place(shape, cx, cy, angle), fill=fill)
        corners = _place(_rect(-hl, -hw, hl, hw), cx, cy, angle)
        objects.append({"poly": [round(v, 2) for p in corners for v in p], "label": cls, "difficult": 0,
                        "region": synth_region(cx, cy)})
    return np.asarray(img), scene, objects


def count_phrase(counts):
    """{'plane': 2, 'ship': 1} -> 'two planes and a ship'."""
    parts = [("a " + boxes.class_to_text(c) if n == 1 else f"{NUMBER_WORDS[n]} {SYNTH_PLURAL[c]}")
             for c, n in sorted(counts.items()) if n]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def synth_records(i, split, img_rel, scene, objects, rng, ground_expr="region", preset="default"):
    """All records of one synthetic image: det, ground (when some object is unambiguous), vqa x3, caption, cls.
    ground_expr: "region" names colour, class and region ("the red ship at the top left"); "class" names only the
    class ("the ship"), for objects alone of their class in the image. preset: the --prompts wording."""
    S, rid = SYNTH_SIZE, f"{split}_{i:05d}"
    objs = [{k: o[k] for k in ("poly", "label", "difficult")} for o in objects]
    counts = Counter(o["label"] for o in objects)
    style = answer_style(preset)
    recs = {"det": [make_record(f"det_{rid}", "det", "synth", [img_rel],
                                det_prompt(SYNTH_CLASSES, preset=preset, train=split == "train"),
                                det_answer(objs, S, S, preset=preset),
                                {"width": S, "height": S, "objects": objs, "classes": SYNTH_CLASSES,
                                 "box_format": "poly", "scene": scene, **style})]}
    # ground: an object the expression names alone: (class, region) unique in the image, or with
    # ground_expr "class" its class unique
    key = (lambda o: (o["label"], o["region"])) if ground_expr == "region" else (lambda o: o["label"])
    keys = Counter(key(o) for o in objects)
    unique = [o for o in objects if keys[key(o)] == 1]
    recs["ground"] = []
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        where = "in the center" if o["region"] == "center" else f"at the {o['region']}"
        expr = (f"the {SYNTH_COLOURS[o['label']][0]} {boxes.class_to_text(o['label'])} {where}"
                if ground_expr == "region" else f"the {boxes.class_to_text(o['label'])}")
        obj = {"poly": boxes.hbox_to_poly(boxes.poly_to_hbox(o["poly"])), "label": o["label"], "difficult": 0,
               "expression": expr}
        recs["ground"].append(make_record(f"ground_{rid}", "ground", "synth", [img_rel],
                                          ground_prompt(expr, preset=preset),
                                          boxes.render_answer([obj], S, S, box_format="hbox", with_label=False,
                                                              style="rscovlm" if preset == "rscovlm" else "plain"),
                                          {"width": S, "height": S, "objects": [obj], "box_format": "hbox", **style}))
    # vqa: presence, count, comparison
    c1 = SYNTH_CLASSES[int(rng.integers(4))]
    present = [c for c in SYNTH_CLASSES if counts[c]]
    c2 = present[int(rng.integers(len(present)))] if rng.random() < 0.8 else SYNTH_CLASSES[int(rng.integers(4))]
    a, b = (SYNTH_CLASSES[j] for j in rng.permutation(4)[:2])
    qa = [("presence", f"Is there a {boxes.class_to_text(c1)} in the image?", "yes" if counts[c1] else "no"),
          ("count", f"How many {SYNTH_PLURAL[c2]} are there in the image?", str(counts[c2])),
          ("comp", f"Are there more {SYNTH_PLURAL[a]} than {SYNTH_PLURAL[b]}?", "yes" if counts[a] > counts[b] else "no")]
    recs["vqa"] = [make_record(f"vqa_{rid}_{t}", "vqa", "synth", [img_rel], vqa_prompt(q, preset=preset), ans,
                               {"answer": ans, "type": t})
                   for t, q, ans in qa]
    # caption: several references
    ground, what = SYNTH_GROUNDS[scene][1], count_phrase(counts)
    n = sum(counts.values())
    refs = [f"An aerial image of {ground} with {what}.",
            f"There {'is' if n == 1 else 'are'} {what} in {ground}.",
            f"{what[0].upper() + what[1:]} seen from above in {ground}."]
    recs["caption"] = [make_record(f"caption_{rid}", "caption", "synth", [img_rel], caption_prompt(preset), refs[0],
                                   {"references": refs})]
    recs["cls"] = [make_record(f"cls_{rid}", "cls", "synth", [img_rel], cls_prompt(SYNTH_SCENES, preset), scene,
                               {"label": scene, "classes": SYNTH_SCENES})]
    return recs


def run_synth(args):
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary, written = new_summary(), []
    counter = answer_token_counter(args)
    for split_code, (split, n) in enumerate([("train", args.train), ("val", args.val)]):
        by_task = {t: [] for t in ("det", "ground", "vqa", "caption", "cls")}
        for i in progress(range(n), desc=f"synth {split}"):
            # one generator per image: an image does not change when --train/--val counts change
            rng = np.random.default_rng([args.seed, split_code, i])
            arr, scene, objects = synth_image(rng, args.objects, args.object_size)
            img_path = out / "images" / f"{split}_{i:05d}.png"
            if not img_path.exists():
                save_image_atomic(Image.fromarray(arr), img_path)
            for t, recs in synth_records(i, split, f"images/{img_path.name}", scene, objects, rng,
                                         args.ground_expr, args.prompts).items():
                by_task[t] += recs
            summary["counts"][f"objects {split}"] += len(objects)
        for t, recs in by_task.items():
            write_jsonl(out / f"synth_{t}_{split}.jsonl", recs)
            written.append(out / f"synth_{t}_{split}.jsonl")
            summary["counts"][f"records {t} {split}"] = len(recs)
        write_jsonl(out / f"synth_all_{split}.jsonl", [r for recs in by_task.values() for r in recs])
        written.append(out / f"synth_all_{split}.jsonl")
        if n:
            report_answer_tokens(summary, split, by_task["det"] + by_task["ground"], counter, args.answer_budget)
    write_info(out, "synth", args, summary)
    print_summary(f"synth (seed {args.seed})", summary, written)
    return summary


# -----------------------------------------------------------------------------
# lrs-vqa, mme-realworld: questions on images far larger than the pixel budget, for the zoom-in chain (model.py
# "Zoom-in chain"). A question whose evidence is one region becomes a zoom record: system turn model.ZOOM_SYSTEM,
# user "<image>{question}" + model.ZOOM_ASK, and with a crop box (training) the tool call, "<image>" +
# model.ZOOM_REPLY (the same file again: model.tokenize crops it at meta.zoom.bbox, original pixels) and the
# answer. Questions whose evidence is not one region (counting, comparison, several crop boxes) stay plain
# single-turn VQA, as RSCoVLM trains and evaluates them.
#   LRS-VQA benchmark (LRS_VQA_merged.jsonl): {"question_id": "FAIR_1", "image": "LRS_VQA/image/15565.tif",
#     "category", "text" (question + "\n Answer the question using a single word or phrase."), "ground_truth",
#     "hbox", "rbox", "image_size", ...}; categories other than count get the zoom prompt (RSCoVLM's evaluation).
#   LRS-VQA training data with zoom boxes (JSON list or JSONL): {"id", "image", "image_ori_width",
#     "image_ori_height", "question", "answer", "bbox_info": {"rbox": [[8 numbers]], "crop_hbox": [[x1, y1, x2,
#     y2]]}}, or the earlier {"id", "image", "bbox_info": {"crop_hbox": [x1, y1, x2, y2], ...}, "conversations":
#     [{"from": "human", "value": "<image>\n..."}, {"from": "gpt", "value": ...}]}.
#   MME-RealWorld (MME_RealWorld_remote_sensing.json, or the whole MME_RealWorld.json: Subtask "Remote Sensing"
#     kept): {"Question_id", "Image", "Text", "Answer choices": ["(A) ...", ...], "Ground truth": "D", "Category",
#     "Subtask", "Task"}; the prompt is RSCoVLM's multiple-choice one; color questions get the zoom prompt, count
#     and position questions do not (RSCoVLM's evaluation).

IMAGE_TAG = "<image>"
LRS_PLAIN = {"count", "compare", "comparison"}  # evidence spread over the image: no zoom
MME_PLAIN = {"count", "position"}
MME_CHOICES = " The choices are listed below: \n"
MME_SUFFIX = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
              "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")


def read_json_entries(path):
    """[(entry, where)] of a JSON list file or a JSONL file; where = 'FILE:LINE' (JSONL) or 'FILE entry K'."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--json {path}: no such file" + did_you_mean(path.parent, lambda d: (d / path.name).is_file()))
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":  # line by line: a one-line file whose object has one list-valued key (a
        return json_lines(path, text)    # refGeo line's bbox) is that entry, not a wrapper of the list
    try:
        data = json.loads(text)
        if isinstance(data, dict):  # a single JSONL line, or a wrapper {"...": [entries]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 and "question_id" not in data else [data]
        if not isinstance(data, list):
            raise BadInput(f"{path}: expected a JSON list of entries or JSON lines, got {type(data).__name__}")
        return [(e, f"{path} entry {k}") for k, e in enumerate(data)]
    except json.JSONDecodeError:
        return json_lines(path, text)


def json_lines(path, text):
    """[(entry, 'FILE:LINE')] of JSON lines; a bad line is a BadInput naming it."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise BadInput(f"bad JSON at {path}:{lineno}: {e}") from None
    return out


def zoom_vqa_record(rid, dataset, image, question, answer, meta, zoom, crop=None):
    """A vqa record: plain ("<image>{question}"), a zoom prompt (zoom=True), or with crop [x1, y1, x2, y2]
    (original pixels) the whole chain. The call text stored is in original pixels, for people to read; model.tokenize
    renders it in the model's frame from meta.zoom.bbox."""
    if not zoom:
        return make_record(rid, "vqa", dataset, [image], IMAGE_TAG + question, answer, meta)
    messages = [{"role": "system", "content": model.ZOOM_SYSTEM},
                {"role": "user", "content": IMAGE_TAG + question + model.ZOOM_ASK}]
    images, meta = [image], {**meta, "zoom": {}}
    if crop is None:  # an evaluation prompt: the model calls the tool itself; the answer stays in meta
        return {"id": rid, "task": "vqa", "dataset": dataset, "images": images, "messages": messages, "meta": meta}
    messages += [{"role": "assistant", "content": model.zoom_call_text(crop)},
                 {"role": "user", "content": IMAGE_TAG + model.ZOOM_REPLY}]
    images, meta["zoom"] = [image, image], {"bbox": crop}
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": rid, "task": "vqa", "dataset": dataset, "images": images, "messages": messages, "meta": meta}


def _lrs_item(e, where):
    """(kind, id, image, question, answer, category, crop boxes, (w, h) or None, evidence hbox or None) of an
    LRS-VQA entry: kind 'bench' (the
    benchmark's lines) or 'train' (entries with bbox_info). BadInput naming `where` when it is neither."""
    if not isinstance(e, dict) or not isinstance(e.get("image"), str):
        raise BadInput(f"{where}: not an LRS-VQA entry (needs 'image', and 'question_id'/'text'/'ground_truth' or "
                       "'bbox_info' with 'question'/'answer' or 'conversations')")
    if "question_id" in e:
        if not all(isinstance(e.get(k), str) and e.get(k) for k in ("text", "ground_truth", "category")):
            raise BadInput(f"{where}: benchmark entry {e['question_id']} needs text, ground_truth and category")
        hbox = e.get("hbox") if isinstance(e.get("hbox"), list) and len(e["hbox"]) == 4 else None
        return "bench", str(e["question_id"]), e["image"], e["text"], e["ground_truth"], e["category"], [], None, hbox
    info = e.get("bbox_info")
    if not isinstance(info, dict):
        raise BadInput(f"{where}: entry {e.get('id')} has no 'question_id' (benchmark) nor 'bbox_info' (training)")
    q, a = e.get("question"), e.get("answer")
    conv = e.get("conversations")
    if q is None and isinstance(conv, list) and len(conv) >= 2:
        q, a = conv[0].get("value"), conv[1].get("value")
        q = re.sub(r"^\s*<image>\s*", "", q or "")
    if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
        raise BadInput(f"{where}: entry {e.get('id')} has no question and answer")
    crops = info.get("crop_hbox") or []
    if len(crops) == 4 and all(isinstance(v, (int, float)) for v in crops):  # the earlier files: one flat box
        crops = [crops]
    if not all(isinstance(c, list) and len(c) == 4 and all(isinstance(v, (int, float)) for v in c) for c in crops):
        raise BadInput(f"{where}: entry {e.get('id')}: bbox_info.crop_hbox must be [x1, y1, x2, y2] boxes, got {crops!r}")
    w, h = e.get("image_ori_width", info.get("image_width")), e.get("image_ori_height", info.get("image_height"))
    return ("train", str(e.get("id", where)), e["image"], q, a, str(e.get("type") or e.get("category") or "untyped"),
            crops, (w, h) if w and h else None, None)


def _images_under(root, rel_paths, flag):
    """{rel: absolute path} of the entries' images under root; when none of them is there, BadInput suggests
    the folder one level down (or up) that holds the first one."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{flag} {root} is not a folder")
    paths = {p: root / p for p in rel_paths}
    if paths and not any(q.is_file() for q in paths.values()):
        first = next(iter(paths))
        hint = did_you_mean(root, lambda d: (d / first).is_file())
        if not hint and (root.parent / first).is_file():
            hint = f"; did you mean {root.parent}?"
        raise BadInput(f"none of the {len(paths)} images of the entries is under {flag} {root} (e.g. {root / first}){hint}")
    return paths


def run_lrs_vqa(args):
    out = Path(args.out)
    entries = [x for j in args.json for x in read_json_entries(j)]
    name = args.name or f"lrs_vqa_{args.split}"
    claim_output(out, name, args)
    summary, items = new_summary(), []
    for e, where in entries:
        try:
            items.append((_lrs_item(e, where), where))
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
    paths = _images_under(args.images, [it[0][2] for it in items], "--images")
    out.mkdir(parents=True, exist_ok=True)
    sizes = check_images([str(paths[it[0][2]]) for it in items if paths[it[0][2]].is_file()], args.workers,
                         "checking images")
    records, seen = [], set()
    for (kind, rid, rel_img, q, a, cat, crops, size, evidence), where in items:
        image = paths[rel_img]
        got = sizes.get(str(image), f"{where}: image {image} not found")
        try:
            if isinstance(got, str):
                raise BadInput(got if got.startswith(where) else f"{where}: {got}")
            if rid in seen:
                raise BadInput(f"{where}: id {rid} appears twice in the --json files")
            if size and tuple(size) != tuple(got):
                raise BadInput(f"{where}: entry says {size[0]}x{size[1]} but {image} is {got[0]}x{got[1]}: "
                               "its boxes would be cut from the wrong place")
            crop = None
            zoom = not args.no_zoom and cat.lower() not in LRS_PLAIN and (kind == "bench" or len(crops) == 1)
            if zoom and kind == "train":
                c, problem = model.zoom_crop_box(crops[0], *got)
                if problem:
                    raise BadInput(f"{where}: crop_hbox {crops[0]} is {problem} for the {got[0]}x{got[1]} image {image}")
                summary["counts"]["zoom boxes clipped to the image"] += c != [round(v) for v in crops[0]]
                crop = c
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
            continue
        seen.add(rid)
        meta = {"answer": a, "type": cat, "benchmark": "lrs_vqa"}
        if kind == "bench":  # FAIR / STAR / GLH: the source set, scored apart
            meta.update(source=rid.split("_")[0], question_id=rid)
            if evidence:
                meta["evidence_hbox"] = evidence  # the object the question is about (original pixels)
        records.append(zoom_vqa_record(rid, "lrs_vqa", rel(image, out), q, a, meta, zoom, crop))
        summary["counts"][f"records {kind}"] += 1
        summary["counts"]["zoom chains (with crop)" if crop else "zoom prompts" if zoom else "plain vqa"] += 1
        summary["counts"][f"category {cat}"] += 1
    summary["counts"]["records"] = len(records)
    write_outputs(out, name, args, summary, records, f"lrs-vqa {args.split}: {len(records)} records",
                  f"none of the {len(entries)} entries of {', '.join(args.json)} could be used")
    return summary


def mme_prompt(text, choices):
    """RSCoVLM's MME-RealWorld question: text, the choices one per line, the letter instruction."""
    return text + MME_CHOICES + "".join(c + "\n" for c in choices) + MME_SUFFIX


def run_mme_realworld(args):
    out = Path(args.out)
    entries = read_json_entries(args.json)
    name = args.name or "mme_realworld_rs"
    claim_output(out, name, args)
    summary, items = new_summary(), []
    for e, where in entries:
        try:
            if not isinstance(e, dict) or not all(k in e for k in ("Question_id", "Image", "Text", "Answer choices",
                                                                    "Ground truth")):
                raise BadInput(f"{where}: not an MME-RealWorld entry (needs Question_id, Image, Text, Answer choices, "
                               "Ground truth)")
            if e.get("Subtask", "Remote Sensing") != "Remote Sensing":
                summary["counts"]["other subtasks (not remote sensing)"] += 1
                continue
            choices = e["Answer choices"]
            letters = [c[1:2] for c in choices if isinstance(c, str)]
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and re.match(r"^\([A-E]\)", c)
                                                                    for c in choices)):
                raise BadInput(f"{where}: {e['Question_id']}: Answer choices must be strings '(A) ...', got {choices!r}")
            if e["Ground truth"] not in letters:
                raise BadInput(f"{where}: {e['Question_id']}: Ground truth {e['Ground truth']!r} is not one of the "
                               f"choices' letters {letters}")
            items.append((e, where))
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
    root = Path(args.images) if args.images else Path(args.json).parent
    paths = _images_under(root, [e["Image"] for e, _ in items], "--images")
    out.mkdir(parents=True, exist_ok=True)
    sizes = check_images([str(p) for p in paths.values() if p.is_file()], args.workers, "checking images")
    records, seen = [], set()
    for e, where in items:
        image, qid, cat = paths[e["Image"]], str(e["Question_id"]), str(e.get("Category", "untyped")).lower()
        got = sizes.get(str(image), f"image {image} not found")
        if isinstance(got, str) or qid in seen:
            skip_or_raise(summary, args.skip_bad, where, f"{where}: " + (got if isinstance(got, str) else
                                                                          f"Question_id {qid} appears twice"))
            continue
        seen.add(qid)
        zoom = not args.no_zoom and cat not in MME_PLAIN
        meta = {"answer": e["Ground truth"], "type": cat, "choices": e["Answer choices"], "benchmark": "mme_realworld",
                "question_id": qid}
        records.append(zoom_vqa_record(qid, "mme_realworld_rs", rel(image, out), mme_prompt(e["Text"], e["Answer choices"]),
                                       e["Ground truth"], meta, zoom))
        summary["counts"]["zoom prompts" if zoom else "plain vqa"] += 1
        summary["counts"][f"category {cat}"] += 1
    summary["counts"]["records"] = len(records)
    write_outputs(out, name, args, summary, records, f"mme-realworld remote sensing: {len(records)} records",
                  f"none of the {len(entries)} entries of {args.json} is a usable remote-sensing question")
    return summary


# -----------------------------------------------------------------------------
# Benchmarks RSCoVLM reports on, from their published files (each entry checked; one-line errors name FILE:LINE
# or FILE entry K). Benchmark facts go to meta (benchmark, type, groups, headline_rule), so eval_det.py /
# eval_vqa.py group and score them by the benchmark's rule (README "Benchmarks").
#   refgeo: refGeo (GeoGround's grounding collection, as RSCoVLM reads it): ROOT/metainfo/{set}.jsonl lines
#     {"image_id", "question", "bbox": [x1, y1, x2, y2] original pixels, optional "poly": [[x, y] x 4],
#     "image_width", "image_height"}; images in ROOT/images/{folder}/ (REFGEO_SETS); one ground record per line.
#   vrsbench: VRSBench_EVAL_{Cap,vqa,referring}.json, JSON lists of {"image_id", "question", "ground_truth",
#     "question_id", "type"}: type "caption" -> caption, "ref" -> ground ("ground_truth" "{<x1><y1><x2><y2>}"
#     in 0..100 of the image, "obj_corner" the normalised corners, "unique", "size_group"), else vqa (the type
#     is the question type, e.g. "object color").
#   geochat: one GeoChat-Bench file per run (its part from the file name, or --part): aid.jsonl / UCmerced.jsonl
#     {"question_id", "image", "text" (... "Classes: a, b, ...\n..."), "ground_truth"} -> cls; lrben.jsonl /
#     hrben.jsonl {"question_id", "image", "text" (question first line), "category"} + the RSVQA answers file
#     (--answers; GeoChat-Bench ships no answers) -> vqa; region_captioning.jsonl {"question_id", "image_id",
#     "question": "{<x1><y1><x2><y2>|theta}", "ground_truth"} -> caption; referring.jsonl {"question_id",
#     "image_id", "question", "ground_truth": [polygon, ...] (pixels; [[x, y] x 4] or 8 numbers), "type",
#     "obj_ids", "size_group"} -> ground records with every target object.
#   vhm: VHM's evaluation set as RSCoVLM reads it, ROOT/datasets_eval/{file}.json lists of {"image",
#     "image_path" (folder), "conversations": [{"from": "human"}, {"from": "gpt"}]} (VHM_FILES).

REFGEO_SETS = {"avvg_test": "avvg", "dior_rsvg_val": "dior_rsvg", "dior_rsvg_test": "dior_rsvg", "rsvg_test": "rsvg",
               "rsvg_val": "rsvg", "geochat_test": "geochat_test", "vrsbench_test": "vrsbench"}
GEOCHAT_PARTS = {"aid": "cls", "ucmerced": "cls", "lrben": "vqa", "hrben": "vqa", "region_captioning": "caption",
                 "grounding_description": "caption", "referring": "ground"}
GEOCHAT_REGION = "[identify] What is the object present at "  # GeoChat's (and RSCoVLM's) region-caption question
VHM_FILES = {"counting": "counting_dota-test_open.json", "imgtype": "imgType_mcq.json",
             "presence": "presence_mo_dota.json", "color": "color_dota-test_fair1m-val_open.json",
             "abspos": "abspos_dota-test_mc.json", "relpos": "relpos_dota-test_mc.json"}


def _preset(args):
    """The prompt preset keyword for the prompt helpers (--prompts)."""
    p = getattr(args, "prompts", None)
    return {"preset": p} if p else {}


def _ground_answer(args, objs, w, h, box_format):
    """(answer text, meta additions) of a ground record under --prompts (rscovlm: its answer conventions)."""
    rscovlm = getattr(args, "prompts", None) == "rscovlm"
    text = boxes.render_answer(objs, w, h, coords="abs", box_format=box_format, with_label=False,
                               style="rscovlm" if rscovlm else "plain")
    return text, answer_style(args.prompts) if rscovlm else {}


def _bench_image(root, name):
    """ROOT/name, else the same stem with another image extension (GeoChat-Bench's aid.jsonl names .png files
    that AID ships as .jpg; its referring and region-captioning ids have no extension), else None."""
    p = Path(root) / str(name)
    if p.is_file():
        return p
    stem = p.with_suffix("") if p.suffix.lower() in IMAGE_EXTS else p
    return next((q for ext in IMAGE_EXTS if (q := stem.with_name(stem.name + ext)).is_file()), None)


def _bench_items(items, root, flag, summary, skip_bad):
    """[(item, image path)] for items [(name, where, payload)]; a missing image is bad input naming its entry.
    When none of them is under root, one line suggests the sub-folder that holds the first."""
    root = Path(root)
    if not root.is_dir():
        raise BadInput(f"{flag} {root} is not a folder")
    found = [(it, _bench_image(root, it[0])) for it in items]
    if found and not any(p for _, p in found):
        first = items[0][0]
        raise BadInput(f"none of the {len(items)} images of the entries is under {flag} {root} (e.g. {root / str(first)})"
                       + did_you_mean(root, lambda d: _bench_image(d, first) is not None))
    out = []
    for it, p in found:
        if p is None:
            skip_or_raise(summary, skip_bad, it[1], f"{it[1]}: image {it[0]} not found under {flag} {root}")
        else:
            out.append((it, p))
    return out


def _image_sizes(pairs, workers, summary, skip_bad):
    """Keep the pairs whose image decodes; [(item, path, (w, h))]."""
    sizes = check_images([str(p) for _, p in pairs], workers, "checking images")
    out = []
    for it, p in pairs:
        got = sizes[str(p)]
        if isinstance(got, str):
            skip_or_raise(summary, skip_bad, it[1], f"{it[1]}: {got}")
        else:
            out.append((it, p, tuple(got)))
    return out


def _numbers(v, n, where, what):
    """n finite numbers from a list (nested [[x, y], ...] flattened), else BadInput naming where."""
    flat = [x for p in v for x in (p if isinstance(p, (list, tuple)) else [p])] if isinstance(v, (list, tuple)) else None
    if not flat or len(flat) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in flat):
        raise BadInput(f"{where}: {what} must be {n} numbers, got {v!r}")
    return [float(x) for x in flat]


def _ground_obj(poly, expression, w, h, where):
    """A ground-truth object; a polygon outside the image (by more than a pixel) is bad input: its
    coordinates are not the image's pixels."""
    xs, ys = poly[0::2], poly[1::2]
    if min(xs) < -1 or min(ys) < -1 or max(xs) > w + 1 or max(ys) > h + 1:
        raise BadInput(f"{where}: box {[round(v, 1) for v in poly]} is outside the {w}x{h} image (not in its pixels)")
    if boxes.fix_poly(poly) is None:
        raise BadInput(f"{where}: empty box {[round(v, 1) for v in poly]}")
    return {"poly": poly, "label": "", "difficult": 0, "expression": expression}


def _write_bench(out, name, args, summary, files, title, why_empty):
    """files {stem: records}: OUT/stem.jsonl for each non-empty one, OUT/name.info.json, the summary."""
    require_records(sum(map(len, files.values())), name, summary, title, why_empty)
    written = []
    for stem, recs in files.items():
        if recs:
            write_jsonl(out / f"{stem}.jsonl", recs)
            written.append(out / f"{stem}.jsonl")
        summary["counts"][f"records {stem}"] = len(recs)
    write_info(out, name, args, summary)
    print_summary(title, summary, written)


def _unique_id(seen, rid, where):
    if rid in seen:
        raise BadInput(f"{where}: id {rid} appears twice")
    seen.add(rid)
    return rid


def run_refgeo(args):
    root, out = Path(args.root), Path(args.out)
    meta_dir = root / "metainfo"
    if not meta_dir.is_dir():
        raise BadInput(f"{root} has no metainfo/ folder (--root holds refGeo's metainfo/{{set}}.jsonl and images/)"
                       + did_you_mean(root, lambda d: (d / "metainfo").is_dir()))
    have = sorted(p.stem for p in meta_dir.glob("*.jsonl"))
    sets = args.sets.split(",") if args.sets else [s for s in REFGEO_SETS if s in have]
    missing = [s for s in sets if s not in have]
    if missing or not sets:
        raise BadInput(f"no {meta_dir}/{(missing or ['{set}'])[0]}.jsonl (sets there: {', '.join(have) or 'none'})")
    name = args.name or "refgeo"
    claim_output(out, name, args)
    counter = answer_token_counter(args)
    out.mkdir(parents=True, exist_ok=True)
    summary, files = new_summary(), {}
    for s in sets:
        items = []
        for k, (e, where) in enumerate(read_json_entries(meta_dir / f"{s}.jsonl")):
            try:
                if not (isinstance(e, dict) and isinstance(e.get("image_id"), str) and isinstance(e.get("question"), str)
                        and e["question"].strip()):
                    raise BadInput(f"{where}: not a refGeo line (needs image_id, question, bbox)")
                box = _numbers(e.get("bbox"), 4, where, "bbox")
                poly = _numbers(e["poly"], 8, where, "poly") if args.box_format == "poly" and "poly" in e else None
                if args.box_format == "poly" and poly is None:
                    raise BadInput(f"{where}: --box-format poly needs a 'poly' in every line")
                items.append((e["image_id"], where, (e, box, poly, k)))
            except BadInput as err:
                skip_or_raise(summary, args.skip_bad, where, str(err))
        img_dir = root / "images" / REFGEO_SETS.get(s, s.rsplit("_", 1)[0])
        pairs = _image_sizes(_bench_items(items, img_dir, "refGeo images folder", summary, args.skip_bad),
                             args.workers, summary, args.skip_bad)
        recs, ds = [], f"refgeo_{s}"
        for (_, where, (e, box, poly, k)), image, (w, h) in pairs:
            try:
                size = (e.get("image_width"), e.get("image_height"))
                if all(size) and tuple(size) != (w, h):
                    raise BadInput(f"{where}: line says {size[0]}x{size[1]} but {image} is {w}x{h}")
                obj = _ground_obj(poly or boxes.hbox_to_poly(box), e["question"].strip(), w, h, where)
            except BadInput as err:
                skip_or_raise(summary, args.skip_bad, where, str(err))
                continue
            meta = {"width": w, "height": h, "objects": [obj], "box_format": args.box_format, "source": e["image_id"],
                    "benchmark": "refgeo", "set": s}
            answer, style = _ground_answer(args, [obj], w, h, args.box_format)
            meta.update(style)
            recs.append(make_record(f"{s}_{k}", "ground", ds, [rel(image, out)],
                                    ground_prompt(obj["expression"], args.box_format, **_preset(args)), answer, meta))
        if recs:
            report_answer_tokens(summary, s, recs, counter, args.answer_budget)
        files[f"refgeo_{s}"] = recs
    _write_bench(out, name, args, summary, files, f"refgeo {','.join(sets)}: {sum(map(len, files.values()))} records",
                 f"no line of {meta_dir}/{{{','.join(sets)}}}.jsonl could be used")
    return summary


def _vrsbench_box(e, w, h, where):
    """VRSBench's referring box in pixels: from obj_corner (normalised corners, clipped to the image as VRSBench
    does), else from the ground_truth string {<x1><y1><x2><y2>} in 0..100."""
    corner = e.get("obj_corner")
    if isinstance(corner, list) and len(corner) == 8:
        c = [min(max(float(v), 0.0), 1.0) for v in corner]
        return [min(c[0::2]) * w, min(c[1::2]) * h, max(c[0::2]) * w, max(c[1::2]) * h]
    nums = re.findall(r"<(\d+(?:\.\d+)?)>", str(e.get("ground_truth", "")))
    if len(nums) != 4:
        raise BadInput(f"{where}: referring ground_truth must be '{{<x1><y1><x2><y2>}}' (0..100), got "
                       f"{e.get('ground_truth')!r}")
    x1, y1, x2, y2 = (float(v) / 100 for v in nums)
    return [x1 * w, y1 * h, x2 * w, y2 * h]


def run_vrsbench(args):
    out = Path(args.out)
    name = args.name or "vrsbench"
    claim_output(out, name, args)
    summary, items = new_summary(), []
    for e, where in [x for j in args.json for x in read_json_entries(j)]:
        try:
            if not (isinstance(e, dict) and isinstance(e.get("image_id"), str) and "ground_truth" in e):
                raise BadInput(f"{where}: not a VRSBench entry (needs image_id, question, ground_truth, type)")
            kind = ("caption" if e.get("type") == "caption" else
                    "referring" if e.get("type") == "ref" or re.fullmatch(r"\{(<\d+>)+\}", str(e["ground_truth"]))
                    else "vqa")
            if not str(e.get("question") or "").strip() and kind != "caption":
                raise BadInput(f"{where}: VRSBench {kind} entry without a question")
            items.append((e["image_id"], where, (e, kind)))
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
    out.mkdir(parents=True, exist_ok=True)
    pairs = _image_sizes(_bench_items(items, args.images, "--images", summary, args.skip_bad), args.workers, summary,
                         args.skip_bad)
    files, seen, kw = {"vrsbench_caption": [], "vrsbench_vqa": [], "vrsbench_referring": []}, set(), _preset(args)
    for (_, where, (e, kind)), image, (w, h) in pairs:
        try:
            rid = _unique_id(seen, f"vrsbench_{kind}_{e.get('question_id', where)}", where)
            img, q, gt = [rel(image, out)], str(e.get("question") or "").strip(), e["ground_truth"]
            if kind == "caption":
                refs = [str(g) for g in (gt if isinstance(gt, list) else [gt]) if str(g).strip()]
                if not refs:
                    raise BadInput(f"{where}: caption entry without a reference caption")
                rec = make_record(rid, "caption", "vrsbench_caption", img,
                                  vqa_prompt(q or "Describe the image in detail", suffix=False, **kw), refs[0],
                                  {"references": refs, "benchmark": "vrsbench", "image_id": e["image_id"]})
            elif kind == "vqa":
                a = str(gt[0] if isinstance(gt, list) else gt)
                rec = make_record(rid, "vqa", "vrsbench_vqa", img, vqa_prompt(q, **kw), a,
                                  {"answer": a, "type": str(e.get("type") or "untyped"), "benchmark": "vrsbench",
                                   "headline_rule": "contain", "image_id": e["image_id"]})
            else:
                if kw.get("preset") == "rscovlm":  # RSCoVLM asks for "find the {caption}" without its "The " and "."
                    q = re.sub(r"^the\s+", "", q, flags=re.IGNORECASE).rstrip(".")
                obj = _ground_obj(boxes.hbox_to_poly(_vrsbench_box(e, w, h, where)), q, w, h, where)
                groups = {"unique": "unique" if e.get("unique") else "non-unique"}
                if e.get("size_group"):
                    groups["size"] = str(e["size_group"])
                answer, style = _ground_answer(args, [obj], w, h, "hbox")
                rec = make_record(rid, "ground", "vrsbench_referring", img, ground_prompt(q, "hbox", **kw), answer,
                                  {"width": w, "height": h, "objects": [obj], "box_format": "hbox", "groups": groups,
                                   "benchmark": "vrsbench", "category": e.get("obj_cls"), "image_id": e["image_id"],
                                   **style})
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
            continue
        files[f"vrsbench_{kind}"].append(rec)
    _write_bench(out, name, args, summary, files, f"vrsbench: {sum(map(len, files.values()))} records",
                 f"none of the entries of {', '.join(args.json)} could be used")
    return summary


def _geochat_part(args):
    if args.part:
        return args.part
    stem = re.sub(r"[^a-z]", "", Path(args.json).stem.lower())
    part = next((p for p in GEOCHAT_PARTS if p.replace("_", "") == stem), None)
    if part is None:
        raise BadInput(f"--json {args.json}: cannot tell the GeoChat-Bench part from the file name; give --part "
                       f"({', '.join(GEOCHAT_PARTS)})")
    return part


def _geochat_label(gt, classes, where):
    """The class-list spelling of a scene label: names compared lower-case without spaces/underscores, and a
    trailing 'gt' dropped when that makes it a class (aid.jsonl writes 'MediumResidentialgt')."""
    key = {re.sub(r"[^a-z0-9]", "", c.lower()): c for c in classes}
    g = re.sub(r"[^a-z0-9]", "", str(gt).lower())
    hit = key.get(g) or (key.get(g[:-2]) if g.endswith("gt") else None)
    if hit is None:
        raise BadInput(f"{where}: ground_truth {gt!r} is not one of the classes in its text ({', '.join(classes)})")
    return hit


def _geochat_answers(path):
    """{question_id: answer} of an RSVQA answers file ({"answers": [{"question_id", "answer", "active"}]})."""
    if not path:
        raise BadInput("lrben/hrben: give --answers, the RSVQA answers file of that split (GeoChat-Bench ships "
                       "questions only), e.g. LR_split_test_answers.json or USGS_split_test_phili_answers.json")
    try:
        data = json.loads(Path(path).read_text())
        return {a["question_id"]: a["answer"] for a in data["answers"] if a.get("active", True)}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BadInput(f"cannot read --answers {path}: {e!r} (expected RSVQA's {{\"answers\": [...]}})") from None


def _geochat_entry(part, e, where, answers):
    """(image name, payload) of one GeoChat-Bench line, checked."""
    if not isinstance(e, dict):
        raise BadInput(f"{where}: not a JSON object")
    if part in ("aid", "ucmerced"):
        text = e.get("text")
        if not (isinstance(text, str) and "Classes:" in text and isinstance(e.get("image"), str)):
            raise BadInput(f"{where}: not a GeoChat-Bench {part} line (needs image, text with 'Classes: ...', ground_truth)")
        classes = [class_text(c) for c in text.split("Classes:", 1)[1].split("\n", 1)[0].split(",") if c.strip()]
        return e["image"], {"classes": classes, "label": _geochat_label(e.get("ground_truth"), classes, where)}
    if part in ("lrben", "hrben"):
        if not (isinstance(e.get("text"), str) and isinstance(e.get("image"), str) and "question_id" in e):
            raise BadInput(f"{where}: not a GeoChat-Bench {part} line (needs question_id, image, text, category)")
        if e["question_id"] not in answers:
            raise BadInput(f"{where}: question {e['question_id']} has no active answer in --answers")
        return e["image"], {"question": e["text"].split("\n", 1)[0].strip(), "answer": str(answers[e["question_id"]])}
    image = e.get("image_id")
    if not (isinstance(image, str) and isinstance(e.get("question"), str) and "ground_truth" in e):
        raise BadInput(f"{where}: not a GeoChat-Bench {part} line (needs image_id, question, ground_truth)")
    if part != "referring":
        return image, {"refs": [str(g) for g in (e["ground_truth"] if isinstance(e["ground_truth"], list)
                                                 else [e["ground_truth"]])]}
    gt = e["ground_truth"]
    single = isinstance(gt, list) and len(gt) in (4, 8) and all(isinstance(v, (int, float)) for v in gt)
    polys = [gt] if single or (isinstance(gt, list) and len(gt) == 4 and all(
        isinstance(p, list) and len(p) == 2 for p in gt)) else gt
    if not isinstance(polys, list) or not polys:
        raise BadInput(f"{where}: referring ground_truth must be a list of polygons, got {gt!r}")
    return image, {"polys": [_gt_poly(p, where) for p in polys]}


def _gt_poly(p, where):
    """A referring target: a polygon ([[x, y] x 4] or 8 numbers) or a horizontal box (4 numbers), in pixels."""
    if isinstance(p, list) and len(p) == 4 and all(isinstance(v, (int, float)) for v in p):
        return boxes.hbox_to_poly(_numbers(p, 4, where, "a ground_truth box"))
    return _numbers(p, 8, where, "a ground_truth polygon")


def run_geochat(args):
    out = Path(args.out)
    part = _geochat_part(args)
    task, ds = GEOCHAT_PARTS[part], f"geochat_{part}"
    name = args.name or ds
    claim_output(out, name, args)
    answers = _geochat_answers(args.answers) if task == "vqa" else {}
    summary, items = new_summary(), []
    for e, where in read_json_entries(args.json):
        try:
            image, payload = _geochat_entry(part, e, where, answers)
            items.append((image, where, (e, payload)))
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
    out.mkdir(parents=True, exist_ok=True)
    pairs = _image_sizes(_bench_items(items, args.images, "--images", summary, args.skip_bad), args.workers, summary,
                         args.skip_bad)
    recs, seen, kw = [], set(), _preset(args)
    for (_, where, (e, p)), image, (w, h) in pairs:
        try:
            rid = _unique_id(seen, f"{ds}_{e.get('question_id', where)}", where)
            img, base = [rel(image, out)], {"benchmark": "geochat", "question_id": e.get("question_id")}
            if task == "cls":
                rec = make_record(rid, "cls", ds, img, cls_prompt(p["classes"], **kw), p["label"],
                                  {**base, "label": p["label"], "classes": p["classes"], "headline_rule": "contain"})
            elif task == "vqa":
                rec = make_record(rid, "vqa", ds, img, vqa_prompt(p["question"], **kw), p["answer"],
                                  {**base, "answer": p["answer"], "type": str(e.get("category") or "untyped"),
                                   "headline_rule": "contain"})
            elif task == "caption":
                q = (GEOCHAT_REGION if part == "region_captioning" else "") + e["question"].strip()
                rec = make_record(rid, "caption", ds, img, vqa_prompt(q, suffix=False, **kw), p["refs"][0],
                                  {**base, "references": p["refs"], "region": e["question"] if part ==
                                   "region_captioning" else None})
            else:
                q = e["question"].strip()
                objs = [_ground_obj(poly, q, w, h, where) for poly in p["polys"]]
                groups = {"size": str(e.get("size_group") or "unknown"), "type": str(e.get("type") or "unknown"),
                          "count": "single" if len(e.get("obj_ids") or []) == 1 else "multiple"}
                answer, style = _ground_answer(args, objs, w, h, "poly")
                rec = make_record(rid, "ground", ds, img, ground_prompt(q, "poly", **kw), answer,
                                  {**base, "width": w, "height": h, "objects": objs, "box_format": "poly",
                                   "groups": groups, "benchmark": "geochat_referring", **style})
        except BadInput as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
            continue
        recs.append(rec)
        summary["counts"][f"type {rec['meta'].get('type') or rec['meta'].get('groups', {}).get('type') or task}"] += 1
    _write_bench(out, name, args, summary, {name: recs}, f"geochat {part}: {len(recs)} {task} records",
                 f"none of the lines of {args.json} could be used")
    return summary


def run_vhm(args):
    root, out = Path(args.root), Path(args.out)
    base = root / "datasets_eval" if (root / "datasets_eval").is_dir() else root
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in VHM_FILES]
    if unknown:
        raise BadInput(f"--parts {','.join(unknown)}: choose from {','.join(VHM_FILES)}")
    absent = [VHM_FILES[p] for p in parts if not (base / VHM_FILES[p]).is_file()]
    if absent:
        raise BadInput(f"no {base / absent[0]} (--root holds VHM's datasets_eval/ with {', '.join(VHM_FILES.values())})"
                       + did_you_mean(root, lambda d: any((f / absent[0]).is_file() for f in (d, d / "datasets_eval"))))
    name = args.name or "vhm"
    claim_output(out, name, args)
    out.mkdir(parents=True, exist_ok=True)
    summary, files, kw = new_summary(), {}, _preset(args)
    for part in parts:
        items = []
        for k, (e, where) in enumerate(read_json_entries(base / VHM_FILES[part])):
            try:
                conv = e.get("conversations") if isinstance(e, dict) else None
                if not (isinstance(conv, list) and len(conv) == 2 and conv[0].get("from") == "human"
                        and conv[1].get("from") == "gpt" and isinstance(e.get("image"), str)):
                    raise BadInput(f"{where}: not a VHM entry (needs image, image_path and conversations "
                                   "[human question, gpt answer])")
                items.append((f"{e.get('image_path', '')}/{e['image']}".lstrip("/"), where, (e, k)))
            except BadInput as err:
                skip_or_raise(summary, args.skip_bad, where, str(err))
        pairs = _image_sizes(_bench_items(items, base, "--root", summary, args.skip_bad), args.workers, summary,
                             args.skip_bad)
        recs = []
        for (_, where, (e, k)), image, _size in pairs:
            q = re.sub(r"\s*<image>\s*", " ", str(e["conversations"][0]["value"])).strip()
            a = str(e["conversations"][1]["value"]).strip()
            if part == "counting" and not re.fullmatch(r"\d+", a):
                skip_or_raise(summary, args.skip_bad, where, f"{where}: counting answer {a!r} is not a number")
                continue
            recs.append(make_record(f"vhm_{part}_{k}", "vqa", f"vhm_{part}", [rel(image, out)],
                                    vqa_prompt(q, suffix=False, **kw), a,
                                    {"answer": a, "type": part, "benchmark": "vhm", "vhm_part": part}))
        files[f"vhm_{part}"] = recs
    _write_bench(out, name, args, summary, files, f"vhm {','.join(parts)}: {sum(map(len, files.values()))} records",
                 f"no entry of {base} could be used")
    return summary


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    model.add_debug_flag(p)
    sub = p.add_subparsers(dest="source", required=True)

    def common(sp, workers=True):
        model.add_debug_flag(sp)  # also after the subcommand, where people type it
        sp.add_argument("--out", required=True, help="output folder for the JSONL files (and images/)")
        sp.add_argument("--name", default=None, help="stem of the output JSONL (default: derived from source and split)")
        sp.add_argument("--skip-bad", action="store_true",
                        help="skip (and list in the summary) bad images and labels instead of stopping")
        if workers:
            sp.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                            help="processes for tiling / image checks")

    def answer_budget(sp):  # det/ground subcommands: how many answers are too long to generate or train on
        sp.add_argument("--answer-budget", type=int, default=2048,
                        help="report, per split, how many answers need more tokens than this (default %(default)s, "
                        "eval_det.py's former --max-new-tokens; for training: --max-length minus the image and "
                        "prompt tokens)")
        sp.add_argument("--processor", default=None,
                        help="checkpoint folder whose tokenizer, coordinates and pixel budget count answer tokens "
                        "exactly (default: an estimate, one token per digit, punctuation run, word and line break)")

    def prompts(sp):  # every converter: whose wording (README "Prompt presets")
        sp.add_argument("--prompts", choices=PRESETS, default="default",
                        help="prompt wording and answer conventions: default (this project's) or rscovlm "
                        "(RSCoVLM's own, to evaluate or reproduce its checkpoints)")

    def forms(sp):  # det/ground converters
        sp.add_argument("--box-forms", default=None,
                        help="one record per box form, e.g. hbox,rbox,poly (RSCoVLM's training: all three; "
                        "default: --box-format alone, hbox for grounding)")

    for src in ("dota", "fair1m"):
        sp = sub.add_parser(src, help=f"{src.upper()} -> det records of tiled patches")
        common(sp)
        answer_budget(sp)
        sp.add_argument("--root", nargs="+", required=True,
                        help="folder(s) with images/ and " + ("labelTxt/" if src == "dota" else "labelXml/"))
        sp.add_argument("--split", choices=["train", "val", "test"], required=True,
                        help="train: drop empty patches; val: keep all + ground truth; test: no labels, prompts only")
        if src == "dota":
            sp.add_argument("--version", choices=sorted(DOTA_CLASSES), default="1.0", help="DOTA class list")
        sp.add_argument("--patch", type=int, default=1024, help="window (patch) size in px, e.g. 1024 or 512")
        sp.add_argument("--gap", type=int, default=200, help="overlap between windows in px (500 for multi-scale)")
        sp.add_argument("--rates", default="1.0", help="comma-separated resize rates, e.g. 0.5,1.0,1.5")
        sp.add_argument("--iof-thr", type=float, default=0.7, help="min fraction of an object's area inside a window")
        sp.add_argument("--img-rate-thr", type=float, default=0.6, help="min fraction of a window covered by the image")
        sp.add_argument("--pad-value", default="0", help="pad colour for images smaller than a window: V or R,G,B")
        sp.add_argument("--ext", choices=["png", "jpg"], default="png", help="patch image format")
        sp.add_argument("--keep-empty", action="store_true", help="train: keep patches without objects")
        sp.add_argument("--box-format", choices=list(DET_FORMAT), default="poly", help="box kind asked for in answers")
        forms(sp)
        prompts(sp)

    sp = sub.add_parser("dior", help="DIOR-R oriented XML -> det records")
    common(sp)
    answer_budget(sp)
    sp.add_argument("--root", required=True, help="DIOR-R folder (Annotations/, JPEGImages-*/, ImageSets/Main/)")
    sp.add_argument("--split", default="trainval",
                    help="split list name (train, val, trainval, test) or 'all'; trainval without a trainval.txt "
                    "reads train.txt + val.txt")
    sp.add_argument("--split-file", default=None, help="explicit split list (one image id per line)")
    sp.add_argument("--box-format", choices=list(DET_FORMAT), default="poly", help="box kind asked for in answers")
    forms(sp)
    prompts(sp)

    sp = sub.add_parser("rsvg", help="DIOR-RSVG -> ground records")
    common(sp)
    answer_budget(sp)
    sp.add_argument("--root", required=True, help="DIOR-RSVG folder (Annotations/, JPEGImages/, {split}.txt)")
    sp.add_argument("--split", default="test", help="train, val or test (reads {split}.txt)")
    sp.add_argument("--split-file", default=None, help="explicit index file (one object index per line)")
    forms(sp)
    prompts(sp)

    sp = sub.add_parser("rsvqa", help="RSVQA-LR / -HR -> vqa records")
    common(sp)
    sp.add_argument("--root", required=True, help="folder with {LR|USGS}_split_{split}_*.json")
    sp.add_argument("--variant", choices=["LR", "HR"], required=True, help="LR (Sentinel-2) or HR (USGS aerial)")
    sp.add_argument("--split", default="test", help="train, val, test (HR also test_phili)")
    sp.add_argument("--images", default=None, help="image folder (default: ROOT/Images_LR or ROOT/Data)")
    sp.add_argument("--types", default=None, help="keep only these question types, e.g. presence,comp,rural_urban")
    sp.add_argument("--no-bucket", action="store_true", help="keep raw LR counts / areas instead of the published buckets")
    sp.add_argument("--no-suffix", action="store_true", help="leave out GeoChat's 'Answer ... single word or phrase.'")
    prompts(sp)

    sp = sub.add_parser("captions", help="Karpathy-style caption JSON -> caption records")
    common(sp)
    sp.add_argument("--json", required=True, help="dataset.json / dataset_rsicd.json")
    sp.add_argument("--images", required=True, help="image folder")
    sp.add_argument("--split", default="test", help="train, val, test, or several joined by '+'")
    sp.add_argument("--dataset", default=None, help="dataset name in records and the output file (default: from the JSON file "
                    "name, dataset_rsicd.json -> rsicd; for a plain dataset.json its folder, UCM_captions -> ucm_captions)")
    sp.add_argument("--per-reference", action="store_true", help="one record per reference (for training)")
    prompts(sp)

    sp = sub.add_parser("cls", help="class-per-folder scene classification -> cls records (train + test files)")
    common(sp)
    sp.add_argument("--root", required=True,
                    help="folder with one sub-folder of images per class (UCMerced: UCMerced_LandUse/Images)")
    sp.add_argument("--train-ratio", type=float, default=0.2, help="fraction of each class for training (AID: 0.2)")
    sp.add_argument("--seed", type=int, default=0, help="split seed")
    sp.add_argument("--dataset", default=None, help="dataset name in records (default: root folder name)")
    prompts(sp)

    sp = sub.add_parser("lrs-vqa", help="LRS-VQA benchmark lines or training entries with zoom boxes -> vqa / zoom records")
    common(sp)
    sp.add_argument("--json", nargs="+", required=True,
                    help="LRS_VQA_merged.jsonl (the benchmark) and/or training files with bbox_info.crop_hbox (JSON list or JSONL)")
    sp.add_argument("--images", required=True, help="folder the entries' 'image' paths are relative to")
    sp.add_argument("--split", default="test", help="split name in the output file: lrs_vqa_{split}.jsonl (default %(default)s)")
    sp.add_argument("--no-zoom", action="store_true", help="plain single-turn VQA for every question (no tool turns)")

    sp = sub.add_parser("mme-realworld", help="MME-RealWorld remote-sensing multiple choice -> vqa / zoom prompts")
    common(sp)
    sp.add_argument("--json", required=True, help="MME_RealWorld_remote_sensing.json (or MME_RealWorld.json: Remote Sensing kept)")
    sp.add_argument("--images", default=None, help="folder the entries' 'Image' paths are relative to (default: the JSON's folder)")
    sp.add_argument("--no-zoom", action="store_true", help="plain single-turn questions (no tool turns)")

    # benchmarks RSCoVLM reports on (section "Benchmarks" above)
    sp = sub.add_parser("refgeo", help="refGeo grounding sets (AVVG, DIOR-RSVG, GeoChat, RSVG, VRSBench) -> ground records")
    common(sp)
    prompts(sp)
    answer_budget(sp)
    sp.add_argument("--root", required=True, help="refGeo folder with metainfo/{set}.jsonl and images/")
    sp.add_argument("--sets", default=None, help=f"comma list of sets (default: those present of {','.join(REFGEO_SETS)})")
    sp.add_argument("--box-format", choices=["hbox", "poly"], default="hbox",
                    help="target kind: hbox (bbox, what Acc@0.5 is reported on) or poly (the lines' 'poly')")
    sp = sub.add_parser("vrsbench", help="VRSBench evaluation files -> caption / vqa / ground (referring) records")
    common(sp)
    prompts(sp)
    sp.add_argument("--json", nargs="+", required=True,
                    help="VRSBench_EVAL_Cap.json, VRSBench_EVAL_vqa.json and/or VRSBench_EVAL_referring.json")
    sp.add_argument("--images", required=True, help="folder of the entries' image_id files (VRSBench Images_val)")
    sp = sub.add_parser("geochat", help="one GeoChat-Bench file -> cls / vqa / caption / ground records")
    common(sp)
    prompts(sp)
    sp.add_argument("--json", required=True, help="aid.jsonl, UCmerced.jsonl, lrben.jsonl, hrben.jsonl, "
                    "region_captioning.jsonl, grounding_description.jsonl or referring.jsonl")
    sp.add_argument("--images", required=True, help="image folder of that part (AID, UCMerced Images, RSVQA LR/HR "
                    "images, GeoChat_Instruct images for region captioning and referring)")
    sp.add_argument("--part", choices=list(GEOCHAT_PARTS), default=None, help="the part (default: from the file name)")
    sp.add_argument("--answers", default=None, help="lrben/hrben: the RSVQA answers JSON of the split "
                    "(LR_split_test_answers.json, USGS_split_test_phili_answers.json)")
    sp = sub.add_parser("vhm", help="VHM evaluation set parts -> vqa records")
    common(sp)
    prompts(sp)
    sp.add_argument("--root", required=True, help="VHM_eval_dataset folder (with datasets_eval/)")
    sp.add_argument("--parts", default=",".join(VHM_FILES), help="comma list of parts (default: %(default)s)")

    sp = sub.add_parser("synth", help="procedural remote-sensing-like data (det, ground, vqa, caption, cls)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--train", type=int, default=200, help="number of training images")
    sp.add_argument("--val", type=int, default=50, help="number of validation images")
    sp.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    sp.add_argument("--objects", type=int_range("--objects", 1, 6), default=(1, 4), metavar="MIN,MAX",
                    help="objects per image, drawn uniformly from MIN..MAX (the demo's localisation level: 1,1)")
    sp.add_argument("--object-size", type=int_range("--object-size", 8, SYNTH_SIZE // 2), default=None,
                    metavar="MIN,MAX", help="longer side of each object's box in pixels, drawn uniformly; default: "
                                            "each class's own sizes (20-64 px; the demo's localisation level: 64,96)")
    sp.add_argument("--ground-expr", default="region", choices=["region", "class"],
                    help='grounding expressions: region = colour, class and region ("the red ship at the top left"); '
                         'class = the class alone ("the ship"), for objects alone of their class in the image')
    answer_budget(sp)
    prompts(sp)
    model.add_debug_flag(sp)
    return p


def int_range(flag, lo, hi):
    """argparse type for 'MIN,MAX' (or one number) with lo <= MIN <= MAX <= hi."""
    def parse(text):
        try:
            v = [int(x) for x in text.split(",")]
        except ValueError:
            v = []
        if len(v) == 1:
            v = v * 2
        if len(v) != 2 or not lo <= v[0] <= v[1] <= hi:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX with {lo} <= MIN <= MAX <= {hi}, got '{text}'")
        return tuple(v)
    parse.__name__ = flag
    return parse


RUNNERS = {"dota": partial(run_tiling, source="dota"), "fair1m": partial(run_tiling, source="fair1m"),
           "dior": run_dior, "rsvg": run_rsvg, "rsvqa": run_rsvqa, "captions": run_captions, "cls": run_cls,
           "synth": run_synth}
RUNNERS.update({"lrs-vqa": run_lrs_vqa, "mme-realworld": run_mme_realworld})
RUNNERS.update({"refgeo": run_refgeo, "vrsbench": run_vrsbench, "geochat": run_geochat, "vhm": run_vhm})


def main(argv=None):
    """Returns the run's summary. Bad input raises BadInput (a model.UserError): run_cli prints it as one line
    `error: ...` and exits 2; any other exception is a bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    if getattr(args, "answer_budget", 1) < 1:
        raise BadInput(f"--answer-budget {args.answer_budget}: give a number of tokens >= 1")
    return RUNNERS[args.source](args)


if __name__ == "__main__":
    model.run_cli(main)
