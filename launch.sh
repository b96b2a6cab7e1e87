#!/usr/bin/env bash
# launch.sh — run train.py under torchrun on this node: one node, several nodes, or a Slurm job.
#
#   bash launch.sh [VAR=value ...] [train.py arguments]
#
# VARs (environment variables work too): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500; one node without it: torchrun --standalone picks a free port),
# NPROC_PER_NODE (all visible GPUs; 2 CPU processes without a GPU), STOP_TIMEOUT (900: seconds the ranks
# get after a stop signal to finish their step and save, before torchrun kills them). Inside a Slurm job
# they default to the job's nodes (SLURM_NNODES, SLURM_NODEID, first host of SLURM_JOB_NODELIST).
# Checkpoints are written by every rank: with several nodes, --out must be on a shared filesystem.
#
# Preemption: SIGTERM or SIGUSR1 to this script, to its process group or to every process of the job
# (DataLoader workers included) makes every rank finish its step, save a checkpoint and exit; this script
# then exits 143 and the same command resumes. With Slurm, ask for the signal early enough for a step and
# a save: `#SBATCH --signal=USR1@120` (docs/training.md#preemption has the arithmetic for a 7B run).
# Exit codes: 0 done; 143 stopped by a signal, checkpoint saved; 2 an input error (its one line is
# printed last); anything else a failure (see the ranks' output above it).
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
# RSCoVLM multi-task recipe (docs/reference.md#rscovlm-recipe: full fine-tune of Qwen2.5-VL-7B, lr 2e-6 cosine, 5% warmup,
# weight decay 0.1, 1 epoch, global batch 32 = 32 GPUs x 1, bf16, activation checkpointing, max length 6144,
# 64..1296 merged 28-px tokens per image); file names as data_prep.py writes them:
#   srun --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --out /shared/runs/rscovlm_7b --data "data/dota/dota_train_512.jsonl*25,data/dior/dior_trainval.jsonl,data/rsvg/rsvg_train.jsonl,data/rsvqa/rsvqa_lr_train.jsonl,data/cap/rsicd_train.jsonl,data/aid/aid_train.jsonl,data/chat.jsonl" --lr 2e-6 --warmup-ratio 0.05 --weight-decay 0.1 --epochs 1 --batch-size 1 --grad-accum 1 --max-length 6144 --min-pixels 50176 --max-pixels 1016064 --dtype bf16 --grad-ckpt --save-every 500 --resume auto
#
# Tiny CPU demo (two gloo processes, seconds per step):
#   python synth.py model ckpt/tiny && python synth.py data --out data/synth --train 200 --val 50
#   bash launch.sh --model ckpt/tiny --data data/synth/synth_all_train.jsonl --out runs/tiny --max-steps 100 --batch-size 8 --lr 1e-3
set -euo pipefail

# VAR=value arguments before train.py's own
while [[ $# -gt 0 && "$1" =~ ^[A-Z_][A-Z0-9_]*= ]]; do
    export "$1"
    shift
done
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then  # this header, then train.py's flags (once, not per rank)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
        exec python "$HERE/train.py" --help
    fi
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
if [[ "$NNODES" == "1" && -z "${MASTER_PORT:-}" ]]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
fi

# Each rank writes its pid and, at the end, its exit code and error line into STATUS (model.run_cli): this
# script forwards stop signals to the ranks, waits for ranks that outlive torchrun, and reports the outcome.
STATUS=$(mktemp -d "${TMPDIR:-/tmp}/rscovlm_launch.XXXXXX")
export RSCOVLM_STATUS_DIR=$STATUS
# torchrun forwards these to each rank's process group (SIGUSR1 too: by default torchrun dies of it and
# orphans the ranks), then waits STOP_TIMEOUT s before SIGKILL (its own default, 30 s, is short for a 7B save).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${STOP_TIMEOUT:-900}

forward() {  # a stop signal sent to this script goes to every rank (a rank that gets it twice stops once)
    local f
    for f in "$STATUS"/*.pid; do
        if [[ -e "$f" ]]; then kill -s "$1" "$(cat "$f")" 2>/dev/null || true; fi
    done
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1

echo "launch.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE processes, master ${MASTER_ADDR}:${MASTER_PORT:-auto}" >&2
torchrun "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" "$HERE/train.py" "$@" &
TORCHRUN=$!
stop_ranks_after_a_failure() {
    # A rank that ended with an error (not 0, not 143) leaves the others waiting in a collective that cannot
    # complete (with NCCL, until --dist-timeout), and the SIGTERM torchrun sends them reads as a stop request:
    # end them. Their DataLoader workers follow their parent.
    local f
    if [[ -n "$(grep -L -E '"code": (0|143),' "$STATUS"/*.exit 2>/dev/null)" ]]; then
        for f in "$STATUS"/*.pid; do
            if [[ -e "$f" && ! -e "${f%.pid}.exit" ]]; then kill -KILL "$(cat "$f")" 2>/dev/null || true; fi
        done
    fi
}
while kill -0 "$TORCHRUN" 2>/dev/null; do
    sleep 1 &
    wait $! || true  # returns at once when a trapped signal arrives (the trap forwards it first)
    stop_ranks_after_a_failure
done
rc=0
wait "$TORCHRUN" || rc=$?
# ranks that outlive torchrun (torchrun killed, or an old torch that dies of SIGUSR1) may still be saving
for f in "$STATUS"/*.pid; do
    if [[ -e "$f" ]]; then
        while [[ ! -e "${f%.pid}.exit" ]] && kill -0 "$(cat "$f")" 2>/dev/null; do sleep 1; done
    fi
done

# The outcome: the first rank's input error (printed last, exit 2); every rank stopped by a signal after
# saving (143); else torchrun's exit code.
outcome=$(python - "$STATUS" "$rc" <<'PY'
import json, sys
from pathlib import Path
status, rc = Path(sys.argv[1]), sys.argv[2]
ends = [json.loads(p.read_text()) for p in status.glob("*.exit")]
n_ranks = len(list(status.glob("*.pid")))
errors = sorted((e for e in ends if e["code"] == 2 and e["line"]), key=lambda e: e["time"])
if errors:
    print(2, errors[0]["line"])
elif n_ranks and len(ends) == n_ranks and all(e["code"] == 143 for e in ends):
    print(143, "every rank saved a checkpoint and stopped on a signal; the same command resumes")
else:
    print(rc)
PY
)
rm -rf "$STATUS"
if [[ "$outcome" == *" "* ]]; then
    echo "launch.sh: ${outcome#* }" >&2
fi
exit "${outcome%% *}"
