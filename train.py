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
    python model.py --make-tiny ckpt/tiny && python data_prep.py synth --out data/synth --train 200 --val 50
    python train.py --model ckpt/tiny --data data/synth/synth_all_train.jsonl --out runs/tiny --max-steps 100 \
        --batch-size 8 --lr 1e-3      # ~25 s on 2 cores; loss 5.9 -> 3.1

OUT/ holds: args.json, metrics.jsonl (one line per step), loss.png, ckpt/step_00000500/ (torch.distributed
checkpoint: model, optimizer, sampler position, step, RNG; the last --keep-last are kept),
export/step_N/ (with --export-every) and final/: Hugging Face directories (config, safetensors, processor)
loadable by model.load and transformers' AutoModelForImageTextToText (vLLM reads the same layout; not tested
here).

Data: --data "a.jsonl*25,b.jsonl%50,c.jsonl" — `*N` repeats a file N times, `%P` keeps a seeded P% subset.
All entries are shuffled together (a fresh seeded permutation per pass) and dealt to ranks in turn; each
rank builds micro-batches from its share bounded by --batch-size samples and --max-tokens padded tokens.
A step is --grad-accum micro-batches on every rank; its loss is the sum of cross-entropy over supervised
(assistant) tokens divided by their number across all ranks and micro-batches.
"""

import argparse
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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import model as M

# The model's output carries the image features split per image (views); we never modify outputs in place,
# which is what FSDP2's warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

# -----------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description="FSDP2 co-training of Qwen-VL on a mixture of record files",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    # numerics and memory
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype (master weights and gradient reduction are fp32); default bf16 on GPU, fp32 on CPU")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of every decoder and vision block (less memory, ~30%% more compute)")
    p.add_argument("--attn", default=None, help="attention implementation (sdpa, flash_attention_2, ...); default flash_attention_2 when installed on GPU, else sdpa")
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
    return p.parse_args(argv)


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
            raise ValueError(f"bad --data entry '{item}': expected PATH, PATH*N or PATH%P")
        path, repeat, percent = m.group(1).strip(), 1, 100.0
        for op, num in re.findall(r"([*%])([^*%]*)", m.group(2)):
            try:
                value = float(num)
            except ValueError:
                raise ValueError(f"bad --data entry '{item}': '{op}{num}' is not a number") from None
            if op == "*":
                if value != int(value) or value < 1:
                    raise ValueError(f"bad --data entry '{item}': repeat *{num} must be a whole number >= 1 (use %P to subsample)")
                repeat = int(value)
            else:
                if not 0 < value <= 100:
                    raise ValueError(f"bad --data entry '{item}': percent %{num} must be in (0, 100]")
                percent = value
        out.append((path, repeat, percent))
    if not out:
        raise ValueError(f"--data '{spec}' names no file")
    return out


def build_mixture(spec, seed):
    """Read every file of the mixture. Returns (files [(path, records)], entries (N, 2) int64 array of
    (file index, record index)): one pass over the mixture, repeats and subsets applied, not shuffled."""
    files, entries = [], []
    for i, (path, repeat, percent) in enumerate(parse_mixture(spec)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data file '{path}' not found")
        records = M.read_records(path)
        idx = np.arange(len(records))
        if percent < 100:
            # seeded per entry position, so adding a file later in the list does not change this subset
            k = round(len(records) * percent / 100)
            idx = np.sort(np.random.default_rng([seed, i]).choice(len(records), size=k, replace=False))
        files.append((path, records))
        entries += [np.stack([np.full(len(idx), i), idx], 1)] * repeat
    entries = np.concatenate(entries) if entries else np.zeros((0, 2), np.int64)
    if len(entries) == 0:
        raise ValueError(f"--data '{spec}' has no records")
    return files, entries.astype(np.int64)


# -----------------------------------------------------------------------------
# Sampler: an endless, seeded, resumable stream per rank


@functools.lru_cache(maxsize=2)
def pass_permutation(seed, epoch, n):
    """The order of pass `epoch` over the n entries (int64: 8 MB per million entries; two passes cached)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def stream_entry(k, rank, world, n, seed):
    """Index into the mixture's entries of position k of rank `rank`'s stream. The global stream is pass after
    pass over the mixture, each pass a fresh permutation seeded by (seed, pass); rank r takes global positions
    r, r + world, r + 2*world, ... So the stream is a pure function of k and resuming is remembering k."""
    epoch, offset = divmod(k * world + rank, n)
    return int(pass_permutation(seed, epoch, n)[offset])


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
        path, rec = self.record(k)
        try:
            sample = M.tokenize(rec, self.processor)
            n = len(sample["input_ids"])
            if n > self.max_length:
                if self.overlong == "skip":
                    return None
                if self.overlong == "error":
                    raise ValueError(f"{n} tokens > --max-length {self.max_length} (see --overlong)")
                sample = M.tokenize(rec, self.processor, max_length=self.max_length, truncate=True)
        except Exception as e:  # name the record; never swallow (a bad record is a data bug to fix)
            raise RuntimeError(f"cannot tokenize record '{rec['id']}' of {path}: {e}") from e
        sample["id"], sample["n_images"] = rec["id"], len(rec["images"])
        return sample

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
# Model: build on meta, shard, then load


def apply_fsdp(model, param_dtype):
    """FSDP2 as in torchtitan's apply_fsdp: one unit per decoder layer, the vision tower as one unit, then the
    root (embeddings, final norm, lm_head). Master weights and the gradient reduction stay in fp32; compute runs
    in param_dtype. Each unit's parameters are all-gathered just before its forward and freed after."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        # the last layer is the first one backward needs: keep it gathered instead of resharding it
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model.model.visual, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def param_kind(name):
    """'vision', 'merger' or 'llm' for a parameter name of Qwen2.5-VL / Qwen3-VL (transformers 5 layout)."""
    if name.startswith("model.visual.merger") or name.startswith("model.visual.deepstack_merger_list"):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    return "llm"


def build_model(args, device, param_dtype, rank):
    """The sharded model with the checkpoint's weights, in three steps."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    # 1. build on the meta device: no memory, no init cost, the same on every rank
    config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=args.attn, dtype=torch.float32)
    model.config.use_cache = False
    frozen = {"vision": args.freeze_vision, "merger": args.freeze_merger, "llm": args.freeze_llm}
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen[param_kind(name)])
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # 2. shard, then allocate this rank's shards (uninitialised) on the device
    apply_fsdp(model, param_dtype)
    model.to_empty(device=device)

    # 3. rank 0 reads the checkpoint and broadcasts it into everyone's shards. Buffers (the rotary inv_freq)
    # are not in the state dict (non-persistent), so they are broadcast separately.
    full, loaded = {}, None
    if rank == 0:
        loaded, _ = M.load(args.model, dtype=torch.float32, device="cpu", attn="sdpa")
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

    The vision tower is its own FSDP unit: its parameters are all-gathered when it runs and its gradients
    reduce-scattered in backward. Both are collectives, so if one rank's micro-batch has images and another's
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


def build_optimizer(model, args):
    """AdamW with one learning rate per part (vision tower, merger, language model, as RSCoVLM's vision_lr /
    merger_lr) and weight decay on matrices only. Each group keeps its peak lr in 'base_lr'."""
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
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=tuple(args.betas), eps=1e-8)


def get_lr(step, max_steps, warmup_steps, min_ratio):
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warmup to 1, then cosine to
    min_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Checkpoints (resumable, sharded) and exports (Hugging Face)


def complete_checkpoints(ckpt_dir):
    """Complete checkpoints, oldest first. A checkpoint is written to step_N.tmp and renamed to step_N only
    when every rank has finished, so a run killed while saving leaves only a .tmp, which is ignored."""
    ckpt_dir = Path(ckpt_dir)
    found = [d for d in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", d.name) and (d / "loop.pt").is_file()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def save_checkpoint(ckpt_dir, step, model, optimizer, loop_state, args):
    """Model and optimizer shards via torch.distributed.checkpoint (each rank writes its own), plus loop.pt
    from rank 0: step, world size, every rank's sampler cursor and RNG states, args. Then rename, rotate."""
    rank = dist.get_rank()
    final = Path(ckpt_dir) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    loop_states = [None] * dist.get_world_size()
    dist.all_gather_object(loop_states, loop_state)  # also: every rank has finished writing its shards
    if rank == 0:
        torch.save({"step": step, "world_size": len(loop_states), "ranks": loop_states, "args": vars(args)},
                   tmp / "loop.pt")
        if final.exists():  # only when re-running steps after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(ckpt_dir)[: -args.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path, model, optimizer):
    """Load model and optimizer shards in place; returns loop.pt's dict."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(Path(path) / "loop.pt", weights_only=False)


def export_hf(model, out_dir, args, processor, dtype):
    """Gather the full weights on rank 0 and write a Hugging Face directory (config, safetensors, generation
    config, processor) at out_dir, via out_dir.tmp + rename. Collective: every rank must call it."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
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
        state = {k: v.to(dtype) for k, v in full.items()}
        # tied input/output embeddings come back from the gather as two copies; one shared tensor is saved once
        embed = shell.get_input_embeddings().weight
        tied = [k for k, p in shell.named_parameters(remove_duplicate=False) if p is embed]
        for k in tied[1:]:
            state[k] = state[tied[0]]
        shell.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)  # with the training pixel budget: Qwen2.5-VL boxes depend on it
        (tmp / "training_args.json").write_text(json.dumps(vars(args), indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    del full
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
# Distributed setup


def init_distributed():
    """(rank, world, device). Under torchrun: the usual env:// init. As a plain `python train.py`: a one-process
    group (FSDP2 still needs a process group)."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    else:
        local_rank = 0
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


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


def main(argv=None):
    args = get_args(argv)
    rank, world, device = init_distributed()
    out = Path(args.out)
    ckpt_dir = out / "ckpt"
    param_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.attn is None:
        args.attn = "sdpa"
        if device.type == "cuda":
            try:
                import flash_attn  # noqa: F401

                args.attn = "flash_attention_2"
            except ImportError:
                pass
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    M.print0(f"rscovlm train: {world} rank(s) on {device.type}, compute {param_dtype}, attention {args.attn}")

    # which checkpoint to resume from (decided before the slow part)
    existing = complete_checkpoints(ckpt_dir)
    if args.resume == "none" and existing:
        raise SystemExit(f"{ckpt_dir} already has checkpoints ({existing[-1].name}): use --resume auto or a new --out")
    resume_from = existing[-1] if args.resume == "auto" and existing else None
    if args.resume not in ("auto", "none"):
        resume_from = Path(args.resume)
        if not (resume_from / "loop.pt").is_file():
            raise SystemExit(f"--resume {resume_from}: not a complete checkpoint (no loop.pt)")

    # --- data
    processor = M.load_processor(args.model, args.min_pixels, args.max_pixels)
    files, entries = build_mixture(args.data, args.seed)
    per_file = np.bincount(entries[:, 0], minlength=len(files))
    for (path, repeat, percent), n in zip(parse_mixture(args.data), per_file):
        M.print0(f"  {path}: x{repeat} {percent:g}% -> {n} samples per pass ({100 * n / len(entries):.1f}%)")
    max_tokens = args.max_tokens or args.batch_size * args.max_length
    if args.max_steps <= 0:
        args.max_steps = math.ceil(args.epochs * len(entries) / (world * args.grad_accum * args.batch_size))
    warmup_steps = round(args.warmup_ratio * args.max_steps)
    M.print0(f"  {len(entries)} samples per pass; {args.max_steps} steps of {world} ranks x {args.grad_accum} "
             f"micro-batches x <= {args.batch_size} samples / {max_tokens} tokens; warmup {warmup_steps} steps")

    # --- model, optimizer
    model = build_model(args, device, param_dtype, rank)
    dummy = DummyImage(model, processor)
    optimizer = build_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    M.print0(f"  {n_params / 1e6:.1f}M parameters, {sum(p.numel() for p in trainable) / 1e6:.1f}M trained; "
             + ", ".join(f"{g['name']} lr {g['base_lr']:g}" for g in optimizer.param_groups))

    # --- resume
    step, cursor = 0, 0
    if resume_from is not None:
        loop = load_checkpoint(resume_from, model, optimizer)
        step = loop["step"]
        if loop["world_size"] == world:
            cursor = loop["ranks"][rank]["cursor"]
            set_rng_state(loop["ranks"][rank]["rng"])
        else:  # the data each rank saw cannot be continued exactly; continue at the same global position
            cursor = sum(r["cursor"] for r in loop["ranks"]) // world
            M.print0(f"  warning: checkpoint has {loop['world_size']} ranks, this run {world}: data order "
                     "continues approximately (a few samples may repeat or be skipped)")
        M.print0(f"  resuming from {resume_from} at step {step}")

    # --- data loader (after resume: it starts at this rank's cursor)
    stream = MixtureStream(files, entries, processor, rank, world, args.seed, cursor, args.max_length, args.overlong)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.num_workers,
                                         prefetch_factor=4 if args.num_workers else None)
    batches = MicroBatches(iter(loader), cursor, args.batch_size, max_tokens, pass_size=len(entries))

    # --- preemption: schedulers send SIGTERM some seconds before killing a job (Slurm: KillWait; torchrun
    # forwards it and waits ~30 s); `scancel --signal=USR1` asks for the same earlier. The flag rides on the
    # per-step all-reduce below, so every rank finishes the same step, saves a checkpoint and exits 143.
    # DataLoader workers fork after this and inherit the handler, so they keep serving instead of dying.
    preempted = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: preempted.append(signum))

    # --- loop
    logger = Logger(args, out, rank, step)
    flops = peak_flops(device, param_dtype)
    from tqdm import tqdm

    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    while step < args.max_steps:
        t0 = time.time()
        micro = [batches.next() for _ in range(args.grad_accum)]
        micro = [M.collate(m, processor.pad_token_id) for m in micro]
        # counts over all ranks and micro-batches of this step: supervised tokens (the loss normaliser),
        # tokens, samples, images, overlong skips, ranks asked to stop
        counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro),
                               sum(int(b["attention_mask"].sum()) for b in micro),
                               sum(len(b["input_ids"]) for b in micro),
                               sum(len(b["image_grid_thw"]) if b["image_grid_thw"] is not None else 0 for b in micro),
                               batches.skipped, len(preempted) > 0], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        n_supervised = max(1.0, counts[0].item())
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
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / n_supervised
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            latest = complete_checkpoints(ckpt_dir)
            if rank == 0:
                print(f"\nerror: step {step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); stopping "
                      "before the optimizer step. The last good checkpoint is "
                      f"{latest[-1] if latest else '(none)'}; lower --lr or check the data, then resume with "
                      "--resume auto.", file=sys.stderr, flush=True)
            dist.destroy_process_group()
            raise SystemExit(1)
        mult = get_lr(step, args.max_steps, warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # --- log
        dt = time.time() - t0
        tok_s = counts[1].item() / dt
        metrics = {"step": step, "loss": loss, "lr": args.lr * mult, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                   "supervised_tokens": int(counts[0].item()), "samples": int(counts[2].item()),
                   "images": int(counts[3].item()), "skipped_overlong": int(counts[4].item()), "step_s": dt}
        if flops:
            metrics["mfu"] = 6 * n_params * tok_s / (flops * world)  # 6N FLOPs per token, attention ignored
        if device.type == "cuda":
            metrics["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            metrics["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS
        if step % args.log_every == 0:
            logger.log(metrics)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{args.lr * mult:.2e}", tok_s=f"{tok_s:.0f}")
        bar.update(1)

        # --- checkpoint, export
        stop = counts[5].item() > 0 and step < args.max_steps
        if step % args.save_every == 0 or step == args.max_steps or stop:
            saved = save_checkpoint(ckpt_dir, step, model, optimizer, {"cursor": batches.cursor, "rng": rng_state()}, args)
        if stop:
            M.print0(f"\nstopping on a signal after step {step}: saved {saved}; run the same command to resume")
            bar.close()
            logger.close()
            dist.destroy_process_group()
            raise SystemExit(143)
        if args.export_every and step % args.export_every == 0 and step < args.max_steps:
            export_hf(model, out / "export" / f"step_{step}", args, processor, export_dtype(args))
    bar.close()

    export_hf(model, out / "final", args, processor, export_dtype(args))
    if rank == 0 and (out / "metrics.jsonl").exists():
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    logger.close()
    M.print0(f"done: {step} steps; Hugging Face export in {out / 'final'}")
    del loader
    dist.destroy_process_group()


def export_dtype(args):
    if args.export_dtype == "auto":
        cfg = json.loads((Path(args.model) / "config.json").read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "bfloat16"
        return getattr(torch, name)
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.export_dtype]


if __name__ == "__main__":
    main()
