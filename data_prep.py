"""Convert remote-sensing training sets to rscovlm records (JSONL, one sample per line).

Each subcommand writes OUT/NAME.jsonl (+ OUT/images/ for the tiled dota and fair1m) and OUT/NAME.info.json (its
arguments and summary). Layouts, tiling rules, record format: docs/data.md; benchmarks: bench_prep.py.

    python data_prep.py dota --root DOTA/train DOTA/val --split train --patch 512 --out data/dota
    python data_prep.py dota --root DOTA/val --split val --out data/dota          # every patch + ground truth
    python data_prep.py dota --root DOTA/train --split train --rates 0.5,1.0,1.5 --gap 500 --out data/dota_ms
    python data_prep.py fair1m --root FAIR1M/train/part1 --split train --out data/fair1m
    python data_prep.py dior --root DIOR-R --split trainval --out data/dior     # --split all: every annotated image
    python data_prep.py rsvg --root DIOR-RSVG --split test --out data/rsvg
    python data_prep.py rsvqa --root RSVQA_LR --variant LR --split test --out data/rsvqa
    python data_prep.py captions --json RSICD/dataset_rsicd.json --images RSICD/RSICD_images --split test --out data/cap
    python data_prep.py cls --root AID --train-ratio 0.2 --out data/aid

Bad input: one line `error: ...` naming the file, line or flag (exit 2); --skip-bad skips the image and lists it.
"""
import argparse
import difflib
import json
import math
import os
import random
import re
from collections import Counter
from functools import partial
from multiprocessing import Pool, TimeoutError as PoolTimeout
from pathlib import Path

import numpy as np
from PIL import Image

import boxes
import model
import prompts
from common import Progress, UserError, add_debug_flag, run_cli, track


Image.MAX_IMAGE_PIXELS = None  # DOTA-v2 has 20000 x 20000 images

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# -----------------------------------------------------------------------------
# Records (the wording of every prompt is prompts.py's)


def box_forms(args, default):
    """--box-forms as a list (one record per form), else [default]."""
    if not getattr(args, "box_forms", None):
        return [default]
    forms = [f.strip() for f in args.box_forms.split(",") if f.strip()]
    bad = [f for f in forms if f not in prompts.DET_FORMAT]
    if bad or not forms or len(set(forms)) != len(forms):
        raise UserError(f"--box-forms {args.box_forms!r}: give distinct forms from {', '.join(prompts.DET_FORMAT)}, "
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
                               style=prompts.answer_style(preset).get("answer_style", "plain"))


# -----------------------------------------------------------------------------
# Files, errors, summaries


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
        raise UserError(reason)
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
    raise UserError(f"no records for {name}, nothing written: {why_empty}")


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
        raise UserError(f"{Path(out) / name}.* was made from {old_s}; this run reads {new_s} and would overwrite "
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
# Input folders and images. A folder given one level too deep (at images/, JPEGImages/), too high (the folder an
# archive unzips into) or misspelt: one line naming the flag and the folder that looks right. Images are decoded
# in --workers processes with progress counted in the parent (common.Progress: a bar on a terminal, in a log file
# a plain "done/total, rate, ETA" line every ~30 s).


def near_folders(path, looks_right):
    """Folders near `path` that pass looks_right: its parent or grandparent (given too deep), else its sub-folders."""
    path = Path(path)
    base = path if path.name not in ("", ".", "..") else Path(os.path.abspath(path))
    for up in (base.parent, base.parent.parent):
        if up != base and looks_right(up):
            return [up]
    return [d for d in sorted(path.iterdir()) if d.is_dir() and looks_right(d)] if path.is_dir() else []


def check_folder(flag, path, what, looks_right, otherwise=None):
    """`path` as a Path when looks_right(path); else UserError: a missing folder (and a sibling of a similar name),
    or one that does not hold `what` (and the folder nearby that does, or `otherwise` when none does)."""
    path = Path(path)
    if looks_right(path):
        return path
    if not path.is_dir():
        names = [d.name for d in path.parent.iterdir() if d.is_dir()] if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, names, n=1)
        raise UserError(f"{flag} {path}: no such folder" + (f"; did you mean {path.parent / close[0]}?" if close else ""))
    hits = near_folders(path, looks_right)
    if not hits and otherwise:
        raise UserError(otherwise)
    hint = f"; did you mean {flag} {' or '.join(map(str, hits[:4]))}?" if hits else ""
    raise UserError(f"{flag} {path} does not hold {what}{hint}")


def check_image_folder(flag, folder, names):
    """A folder that holds some of the image files the annotations name (the rest are per-image errors)."""
    sample = names[::max(1, len(names) // 100)]  # 100 names spread over the list: a few stat calls per folder
    return check_folder(flag, folder, f"the images the annotations name (e.g. {names[0] if names else '-'})",
                        lambda d: d.is_dir() and (not names or any((d / n).is_file() for n in sample)))


def pool_map(fn, items, workers, desc, unit="it"):
    """fn(item) for each item, in order, in `workers` processes (this one when 1), with a Progress that also
    speaks while nothing finishes (one 20,000-px DOTA-v2 image can take minutes)."""
    with Progress(len(items), desc, unit) as bar:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with Pool(workers) as pool:
            results = pool.imap(fn, items)
            for _ in range(len(items)):
                while True:
                    try:
                        result = results.next(timeout=bar.every or None)
                        break
                    except PoolTimeout:
                        bar.update(0)  # nothing finished: a line when one is due
                bar.update()
                yield result


def read_image_size(path, full=True):
    """(width, height). full=True decodes the whole image, so truncated or corrupt files are caught."""
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            return im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def _check_one(path):
    try:
        return path, read_image_size(path), None
    except UserError as e:
        return path, None, str(e)


def check_images(paths, workers, desc):
    """{path: (w, h) or error message}, decoding every image (several processes)."""
    paths = sorted(set(paths))
    return {path: size if err is None else err
            for path, size, err in pool_map(_check_one, paths, workers, desc, unit="img")}


def rel(path, out):
    """Image path as written in records: relative to the JSONL's folder when inside it, else absolute."""
    path, out = Path(path).resolve(), Path(out).resolve()
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


# -----------------------------------------------------------------------------
# Answer length in tokens (det/ground). Qwen writes one token per digit, so a dense patch's answer (a 1024-px DOTA
# patch of the P0706 harbour: ~500 ships, over 15k tokens) can outgrow what generation allows and what training keeps
# (train.py --max-length): every det/ground subcommand reports, per split, how many pass --answer-budget.

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
        raise UserError(f"--processor {args.processor}: no such folder (give a checkpoint folder with its tokenizer)")
    try:
        processor = model.load_processor(args.processor)
    except UserError as e:
        raise UserError(f"--processor {e}") from None

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


# -----------------------------------------------------------------------------
# Tiling (MMRotate img_split rules, docs/data.md "Tiling"; the window geometry is boxes.py's)


def patch_name(name, patch, rate, x, y):
    tag = str(patch) if rate == 1 else f"{rate:g}"
    return f"{name}__{tag}__{x}___{y}"


def tile_image(job, cfg):
    """One source image -> {"records", "counts", "skipped"} (+ its patch images not written yet), in a worker."""
    counts, skipped = Counter(), []
    try:
        width, height = read_image_size(job["image"], full=False)
    except UserError as e:
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
            shapes = boxes.object_shapes(scaled)
            if rate == cfg["rates"][0]:
                counts["zero-area objects dropped"] += sum(1 for s in shapes if s[2] <= 0)
        for win in boxes.sliding_windows(sw, sh, cfg["patch"], cfg["gap"], cfg["img_rate_thr"]):
            objs = None if scaled is None else boxes.objects_in_window(scaled, shapes, win, cfg["iof_thr"])
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
                raise UserError(f"cannot read image {job['image']}: {e}") from None
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
                     "source_size": [width, height], **prompts.answer_style(cfg["prompts"])})
        for form in cfg["box_forms"]:  # one record per box form, all on the same patch image
            answer = None if objs is None else det_answer(objs, pw, ph, form, cfg["prompts"])
            records.append(make_record(form_id(pname, form, cfg["box_forms"]), "det", cfg["dataset"],
                                       [f"images/{pname}{cfg['ext']}"],
                                       prompts.det_prompt(cfg["classes"], form, cfg["prompts"], train=cfg["split"] == "train"),
                                       answer, dict(meta, box_format=form)))
    counts["images"] += 1
    counts["records"] += len(records)
    return {"records": records, "counts": counts, "skipped": skipped}


TILED = {"dota": ("labelTxt", ".txt"), "fair1m": ("labelXml", ".xml")}  # label folder and file type per source


def tiling_config(args, source):
    """The settings of a tiling run, checked before anything is read: (output name, cfg for tile_image)."""
    try:
        rates = [float(r) for r in args.rates.split(",")]
        pad = [int(v) for v in args.pad_value.split(",")]
    except ValueError:
        raise UserError(f"--rates {args.rates!r} / --pad-value {args.pad_value!r}: give comma-separated numbers, "
                        "e.g. --rates 0.5,1.0 --pad-value 0 (or R,G,B integers)") from None
    if len(pad) not in (1, 3) or not all(0 <= v <= 255 for v in pad):
        raise UserError(f"--pad-value {args.pad_value!r}: give 1 or 3 integers in 0..255")
    if not all(r > 0 and math.isfinite(r) for r in rates):
        raise UserError(f"--rates {args.rates!r}: every rate must be a positive number")
    if not 0 <= args.gap < args.patch:
        raise UserError(f"--gap {args.gap} must be at least 0 and smaller than --patch {args.patch}")
    name = args.name or f"{source}_{args.split}" + ("" if args.patch == 1024 else f"_{args.patch}") + (
        "_ms" if rates != [1.0] else "")
    dota = source == "dota"
    cfg = {"classes": boxes.DOTA_CLASSES[args.version] if dota else boxes.FAIR1M_CLASSES,
           "dataset": f"dota{args.version}" if dota else "fair1m", "rates": rates, "patch": args.patch,
           "gap": args.gap, "img_rate_thr": args.img_rate_thr, "iof_thr": args.iof_thr,
           "pad_value": pad if len(pad) == 3 else pad[0], "images_dir": str(Path(args.out) / "images"),
           "ext": "." + args.ext, "split": args.split, "keep_empty": args.keep_empty, "skip_bad": args.skip_bad,
           "box_forms": box_forms(args, args.box_format), "prompts": args.prompts}
    return name, cfg


def tiling_root(root, source, split):
    """A --root that holds images/ (and the labels, for train/val), else one line naming the folder that does."""
    label_dir, ext = TILED[source]
    root, labelled = Path(root), split != "test"
    otherwise = (f"{root / label_dir} is not a folder: " + needs_labels(root, split, label_dir, ext)
                 if labelled and (root / "images").is_dir() else None)  # images without their labels
    return check_folder("--root", root, "images/" + (f" and {label_dir}/" if labelled else ""),
                        lambda d: (d / "images").is_dir() and (not labelled or (d / label_dir).is_dir()), otherwise)


def needs_labels(root, split, label_dir, ext):
    """What to do without labels; DOTA's download unzips them two levels down (train/labelTxt-v1.0/labelTxt/)."""
    subs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name != "images"]
    subs += [e for d in subs for e in sorted(d.iterdir()) if e.is_dir()]
    found = sorted((d for d in subs if next(d.glob(f"*{ext}"), None)), key=lambda d: d.name != label_dir)
    return (f"--split {split} needs the labels (for images without labels use --split test)"
            + (f"; label files are in {found[0]}: move or link that folder to {root / label_dir}" if found else ""))


def list_tiling_jobs(args, source, classes, summary):
    """[{"name", "image", "objects" (None for the test split)}] of every --root; a wrong --root stops here,
    before anything is written. Bad label files: UserError, or a counted skip with --skip-bad."""
    label_dir, ext = TILED[source]
    parse = boxes.read_dota_labels if source == "dota" else boxes.read_fair1m_xml
    jobs = []
    for root in args.root:
        root = tiling_root(root, source, args.split)
        image_files = list_images(root / "images")
        if not image_files:
            raise UserError(f"{root / 'images'} has no images ({', '.join(IMAGE_EXTS)})")
        if args.split != "test":
            label_files = {p.stem for p in (root / label_dir).glob(f"*{ext}")}
            if not label_files:
                raise UserError(f"{root / label_dir} has no {ext} files: " + needs_labels(root, args.split, label_dir, ext))
            summary["counts"]["label files without an image"] += len(label_files - {p.stem for p in image_files})
        for img in track(image_files, f"labels {root}", unit="file"):
            objects = None
            if args.split != "test":
                label = root / label_dir / (img.stem + ext)
                try:
                    if not label.is_file():
                        raise UserError(f"no label file {label} for image {img}")
                    objects = parse(label, classes)
                except UserError as e:
                    skip_or_raise(summary, args.skip_bad, img, str(e))
                    continue
            jobs.append({"name": img.stem, "image": str(img), "objects": objects})
    dup = [n for n, k in Counter(j["name"] for j in jobs).items() if k > 1]
    if dup:
        raise UserError(f"image names occur in more than one --root: {dup[:5]}")
    return jobs


def prepare_output(out, name, args):
    """OUT/images/ ready for the patches: refuse another input's output and patches cut with other settings
    (they would be trusted as they are), clear the temporary files of an interrupted run, record the arguments."""
    claim_output(out, name, args)
    info = out / f"{name}.info.json"
    old = json.loads(info.read_text()).get("args", {}) if info.exists() else {}
    keys = ("patch", "gap", "rates", "pad_value", "iof_thr", "img_rate_thr", "ext", "version", "split", "keep_empty",
            "box_format", "box_forms", "prompts")
    diff = {k: (old[k], getattr(args, k)) for k in keys if k in old and old[k] != getattr(args, k)}
    if diff:
        raise UserError(f"{out} holds a run of {name} with other settings {diff}; use another --out or --name")
    (out / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out / "images").glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    write_info(out, name, args)


def run_tiling(args, source):
    """`dota` and `fair1m`: list images + labels, tile them in --workers processes, write the records."""
    name, cfg = tiling_config(args, source)
    counter = answer_token_counter(args)  # a bad --processor stops here, before anything is written
    summary = new_summary()
    jobs = list_tiling_jobs(args, source, cfg["classes"], summary)
    out = Path(args.out)
    prepare_output(out, name, args)
    records = []
    for res in pool_map(partial(tile_image, cfg=cfg), jobs, args.workers, f"tiling {name}", unit="img"):
        records += res["records"]
        summary["counts"].update(res["counts"])
        summary["skipped"] += res["skipped"]
    if records:
        report_answer_tokens(summary, args.split, records, counter, args.answer_budget,
                             hint=f"; patches smaller than --patch {args.patch} hold fewer objects, shorter answers")
    roots = " ".join(args.root)
    why = (f"every patch of the images in {roots} is empty (no {cfg['dataset']} object kept) and --split train drops "
           f"empty patches: check {TILED[source][0]}/" + (" and --version" if source == "dota" else "")
           + ", or keep empty patches with --keep-empty") if summary["counts"]["empty patches dropped"] else (
        f"no image in {roots} gave a patch")
    write_outputs(out, name, args, summary, records,
                  f"{source} {args.split}: {len(records)} records from {len(jobs)} images", why)
    return summary


# -----------------------------------------------------------------------------
# dior: DIOR-R oriented boxes, whole 800x800 images (no tiling)


def find_first(candidates, what):
    for c in candidates:
        if c.exists():
            return c
    raise UserError(f"cannot find {what}; looked at " + ", ".join(str(c) for c in candidates))


def read_id_list(path):
    """Image ids of a split list (one per line), as a list in file order."""
    try:
        ids = Path(path).read_text().split()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read split list {path}: {e}") from None
    if not ids:
        raise UserError(f"split list {path} has no image ids")
    return ids


def dior_folders(root):
    """(root, annotation folder, image folders) of a DIOR-R --root (one holding Annotations/)."""
    root = check_folder("--root", root, "Annotations/ (a DIOR-R folder holds Annotations/, JPEGImages-*/, ImageSets/)",
                        lambda d: (d / "Annotations").is_dir())
    ann_dir = next(d for d in (root / "Annotations" / "Oriented Bounding Boxes", root / "Annotations") if d.is_dir())
    if not next(ann_dir.glob("*.xml"), None):
        subs = ", ".join(d.name for d in sorted(ann_dir.iterdir()) if d.is_dir())
        raise UserError(f"{ann_dir} has no .xml annotations" + (f" (sub-folders: {subs}); DIOR-R's oriented boxes are in "
                                                                "Annotations/Oriented Bounding Boxes/" if subs else ""))
    img_dirs = [d for d in (root / "JPEGImages-trainval", root / "JPEGImages-test", root / "JPEGImages") if d.is_dir()]
    if not img_dirs:
        raise UserError(f"--root {root} has no JPEGImages-trainval/, JPEGImages-test/ or JPEGImages/ folder")
    return root, ann_dir, img_dirs


def dior_split_ids(root, ann_dir, args, summary):
    """Image ids of --split (or --split-file). DIOR-R ships ImageSets/Main/{train,val,test}.txt and no
    trainval.txt: --split trainval then reads train.txt + val.txt, as MMRotate and LMMRotate train on."""
    if args.split == "all":
        return sorted(p.stem for p in ann_dir.glob("*.xml"))
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
    lists = sorted({p.relative_to(root) for f in folders if f.is_dir() for p in f.glob("*.txt")})
    found = (f"no {args.split}.txt among the split lists of {root} ({', '.join(map(str, lists))}): give "
             + " or ".join(f"--split {p.stem}" for p in lists) + "; ") if lists else (
        f"{root} has no split lists (ImageSets/Main/*.txt): ")
    raise UserError(f"--split {args.split}: {found}--split all converts every annotated image "
                    f"({sum(1 for _ in ann_dir.glob('*.xml'))} in {ann_dir}, test images too), or give --split-file FILE")


def run_dior(args):
    out = Path(args.out)
    root, ann_dir, img_dirs = dior_folders(args.root)
    summary, records, items = new_summary(), [], []
    ids = dior_split_ids(root, ann_dir, args, summary)
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
                raise UserError(f"no annotation {xml} for image id {i}")
            objects, size = boxes.read_dior_xml(xml, boxes.DIOR_CLASSES)
            image = next((d / f"{i}.jpg" for d in img_dirs if (d / f"{i}.jpg").is_file()), None)
            if image is None:
                raise UserError(f"no image {i}.jpg in " + ", ".join(str(d) for d in img_dirs))
            items.append((i, image, objects, size))
        except UserError as e:
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
            meta = {"width": w, "height": h, "objects": objects, "classes": boxes.DIOR_CLASSES, "box_format": form,
                    "source": i, **prompts.answer_style(args.prompts)}
            prompt = prompts.det_prompt(boxes.DIOR_CLASSES, form, args.prompts, train=args.split in ("train", "trainval"))
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


def read_rsvg_index(split_file, args, summary):
    """{object index: line} of an index file (one index per line); a repeated index is counted and kept once."""
    try:
        lines = split_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read index file {split_file}: {e}") from None
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
        raise UserError(f"index file {split_file} lists no object index")
    return wanted


def run_rsvg(args):
    out = Path(args.out)
    root = check_folder("--root", args.root, "Annotations/ and JPEGImages/ (DIOR-RSVG's folders)",
                        lambda d: (d / "Annotations").is_dir() and (d / "JPEGImages").is_dir())
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    split_file = Path(args.split_file) if args.split_file else find_first(
        [root / f"{args.split}.txt", root / "DIOR_RSVG" / f"{args.split}.txt"], f"the {args.split} index file")
    xmls = sorted(ann_dir.glob("*.xml"))
    if not xmls:
        raise UserError(f"{ann_dir} has no .xml annotations")
    summary = new_summary()
    wanted = read_rsvg_index(split_file, args, summary)
    name = args.name or f"rsvg_{args.split}"
    forms = box_forms(args, "hbox")
    claim_output(out, name, args)
    counter = answer_token_counter(args)
    out.mkdir(parents=True, exist_ok=True)
    items, index = [], 0
    for xml in xmls:
        root_el = boxes.read_xml(xml)
        filename = root_el.findtext("filename") or f"{xml.stem}.jpg"
        for k, obj in enumerate(root_el.iter("object"), 1):
            idx, index = index, index + 1
            if idx not in wanted:
                continue
            try:
                items.append((idx, img_dir / filename, boxes.read_rsvg_object(obj, f"bad object {k} in {xml}")))
            except UserError as e:
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
                    **prompts.answer_style(args.prompts)}
            answer = boxes.render_answer([obj], w, h, coords="abs", box_format=form, with_label=False,
                                         style=prompts.answer_style(args.prompts).get("answer_style", "plain"))
            records.append(make_record(form_id(f"rsvg_{idx}", form, forms), "ground", "dior-rsvg", [rel(image, out)],
                                       prompts.ground_prompt(obj["expression"], form, args.prompts), answer, meta))
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
    for lo, hi in ((0, 10), (10, 100), (100, 1000)):
        if n <= hi:
            return f"between {lo}{unit} and {hi}{unit}"
    return f"more than 1000{unit}"


def rsvqa_answer(answer, qtype, variant, bucket):
    a = answer.strip()
    if bucket and qtype == "count" and variant == "LR" and a.isdigit():
        return bucket_number(int(a))
    if bucket and qtype == "area" and a.endswith("m2") and a[:-2].isdigit():
        return bucket_number(int(a[:-2]), "m2")
    return a


def read_rsvqa(args):
    """(root, {kind: file}, {kind: {id: entry}}) of the --variant/--split question, answer and image files."""
    prefix = "LR" if args.variant == "LR" else "USGS"
    names = {k: f"{prefix}_split_{args.split}_{k}.json" for k in ("questions", "answers", "images")}
    root = Path(args.root)
    what = f"{prefix}_split_{args.split}_{{questions,answers,images}}.json"
    there = ", ".join(sorted(p.name for p in root.glob("*_split_*_questions.json"))) if root.is_dir() else ""
    root = check_folder("--root", root, what, lambda d: all((d / n).is_file() for n in names.values()), there and (
        f"--root {root} does not hold {what} (question files there: {there}): check --variant and --split"))
    files, data = {k: root / n for k, n in names.items()}, {}
    for k, f in files.items():
        try:
            data[k] = {e["id"]: e for e in json.loads(f.read_text())[k]}
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {f}: {e!r}") from None
    return root, files, data


def run_rsvqa(args):
    out = Path(args.out)
    root, files, data = read_rsvqa(args)
    img_dir = check_image_folder("--images", args.images or find_first(
        [root / "Images_LR", root / "Data", root / "images"], "RSVQA images (give --images)"),
        [f"{i}.tif" for i, im in sorted(data["images"].items()) if im.get("active", True)])
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
                    raise UserError(f"image {img_id} in {files['images']} lists question {qid}, "
                                   f"which is not in {files['questions']}")
                if not q.get("active", True):
                    summary["counts"]["inactive questions"] += 1
                    continue
                types_seen[q.get("type")] += 1
                if types and q.get("type") not in types:
                    continue
                ans = next((data["answers"][a] for a in q.get("answers_ids") or [] if a in data["answers"]), None)
                if ans is None or not isinstance(ans.get("answer"), str) or not q.get("question") or not q.get("type"):
                    raise UserError(f"question {qid} in {files['questions']}: no question text, type or answer "
                                   f"(in {files['answers']})")
                items.append((qid, q, ans["answer"], img_dir / f"{img_id}.tif"))
            except UserError as e:
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
                                   prompts.vqa_prompt(q["question"], not args.no_suffix, args.prompts), a,
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


def read_caption_json(path):
    """The "images" entries of a Karpathy-style JSON (a wrong --json named with the JSON nearby)."""
    path = Path(path)
    if not path.is_file():  # a folder, a misspelt name, or the file one folder down
        near = sorted(path.glob("*.json")) if path.is_dir() else [path.parent / n for n in difflib.get_close_matches(
            path.name, [p.name for p in path.parent.glob("*.json")] if path.parent.is_dir() else [], n=1)] + [
            d / path.name for d in near_folders(path.parent, lambda d: (d / path.name).is_file())]
        raise UserError(f"--json {path}: " + ("a folder" if path.is_dir() else "no such file")
                        + (f"; did you mean {near[0]}?" if near else ""))
    try:
        entries = json.loads(path.read_text())["images"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path}: {e!r} (expected a Karpathy-style JSON with an \"images\" list)") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path} has no image entries (its \"images\" list is empty)")
    return entries


def run_captions(args):
    out = Path(args.out)
    entries = read_caption_json(args.json)
    splits = set(args.split.split("+"))  # e.g. train+val
    images = check_image_folder("--images", args.images, [e["filename"] for e in entries if isinstance(e, dict) and
                                                          isinstance(e.get("filename"), str) and e.get("split") in splits])
    dataset = args.dataset or caption_dataset_name(args.json)
    name = args.name or f"{dataset}_{args.split}"
    claim_output(out, name, args)
    out.mkdir(parents=True, exist_ok=True)
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
        items.append((e, refs, images / e["filename"]))
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
                                       prompts.caption_prompt(args.prompts), ref, meta))
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
        raise UserError(f"--root {root} is not a folder")
    if not 0 <= args.train_ratio <= 1:
        raise UserError(f"--train-ratio {args.train_ratio} must be between 0 and 1")
    by_class = class_folders(root)
    if not by_class:
        # UCMerced_LandUse.zip unzips to UCMerced_LandUse/Images/<class>/; a class folder itself has images
        hint = did_you_mean(root, lambda d: bool(class_folders(d)))
        if not hint and list_images(root):
            hint = f"; {root} holds images itself: give the folder whose sub-folders are the classes ({root.parent}?)"
        raise UserError(f"{root} has no class folders with images ({', '.join(IMAGE_EXTS)}){hint}")
    # Releases spell some class folders CamelCase ("BareLand", AID's own) and some spaced ("Bare Land"): ordered and
    # named without the spaces, both give the same classes, prompt and split. rscovlm: the folder names (RSCoVLM's
    # prompt lists them and its ground truth is the folder name, format_scene_cls.py), spaces removed as in AID.
    folders = sorted(by_class, key=lambda d: (re.sub(r"\s+", "", d.name), d.name))
    classes = [re.sub(r"\s+", "", d.name) if prompts.is_rscovlm(args.prompts) else class_text(d.name) for d in folders]
    if len(set(classes)) != len(classes):
        raise UserError(f"class folders in {root} collide after normalisation: {classes}")
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
                                              prompts.cls_prompt(classes, args.prompts), label,
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
# CLI


def add_output_flags(sp, workers=True):
    """--debug, --out, --name, --skip-bad (and --workers) of every converter."""
    add_debug_flag(sp)  # also after the subcommand, where people type it
    sp.add_argument("--out", required=True, metavar="DIR", help="output folder (NAME.jsonl, NAME.info.json, images/)")
    sp.add_argument("--name", default=None, help="output file stem (default: from the source and split)")
    sp.add_argument("--skip-bad", action="store_true", help="skip bad images and labels (listed in the summary)")
    if workers:
        sp.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), metavar="N",
                        help="processes for tiling and image checks (default: CPUs, at most 8)")


def add_answer_budget_flags(sp):
    """det/ground converters: report how many answers are too long to generate or train on."""
    sp.add_argument("--answer-budget", type=int, default=2048, metavar="N",
                    help="report answers longer than N tokens (default %(default)s)")
    sp.add_argument("--processor", default=None, metavar="DIR",
                    help="count answer tokens exactly with this checkpoint (default: estimate)")


def add_prompts_flag(sp):
    """Every converter: whose wording (docs/prompts.md)."""
    sp.add_argument("--prompts", choices=prompts.PRESETS, default="default", metavar="P",
                    help="prompt wording: default, rscovlm or rscovlm-json (docs/prompts.md)")


def add_box_forms_flag(sp, det=True):
    """det/ground converters: the box kind in answers, one record per box form."""
    if det:
        sp.add_argument("--box-format", choices=list(prompts.DET_FORMAT), default="poly", metavar="F",
                        help="box kind in answers: poly, hbox or rbox")
    sp.add_argument("--box-forms", default=None, metavar="F,..",
                    help="one record per box form, e.g. hbox,rbox,poly (default: --box-format, hbox for rsvg)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    add_debug_flag(p)
    one_line = partial(argparse.HelpFormatter, max_help_position=30)  # --help: each flag and its help on one line
    sub = p.add_subparsers(dest="source", required=True,
                           parser_class=partial(argparse.ArgumentParser, formatter_class=one_line))

    for src, labels in (("dota", "labelTxt/"), ("fair1m", "labelXml/")):
        sp = sub.add_parser(src, help=f"{src.upper()} -> det records of tiled patches")
        add_output_flags(sp)
        add_answer_budget_flags(sp)
        sp.add_argument("--root", nargs="+", required=True, metavar="DIR", help=f"folder(s) holding images/ and {labels}")
        sp.add_argument("--split", choices=["train", "val", "test"], required=True, metavar="S",
                        help="train (empty patches dropped), val (every patch) or test (no labels)")
        if src == "dota":
            sp.add_argument("--version", choices=sorted(boxes.DOTA_CLASSES), default="1.0", metavar="V",
                            help="DOTA class list: 1.0, 1.5 or 2.0")
        sp.add_argument("--patch", type=int, default=1024, metavar="PX", help="window (patch) size, e.g. 1024 or 512")
        sp.add_argument("--gap", type=int, default=200, metavar="PX", help="overlap between windows (500 for multi-scale)")
        sp.add_argument("--rates", default="1.0", metavar="R,..", help="comma-separated resize rates, e.g. 0.5,1.0,1.5")
        sp.add_argument("--iof-thr", type=float, default=0.7, metavar="F", help="min share of an object inside a window")
        sp.add_argument("--img-rate-thr", type=float, default=0.6, metavar="F", help="min share of a window on the image")
        sp.add_argument("--pad-value", default="0", metavar="V", help="pad colour of small images: V or R,G,B")
        sp.add_argument("--ext", choices=["png", "jpg"], default="png", help="patch image format")
        sp.add_argument("--keep-empty", action="store_true", help="train: keep patches without objects")
        add_box_forms_flag(sp)
        add_prompts_flag(sp)

    sp = sub.add_parser("dior", help="DIOR-R oriented XML -> det records")
    add_output_flags(sp)
    add_answer_budget_flags(sp)
    sp.add_argument("--root", required=True, metavar="DIR", help="DIOR-R folder (Annotations/, JPEGImages-*/, ImageSets/)")
    sp.add_argument("--split", default="trainval", metavar="S", help="train, val, trainval, test, or all (every image)")
    sp.add_argument("--split-file", default=None, metavar="FILE", help="explicit split list (one image id per line)")
    add_box_forms_flag(sp)
    add_prompts_flag(sp)

    sp = sub.add_parser("rsvg", help="DIOR-RSVG -> ground records")
    add_output_flags(sp)
    add_answer_budget_flags(sp)
    sp.add_argument("--root", required=True, metavar="DIR", help="DIOR-RSVG folder (Annotations/, JPEGImages/, {split}.txt)")
    sp.add_argument("--split", default="test", metavar="S", help="train, val or test (reads {split}.txt)")
    sp.add_argument("--split-file", default=None, metavar="FILE", help="explicit index file (one object index per line)")
    add_box_forms_flag(sp, det=False)
    add_prompts_flag(sp)

    sp = sub.add_parser("rsvqa", help="RSVQA-LR / -HR -> vqa records")
    add_output_flags(sp)
    sp.add_argument("--root", required=True, metavar="DIR", help="folder with {LR|USGS}_split_{split}_*.json")
    sp.add_argument("--variant", choices=["LR", "HR"], required=True, help="LR (Sentinel-2) or HR (USGS aerial)")
    sp.add_argument("--split", default="test", metavar="S", help="train, val, test (HR also test_phili)")
    sp.add_argument("--images", default=None, metavar="DIR", help="image folder (default: ROOT/Images_LR or ROOT/Data)")
    sp.add_argument("--types", default=None, metavar="T,..", help="only these question types, e.g. presence,comp")
    sp.add_argument("--no-bucket", action="store_true", help="raw LR counts / HR areas, not the published buckets")
    sp.add_argument("--no-suffix", action="store_true", help="leave out GeoChat's 'Answer ... single word or phrase.'")
    add_prompts_flag(sp)

    sp = sub.add_parser("captions", help="Karpathy-style caption JSON -> caption records")
    add_output_flags(sp)
    sp.add_argument("--json", required=True, metavar="FILE", help="dataset.json / dataset_rsicd.json")
    sp.add_argument("--images", required=True, metavar="DIR", help="image folder")
    sp.add_argument("--split", default="test", metavar="S", help="train, val, test, or several joined by '+'")
    sp.add_argument("--dataset", default=None, help="dataset name (default: from the JSON's name or folder)")
    sp.add_argument("--per-reference", action="store_true", help="one record per reference (for training)")
    add_prompts_flag(sp)

    sp = sub.add_parser("cls", help="class-per-folder scene classification -> cls records (train + test files)")
    add_output_flags(sp)
    sp.add_argument("--root", required=True,
                    help="folder with one sub-folder of images per class (UCMerced: UCMerced_LandUse/Images)")
    sp.add_argument("--train-ratio", type=float, default=0.2, help="fraction of each class for training (AID: 0.2)")
    sp.add_argument("--seed", type=int, default=0, help="split seed")
    sp.add_argument("--dataset", default=None, help="dataset name in records (default: root folder name)")
    add_prompts_flag(sp)

    return p


RUNNERS = {"dota": partial(run_tiling, source="dota"), "fair1m": partial(run_tiling, source="fair1m"),
           "dior": run_dior, "rsvg": run_rsvg, "rsvqa": run_rsvqa, "captions": run_captions, "cls": run_cls}


def main(argv=None):
    """The run's summary. Bad input raises UserError (run_cli: one line, exit 2); anything else is a bug."""
    args = build_parser().parse_args(argv)
    if getattr(args, "answer_budget", 1) < 1:
        raise UserError(f"--answer-budget {args.answer_budget}: give a number of tokens >= 1")
    return RUNNERS[args.source](args)


if __name__ == "__main__":
    run_cli(main)
