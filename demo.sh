#!/usr/bin/env bash
# demo.sh — the whole rscovlm pipeline on the built-in default, on a CPU in a few minutes:
#   tiny random-init Qwen-VL -> synthetic remote-sensing data (data_prep.py synth) -> FSDP2 co-training on
#   2 CPU processes (launch.sh -> train.py) -> detection/grounding (eval_det.py) and VQA/classification/
#   captioning (eval_vqa.py) evaluation of the exported checkpoint.
#
#   bash demo.sh                               # runs/demo, Qwen2.5-VL family, 600 steps
#   bash demo.sh FAMILY=qwen3 STEPS=100 OUT=runs/demo_q3
#
# The tiny model is random-init and has 64-wide layers: the point is the pipeline (every stage, the real
# code paths, a loss that falls), not the numbers. In minutes it learns what needs no object-level vision
# (scene classification from the ground colour, the caption template, answer formats); detection mAP,
# grounding Acc@0.5 and VQA presence stay at zero / chance / the text prior, with any model size, step count
# or mixture that fits a CPU demo (BENCHMARKS.md "CPU demo" has the measurements).
# Re-running resumes each stage.
set -euo pipefail
for kv in "$@"; do export "$kv"; done
OUT=${OUT:-runs/demo}
FAMILY=${FAMILY:-qwen2.5}
STEPS=${STEPS:-600}
cd "$(dirname "${BASH_SOURCE[0]}")"

[[ -f "$OUT/tiny/config.json" ]] || python model.py --make-tiny "$OUT/tiny" --family "$FAMILY"
python data_prep.py synth --out "$OUT/data"
bash launch.sh NPROC_PER_NODE=2 --model "$OUT/tiny" --data "$OUT/data/synth_all_train.jsonl" --out "$OUT/train" \
    --max-steps "$STEPS" --batch-size 8 --lr 3e-3 --warmup-ratio 0.05 --weight-decay 0.0 --save-every 100 \
    --num-workers 1 --resume auto
python eval_det.py --ckpt "$OUT/train/final" --data "$OUT/data/synth_all_val.jsonl" --out "$OUT/eval_det" \
    --batch-size 16
python eval_vqa.py --ckpt "$OUT/train/final" --data "$OUT/data/synth_all_val.jsonl" --out "$OUT/eval_vqa" \
    --batch-size 16
echo "demo.sh: done; see $OUT/train/metrics.jsonl, $OUT/train/loss.png, $OUT/eval_det/metrics.json, $OUT/eval_vqa/metrics.json"
