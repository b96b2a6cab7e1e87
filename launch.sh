#!/usr/bin/env bash
# launch.sh — run train.py under torchrun on this node: one node, several nodes, or a Slurm job.
#
#   bash launch.sh [VAR=value ...] [train.py arguments]
#
# VARs (environment variables work too): NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT
# (29500; one node without it: a free port), NPROC_PER_NODE (all visible GPUs; 2 CPU processes without a GPU).
# Inside a Slurm job they default to the job's nodes. With several nodes, --out must be on a filesystem every
# node sees.
#
# Preemption: SIGTERM or SIGUSR1 to this script, to its process group or to every process of the job makes every
# rank finish its step, save a checkpoint and stop; this script then exits 143 and the same command resumes.
# With Slurm, ask for the signal early enough for a step and a 7B save: `#SBATCH --signal=USR1@180`
# (docs/training.md#preemption has the arithmetic). Exit codes: 0 done; 143 stopped by a signal, checkpoint
# saved; 2 an input error (its one line is printed last); anything else a failure (the ranks' output above).
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
#   srun --nodes 4 --ntasks-per-node 1 --gpus-per-node 8 bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --out /shared/runs/rscovlm_7b --data "data/dota/dota_train_512.jsonl*25,data/dior/dior_trainval.jsonl,data/rsvg/rsvg_train.jsonl,data/rsvqa/rsvqa_lr_train.jsonl,data/cap/rsicd_train.jsonl,data/aid/aid_train.jsonl,data/chat.jsonl" --lr 2e-6 --warmup-ratio 0.05 --weight-decay 0.1 --epochs 1 --batch-size 1 --grad-accum 1 --max-length 6144 --min-pixels 50176 --max-pixels 1016064 --dtype bf16 --ac full --save-every 500 --resume auto
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
if [[ -z "${MASTER_PORT:-}" && "$NNODES" == "1" ]]; then  # one node: any free port, so two runs can share it
    MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's own default for several processes, without its warning

# train.py's status files (train.launched): each rank's pid at start, its outcome at the end (0, 2, 143, or a
# failure), and the first input error's line. This script forwards stop signals to the pids, ends every rank
# when one fails (the others would wait in a collective), and reports the outcome.
STATUS=$(mktemp -d "${TMPDIR:-/tmp}/rscovlm_launch.XXXXXX")
trap 'rm -rf "$STATUS"' EXIT
export RSCOVLM_STATUS_DIR=$STATUS
# torchrun ignores the stop signals (started with them ignored, and told not to handle them): they reach the
# ranks from this script's traps or from the scheduler, and the ranks take the time a save needs. Handling them,
# torchrun would kill the ranks 30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and report the signal in a traceback.
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT

ranks() {  # the pid of every rank that has started
    local f
    for f in "$STATUS"/*.pid; do if [[ -e "$f" ]]; then cat "$f"; echo; fi; done
}
a_rank_failed() {  # one rank's outcome is an error, or it died without one (SIGKILL, out of memory)
    local f
    for f in "$STATUS"/*.pid; do
        if [[ -e "${f%.pid}.exit" ]]; then
            [[ "$(cat "${f%.pid}.exit")" =~ ^(0|143)$ ]] || return 0
        elif [[ -e "$f" ]] && ! kill -0 "$(cat "$f")" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}
# torchrun first (else it reports the ranks ended here in a block of its own), then each rank with its DataLoader
# workers (torchrun gives every rank a process group of its own)
end_every_rank() {
    local f
    kill -KILL "$TORCHRUN" 2>/dev/null || true
    for f in "$STATUS"/*.pid; do
        if [[ -e "$f" && ! -e "${f%.pid}.exit" ]]; then kill -KILL -- "-$(cat "$f")" 2>/dev/null || true; fi
    done
}
trap 'for pid in $(ranks); do kill -TERM "$pid" 2>/dev/null || true; done' TERM
trap 'for pid in $(ranks); do kill -USR1 "$pid" 2>/dev/null || true; done' USR1

echo "launch.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE processes, master $MASTER_ADDR:$MASTER_PORT" >&2
(trap '' TERM USR1; exec python -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --nproc-per-node "$NPROC_PER_NODE" "$HERE/train.py" "$@") &
TORCHRUN=$!
while kill -0 "$TORCHRUN" 2>/dev/null; do
    sleep 1 &
    wait $! || true  # returns at once when a trapped signal arrives (the trap forwards it first)
    if a_rank_failed; then
        end_every_rank
        break
    fi
done
rc=0
wait "$TORCHRUN" 2>/dev/null || rc=$?  # quiet: bash would report the torchrun ended above as "Killed"
for pid in $(ranks); do  # ranks that outlive torchrun (killed by the scheduler) may still be saving
    while kill -0 "$pid" 2>/dev/null; do sleep 1; done
done

# The outcome: the first input error (exit 2, its line last); every rank stopped after saving (143); every rank
# done (0); else the first failing rank's code, or torchrun's.
ends() { cat "$STATUS"/*.exit 2>/dev/null || true; }
if [[ -s "$STATUS/error" ]]; then
    echo "launch.sh: $(cat "$STATUS/error")" >&2
    exit 2
elif [[ "$(ends | wc -l)" == "$(ranks | wc -l)" && "$(ends | sort -u)" == "143" ]]; then
    echo "launch.sh: every rank saved a checkpoint and stopped on a signal; the same command resumes" >&2
    exit 143
elif [[ "$(ends | wc -l)" == "$(ranks | wc -l)" && "$(ends | sort -u)" == "0" ]]; then
    exit 0
fi
failure=$(ends | grep -v -x -E '0|143' | head -n 1 || true)
exit "${failure:-$((rc == 0 ? 1 : rc))}"
