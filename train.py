"""
train.py — co-train Qwen2.5-VL / Qwen3-VL on a mixture of record files (every task, text-only records too)
with FSDP2, on one GPU, one node or many nodes; resumable; CPU (gloo) for the tiny model and the tests.

Read top to bottom: arguments -> data mixture and sampler -> token-budget micro-batches -> model (meta ->
shard -> load) -> optimizer and schedule -> checkpoints and export -> main() with the loop.

    # one node, all GPUs (launch.sh picks torchrun's arguments; two nodes, Slurm and the RSCoVLM recipe are in
    # its header)
    bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --out runs/cotrain \
        --data "data/dota/dota_train_512.jsonl*25,data/rsvqa/rsvqa_lr_train.jsonl*2,data/cap/rsicd_train.jsonl%50" \
        --lr 2e-6 --grad-ckpt --max-length 6144 --save-every 500 --resume auto
    # the same without launch.sh
    torchrun --standalone --nproc-per-node 8 train.py --model ... --data ... --out ...
    # tiny CPU demo, one process
    python synth.py model ckpt/tiny && python synth.py data --out data/synth --train 200 --val 50
    python train.py --model ckpt/tiny --data data/synth/synth_all_train.jsonl --out runs/tiny --max-steps 100 \
        --batch-size 8 --lr 1e-3      # ~25 s on 2 cores; loss 5.9 -> 3.1

OUT/ holds: args.json, metrics.jsonl (one line per step), loss.png, ckpt/step_00000500/ (torch.distributed
checkpoint: the trained parameters, optimizer, sampler position, step, RNG; the last --keep-last are kept),
export/step_N/ (with --export-every) and final/: Hugging Face directories (config, safetensors, processor)
loadable by model.load and transformers' AutoModelForImageTextToText (vLLM reads the same layout; not tested
here).

LoRA: --lora 64 [--lora-targets llm+vision] [--dora] trains PEFT adapters instead of the weights they sit on
(apply_lora); checkpoints then hold the adapters alone, final/ has them merged in and final_adapter/ is the
PEFT adapter (export_hf).

Data: --data "a.jsonl*25,b.jsonl%50,c.jsonl" — `*N` repeats a file N times, `%P` keeps a seeded P% subset.
All entries are shuffled together (a fresh seeded permutation per pass) and dealt to ranks in turn; each
rank builds micro-batches from its share bounded by --batch-size samples and --max-tokens padded tokens.
A step is --grad-accum micro-batches on every rank; its loss is the sum of cross-entropy over supervised
(assistant) tokens divided by their number across all ranks and micro-batches.
"""

import argparse
import atexit
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import attention
import model as M
from common import UserError, add_debug_flag, print0, read_records, record_where, run_cli


# The model's output carries the image features split per image (views); we never modify outputs in place,
# which is what FSDP2's warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

# -----------------------------------------------------------------------------
# Arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not for None/False defaults, nor where the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="FSDP2 co-training of Qwen-VL on a mixture of record files",
                                formatter_class=HelpFormatter)
    # what to train, on what, where
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory to start from (Qwen2.5-VL or Qwen3-VL)")
    p.add_argument("--data", required=True, help='mixture of record JSONL files: "a.jsonl*25,b.jsonl%%50,c.jsonl" (*N repeat, %%P seeded subset)')
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics, exports)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, subsets and RNG")
    # length of training
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps; 0 = --epochs passes over the mixture, counted at --batch-size samples per micro-batch")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the mixture when --max-steps is 0")
    # batch
    p.add_argument("--batch-size", type=int, default=1, help="most samples in one micro-batch (per rank)")
    p.add_argument("--max-tokens", type=int, default=0, help="most padded tokens in one micro-batch (samples x longest); 0 = batch-size x max-length")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step on each rank")
    p.add_argument("--max-length", type=int, default=6144, help="most tokens in one sample (image tokens included)")
    p.add_argument("--pack", action="store_true", help="pack each step's samples end to end into rows of up to --max-tokens tokens, balanced over the ranks (no padding, equal work per rank; attention stays within each sample). A step holds the same samples as without it unless --max-tokens would cut a micro-batch short; the loss is the same")
    p.add_argument("--overlong", default="skip", choices=["skip", "truncate", "error"], help="what to do with a sample longer than --max-length (truncate never cuts image tokens; then it errors)")
    p.add_argument("--min-pixels", type=int, default=None, help="image pixel budget floor (RSCoVLM: 50176 = 64*28*28); default: the checkpoint's processor")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel budget ceiling (RSCoVLM: 1016064 = 1296*28*28); default: the checkpoint's processor")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank (image loading, tokenization); 0 = in the main process")
    # optimizer and schedule
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of the language model")
    p.add_argument("--vision-lr", type=float, default=None, help="peak learning rate of the vision tower (default: --lr)")
    p.add_argument("--merger-lr", type=float, default=None, help="peak learning rate of the vision-language merger (default: --lr)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to this fraction of the peak")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="linear warmup over this fraction of --max-steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only; not biases, norms)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = no clipping (the norm is still logged)")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower (merger excluded)")
    p.add_argument("--freeze-merger", action="store_true", help="do not train the vision-language merger")
    p.add_argument("--freeze-llm", action="store_true", help="do not train the language model (embeddings and head included)")
    # LoRA (PEFT): adapters instead of the full weights of the parts they target
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="train LoRA adapters of rank R on every linear layer of --lora-targets instead of their weights "
                        "(RSCoVLM: 64); the targeted parts' own weights stay frozen, the parts not targeted train fully "
                        "unless frozen (--freeze-vision --freeze-merger: adapters only, as RSCoVLM). OUT/final is "
                        "exported with the adapters merged, OUT/final_adapter holds the PEFT adapter. 0 (the default): no LoRA")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="ALPHA", help="LoRA scaling numerator: the update is alpha / R x B A (default 16, RSCoVLM's)")
    p.add_argument("--lora-dropout", type=float, default=None, metavar="P", help="dropout on the adapters' input (default 0.05, RSCoVLM's)")
    p.add_argument("--lora-targets", default=None, choices=["llm", "llm+vision"],
                   help="where the adapters go: llm = every linear of the decoder layers (attention and MLP; not the "
                        "embeddings nor lm_head); llm+vision = also every linear of the vision blocks (the merger "
                        "stays under --freeze-merger). Default llm")
    p.add_argument("--dora", action="store_true", help="DoRA (weight-decomposed LoRA): adapters also learn each output row's magnitude")
    # numerics and memory
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype (master weights and gradient reduction are fp32); default bf16 on GPU, fp32 on CPU")
    p.add_argument("--ac", default="none", metavar="none|full|vision|every-K",
                   help="activation checkpointing: a checkpointed block keeps only its input and reruns its forward in "
                        "backward. full = every decoder layer and vision block (least memory, ~30%% more compute); "
                        "vision = vision blocks only (saves the per-patch activations of large images, a few %% more "
                        "compute); every-K = the K-th, 2K-th, ... decoder layer and vision block (every-2: about half "
                        "of full's saving for half its cost); none = keep every activation (fastest, most memory)")
    p.add_argument("--grad-ckpt", dest="ac", action="store_const", const="full", help="the same as --ac full")
    # parallelism
    p.add_argument("--hsdp", default="auto", choices=["auto", "on", "off"],
                   help="hybrid sharding: shard the model within a node, replicate it across nodes (gradients are "
                        "reduce-scattered in the node, then all-reduced across nodes: less traffic between nodes, more "
                        "memory per GPU than sharding over every GPU); auto = on when the job spans more than one node "
                        "(torchrun's LOCAL_WORLD_SIZE < WORLD_SIZE) with more than one rank each (with one, HSDP "
                        "would not shard at all)")
    p.add_argument("--hsdp-replicas", type=int, default=0, metavar="N",
                   help="with HSDP, the number of model replicas, each sharded over world / N ranks; 0 = the number "
                        "of nodes (set it to shard over groups of nodes, or to try HSDP on one node)")
    p.add_argument("--vision-shard", default="tower", choices=["tower", "blocks"],
                   help="FSDP units of the vision tower: tower = one unit (one all-gather, the whole tower gathered "
                        "while it runs); blocks = one unit per vision block, plus one for the patch embedding and "
                        "merger(s) (less memory, more and smaller collectives)")
    p.add_argument("--attn", default=None, help="language-model attention: sdpa, flash_attention_2, eager, or varlen (attention.varlen_attention: one variable-length call per packed row; needs --pack); default flash_attention_2 when installed on GPU, else varlen with --pack on a GPU with a varlen kernel, else sdpa")
    p.add_argument("--vision-attn", default=None, help="vision-tower attention: varlen (one variable-length call per layer over every image and window: flash_attn's kernel or torch's varlen_attn on GPU, an exact masked sdpa call on CPU) or any --attn value (transformers' implementation: with sdpa one call per window); default varlen on a GPU with a varlen kernel, else --attn")
    p.add_argument("--dist-timeout", type=float, default=60, help="minutes a collective may wait for the slowest rank (rank 0 alone loads the weights and writes exports meanwhile)")
    # checkpoints, exports, logging
    p.add_argument("--resume", default="auto", help="'auto' = newest complete checkpoint in OUT/ckpt (fresh start when none), 'none' = fresh start, or a checkpoint directory")
    p.add_argument("--save-every", type=int, default=500, help="save a resumable checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="keep the newest K checkpoints")
    p.add_argument("--export-every", type=int, default=0, help="also write a Hugging Face export to OUT/export/step_N every N steps; 0 = only OUT/final")
    p.add_argument("--export-dtype", default="auto", choices=["auto", "bf16", "fp32"], help="dtype of exported weights; auto = the dtype of the --model checkpoint")
    p.add_argument("--log-every", type=int, default=1, help="write metrics every N steps")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb with TensorBoard (when installed)")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project (when installed)")
    p.add_argument("--run-name", default=None, help="run name for W&B (default: the name of --out)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if not re.fullmatch(r"none|full|vision|every-[1-9]\d*", args.ac):
        p.error(f"argument --ac: expected none, full, vision or every-K (K >= 1), got '{args.ac}'")
    check_lora_args(args)
    return args


LORA_DEFAULTS = {"lora_alpha": 16.0, "lora_dropout": 0.05, "lora_targets": "llm"}  # RSCoVLM's


def check_lora_args(args):
    """Fill in the LoRA defaults (only with --lora, so that a LoRA flag given without it is an error, not a
    silently full fine-tune) and refuse combinations that contradict each other."""
    if args.lora < 0:
        raise UserError(f"--lora {args.lora}: give the adapter rank (>= 1), or 0 for no LoRA")
    given = [f"--{k.replace('_', '-')}" for k in LORA_DEFAULTS if getattr(args, k) is not None] + (["--dora"] if args.dora else [])
    if not args.lora:
        if given:
            raise UserError(f"{', '.join(given)} without --lora R: add --lora R (e.g. --lora 64) or drop {given[0]}")
        return
    for k, v in LORA_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout {args.lora_dropout}: must be in [0, 1)")
    if args.lora_alpha <= 0:
        raise UserError(f"--lora-alpha {args.lora_alpha}: must be > 0")
    if args.freeze_llm:
        raise UserError("--freeze-llm with --lora: the language model's adapters are what --lora trains (its own "
                          "weights are frozen already); drop --freeze-llm")
    if args.freeze_vision and args.lora_targets == "llm+vision":
        raise UserError("--freeze-vision with --lora-targets llm+vision: adapters on the vision tower train it; drop "
                          "--freeze-vision (the tower's own weights stay frozen) or use --lora-targets llm")


# -----------------------------------------------------------------------------
# Data mixture: "a.jsonl*25,b.jsonl%50" -> records and the list of (file, record) entries of one pass


def parse_mixture(spec):
    """'a.jsonl*25,b.jsonl%50,c.jsonl' -> [(path, repeat, percent)]. `*N` (a whole number >= 1) repeats the
    file N times, `%P` (0 < P <= 100) keeps a seeded P% subset; both may be given (`a.jsonl%50*2`)."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        m = re.fullmatch(r"([^*%]+)((?:[*%][^*%]*)*)", item)
        if not m:
            raise UserError(f"bad --data entry '{item}': expected PATH, PATH*N or PATH%P")
        path, repeat, percent = m.group(1).strip(), 1, 100.0
        for op, num in re.findall(r"([*%])([^*%]*)", m.group(2)):
            try:
                value = float(num)
            except ValueError:
                raise UserError(f"bad --data entry '{item}': '{op}{num}' is not a number") from None
            if op == "*":
                if value != int(value) or value < 1:
                    raise UserError(f"bad --data entry '{item}': repeat *{num} must be a whole number >= 1 (use %P to subsample)")
                repeat = int(value)
            else:
                if not 0 < value <= 100:
                    raise UserError(f"bad --data entry '{item}': percent %{num} must be in (0, 100]")
                percent = value
        out.append((path, repeat, percent))
    if not out:
        raise UserError(f"--data '{spec}' names no file")
    return out


def build_mixture(spec, seed):
    """Read every file of the mixture. Returns (files [(path, records)], entries (N, 2) int64 array of
    (file index, record index)): one pass over the mixture, repeats and subsets applied, not shuffled."""
    files, entries = [], []
    for i, (path, repeat, percent) in enumerate(parse_mixture(spec)):
        if not Path(path).exists():
            raise UserError(f"--data file '{path}' not found")
        records = read_records(path)  # a folder or an empty file: a UserError naming it
        idx = np.arange(len(records))
        if percent < 100:
            # seeded per entry position, so adding a file later in the list does not change this subset
            k = round(len(records) * percent / 100)
            idx = np.sort(np.random.default_rng([seed, i]).choice(len(records), size=k, replace=False))
        files.append((path, records))
        entries += [np.stack([np.full(len(idx), i), idx], 1)] * repeat
    entries = np.concatenate(entries) if entries else np.zeros((0, 2), np.int64)
    if len(entries) == 0:
        raise UserError(f"--data '{spec}' has no records")
    return files, entries.astype(np.int64)


# -----------------------------------------------------------------------------
# Sampler: an endless, seeded, resumable stream per rank


@functools.lru_cache(maxsize=2)
def pass_permutation(seed, epoch, n):
    """The order of pass `epoch` over the n entries (int64: 8 MB per million entries; two passes cached)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_entry(p, n, seed):
    """Index into the mixture's n entries of position p of the global stream: pass after pass over the mixture,
    each pass a fresh permutation seeded by (seed, pass)."""
    epoch, offset = divmod(p, n)
    return int(pass_permutation(seed, epoch, n)[offset])


def stream_entry(k, rank, world, n, seed):
    """Index into the mixture's entries of position k of rank `rank`'s stream: rank r takes global positions
    r, r + world, r + 2*world, ... So the stream is a pure function of k and resuming is remembering k."""
    return global_entry(k * world + rank, n, seed)


def load_sample(files, entry, processor, max_length, overlong):
    """The model.tokenize dict (+ "id", "n_images") of one entry (file index, record index); None for a record
    skipped as overlong; {"error": line} for bad input (the line names the record's file:line), handed to the
    main process as data so that it ends the run with that one line, not a DataLoader worker traceback."""
    path, records = files[entry[0]]
    rec = records[entry[1]]
    try:
        sample = M.tokenize(rec, processor)
        n = len(sample["input_ids"])
        if n > max_length:
            if overlong == "skip":
                return None
            if overlong == "error":
                raise UserError(f"{record_where(rec)}: {n} tokens > --max-length {max_length} (see --overlong)")
            sample = M.tokenize(rec, processor, max_length=max_length, truncate=True)
    except UserError as e:
        return {"error": str(e)}
    except Exception as e:  # a bug: keep the traceback, but name the record
        raise RuntimeError(f"cannot tokenize record '{rec['id']}' of {path}: {e}") from e
    sample["id"], sample["n_images"] = rec["id"], len(rec["images"])
    return sample


class MixtureStream(torch.utils.data.IterableDataset):
    """Yields (k, sample) for stream positions k = start, start+1, ... of one rank, forever. sample is the
    model.tokenize dict (+ "id", "n_images"), or None for a record skipped as overlong. With DataLoader workers,
    worker w takes positions start+w, start+w+W, ...; the DataLoader returns worker results round-robin, so the
    order is exactly k = start, start+1, ... whatever the number of workers."""

    def __init__(self, files, entries, processor, rank, world, seed, start, max_length, overlong):
        super().__init__()
        self.files, self.entries, self.processor = files, entries, processor
        self.rank, self.world, self.seed, self.start = rank, world, seed, start
        self.max_length, self.overlong = max_length, overlong

    def record(self, k):
        file_i, rec_i = self.entries[stream_entry(k, self.rank, self.world, len(self.entries), self.seed)]
        path, records = self.files[file_i]
        return path, records[rec_i]

    def load(self, k):
        entry = self.entries[stream_entry(k, self.rank, self.world, len(self.entries), self.seed)]
        return load_sample(self.files, entry, self.processor, self.max_length, self.overlong)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start + worker
        while True:
            yield k, self.load(k)
            k += n_workers


# -----------------------------------------------------------------------------
# Token-budget micro-batches


class MicroBatches:
    """Groups a rank's stream into micro-batches of at most `batch_size` samples and at most `max_tokens`
    padded tokens (samples x longest sample; a single longer sample still forms a batch of one).
    `cursor` is the stream position of the first sample not yet handed out: the sampler state to checkpoint
    (a sample read ahead but not used is read again after a resume)."""

    def __init__(self, stream_iter, start, batch_size, max_tokens, pass_size):
        self.it, self.cursor = stream_iter, start
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.pending = None  # (k, sample) read from the stream, not yet in a batch
        self.skipped = 0  # overlong records skipped since the start of this process
        self.skipped_in_a_row, self.pass_size = 0, pass_size

    def next(self):
        batch, longest = [], 0
        while len(batch) < self.batch_size:
            if self.pending is None:
                self.pending = next(self.it)
            k, sample = self.pending
            assert k == self.cursor, f"stream out of order: got position {k}, expected {self.cursor}"
            if sample is not None and "error" in sample:
                raise UserError(sample["error"])
            if sample is None:
                self.pending, self.cursor, self.skipped = None, k + 1, self.skipped + 1
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= self.pass_size:  # else we would loop forever
                    raise RuntimeError(f"{self.skipped_in_a_row} records in a row are longer than --max-length: "
                                       "raise --max-length or lower --max-pixels")
                continue
            self.skipped_in_a_row = 0
            T = max(longest, len(sample["input_ids"]))
            if batch and (len(batch) + 1) * T > self.max_tokens:
                break
            batch.append(sample)
            longest, self.pending, self.cursor = T, None, k + 1
        return batch


# -----------------------------------------------------------------------------
# Packed steps (--pack): the same samples per step, in rows balanced over the ranks
#
# Without --pack a step is --grad-accum padded micro-batches per rank, each rank with its own share of the
# stream: ranks do unequal work (lengths run from ~300 to 6,144 tokens) and every step waits for the slowest.
# With --pack a step takes the same world x grad-accum x batch-size samples of the global stream (the same
# samples as without --pack whenever no micro-batch is cut short by --max-tokens and no record is skipped),
# plans their rows from token lengths known in advance (model.sample_length), and deals the rows so that every
# rank runs the same number of rows with about the same number of tokens. A row is samples end to end with no
# padding; attention stays within each sample (model.pack). The loss is still the sum over supervised tokens
# of all ranks divided by their number, so --pack changes the speed, not the numbers.


def record_lengths(files, processor, max_length, overlong, device):
    """Token length of every record of the mixture, [int64 array per file], computed from image headers and
    text alone, each rank a share, summed over ranks. -1 marks a record skipped as overlong (--overlong skip);
    with --overlong truncate a longer record counts as max_length. A bad record is a UserError on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [len(records) for _, records in files]
    flat = torch.zeros(sum(sizes), dtype=torch.int64, device=device)
    error, j = "", 0
    for path, records in files:
        for rec in records:
            if j % world == rank and not error:
                try:
                    n = M.sample_length(rec, processor)
                except UserError as e:
                    error = str(e)
                    n = 0
                if n > max_length:
                    if overlong == "error":
                        error = f"{record_where(rec)}: {n} tokens > --max-length {max_length} (see --overlong)"
                    n = -1 if overlong == "skip" else max_length
                flat[j] = n + 1  # each record on one rank only: the sum over ranks is its value
            j += 1
    errors = [None] * world
    dist.all_gather_object(errors, error)
    if any(errors):
        raise UserError(next(e for e in errors if e))
    dist.all_reduce(flat)
    return np.split(flat.cpu().numpy() - 1, np.cumsum(sizes)[:-1])


def pack_rows(lengths, world, rows_per_rank, capacity):
    """Split one step's samples (their token lengths) into rows: at least rows_per_rank on each rank and the
    same number on every rank (each row is one forward and backward, and FSDP needs every rank to run the same
    ones); a row holds at most `capacity` tokens (a longer sample gets a row of its own). Longest sample first
    onto the row with the fewest tokens where it fits (a row may stay empty: it becomes a one-token filler);
    when it fits nowhere, `world` more rows are opened. Then rows are dealt heaviest first to the rank with the
    fewest tokens that still needs rows. Returns rank -> [row -> [sample index, ascending]]; deterministic."""
    rows, load = [[] for _ in range(world * rows_per_rank)], [0] * (world * rows_per_rank)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if not rows[r] or load[r] + lengths[i] <= capacity]
        if not fits:
            rows += [[] for _ in range(world)]
            load += [0] * world
            fits = list(range(len(rows) - world, len(rows)))
        r = min(fits, key=lambda r: (load[r], r))
        rows[r].append(i)
        load[r] += lengths[i]
    per_rank = len(rows) // world
    ranks, rank_load = [[] for _ in range(world)], [0] * world
    for r in sorted(range(len(rows)), key=lambda r: (-load[r], r)):
        k = min((k for k in range(world) if len(ranks[k]) < per_rank), key=lambda k: (rank_load[k], k))
        ranks[k].append(sorted(rows[r]))
        rank_load[k] += load[r]
    return ranks


class PackedSteps(torch.utils.data.IterableDataset):
    """Yields (step, rows, skipped) for steps start, start+1, ...: this rank's rows of that step (lists of
    tokenized samples; an empty list is a filler row) and the number of overlong records the step skipped.
    Step g covers global stream positions [g * per_step, (g + 1) * per_step): a pure function of g, so
    resuming is knowing the step. Worker w of W takes steps start+w, start+w+W, ... (the DataLoader returns
    them in order)."""

    def __init__(self, files, entries, lengths, processor, rank, world, seed, start, per_step, rows_per_rank,
                 capacity, max_length, overlong):
        super().__init__()
        self.files, self.entries, self.lengths, self.processor = files, entries, lengths, processor
        self.rank, self.world, self.seed, self.start, self.per_step = rank, world, seed, start, per_step
        self.rows_per_rank, self.capacity, self.max_length, self.overlong = rows_per_rank, capacity, max_length, overlong

    def plan(self, g):
        """(this rank's rows as lists of entries, number of skipped records) of step g."""
        n = len(self.entries)
        block = [self.entries[global_entry(p, n, self.seed)] for p in range(g * self.per_step, (g + 1) * self.per_step)]
        kept = [e for e in block if self.lengths[e[0]][e[1]] >= 0]
        rows = pack_rows([int(self.lengths[f][i]) for f, i in kept], self.world, self.rows_per_rank, self.capacity)
        return [[kept[i] for i in row] for row in rows[self.rank]], len(block) - len(kept)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        g = self.start + worker
        while True:
            rows, skipped = self.plan(g)
            yield g, [[load_sample(self.files, e, self.processor, self.max_length, self.overlong) for e in row]
                      for row in rows], skipped
            g += n_workers


class PackedBatches:
    """The --pack counterpart of MicroBatches: next() returns this rank's rows of the next step; `skipped`
    counts overlong records skipped since the start of this process (on rank 0 only: every rank plans the same
    steps, and the per-step counts are summed over ranks); `cursor` the equivalent stream position."""

    def __init__(self, stream_iter, start, rank, positions_per_step):
        self.it, self.step, self.rank, self.positions_per_step = stream_iter, start, rank, positions_per_step
        self.skipped = 0

    @property
    def cursor(self):
        return self.step * self.positions_per_step

    def next(self):
        g, rows, skipped = next(self.it)
        assert g == self.step, f"packed steps out of order: got {g}, expected {self.step}"
        for sample in (s for row in rows for s in row):
            if sample is not None and "error" in sample:
                raise UserError(sample["error"])
        self.step += 1
        self.skipped += skipped if self.rank == 0 else 0
        return rows


def filler_sample(pad_token_id):
    """A row for a rank with fewer samples than rows: one pad token, no label, no image (the vision tower still
    runs on a blank image, see DummyImage): the forward and backward every rank must run, contributing 0."""
    ids = torch.tensor([pad_token_id])
    return {"input_ids": ids, "labels": torch.tensor([-100]), "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.zeros_like(ids), "pixel_values": None, "image_grid_thw": None,
            "id": None, "n_images": 0}


# -----------------------------------------------------------------------------
# Model: build on meta, shard, then load


def apply_fsdp(model, param_dtype, mesh, vision_shard="tower"):
    """FSDP2 units as in torchtitan's apply_fsdp, in the order forward runs them:
      - the token embeddings, unless tied to lm_head (one Parameter must stay in one unit: then the root's);
      - the vision tower: `tower` = one unit; `blocks` = one unit per block, the rest of the tower (patch and
        position embeddings, the merger and Qwen3-VL's deepstack mergers, which run between blocks) in the
        tower's own unit;
      - one unit per decoder layer;
      - [final norm, lm_head], unless tied;
      - the root: whatever is left (tied embeddings, norm and lm_head).
    `mesh` is 1-D (FSDP: shard over every rank) or 2-D ("replicate", "shard") (HSDP: shard within a replica,
    replicate across them). Master weights and the gradient reduction stay in fp32; compute runs in param_dtype.
    Each unit's parameters are all-gathered just before its forward and freed after."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    lm, visual = model.model.language_model, model.model.visual
    tied = model.lm_head.weight is lm.embed_tokens.weight
    if not tied:
        fully_shard(lm.embed_tokens, mesh=mesh, mp_policy=mp)
    if vision_shard == "blocks":
        # inside the tower, activations are already in param_dtype; not casting block inputs keeps the rotary
        # cos/sin in fp32, as they are with the one-unit tower
        block_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in visual.blocks:
            fully_shard(block, mesh=mesh, mp_policy=block_mp)
    fully_shard(visual, mesh=mesh, mp_policy=mp)
    for i, layer in enumerate(lm.layers):
        # the last layer (and [norm, lm_head]) is the first one backward needs: keep it gathered, not resharded
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(lm.layers) - 1)
    if not tied:
        fully_shard([lm.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def checkpoint_dtype(path):
    """The dtype the checkpoint's weights are stored in (read from the first safetensors header)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"--model {path}: no *.safetensors weights")
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    with safe_open(files[0], "pt") as f:
        for key in f.keys():
            dtype = names.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def param_kind(name):
    """'vision', 'merger' or 'llm' for a parameter name of Qwen2.5-VL / Qwen3-VL (transformers 5 layout)."""
    if name.startswith("model.visual.merger") or name.startswith("model.visual.deepstack_merger_list"):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    return "llm"


def apply_ac(model, ac):
    """Activation checkpointing (--ac none|full|vision|every-K): decoder layers and vision blocks are transformers
    GradientCheckpointingLayers, which rerun their forward in backward when their `gradient_checkpointing` flag
    is set. Set per block here (model.gradient_checkpointing_enable(every_n_layers=K) would count the two stacks
    as one); every-K checkpoints the K-th, 2K-th, ... block of each stack."""
    from torch.utils.checkpoint import checkpoint

    if ac == "none":
        return
    every = 1 if ac in ("full", "vision") else int(ac.removeprefix("every-"))
    stacks = [model.model.visual.blocks] + ([] if ac == "vision" else [model.model.language_model.layers])
    for blocks in stacks:
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = (i + 1) % every == 0
            block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


LORA_TARGETS = {"llm": ("llm",), "llm+vision": ("llm", "vision")}  # --lora-targets -> the param_kind parts


def lora_config(model, args, modules_to_save=None):
    r"""The PEFT LoraConfig of --lora/--lora-alpha/--lora-dropout/--lora-targets/--dora: every nn.Linear of the
    targeted parts (the decoder layers' attention and MLP; with llm+vision the vision blocks' too). Not lm_head
    (with tied embeddings it is the embedding matrix) and not the merger (--freeze-merger decides). The targets are
    written as one regex per stack, `model\.language_model\.layers\.\d+\.(mlp\.down_proj|...)`: short, and in a
    fixed order in adapter_config.json (PEFT saves a list of names as a set, in another order every run)."""
    from peft import LoraConfig

    kinds = LORA_TARGETS[args.lora_targets]
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head" and param_kind(name + ".weight") in kinds]
    stacks = {}  # "model.language_model.layers" -> {"mlp.down_proj", ...}
    for name in names:
        stack, _, inner = re.fullmatch(r"(.*?)\.(\d+)\.(.*)", name).groups()
        stacks.setdefault(stack, set()).add(inner)
    targets = "|".join(rf"{re.escape(stack)}\.\d+\.({'|'.join(map(re.escape, sorted(inner)))})"
                       for stack, inner in sorted(stacks.items()))
    assert [n for n, _ in model.named_modules() if re.fullmatch(targets, n)] == names, "the regex must name exactly these"
    return LoraConfig(r=args.lora, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
                      use_dora=args.dora, modules_to_save=modules_to_save, base_model_name_or_path=str(args.model))


def apply_lora(model, args):
    """--lora R: put a PEFT LoRA adapter on every targeted Linear, in place (peft.inject_adapter_in_model, not a
    PeftModel wrapper: parameter names keep their prefixes, so param_kind, apply_fsdp, apply_ac and DummyImage
    see the model they know; `q_proj.weight` becomes `q_proj.base_layer.weight` beside `q_proj.lora_A.default.weight`).
    On the meta device the adapters are empty; on a real model PEFT initialises them (A random, B zero: the
    model's output is unchanged at step 0; DoRA's magnitudes are the rows' norms). Without --lora: nothing."""
    if not args.lora:
        return
    from peft import inject_adapter_in_model

    on_meta = next(model.parameters()).is_meta
    inject_adapter_in_model(lora_config(model, args), model, low_cpu_mem_usage=on_meta)


def set_trainable(model, args):
    """requires_grad of every parameter: in a part LoRA targets only the adapters train; any other part trains
    unless its --freeze-* flag is given."""
    frozen = {"vision": args.freeze_vision, "merger": args.freeze_merger, "llm": args.freeze_llm}
    lora_kinds = LORA_TARGETS[args.lora_targets] if args.lora else ()
    for name, p in model.named_parameters():
        kind = param_kind(name)
        p.requires_grad_("lora_" in name if kind in lora_kinds else not frozen[kind])  # PEFT's own adapter test


def build_model(args, device, param_dtype, rank):
    """The sharded model with the checkpoint's weights, in three steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForImageTextToText

    # 1. build on the meta device: no memory, no init cost, the same on every rank
    config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=args.attn, dtype=torch.float32)
    model.config.use_cache = False
    apply_lora(model, args)
    set_trainable(model, args)
    apply_ac(model, args.ac)
    model.train()

    # 2. shard over a mesh of ranks, then allocate this rank's shards (uninitialised) on the device. FSDP: a 1-D
    # mesh, every rank holds 1/world of each unit. HSDP: (replicas, ranks per replica), ranks of a replica
    # consecutive, i.e. one node each by default (torchrun numbers a node's ranks consecutively).
    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = world // per_node
    # auto: not with one rank per node, where HSDP would not shard at all (each GPU: the whole model and optimizer)
    if args.hsdp == "on" or (args.hsdp == "auto" and nodes > 1 and per_node > 1):
        replicas = args.hsdp_replicas or nodes
        if replicas < 1 or world % replicas:
            raise UserError(f"--hsdp-replicas {replicas}: must divide the {world} ranks")
        mesh = init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    print0(f"  {'HSDP' if mesh.ndim == 2 else 'FSDP'} mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))}, "
             f"vision units: {args.vision_shard}, activation checkpointing: {args.ac}")
    apply_fsdp(model, param_dtype, mesh, args.vision_shard)
    model.to_empty(device=device)

    # 3. rank 0 reads the checkpoint in its own dtype (a bf16 7B: 16 GB of host memory, not a 33 GB fp32 copy)
    # and broadcasts it tensor by tensor into everyone's fp32 shards (copy_ upcasts). Buffers (the rotary
    # inv_freq) are not in the state dict (non-persistent), so they are broadcast separately. LoRA adapters are
    # initialised on rank 0's copy, seeded by --seed, and broadcast with the weights: the same start on any
    # number of ranks.
    full, loaded = {}, None
    if rank == 0:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" would go to stderr, which is kept for errors
        loaded, _ = M.load(args.model, dtype=checkpoint_dtype(args.model), device="cpu", attn="sdpa")
        with torch.random.fork_rng(devices=[]):  # leaves rank 0's training RNG as setup() seeded it
            torch.manual_seed(args.seed)
            apply_lora(loaded, args)
        full = loaded.state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in model.named_buffers():
        if rank == 0:
            buf.copy_(loaded.get_buffer(name))
        dist.broadcast(buf, src=0)
    del full, loaded
    return model


class DummyImage:
    """Keeps every rank's collectives in step when a micro-batch has no image.

    The vision tower is one FSDP unit, or one per block (--vision-shard): its parameters are all-gathered when
    it runs and its gradients reduce-scattered in backward. Both are collectives, so if one rank's micro-batch has images and another's
    is text-only, the ranks would wait on different collectives and hang. When `active`, a forward pre-hook on
    the language model (the point where the vision tower would have run, so the order of collectives matches)
    runs the tower on one blank image (the smallest the processor's pixel budget allows) and adds 0 x its
    outputs to the input embeddings: same collectives, zero gradient, same loss. (The alternative, FSDP2's
    set_reduce_scatter_unused_params, would fix the gradient reduction but not the forward all-gather.)"""

    def __init__(self, model, processor):
        self.visual, self.active = model.model.visual, False
        factor = processor.patch_size * processor.merge_size
        out = processor.image_processor(images=[Image.new("RGB", (factor, factor))], return_tensors="pt")
        self.pixel_values, self.grid = out["pixel_values"], out["image_grid_thw"]  # (P, C), (1, 3)
        model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if self.active:
            if "inputs_embeds" not in kwargs:
                raise RuntimeError("DummyImage: the language model was not called with inputs_embeds=...; this "
                                   "transformers version calls it differently (see DummyImage in train.py)")
            embeds = kwargs["inputs_embeds"]
            out = self.visual(self.pixel_values.to(embeds.device), grid_thw=self.grid.to(embeds.device))
            zero = sum(t.float().sum() for t in _tensors(out)) * 0.0
            kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
        return args, kwargs


def _tensors(x):
    """All floating tensors in a (nested) model output: tensors, tuples, lists, dicts / ModelOutputs."""
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


# -----------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(model, args, fused=None):
    """AdamW with one learning rate per part (vision tower, merger, language model, as RSCoVLM's vision_lr /
    merger_lr) and weight decay on matrices only. Each group keeps its peak lr in 'base_lr'. fused: the fused
    kernel (default: on CUDA)."""
    peak = {"vision": args.vision_lr or args.lr, "merger": args.merger_lr or args.lr, "llm": args.lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind, decay = param_kind(name), p.ndim >= 2
        key = f"{kind}{'' if decay else '_no_decay'}"
        groups.setdefault(key, {"name": key, "params": [], "base_lr": peak[kind],
                                "weight_decay": args.weight_decay if decay else 0.0})["params"].append(p)
    if not groups:
        raise ValueError("every parameter is frozen: drop one of --freeze-vision/--freeze-merger/--freeze-llm")
    # on GPU, the fused kernel updates every parameter of a group in one launch (the default is a few
    # launches per group and op); on CPU, torch's default
    if fused is None:
        fused = next(iter(groups.values()))["params"][0].device.type == "cuda"
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=tuple(args.betas), eps=1e-8,
                             fused=fused or None)


def get_lr(step, max_steps, warmup_steps, min_ratio):
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warmup to 1, then cosine to
    min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# What defines the schedule: a resumed run must keep all of it, or the learning rate jumps mid-run.
SCHEDULE_FLAGS = ("lr", "vision_lr", "merger_lr", "min_lr_ratio", "warmup_ratio", "max_steps", "epochs")


def make_schedule(args, n_entries, world):
    """{"max_steps", "warmup_steps"}: --max-steps, or --epochs passes over the mixture counted at --batch-size
    samples per micro-batch on `world` ranks."""
    max_steps = args.max_steps or math.ceil(args.epochs * n_entries / (world * args.grad_accum * args.batch_size))
    return {"max_steps": max_steps, "warmup_steps": round(args.warmup_ratio * max_steps)}


# What decides which parameters train: a checkpoint holds only those (trained_state), so a resume must keep them.
TRAINED_FLAGS = ("lora", "lora_alpha", "lora_dropout", "lora_targets", "dora", "freeze_vision", "freeze_merger",
                 "freeze_llm")


def check_trained_flags(args, resume_from):
    """Refuse a resume that asks for other LoRA or --freeze-* flags than the run it continues: the checkpoint's
    parameters would not be the ones this run trains (another --lora rank: not even their shapes). Checked before
    the model is built, so the line comes at once."""
    saved = torch.load(Path(resume_from) / "loop.pt", weights_only=False)["args"]
    before_lora = {"lora": 0, "dora": False}  # checkpoints written before train.py had LoRA
    changed = [f"--{k.replace('_', '-')} {saved.get(k, before_lora.get(k))} -> {getattr(args, k)}" for k in TRAINED_FLAGS
               if saved.get(k, before_lora.get(k)) != getattr(args, k)]
    if changed:
        raise UserError(f"the checkpoint {resume_from} trained other parameters ({'; '.join(changed)}): resume with "
                          "the flags it was started with (OUT/args.json), or start a new --out from an export")


def resumed_schedule(args, loop, schedule):
    """The schedule of a resumed run: the checkpoint's, so the learning rate continues on the curve it started
    on even when the run comes back with another number of ranks (which changes what --epochs means in steps).
    A command that asks for another schedule (--lr, --max-steps, ...) is refused."""
    saved_args = loop["args"]
    changed = [f"--{k.replace('_', '-')} {saved_args.get(k)} -> {getattr(args, k)}" for k in SCHEDULE_FLAGS
               if k in saved_args and saved_args[k] != getattr(args, k) and ("schedule" in loop or k != "max_steps")]
    if changed:
        raise UserError(f"the checkpoint was trained with another schedule ({'; '.join(changed)}): resume with the "
                          "flags it was started with (OUT/args.json), or start a new --out from an export")
    saved = loop.get("schedule") or {"max_steps": saved_args["max_steps"],  # checkpoints before schedules were saved
                                     "warmup_steps": round(saved_args["warmup_ratio"] * saved_args["max_steps"])}
    if saved != schedule:
        print0(f"  keeping the checkpoint's schedule: {saved['max_steps']} steps, warmup {saved['warmup_steps']} "
                 f"(this run's {dist.get_world_size()} ranks would make it {schedule['max_steps']} steps)")
    return saved


# -----------------------------------------------------------------------------
# Checkpoints (resumable, sharded) and exports (Hugging Face)


def complete_checkpoints(ckpt_dir):
    """Complete checkpoints, oldest first. A checkpoint is written to step_N.tmp and renamed to step_N only
    when every rank has finished, so a run killed while saving leaves only a .tmp, which is ignored."""
    ckpt_dir = Path(ckpt_dir)
    found = [d for d in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", d.name) and (d / "loop.pt").is_file()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def trained_state(model, optimizer):
    """The state a checkpoint holds: what trains, i.e. the parameters with requires_grad and the optimizer state.
    Frozen weights (the base model under --lora, a --freeze-* part) come from --model again when a run resumes,
    so a 7B LoRA checkpoint is the adapters and their AdamW moments, not the 8B weights. (Not get_state_dict's
    ignore_frozen_params: it drops a parameter under one of its names only, and keeps a frozen tied lm_head.)"""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trained}, optim_sd


def save_checkpoint(ckpt_dir, step, model, optimizer, loop_state, args, schedule):
    """Trained parameters and optimizer shards via torch.distributed.checkpoint (each rank writes its own, all at
    once), plus loop.pt from rank 0: step, world size, every rank's sampler cursor and RNG states, the schedule,
    args. Then rename, rotate. Returns (path, seconds, GB written by all ranks)."""
    t0 = time.time()
    rank = dist.get_rank()
    final = Path(ckpt_dir) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    dist.barrier()
    model_sd, optim_sd = trained_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    loop_states = [None] * dist.get_world_size()
    dist.all_gather_object(loop_states, loop_state)  # also: every rank has finished writing its shards
    gb = 0.0
    if rank == 0:
        torch.save({"step": step, "world_size": len(loop_states), "ranks": loop_states, "schedule": schedule,
                    "args": vars(args)}, tmp / "loop.pt")
        gb = sum(f.stat().st_size for f in tmp.iterdir()) / 1e9
        if final.exists():  # only when re-running steps after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[: -args.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final, time.time() - t0, gb


def choose_resume(args, ckpt_dir):
    """The checkpoint to resume from (a Path) or None, the same on every rank: rank 0 lists OUT/ckpt and
    broadcasts its choice (right after a requeue, nodes of a shared filesystem can list different checkpoints),
    then every rank waits until it can see that checkpoint. A bad --resume is a UserError on every rank."""
    choice = [None]
    if dist.get_rank() == 0:
        existing = complete_checkpoints(ckpt_dir)
        if args.resume == "none":
            choice[0] = ("error", f"{ckpt_dir} already has checkpoints ({existing[-1].name}): use --resume auto "
                                  "or another --out") if existing else ("ok", None)
        elif args.resume == "auto":
            choice[0] = ("ok", str(existing[-1]) if existing else None)
        elif not (Path(args.resume) / "loop.pt").is_file():
            choice[0] = ("error", f"--resume {args.resume}: not a complete checkpoint (no loop.pt); complete ones "
                                  f"in {ckpt_dir}: {', '.join(d.name for d in existing) or 'none'}")
        else:
            choice[0] = ("ok", args.resume)
    dist.broadcast_object_list(choice, src=0)
    status, value = choice[0]
    if status == "error":
        raise UserError(value)
    if value is None:
        return None
    path, t0 = Path(value), time.time()
    while not (path / "loop.pt").is_file():  # a shared filesystem can show another node's files late
        if time.time() - t0 > 120:
            raise UserError(f"rank {dist.get_rank()} cannot see {path / 'loop.pt'}, which rank 0 resumes from: "
                              "is --out on a filesystem every node shares?")
        time.sleep(1)
    return path


def load_checkpoint(path, model, optimizer):
    """Load the trained parameters and optimizer shards in place (the frozen ones were loaded from --model and
    are not in the checkpoint: strict=False; dcp.load still fails on a trained one it lacks); returns loop.pt's
    dict. Checkpoints of older runs hold every parameter: the trained ones are read from them the same way."""
    model_sd, optim_sd = trained_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    return torch.load(Path(path) / "loop.pt", weights_only=False)


def gather_full_state(model, dtype):
    """(full, trained) on rank 0, ({}, {}) elsewhere. full: {name: full tensor in `dtype` on CPU}, gathered one
    tensor at a time, so rank 0 holds at most the export's own size (a bf16 7B: 16 GB) and never a full fp32 copy.
    With --lora, a LoRA layer's tensors (base weight and bias, adapters) are gathered in fp32 and come back as
    the plain Linear's weight and bias with the adapter merged in (merge_lora), under the names of --model; and
    trained: what the run changed, for the adapter export: the adapters (fp32) and the parameters of any part
    trained in full (as in `full`). Collective."""
    rank0 = dist.get_rank() == 0
    lora = {prefix: m for prefix, m in model.named_modules() if hasattr(m, "lora_A")}  # PEFT's LoRA layers
    owner = {f"{prefix}.{k}": (prefix, k) for prefix, m in lora.items() for k in m.state_dict()}
    size = {prefix: len(m.state_dict()) for prefix, m in lora.items()}
    in_full = {n for n, p in model.named_parameters() if p.requires_grad and n not in owner} if lora else set()
    full, trained, parts = {}, {}, {prefix: {} for prefix in lora}
    for name, value in model.state_dict().items():
        t = value.full_tensor() if hasattr(value, "full_tensor") else value  # all-gather of one parameter
        if rank0 and name in owner:
            prefix, key = owner[name]
            parts[prefix][key] = t.detach().to("cpu", torch.float32)
            if key.startswith("lora_"):
                trained[name] = parts[prefix][key]
            if len(parts[prefix]) == size[prefix]:  # the layer is complete: merge, keep only the result
                for k, v in merge_lora(parts.pop(prefix), lora[prefix].scaling["default"]).items():
                    full[f"{prefix}.{k}"] = v.to(dtype)
        elif rank0:
            full[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)
            if name in in_full:
                trained[name] = full[name]
        del t
    return full, trained


def merge_lora(parts, scaling):
    """One LoRA layer's tensors (its state dict, fp32) -> the plain Linear's {"weight", "bias"} with the adapter
    merged in, as PEFT's merge computes it: V = W + scaling * B @ A; DoRA then rescales each output row of V to
    its learnt magnitude m: m * V / ||V||."""
    w = parts["base_layer.weight"] + scaling * (parts["lora_B.default.weight"] @ parts["lora_A.default.weight"])  # (out, in)
    if "lora_magnitude_vector.default.weight" in parts:  # DoRA, m: (out,)
        w = parts["lora_magnitude_vector.default.weight"].unsqueeze(1) * w / w.norm(dim=1, keepdim=True)
    merged = {"weight": w}
    if "base_layer.bias" in parts:
        merged["bias"] = parts["base_layer.bias"]
    return merged


def save_adapter(shell, trained, args, out_dir):
    """out_dir (via out_dir.tmp + rename): what the run trained, as PeftModel.save_pretrained writes it
    (adapter_config.json, adapter_model.safetensors): the LoRA adapters, and a part trained in full (the merger
    without --freeze-merger; the vision tower under --lora-targets llm without --freeze-vision) as PEFT's
    modules_to_save, one entry per module holding its weights. So PeftModel.from_pretrained(the --model
    checkpoint, out_dir) is the trained model, equal to the merged export. shell: a meta-device model of --model's
    config (PEFT takes the names from it). trained: gather_full_state's."""
    from peft import get_peft_model

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    in_full = [k for k in trained if "lora_" not in k]  # "model.visual.merger.mlp.0.weight", ...
    modules = sorted({k.rsplit(".", 1)[0] for k in in_full})
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing (a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        peft_shell = get_peft_model(shell, lora_config(shell, args, modules_to_save=modules or None),
                                    low_cpu_mem_usage=True)
    # the names a live PeftModel's state dict has: the wrapped model under base_model.model., a module to save as
    # its copy .modules_to_save.default.; PEFT picks this adapter's entries and writes them without "default"
    state = {f"base_model.model.{k}": v for k, v in trained.items() if k not in in_full}
    for k in in_full:
        module, leaf = k.rsplit(".", 1)
        state[f"base_model.model.{module}.modules_to_save.default.{leaf}"] = trained[k]
    peft_shell.save_pretrained(tmp, state_dict=state)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def export_hf(model, out_dir, args, processor, dtype):
    """Gather the full weights on rank 0 and write a Hugging Face directory (config, safetensors, generation
    config, processor) at out_dir, via out_dir.tmp + rename; with --lora the adapters merged in, and the adapter
    alone in PEFT's format at {out_dir}_adapter. Collective: every rank must call it."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    full, trained = gather_full_state(model, dtype)
    if dist.get_rank() == 0:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        config = AutoConfig.from_pretrained(args.model)
        with torch.device("meta"):  # an empty shell: save_pretrained writes the state dict we give it
            shell = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        try:
            shell.generation_config = GenerationConfig.from_pretrained(args.model)
        except OSError:
            pass  # the checkpoint has no generation_config.json
        # tied input/output embeddings come back from the gather as two copies; one shared tensor is saved once
        embed = shell.get_input_embeddings().weight
        tied = [k for k, p in shell.named_parameters(remove_duplicate=False) if p is embed]
        for k in tied[1:]:
            full[k] = full[tied[0]]
        # save_pretrained pops each 5 GB shard from `full` as it writes it, so host memory falls as it goes
        shell.save_pretrained(tmp, state_dict=full, max_shard_size="5GB")
        processor.save_pretrained(tmp)  # with the training pixel budget: Qwen2.5-VL boxes depend on it
        (tmp / "training_args.json").write_text(json.dumps(vars(args), indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        if args.lora:
            with torch.device("meta"):
                shell = AutoModelForImageTextToText.from_config(config)
            save_adapter(shell, trained, args, out_dir.with_name(out_dir.name + "_adapter"))
    del full, trained
    dist.barrier()


# -----------------------------------------------------------------------------
# Logging: rank 0 only; the others get no-ops


class Logger:
    """metrics.jsonl always; TensorBoard and W&B when asked for and installed."""

    def __init__(self, args, out, rank, start_step):
        self.on, self.tb, self.wandb = rank == 0, None, None
        self.path = out / "metrics.jsonl"
        if not self.on:
            return
        if self.path.exists():  # drop lines of steps after the checkpoint we resume from (a killed run's)
            lines = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
            self.path.write_text("".join(l + "\n" for l in lines))
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(out / "tb")
            except ImportError:
                print("warning: --tensorboard given but tensorboard is not installed", file=sys.stderr)
        if args.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=args.wandb, name=args.run_name or out.name, config=vars(args),
                                        resume="allow", id=(args.run_name or out.name).replace("/", "_"))
            except ImportError:
                print("warning: --wandb given but wandb is not installed", file=sys.stderr)

    def log(self, metrics):
        if not self.on:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, metrics["step"])
        if self.wandb:
            self.wandb.log(metrics, step=metrics["step"])

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def plot_loss(metrics_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def peak_flops(device, dtype):
    """Dense bf16 peak FLOP/s of one GPU for the MFU estimate; None when unknown (CPU, other cards)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A800", 312e12), ("H800", 989e12)):
        if key in name:
            return flops
    return None


# -----------------------------------------------------------------------------
# Setup, preemption, RNG


def setup(args):
    """Process group (a one-process group for a plain `python train.py`: FSDP2 needs one), seeds, TF32, the
    attention default, the OUT folder. Returns (rank, world, device, param_dtype)."""
    device = M.init_dist(single_process_group=True, timeout_minutes=args.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    param_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    choose_attention(args, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    print0(f"rscovlm train: {world} rank(s) on {device.type}, compute {param_dtype}, attention: language model "
             f"{'varlen' if args.text_varlen else args.attn}, vision {'varlen' if args.vision_varlen else args.attn}"
             + (f" ({attention.varlen_kernel(device)} kernel)" if args.text_varlen or args.vision_varlen else ""))
    return rank, world, device, param_dtype


def choose_attention(args, device):
    """Resolve --attn / --vision-attn. args.attn becomes the transformers implementation the model is built with;
    args.text_varlen / args.vision_varlen say which parts then run attention.varlen_attention instead."""
    gpu_varlen = device.type == "cuda" and attention.varlen_kernel(device) != "reference"
    builtin = attention.default_attn(device)  # flash_attention_2 when installed on GPU, else sdpa
    text = args.attn or ("varlen" if args.pack and gpu_varlen and builtin == "sdpa" else builtin)
    if text == "varlen" and not args.pack:
        raise UserError("--attn varlen needs --pack (it runs packed rows without padding)")
    args.attn = "sdpa" if text == "varlen" else text
    vision = args.vision_attn or ("varlen" if gpu_varlen else args.attn)
    if vision not in ("varlen", args.attn):
        raise UserError(f"--vision-attn {vision}: give varlen or the language model's ({args.attn})")
    args.text_varlen, args.vision_varlen = text == "varlen", vision == "varlen"
    if device.type == "cuda" and not args.vision_varlen and "flash" not in args.attn:
        warnings.warn("no varlen attention kernel (flash_attn, or torch >= 2.10's varlen_attn on sm80+): the vision "
                      "tower runs one sdpa call per window, measured on an H100 at ~2% MFU and ~76% of a 7B step "
                      "(5.6 s vs 1.9 s with varlen; BENCHMARKS.md). Install flash-attn or a newer torch.")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def catch_stop_signals():
    """Preemption: schedulers send SIGTERM some time before killing a job (Slurm: KillWait, or earlier with
    `#SBATCH --signal=USR1@N`), to one process, a process group or every process of the job. Each rank only
    notes the signal here; the note rides on the next step's all-reduce, so every rank finishes the same step,
    saves a checkpoint and exits 143. Returns the list the handler appends to. Installed first thing, so a
    signal during loading is not lost."""
    caught = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    return caught


def worker_ignores_stop_signals(worker_id):
    """DataLoader worker_init_fn. Workers get the scheduler's signal too (torchrun forwards it to each rank's
    process group, Slurm to every process) and torch gives them a SIGTERM handler that exits: they would die
    before their rank has saved. They ignore it; the rank decides when to stop and then ends them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_workers(loader_iter):
    """End a DataLoader iterator's worker processes now: the DataLoader's own shutdown, then SIGKILL for any
    that is still there. Registered with atexit when the loader starts, so it runs on every way out (done, 143,
    an input error, a crash) and before multiprocessing's own exit handler, which would send the workers SIGTERM,
    which they ignore (worker_ignores_stop_signals), and then wait for them forever."""
    shutdown = getattr(loader_iter, "_shutdown_workers", None)  # absent without workers (--num-workers 0)
    if shutdown is not None:
        shutdown()
    for worker in getattr(loader_iter, "_workers", []):
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# One optimizer step


# What every step sums over all ranks and micro-batches, in one all-reduce.
STEP_COUNTS = ("supervised_tokens", "tokens", "samples", "images", "skipped_overlong", "ranks_stopping")


def step_counts(groups, skipped, stopping, device):
    """{name: sum over ranks} of STEP_COUNTS for this step's samples (groups: the micro-batches or packed rows,
    lists of tokenized samples): supervised tokens (the loss normaliser; a sample's first token is never a
    target), tokens, samples, images, overlong records skipped so far, and the ranks that caught a stop signal
    (so that every rank decides to stop after the same step). Filler samples (id None) count nothing."""
    samples = [s for g in groups for s in g if s["id"] is not None]
    local = {"supervised_tokens": sum(int((s["labels"][1:] != -100).sum()) for s in samples),
             "tokens": sum(len(s["input_ids"]) for s in samples), "samples": len(samples),
             "images": sum(s["n_images"] for s in samples), "skipped_overlong": skipped,
             "ranks_stopping": int(stopping)}
    counts = torch.tensor([local[k] for k in STEP_COUNTS], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return dict(zip(STEP_COUNTS, counts.tolist()))


def forward_backward(model, micro, n_supervised, dummy, device):
    """Forward and backward of this rank's micro-batches; gradients of (sum of cross-entropy over supervised
    tokens of all ranks) / n_supervised. Returns this rank's summed cross-entropy (float64 tensor)."""
    world = dist.get_world_size()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        labels = b.pop("labels").to(device)  # (B, T)
        b = {k: v.to(device) for k, v in b.items() if v is not None}
        # only positions whose next token is supervised need logits (B, K, vocab): saves the vocab-wide
        # projection of every prompt and image token
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # (K,)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=device)
        dummy.active = "pixel_values" not in b
        logits = model(**b, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep + 1].flatten(), ignore_index=-100,
                             reduction="sum")
        # FSDP averages gradients over ranks; x world makes the result the gradient of the global sum / N
        (ce * world / n_supervised).backward()
        loss_sum += ce.detach()
    return loss_sum


def stop_if_not_finite(loss, grad_norm, step, ckpt_dir):
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    latest = complete_checkpoints(ckpt_dir)
    if dist.get_rank() == 0:
        print(f"\nerror: step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); stopping before "
              f"the optimizer step. The last good checkpoint is {latest[-1] if latest else '(none)'}; lower --lr or "
              "check the data, then resume with --resume auto.", file=sys.stderr, flush=True)
    dist.destroy_process_group()
    raise SystemExit(1)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    stop_signals = catch_stop_signals()
    rank, world, device, param_dtype = setup(args)
    out, ckpt_dir = Path(args.out), Path(args.out) / "ckpt"
    resume_from = choose_resume(args, ckpt_dir)  # decided before the slow part
    if resume_from is not None:
        check_trained_flags(args, resume_from)

    # --- data
    processor = M.load_processor(args.model, args.min_pixels, args.max_pixels)
    files, entries = build_mixture(args.data, args.seed)
    per_file = np.bincount(entries[:, 0], minlength=len(files))
    for (path, repeat, percent), n in zip(parse_mixture(args.data), per_file):
        print0(f"  {path}: x{repeat} {percent:g}% -> {n} samples per pass ({100 * n / len(entries):.1f}%)")
    max_tokens = args.max_tokens or args.batch_size * args.max_length
    schedule = make_schedule(args, len(entries), world)
    if args.pack:  # token lengths of every record, to plan the packed rows (errors surface here, before loading)
        t0 = time.time()
        lengths = record_lengths(files, processor, args.max_length, args.overlong, device)
        kept = np.concatenate(lengths)
        kept = kept[kept >= 0]
        print0(f"  --pack: {len(kept)} records measured in {time.time() - t0:.1f} s, {kept.mean():.0f} tokens on "
                 f"average (max {kept.max()}), rows of <= {max_tokens} tokens")

    # --- model, optimizer
    model = build_model(args, device, param_dtype, rank)
    attention.use_varlen_attention(model, vision=args.vision_varlen, text=args.text_varlen)
    dummy = DummyImage(model, processor)
    optimizer = build_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    print0(f"  {n_params / 1e6:.1f}M parameters, {sum(p.numel() for p in trainable) / 1e6:.1f}M trained; "
             + ", ".join(f"{g['name']} lr {g['base_lr']:g}" for g in optimizer.param_groups))
    if args.lora:
        n_layers = sum(hasattr(m, "lora_A") for m in model.modules())
        n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        full_parts = sorted({param_kind(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n})
        print0(f"  LoRA r {args.lora}, alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}{', DoRA' if args.dora else ''} "
                 f"on {n_layers} linears ({args.lora_targets}): {n_adapter:,} adapter parameters; also trained in full: "
                 f"{', '.join(full_parts) or 'nothing'}")

    # --- resume: weights, optimizer, schedule, this rank's data position and RNG
    step, cursor = 0, 0
    if resume_from is not None:
        loop = load_checkpoint(resume_from, model, optimizer)
        step, schedule = loop["step"], resumed_schedule(args, loop, schedule)
        if loop["world_size"] == world:
            cursor = loop["ranks"][rank]["cursor"]
            set_rng_state(loop["ranks"][rank]["rng"])
        else:  # the data each rank saw cannot be continued exactly; continue at the same global position
            cursor = sum(r["cursor"] for r in loop["ranks"]) // world
            print0(f"  warning: checkpoint has {loop['world_size']} ranks, this run {world}: data order "
                     "continues approximately (a few samples may repeat or be skipped)")
        print0(f"  resuming from {resume_from} at step {step}")
    max_steps, warmup_steps = schedule["max_steps"], schedule["warmup_steps"]
    if rank == 0:  # once the resume checks passed: a refused command leaves the flags of the run it would continue
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    print0(f"  {len(entries)} samples per pass; {max_steps} steps of {world} ranks x {args.grad_accum} "
             f"micro-batches x <= {args.batch_size} samples / {max_tokens} tokens; warmup {warmup_steps} steps")

    # --- data loader (after resume: it starts at this rank's cursor, or with --pack at this step)
    if args.pack:
        stream = PackedSteps(files, entries, lengths, processor, rank, world, args.seed, step,
                             world * args.grad_accum * args.batch_size, args.grad_accum, max_tokens, args.max_length,
                             args.overlong)
    else:
        stream = MixtureStream(files, entries, processor, rank, world, args.seed, cursor, args.max_length, args.overlong)
    # its own generator: starting the iterator draws a seed for the workers, which from the global RNG would happen
    # at step 0 in one run and at the resumed step in another, and shift every later dropout mask (--lora-dropout)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                                         prefetch_factor=4 if args.num_workers else None,
                                         worker_init_fn=worker_ignores_stop_signals if args.num_workers else None,
                                         generator=torch.Generator().manual_seed(args.seed + rank))
    loader_iter = iter(loader)  # starts the workers
    atexit.register(stop_workers, loader_iter)  # atexit runs last-registered first: before multiprocessing's
    if args.pack:
        batches = PackedBatches(loader_iter, step, rank, args.grad_accum * args.batch_size)
    else:
        batches = MicroBatches(loader_iter, cursor, args.batch_size, max_tokens, pass_size=len(entries))

    # --- loop
    logger = Logger(args, out, rank, step)
    flops = peak_flops(device, param_dtype)
    from tqdm import tqdm

    # progress on stdout (stderr is kept for warnings and errors): a bar on a terminal, a line per logged step in
    # a log file
    tty = sys.stdout.isatty()
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0 or not tty, desc="train", dynamic_ncols=True,
               file=sys.stdout)
    while step < max_steps:
        t0 = time.time()
        if args.pack:  # this rank's rows of the step, one forward and backward each
            groups = [row or [filler_sample(processor.pad_token_id)] for row in batches.next()]
            micro = [M.pack(row, model) for row in groups]
        else:
            groups = [batches.next() for _ in range(args.grad_accum)]
            micro = [M.collate(g, processor.pad_token_id) for g in groups]
        counts = step_counts(groups, batches.skipped, len(stop_signals) > 0, device)
        n_supervised = max(1.0, counts["supervised_tokens"])
        loss_sum = forward_backward(model, micro, n_supervised, dummy, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / n_supervised
        stop_if_not_finite(loss, grad_norm, step, ckpt_dir)
        mult = get_lr(step, max_steps, warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # --- log
        dt = time.time() - t0
        tok_s = counts["tokens"] / dt
        metrics = {"step": step, "loss": loss, "lr": args.lr * mult, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                   **{k: int(counts[k]) for k in ("supervised_tokens", "samples", "images", "skipped_overlong")},
                   "step_s": dt}
        if flops:
            metrics["mfu"] = 6 * n_params * tok_s / (flops * world)  # 6N FLOPs per token, attention ignored
        if device.type == "cuda":
            metrics["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            metrics["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS
        if step % args.log_every == 0:
            logger.log(metrics)
            if not tty:
                print0(f"step {step}/{max_steps} loss {loss:.4f} lr {args.lr * mult:.2e} grad_norm {grad_norm:.3f} "
                         f"tokens/s {tok_s:.0f} {dt:.2f} s")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{args.lr * mult:.2e}", tok_s=f"{tok_s:.0f}")
        bar.update(1)

        # --- checkpoint, export; a stop signal seen by any rank: save this step and leave with 143
        stop = counts["ranks_stopping"] > 0 and step < max_steps
        if step % args.save_every == 0 or step == max_steps or stop:
            saved, seconds, gb = save_checkpoint(ckpt_dir, step, model, optimizer,
                                                 {"cursor": batches.cursor, "rng": rng_state()}, args, schedule)
            print0(("\n" if tty else "") + f"  saved {saved} ({gb:.2f} GB) in {seconds:.1f} s")
        if stop:
            print0(f"stopping on a signal after step {step}: saved {saved}; run the same command to resume")
            bar.close()
            logger.close()
            dist.destroy_process_group()
            raise SystemExit(143)
        if args.export_every and step % args.export_every == 0 and step < max_steps:
            export_hf(model, out / "export" / f"step_{step}", args, processor, export_dtype(args))
    bar.close()

    # --- the final Hugging Face export
    export_hf(model, out / "final", args, processor, export_dtype(args))
    if rank == 0 and (out / "metrics.jsonl").exists():
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    logger.close()
    print0(f"done: {step} steps; Hugging Face export in {out / 'final'}")
    stop_workers(loader_iter)
    dist.destroy_process_group()


def export_dtype(args):
    if args.export_dtype == "auto":
        cfg = json.loads((Path(args.model) / "config.json").read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "bfloat16"
        return getattr(torch, name)
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.export_dtype]


if __name__ == "__main__":
    run_cli(main)
