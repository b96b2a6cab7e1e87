#!/usr/bin/env bash
# launch.sh — run train.py under torchrun on this node: one node, several nodes, or a Slurm job.
#
#   bash launch.sh [VAR=value ...] [train.py arguments]
#
# VARs (environment variables work too): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500; one node without it: torchrun --standalone picks a free port),
# NPROC_PER_NODE (all visible GPUs; 2 CPU processes without a GPU). Inside a Slurm job they default to
# the job's nodes (SLURM_NNODES, SLURM_NODEID, first host of SLURM_JOB_NODELIST).
# Checkpoints are written by every rank: with several nodes, --out must be on a shared filesystem.
#
# One node, all GPUs:
#   bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --data "data/synth/synth_all_train.jsonl" --out runs/x
#
# Two nodes (the same command on each; MASTER_ADDR = node 0's address):
#   bash launch.sh NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 --model ckpt/Qwen2.5-VL-7B-Instruct --data data/mix.jsonl --out /shared/runs/x
#   bash launch.sh NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 --model ckpt/Qwen2.5-VL-7B-Instruct --data data/mix.jsonl --out /shared/runs/x
#
# Slurm (one launch.sh per node; resubmitting the same job continues from the newest checkpoint):
#   srun --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --data data/mix.jsonl --out /shared/runs/x --resume auto
#
# RSCoVLM multi-task recipe (REFERENCE.md section 7: full fine-tune of Qwen2.5-VL-7B, lr 2e-6 cosine, 5% warmup,
# weight decay 0.1, 1 epoch, global batch 32 = 32 GPUs x 1, bf16, activation checkpointing, max length 6144,
# 64..1296 merged 28-px tokens per image); file names as data_prep.py writes them:
#   srun --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --out /shared/runs/rscovlm_7b --data "data/dota/dota_train_512.jsonl*25,data/dior/dior_trainval.jsonl,data/rsvg/rsvg_train.jsonl,data/rsvqa/rsvqa_lr_train.jsonl,data/cap/rsicd_train.jsonl,data/aid/aid_train.jsonl,data/chat.jsonl" --lr 2e-6 --warmup-ratio 0.05 --weight-decay 0.1 --epochs 1 --batch-size 1 --grad-accum 1 --max-length 6144 --min-pixels 50176 --max-pixels 1016064 --dtype bf16 --grad-ckpt --save-every 500 --resume auto
#
# Tiny CPU demo (two gloo processes, seconds per step):
#   python model.py --make-tiny ckpt/tiny && python data_prep.py synth --out data/synth --train 200 --val 50
#   bash launch.sh --model ckpt/tiny --data data/synth/synth_all_train.jsonl --out runs/tiny --max-steps 100 --batch-size 8 --lr 1e-3
set -euo pipefail

# VAR=value arguments before train.py's own
while [[ $# -gt 0 && "$1" =~ ^[A-Z_][A-Z0-9_]*= ]]; do
    export "$1"
    shift
done

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count())")
    if [[ "$NPROC_PER_NODE" == "0" ]]; then
        NPROC_PER_NODE=2
    fi
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ "$NNODES" == "1" && -z "${MASTER_PORT:-}" ]]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi
echo "launch.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE processes, master ${MASTER_ADDR}:${MASTER_PORT:-auto}" >&2
exec torchrun "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" "$HERE/train.py" "$@"
