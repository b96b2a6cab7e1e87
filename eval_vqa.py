"""
eval_vqa.py — VQA, scene classification and captioning evaluation with the published metrics.

Reads records (JSONL, see the record format) of task "vqa", "cls" and "caption"; other tasks are counted
and skipped (det/ground belong to eval_det.py). Either generates answers with a checkpoint (batched,
written incrementally to OUT/predictions.jsonl and resumable through model.predict, also under torchrun),
or scores an existing predictions file: any JSONL whose lines carry "id" (the record id) and "text" (the
raw answer), so answers from other models or APIs can be scored the same way (read by read_predictions:
"text": null is an empty answer, a repeated id is an error).

Metrics, per dataset (a file may mix datasets); metrics.json holds fractions (0..1, as pycocoevalcap gives its
scores), the printed tables percent:
- vqa: accuracy per question type, AA (mean of the per-type accuracies) and OA (all correct / all), under
  two rules named in the output: "exact" (normalised exact match, below) and "contain" (RSCoVLM's rule:
  the lower-cased, '.'-stripped GT is a substring of the prediction). Counting questions also report MAE
  where both the GT and the prediction are numbers; the rest are counted as not numeric.
  RSVQA bucketed answers (LR counts "0 | between 0 and 10 | between 10 and 100 | ... | more than 1000", HR areas in
  m2; the paper's "between 11 and 100" spelling reads the same) are compared by bucket: "34" is exact-correct for
  "between 10 and 100".
- cls: accuracy (exact, contain), a confusion matrix in the JSON (rows GT, columns the class the
  normalised prediction equals, or "(other)"), a PNG of it with --vis.
- caption: BLEU-1..4, METEOR (needs Java; the output says when it was skipped), ROUGE-L and CIDEr-D,
  computed by pycocoevalcap's own scorers on lower-cased, punctuation-stripped whitespace tokens.
- every dataset: "cut", how many answers reached --max-new-tokens without ending (a warning on stderr when
  any did; "unknown" for predictions files that do not say).

Examples:
  python eval_vqa.py --ckpt runs/exp1/final --data data/rsvqa_lr_test.jsonl --out runs/exp1/eval_rsvqa
  torchrun --nproc-per-node 8 eval_vqa.py --ckpt runs/exp1/final --data val.jsonl --out runs/exp1/eval_val
  python eval_vqa.py --preds other_model.jsonl --data val.jsonl --json-out other_metrics.json
  python eval_vqa.py --preds runs/exp1/eval_val/predictions.jsonl --data val.jsonl --out re_scored --vis
"""

import argparse
import re
import shutil
import time
from collections import Counter, defaultdict

from common import (OneLineParser, UserError, add_debug_flag, add_generation_flags, add_model_flags, check_checkpoint,
                    check_output_paths, check_overlap, check_path, count_cut, generation_settings, positive_int,
                    predict_for_eval, print0, read_predictions, read_records, record_where, run_cli, run_eval, warn_cut,
                    write_metrics)


# model.py (and with it torch) is imported only with --ckpt: scoring a predictions file never loads it.


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
        raise UserError(f"{record_where(record)}: {task} record has no ground truth: needs "
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
    "units": "accuracies and caption scores as fractions (0..1; CIDEr-D as pycocoevalcap gives it); MAE in the "
             "answer's own units; the printed tables show percent",
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


def by_dataset(records):
    """[(dataset, its records)] in dataset order: every measure is per dataset (a file may mix datasets)."""
    groups = defaultdict(list)
    for r in records:
        groups[r["dataset"]].append(r)
    return sorted(groups.items())


def _rate(correct, n):
    """correct / n, a fraction (None when there is nothing to count)."""
    return correct / n if n else None


def score_vqa(records, preds):
    """Per dataset: per-type accuracies, AA and OA under both rules, counting MAE."""
    out = {}
    for name, recs in by_dataset(records):
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
        types = {t: {"n": c["n"], "exact": _rate(c["exact"], c["n"]), "contain": _rate(c["contain"], c["n"])}
                 for t, c in sorted(per_type.items())}
        n = sum(c["n"] for c in per_type.values())
        res = {"n": n, "missing": missing, "bucketed": bucketed, "types": types}
        for rule in ("exact", "contain"):
            res[rule] = {"AA": sum(t[rule] for t in types.values()) / len(types),
                         "OA": _rate(sum(c[rule] for c in per_type.values()), n)}
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
    out = {}
    for name, recs in by_dataset(records):
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
        out[name] = {"n": len(recs), "missing": missing, "exact": _rate(exact, len(recs)),
                     "contain": _rate(contain, len(recs)), "classes": classes,
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
    ax.set_title(f"{title}: exact {100 * res['exact']:.2f}%", fontsize=9)
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
    print("METEOR: starting pycocoevalcap's Java scorer (up to a minute; --no-meteor skips it)", flush=True)
    try:
        from pycocoevalcap.meteor.meteor import Meteor
        return Meteor(), None
    except Exception as e:  # a broken Java install must not stop the other metrics
        return None, f"skipped: METEOR failed to start ({type(e).__name__}: {e})"


def score_captions(records, preds, meteor=True):
    """Per dataset: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, as pycocoevalcap's scorers give them."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorer, meteor_note = start_meteor() if meteor else (None, "skipped: --no-meteor")
    out = {}
    for name, recs in by_dataset(records):
        gts = {r["id"]: [caption_tokens(x) for x in ground_truth(r)] for r in recs}
        res = {r["id"]: [caption_tokens(preds.get(r["id"]) or "")] for r in recs}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        scores = {"n": len(recs), "missing": sum(r["id"] not in preds for r in recs)}
        scores.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        scores["METEOR"] = meteor_note
        if scorer is not None:
            try:
                scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
            except Exception as e:
                scores["METEOR"] = f"skipped: METEOR failed ({type(e).__name__}: {e})"
        scores["ROUGE-L"] = float(rouge)
        scores["CIDEr-D"] = float(cider)
        out[name] = scores
    del scorer  # stops the Java process
    return out


# -----------------------------------------------------------------------------
# Large-image benchmarks (bench_prep.py lrs-vqa / mme-realworld / xlrs-bench; meta["benchmark"]) and the zoom chain
#
# Each benchmark is scored by two rules, labelled in metrics.json: "official" (the benchmark's own script) and
# "rscovlm" (RSCoVLM's evaluation, rscovlm/eval/metric/large_image_bench.py), where they differ; the rscovlm
# rule comes first in the tables (the number RSCoVLM's paper reports). XLRS-Bench has no RSCoVLM rule.
# LRS-VQA official (VisionXLab/LRS-VQA Script/evaluation_LRSVQA.py:42-56): GT and answer lower-cased (its
#   inference strips the answer, llava_eval_LRSVQA.py:126); correct when equal or WordNet synonyms (some synset
#   pair with path similarity > 0.8); accuracy per category; per source (the question id's prefix FAIR/STAR/GLH)
#   OA and AA (the mean of that source's category accuracies), the number its README reports.
# LRS-VQA rscovlm (large_image_bench.py:8-35, 47-67): the same after .lower().strip().strip(".") of both ("3."
#   matches "3"); averages over RSCoVLM's eight task names (LRS_TASKS).
# Both report overall (all correct / all) and average (mean over tasks) too. Without a WordNet the synonyms are off
# for both rules, and the rules' text says so.

_WORDNET = []  # load_wordnet's answer, once per process


def load_wordnet():
    """(NLTK's WordNet corpus reader or None, which WordNet was used or why there is none). The standard route:
    nltk with its 'wordnet' corpus (pip install nltk; python -c "import nltk; nltk.download('wordnet')"), the
    WordNet 3.0 the LRS-VQA and RSCoVLM scripts use. Without it the rule is equality alone, and the metrics say so."""
    if not _WORDNET:
        try:
            from nltk.corpus import wordnet

            wordnet.ensure_loaded()
            found = (wordnet, f"NLTK's 'wordnet' corpus (WordNet {wordnet.get_version()})")
        except ImportError:
            found = (None, "nltk is not installed (pip install nltk, then nltk.download('wordnet'))")
        except (LookupError, OSError):
            found = (None, "NLTK's 'wordnet' corpus is not downloaded (python -c \"import nltk; nltk.download('wordnet')\")")
        _WORDNET.append(found)
    return _WORDNET[0]


LRS_TASKS = ("rural or urban", "object shape", "object status", "count", "object background", "object color",
             "object category", "reasoning")  # RSCoVLM's averages run over these (large_image_bench.py:51)


def lrs_clean(text, rule="rscovlm"):
    """The text a rule compares: rscovlm lower-cases and strips spaces, then '.'; official lower-cases the GT and
    the stripped answer (strip=True for an answer)."""
    return text.lower().strip().strip(".") if rule == "rscovlm" else text.lower()


def wordnet_synonyms(a, b, wn):
    """LRS-VQA's (and RSCoVLM's) are_synonyms: some synset pair of the two words with path similarity > 0.8."""
    for s1 in wn.synsets(a):
        for s2 in wn.synsets(b):
            sim = s1.path_similarity(s2)
            if sim is not None and sim > 0.8:
                return True
    return False


def lrs_match(pred, gt, wn=None, rule="rscovlm"):
    """LRS-VQA correctness under a rule: equal after that rule's cleaning, or (with a WordNet) synonyms."""
    p, g = lrs_clean(pred if rule == "rscovlm" else pred.strip(), rule), lrs_clean(gt, rule)
    return p == g or (wn is not None and bool(p) and wordnet_synonyms(g, p, wn))


def _acc_table(rows, key):
    """{group: accuracy %} of rows (group, correct) for one rule."""
    n, ok = Counter(), Counter()
    for r in rows:
        n[r["group"]] += 1
        ok[r["group"]] += r[key]
    return {g: _rate(ok[g], n[g]) for g in sorted(n)}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def lrs_tables(rows, rule):
    """overall, average (over tasks), tasks, and per source its overall, average and tasks, for one rule's key in
    rows {"task", "source", rule: bool}. rscovlm averages only RSCoVLM's task names (when the data has any)."""
    tasks = _acc_table([{"group": x["task"], rule: x[rule]} for x in rows], rule)
    known = rule == "rscovlm" and any(t in LRS_TASKS for t in tasks)  # data of other task names: all of them
    keep = (lambda t: t in LRS_TASKS) if known else (lambda t: True)
    sources = {}
    for s, acc in _acc_table([{"group": x["source"], rule: x[rule]} for x in rows], rule).items():
        st = _acc_table([{"group": x["task"], rule: x[rule]} for x in rows if x["source"] == s], rule)
        sources[s] = {"overall": acc, "average": _mean(v for t, v in st.items() if keep(t)), "tasks": st}
    return {"overall": _rate(sum(x[rule] for x in rows), len(rows)),
            "average": _mean(v for t, v in tasks.items() if keep(t)), "tasks": tasks, "sources": sources}


def score_lrs_vqa(records, preds, cut):
    """Per dataset: the official and rscovlm rules' tables (lrs_tables), and RSCoVLM's contain beside them."""
    wn, where = load_wordnet()
    out = {}
    for name, recs in by_dataset(records):
        rows = []
        for r in recs:
            meta = r.get("meta") or {}
            pred, gt = preds.get(r["id"]), ground_truth(r)
            src = str(meta.get("source") or str(meta.get("question_id", r["id"])).split("_")[0])
            rows.append({"task": str(meta.get("type", "untyped")), "source": src, "missing": pred is None,
                         "contain": contain_match(pred or "", lrs_clean(gt)),
                         **{rule: lrs_match(pred or "", gt, wn, rule) for rule in ("rscovlm", "official")}})
        res = {"n": len(rows), "missing": sum(x["missing"] for x in rows), "synonyms": wn is not None, "wordnet": where}
        for rule in ("rscovlm", "official", "contain"):
            res[rule] = lrs_tables(rows, rule)
        res["cut"], res["cut_unknown"] = count_cut(recs, preds, cut)
        out[name] = res
    return out


MME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                "The best option isThe correct option is", "Best answer:Best option:"]
_LRS_COMMON = ("accuracy per task (category), per source (FAIR/STAR/GLH, the question id's prefix: the official "
               "script's datasets, whose 'average' its README reports) and overall (correct / all); 'average' = mean "
               "of the per-task accuracies (rscovlm: over RSCoVLM's 8 task names; per source: that source's tasks); "
               "contain = RSCoVLM's cleaned GT is a substring of the cleaned prediction")
LRS_RULES = {
    "rscovlm": "LRS-VQA, RSCoVLM's rule (rscovlm/eval/metric/large_image_bench.py): GT and prediction lower-cased, "
               "stripped of spaces and '.', correct when equal or WordNet synonyms",
    "official": "LRS-VQA, the authors' rule (VisionXLab/LRS-VQA Script/evaluation_LRSVQA.py): GT lower-cased, the "
                "answer stripped and lower-cased (no '.' removed), correct when equal or WordNet synonyms",
    "common": _LRS_COMMON,
    "synonyms": "WordNet synonyms: some synset pair with path similarity > 0.8 (NLTK's reader of WordNet 3.0); "
                "when no WordNet is found (pip install nltk, then nltk.download('wordnet')) both rules are equality "
                "alone and score below the papers' rules (see 'synonyms' per dataset)",
}
MME_RULES = {
    "rscovlm": "MME-RealWorld, RSCoVLM's rule (large_image_bench.py:38-44, metric.py:34-48): contain, the GT letter "
               "lower-cased is in the lower-cased answer",
    "official": "MME-RealWorld's own extract_characters_regex (evaluation/eval_your_results.py:23-46), quirks kept: "
                "'Best answer:' and 'The best option is' are not stripped (two missing commas); > 10 words without a "
                "capital A-E is no answer; else the first capital A-E; else the first choice containing the answer, "
                "so an empty answer reads as the first choice (A)",
}
ZOOM_RULE = ("zoom: per record the tool replies it got (rounds), each call cropped or answered with the whole image as "
             "malformed (no valid image_zoom_in JSON), outside (no pixel of the image) or empty (no area); over_cap = "
             "answers that were still a tool call when --max-zoom-rounds was reached (scored as written); crop sizes in "
             "original pixels; crops_on_evidence = crops holding the centre of the question's object (LRS-VQA hbox)")


def mme_letter(text, choices):
    """MME-RealWorld's official answer extraction (extract_characters_regex) with its quirks, for comparable
    numbers: its prefix list lacks two commas, so "The best option is", "The correct option is", "Best answer:"
    and "Best option:" are not removed (the capital B of "Best answer: C" is read as the answer B); more than ten
    words without a capital A-E is no answer; else the first capital A-E anywhere; else the letter of the first
    choice whose text contains the whole answer, which for an empty answer is the first choice."""
    s = text.strip()
    for prefix in MME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    m = re.search(r"[ABCDE]", s)
    if m is None:
        return next((c[1] for c in choices if s.lower() in c.lower()), "")
    return m[0]


def score_mme(records, preds, cut):
    """Per dataset: accuracy per category and overall under the official letter rule and RSCoVLM's contain rule;
    how many answers the official rule reads as E (the "not in the image" option) and as no letter."""
    out = {}
    for name, recs in by_dataset(records):
        rows, chose_e, no_letter = [], 0, 0
        for r in recs:
            meta = r.get("meta") or {}
            pred = preds.get(r["id"]) or ""
            letter = mme_letter(pred, meta.get("choices") or [])
            chose_e += letter == "E"
            no_letter += letter == ""
            gt = ground_truth(r)
            rows.append({"group": str(meta.get("type", "untyped")), "official": letter == gt,
                         "rscovlm": contain_match(pred, gt)})
        res = {"n": len(rows), "missing": sum(r["id"] not in preds for r in recs), "chose_E": chose_e,
               "no_letter": no_letter}
        for rule in ("rscovlm", "official"):
            res[rule] = {"overall": _rate(sum(x[rule] for x in rows), len(rows)), "categories": _acc_table(rows, rule)}
        res["cut"], res["cut_unknown"] = count_cut(recs, preds, cut)
        out[name] = res
    return out


def zoom_stats(records, zoom):
    """The chain's statistics per dataset from the prediction lines' "zoom" (model.zoom_chain): records run through
    it, tool replies per record, calls by outcome (cropped, malformed, outside, empty), calls past the round cap,
    crop sizes in original pixels, and for LRS-VQA's benchmark lines how many crops hold the centre of the
    question's object (meta.evidence_hbox)."""
    out = {}
    for name, recs in by_dataset([r for r in records if r["id"] in zoom]):
        rounds, outcomes, sizes, over_cap, hits, with_evidence = Counter(), Counter(), [], 0, 0, 0
        for r in recs:
            z = zoom[r["id"]]
            rounds[len(z.get("calls", []))] += 1
            over_cap += bool(z.get("over_cap"))
            ev = (r.get("meta") or {}).get("evidence_hbox")
            for c in z.get("calls", []):
                outcomes[c.get("problem") or "cropped"] += 1
                if c.get("crop"):
                    sizes.append(c["size"])
                    if ev:
                        with_evidence += 1
                        cx, cy = (ev[0] + ev[2]) / 2, (ev[1] + ev[3]) / 2
                        x1, y1, x2, y2 = c["crop"]
                        hits += x1 <= cx <= x2 and y1 <= cy <= y2
        res = {"records": len(recs), "rounds": {str(k): v for k, v in sorted(rounds.items())},
               "calls": dict(sorted(outcomes.items())), "over_cap": over_cap}
        if sizes:
            ws, hs = sorted(s[0] for s in sizes), sorted(s[1] for s in sizes)
            res["crop_size"] = {"n": len(sizes), "median_w": ws[len(ws) // 2], "median_h": hs[len(hs) // 2],
                                "min": [min(ws), min(hs)], "max": [max(ws), max(hs)]}
        if with_evidence:
            res["crops_on_evidence"] = {"n": with_evidence, "rate": _rate(hits, with_evidence)}
        out[name] = res
    return out


def format_large_image(metrics):
    """Table lines of the LRS-VQA, MME-RealWorld, XLRS-Bench and zoom sections."""
    lines = []
    for name, res in metrics.get("lrs_vqa", {}).items():
        lines.append(f"\n[lrs-vqa] {name}  n={res['n']} missing={res['missing']} cut={res['cut']}  synonyms: "
                     f"{res['wordnet'] if res['synonyms'] else 'OFF (' + res['wordnet'] + ')'}")
        lines.append(f"{'task':<24}{'rscovlm':>9}{'official':>9}{'contain':>9}")
        rules = [res[k] for k in ("rscovlm", "official", "contain")]
        for t in res["rscovlm"]["tasks"]:
            lines.append(f"{t:<24}" + "".join(f" {_f(r['tasks'][t])} " for r in rules))
        for s in res["rscovlm"]["sources"]:
            lines.append(f"{'source ' + s:<24}" + "".join(f" {_f(r['sources'][s]['overall'])} " for r in rules)
                         + "  average " + " / ".join(_f(r["sources"][s]["average"]).strip() for r in rules))
        lines.append(f"{'average (tasks)':<24}" + "".join(f" {_f(r['average'])} " for r in rules))
        lines.append(f"{'overall':<24}" + "".join(f" {_f(r['overall'])} " for r in rules))
    for name, res in metrics.get("mme_realworld", {}).items():
        lines.append(f"\n[mme-realworld] {name}  n={res['n']} missing={res['missing']} cut={res['cut']} "
                     f"chose_E={res['chose_E']} no_letter={res['no_letter']}")
        lines.append(f"{'category':<20}{'rscovlm':>9}{'official':>9}")
        for c in res["rscovlm"]["categories"]:
            lines.append(f"{c:<20} {_f(res['rscovlm']['categories'][c])}  {_f(res['official']['categories'][c])}")
        lines.append(f"{'overall':<20} {_f(res['rscovlm']['overall'])}  {_f(res['official']['overall'])}")
    lines += format_xlrs(metrics)
    for name, z in metrics.get("zoom", {}).items():
        lines.append(f"\n[zoom] {name}: {z['records']} records, tool replies per record {z['rounds']}, calls "
                     f"{z['calls'] or 'none'}, calls past the round cap {z['over_cap']}")
        if "crop_size" in z:
            c = z["crop_size"]
            lines.append(f"  crops (original px): median {c['median_w']}x{c['median_h']}, smallest {c['min']}, "
                         f"largest {c['max']}")
        if "crops_on_evidence" in z:
            lines.append(f"  crops holding the question's object centre: {100 * z['crops_on_evidence']['rate']:.1f}% of "
                         f"{z['crops_on_evidence']['n']}")
    return lines


# -----------------------------------------------------------------------------
# XLRS-Bench (bench_prep.py xlrs-bench), its official rule: lmms-eval's lmms_eval/tasks/xlrs/mcq_utils.py (the
# scorer XLRS-Bench's README points to). RSCoVLM does not evaluate it.

XLRS_SUBTASKS = ("Complex reasoning/Anomaly Detection and Interpretation",
                 "Complex reasoning/Environmental condition reasoning", "Complex reasoning/Route planning",
                 "Counting/Counting with changing detection", "Counting/Counting with complex reasoning",
                 "Counting/Overall counting", "Counting/Regional counting",
                 "Land use classification/Overall Land use classification",
                 "Land use classification/Regional Land use classification", "Object properties/Object classification",
                 "Object properties/Object color", "Object properties/Object motion state",
                 "Object spatial relationship/Object spatial relationship")
XLRS_PREFIXES = MME_PREFIXES
XLRS_RULE = ("XLRS-Bench official (lmms-eval tasks/xlrs/mcq_utils.py): prefixes removed as MME-RealWorld's list; no "
             "capital A-E: no answer; else the letters in '(X)', else every a-e letter (either case) of the answer, "
             "as a set: correct when it equals the set of the GT's characters; micro = correct / all; macro = mean "
             "over its 13 subtasks, one absent from the data counting 0 (subtasks_present says how many are there)")


def xlrs_letters(text):
    """The official extraction: the set of option letters an answer names, as upper-case text (order-free)."""
    s = text.strip()
    for prefix in XLRS_PREFIXES:
        s = s.replace(prefix, "")
    if not re.search("[ABCDE]", s):
        return ""
    found = re.findall(r"\(([a-eA-E])\)", s) or re.findall(r"(?:^|\s)?([a-eA-E])(?:$|[\s,.])?", s)
    return "".join(sorted({c.upper() for c in found}))


def score_xlrs(records, preds, cut):
    """Per dataset: official micro and macro accuracy, per task and per subtask."""
    out = {}
    for name, recs in by_dataset(records):
        rows = []
        for r in recs:
            meta = r.get("meta") or {}
            ok = set(xlrs_letters(preds.get(r["id"]) or "")) == set(ground_truth(r))
            rows.append({"group": f"{meta.get('task')}/{meta.get('type')}", "task": str(meta.get("task")), "official": ok})
        subtasks = _acc_table(rows, "official")
        tasks = _acc_table([{"group": x["task"], "official": x["official"]} for x in rows], "official")
        res = {"n": len(rows), "missing": sum(r["id"] not in preds for r in recs),
               "official": {"micro": _rate(sum(x["official"] for x in rows), len(rows)),
                            "macro": sum(subtasks.get(s, 0.0) for s in XLRS_SUBTASKS) / len(XLRS_SUBTASKS),
                            "tasks": tasks, "subtasks": subtasks},
               "subtasks_present": sum(s in subtasks for s in XLRS_SUBTASKS)}
        res["cut"], res["cut_unknown"] = count_cut(recs, preds, cut)
        out[name] = res
    return out


def format_xlrs(metrics):
    lines = []
    for name, res in metrics.get("xlrs_bench", {}).items():
        o = res["official"]
        lines.append(f"\n[xlrs-bench] {name}  n={res['n']} missing={res['missing']} cut={res['cut']}  micro "
                     f"{_f(o['micro'])}  macro {_f(o['macro'])} ({res['subtasks_present']} of 13 subtasks present)")
        lines += [f"  {s:<70} {_f(v)}" for s, v in o["subtasks"].items()]
    return lines


# -----------------------------------------------------------------------------
# Benchmarks of bench_prep.py geochat / vrsbench / vhm (meta["benchmark"]). GeoChat-Bench and VRSBench questions
# and classes are scored by score_vqa / score_cls like any others; their records name RSCoVLM's contain rule in
# meta["headline_rule"], so their headline is the contain accuracy. VHM's parts get VHM's own measures under two
# rules: "official" (VHM's RSEvalKit, fitzpchao/RSEvalKit model_eval_mp.py, the scorer VHM's README points to)
# and "rscovlm" (RSCoVLM's rscovlm/eval/metric/vhm_bench.py), the headline.

VHM_RULES = {
    "counting": "both rules: MAE and MAPE (a fraction) of the answer's first whole number (else a number word 0..99) against "
                "the GT count; answers without a number are left out and counted (pred_not_numeric; both scripts "
                "stop there), and MAPE leaves out GT 0 (gt_zero; a division by 0 there)",
    "choice": "imgtype, abspos, relpos multiple choice: the first capital A-E of the answer, lower-cased, occurs in "
              "the lower-cased GT (official on the raw answer, rscovlm after strip and strip('.'): the same letter); "
              "'Answer: B' reads A, 'Both' reads B; no capital A-E is wrong (the official script stops there)",
    "presence": "rscovlm: answer lower-cased, stripped (and of '.'); yes if it contains 'yes' or 'true' and not 'no' "
                "or 'false', no for the reverse, else unknown; official: 'yes' in the lower-cased answer, but 'no' / "
                "'false' in the raw answer (case-sensitive: 'No.' and 'Not' read as unknown); equal to the GT "
                "(lower-cased) is correct. Substrings both ways ('no' in 'snow')",
    "color": "mean over questions of the fraction of the GT's comma-separated colours found in the answer (lower "
             "case, spaces removed; rscovlm also strips '.' from both, so a GT ending in '.' matches there only)",
}
VHM_CHOICE = ("imgtype", "abspos", "relpos")
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
               "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
COUNT_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def vhm_count(text):
    """The first whole number ("12 planes" -> 12), else the first number word 0..99 ("twenty-one" -> 21), else None."""
    m = re.search(r"\d+", text)
    if m:
        return int(m.group())
    toks = re.findall(r"[a-z]+", text.lower())
    for i, t in enumerate(toks):
        if t in COUNT_TENS:
            unit = toks[i + 1] if i + 1 < len(toks) and toks[i + 1] in COUNT_WORDS[1:10] else "zero"
            return 20 + 10 * COUNT_TENS.index(t) + COUNT_WORDS.index(unit)
        if t in COUNT_WORDS:
            return COUNT_WORDS.index(t)
    return None


def vhm_choice(pred, gt, rule):
    """Multiple choice, both rules: the first capital A-E (rscovlm after strip / strip('.')), lower-cased, is in
    the lower-cased GT; no letter: wrong."""
    p = pred.strip().strip(".") if rule == "rscovlm" else pred
    letter = next((c for c in p if c in "ABCDE"), None)
    return letter is not None and letter.lower() in gt.lower().strip().strip(".")


def vhm_presence(pred, gt, rule):
    """yes / no / unknown read from the answer under a rule (VHM_RULES["presence"]), compared with the GT."""
    if rule == "rscovlm":
        p = pred.lower().strip().strip(".")
        yes, no = "yes" in p or "true" in p, "no" in p or "false" in p
    else:
        yes, no = "yes" in pred.lower(), "no" in pred or "false" in pred
    said = "yes" if yes and not no else "no" if no and not yes else "unknown"
    return said == (gt.lower().strip().strip(".") if rule == "rscovlm" else gt.lower())


def vhm_color(pred, gt, rule):
    """The fraction of the GT's colours found in the answer."""
    clean = (lambda s: s.lower().strip().strip(".").replace(" ", "")) if rule == "rscovlm" else \
        (lambda s: s.replace(" ", "").lower())
    colours = clean(gt).split(",")
    return sum(c in clean(pred) for c in colours) / len(colours)


def vhm_counting(recs, preds):
    """MAE / MAPE of a VHM counting part (one rule: both scripts parse the number alike)."""
    errs, apes, not_numeric, gt_zero = [], [], 0, 0
    for r in recs:
        gt, p = vhm_count(ground_truth(r)), vhm_count(preds.get(r["id"]) or "")
        if gt is None:
            raise UserError(f"{record_where(r)}: VHM counting record's answer {ground_truth(r)!r} is not a number")
        if p is None:
            not_numeric += 1
            continue
        errs.append(abs(p - gt))
        if gt:
            apes.append(abs(p - gt) / gt)
        gt_zero += gt == 0
    return {"MAE": sum(errs) / len(errs) if errs else None, "MAPE": _rate(sum(apes), len(apes)), "numeric": len(errs),
            "pred_not_numeric": not_numeric, "gt_zero": gt_zero}


def score_vhm(records, preds):
    """Per dataset (one VHM part each, meta["vhm_part"]): counting MAE/MAPE, else accuracy (a fraction) under the
    official and rscovlm rules ("accuracy" = rscovlm's, the headline)."""
    score = {"presence": vhm_presence, "color": vhm_color, **{p: vhm_choice for p in VHM_CHOICE}}
    out = {}
    for name, recs in by_dataset(records):
        part = recs[0]["meta"]["vhm_part"]
        res = {"part": part, "n": len(recs), "missing": sum(r["id"] not in preds for r in recs)}
        if part == "counting":
            res.update(vhm_counting(recs, preds))
        else:
            for rule in ("rscovlm", "official"):
                res[rule] = _rate(sum(score[part](preds.get(r["id"]) or "", ground_truth(r), rule) for r in recs),
                                 len(recs))
            res["accuracy"] = res["rscovlm"]
        out[name] = res
    return out


def add_benchmark_scores(metrics, records, preds):
    """metrics["vhm"] (score_vhm of the VHM records) and metrics["headline_rules"] ({task/dataset: rule} that
    the records name in meta["headline_rule"]), both read by benchmark_headline."""
    vhm = [r for r in records if r["task"] == "vqa" and (r.get("meta") or {}).get("benchmark") == "vhm"]
    if vhm:
        metrics["vhm"] = score_vhm(vhm, preds)
        metrics["rules"] = {**metrics["rules"], "vhm": VHM_RULES}
    rules = {f"{r['task']}/{r['dataset']}": r["meta"]["headline_rule"] for r in records
             if r["task"] in ("vqa", "cls") and (r.get("meta") or {}).get("headline_rule") == "contain"}
    if rules:
        metrics["headline_rules"] = rules


# The vqa benchmarks scored by their own rules (their own metrics.json sections): the headline metric and its rule
# (RSCoVLM's where it has one)
BENCHMARK_HEADLINES = {"lrs_vqa": ("average", "rscovlm"), "mme_realworld": ("overall", "rscovlm"),
                       "xlrs_bench": ("micro", "official")}


def benchmark_headline(metrics, heads):
    """heads with the benchmarks' own numbers: contain accuracy where the records name it (GeoChat-Bench,
    VRSBench), VHM's MAE / MAPE / accuracy instead of the exact-rule OA."""
    for key in metrics.get("headline_rules", {}):
        task, ds = key.split("/", 1)
        res = metrics.get(task, {}).get(ds)
        if res is not None:
            label = "OA" if task == "vqa" else "accuracy"
            heads.pop(f"{key}: {label}", None)
            heads[f"{key}: {label} (contain)"] = res["contain"]["OA"] if task == "vqa" else res["contain"]
    for ds, res in metrics.get("vhm", {}).items():
        heads.pop(f"vqa/{ds}: OA", None)
        if res["part"] == "counting":
            heads[f"vqa/{ds}: MAE"], heads[f"vqa/{ds}: MAPE"] = res["MAE"], res["MAPE"]
        else:
            heads[f"vqa/{ds}: accuracy (rscovlm)"] = res["rscovlm"]
    for section, (label, rule) in BENCHMARK_HEADLINES.items():
        for ds, res in metrics.get(section, {}).items():  # RSCoVLM's rule where it has one
            heads[f"{section}/{ds}: {label} ({rule})"] = res[rule][label]
    return heads


def format_vhm(metrics):
    lines = []
    for name, res in metrics.get("vhm", {}).items():
        if res["part"] == "counting":
            mae = "-" if res["MAE"] is None else f"{res['MAE']:.3f}"
            lines.append(f"\n[vhm] {name}  n={res['n']} missing={res['missing']}  MAE {mae}  MAPE "
                         f"{_f(res['MAPE'])}%  (numeric {res['numeric']}, no number {res['pred_not_numeric']})")
        else:
            lines.append(f"\n[vhm] {name}  n={res['n']} missing={res['missing']}  accuracy rscovlm "
                         f"{_f(res['rscovlm'])}  official {_f(res['official'])}")
    return lines


# -----------------------------------------------------------------------------
# scoring a whole file


def evaluate(records, preds, meteor=True, all_records=None, cut=None, zoom=None):
    """metrics dict (without args) for the vqa / cls / caption records and {id: text}. all_records (the
    whole data file, default records) is what unknown prediction ids and skipped records are counted against.
    cut: {id: True/False/None} from the prediction lines (count_cut); None = no line says. zoom: {id: the line's
    "zoom"} (zoom_stats). vqa records of LRS-VQA, MME-RealWorld and XLRS-Bench (meta.benchmark) are scored by their
    own rules, in "lrs_vqa", "mme_realworld" and "xlrs_bench"."""
    all_records = records if all_records is None else all_records
    by_task, bench = defaultdict(list), defaultdict(list)
    for r in records:
        b = (r.get("meta") or {}).get("benchmark") if r["task"] == "vqa" else None
        (bench[b] if b in BENCHMARK_HEADLINES else by_task[r["task"]]).append(r)
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
    for name, score, rules in (("lrs_vqa", score_lrs_vqa, LRS_RULES), ("mme_realworld", score_mme, MME_RULES),
                               ("xlrs_bench", score_xlrs, {"official": XLRS_RULE})):
        if bench[name]:
            metrics[name] = score(bench[name], preds, cut or {})
            metrics["rules"] = {**metrics["rules"], name: rules}
    if zoom:
        metrics["zoom"] = zoom_stats(records, zoom)
        metrics["rules"] = {**metrics["rules"], "zoom": ZOOM_RULE}
    add_benchmark_scores(metrics, records, preds)  # VHM parts; GeoChat-Bench / VRSBench headline rule
    return metrics


def headline(metrics):
    """The one number per task and dataset that a curve or a paper table shows: VQA overall accuracy (exact
    rule), classification accuracy (exact), caption CIDEr-D; the benchmarks' own (benchmark_headline)."""
    heads = {"vqa": ("OA", lambda r: r["exact"]["OA"]), "cls": ("accuracy", lambda r: r["exact"]),
             "caption": ("CIDEr-D", lambda r: r["CIDEr-D"])}
    return benchmark_headline(metrics, {f"{task}/{name}: {label}": get(res) for task, (label, get) in heads.items()
                                        for name, res in metrics.get(task, {}).items()})


def _f(x):
    """A fraction as a percent column ("  75.00"); "-" when there is none (METEOR skipped, no record)."""
    return f"{100 * x:7.2f}" if isinstance(x, (int, float)) else f"{'-':>7}"


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
    lines += format_large_image(metrics)
    lines += format_vhm(metrics)
    lines.append(f"\nexact = {RULES['exact']}\ncontain = {RULES['contain']}\ncut = {RULES['cut']}")
    for k in ("lrs_vqa", "mme_realworld", "xlrs_bench", "zoom"):
        rule = metrics["rules"].get(k)
        lines += [] if rule is None else [f"{k} = {rule}"] if isinstance(rule, str) else \
            [f"{k} {name} = {text}" for name, text in rule.items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# CLI


def get_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ckpt", help="checkpoint folder: generate answers for the records of --data, then score")
    mode.add_argument("--preds", help="predictions JSONL (lines with 'id' and 'text') to score against --data")
    p.add_argument("--data", required=True, help="records JSONL with vqa / cls / caption records (others are skipped)")
    p.add_argument("--out", help="output folder: predictions.jsonl (with --ckpt), metrics.json, PNGs")
    p.add_argument("--json-out", help="metrics file (default: OUT/metrics.json when --out is given)")
    p.add_argument("--tasks", default="vqa,cls,caption", help="comma list of the tasks to evaluate (default %(default)s)")
    p.add_argument("--limit", type=positive_int, help="only the first N records of those tasks (quick checks)")
    add_generation_flags(p, 128, "short answers and captions need ~10-60 tokens; a verbose answer cut at auto's "
                                 "tighter limit could lose the word that scores")
    p.add_argument("--max-zoom-rounds", type=int, default=1, help="zoom records: image_zoom_in replies before the answer "
                                                                   "counts (default %(default)s, as trained; 0 = whole image)")
    add_model_flags(p)
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the ~5 s Java start)")
    p.add_argument("--vis", action="store_true", help="write a confusion-matrix PNG per classification dataset")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.ckpt and not args.out:
        p.error("--ckpt needs --out (where predictions.jsonl is written and resumed from)")
    if args.max_zoom_rounds < 0:
        p.error("argument --max-zoom-rounds: give a number >= 0")
    if args.vis and not (args.out or args.json_out):
        p.error("--vis needs --out or --json-out (the PNGs go next to the metrics)")
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        p.error(f"argument --tasks: unknown {sorted(unknown)}; choose from {','.join(TASKS)}")
    return args


def check_paths(args):
    """Path flags checked before anything is read or loaded, each failure one line naming the flag and the
    path (read_records does the same for --data)."""
    check_path("--preds", args.preds, "file")
    if args.ckpt:
        check_checkpoint("--ckpt", args.ckpt)
    check_output_paths(args.out, args.json_out)


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
        raise UserError(f"{args.data} has no {'/'.join(tasks)} records to score (it has {listed}): {hint}")
    if args.limit:
        selected = selected[:args.limit]
    for r in selected:
        ground_truth(r)
    return selected


def main(argv=None):
    return run_eval(run, get_args(argv))


def run(args, loaded=None):
    """One evaluation (--ckpt or --preds); the metrics dict, also written to OUT/metrics.json (None on the ranks
    other than 0 under torchrun). loaded: (model, processor) already loaded for --ckpt with these settings
    (eval_suite.py loads a checkpoint once for all its benchmarks)."""
    check_paths(args)
    t0 = time.time()
    tasks = [t for t in TASKS if t in args.tasks.split(",")]

    # ---- records and predictions: generate (resumable, sharded under torchrun) or read a file
    records = read_records(args.data)
    selected = select_records(args, records, tasks)
    if args.ckpt:
        import model

        pred_path, lines, generation = predict_for_eval(args, selected, loaded, max_zoom_rounds=args.max_zoom_rounds)
        if any(map(model.is_zoom, selected)):
            generation["max_zoom_rounds"] = args.max_zoom_rounds
        if pred_path is None:  # not the main rank: rank 0 scores
            return None
    else:
        pred_path, lines, generation = args.preds, read_predictions(args.preds), generation_settings(args.preds)
    preds = {i: line["text"] for i, line in lines.items()}
    check_overlap(preds, selected, pred_path, args.data, args.limit)

    # ---- scoring
    metrics = evaluate(selected, preds, meteor=not args.no_meteor, all_records=records,
                       cut={i: line.get("cut") for i, line in lines.items()},
                       zoom={i: line["zoom"] for i, line in lines.items() if isinstance(line.get("zoom"), dict)})
    metrics["headline"] = headline(metrics)
    metrics["generation"] = generation
    metrics["args"] = dict(vars(args))
    metrics["seconds"] = round(time.time() - t0, 2)
    print0(format_tables(metrics))
    for section in ("vqa", "cls", "caption", "lrs_vqa", "mme_realworld"):
        for name, res in metrics.get(section, {}).items():
            warn_cut(f"{section}/{name}", res["cut"], res["n"] - res["missing"], generation)

    # ---- outputs
    json_out = write_metrics(metrics, args)
    if json_out is not None and args.vis:
        for name, res in metrics.get("cls", {}).items():
            png = json_out.parent / f"confusion_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
            plot_confusion(res, name, png)
            print0(f"wrote {png}")
    return metrics


if __name__ == "__main__":
    run_cli(main)  # a UserError: one line "error: ..." on stderr, exit 2
