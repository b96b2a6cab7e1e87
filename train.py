"""
train.py — co-train Qwen2.5-VL / Qwen3-VL on a mixture of record files (every task, text-only records too)
with FSDP2, on one GPU, one node or many nodes; resumable and preemptible; CPU (gloo) for the tiny model and
the tests. docs/training.md explains every flag; launch.sh's header has the one-node, two-node and Slurm commands.

Read top to bottom: arguments -> the mixture -> the step planner (which samples each rank trains on at step g) ->
model (meta -> shard -> load) -> FLOPs -> optimizer and schedule -> checkpoints and exports -> logging -> process
supervision (signals, DataLoader workers, launch.sh's status files) -> one step -> main(), the recipe.

    bash launch.sh --model ckpt/Qwen2.5-VL-7B-Instruct --out runs/cotrain --ac full \
        --data "data/dota/dota_train_512.jsonl*25,data/rsvqa/rsvqa_lr_train.jsonl*2,data/cap/rsicd_train.jsonl%50"
    # tiny CPU demo, one process
    python synth.py model ckpt/tiny && python synth.py data --out data/synth --train 200 --val 50
    python train.py --model ckpt/tiny --data data/synth/synth_all_train.jsonl --out runs/tiny --max-steps 100 \
        --batch-size 8 --lr 1e-3

OUT/ holds args.json (the flags as given), resolved.json (what they resolved to: dtype, attention, kernel),
metrics.jsonl, loss.png, ckpt/step_N/ (resumable: trained parameters, optimizer, step, stream position, RNG),
export/step_N/ (--export-every) and final/: Hugging Face folders, written to a temporary name and renamed, never
rewritten once there.
"""

import argparse
import atexit
import contextlib
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
import flops
import mixture
import model as M
from common import UserError, add_debug_flag, print0, run_cli


# The model's output carries the image features split per image (views); we never modify outputs in place,
# which is what FSDP2's warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

# -----------------------------------------------------------------------------
# Arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not for None/False defaults, nor where the help text already says it; the help
    column far enough right that a flag and its value fit before it."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36)

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line naming the flag, exit 2 (also through launch.sh, where
    every rank would otherwise print argparse's usage block)."""

    def error(self, message):
        raise UserError(f"{message} (train.py --help lists the flags)")


ATTENTION = ["sdpa", "flash_attention_2", "eager", "varlen"]


def get_args(argv=None):
    p = ArgumentParser(description="FSDP2 co-training of Qwen-VL on a mixture of record files (docs/training.md)",
                       usage="train.py --model DIR --data SPEC --out DIR [flags]", formatter_class=HelpFormatter)
    # what to train, on what, where
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder to start from (Qwen2.5-VL or Qwen3-VL)")
    p.add_argument("--data", required=True, help='record files: "a.jsonl*25,b.jsonl%%50,c.jsonl" (*N repeat, %%P seeded subset)')
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics, exports")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, subsets, adapters and RNG")
    # length of training
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps; 0 = --epochs passes over the mixture")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the mixture when --max-steps is 0")
    # batch
    p.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step per rank")
    p.add_argument("--max-tokens", type=int, default=0, help="most tokens in one micro-batch or packed row; 0 = batch-size x max-length")
    p.add_argument("--max-length", type=int, default=6144, help="most tokens in one sample, image tokens included")
    p.add_argument("--pack", action="store_true", help="pack each step's samples into rows balanced over the ranks (no padding)")
    p.add_argument("--overlong", default="skip", choices=["skip", "truncate", "error"], help="a sample over --max-length")
    p.add_argument("--min-pixels", type=int, default=None, help="image pixel budget floor (default: the checkpoint's)")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel budget ceiling (default: the checkpoint's)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank; 0 = in the main process")
    # optimizer and schedule
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of the language model")
    p.add_argument("--vision-lr", type=float, default=None, help="peak learning rate of the vision tower (default: --lr)")
    p.add_argument("--merger-lr", type=float, default=None, help="peak learning rate of the merger (default: --lr)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="the cosine ends at this fraction of the peak")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="linear warmup over this fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay, matrices only")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip; 0 = none")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower (merger excluded)")
    p.add_argument("--freeze-merger", action="store_true", help="do not train the vision-language merger")
    p.add_argument("--freeze-llm", action="store_true", help="do not train the language model")
    # LoRA (PEFT)
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA adapters of rank R instead of the targeted weights; 0 = none")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="ALPHA", help="LoRA scale numerator (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, metavar="P", help="dropout on the adapters' input (default 0.05)")
    p.add_argument("--lora-targets", default=None, choices=["llm", "llm+vision"], help="linears that get adapters (default llm)")
    p.add_argument("--dora", action="store_true", help="DoRA: the adapters also learn each row's magnitude")
    # numerics, memory, parallelism
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--ac", default="none", metavar="none|full|vision|every-K", help="activation checkpointing")
    p.add_argument("--hsdp", default="auto", choices=["auto", "on", "off"], help="shard within a node, replicate across nodes")
    p.add_argument("--hsdp-replicas", type=int, default=0, metavar="N", help="HSDP replicas; 0 = the number of nodes")
    p.add_argument("--vision-shard", default="tower", choices=["tower", "blocks"], help="FSDP units of the vision tower")
    p.add_argument("--attn", default=None, choices=ATTENTION, help="language-model attention (default: see docs/training.md)")
    p.add_argument("--vision-attn", default=None, choices=ATTENTION, help="vision-tower attention: varlen or --attn's")
    p.add_argument("--dist-timeout", type=float, default=60, help="minutes a collective waits for the slowest rank")
    # checkpoints, exports, logging
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in OUT/ckpt), none, or a checkpoint folder")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept")
    p.add_argument("--export-every", type=int, default=0, help="steps between OUT/export/step_N; 0 = only OUT/final")
    p.add_argument("--export-dtype", default="auto", choices=["auto", "bf16", "fp32"], help="exported weights; auto = --model's")
    p.add_argument("--log-every", type=int, default=1, help="steps between metrics lines")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb (when installed)")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to this W&B project (when installed)")
    p.add_argument("--run-name", default=None, help="W&B run name (default: the name of --out)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if not re.fullmatch(r"none|full|vision|every-[1-9]\d*", args.ac):
        p.error(f"argument --ac: expected none, full, vision or every-K (K >= 1), got '{args.ac}'")
    for flag in ("batch_size", "grad_accum", "max_length", "save_every", "keep_last", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"argument --{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if Path(args.out).is_file():
        raise UserError(f"--out {args.out} is a file: give a folder (it is created if missing)")
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
# Model: build on meta, shard, then load

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def choose_attention(args, device, dtype):
    """What --attn / --vision-attn (and --dtype) resolve to, without touching args: {"attn": the transformers
    implementation the model is built with, "text_varlen" / "vision_varlen": which parts then run
    attention.varlen_attention instead, "varlen_kernel"}. Flash kernels take bf16/fp16 only, so fp32 never gets one
    by default (attention.varlen_kernel(device, dtype) answers 'reference' for it: the exact masked sdpa call); a CPU
    has no kernel to ask about."""
    kernel = attention.varlen_kernel(device, dtype) if device.type == "cuda" else "reference"
    builtin = "sdpa" if dtype == torch.float32 else attention.default_attn(device)  # flash_attention_2 when installed on GPU
    text = args.attn or ("varlen" if args.pack and kernel != "reference" and builtin == "sdpa" else builtin)
    if text == "varlen" and not args.pack:
        raise UserError("--attn varlen needs --pack (it runs packed rows without padding)")
    if text == "flash_attention_2" and dtype == torch.float32:
        raise UserError("--attn flash_attention_2 with --dtype fp32: flash kernels take bf16 only; use --attn sdpa or --dtype bf16")
    impl = "sdpa" if text == "varlen" else text
    vision = args.vision_attn or ("varlen" if kernel != "reference" else impl)
    if vision not in ("varlen", impl):
        raise UserError(f"--vision-attn {vision}: give varlen or the language model's ({impl})")
    if device.type == "cuda" and vision != "varlen" and "flash" not in impl and dtype != torch.float32:
        warnings.warn("no varlen attention kernel (flash_attn, or torch >= 2.10's varlen_attn on sm80+): the vision "
                      "tower runs one sdpa call per window, measured on an H100 at ~76% of a 7B step (attention.py). "
                      "Install flash-attn or a newer torch.")
    return {"attn": impl, "text_varlen": text == "varlen", "vision_varlen": vision == "varlen", "varlen_kernel": kernel}



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
             if isinstance(m, torch.nn.Linear) and name != "lm_head" and M.param_kind(name + ".weight") in kinds]
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
        kind = M.param_kind(name)
        p.requires_grad_("lora_" in name if kind in lora_kinds else not frozen[kind])  # PEFT's own adapter test


def build_model(args, device, run, rank):
    """The sharded model with the checkpoint's weights, in three steps; then the attention choices of `run`
    (choose_attention)."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForImageTextToText

    # 1. build on the meta device: no memory, no init cost, the same on every rank
    config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=run["attn"], dtype=torch.float32)
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
    apply_fsdp(model, DTYPES[run["dtype"]], mesh, args.vision_shard)
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
    attention.use_varlen_attention(model, vision=run["vision_varlen"], text=run["text_varlen"])
    M.use_linear_patch_embed(model)
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
    merger_lr) and weight decay on matrices only. Each group keeps its peak lr in 'base_lr'. fused: torch's
    fused kernel, CPU or CUDA (the default; False: torch's per-parameter loop on CPU, a few launches per op on GPU)."""
    peak = {"vision": args.vision_lr or args.lr, "merger": args.merger_lr or args.lr, "llm": args.lr}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind, decay = M.param_kind(name), p.ndim >= 2
        key = f"{kind}{'' if decay else '_no_decay'}"
        groups.setdefault(key, {"name": key, "params": [], "base_lr": peak[kind],
                                "weight_decay": args.weight_decay if decay else 0.0})["params"].append(p)
    if not groups:
        raise ValueError("every parameter is frozen: drop one of --freeze-vision/--freeze-merger/--freeze-llm")
    # fused: every parameter of a group in one kernel on GPU; on CPU, the demo's step 0.38 -> 0.32 s (torch's
    # CPU default is one parameter at a time)
    return torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=tuple(args.betas), eps=1e-8,
                             fused=None if fused is False else True)


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
    """{"max_steps", "warmup_steps"}: --max-steps, or --epochs passes over the mixture (a step takes world x
    grad-accum x batch-size entries)."""
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


def save_checkpoint(ckpt_dir, step, position, model, optimizer, args, schedule):
    """Trained parameters and optimizer shards via torch.distributed.checkpoint (each rank writes its own, all at
    once), plus loop.pt from rank 0: step, `position` (where the next step starts in the stream), world
    size, every rank's RNG states, the schedule, args. Then rename, rotate. Returns (path, seconds, GB written by
    all ranks)."""
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
    dist.all_gather_object(loop_states, {"rng": rng_state()})  # also: every rank has finished writing its shards
    gb = 0.0
    if rank == 0:
        torch.save({"step": step, "position": position, "world_size": len(loop_states), "ranks": loop_states,
                    "schedule": schedule, "args": vars(args)}, tmp / "loop.pt")
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


def resume_point(loop, path, world, rank):
    """(step, stream position of that step) of a checkpoint's loop.pt, and this rank's RNG restored when the
    world size is the same (else each rank keeps its fresh seed: the data continues exactly, dropout masks do not).
    A checkpoint written before the step planner holds per-rank stream cursors instead of a position: the data
    continues at the slowest rank's place (exact for --pack runs, whose cursors were equal; otherwise the other
    ranks' last few samples come again), said in one line."""
    if loop["world_size"] == world:
        set_rng_state(loop["ranks"][rank]["rng"])
    else:
        print0(f"  the checkpoint has {loop['world_size']} ranks, this run {world}: the data continues at the same "
               "place, each rank's random state starts afresh")
    if "position" in loop:
        return loop["step"], loop["position"]
    position = min(r["cursor"] for r in loop["ranks"]) * loop["world_size"]
    print0(f"  {path} predates the step planner (per-rank stream cursors): continuing at stream position {position}, "
           "the slowest rank's; samples between the ranks' cursors may come twice")
    return loop["step"], position


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
    shutil.rmtree(out_dir, ignore_errors=True)  # only a half-written one: the merged export comes after it
    os.replace(tmp, out_dir)


def export_hf(model, out_dir, args, processor, dtype):
    """Gather the full weights on rank 0 and write a Hugging Face folder (config, safetensors, generation config,
    processor) at out_dir, via out_dir.tmp + rename, so a reader never sees it half-written; with --lora the
    adapters merged in, and before it the adapter alone in PEFT's format at {out_dir}_adapter. A finished export
    (out_dir exists) is never rewritten: a reader may be using it (re-running a finished command with --resume
    auto). Collective: every rank must call it."""
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    out_dir = Path(out_dir)
    done = [out_dir.is_dir() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(done, src=0)  # the same answer on every rank: all gather, or none
    if done[0]:
        print0(f"  {out_dir} is already written: kept as it is (a finished export is never rewritten)")
        return
    full, trained = gather_full_state(model, dtype)
    if dist.get_rank() == 0:
        config = AutoConfig.from_pretrained(args.model)
        if args.lora:
            with torch.device("meta"):
                shell = AutoModelForImageTextToText.from_config(config)
            save_adapter(shell, trained, args, out_dir.with_name(out_dir.name + "_adapter"))
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while exporting
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
        os.replace(tmp, out_dir)
    del full, trained
    dist.barrier()


def export_dtype(args):
    if args.export_dtype == "auto":
        cfg = json.loads((Path(args.model) / "config.json").read_text())
        name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "bfloat16"
        return getattr(torch, name)
    return DTYPES[args.export_dtype]


# -----------------------------------------------------------------------------
# Logging: rank 0 only; the others get no-ops


class Logger:
    """metrics.jsonl every --log-every steps, TensorBoard and W&B when asked for and installed, and progress on
    stdout (stderr is kept for warnings and errors): a bar on a terminal, a plain line per logged step in a log
    file (nohup, Slurm)."""

    def __init__(self, args, out, rank, start_step, max_steps):
        from tqdm import tqdm

        self.on, self.tb, self.wandb, self.every = rank == 0, None, None, args.log_every
        self.path, self.tty = out / "metrics.jsonl", sys.stdout.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not (self.on and self.tty), desc="train",
                        dynamic_ncols=True, file=sys.stdout)
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

    def log(self, m):
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        self.bar.update(1)
        if not self.on or m["step"] % self.every:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if not self.tty:
            mfu = f" mfu {m['mfu']:.3f}" if "mfu" in m else ""
            print(f"step {m['step']}/{self.bar.total} loss {m['loss']:.4f} lr {m['lr']:.2e} grad_norm {m['grad_norm']:.3f} "
                  f"tokens/s {m['tokens_per_s']:.0f}{mfu} {m['step_s']:.2f} s", flush=True)
        if self.tb:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, m["step"])
        if self.wandb:
            self.wandb.log(m, step=m["step"])

    def close(self):
        self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def step_metrics(step, loss, lr, grad_norm, counts, seconds, peaks, world, device):
    """The metrics line of a step. mfu: model FLOPs (flops.step_flops, all ranks) / time / the card's spec bf16 peak x
    ranks (the number papers report); mfu_measured: the same against the matmul peak measured at start."""
    m = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": counts["tokens"] / seconds,
         **{k: int(counts[k]) for k in ("supervised_tokens", "samples", "images", "skipped_overlong")},
         "flops": counts["flops"], "step_s": seconds}
    for key, peak in peaks.items():
        if peak:
            m[key] = counts["flops"] / seconds / (peak * world)
    if device.type == "cuda":
        m["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        m["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS
    return m


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


# -----------------------------------------------------------------------------
# Process supervision: stop signals, DataLoader workers, launch.sh's status files
#
# Preemption: schedulers send SIGTERM some time before killing a job (Slurm: KillWait, or earlier with
# `#SBATCH --signal=USR1@N`), to one process, a process group or every process of the job. Each rank only notes
# the signal; the note rides on the next step's all-reduce (step_counts), so every rank finishes the same step,
# saves a checkpoint and exits 143. DataLoader workers get the signal too and ignore it; their rank ends them.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def catch_stop_signals():
    """Note SIGTERM / SIGUSR1 instead of dying of them; returns the list the handler appends to. Installed first
    thing, so a signal during loading is not lost."""
    caught = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    return caught


def worker_ignores_stop_signals(worker_id):
    """DataLoader worker_init_fn. torch gives workers a SIGTERM handler that exits: they would die before their
    rank has saved. They ignore the stop signals; the rank decides when to stop and then ends them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def start_loader(dataset, args, rank, device):
    """The iterator of a DataLoader over `dataset` (one item per step), its workers started."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=args.num_workers, prefetch_factor=2 if args.num_workers else None,
        worker_init_fn=worker_ignores_stop_signals if args.num_workers else None,
        # its own generator: starting the iterator draws a seed for the workers, which from the global RNG would
        # happen at step 0 in one run and at the resumed step in another, and shift every later dropout mask
        generator=torch.Generator().manual_seed(args.seed + rank),
        pin_memory=device.type == "cuda")  # page-locked batches: their copies to the GPU do not block the host
    it = iter(loader)  # starts the workers
    atexit.register(stop_workers, it)  # atexit runs last-registered first: before multiprocessing's
    return it


def stop_workers(loader_iter):
    """End a DataLoader iterator's worker processes now: the DataLoader's own shutdown, then SIGKILL for any
    that is still there. Registered with atexit when the loader starts, so it runs on every way out (done, 143,
    an input error, a crash) and before multiprocessing's own exit handler, which would send the workers SIGTERM,
    which they ignore, and then wait for them forever."""
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


def launched(main):
    """The entry point. Run plainly or by torchrun: common.run_cli (an input error is one line `error: ...`, exit
    2). Under launch.sh (RSCOVLM_STATUS_DIR set), its status files instead: each rank writes STATUS/rankL.pid at
    start and STATUS/rankL.exit (0 done, 2 input error, 143 stopped after saving, else failed) at the end, and the
    first rank with an input error writes its line to STATUS/error. launch.sh forwards stop signals to the pids,
    ends the other ranks when one fails (they would wait in a collective) and reports the outcome, the error line
    last; so a rank whose outcome it reports exits 0 (torchrun reports a non-zero rank with a 40-line block)."""
    status = os.environ.get("RSCOVLM_STATUS_DIR")
    if not status:
        run_cli(main)
    status, name = Path(status), f"rank{os.environ.get('LOCAL_RANK', 0)}"
    (status / f"{name}.pid").write_text(str(os.getpid()))
    code = 1
    try:
        main()
        code = 0
    except UserError as e:
        code = 2
        with contextlib.suppress(FileExistsError), open(status / "error", "x") as f:
            f.write(f"rank {os.environ.get('RANK', 0)}: error: {' '.join(str(e).split())}")
        if "--debug" in sys.argv[1:]:
            raise
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:  # a crash too (code 1; its traceback follows)
        (status / f"{name}.exit").write_text(f"{code}\n")
    sys.exit(0 if code in (0, 2, 143) else code)


# -----------------------------------------------------------------------------
# Setup and one optimizer step


def setup(args):
    """Process group (a one-process group for a plain `python train.py`: FSDP2 needs one), the CUDA allocator,
    seeds, TF32, the attention choices. Returns (rank, world, device, run): run = what the flags resolved to."""
    allocator_default()
    device = M.init_dist(single_process_group=True, timeout_minutes=args.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    run = {"dtype": dtype, **choose_attention(args, device, DTYPES[dtype]), "world_size": world}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    print0(f"rscovlm train: {world} rank(s) on {device.type}, compute {dtype}, attention: language model "
           f"{'varlen' if run['text_varlen'] else run['attn']}, vision {'varlen' if run['vision_varlen'] else run['attn']}"
           + (f" ({run['varlen_kernel']} kernel)" if run["text_varlen"] or run["vision_varlen"] else ""))
    return rank, world, device, run


def allocator_default():
    """expandable_segments for PyTorch's CUDA allocator unless the user set its options: rows of varying length
    (900 tokens one step, 6,144 the next) leave the default allocator's fixed-size blocks fragmented until an
    out-of-memory with free memory left; expandable segments grow one mapping instead. Read when CUDA first
    allocates, so set before the process group (and with it CUDA) starts."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


# What every step sums over all ranks and micro-batches, in one all-reduce.
STEP_COUNTS = ("supervised_tokens", "tokens", "samples", "images", "skipped_overlong", "flops", "ranks_stopping")


def step_counts(info, rank, stopping, costs, config, device):
    """{name: sum over ranks} of STEP_COUNTS for this step (info: mixture.Steps's): supervised tokens (the loss
    normaliser), tokens, samples, images, overlong records skipped (every rank plans the same step: counted on
    rank 0), model FLOPs, and the ranks that caught a stop signal (so every rank stops after the same step)."""
    samples = info["samples"]
    local = {"supervised_tokens": sum(s[1] for s in samples), "tokens": sum(s[0] for s in samples),
             "samples": len(samples), "images": sum(0 if g is None else len(g) for _, _, g in samples),
             "skipped_overlong": info["skipped"] if rank == 0 else 0,
             "flops": sum(flops.step_flops(costs, config, samples).values()), "ranks_stopping": int(stopping)}
    counts = torch.tensor([local[k] for k in STEP_COUNTS], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return dict(zip(STEP_COUNTS, counts.tolist()))


def forward_backward(model, micro, n_supervised, dummy, device):
    """Forward and backward of this rank's micro-batches; gradients of (sum of cross-entropy over supervised
    tokens of all ranks) / n_supervised. Returns this rank's summed cross-entropy (float64 tensor)."""
    world = dist.get_world_size()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        labels = b.pop("labels")  # (B, T), on the host
        # only positions whose next token is supervised need logits (B, K, vocab): saves the vocab-wide projection
        # of every prompt and image token. Found on the host: no wait for the GPU
        keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # (K,)
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long)
        targets = labels[:, keep + 1].flatten().to(device, non_blocking=True)  # (B * K,)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items() if v is not None}
        dummy.active = "pixel_values" not in b
        logits = model(**b, logits_to_keep=keep.to(device, non_blocking=True), use_cache=False).logits  # (B, K, V)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100, reduction="sum")
        # FSDP averages gradients over ranks; x world makes the result the gradient of the global sum / N
        (ce * world / n_supervised).backward()
        loss_sum += ce.detach()
    return loss_sum


def train_step(model, optimizer, trainable, micro, n_supervised, lr_mult, dummy, device, args):
    """Forward, backward, clip, AdamW at lr_mult x each group's peak. Returns (loss per supervised token over
    all ranks, gradient norm); a non-finite one stops before the optimizer step (the caller does)."""
    loss_sum = forward_backward(model, micro, n_supervised, dummy, device)
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else float("inf"))
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
    dist.all_reduce(loss_sum)
    loss = loss_sum.item() / n_supervised
    if math.isfinite(loss) and math.isfinite(grad_norm):
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


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


def describe_model(model, optimizer, args):
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"  {n_params / 1e6:.1f}M parameters, {n_trained / 1e6:.1f}M trained; "
           + ", ".join(f"{g['name']} lr {g['base_lr']:g}" for g in optimizer.param_groups))
    if args.lora:
        n_layers = sum(hasattr(m, "lora_A") for m in model.modules())
        n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        full_parts = sorted({M.param_kind(n) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n})
        print0(f"  LoRA r {args.lora}, alpha {args.lora_alpha:g}, dropout {args.lora_dropout:g}{', DoRA' if args.dora else ''} "
               f"on {n_layers} linears ({args.lora_targets}): {n_adapter:,} adapter parameters; also trained in full: "
               f"{', '.join(full_parts) or 'nothing'}")


def write_run_files(out, args, run, rank):
    """OUT/args.json (the flags as given) and OUT/resolved.json (what they resolved to), by rank 0. The run folder
    is made here, once every input has been checked: an input error leaves no empty folder behind."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
        (out / "resolved.json").write_text(json.dumps(run, indent=2))


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    stop_signals = catch_stop_signals()  # first thing: a signal while loading is not lost
    rank, world, device, run = setup(args)
    out, ckpt_dir = Path(args.out), Path(args.out) / "ckpt"
    resume_from = choose_resume(args, ckpt_dir)  # decided before the slow part
    if resume_from is not None:
        check_trained_flags(args, resume_from)

    # --- data: the mixture, every record's length (what the step planner plans with), the schedule
    processor = M.load_processor(args.model, args.min_pixels, args.max_pixels)
    files, entries = mixture.build_mixture(args.data, args.seed)
    lengths = mixture.record_lengths(files, processor, args.max_length, args.overlong, device)
    schedule = make_schedule(args, len(entries), world)

    # --- model, optimizer
    model = build_model(args, device, run, rank)
    dummy = DummyImage(model, processor)
    optimizer = build_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    costs = flops.matmul_costs(model)  # FLOPs per token of what trains and what does not
    describe_model(model, optimizer, args)

    # --- resume: weights, optimizer, schedule, where the stream continues, this rank's RNG
    step, position = 0, 0
    if resume_from is not None:
        loop = load_checkpoint(resume_from, model, optimizer)
        schedule = resumed_schedule(args, loop, schedule)
        step, position = resume_point(loop, resume_from, world, rank)
        print0(f"  resuming from {resume_from} at step {step}")
    write_run_files(out, args, run, rank)  # after the resume checks: a refused command leaves the run's own
    max_steps, warmup_steps = schedule["max_steps"], schedule["warmup_steps"]
    planner = mixture.StepPlanner(entries, lengths, args, world, step, position)
    print0(f"  {len(entries)} samples per pass; {max_steps} steps of {planner.per_step} samples ({world} ranks x "
           f"{args.grad_accum} x {args.batch_size}{', packed' if args.pack else ''}); warmup {warmup_steps} steps")

    # --- data loader: this rank's micro-batches of steps step, step + 1, ..., made in its worker processes
    batches = start_loader(mixture.Steps(planner, rank, step, files, processor, model, args), args, rank, device)

    # --- loop
    logger = Logger(args, out, rank, step, max_steps)
    peaks = flops.mfu_peaks(device, DTYPES[run["dtype"]])
    while step < max_steps:
        t0 = time.time()
        g, micro, info = next(batches)
        assert g == step, f"steps out of order: got {g}, expected {step}"
        if micro is None:
            raise UserError(info)
        counts = step_counts(info, rank, len(stop_signals) > 0, costs, model.config, device)
        n_supervised = max(1.0, counts["supervised_tokens"])
        lr_mult = get_lr(step, max_steps, warmup_steps, args.min_lr_ratio)
        loss, grad_norm = train_step(model, optimizer, trainable, micro, n_supervised, lr_mult, dummy, device, args)
        stop_if_not_finite(loss, grad_norm, step, ckpt_dir)
        step += 1
        logger.log(step_metrics(step, loss, args.lr * lr_mult, grad_norm, counts, time.time() - t0, peaks, world, device))

        # --- checkpoint, export; a stop signal seen by any rank: save this step and leave with 143
        stop = counts["ranks_stopping"] > 0 and step < max_steps
        if step % args.save_every == 0 or step == max_steps or stop:
            saved, seconds, gb = save_checkpoint(ckpt_dir, step, planner.position(step), model, optimizer, args, schedule)
            print0(("\n" if logger.tty else "") + f"  saved {saved} ({gb:.2f} GB) in {seconds:.1f} s")
        if stop:
            print0(f"stopping on a signal after step {step}: saved {saved}; run the same command to resume")
            logger.close()
            dist.destroy_process_group()
            raise SystemExit(143)
        if args.export_every and step % args.export_every == 0 and step < max_steps:
            export_hf(model, out / "export" / f"step_{step}", args, processor, export_dtype(args))

    # --- the final Hugging Face export
    logger.close()
    export_hf(model, out / "final", args, processor, export_dtype(args))
    if rank == 0 and (out / "metrics.jsonl").exists():
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    print0(f"done: {step} steps; Hugging Face export in {out / 'final'}")
    stop_workers(batches)
    dist.destroy_process_group()


if __name__ == "__main__":
    launched(main)
