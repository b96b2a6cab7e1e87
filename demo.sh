#!/usr/bin/env bash
# demo.sh — the whole rscovlm pipeline on the built-in default, on 2 CPU cores in about 10 minutes, with a
# model that learns to find objects (BENCHMARKS.md "CPU demo that localises": the table over three seeds):
#   tiny random-init Qwen3-VL (synth.py model) -> synthetic remote-sensing data (synth.py data: rich
#   scenes for VQA/captions/classification, plus a localisation level of one large object per image) ->
#   FSDP2 co-training of all five tasks on 2 CPU processes (launch.sh -> train.py), an export every quarter ->
#   every export scored in step order (eval_suite.py --watch), the untrained model at step 0 ->
#   one table: untrained vs trained per task, the grounding text prior beside Acc@0.5.
#
#   bash demo.sh                          # runs/demo, seed 0, 1400 steps
#   bash demo.sh SEED=1 OUT=runs/demo_s1  # another seed (model init, data, order)
#   bash demo.sh STEPS=200 OUT=/tmp/quick # a quick pass through every stage (it does not localise yet)
#
# Outputs in OUT: summary.json and summary.md (the table, and the seconds each stage took), curves.png (each
# task's headline metric against the step), pred_*.png (held-out images, ground truth green, prediction red),
# train/ (checkpoints, exports, loss.png), eval/ (per step: eval/step_N/BENCHMARK/eval_det|eval_vqa/).
# Re-running resumes each stage.
# Why this model and data localise when the old 64-wide demo did not: BENCHMARKS.md "CPU demo".
set -euo pipefail
for kv in "$@"; do export "$kv"; done
OUT=${OUT:-runs/demo}
SEED=${SEED:-0}
STEPS=${STEPS:-1400}
EVERY=$(( STEPS >= 4 ? STEPS / 4 : 1 ))  # an export (and a checkpoint) every quarter of the run
LOCATE=${LOCATE:-2000}; LOCATE_VAL=${LOCATE_VAL:-100}  # localisation level: training / held-out images
SCENES=${SCENES:-200}; SCENES_VAL=${SCENES_VAL:-50}     # rich scenes: training / held-out images
cd "$(dirname "${BASH_SOURCE[0]}")"
export OMP_NUM_THREADS=1  # one thread per process: two ranks x two threads on two cores run ~10x slower
start=$(date +%s)
mkdir -p "$OUT"; : > "$OUT/phases.tsv"
phase() { echo "$1	$(date +%s.%N)" >> "$OUT/phases.tsv"; }  # when each stage ended: the time table at the end
phase start

# ---- model: Qwen3-VL at toy size, in the shape that localises (32-wide heads, text RoPE base 1e4)
[[ -f "$OUT/tiny/config.json" ]] || python synth.py model "$OUT/tiny" --family qwen3 --seed "$SEED" \
    --hidden 128 --layers 4 --head-dim 32 --rope-theta 1e4 --vision-hidden 128 --vision-depth 2 --vision-head-dim 32 --vision-pos-std 0.5
phase model

# ---- data: rich scenes (1-4 objects: VQA, captions, classification) + the localisation level
python synth.py data --out "$OUT/data/scenes" --train "$SCENES" --val "$SCENES_VAL" --seed "$SEED"
python synth.py data --out "$OUT/data/locate" --train "$LOCATE" --val "$LOCATE_VAL" --seed "$SEED" \
    --objects 1,1 --object-size 64,96 --ground-expr class
phase data
lines() { [[ -f "$1" ]] && wc -l < "$1" || echo 0; }
steps_before=$(lines "$OUT/train/metrics.jsonl")  # a re-run resumes: the time table counts this run's part

# ---- co-training: grounding weighted up (~75% of samples), single-object detection, every scene task, and a
# quarter of the localisation level's scene labels (the rich scenes alone give classification ~200 samples)
bash launch.sh NPROC_PER_NODE=2 --model "$OUT/tiny" --out "$OUT/train" --seed "$SEED" \
    --data "$OUT/data/locate/synth_ground_train.jsonl*6,$OUT/data/locate/synth_det_train.jsonl,$OUT/data/locate/synth_cls_train.jsonl%25,$OUT/data/scenes/synth_all_train.jsonl" \
    --max-steps "$STEPS" --batch-size 4 --lr 2e-3 --warmup-ratio 0.05 --weight-decay 0.0 \
    --save-every "$EVERY" --export-every "$EVERY" --num-workers 1 --resume auto
phase training
scored_before=$(lines "$OUT/eval/metrics_by_step.jsonl")

# ---- score every checkpoint (step 0 = the untrained model) on the held-out images: detection and grounding on
# the localisation level, VQA, classification and captions on the rich scenes; one watcher for all five
python eval_suite.py --watch "$OUT/train" --bench "$OUT/data" --out "$OUT/eval" --watch-poll 1 \
    --only locate/synth_det_val locate/synth_ground_val scenes/synth_vqa_val scenes/synth_cls_val scenes/synth_caption_val \
    --prior "$OUT/data/locate/synth_ground_train.jsonl" --batch-size 25 --vis 3 --no-meteor
phase scoring

# ---- one table: untrained vs trained, summary.json
python - "$OUT" "$start" "$steps_before" "$scored_before" <<'PY'
import json, shutil, sys, time
from pathlib import Path

out, start, steps_before, scored_before = Path(sys.argv[1]), *map(int, sys.argv[2:])


def time_table(lines, steps_s):
    """[(stage, seconds, detail)] of this invocation of demo.sh: the stage ends it wrote to OUT/phases.tsv, the
    step times of the steps it trained (train/metrics.jsonl; the rest of that stage: start-up, checkpoints,
    exports) and the scoring time of each checkpoint it scored (eval/metrics_by_step.jsonl)."""
    ends = [(name, float(t)) for name, t in (x.split("\t") for x in (out / "phases.tsv").read_text().splitlines())]
    took = {name: t - t0 for (_, t0), (name, t) in zip(ends, ends[1:])}
    steps = (f"{len(steps_s)} steps at {sum(steps_s) / max(len(steps_s), 1):.2f} s = {sum(steps_s):.0f} s; the rest "
             f"(start-up, checkpoints, exports) {took['training'] - sum(steps_s):.0f} s")
    scored = ", ".join(f"step {line['step']} {line['seconds']:.0f} s" for line in lines if "seconds" in line)
    scored += f"; the rest (start-up) {took['scoring'] - sum(line.get('seconds', 0) for line in lines):.0f} s"
    rows = [("model (synth.py model)", took["model"], ""), ("data (synth.py data)", took["data"], ""),
            ("training (launch.sh -> train.py)", took["training"], steps),
            ("scoring (eval_suite.py --watch)", took["scoring"], scored),
            ("this table", time.time() - ends[-1][1], "")]
    return rows + [("total", time.time() - ends[0][1], "")]


by_step = sorted((json.loads(x) for x in (out / "eval" / "metrics_by_step.jsonl").read_text().splitlines()),
                 key=lambda line: line["step"])
shutil.copy(out / "eval" / "metrics_by_step.png", out / "curves.png")
final_step, final_dir = by_step[-1]["step"], out / "eval" / f"step_{by_step[-1]['step']}"
for png in sorted(final_dir.glob("locate/*/eval_det/vis/*.png")):
    shutil.copy(png, out / f"pred_{png.name}")


def table(line):
    """headline {"locate/synth_ground_val: ground/synth: Acc@0.5": 0.53, ...} -> {"ground": {"Acc@0.5": 53.0}, ...}:
    one dataset per task here, in the order det, ground, vqa, cls, caption; fractions x100."""
    out = {}
    for name, v in line["headline"].items():
        _, key, metric = name.split(": ")
        out.setdefault(key.split("/")[0], {})[metric] = 100 * v
    return {task: out[task] for task in ("det", "ground", "vqa", "cls", "caption") if task in out}


loss = [json.loads(x)["loss"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
ground = json.loads((final_dir / "locate" / "synth_ground_val" / "eval_det" / "metrics.json").read_text())["ground"]
summary = {"seconds": round(time.time() - start, 1), "steps": final_step, "loss_first": loss[0],
           "loss_last": sum(loss[-20:]) / len(loss[-20:]),  # the mean of the last 20 steps: one batch is noisy
           "prior": {"ground": {"Acc@0.5": 100 * next(iter(ground.values()))["prior"]["Acc@0.5"]}},
           "untrained": table(by_step[0]), "trained": table(by_step[-1])}
trained = (out / "train" / "metrics.jsonl").read_text().splitlines()[steps_before:]
scored = (out / "eval" / "metrics_by_step.jsonl").read_text().splitlines()[scored_before:]
phases = time_table([json.loads(x) for x in scored], [json.loads(x)["step_s"] for x in trained])
summary["seconds_by_stage"] = {name: round(seconds, 1) for name, seconds, _ in phases}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
rows = [f"| task | metric (x100) | untrained (step 0) | trained (step {final_step}) | text prior |", "|---|---|---|---|---|"]
for task, metrics in summary["trained"].items():
    for metric, v in metrics.items():
        prior = f"{summary['prior']['ground']['Acc@0.5']:.1f}" if (task, metric) == ("ground", "Acc@0.5") else ""
        rows.append(f"| {task} | {metric} | {summary['untrained'][task][metric]:.1f} | {v:.1f} | {prior} |")
md = "\n".join(rows) + (f"\n\nloss {summary['loss_first']:.2f} -> {summary['loss_last']:.2f} (first step -> mean of the "
                        f"last 20); {summary['seconds'] / 60:.1f} min in all\n")
md += "\n| stage | seconds | detail |\n|---|---:|---|\n" + "".join(f"| {n} | {s:.0f} | {d} |\n" for n, s, d in phases)
(out / "summary.md").write_text(md)
print("\n" + md)
PY
echo "demo.sh: done; see $OUT/summary.md, $OUT/curves.png, $OUT/pred_*.png"
