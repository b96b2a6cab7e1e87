"""
bench_prep.py — convert the benchmarks RSCoVLM reports on into rscovlm records (JSONL), from their published
files. The training sets' converters and the helpers these build on (atomic writes, summaries, --skip-bad,
the answer-token report) are data_prep.py's; docs/bench_prep.md lists where each benchmark comes from.

    python bench_prep.py lrs-vqa --json LRS_VQA/LRS_VQA_merged.jsonl --images ROOT --split test --out data/bench/lrs
    python bench_prep.py mme-realworld --json MME-RealWorld/MME_RealWorld_remote_sensing.json --out data/bench/mme
    python bench_prep.py refgeo --root refGeo --out data/bench/refgeo
    python bench_prep.py vrsbench --json VRSBench_EVAL_Cap.json VRSBench_EVAL_vqa.json VRSBench_EVAL_referring.json --images Images_val --out data/bench/vrsbench
    python bench_prep.py geochat --json GeoChat-Bench/referring.jsonl --images GeoChat_Instruct/images --out data/bench/geochat
    python bench_prep.py vhm --root VHM_eval_dataset --out data/bench/vhm
    python bench_prep.py xlrs-bench --json XLRS-Bench-lite/data/train-*.parquet --out data/bench/xlrs

Each entry is checked as it is read: bad input stops with one line naming FILE:LINE (exit 2), or with
--skip-bad is counted and listed in the summary. Scored by eval_det.py / eval_vqa.py, or all at once by
eval_suite.py.
"""

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np

import boxes
import model
import prompts
from common import IMAGE_PLACEHOLDER, UserError, add_debug_flag, run_cli
from data_prep import (IMAGE_EXTS, add_answer_budget_flags, add_output_flags, add_prompts_flag, answer_token_counter,
                       atomic_write_bytes, check_images, claim_output, class_text, did_you_mean, make_record,
                       new_summary, print_summary, rel, report_answer_tokens, require_records, skip_or_raise,
                       write_info, write_jsonl, write_outputs)


# -----------------------------------------------------------------------------
# lrs-vqa, mme-realworld: questions on images far larger than the pixel budget, for the zoom-in chain (model.py
# "Zoom-in chain"). A question whose evidence is one region becomes a zoom record: system turn prompts.ZOOM_SYSTEM,
# user "<image>{question}" + prompts.ZOOM_ASK, and with a crop box (training) the tool call, "<image>" +
# prompts.ZOOM_REPLY (the same file again: model.tokenize crops it at meta.zoom.bbox, original pixels) and the
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

LRS_PLAIN = {"count", "compare", "comparison"}  # evidence spread over the image: no zoom
MME_PLAIN = {"count", "position"}


def read_json_entries(path):
    """[(entry, where)] of a JSON list file, a JSONL file, or a file of JSON values one after another (some
    releases pretty-print one record over several lines in a .jsonl); where = 'FILE:LINE' (the line an entry
    starts on) or 'FILE entry K'."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--json {path}: no such file" + did_you_mean(path.parent, lambda d: (d / path.name).is_file()))
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":  # line by line: a one-line file whose object has one list-valued key (a
        try:                             # refGeo line's bbox) is that entry, not a wrapper of the list
            return json_lines(path, text)
        except UserError:
            return json_values(path, text)
    try:
        data = json.loads(text)
        if isinstance(data, dict):  # a single JSONL line, or a wrapper {"...": [entries]}
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 and "question_id" not in data else [data]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of entries or JSON lines, got {type(data).__name__}")
        return [(e, f"{path} entry {k}") for k, e in enumerate(data)]
    except json.JSONDecodeError:
        return json_values(path, text)


def json_lines(path, text):
    """[(entry, 'FILE:LINE')] of JSON lines; a bad line is a UserError naming it."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as e:
                raise UserError(f"bad JSON at {path}:{lineno}: {e}") from None
    return out


def json_values(path, text):
    """[(entry, 'FILE:LINE')] of JSON values written one after another, each over any number of lines (a list
    value gives its items); a value that does not parse is a UserError naming the line it starts on."""
    out, pos, decoder = [], 0, json.JSONDecoder()
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            return out
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"bad JSON at {path}:{line}: {e.msg} (line {e.lineno} column {e.colno})") from None
        out += [(v, f"{path}:{line} item {k}") for k, v in enumerate(value)] if isinstance(value, list) else \
            [(value, f"{path}:{line}")]


def zoom_vqa_record(rid, dataset, image, question, answer, meta, zoom, crop=None):
    """A vqa record: plain ("<image>{question}"), a zoom prompt (zoom=True), or with crop [x1, y1, x2, y2]
    (original pixels) the whole chain. The call text stored is in original pixels, for people to read; model.tokenize
    renders it in the model's frame from meta.zoom.bbox."""
    if not zoom:
        return make_record(rid, "vqa", dataset, [image], IMAGE_PLACEHOLDER + question, answer, meta)
    messages = [{"role": "system", "content": prompts.ZOOM_SYSTEM},
                {"role": "user", "content": IMAGE_PLACEHOLDER + question + prompts.ZOOM_ASK}]
    images, meta = [image], {**meta, "zoom": {}}
    if crop is None:  # an evaluation prompt: the model calls the tool itself; the answer stays in meta
        return {"id": rid, "task": "vqa", "dataset": dataset, "images": images, "messages": messages, "meta": meta}
    messages += [{"role": "assistant", "content": model.zoom_call_text(crop)},
                 {"role": "user", "content": IMAGE_PLACEHOLDER + prompts.ZOOM_REPLY}]
    images, meta["zoom"] = [image, image], {"bbox": crop}
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"id": rid, "task": "vqa", "dataset": dataset, "images": images, "messages": messages, "meta": meta}


def _lrs_item(e, where):
    """(kind, id, image, question, answer, category, crop boxes, (w, h) or None, evidence hbox or None) of an
    LRS-VQA entry: kind 'bench' (the
    benchmark's lines) or 'train' (entries with bbox_info). UserError naming `where` when it is neither."""
    if not isinstance(e, dict) or not isinstance(e.get("image"), str):
        raise UserError(f"{where}: not an LRS-VQA entry (needs 'image', and 'question_id'/'text'/'ground_truth' or "
                       "'bbox_info' with 'question'/'answer' or 'conversations')")
    if "question_id" in e:
        if not all(isinstance(e.get(k), str) and e.get(k) for k in ("text", "ground_truth", "category")):
            raise UserError(f"{where}: benchmark entry {e['question_id']} needs text, ground_truth and category")
        hbox = e.get("hbox") if isinstance(e.get("hbox"), list) and len(e["hbox"]) == 4 else None
        return "bench", str(e["question_id"]), e["image"], e["text"], e["ground_truth"], e["category"], [], None, hbox
    info = e.get("bbox_info")
    if not isinstance(info, dict):
        raise UserError(f"{where}: entry {e.get('id')} has no 'question_id' (benchmark) nor 'bbox_info' (training)")
    q, a = e.get("question"), e.get("answer")
    conv = e.get("conversations")
    if q is None and isinstance(conv, list) and len(conv) >= 2:
        q, a = conv[0].get("value"), conv[1].get("value")
        q = re.sub(r"^\s*<image>\s*", "", q or "")
    if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
        raise UserError(f"{where}: entry {e.get('id')} has no question and answer")
    crops = info.get("crop_hbox") or []
    if len(crops) == 4 and all(isinstance(v, (int, float)) for v in crops):  # the earlier files: one flat box
        crops = [crops]
    if not all(isinstance(c, list) and len(c) == 4 and all(isinstance(v, (int, float)) for v in c) for c in crops):
        raise UserError(f"{where}: entry {e.get('id')}: bbox_info.crop_hbox must be [x1, y1, x2, y2] boxes, got {crops!r}")
    w, h = e.get("image_ori_width", info.get("image_width")), e.get("image_ori_height", info.get("image_height"))
    return ("train", str(e.get("id", where)), e["image"], q, a, str(e.get("type") or e.get("category") or "untyped"),
            crops, (w, h) if w and h else None, None)


def _images_under(root, rel_paths, flag):
    """{rel: absolute path} of the entries' images under root; when none of them is there, UserError suggests
    the folder one level down (or up) that holds the first one."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder")
    paths = {p: root / p for p in rel_paths}
    if paths and not any(q.is_file() for q in paths.values()):
        first = next(iter(paths))
        hint = did_you_mean(root, lambda d: (d / first).is_file())
        if not hint and (root.parent / first).is_file():
            hint = f"; did you mean {root.parent}?"
        raise UserError(f"none of the {len(paths)} images of the entries is under {flag} {root} (e.g. {root / first}){hint}")
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
        except UserError as err:
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
                raise UserError(got if got.startswith(where) else f"{where}: {got}")
            if rid in seen:
                raise UserError(f"{where}: id {rid} appears twice in the --json files")
            if size and tuple(size) != tuple(got):
                raise UserError(f"{where}: entry says {size[0]}x{size[1]} but {image} is {got[0]}x{got[1]}: "
                               "its boxes would be cut from the wrong place")
            crop = None
            zoom = not args.no_zoom and cat.lower() not in LRS_PLAIN and (kind == "bench" or len(crops) == 1)
            if zoom and kind == "train":
                c, problem = model.zoom_crop_box(crops[0], *got)
                if problem:
                    raise UserError(f"{where}: crop_hbox {crops[0]} is {problem} for the {got[0]}x{got[1]} image {image}")
                summary["counts"]["zoom boxes clipped to the image"] += c != [round(v) for v in crops[0]]
                # rscovlm: the box as given (RSCoVLM scales and crops crop_hbox itself: model.zoom_box_to_model)
                crop = list(crops[0]) if prompts.is_rscovlm(args.prompts) else c
        except UserError as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
            continue
        seen.add(rid)
        meta = {"answer": a, "type": cat, "benchmark": "lrs_vqa", **prompts.answer_style(args.prompts)}
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
                raise UserError(f"{where}: not an MME-RealWorld entry (needs Question_id, Image, Text, Answer choices, "
                               "Ground truth)")
            if e.get("Subtask", "Remote Sensing") != "Remote Sensing":
                summary["counts"]["other subtasks (not remote sensing)"] += 1
                continue
            choices = e["Answer choices"]
            letters = [c[1:2] for c in choices if isinstance(c, str)]
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and re.match(r"^\([A-E]\)", c)
                                                                    for c in choices)):
                raise UserError(f"{where}: {e['Question_id']}: Answer choices must be strings '(A) ...', got {choices!r}")
            if e["Ground truth"] not in letters:
                raise UserError(f"{where}: {e['Question_id']}: Ground truth {e['Ground truth']!r} is not one of the "
                               f"choices' letters {letters}")
            items.append((e, where))
        except UserError as err:
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
        records.append(zoom_vqa_record(qid, "mme_realworld_rs", rel(image, out), prompts.mme_prompt(e["Text"], e["Answer choices"]),
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
# eval_vqa.py group and score them by the benchmark's rule (docs/evaluation.md#benchmark-rules).
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
# The image folder of each set under ROOT/images: RSCoVLM's evaluation names it in lower case (REFGEO_SETS,
# eval/data/geoground.py), the public release and RSCoVLM's training (images/{line's "dataset"},
# training/data/refgeo_dataset.py:98) as the dataset is called.
REFGEO_FOLDERS = {"avvg": "AVVG", "dior_rsvg": "DIOR-RSVG", "rsvg": "RSVG", "geochat_test": "GeoChat",
                  "vrsbench": "VRSBench"}
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
    """(answer text, meta additions) of a ground record under --prompts (rscovlm, rscovlm-json: its answer
    conventions)."""
    style = prompts.answer_style(getattr(args, "prompts", None) or "default")
    text = boxes.render_answer(objs, w, h, coords="abs", box_format=box_format, with_label=False,
                               style=style.get("answer_style", "plain"))
    return text, style


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
        raise UserError(f"{flag} {root} is not a folder")
    found = [(it, _bench_image(root, it[0])) for it in items]
    if found and not any(p for _, p in found):
        first = items[0][0]
        raise UserError(f"none of the {len(items)} images of the entries is under {flag} {root} (e.g. {root / str(first)})"
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
    """n finite numbers from a list (nested [[x, y], ...] flattened), else UserError naming where."""
    flat = [x for p in v for x in (p if isinstance(p, (list, tuple)) else [p])] if isinstance(v, (list, tuple)) else None
    if not flat or len(flat) != n or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in flat):
        raise UserError(f"{where}: {what} must be {n} numbers, got {v!r}")
    return [float(x) for x in flat]


DEGENERATE = "targets without area (kept and counted: no continuous IoU can match them)"


def _ground_obj(poly, expression, w, h, where, summary):
    """A ground-truth object. A polygon outside the image (by more than a pixel) is bad input: its coordinates
    are not the image's pixels. One without area (a release's box such as VRSBench's {<92><0><96><0>}) is kept
    and counted in the summary, never fatal for the file; degenerate(objs) marks its record."""
    xs, ys = poly[0::2], poly[1::2]
    if min(xs) < -1 or min(ys) < -1 or max(xs) > w + 1 or max(ys) > h + 1:
        raise UserError(f"{where}: box {[round(v, 1) for v in poly]} is outside the {w}x{h} image (not in its pixels)")
    summary["counts"][DEGENERATE] += boxes.fix_poly(poly) is None
    return {"poly": poly, "label": "", "difficult": 0, "expression": expression}


def degenerate(objs):
    """{"degenerate": True} for a record with a target without area (eval_det counts them), else {}."""
    return {"degenerate": True} if any(boxes.fix_poly(o["poly"]) is None for o in objs) else {}


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
        raise UserError(f"{where}: id {rid} appears twice")
    seen.add(rid)
    return rid


def run_refgeo(args):
    root, out = Path(args.root), Path(args.out)
    meta_dir = root / "metainfo"
    if not meta_dir.is_dir():
        raise UserError(f"{root} has no metainfo/ folder (--root holds refGeo's metainfo/{{set}}.jsonl and images/)"
                       + did_you_mean(root, lambda d: (d / "metainfo").is_dir()))
    have = sorted(p.stem for p in meta_dir.glob("*.jsonl"))
    sets = args.sets.split(",") if args.sets else [s for s in REFGEO_SETS if s in have]
    missing = [s for s in sets if s not in have]
    if missing or not sets:
        raise UserError(f"no {meta_dir}/{(missing or ['{set}'])[0]}.jsonl (sets there: {', '.join(have) or 'none'})")
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
                    raise UserError(f"{where}: not a refGeo line (needs image_id, question, bbox)")
                box = _numbers(e.get("bbox"), 4, where, "bbox")
                poly = _numbers(e["poly"], 8, where, "poly") if args.box_format == "poly" and "poly" in e else None
                if args.box_format == "poly" and poly is None:
                    raise UserError(f"{where}: --box-format poly needs a 'poly' in every line")
                items.append((e["image_id"], where, (e, box, poly, k)))
            except UserError as err:
                skip_or_raise(summary, args.skip_bad, where, str(err))
        img_dir = _refgeo_images(root, s, items)
        summary["notes"].append(f"refgeo_{s}: images from {img_dir}")
        pairs = _image_sizes(_bench_items(items, img_dir, "refGeo images folder", summary, args.skip_bad),
                             args.workers, summary, args.skip_bad)
        recs, ds = [], f"refgeo_{s}"
        for (_, where, (e, box, poly, k)), image, (w, h) in pairs:
            try:
                size = (e.get("image_width"), e.get("image_height"))
                if all(size) and tuple(size) != (w, h):
                    raise UserError(f"{where}: line says {size[0]}x{size[1]} but {image} is {w}x{h}")
                obj = _ground_obj(poly or boxes.hbox_to_poly(box), e["question"].strip(), w, h, where, summary)
            except UserError as err:
                skip_or_raise(summary, args.skip_bad, where, str(err))
                continue
            meta = {"width": w, "height": h, "objects": [obj], "box_format": args.box_format, "source": e["image_id"],
                    "benchmark": "refgeo", "set": s, **degenerate([obj])}
            answer, style = _ground_answer(args, [obj], w, h, args.box_format)
            meta.update(style)
            recs.append(make_record(f"{s}_{k}", "ground", ds, [rel(image, out)],
                                    prompts.ground_prompt(obj["expression"], args.box_format, **_preset(args)), answer, meta))
        if recs:
            report_answer_tokens(summary, s, recs, counter, args.answer_budget)
        files[f"refgeo_{s}"] = recs
    _write_bench(out, name, args, summary, files, f"refgeo {','.join(sets)}: {sum(map(len, files.values()))} records",
                 f"no line of {meta_dir}/{{{','.join(sets)}}}.jsonl could be used")
    return summary


def _refgeo_images(root, s, items):
    """ROOT/images/<folder> of set s: the first that exists of the lines' own "dataset", the lower-case name
    RSCoVLM's evaluation reads and the release's name; none: UserError listing what was looked for."""
    lower = REFGEO_SETS.get(s, s.rsplit("_", 1)[0])
    named = [e.get("dataset") for _, _, (e, *_) in items[:1] if isinstance(e.get("dataset"), str)]
    tried = list(dict.fromkeys(named + [lower, REFGEO_FOLDERS.get(lower, lower)]))
    found = next((root / "images" / t for t in tried if (root / "images" / t).is_dir()), None)
    if found is None:
        there = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        raise UserError(f"refGeo set {s}: no image folder {root / 'images'}/{{{','.join(tried)}}} (folders there: "
                        f"{', '.join(there) or 'none'})")
    return found


def _vrsbench_box(e, w, h, where):
    """VRSBench's referring box in pixels: from obj_corner (normalised corners, clipped to the image as VRSBench
    does), else from the ground_truth string {<x1><y1><x2><y2>} in 0..100."""
    corner = e.get("obj_corner")
    if isinstance(corner, list) and len(corner) == 8:
        c = [min(max(float(v), 0.0), 1.0) for v in corner]
        return [min(c[0::2]) * w, min(c[1::2]) * h, max(c[0::2]) * w, max(c[1::2]) * h]
    nums = re.findall(r"<(\d+(?:\.\d+)?)>", str(e.get("ground_truth", "")))
    if len(nums) != 4:
        raise UserError(f"{where}: referring ground_truth must be '{{<x1><y1><x2><y2>}}' (0..100), got "
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
                raise UserError(f"{where}: not a VRSBench entry (needs image_id, question, ground_truth, type)")
            kind = ("caption" if e.get("type") == "caption" else
                    "referring" if e.get("type") == "ref" or re.fullmatch(r"\{(<\d+>)+\}", str(e["ground_truth"]))
                    else "vqa")
            if not str(e.get("question") or "").strip() and kind != "caption":
                raise UserError(f"{where}: VRSBench {kind} entry without a question")
            items.append((e["image_id"], where, (e, kind)))
        except UserError as err:
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
                    raise UserError(f"{where}: caption entry without a reference caption")
                rec = make_record(rid, "caption", "vrsbench_caption", img,
                                  prompts.vqa_prompt(q or "Describe the image in detail", suffix=False, **kw), refs[0],
                                  {"references": refs, "benchmark": "vrsbench", "image_id": e["image_id"]})
            elif kind == "vqa":
                a = str(gt[0] if isinstance(gt, list) else gt)
                rec = make_record(rid, "vqa", "vrsbench_vqa", img, prompts.vqa_prompt(q, **kw), a,
                                  {"answer": a, "type": str(e.get("type") or "untyped"), "benchmark": "vrsbench",
                                   "headline_rule": "contain", "image_id": e["image_id"]})
            else:
                rec = _vrsbench_referring(args, e, rid, img, q, (w, h), where, summary)
        except UserError as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
            continue
        files[f"vrsbench_{kind}"].append(rec)
    _write_bench(out, name, args, summary, files, f"vrsbench: {sum(map(len, files.values()))} records",
                 f"none of the entries of {', '.join(args.json)} could be used")
    return summary


def _vrsbench_caption(q, preset):
    """The expression as asked: RSCoVLM drops a leading "the " (4 characters) and then trailing '.', only when the
    caption starts with it (eval/data/data_prepare/format_vrsbench.py:128-130)."""
    if prompts.is_rscovlm(preset) and q.lower().startswith("the "):
        return q[4:].rstrip(".")
    return q


def _vrsbench_grid(e, where):
    """VRSBench's own target: the 4 integers of the ground_truth string {<x1><y1><x2><y2>} (0..100 of the image,
    int(x * 100) of the object's normalised box, prepare_eval_all.ipynb), else the same made from obj_corner in
    float32 as that notebook does."""
    nums = re.findall(r"\d+", str(e.get("ground_truth", "")))
    if len(nums) >= 4:
        return [int(v) for v in nums[:4]]
    c = [np.float32(v) for v in e["obj_corner"]]
    return [int(v * np.float32(100)) for v in (min(c[0::2]), min(c[1::2]), max(c[0::2]), max(c[1::2]))]


def _vrsbench_referring(args, e, rid, img, q, size, where, summary):
    """A VRSBench referring entry as a ground record. A target without area (the release's grid boxes such as
    {<92><0><96><0>}) is kept and counted (_ground_obj): VRSBench's +1-pixel grid IoU scores it, the continuous
    IoU gives 0."""
    (w, h), preset = size, getattr(args, "prompts", "default")
    cap = _vrsbench_caption(q, preset)
    obj = _ground_obj(boxes.hbox_to_poly(_vrsbench_box(e, w, h, where)), cap, w, h, where, summary)
    groups = {"unique": "unique" if e.get("unique") else "non-unique"}
    if e.get("size_group"):
        groups["size"] = str(e["size_group"])
    answer, style = _ground_answer(args, [obj], w, h, "hbox")
    meta = {"width": w, "height": h, "objects": [obj], "box_format": "hbox", "groups": groups, "benchmark": "vrsbench",
            "grid_box": _vrsbench_grid(e, where), "category": e.get("obj_cls"), "image_id": e["image_id"], **style,
            **degenerate([obj])}
    return make_record(rid, "ground", "vrsbench_referring", img, prompts.referring_prompt("vrsbench", cap, preset),
                       answer, meta)


def _geochat_part(args):
    if args.part:
        return args.part
    stem = re.sub(r"[^a-z]", "", Path(args.json).stem.lower())
    part = next((p for p in GEOCHAT_PARTS if p.replace("_", "") == stem), None)
    if part is None:
        raise UserError(f"--json {args.json}: cannot tell the GeoChat-Bench part from the file name; give --part "
                       f"({', '.join(GEOCHAT_PARTS)})")
    return part


def _geochat_label(gt, classes, where):
    """The class-list spelling of a scene label: names compared lower-case without spaces/underscores, and a
    trailing 'gt' dropped when that makes it a class (aid.jsonl writes 'MediumResidentialgt')."""
    key = {re.sub(r"[^a-z0-9]", "", c.lower()): c for c in classes}
    g = re.sub(r"[^a-z0-9]", "", str(gt).lower())
    hit = key.get(g) or (key.get(g[:-2]) if g.endswith("gt") else None)
    if hit is None:
        raise UserError(f"{where}: ground_truth {gt!r} is not one of the classes in its text ({', '.join(classes)})")
    return hit


def _geochat_answers(path):
    """{question_id: answer} of an RSVQA answers file ({"answers": [{"question_id", "answer", "active"}]})."""
    if not path:
        raise UserError("lrben/hrben: give --answers, the RSVQA answers file of that split (GeoChat-Bench ships "
                       "questions only), e.g. LR_split_test_answers.json or USGS_split_test_phili_answers.json")
    try:
        data = json.loads(Path(path).read_text())
        return {a["question_id"]: a["answer"] for a in data["answers"] if a.get("active", True)}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"cannot read --answers {path}: {e!r} (expected RSVQA's {{\"answers\": [...]}})") from None


def _geochat_entry(part, e, where, answers):
    """(image name, payload) of one GeoChat-Bench line, checked."""
    if not isinstance(e, dict):
        raise UserError(f"{where}: not a JSON object")
    if part in ("aid", "ucmerced"):
        text = e.get("text")
        if not (isinstance(text, str) and "Classes:" in text and isinstance(e.get("image"), str)):
            raise UserError(f"{where}: not a GeoChat-Bench {part} line (needs image, text with 'Classes: ...', ground_truth)")
        listed = text.split("Classes:", 1)[1].split("\n", 1)[0]
        classes = [class_text(c) for c in listed.split(",") if c.strip()]
        return e["image"], {"classes": classes, "label": _geochat_label(e.get("ground_truth"), classes, where),
                            "listed": listed.strip()}
    if part in ("lrben", "hrben"):
        if not (isinstance(e.get("text"), str) and isinstance(e.get("image"), str) and "question_id" in e):
            raise UserError(f"{where}: not a GeoChat-Bench {part} line (needs question_id, image, text, category)")
        if e["question_id"] not in answers:
            raise UserError(f"{where}: question {e['question_id']} has no active answer in --answers")
        return e["image"], {"question": e["text"].split("\n", 1)[0].strip(), "answer": str(answers[e["question_id"]])}
    image = e.get("image_id")
    if not (isinstance(image, str) and isinstance(e.get("question"), str) and "ground_truth" in e):
        raise UserError(f"{where}: not a GeoChat-Bench {part} line (needs image_id, question, ground_truth)")
    if part != "referring":
        return image, {"refs": [str(g) for g in (e["ground_truth"] if isinstance(e["ground_truth"], list)
                                                 else [e["ground_truth"]])]}
    gt = e["ground_truth"]
    single = isinstance(gt, list) and len(gt) in (4, 8) and all(isinstance(v, (int, float)) for v in gt)
    polys = [gt] if single or (isinstance(gt, list) and len(gt) == 4 and all(
        isinstance(p, list) and len(p) == 2 for p in gt)) else gt
    if not isinstance(polys, list) or not polys:
        raise UserError(f"{where}: referring ground_truth must be a list of polygons, got {gt!r}")
    return image, {"polys": [_gt_poly(p, where) for p in polys]}


def _geochat_cls(rid, ds, img, p, base, preset):
    """A GeoChat-Bench AID / UCMerced record. rscovlm: RSCoVLM's prompt, the line's class list lower-cased as
    written after "Classes:" (format_geochat.py:63), and the label lower-cased; the label is the class list's
    spelling of the line's ground truth either way (so "BareLand" and "Bare Land" give one target)."""
    label, classes = p["label"], p["classes"]
    if prompts.is_rscovlm(preset):
        label, classes = label.lower(), [c.lower() for c in classes]
        prompt = prompts.RSCOVLM_CLS_ASK + p["listed"].lower()
    else:
        prompt = prompts.cls_prompt(classes)
    return make_record(rid, "cls", ds, img, prompt, label,
                       {**base, "label": label, "classes": classes, "headline_rule": "contain"})


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
        except UserError as err:
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
                rec = _geochat_cls(rid, ds, img, p, base, args.prompts)
            elif task == "vqa":  # RSCoVLM lower-cases the question (eval/data/data_prepare/format_geochat.py:83)
                q = p["question"].lower() if prompts.is_rscovlm(args.prompts) else p["question"]
                rec = make_record(rid, "vqa", ds, img, prompts.vqa_prompt(q, **kw), p["answer"],
                                  {**base, "answer": p["answer"], "type": str(e.get("category") or "untyped"),
                                   "headline_rule": "contain"})
            elif task == "caption":
                q = (GEOCHAT_REGION if part == "region_captioning" else "") + e["question"].strip()
                rec = make_record(rid, "caption", ds, img, prompts.vqa_prompt(q, suffix=False, **kw), p["refs"][0],
                                  {**base, "references": p["refs"], "region": e["question"] if part ==
                                   "region_captioning" else None})
            else:
                q = e["question"].strip()
                objs = [_ground_obj(poly, q, w, h, where, summary) for poly in p["polys"]]
                groups = {"size": str(e.get("size_group") or "unknown"), "type": str(e.get("type") or "unknown"),
                          "count": "single" if len(e.get("obj_ids") or []) == 1 else "multiple"}
                answer, style = _ground_answer(args, objs, w, h, "poly")
                rec = make_record(rid, "ground", ds, img, prompts.referring_prompt("geochat", q, args.prompts), answer,
                                  {**base, "width": w, "height": h, "objects": objs, "box_format": "poly",
                                   "groups": groups, "benchmark": "geochat_referring", **style, **degenerate(objs)})
        except UserError as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
            continue
        recs.append(rec)
        summary["counts"][f"type {rec['meta'].get('type') or rec['meta'].get('groups', {}).get('type') or task}"] += 1
    _write_bench(out, name, args, summary, {name: recs}, f"geochat {part}: {len(recs)} {task} records",
                 f"none of the lines of {args.json} could be used")
    return summary


def _vhm_question(value, preset):
    """A VHM question. default: the data's "<image>" tag removed. rscovlm: kept as text, as RSCoVLM sends it
    (its guard `'<image>' not in conversations[0]` tests a dict's keys and never fires, vhm_bench.py:25-30):
    written prompts.IMAGE_TAG_TEXT, which the chat rendering turns back into "<image>"."""
    if prompts.is_rscovlm(preset):
        return value.strip().replace(IMAGE_PLACEHOLDER, prompts.IMAGE_TAG_TEXT)
    return re.sub(r"\s*<image>\s*", " ", value).strip()


def run_vhm(args):
    root, out = Path(args.root), Path(args.out)
    base = root / "datasets_eval" if (root / "datasets_eval").is_dir() else root
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in VHM_FILES]
    if unknown:
        raise UserError(f"--parts {','.join(unknown)}: choose from {','.join(VHM_FILES)}")
    absent = [VHM_FILES[p] for p in parts if not (base / VHM_FILES[p]).is_file()]
    if absent:
        raise UserError(f"no {base / absent[0]} (--root holds VHM's datasets_eval/ with {', '.join(VHM_FILES.values())})"
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
                    raise UserError(f"{where}: not a VHM entry (needs image, image_path and conversations "
                                   "[human question, gpt answer])")
                items.append((f"{e.get('image_path', '')}/{e['image']}".lstrip("/"), where, (e, k)))
            except UserError as err:
                skip_or_raise(summary, args.skip_bad, where, str(err))
        pairs = _image_sizes(_bench_items(items, base, "--root", summary, args.skip_bad), args.workers, summary,
                             args.skip_bad)
        recs = []
        for (_, where, (e, k)), image, _size in pairs:
            q = _vhm_question(str(e["conversations"][0]["value"]), args.prompts)
            a = str(e["conversations"][1]["value"]).strip()
            if part == "counting" and not re.fullmatch(r"\d+", a):
                skip_or_raise(summary, args.skip_bad, where, f"{where}: counting answer {a!r} is not a number")
                continue
            recs.append(make_record(f"vhm_{part}_{k}", "vqa", f"vhm_{part}", [rel(image, out)],
                                    prompts.vqa_prompt(q, suffix=False, **kw), a,
                                    {"answer": a, "type": part, "benchmark": "vhm", "vhm_part": part}))
        files[f"vhm_{part}"] = recs
    _write_bench(out, name, args, summary, files, f"vhm {','.join(parts)}: {sum(map(len, files.values()))} records",
                 f"no entry of {base} could be used")
    return summary


# -----------------------------------------------------------------------------
# xlrs-bench: XLRS-Bench's multiple-choice VQA (CVPR 2025, AI9Stars/XLRS-Bench; images up to 10,000 x 10,000 px),
# as its Hugging Face release (initiacms/XLRS-Bench-lite) and lmms-eval's task read it: rows {"index", "image": [one
# or two images], "question", "multi-choice options": ["(A) ...", ...], "answer" ("A", or several letters for
# overall land use), "category": "Counting/Overall counting", "l2-category"}. Read from the release's parquet files
# (needs pyarrow: pip install pyarrow; embedded image bytes are written to OUT/images/xlrs/) or from JSON / JSONL
# exports of the same rows whose "image" holds paths (relative to --images). The prompt is the one the benchmark
# publishes (lmms_eval/tasks/xlrs/mcq_utils.py xlrs_doc_to_text), word for word; eval_vqa.py scores it with the
# official extraction (eval_vqa.XLRS_RULE).

XLRS_MULTI = "Land use classification/Overall Land use classification"  # several answers may be right
XLRS_ASK = ("\nSelect the best answer for the multiple-choice question based on the image. Only respond with the letter "
            "corresponding to the correct answer (A, B, C, D).\nThe answer is:")
XLRS_ASK_MULTI = ("\nSelect the best answer(s) for the multiple-choice question based on the image. There may be more "
                  "than one correct option. Only respond with the letter(s) corresponding to the correct answer(s) "
                  "(A, B, C, D), with multiple choices separated by spaces.The answer(s) is(are):")


def xlrs_prompt(question, options, category, n_images):
    """The benchmark's prompt after the images: question, "The choices are listed below:", the options one per
    line, the single- or multiple-answer instruction."""
    text = question + "The choices are listed below:\n" + "\n".join(options) + "\n"
    return IMAGE_PLACEHOLDER * n_images + text + (XLRS_ASK_MULTI if category == XLRS_MULTI else XLRS_ASK)


def _xlrs_rows(path):
    """[(row, where)] of a parquet file (pyarrow) or a JSON / JSONL file."""
    if Path(path).suffix.lower() != ".parquet":
        return read_json_entries(path)
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"--json {path}: reading parquet needs pyarrow (pip install pyarrow), or give the rows as "
                        "JSON / JSONL with image paths") from None
    rows = pq.read_table(path).to_pylist()
    return [(r, f"{path} row {k}") for k, r in enumerate(rows)]


def _xlrs_images(row, where, images_root, out):
    """The row's image files: paths under images_root as given, or the embedded bytes ({"bytes", "path"}) written
    once to OUT/images/xlrs/{index}_{k}{ext}."""
    value = row.get("image")
    items = value if isinstance(value, list) else [value]
    paths = []
    for k, im in enumerate(items):
        if isinstance(im, dict) and im.get("bytes"):
            ext = Path(str(im.get("path") or "")).suffix.lower()
            dest = out / "images" / "xlrs" / f"{row['index']}_{k}{ext if ext in IMAGE_EXTS else '.png'}"
            if not dest.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(dest, im["bytes"])
            paths.append(dest)
        elif isinstance(im, (str, dict)) and (im if isinstance(im, str) else im.get("path")):
            paths.append(Path(images_root) / (im if isinstance(im, str) else im["path"]))
        else:
            raise UserError(f"{where}: image {k} is neither a path nor embedded bytes")
    if not paths:
        raise UserError(f"{where}: the row has no image")
    return paths


def _xlrs_item(row, where):
    """The checked fields of one XLRS-Bench row."""
    need = ("index", "image", "question", "multi-choice options", "answer", "category")
    if not isinstance(row, dict) or any(k not in row for k in need):
        raise UserError(f"{where}: not an XLRS-Bench row (needs {', '.join(need)})")
    options = row["multi-choice options"]
    if not (isinstance(options, list) and options and all(isinstance(o, str) for o in options)):
        raise UserError(f"{where}: 'multi-choice options' must be a list of strings, got {options!r}")
    answer = str(row["answer"]).strip()
    if not re.fullmatch(r"[A-E](?:[\s,]*[A-E])*", answer):
        raise UserError(f"{where}: answer {row['answer']!r} is not option letters A-E")
    if str(row["category"]).count("/") < 1:
        raise UserError(f"{where}: category {row['category']!r} is not 'Task/Subtask'")
    return options, answer


def run_xlrs_bench(args):
    out = Path(args.out)
    name = args.name or "xlrs_bench"
    claim_output(out, name, args)
    out.mkdir(parents=True, exist_ok=True)
    summary, items, seen = new_summary(), [], set()
    for row, where in [x for j in args.json for x in _xlrs_rows(j)]:
        try:
            options, answer = _xlrs_item(row, where)
            rid = _unique_id(seen, f"xlrs_{row['index']}", where)
            items.append((rid, row, options, answer, _xlrs_images(row, where, args.images or ".", out), where))
        except UserError as err:
            skip_or_raise(summary, args.skip_bad, where, str(err))
    sizes = check_images([str(p) for it in items for p in it[4]], args.workers, "checking images")
    records = []
    for rid, row, options, answer, paths, where in items:
        bad = next((f"{p}: {sizes[str(p)]}" for p in paths if isinstance(sizes[str(p)], str)), None)
        if bad:
            skip_or_raise(summary, args.skip_bad, where, f"{where}: {bad}")
            continue
        task, subtask = str(row["category"]).split("/")[:2]
        meta = {"answer": answer, "type": subtask, "task": task, "l2": str(row.get("l2-category") or ""),
                "choices": options, "benchmark": "xlrs_bench", "question_id": str(row["index"])}
        prompt = xlrs_prompt(str(row["question"]), options, str(row["category"]), len(paths))
        records.append(make_record(rid, "vqa", "xlrs_bench", [rel(p, out) for p in paths], prompt, answer, meta))
        summary["counts"][f"subtask {subtask}"] += 1
    summary["counts"]["records"] = len(records)
    write_outputs(out, name, args, summary, records, f"xlrs-bench: {len(records)} records",
                  f"no row of {', '.join(args.json)} could be used")
    return summary


# -----------------------------------------------------------------------------
# CLI


def build_parser():
    p = argparse.ArgumentParser(description="Benchmark files -> rscovlm records (docs/bench_prep.md)", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    add_debug_flag(p)
    sub = p.add_subparsers(dest="source", required=True)
    sp = sub.add_parser("lrs-vqa", help="LRS-VQA benchmark lines or training entries with zoom boxes -> vqa / zoom records")
    add_output_flags(sp)
    sp.add_argument("--json", nargs="+", required=True,
                    help="LRS_VQA_merged.jsonl (the benchmark) and/or training files with bbox_info.crop_hbox (JSON list or JSONL)")
    sp.add_argument("--images", required=True, help="folder the entries' 'image' paths are relative to")
    sp.add_argument("--split", default="test", help="split name in the output file: lrs_vqa_{split}.jsonl (default %(default)s)")
    sp.add_argument("--no-zoom", action="store_true", help="plain single-turn VQA for every question (no tool turns)")
    add_prompts_flag(sp)

    sp = sub.add_parser("mme-realworld", help="MME-RealWorld remote-sensing multiple choice -> vqa / zoom prompts")
    add_output_flags(sp)
    sp.add_argument("--json", required=True, help="MME_RealWorld_remote_sensing.json (or MME_RealWorld.json: Remote Sensing kept)")
    sp.add_argument("--images", default=None, help="folder the entries' 'Image' paths are relative to (default: the JSON's folder)")
    sp.add_argument("--no-zoom", action="store_true", help="plain single-turn questions (no tool turns)")

    # benchmarks RSCoVLM reports on (section "Benchmarks" above)
    sp = sub.add_parser("refgeo", help="refGeo grounding sets (AVVG, DIOR-RSVG, GeoChat, RSVG, VRSBench) -> ground records")
    add_output_flags(sp)
    add_prompts_flag(sp)
    add_answer_budget_flags(sp)
    sp.add_argument("--root", required=True, help="refGeo folder with metainfo/{set}.jsonl and images/")
    sp.add_argument("--sets", default=None, help=f"comma list of sets (default: those present of {','.join(REFGEO_SETS)})")
    sp.add_argument("--box-format", choices=["hbox", "poly"], default="hbox",
                    help="target kind: hbox (bbox, what Acc@0.5 is reported on) or poly (the lines' 'poly')")
    sp = sub.add_parser("vrsbench", help="VRSBench evaluation files -> caption / vqa / ground (referring) records")
    add_output_flags(sp)
    add_prompts_flag(sp)
    sp.add_argument("--json", nargs="+", required=True,
                    help="VRSBench_EVAL_Cap.json, VRSBench_EVAL_vqa.json and/or VRSBench_EVAL_referring.json")
    sp.add_argument("--images", required=True, help="folder of the entries' image_id files (VRSBench Images_val)")
    sp = sub.add_parser("geochat", help="one GeoChat-Bench file -> cls / vqa / caption / ground records")
    add_output_flags(sp)
    add_prompts_flag(sp)
    sp.add_argument("--json", required=True, help="aid.jsonl, UCmerced.jsonl, lrben.jsonl, hrben.jsonl, "
                    "region_captioning.jsonl, grounding_description.jsonl or referring.jsonl")
    sp.add_argument("--images", required=True, help="image folder of that part (AID, UCMerced Images, RSVQA LR/HR "
                    "images, GeoChat_Instruct images for region captioning and referring)")
    sp.add_argument("--part", choices=list(GEOCHAT_PARTS), default=None, help="the part (default: from the file name)")
    sp.add_argument("--answers", default=None, help="lrben/hrben: the RSVQA answers JSON of the split "
                    "(LR_split_test_answers.json, USGS_split_test_phili_answers.json)")
    sp = sub.add_parser("xlrs-bench", help="XLRS-Bench multiple-choice VQA (parquet or JSON/JSONL rows) -> vqa records")
    add_output_flags(sp)
    sp.add_argument("--json", nargs="+", required=True, help="the release's parquet files, or JSON / JSONL exports of its rows")
    sp.add_argument("--images", default=None, help="folder the rows' image paths are relative to (rows with embedded images: not needed)")
    sp = sub.add_parser("vhm", help="VHM evaluation set parts -> vqa records")
    add_output_flags(sp)
    add_prompts_flag(sp)
    sp.add_argument("--root", required=True, help="VHM_eval_dataset folder (with datasets_eval/)")
    sp.add_argument("--parts", default=",".join(VHM_FILES), help="comma list of parts (default: %(default)s)")

    return p


RUNNERS = {"lrs-vqa": run_lrs_vqa, "mme-realworld": run_mme_realworld, "refgeo": run_refgeo,
           "vrsbench": run_vrsbench, "geochat": run_geochat, "vhm": run_vhm, "xlrs-bench": run_xlrs_bench}


def main(argv=None):
    """Returns the run's summary; bad input raises UserError (one line, exit 2 under run_cli)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "answer_budget", 1) < 1:
        raise UserError(f"--answer-budget {args.answer_budget}: give a number of tokens >= 1")
    return RUNNERS[args.source](args)


if __name__ == "__main__":
    run_cli(main)
