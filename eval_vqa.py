"""
eval_vqa.py — VQA, scene classification and captioning evaluation with the published metrics.

Reads records (JSONL, see the record format) of task "vqa", "cls" and "caption"; other tasks are counted
and skipped (det/ground belong to eval_det.py). Either generates answers with a checkpoint (batched,
written incrementally to OUT/predictions.jsonl and resumable through model.predict, also under torchrun),
or scores an existing predictions file: any JSONL whose lines carry "id" (the record id) and "text" (the
raw answer), so answers from other models or APIs can be scored the same way (read by model.read_predictions:
"text": null is an empty answer, a repeated id is an error).

Metrics, per dataset (a file may mix datasets), all in percent:
- vqa: accuracy per question type, AA (mean of the per-type accuracies) and OA (all correct / all), under
  two rules named in the output: "exact" (normalised exact match, below) and "contain" (RSCoVLM's rule:
  the lower-cased, '.'-stripped GT is a substring of the prediction). Counting questions also report MAE
  where both the GT and the prediction are numbers; the rest are counted as not numeric.
  RSVQA bucketed answers (LR counts "0 | between 1 and 10 | ... | more than 1000", HR areas in m2) are
  compared by bucket: "34" is exact-correct for "between 11 and 100".
- cls: accuracy (exact, contain), a confusion matrix in the JSON (rows GT, columns the class the
  normalised prediction equals, or "(other)"), a PNG of it with --vis.
- caption: BLEU-1..4, METEOR (needs Java; the output says when it was skipped), ROUGE-L and CIDEr-D,
  computed by pycocoevalcap's own scorers on lower-cased, punctuation-stripped whitespace tokens, x100.
- every dataset: "cut", how many answers reached --max-new-tokens without ending (a warning on stderr when
  any did; "unknown" for predictions files that do not say).

Examples:
  python eval_vqa.py --ckpt runs/exp1/final --data data/rsvqa_lr_test.jsonl --out runs/exp1/eval_rsvqa
  torchrun --nproc-per-node 8 eval_vqa.py --ckpt runs/exp1/final --data val.jsonl --out runs/exp1/eval_val
  python eval_vqa.py --preds other_model.jsonl --data val.jsonl --json-out other_metrics.json
  python eval_vqa.py --preds runs/exp1/eval_val/predictions.jsonl --data val.jsonl --out re_scored --vis
"""

import argparse
import json
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

import model

TASKS = ("vqa", "cls", "caption")

# -----------------------------------------------------------------------------
# ground truth


def final_assistant(record):
    msgs = record.get("messages") or []
    return msgs[-1]["content"] if msgs and msgs[-1].get("role") == "assistant" else None


def ground_truth(record):
    """The GT of a vqa / cls / caption record: meta first, else the final assistant turn."""
    meta, task = record.get("meta") or {}, record["task"]
    key = {"vqa": "answer", "cls": "label", "caption": "references"}[task]
    gt = meta.get(key)
    if gt is None:
        gt = final_assistant(record)
        if gt is not None and task == "caption":
            gt = [gt]
    if gt is None or (task == "caption" and (not isinstance(gt, list) or not gt)):
        raise model.UserError(f"{model.record_where(record)}: {task} record has no ground truth: needs "
                              f"meta['{key}']" + (" (a list of strings)" if task == "caption" else "")
                              + " or a final assistant turn")
    return gt if task == "caption" else str(gt)


# -----------------------------------------------------------------------------
# answer normalisation and the two matching rules

ARTICLES = {"a", "an", "the"}
UNITS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
         "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
         "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "none": 0}  # "none" -> 0 as VQA-v2
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
SCALES = ("hundred", "thousand")
NUMBER_RE = re.compile(r"^\d+(?:\.\d+)?$")
# a number, the area unit m2 (kept as one token so "500m2" and "500 m2" agree), or a run of letters
TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|m2(?![^\W_])|[^\W\d_]+")


def _number_text(x):
    """Canonical text of a number: 3.0 -> "3", "007" -> "7"."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def normalize(text):
    """Lower-case; drop punctuation and articles; number words to digits ("twenty one" -> "21");
    thousands separators dropped ("1,000" -> "1000"); numbers canonical; single spaces."""
    t = text.lower().replace("m²", "m2")
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t)
    out, run = [], None  # run = [total, current] of a number-word run in progress

    def flush():
        nonlocal run
        if run is not None:
            out.append(_number_text(run[0] + run[1]))
            run = None

    for tok in TOKEN_RE.findall(t):
        if tok in UNITS or tok in TENS or tok in SCALES:
            run = run or [0, 0]
            if tok == "hundred":
                run[1] = max(run[1], 1) * 100
            elif tok == "thousand":
                run[0] += max(run[1], 1) * 1000
                run[1] = 0
            else:
                run[1] += UNITS.get(tok, TENS.get(tok))
            continue
        flush()
        if tok in ARTICLES:
            continue
        out.append(_number_text(tok) if NUMBER_RE.match(tok) else tok)
    flush()
    return " ".join(out)


def parse_number(text):
    """The first number in the normalised text ("There are five." -> 5.0), or None."""
    for tok in normalize(text).split():
        if NUMBER_RE.match(tok):
            return float(tok)
    return None


# RSVQA quantises LR counts (and HR areas, in m2) into five buckets with these upper edges.
BUCKET_EDGES = (0, 10, 100, 1000)
BUCKET_PHRASE = re.compile(r"^(?:between (\d+(?:\.\d+)?)(?: m2)? and (\d+(?:\.\d+)?)(?: m2)?"
                           r"|more than (\d+(?:\.\d+)?)(?: m2)?)$")
PLAIN_NUMBER = re.compile(r"^(\d+(?:\.\d+)?)(?: m2)?$")


def bucket_of_number(x):
    """0 -> 0, (0, 10] -> 1, (10, 100] -> 2, (100, 1000] -> 3, > 1000 -> 4."""
    return next((i for i, edge in enumerate(BUCKET_EDGES) if x <= edge), len(BUCKET_EDGES))


def bucket_of(norm):
    """Bucket index of a normalised answer that is a number or a bucket phrase, else None."""
    m = PLAIN_NUMBER.match(norm)
    if m:
        return bucket_of_number(float(m.group(1)))
    m = BUCKET_PHRASE.match(norm)
    if not m:
        return None
    if m.group(2) is not None:  # "between a and b": the bucket that ends at b
        return bucket_of_number(float(m.group(2)))
    return bucket_of_number(float(m.group(3)) + 1)  # "more than x"


def is_bucketed(record, gt_norm):
    """RSVQA bucketed answer: the GT is itself a bucket phrase (as RSVQA-HR areas are), or an RSVQA-LR
    count question, whose raw GT number the published protocol buckets."""
    if BUCKET_PHRASE.match(gt_norm):
        return True
    qtype = str((record.get("meta") or {}).get("type", "")).lower()
    lr = re.search(r"rsvqa[\W_]*lr", str(record.get("dataset", "")).lower())
    return bool(lr) and qtype.startswith("count") and PLAIN_NUMBER.match(gt_norm) is not None


def exact_match(pred, gt, bucketed=False):
    """Normalised exact match. When the GT is yes/no, a prediction starting with yes/no is cut to that
    word ("Yes, there is." matches "yes"). Bucketed answers match when they fall in the same bucket."""
    p, g = normalize(pred), normalize(gt)
    if bucketed:
        bp, bg = bucket_of(p), bucket_of(g)
        return bp is not None and bp == bg
    if g in ("yes", "no") and p.split()[:1] in (["yes"], ["no"]):
        p = p.split()[0]
    return p == g


def contain_match(pred, gt):
    """RSCoVLM's "contain" accuracy, verbatim: the GT (lower-cased, stripped of spaces and '.') is a
    substring of the prediction. Loose by design: "no" is found in "not sure", "1" in "10"."""
    return gt.lower().strip().strip(".") in pred.lower().strip().strip(".")


RULES = {
    "units": "accuracies and caption scores in percent (x100); MAE in the answer's own units",
    "exact": "normalised exact match: lower-case; punctuation and articles (a/an/the) removed; number words "
             "to digits ('two' -> 2, 'none' -> 0); a prediction starting with yes/no is cut to that word when "
             "the GT is yes/no; RSVQA bucketed answers (LR counts, HR areas) match by bucket "
             "0 | 1-10 | 11-100 | 101-1000 | >1000",
    "contain": "RSCoVLM contain rule: GT lower-cased and stripped of spaces and '.' is a substring of the "
               "prediction treated the same way",
    "AA": "mean of the per-question-type accuracies",
    "OA": "correct answers / all questions",
    "count_mae": "mean |pred - GT| over counting questions where both parse as numbers (first number in the "
                 "normalised prediction); the others are counted as gt_not_numeric / pred_not_numeric",
    "missing": "records without a prediction are scored as the empty answer (wrong) and counted",
    "cut": "answers that reached --max-new-tokens without ending (model.predict's 'cut'; scored as written); "
           "'unknown' when the predictions file does not say (other models' files)",
    "cls_confusion": "rows: GT class; columns: the class whose normalised name equals the normalised "
                     "prediction, else '(other)'; so the diagonal sum / n is the exact accuracy",
    "caption": "pycocoevalcap 1.2 scorers Bleu(4), Meteor (1.5, needs Java), Rouge (ROUGE-L) and Cider (the "
               "coco-caption CIDEr-D: clipped n-gram counts, Gaussian length penalty sigma 6, x10), on "
               "lower-cased, punctuation-stripped whitespace tokens (no PTB tokenizer); BLEU is the corpus "
               "score with the 'closest' reference length; METEOR the jar's corpus score; CIDEr-D's idf comes "
               "from the references of the images scored together (one dataset), so a one-image set scores 0",
}

# -----------------------------------------------------------------------------
# VQA


def _pct(correct, n):
    return 100.0 * correct / n if n else None


def score_vqa(records, preds):
    """Per dataset: per-type accuracies, AA and OA under both rules, counting MAE."""
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    out = {}
    for name, recs in sorted(by_dataset.items()):
        per_type = defaultdict(lambda: Counter())
        abs_errors, gt_not_numeric, pred_not_numeric, bucketed, missing = [], 0, 0, 0, 0
        for r in recs:
            gt = ground_truth(r)
            pred = preds.get(r["id"])
            missing += pred is None
            pred = pred or ""
            qtype = str((r.get("meta") or {}).get("type", "untyped"))
            b = is_bucketed(r, normalize(gt))
            bucketed += b
            c = per_type[qtype]
            c["n"] += 1
            c["exact"] += exact_match(pred, gt, bucketed=b)
            c["contain"] += contain_match(pred, gt)
            if qtype.lower().startswith("count"):
                # a bucket phrase ("between 11 and 100") is not a number on either side
                g_num = PLAIN_NUMBER.match(normalize(gt))
                p_num = None if BUCKET_PHRASE.match(normalize(pred)) else parse_number(pred)
                if g_num is None:
                    gt_not_numeric += 1
                elif p_num is None:
                    pred_not_numeric += 1
                else:
                    abs_errors.append(abs(p_num - float(g_num.group(1))))
        types = {t: {"n": c["n"], "exact": _pct(c["exact"], c["n"]), "contain": _pct(c["contain"], c["n"])}
                 for t, c in sorted(per_type.items())}
        n = sum(c["n"] for c in per_type.values())
        res = {"n": n, "missing": missing, "bucketed": bucketed, "types": types}
        for rule in ("exact", "contain"):
            res[rule] = {"AA": sum(t[rule] for t in types.values()) / len(types),
                         "OA": _pct(sum(c[rule] for c in per_type.values()), n)}
        count_n = sum(c["n"] for t, c in per_type.items() if t.lower().startswith("count"))
        if count_n:
            res["count"] = {"n": count_n, "numeric": len(abs_errors),
                            "mae": sum(abs_errors) / len(abs_errors) if abs_errors else None,
                            "gt_not_numeric": gt_not_numeric, "pred_not_numeric": pred_not_numeric}
        out[name] = res
    return out


# -----------------------------------------------------------------------------
# scene classification


def score_cls(records, preds):
    """Per dataset: exact / contain accuracy and a confusion matrix over the dataset's classes."""
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    out = {}
    for name, recs in sorted(by_dataset.items()):
        classes = set()
        for r in recs:
            classes.update((r.get("meta") or {}).get("classes") or [])
            classes.add(ground_truth(r))
        classes = sorted(classes)
        col_of = {}
        for i, c in enumerate(classes):
            col_of.setdefault(normalize(c), i)  # first class wins if two normalise alike
        other = len(classes)
        matrix = [[0] * (len(classes) + 1) for _ in classes]
        exact = contain = missing = 0
        for r in recs:
            gt = ground_truth(r)
            pred = preds.get(r["id"])
            missing += pred is None
            pred = pred or ""
            exact += exact_match(pred, gt)
            # class names are often written with '_' or '-' in meta; RSCoVLM prompts use spaces
            contain += contain_match(pred, re.sub(r"[_-]", " ", gt))
            matrix[classes.index(gt)][col_of.get(normalize(pred), other)] += 1
        out[name] = {"n": len(recs), "missing": missing, "exact": _pct(exact, len(recs)),
                     "contain": _pct(contain, len(recs)), "classes": classes,
                     "confusion_columns": classes + ["(other)"], "confusion": matrix}
    return out


def plot_confusion(res, title, path):
    """Row-normalised confusion matrix PNG (colour = fraction of the GT row, text = count)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.array(res["confusion"], dtype=float)  # (classes, classes + 1)
    rows = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(res["classes"])
    size = 2 + 0.35 * k
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k + 1), res["confusion_columns"], rotation=90, fontsize=7)
    ax.set_yticks(range(k), res["classes"], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{title}: exact {res['exact']:.2f}%", fontsize=9)
    if k <= 30:
        for i in range(k):
            for j in range(k + 1):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# captioning


def caption_tokens(text):
    """Lower-cased, punctuation-stripped, whitespace-joined: the text pycocoevalcap's scorers split on."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def start_meteor():
    """pycocoevalcap's METEOR (a Java subprocess) or the reason it is skipped."""
    if shutil.which("java") is None:
        return None, "skipped: no java"
    try:
        from pycocoevalcap.meteor.meteor import Meteor
        return Meteor(), None
    except Exception as e:  # a broken Java install must not stop the other metrics
        return None, f"skipped: METEOR failed to start ({type(e).__name__}: {e})"


def score_captions(records, preds, meteor=True):
    """Per dataset: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (x100), by pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    scorer, meteor_note = start_meteor() if meteor else (None, "skipped: --no-meteor")
    out = {}
    for name, recs in sorted(by_dataset.items()):
        gts = {r["id"]: [caption_tokens(x) for x in ground_truth(r)] for r in recs}
        res = {r["id"]: [caption_tokens(preds.get(r["id"]) or "")] for r in recs}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        scores = {"n": len(recs), "missing": sum(r["id"] not in preds for r in recs)}
        scores.update({f"BLEU-{i + 1}": 100.0 * b for i, b in enumerate(bleu)})
        scores["METEOR"] = meteor_note
        if scorer is not None:
            try:
                scores["METEOR"] = 100.0 * scorer.compute_score(gts, res)[0]
            except Exception as e:
                scores["METEOR"] = f"skipped: METEOR failed ({type(e).__name__}: {e})"
        scores["ROUGE-L"] = 100.0 * float(rouge)
        scores["CIDEr-D"] = 100.0 * float(cider)
        out[name] = scores
    del scorer  # stops the Java process
    return out


# -----------------------------------------------------------------------------
# scoring a whole file


def evaluate(records, preds, meteor=True, all_records=None, cut=None):
    """metrics dict (without args) for the vqa / cls / caption records and {id: text}. all_records (the
    whole data file, default records) is what unknown prediction ids and skipped records are counted against.
    cut: {id: True/False/None} from the prediction lines (count_cut); None = no line says."""
    all_records = records if all_records is None else all_records
    by_task = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    scored = {r["id"] for r in records if r["task"] in TASKS}
    file_ids = {r["id"] for r in all_records}
    counts = {"records": len(all_records), "scored": len(scored),
              "missing": sum(i not in preds for i in scored),
              "unknown_ids": sum(i not in file_ids for i in preds),
              "skipped": dict(sorted(Counter(r["task"] for r in all_records if r["id"] not in scored).items()))}
    metrics = {"rules": RULES, "counts": counts}
    if by_task["vqa"]:
        metrics["vqa"] = score_vqa(by_task["vqa"], preds)
    if by_task["cls"]:
        metrics["cls"] = score_cls(by_task["cls"], preds)
    if by_task["caption"]:
        metrics["caption"] = score_captions(by_task["caption"], preds, meteor=meteor)
    for task in TASKS:
        for name, res in metrics.get(task, {}).items():
            res["cut"], res["cut_unknown"] = count_cut([r for r in by_task[task] if r["dataset"] == name], preds, cut or {})
    return metrics


def count_cut(records, preds, cut):
    """(how many of the records' answers hit the generation limit, how many of their predictions do not say).
    model.predict writes "cut": true when an answer reached --max-new-tokens without ending; files of other
    models or older runs have no "cut": when none of these records' predictions says, the count is "unknown"."""
    said = [cut.get(r["id"]) for r in records if r["id"] in preds]
    known = [c for c in said if isinstance(c, bool)]
    return (sum(known) if known else "unknown"), len(said) - len(known)


def warn_cut(metrics, generation):
    """A warning on stderr per dataset whose answers were cut at the generation limit (scored as written)."""
    limit = (generation or {}).get("max_new_tokens")
    raise_it = ("a larger --max-new-tokens N (auto's limit was too small for these answers)"
                if (generation or {}).get("requested") == "auto" else "a larger --max-new-tokens (or --max-new-tokens auto)")
    for task in TASKS:
        for name, res in metrics.get(task, {}).items():
            if res["cut"] != "unknown" and res["cut"]:
                print(f"WARNING: {task}/{name}: {res['cut']} of {res['n'] - res['missing']} answers hit the generation limit"
                      + (f" of {limit} tokens" if limit else "") + f" and were cut off; generate again with {raise_it} "
                      "into a new --out", file=sys.stderr)


def _f(x):
    return f"{x:7.2f}" if isinstance(x, (int, float)) else f"{'-':>7}"


def format_tables(metrics):
    """Human-readable tables, one block per task and dataset."""
    lines = []
    c = metrics["counts"]
    lines.append(f"records {c['records']}, scored {c['scored']}, missing predictions {c['missing']}, "
                 f"unknown prediction ids {c['unknown_ids']}, skipped records by task {c['skipped'] or 'none'}")
    for name, res in metrics.get("vqa", {}).items():
        lines.append(f"\n[vqa] {name}  n={res['n']} missing={res['missing']} bucketed={res['bucketed']} cut={res['cut']}")
        lines.append(f"{'type':<20}{'n':>7}{'exact':>8}{'contain':>8}")
        for t, v in res["types"].items():
            lines.append(f"{t:<20}{v['n']:>7} {_f(v['exact'])} {_f(v['contain'])}")
        lines.append(f"{'AA':<20}{'':>7} {_f(res['exact']['AA'])} {_f(res['contain']['AA'])}")
        lines.append(f"{'OA':<20}{res['n']:>7} {_f(res['exact']['OA'])} {_f(res['contain']['OA'])}")
        if "count" in res:
            k = res["count"]
            mae = f"{k['mae']:.3f}" if k["mae"] is not None else "-"
            lines.append(f"count MAE {mae} over {k['numeric']} numeric pairs "
                         f"(GT not numeric {k['gt_not_numeric']}, prediction not numeric {k['pred_not_numeric']})")
    if metrics.get("cls"):
        lines.append(f"\n[cls]\n{'dataset':<24}{'n':>7}{'exact':>8}{'contain':>8}{'missing':>8}{'cut':>8}")
        for name, res in metrics["cls"].items():
            lines.append(f"{name:<24}{res['n']:>7} {_f(res['exact'])} {_f(res['contain'])}{res['missing']:>8}{res['cut']:>8}")
    if metrics.get("caption"):
        keys = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
        lines.append(f"\n[caption]\n{'dataset':<24}{'n':>7}" + "".join(f"{k:>9}" for k in keys) + f"{'cut':>9}")
        for name, res in metrics["caption"].items():
            lines.append(f"{name:<24}{res['n']:>7}" + "".join(f"  {_f(res[k])}" for k in keys) + f"{res['cut']:>9}")
            if isinstance(res["METEOR"], str):
                lines.append(f"  METEOR {res['METEOR']}")
    lines.append(f"\nexact = {RULES['exact']}\ncontain = {RULES['contain']}\ncut = {RULES['cut']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI






def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="records JSONL with vqa / cls / caption records (others are skipped)")
    p.add_argument("--ckpt", default=None, help="checkpoint dir (HF format) to generate answers with")
    p.add_argument("--preds", default=None, help="score this predictions JSONL ({'id','text'} per line) instead of generating")
    p.add_argument("--out", default=None, help="output dir: predictions.jsonl (with --ckpt), metrics.json, PNGs")
    p.add_argument("--json-out", default=None, help="metrics JSON path (default OUT/metrics.json)")
    p.add_argument("--tasks", default="vqa,cls,caption", help="comma list of the tasks to evaluate")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N records of those tasks (0 = all)")
    model.add_generation_flags(p, 128, "short answers and captions need ~10-60 tokens, and a verbose answer cut at "
                                       "auto's tighter limit could lose the word that scores")
    p.add_argument("--dtype", default=None, help="model dtype for model.load (e.g. bfloat16; default: model.load's)")
    p.add_argument("--attn", default=None, help="attention implementation for model.load (e.g. sdpa, flash_attention_2)")
    p.add_argument("--min-pixels", type=int, default=None, help="processor min_pixels (use the training value)")
    p.add_argument("--max-pixels", type=int, default=None, help="processor max_pixels (use the training value)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the ~5 s Java start)")
    p.add_argument("--vis", action="store_true", help="write a confusion-matrix PNG per classification dataset")
    model.add_debug_flag(p)
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.preds is None):
        p.error("give exactly one of --ckpt (generate, then score) or --preds (score a predictions file)")
    if args.ckpt and not args.out:
        p.error("--ckpt needs --out (where predictions.jsonl is written and resumed from)")
    if args.limit < 0:
        p.error("--limit must be >= 0")
    if args.vis and not (args.out or args.json_out):
        p.error("--vis needs --out or --json-out (the PNGs go next to the metrics)")
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        p.error(f"--tasks: unknown {sorted(unknown)}; choose from {','.join(TASKS)}")
    return args


def check_paths(args):
    """Path flags checked before anything is read or loaded, each failure one line naming the flag and the
    path (read_records does the same for --data; model.family for a --ckpt folder without config.json)."""
    def check(flag, path, kind):
        p = Path(path)
        if not p.exists():
            raise model.UserError(f"{flag} {path}: no such {kind}")
        if kind == "file" and p.is_dir():
            inside = sorted(q.name for q in p.glob("*.jsonl"))
            inside = ["predictions.jsonl"] if "predictions.jsonl" in inside else inside  # what --ckpt writes
            raise model.UserError(f"{flag} {path} is a folder: give a file" + (f", e.g. {p / inside[0]}" if inside else ""))
        if kind == "folder" and not p.is_dir():
            raise model.UserError(f"{flag} {path} is a file: give a folder")

    if args.preds:
        check("--preds", args.preds, "file")
    if args.ckpt:
        check("--ckpt", args.ckpt, "folder")
        try:  # a folder without config.json: UserError listing the checkpoints below it
            model.family(args.ckpt)
        except model.UserError as e:
            raise model.UserError(f"--ckpt {e}") from None
    model.check_output_paths(args.out, args.json_out)


def select_records(args, records, tasks):
    """The records of the chosen tasks (--tasks, --limit), their ground truth checked before any generation.
    None selected is a UserError saying which tasks the file has and what scores them."""
    selected = [r for r in records if r["task"] in tasks]
    if not selected:
        have = Counter(r["task"] for r in records)
        listed = ", ".join(f"{n} {t}" for t, n in have.most_common())
        if set(have) & set(TASKS):
            hint = f"choose from {','.join(t for t in TASKS if t in have)} with --tasks"
        elif set(have) & {"det", "ground"}:
            hint = "det and ground records are scored by eval_det.py"
        else:
            hint = "chat records are not scored"
        raise model.UserError(f"{args.data} has no {'/'.join(tasks)} records to score (it has {listed}): {hint}")
    if args.limit:
        selected = selected[:args.limit]
    for r in selected:
        ground_truth(r)
    return selected






def check_overlap(args, selected, preds, pred_path):
    """A predictions file that is empty or shares no id with the records would score every answer as missing
    (all 0): that is a wrong pair of files, said with examples of both kinds of id."""
    if not preds:
        raise model.UserError(f"{pred_path} has no predictions (an empty file)")
    ids = [r["id"] for r in selected]
    if not set(ids) & preds.keys():
        show = lambda xs: ", ".join(repr(i) for i in list(xs)[:3]) + (", ..." if len(xs) > 3 else "")  # noqa: E731
        raise model.UserError(f"none of the {len(preds)} predictions in {pred_path} has the id of a "
                              f"{'/'.join(sorted({r['task'] for r in selected}))} record of {args.data}"
                              f"{f' (first {args.limit})' if args.limit else ''}: prediction ids {show(preds)}, "
                              f"record ids {show(ids)}; give the predictions made for this --data")


def main(argv=None):
    args = parse_args(argv)
    check_paths(args)
    t0 = time.time()
    tasks = [t for t in TASKS if t in args.tasks.split(",")]
    log = model.print0  # rank 0 only under torchrun

    # ---- records and predictions: generate (resumable, sharded under torchrun) or read a file
    records = model.read_records(args.data)
    selected = select_records(args, records, tasks)
    if args.ckpt:
        out = Path(args.out)
        pred_path = out / "predictions.jsonl"
        todo = model.not_predicted(selected, pred_path)
        model.check_images(todo)
        out.mkdir(parents=True, exist_ok=True)
        net, processor = model.load_for_generation(args.ckpt, args.backend, dtype=args.dtype, attn=args.attn,
                                                   min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        log(f"{len(selected)} records: {len(selected) - len(todo)} already predicted in {pred_path}, "
            f"{len(todo)} to generate")
        limit, how = model.resolve_max_new_tokens(args.max_new_tokens, selected, processor, model.context_length(net))
        log(how)
        lines = model.predict(net, processor, selected, pred_path, batch_size=args.batch_size, max_new_tokens=limit,
                              backend=args.backend, vllm_args={"tensor_parallel_size": args.tensor_parallel})
        generation = {"max_new_tokens": limit, "requested": args.max_new_tokens, "how": how, "backend": args.backend}
        if torch.distributed.is_initialized():  # predict ends with a barrier: every rank has the merged file
            torch.distributed.destroy_process_group()
        if not model.is_main():
            return None
    else:
        pred_path = args.preds
        lines = model.read_predictions(pred_path)
        generation = model.generation_settings(pred_path)
    preds = {i: line["text"] for i, line in lines.items()}
    check_overlap(args, selected, preds, pred_path)

    # ---- scoring
    metrics = evaluate(selected, preds, meteor=not args.no_meteor, all_records=records,
                       cut={i: line.get("cut") for i, line in lines.items()})
    metrics["generation"] = generation
    metrics["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    metrics["seconds"] = round(time.time() - t0, 2)
    log(format_tables(metrics))
    warn_cut(metrics, generation)

    # ---- outputs
    json_out = Path(args.json_out) if args.json_out else (Path(args.out) / "metrics.json" if args.out else None)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics, indent=1))
        log(f"wrote {json_out}")
        if args.vis:
            for name, res in metrics.get("cls", {}).items():
                png = json_out.parent / f"confusion_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
                plot_confusion(res, name, png)
                log(f"wrote {png}")
    return metrics


if __name__ == "__main__":
    model.run_cli(main)  # a UserError: one line "error: ..." on stderr, exit 2
