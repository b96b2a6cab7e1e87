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
  RSVQA bucketed answers (LR counts "0 | between 1 and 10 | ... | more than 1000", HR areas in m2) are
  compared by bucket: "34" is exact-correct for "between 11 and 100".
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
                    predict_for_eval, print0, read_predictions, read_records, record_where, run_cli, run_eval,
                    warn_cut, write_metrics)

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
# Large-image benchmarks (data_prep.py lrs-vqa / mme-realworld; meta["benchmark"]) and the zoom-in chain
#
# LRS-VQA, RSCoVLM's rule (rscovlm/eval/metric/large_image_bench.py, as the LRS-VQA authors' script): GT and
# prediction lower-cased, stripped of spaces and '.'; correct when equal, or when some WordNet synset of one has
# path similarity > 0.8 with some synset of the other (NLTK's WordNet 3.0). Accuracy per task (category) and per
# source (FAIR, STAR, GLH: the question id's prefix), overall (all correct / all) and "average" (the mean of the
# per-task accuracies; per source, the mean over that source's tasks). Without a WordNet the rule is the equality
# alone, named "exact", and the metrics' rules say so. MME-RealWorld: the official letter rule
# (evaluation/eval_your_results.py), below; RSCoVLM itself scores it with "contain", reported beside it.

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


def lrs_clean(text):
    """RSCoVLM's normalisation for LRS-VQA: lower-case, strip spaces, then '.'."""
    return text.lower().strip().strip(".")


def wordnet_synonyms(a, b, wn):
    """RSCoVLM's are_synonyms: some synset pair of the two words with path similarity > 0.8."""
    for s1 in wn.synsets(a):
        for s2 in wn.synsets(b):
            sim = s1.path_similarity(s2)
            if sim is not None and sim > 0.8:
                return True
    return False


def lrs_match(pred, gt, wn=None):
    """LRS-VQA correctness: equal after lrs_clean, or (with a WordNet) WordNet synonyms."""
    p, g = lrs_clean(pred), lrs_clean(gt)
    return p == g or (wn is not None and bool(p) and wordnet_synonyms(g, p, wn))


def _acc_table(rows, key):
    """{group: accuracy %} of rows (group, correct) for one rule."""
    n, ok = Counter(), Counter()
    for r in rows:
        n[r["group"]] += 1
        ok[r["group"]] += r[key]
    return {g: _rate(ok[g], n[g]) for g in sorted(n)}


def score_lrs_vqa(records, preds, cut):
    """Per dataset: accuracy per task, per source and per (source, task), overall and average, under the main rule
    (wordnet, or exact without a WordNet) and contain."""
    wn, where = load_wordnet()
    main = "wordnet" if wn is not None else "exact"
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    out = {}
    for name, recs in sorted(by_dataset.items()):
        rows = []
        for r in recs:
            meta = r.get("meta") or {}
            pred, gt = preds.get(r["id"]), ground_truth(r)
            src = str(meta.get("source") or str(meta.get("question_id", r["id"])).split("_")[0])
            rows.append({"task": str(meta.get("type", "untyped")), "source": src, "missing": pred is None,
                         main: lrs_match(pred or "", gt, wn), "contain": contain_match(pred or "", lrs_clean(gt))})
        res = {"n": len(rows), "missing": sum(x["missing"] for x in rows), "rule": main, "wordnet": where}
        for rule in (main, "contain"):
            tasks = _acc_table([{"group": x["task"], rule: x[rule]} for x in rows], rule)
            sources = _acc_table([{"group": x["source"], rule: x[rule]} for x in rows], rule)
            per_source = {}
            for s in sources:
                st = _acc_table([{"group": x["task"], rule: x[rule]} for x in rows if x["source"] == s], rule)
                per_source[s] = {"overall": sources[s], "average": sum(st.values()) / len(st), "tasks": st}
            res[rule] = {"overall": _rate(sum(x[rule] for x in rows), len(rows)),
                         "average": sum(tasks.values()) / len(tasks), "tasks": tasks, "sources": per_source}
        res["cut"], res["cut_unknown"] = count_cut(recs, preds, cut)
        out[name] = res
    return out


MME_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
                "The best option isThe correct option is", "Best answer:Best option:"]
_LRS_COMMON = ("GT and prediction lower-cased, stripped of spaces and '.'; accuracy per task (category), per source "
               "(FAIR/STAR/GLH, the question id's prefix) and overall (correct / all); 'average' = mean of the per-task "
               "accuracies (per source: over that source's tasks); contain = the cleaned GT is a substring of the "
               "cleaned prediction")
LRS_RULES = {
    "wordnet": "LRS-VQA, RSCoVLM's rule: correct when equal, or when a WordNet 3.0 synset of the GT and one of the "
               "prediction have path similarity > 0.8 (NLTK's reader); " + _LRS_COMMON,
    "exact": "LRS-VQA WITHOUT WordNet (no WordNet found: pip install nltk, then nltk.download('wordnet')): correct "
             "only when equal, so it can score below RSCoVLM's rule, which also accepts WordNet synonyms; " + _LRS_COMMON,
}
MME_RULE = ("MME-RealWorld letter rule (official extract_characters_regex, its quirks kept: 'Best answer:' and 'The "
            "best option is' are not stripped; > 10 words without a capital A-E is no answer; else the first capital "
            "A-E; else the choice containing the answer), except that an empty answer is no answer; contain = "
            "RSCoVLM's rule (GT letter, lower-cased, in the lower-cased answer)")
ZOOM_RULE = ("zoom: per record the tool replies it got (rounds), each call cropped or answered with the whole image as "
             "malformed (no valid image_zoom_in JSON), outside (no pixel of the image) or empty (no area); over_cap = "
             "answers that were still a tool call when --max-zoom-rounds was reached (scored as written); crop sizes in "
             "original pixels; crops_on_evidence = crops holding the centre of the question's object (LRS-VQA hbox)")


def mme_letter(text, choices):
    """MME-RealWorld's official answer extraction (extract_characters_regex), quirks included for comparable
    numbers: its prefix list lacks two commas, so "The best option is", "The correct option is", "Best answer:"
    and "Best option:" are not removed (the capital B of "Best answer: C" is read as the answer B); more than ten
    words without a capital A-E is no answer; else the first capital A-E anywhere; else the letter of the first
    choice whose text contains the whole answer. One deviation: an empty answer is no answer (the official
    code gives it the first choice's letter, since '' is in every string)."""
    s = text.strip()
    if not s:
        return ""
    for prefix in MME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    m = re.search(r"[ABCDE]", s)
    if m is None:
        return next((c[1] for c in choices if s.lower() in c.lower()), "")
    return m[0]


def score_mme(records, preds, cut):
    """Per dataset: accuracy per category and overall under the letter rule and RSCoVLM's contain rule; how many
    answers chose E (the "not in the image" option) and how many gave no letter."""
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    out = {}
    for name, recs in sorted(by_dataset.items()):
        rows, chose_e, no_letter = [], 0, 0
        for r in recs:
            meta = r.get("meta") or {}
            pred = preds.get(r["id"]) or ""
            letter = mme_letter(pred, meta.get("choices") or [])
            chose_e += letter == "E"
            no_letter += letter == ""
            gt = ground_truth(r)
            rows.append({"group": str(meta.get("type", "untyped")), "letter": letter == gt,
                         "contain": contain_match(pred, gt)})
        res = {"n": len(rows), "missing": sum(r["id"] not in preds for r in recs), "chose_E": chose_e,
               "no_letter": no_letter}
        for rule in ("letter", "contain"):
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
    """Table lines of the LRS-VQA, MME-RealWorld and zoom sections."""
    lines = []
    for name, res in metrics.get("lrs_vqa", {}).items():
        main = res["rule"]
        lines.append(f"\n[lrs-vqa] {name}  n={res['n']} missing={res['missing']} cut={res['cut']}  rule={main} "
                     f"(lrs_vqa below)")
        lines.append(f"{'task':<20}{main:>9}{'contain':>9}")
        for t in res[main]["tasks"]:
            lines.append(f"{t:<20} {_f(res[main]['tasks'][t])}  {_f(res['contain']['tasks'][t])}")
        for s in res[main]["sources"]:
            lines.append(f"{'source ' + s:<20} {_f(res[main]['sources'][s]['overall'])}  "
                         f"{_f(res['contain']['sources'][s]['overall'])}   average over tasks "
                         f"{_f(res[main]['sources'][s]['average'])}")
        lines.append(f"{'average (tasks)':<20} {_f(res[main]['average'])}  {_f(res['contain']['average'])}")
        lines.append(f"{'overall':<20} {_f(res[main]['overall'])}  {_f(res['contain']['overall'])}")
    for name, res in metrics.get("mme_realworld", {}).items():
        lines.append(f"\n[mme-realworld] {name}  n={res['n']} missing={res['missing']} cut={res['cut']} "
                     f"chose_E={res['chose_E']} no_letter={res['no_letter']}")
        lines.append(f"{'category':<20}{'letter':>9}{'contain':>9}")
        for c in res["letter"]["categories"]:
            lines.append(f"{c:<20} {_f(res['letter']['categories'][c])}  {_f(res['contain']['categories'][c])}")
        lines.append(f"{'overall':<20} {_f(res['letter']['overall'])}  {_f(res['contain']['overall'])}")
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
# Benchmarks of data_prep.py geochat / vrsbench / vhm (meta["benchmark"]). GeoChat-Bench and VRSBench questions
# and classes are scored by score_vqa / score_cls like any others; their records name RSCoVLM's contain rule in
# meta["headline_rule"], so their headline is the contain accuracy. VHM's parts get VHM's own measures (as
# RSCoVLM's rscovlm/eval/metric/vhm_bench.py computes them, deviations named in VHM_RULES).

VHM_RULES = {
    "counting": "MAE and MAPE (a fraction) of the answer's first whole number (else a number word 0..99) against the GT "
                "count; answers without a number are left out and counted (pred_not_numeric; RSCoVLM's code stops "
                "there), and MAPE leaves out GT 0 (gt_zero; a division by 0 there)",
    "choice": "imgtype, abspos, relpos multiple choice: the answer's letter (a leading A-E, else the first capital "
              "A-E standing alone) equals the GT's (RSCoVLM takes the first capital A-E anywhere, so 'Answer: B' "
              "reads A, and accepts it when the letter occurs anywhere in the GT text)",
    "presence": "yes/no: the answer has the word yes or true and not no or false (then yes), or the reverse (then "
                "no); both or neither is wrong. Words, not RSCoVLM's substrings ('no' in 'north', 'snow')",
    "color": "mean over questions of the fraction of the GT's comma-separated colours found in the answer (lower "
             "case, spaces removed) (RSCoVLM's rule)",
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


def vhm_letter(text):
    """A multiple-choice answer's letter: a leading A-E ("B", "(C) ...", "D. ..."), else the first capital A-E that
    stands alone ("The answer is C"), else None."""
    m = re.match(r"\s*\(?([A-E])(?![A-Za-z])", text) or re.search(r"(?<![A-Za-z])([A-E])(?![A-Za-z])", text)
    return m.group(1) if m else None


def vhm_yes_no(text):
    words = set(re.findall(r"[a-z]+", text.lower()))
    yes, no = bool(words & {"yes", "true"}), bool(words & {"no", "false"})
    return "yes" if yes and not no else "no" if no and not yes else None


def score_vhm(records, preds):
    """Per dataset (one VHM part each, meta["vhm_part"]): counting MAE/MAPE, else accuracy in percent (VHM_RULES)."""
    by_dataset = defaultdict(list)
    for r in records:
        by_dataset[r["dataset"]].append(r)
    out = {}
    for name, recs in sorted(by_dataset.items()):
        part = recs[0]["meta"]["vhm_part"]
        res = {"part": part, "n": len(recs), "missing": sum(r["id"] not in preds for r in recs)}
        if part == "counting":
            errs, apes, not_numeric, gt_zero = [], [], 0, 0
            for r in recs:
                gt, p = vhm_count(ground_truth(r)), vhm_count(preds.get(r["id"]) or "")
                if gt is None:
                    raise UserError(f"{record_where(r)}: VHM counting record's answer "
                                          f"{ground_truth(r)!r} is not a number")
                if p is None:
                    not_numeric += 1
                    continue
                errs.append(abs(p - gt))
                if gt:
                    apes.append(abs(p - gt) / gt)
                gt_zero += gt == 0
            res.update(MAE=sum(errs) / len(errs) if errs else None, MAPE=_rate(sum(apes), len(apes)),
                       numeric=len(errs), pred_not_numeric=not_numeric, gt_zero=gt_zero)
        else:
            scores = []
            for r in recs:
                gt, p = ground_truth(r), preds.get(r["id"]) or ""
                if part in VHM_CHOICE:
                    scores.append(vhm_letter(p) is not None and vhm_letter(p) == vhm_letter(gt.upper()))
                elif part == "presence":
                    scores.append(vhm_yes_no(p) is not None and vhm_yes_no(p) == gt.lower().strip().strip("."))
                else:  # color
                    colours = [c for c in gt.lower().replace(" ", "").strip(".").split(",") if c]
                    said = p.lower().replace(" ", "")
                    scores.append(sum(c in said for c in colours) / len(colours) if colours else 0.0)
            res["accuracy"] = _rate(sum(scores), len(scores))
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
            heads[f"vqa/{ds}: accuracy"] = res["accuracy"]
    return heads


def format_vhm(metrics):
    lines = []
    for name, res in metrics.get("vhm", {}).items():
        if res["part"] == "counting":
            mae = "-" if res["MAE"] is None else f"{res['MAE']:.3f}"
            lines.append(f"\n[vhm] {name}  n={res['n']} missing={res['missing']}  MAE {mae}  MAPE "
                         f"{_f(res['MAPE'])}%  (numeric {res['numeric']}, no number {res['pred_not_numeric']})")
        else:
            lines.append(f"\n[vhm] {name}  n={res['n']} missing={res['missing']}  accuracy {_f(res['accuracy'])}")
    return lines


# -----------------------------------------------------------------------------
# scoring a whole file


def evaluate(records, preds, meteor=True, all_records=None, cut=None, zoom=None):
    """metrics dict (without args) for the vqa / cls / caption records and {id: text}. all_records (the
    whole data file, default records) is what unknown prediction ids and skipped records are counted against.
    cut: {id: True/False/None} from the prediction lines (count_cut); None = no line says. zoom: {id: the line's
    "zoom"} (zoom_stats). vqa records of LRS-VQA and MME-RealWorld (meta.benchmark) are scored by their own rules,
    in "lrs_vqa" and "mme_realworld"."""
    all_records = records if all_records is None else all_records
    by_task, bench = defaultdict(list), defaultdict(list)
    for r in records:
        b = (r.get("meta") or {}).get("benchmark") if r["task"] == "vqa" else None
        (bench[b] if b in ("lrs_vqa", "mme_realworld") else by_task[r["task"]]).append(r)
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
    if bench["lrs_vqa"]:
        metrics["lrs_vqa"] = score_lrs_vqa(bench["lrs_vqa"], preds, cut or {})
        rule = metrics["lrs_vqa"][min(metrics["lrs_vqa"])]["rule"]  # the same for every dataset: one WordNet
        metrics["rules"] = {**metrics["rules"], "lrs_vqa": f"{LRS_RULES[rule]}; WordNet: {load_wordnet()[1]}"}
    if bench["mme_realworld"]:
        metrics["mme_realworld"] = score_mme(bench["mme_realworld"], preds, cut or {})
        metrics["rules"] = {**metrics["rules"], "mme_realworld": MME_RULE}
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
    lines += [f"{k} = {metrics['rules'][k]}" for k in ("lrs_vqa", "mme_realworld", "zoom") if k in metrics["rules"]]
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
