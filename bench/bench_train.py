"""
bench_train.py — training throughput of the project's step (train.py) against the plain transformers path, side by
side: the same samples, the same initial weights, one process, one device.

Variants, each measured in the same run:
  hf                     the plain transformers path: the Hugging Face model called on a right-padded batch
                         (model.collate), sdpa everywhere (the vision tower then loops over its windows), loss from
                         `labels=` (cross-entropy over supervised tokens), torch AdamW (not fused), no FSDP
  hf+ac-full             the same with transformers' gradient checkpointing (what HF users turn on for memory)
  hf+flash               the same with attn_implementation="flash_attention_2" where flash_attn imports (a GPU in
                         bf16): what a user with flash-attn installed gets from transformers alone
  project[+varlen][+pack][+fused][+ac-K]
                         train.py's step: train.apply_fsdp on a 1-process mesh, train.forward_backward,
                         train.build_optimizer, the patch embedding as a matmul (model.use_linear_patch_embed);
                         +varlen = the vision tower through attention.varlen_attention (one call per block), +pack =
                         packed rows (mixture.pack_rows + model.pack; language-model attention varlen too on a GPU
                         with a varlen kernel), +fused = fused AdamW (train.py's default), +blocks = one FSDP unit
                         per vision block (train.py --vision-shard blocks), +ac-vision / +ac-full = activation
                         checkpointing of the vision blocks / of every block (train.py --ac)
Per variant: step time (median after warm-up), tokens/s, padding fraction, attention calls per step (vision and
language model, counted by wrapping transformers' attention functions), MFU (flops.step_flops, the formula
train.py logs with, against the card's spec bf16 peak and, separately, a matmul peak measured in this run), peak
memory, the first step's loss (the same for every variant: same weights, same samples) and the speed-up over `hf`
(and over `hf+flash` where it ran). The summary comes last.

    python bench/bench_train.py                             # CPU: the tiny random-init model, every variant in under a minute
    python bench/bench_train.py --config qwen2.5-3b --json-out bench_train.json          # GPU: real-size random-init model
    python bench/bench_train.py --config qwen3-vl-4b --variants hf,project,project+varlen+pack+fused
    python bench/bench_train.py --config qwen2.5-7b --text-layers 14   # a 7B-wide model cut to fit one GPU with AdamW states

Data: synthetic detection-like samples (no tokenizer, no download): one image each (DOTA/FAIR1M 1024-px patches,
DIOR-R 800-px images, DOTA 512-px patches, border crops; resized into the pixel budget by the Qwen-VL image
processor, e.g. 1024 -> 1008x1008 = 1296 image tokens for Qwen2.5-VL), a short prompt and an answer of 40..2400
tokens (~30 tokens per object, a heavy-tailed object count), image pads expanded by model.expand_image_tokens,
labels on the answer and its end-of-turn token only. The same code path serves the tiny CPU model (whose small
pixel budget shrinks every image) and the real configs.
"""

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: model, train, ...

import attention
import flops
import mixture
import model as M
import synth
import train
from common import UserError, add_debug_flag, run_cli


# -----------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description="training throughput: the project's step vs plain transformers, side by side",
                                formatter_class=train.HelpFormatter)  # defaults shown once
    p.add_argument("--config", default=None, choices=["tiny", *CONFIGS],
                   help="model: a real-size random-init config (published hyperparameters) or the tiny checkpoint of "
                        "synth.make_tiny; default qwen2.5-3b on a GPU, tiny on CPU")
    p.add_argument("--family", default="qwen2.5", choices=sorted(M.COORDS), help="family of the tiny model (--config tiny)")
    p.add_argument("--text-layers", type=int, default=0,
                   help="keep only this many decoder layers (0 = the config's); lets a 7B/8B-wide model fit one GPU "
                        "with fp32 AdamW states")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps before them (allocator, kernels)")
    p.add_argument("--batch-size", type=int, default=2, help="samples per micro-batch (train.py --batch-size)")
    p.add_argument("--grad-accum", type=int, default=2,
                   help="micro-batches per step (train.py --grad-accum); a step holds batch-size x grad-accum samples, "
                        "packed variants hold them in grad-accum rows")
    p.add_argument("--max-length", type=int, default=6144,
                   help="train.py --max-length: packed rows hold up to batch-size x max-length tokens")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="image pixel budget floor; default 50176 (RSCoVLM) for real configs, the tiny checkpoint's own")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image pixel budget ceiling; default 1016064 (RSCoVLM, 1008x1008) for real configs, the tiny "
                        "checkpoint's own")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant names to run (default: every variant this device supports; the "
                        "list is printed at the start)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="compute dtype (master weights stay fp32, as in train.py); default bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and of the random weights")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write every number printed to this JSON file")
    add_debug_flag(p)
    args = p.parse_args(argv)
    for flag, least in (("steps", 1), ("warmup", 0), ("batch_size", 1), ("grad_accum", 1), ("max_length", 1)):
        if getattr(args, flag) < least:
            p.error(f"argument --{flag.replace('_', '-')}: must be >= {least}")
    return args


# -----------------------------------------------------------------------------
# Real-size configs, written out from the published config.json of each checkpoint (transformers 5 layout:
# rope parameters inside text_config). Weights are random: nothing is downloaded.
#   Qwen2.5-VL-3B/-7B-Instruct: the vision tower is the same for both (32 blocks of 1280, windows of 112 px,
#   full attention in blocks 7/15/23/31); only its output width (out_hidden_size = the LLM width) differs.
#   Qwen3-VL-4B/-8B-Instruct: no windows (every block attends over the whole image); deepstack features of three
#   vision blocks are added to the first three decoder layers; interleaved M-RoPE.

QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
CONFIGS = {
    "qwen2.5-3b": dict(family="qwen2.5", tie=True,
                       text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000),
                       vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen2.5-7b": dict(family="qwen2.5", tie=False,
                       text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000),
                       vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
    "qwen3-vl-4b": dict(family="qwen3", tie=True,
                        text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144),
                        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                                    num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])),
    "qwen3-vl-8b": dict(family="qwen3", tie=False,
                        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144),
                        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                                    num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
}
# what the two families share: special token ids, rope, vision patching
FAMILY_TEXT = {
    "qwen2.5": dict(rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    "qwen3": dict(rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
}
FAMILY_VISION = {
    "qwen2.5": dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", tokens_per_second=2),
    "qwen3": dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh"),
}
RSCOVLM_PIXELS = (50176, 1016064)  # 64*28*28 .. 1296*28*28 (README: the 7B cluster recipe)


def real_config(name):
    """The transformers config of CONFIGS[name]."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    spec = CONFIGS[name]
    fam = spec["family"]
    text = {**spec["text"], **copy.deepcopy(FAMILY_TEXT[fam]), "tie_word_embeddings": spec["tie"]}
    vision = {**spec["vision"], **FAMILY_VISION[fam]}
    Config = Qwen2_5_VLConfig if fam == "qwen2.5" else Qwen3VLConfig
    return Config(text_config=text, vision_config=vision, tie_word_embeddings=spec["tie"], **QWEN_IDS)


def config_and_image_processor(name, family="qwen2.5", seed=0, text_layers=None, min_pixels=None, max_pixels=None):
    """(transformers config, PIL image processor) of `name`: the tiny checkpoint of `family` (its own pixel
    budget) or a real-size config (RSCoVLM's budget); text_layers cuts the language model's depth."""
    if name == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = synth.make_tiny(Path(tmp) / "tiny", family, seed=seed)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(ckpt)
            tiny_proc = M.load_processor(ckpt)
            budget = (tiny_proc.min_pixels, tiny_proc.max_pixels)
    else:
        config, budget = real_config(name), RSCOVLM_PIXELS
    if text_layers:
        deepstack = len(getattr(config.vision_config, "deepstack_visual_indexes", []))
        if text_layers < max(1, deepstack):
            raise UserError(f"--text-layers {text_layers}: this model adds vision features to its first "
                              f"{deepstack} decoder layers; keep at least {max(1, deepstack)}")
        config.text_config.num_hidden_layers = text_layers
    budget = (min_pixels or budget[0], max_pixels or budget[1])
    vc = config.vision_config
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
        size={"shortest_edge": budget[0], "longest_edge": budget[1]})
    if M.family(config) == "qwen3":  # Qwen3-VL normalises to [-1, 1]
        image_processor.image_mean, image_processor.image_std = [0.5] * 3, [0.5] * 3
    return config, image_processor


def build_model(config, device, attn):
    """A random-init model with fp32 (master) weights on `device`, in training mode. The same seed gives the same
    weights, so every variant starts from the same point."""
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(copy.deepcopy(config), attn_implementation=attn,
                                                        dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


# -----------------------------------------------------------------------------
# Synthetic detection samples: what model.tokenize returns, without a tokenizer

# (height, width) of the source images and their share: DOTA/FAIR1M tiles are 1024 px (small ones padded to it),
# DIOR-R images 800 px, DOTA at --patch 512, and crops at image borders
IMAGE_MIX = [((1024, 1024), 0.50), ((800, 800), 0.25), ((512, 512), 0.15), ((1024, 683), 0.10)]
TOKENS_PER_OBJECT = 30  # "x1,y1,...,y4 label\n": Qwen's tokenizer writes digits one by one
ANSWER_TOKENS = (40, 2400)
SYSTEM_AND_USER_HEADER = 24  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
PROMPT_TOKENS = (40, 90)  # "Detect all objects of the following categories ...: plane, ship, ..."
ASSISTANT_HEADER = 4  # "\n<|im_start|>assistant\n"


def ordinary_token_ids(config):
    """Ids a text token may have: the vocabulary minus the block of special tokens, which sits at the end of
    Qwen's vocabulary (151643..) and at the start of the tiny tokenizer's (0..13). Which ordinary id a token
    has does not change the cost."""
    tc = config.text_config
    special = [tc.bos_token_id, tc.eos_token_id, config.image_token_id, config.video_token_id,
               config.vision_start_token_id, config.vision_end_token_id]
    lo, hi = min(special), max(special)
    return np.arange(0, lo) if lo > tc.vocab_size // 2 else np.arange(hi + 1, tc.vocab_size)


def synthetic_samples(n, config, proc, rng):
    """n samples in model.tokenize's format (+ "id", "n_images" as mixture.load_sample adds): one image each, a
    short prompt, a detection answer; labels only on the answer and its end-of-turn token."""
    ordinary = ordinary_token_ids(config)
    eos = config.text_config.eos_token_id  # <|im_end|>
    sizes = [hw for hw, _ in IMAGE_MIX]
    samples = []
    for i in range(n):
        h, w = sizes[rng.choice(len(sizes), p=[share for _, share in IMAGE_MIX])]
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = proc.image_processor(images=[image], return_tensors="pt")  # resized into the pixel budget
        n_objects = int(min(80, rng.lognormal(np.log(8), 1.0)))  # median 8 objects, a tail of crowded patches
        n_answer = int(np.clip(TOKENS_PER_OBJECT * n_objects + 10, *ANSWER_TOKENS))

        def text(k):
            return rng.choice(ordinary, k).tolist()

        prompt = (text(SYSTEM_AND_USER_HEADER) + [config.vision_start_token_id, config.image_token_id,
                  config.vision_end_token_id] + text(int(rng.integers(*PROMPT_TOKENS))) + [eos] + text(ASSISTANT_HEADER))
        answer = text(n_answer) + [eos]
        ids, labels = prompt + answer + text(1), [-100] * len(prompt) + answer + [-100]
        ids, labels = M.expand_image_tokens(ids, labels, proc, out["image_grid_thw"])  # t*h*w/merge^2 pads
        ids = torch.tensor(ids)
        samples.append({"input_ids": ids, "labels": torch.tensor(labels), "attention_mask": torch.ones_like(ids),
                        "mm_token_type_ids": (ids == config.image_token_id).long(),
                        "pixel_values": out["pixel_values"],  # (patches, 3 * temporal * patch^2)
                        "image_grid_thw": out["image_grid_thw"],  # (1, 3)
                        "id": f"synth{i}", "n_images": 1})
    return samples


# -----------------------------------------------------------------------------
# Counting attention calls: transformers looks each attention function up by name at every call, so a wrapper
# registered under the same name sees every call (vision tower or language model, by the module's class)


class AttentionCalls:
    """Calls per (part, implementation) since the last reset(), and forwards of the vision tower."""

    def __init__(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # the real functions, read once (attention.use_varlen_attention re-registers the unwrapped varlen function:
        # install() is called again after it)
        self.functions = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", "flash_attention_2")
                          if name in ALL_ATTENTION_FUNCTIONS}
        self.functions[attention.VARLEN_ATTENTION] = attention.varlen_attention
        self.calls = Counter()  # (part, implementation) -> calls
        self.tower_forwards = 0

    def install(self):
        from transformers import AttentionInterface

        for name, fn in self.functions.items():
            AttentionInterface.register(name, self._counted(name, fn))

    def _counted(self, name, fn):
        short = {attention.VARLEN_ATTENTION: "varlen", "flash_attention_2": "flash2"}.get(name, name)

        def counted(module, *args, **kwargs):
            self.calls["vision" if "Vision" in type(module).__name__ else "text", short] += 1
            return fn(module, *args, **kwargs)

        return counted

    def watch(self, model):
        """Count the vision tower's forwards too (one per micro-batch with images)."""
        def hook(module, args):
            self.tower_forwards += 1

        model.model.visual.register_forward_pre_hook(hook)

    def reset(self):
        self.calls.clear()
        self.tower_forwards = 0

    def summary(self, part):
        """(total calls, 'impl xN, ...') of one part."""
        items = sorted((impl, n) for (p, impl), n in self.calls.items() if p == part)
        return sum(n for _, n in items), ", ".join(f"{impl} x{n}" for impl, n in items) or "-"


# -----------------------------------------------------------------------------
# Model FLOPs of a step: flops.step_flops, the one formula (train.py's metrics line uses it too)


def per_segment_calls(config, samples):
    """Vision attention calls per step of transformers' own loop (one sdpa call per window or image per block)."""
    vc = config.vision_config
    n_full = len(getattr(vc, "fullatt_block_indexes", range(vc.depth)))
    segments = [flops.vision_segments(config, g) for s in samples for g in s["image_grid_thw"]]
    return sum((vc.depth - n_full) * len(win) + n_full * len(full) for win, full in segments)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakRSS:
    """Peak resident memory of this process while a variant runs (CPU): sampled every 5 ms from /proc, since
    the kernel's own peak (ru_maxrss) cannot be reset between variants."""

    def __init__(self):
        self.peak, self.running = 0, False

    def __enter__(self):
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            try:
                rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            except OSError:  # no /proc: the process peak so far
                import resource

                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.peak = max(self.peak, rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


# -----------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    path: str  # "hf" (plain transformers) or "project" (train.py's step)
    flash: bool = False  # hf only: attn_implementation="flash_attention_2" (one varlen call per vision block)
    varlen: bool = False  # vision tower through attention.varlen_attention: one call per block, not per window
    pack: bool = False  # packed rows (mixture.pack_rows + model.pack) instead of right-padded micro-batches
    fused: bool = False  # fused AdamW (train.py's default; without: torch's per-parameter loop)
    shard: str = "tower"  # train.py --vision-shard: the vision tower as one FSDP unit, or one per block
    ac: str = "none"  # activation checkpointing: none | vision | full

    @property
    def name(self):
        flags = [f for f, on in (("flash", self.flash), ("varlen", self.varlen), ("pack", self.pack),
                                 ("fused", self.fused), ("blocks", self.shard == "blocks")) if on]
        return "+".join([self.path, *flags] + ([f"ac-{self.ac}"] if self.ac != "none" else []))


def all_variants(flash):
    """Every variant: hf+flash where flash_attn imports (what a user with it installed runs), the project's step
    alone and with each speed-up, then --vision-shard blocks and activation checkpointing on the fastest one."""
    best = dict(varlen=True, pack=True, fused=True)
    return [Variant("hf"), Variant("hf", ac="full")] + ([Variant("hf", flash=True)] if flash else []) + \
           [Variant("project"), Variant("project", varlen=True), Variant("project", pack=True),
            Variant("project", varlen=True, pack=True)] + \
           [Variant("project", varlen=True, pack=True, fused=True)] + \
           [Variant("project", **best, shard="blocks"), Variant("project", **best, ac="vision"),
            Variant("project", **best, ac="full")]


OPTIMIZER_ARGS = SimpleNamespace(lr=1e-5, vision_lr=None, merger_lr=None, weight_decay=0.1, betas=[0.9, 0.999])  # train.py's defaults


def project_attention(device, dtype, pack):
    """What train.py resolves with no --attn (train.choose_attention): flash_attention_2 when installed on GPU,
    else sdpa; with --pack on a GPU with a varlen kernel, varlen for the language model too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-varlen-kernel warning: this bench reports the calls instead
        return train.choose_attention(SimpleNamespace(attn=None, vision_attn=None, pack=pack), device, dtype)


def hf_step(net, optimizer, micro, n_supervised, device, dtype):
    """One optimizer step the plain transformers way: autocast (bf16 on GPU) over fp32 weights, the model's own
    loss (mean cross-entropy over a micro-batch's supervised tokens), rescaled so the step's gradient is that of
    the sum over all supervised tokens / their number, as train.forward_backward's."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        labels = b.pop("labels").to(device)  # (B, T)
        b = {k: v.to(device) for k, v in b.items() if v is not None}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net(**b, labels=labels, use_cache=False).loss  # mean over this micro-batch
        n = (labels[:, 1:] != -100).sum()
        (loss * n / n_supervised).backward()
        loss_sum += loss.detach() * n
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / n_supervised


def project_step(net, optimizer, micro, n_supervised, device, dummy, trainable):
    """One optimizer step as train.main's loop runs it."""
    loss_sum = train.forward_backward(net, micro, n_supervised, dummy, device)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum.item() / n_supervised


def build_variant(v, ctx):
    """(model, step function (micro, n_supervised) -> loss, {"text", "vision"} attention) of a variant, from the
    same seed: the same initial weights for every variant."""
    device, dtype = ctx.device, ctx.dtype
    torch.manual_seed(ctx.args.seed)
    if v.path == "hf":
        impl = "flash_attention_2" if v.flash else "sdpa"
        net = build_model(ctx.config, device, impl)
        if v.ac != "none":  # transformers' own switch (gradient_checkpointing_enable before transformers 5.2x)
            enable = getattr(net, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(net.parameters(), lr=OPTIMIZER_ARGS.lr, betas=tuple(OPTIMIZER_ARGS.betas),
                                      weight_decay=OPTIMIZER_ARGS.weight_decay, fused=False)
        return net, lambda micro, n: hf_step(net, optimizer, micro, n, device, dtype), {"text": impl, "vision": impl}
    run = project_attention(device, dtype, v.pack)
    net = build_model(ctx.config, device, run["attn"])
    train.apply_ac(net, v.ac)
    train.apply_fsdp(net, dtype, ctx.mesh, v.shard)  # compute in dtype, fp32 master weights and gradient reduction
    attention.use_varlen_attention(net, vision=v.varlen, text=run["text_varlen"])
    M.use_linear_patch_embed(net)
    dummy = train.DummyImage(net, ctx.proc)
    optimizer = train.build_optimizer(net, OPTIMIZER_ARGS, fused=v.fused)
    trainable = [p for p in net.parameters() if p.requires_grad]
    attn_used = {"text": "varlen" if run["text_varlen"] else run["attn"], "vision": "varlen" if v.varlen else run["attn"]}
    return net, lambda micro, n: project_step(net, optimizer, micro, n, device, dummy, trainable), attn_used


def run_variant(v, ctx):
    """Build the variant, run warm-up + timed steps; returns its numbers."""
    args, calls, samples, pad_id = ctx.args, ctx.calls, ctx.samples, ctx.proc.pad_token_id
    net, step_fn, attn_used = build_variant(v, ctx)
    calls.install()
    calls.watch(net)
    # the step's samples: right-padded micro-batches in sample order, or packed rows planned once; collated
    # before each step's timer starts, as train.py makes them in its DataLoader workers
    B = args.batch_size
    groups = [samples[i:i + B] for i in range(0, len(samples), B)]
    if v.pack:
        rows = mixture.pack_rows([len(s["input_ids"]) for s in samples], 1, args.grad_accum, B * args.max_length)[0]
        groups = [[samples[i] for i in row] or [mixture.filler_sample(pad_id)] for row in rows]
    n_supervised = float(sum(int((s["labels"][1:] != -100).sum()) for s in samples))
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        calls.reset()
        micro = [M.pack(g, net) for g in groups] if v.pack else [M.collate(g, pad_id) for g in groups]
        computed = sum(b["input_ids"].numel() for b in micro)  # tokens run through the model, padding included
        sync(ctx.device)
        t0 = time.perf_counter()
        losses.append(step_fn(micro, n_supervised))
        sync(ctx.device)
        times.append(time.perf_counter() - t0)
    vision_calls, vision_kinds = calls.summary("vision")
    text_calls, text_kinds = calls.summary("text")
    return {"step_s": statistics.median(times[args.warmup:]), "step_times_s": times, "loss_first": losses[0],
            "loss_last": losses[-1], "tokens_computed": computed, "micro_batches": len(micro),
            "pad_frac": 1 - ctx.tokens / computed, "vision_attn_calls": vision_calls, "vision_attn": vision_kinds,
            "text_attn_calls": text_calls, "text_attn": text_kinds, "tower_forwards": calls.tower_forwards,
            "attention": attn_used}


def vision_check(ctx, n_images=2):
    """The vision tower with varlen attention against transformers' per-window sdpa loop in fp32, on the first
    n_images images: max abs error of the merged features (and Qwen3-VL's deepstack features). On GPU both are
    also run in the compute dtype (bf16 parameters, as FSDP's mixed precision gives them), so the varlen error
    can be read against the bf16 rounding of the loop itself."""
    from transformers import AttentionInterface

    device, dtype = ctx.device, ctx.dtype
    torch.manual_seed(ctx.args.seed)
    visual = build_model(ctx.config, device, "sdpa").model.visual  # the rest of the model is freed
    AttentionInterface.register(attention.VARLEN_ATTENTION, attention.varlen_attention)
    imgs = ctx.samples[:n_images]
    pv = torch.cat([s["pixel_values"] for s in imgs]).to(device)  # (patches, C)
    grid = torch.cat([s["image_grid_thw"] for s in imgs]).to(device)  # (n_images, 3)

    @torch.no_grad()
    def features(tower, impl, dt):
        tower.config._attn_implementation = impl
        out = tower(pv.to(dt), grid_thw=grid)
        return [out.pooler_output.float()] + [f.float() for f in (getattr(out, "deepstack_features", None) or [])]

    def err(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference
    try:
        ref = features(visual, "sdpa", torch.float32)
    finally:  # main() turns TF32 on for the training steps, as train.py does
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out = {"images": [list(map(int, g)) for g in grid], "kernel": ctx.kernel, "dtype": str(dtype),
           "ref_max_abs": max(float(r.abs().max()) for r in ref)}
    if dtype == torch.float32:
        out["varlen_vs_ref"] = err(features(visual, attention.VARLEN_ATTENTION, dtype), ref)
    else:
        for p in visual.parameters():  # parameters only: buffers (rotary frequencies) stay fp32, as under FSDP
            p.data = p.data.to(dtype)
        out["varlen_vs_ref"] = err(features(visual, attention.VARLEN_ATTENTION, dtype), ref)
        out["sdpa_loop_vs_ref"] = err(features(visual, "sdpa", dtype), ref)
    del visual
    return out


# -----------------------------------------------------------------------------


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def count(n):
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def setup(args):
    """One process (a 1-rank group: FSDP2 needs one), its device and dtype, the variants to run, the versions."""
    train.allocator_default()  # as train.py runs
    device = M.init_dist(single_process_group=True)
    if dist.get_world_size() != 1:
        raise UserError("bench_train.py measures one process on one device: run it with python, not torchrun")
    cuda = device.type == "cuda"
    dtype = train.DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers

    try:
        import flash_attn

        flash = f"yes ({flash_attn.__version__})"
    except Exception as e:  # noqa: BLE001  absent (ImportError) or built for another CUDA/torch (OSError, ...)
        flash = "no" if isinstance(e, ImportError) else f"broken ({type(e).__name__})"
    variants = all_variants(flash.startswith("yes") and cuda and dtype == torch.bfloat16)
    if args.variants:
        wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in [v.name for v in variants]]
        if unknown:
            raise UserError(f"--variants: unknown {', '.join(unknown)}; on this device: {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in wanted]
    kernel = project_attention(device, dtype, pack=True)["varlen_kernel"]
    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(device) if cuda else None,
                "flash_attn": flash, "varlen_kernel": kernel, "cpu_threads": torch.get_num_threads()}
    print(f"bench_train.py: torch {versions['torch']}, transformers {versions['transformers']}, python {versions['python']}")
    what = versions["gpu"] if cuda else f"CPU, {versions['cpu_threads']} threads"
    print(f"  device {device} ({what}), CUDA {versions['cuda'] or '-'}, flash_attn: {flash}, varlen kernel: {kernel}, "
          f"compute {dtype}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (1,), mesh_dim_names=("shard",))
    return SimpleNamespace(args=args, device=device, dtype=dtype, mesh=mesh, kernel=kernel, versions=versions), variants


def prepare(ctx):
    """The model config and processor, one step's samples (the same for every variant), their model FLOPs
    (flops.step_flops, every parameter trained) and the MFU denominators."""
    args = ctx.args
    ctx.config_name = args.config or ("qwen2.5-3b" if ctx.device.type == "cuda" else "tiny")
    config, image_processor = config_and_image_processor(ctx.config_name, args.family, args.seed, args.text_layers,
                                                         args.min_pixels, args.max_pixels)
    vc, tc = config.vision_config, config.text_config
    ctx.config, ctx.budget = config, M._pixel_budget(image_processor)
    # what model.expand_image_tokens and train.DummyImage read from a processor
    ctx.proc = SimpleNamespace(image_processor=image_processor, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                               image_token_id=config.image_token_id, pad_token_id=tc.bos_token_id)  # <|endoftext|>
    ctx.samples = synthetic_samples(args.batch_size * args.grad_accum, config, ctx.proc, np.random.default_rng(args.seed))
    ctx.lengths = [len(s["input_ids"]) for s in ctx.samples]
    if max(ctx.lengths) > args.max_length:
        raise UserError(f"a sample has {max(ctx.lengths)} tokens > --max-length {args.max_length}: raise it")
    ctx.tokens, ctx.image_tokens = sum(ctx.lengths), [int(s["mm_token_type_ids"].sum()) for s in ctx.samples]
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):  # shapes only: parameter counts and FLOPs
        meta = AutoModelForImageTextToText.from_config(copy.deepcopy(config))
    ctx.flops = flops.step_flops(flops.matmul_costs(meta), config, [mixture.sample_stats(s) for s in ctx.samples])
    ctx.n_params = sum(p.numel() for p in meta.parameters())
    ctx.n_vision = sum(p.numel() for p in meta.model.visual.parameters())
    del meta
    print(f"  model {ctx.config_name}{f' ({args.family})' if ctx.config_name == 'tiny' else ''}: {M.family(config)}, "
          f"{count(ctx.n_params)} parameters ({count(ctx.n_vision)} vision), {tc.num_hidden_layers} decoder layers of "
          f"{tc.hidden_size}, vision {vc.depth} x {vc.hidden_size}, random init")
    print(f"  step: {len(ctx.samples)} samples = {args.grad_accum} micro-batches x {args.batch_size}; {ctx.tokens} tokens "
          f"(per sample {min(ctx.lengths)}..{max(ctx.lengths)}, image tokens {min(ctx.image_tokens)}..{max(ctx.image_tokens)}), "
          f"{sum(int((s['labels'][1:] != -100).sum()) for s in ctx.samples)} supervised; pixel budget "
          f"{ctx.budget[0]}..{ctx.budget[1]}; model FLOPs {sum(ctx.flops.values()):.3g} per step "
          f"({100 * ctx.flops['vision'] / sum(ctx.flops.values()):.0f}% vision)")
    ctx.peaks = {"mfu": flops.spec_peak(ctx.device, ctx.dtype), "mfu_measured": flops.matmul_peak(ctx.device, ctx.dtype)}
    spec = f"{ctx.peaks['mfu'] / 1e12:.0f} TFLOP/s" if ctx.peaks["mfu"] else "unknown here"
    print(f"  MFU denominators: the card's spec {ctx.dtype} peak {spec} (MFU); a measured matmul peak "
          f"{ctx.peaks['mfu_measured'] / 1e12:.2f} TFLOP/s (MFU meas.)")
    ctx.calls = AttentionCalls()


def check_vision(ctx):
    """vision_check, reported; a kernel that does not run here must not stop the throughput numbers."""
    try:
        check = vision_check(ctx)
        print(f"  vision varlen check ({check['kernel']} kernel, images {check['images']}): varlen in {ctx.dtype} vs "
              f"transformers' sdpa loop (per window / image) in fp32: max abs err {check['varlen_vs_ref']:.3g}"
              + (f"; the loop in {ctx.dtype} vs fp32: {check['sdpa_loop_vs_ref']:.3g}" if "sdpa_loop_vs_ref" in check else "")
              + f" (features up to {check['ref_max_abs']:.3g})")
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        check = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(f"  vision varlen check failed: {check['error']}")
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return check


def run_all(ctx, variants):
    """Each variant, one after the other; an OOM or a failure is reported and the next one runs."""
    cuda = ctx.device.type == "cuda"
    print(f"  variants: {', '.join(v.name for v in variants)}")
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    results = []
    for v in variants:
        print(f"  running {v.name} ...", flush=True)
        r = {"name": v.name, "variant": vars(v).copy()}
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            with PeakRSS() as rss:
                r.update(run_variant(v, ctx), status="ok")
            r["mem_gb"] = (torch.cuda.max_memory_allocated(ctx.device) if cuda else rss.peak) / 2**30
            r["tokens_per_s"] = ctx.tokens / r["step_s"]
            for key, peak in ctx.peaks.items():  # train.step_metrics' two MFUs
                r[key] = sum(ctx.flops.values()) / r["step_s"] / peak if peak else None
            r["vision_calls_per_block_forward"] = r["vision_attn_calls"] / max(1, ctx.config.vision_config.depth * r["tower_forwards"])
        except oom:
            r["status"] = "OOM"
        except Exception as e:  # noqa: BLE001  report and go on with the next variant
            if cuda and "out of memory" in str(e):
                r["status"] = "OOM"
            else:
                traceback.print_exc()
                r["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append(r)
        gc.collect()  # the variant's model, optimizer and activations are gone once run_variant has returned
        if cuda:
            torch.cuda.empty_cache()
    return results


def print_table(ctx, results):
    by_name = {r["name"]: r for r in results}
    for r in results:
        for base, key in (("hf", "speedup_vs_hf"), ("hf+flash", "speedup_vs_hf_flash"), ("hf+ac-full", "speedup_vs_hf_ac")):
            ok = r["status"] == "ok" and by_name.get(base, {}).get("status") == "ok"
            if ok and (base != "hf+ac-full" or r["variant"]["ac"] != "none"):
                r[key] = by_name[base]["step_s"] / r["step_s"]
    mem = "peak GB" if ctx.device.type == "cuda" else "RSS GB"
    head = (f"{'variant':<38} {'step s':>8} {'tokens/s':>9} {'pad %':>6} {'vision attn/step':>24} "
            f"{'text attn/step':>16} {'MFU %':>6} {'MFU meas %':>10} {mem:>8} {'loss@1':>9} {'vs hf':>6}")
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['name']:<38} {r['status']}")
            continue
        vision = f"{r['vision_attn']}, {r['vision_calls_per_block_forward']:.1f}/blk"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.2f}"
        print(f"{r['name']:<38} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {100 * r['pad_frac']:>6.1f} "
              f"{vision:>24} {r['text_attn']:>16} {mfu:>6} {100 * r['mfu_measured']:>10.2f} {r['mem_gb']:>8.2f} "
              f"{r['loss_first']:>9.5f} {fmt(r.get('speedup_vs_hf', '-'), '.2f'):>6}")
    print(f"attn/step: attention calls in one step, all micro-batches (transformers' per-segment loop: "
          f"{per_segment_calls(ctx.config, ctx.samples)} vision calls, one per window or image per block); /blk = vision "
          f"calls per block per tower forward (activation checkpointing repeats them in backward). MFU: useful model "
          f"FLOPs (flops.step_flops: vision tower and attention included; not padding, recomputation, or logits of "
          f"unsupervised positions) / step time / the card's spec peak (MFU %) or the matmul peak measured here (MFU "
          f"meas %). vs hf: hf step time / this step time.")
    if ctx.device.type != "cuda":
        print("CPU: the varlen kernel here is the exact reference (one masked sdpa over a whole micro-batch, T^2 "
              "work), so +varlen is not faster on CPU; the speed-ups this bench is for are measured on a GPU.")


def summary_lines(results):
    """The ratio lines, printed last: against plain HF, against HF with flash-attn (where it ran), and the
    activation-checkpointed variants against HF with its own checkpointing."""
    by_name = {r["name"]: r for r in results}
    base = by_name.get("hf", {})
    lines = []
    for r in results:
        if r["name"] == "hf":
            continue
        if r["status"] != "ok" or base.get("status") != "ok":
            why = r["status"] if r["status"] != "ok" else f"plain HF {base.get('status', 'not run')}"
            lines.append(f"ratio vs plain HF: {r['name']} n/a ({why})")
        else:
            lines.append(f"ratio vs plain HF: {r['name']} {r['speedup_vs_hf']:.2f}x")
    for key, label in (("speedup_vs_hf_flash", "HF with flash-attn"), ("speedup_vs_hf_ac", "plain HF with AC")):
        for r in results:
            if key in r and not r["name"].startswith("hf"):
                lines.append(f"ratio vs {label}: {r['name']} {r[key]:.2f}x")
    return lines


def main():
    args = get_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ctx, variants = setup(args)
    prepare(ctx)
    check = check_vision(ctx)
    results = run_all(ctx, variants)
    print_table(ctx, results)
    lines = summary_lines(results)
    print(f"\nsummary ({ctx.config_name}, {ctx.device.type}, {len(ctx.samples)} samples/step, median of {args.steps} "
          f"steps; ratio = the baseline's step time / the variant's):")
    for line in lines:
        print(line)
    if args.json_out:
        vc, tc = ctx.config.vision_config, ctx.config.text_config
        out = {"versions": ctx.versions, "args": vars(args), "device": str(ctx.device), "dtype": str(ctx.dtype),
               "config": {"name": ctx.config_name, "family": M.family(ctx.config), "parameters": ctx.n_params,
                          "vision_parameters": ctx.n_vision, "text_layers": tc.num_hidden_layers, "pixel_budget": ctx.budget},
               "samples": {"lengths": ctx.lengths, "image_tokens": ctx.image_tokens, "tokens": ctx.tokens,
                           "per_segment_vision_calls": per_segment_calls(ctx.config, ctx.samples), "vision_depth": vc.depth},
               "flops_per_step": dict(ctx.flops), "peak_flops": ctx.peaks, "vision_check": check, "variants": results,
               "summary": lines}
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
