"""
flops.py — the FLOPs of a training step and its MFU: the one formula, used by train.py's metrics line and by
bench/bench_train.py.


Useful model FLOPs of a step: padding, recomputation (activation checkpointing), the blank image of DummyImage
and logits of unsupervised positions are not counted, so every way of running the same step does the same FLOPs.
  Weight matmuls, per weight element and token through it: forward 2, the input's gradient 2 (only when
  something before the weight in the forward trains: else no gradient flows back through it), the weight's
  gradient 2 (only when it trains). So 6 for a trained weight with trained ones before it, 4 for a frozen one
  under them (LoRA's base weights, a frozen language model under a trained merger), 2 for a frozen part nothing
  before trains (a frozen vision tower), 4 for the first trained weight (the patch embedding). Tokens: decoder
  layers x sample tokens, lm_head x supervised positions, vision blocks and patch embedding x patches,
  merger(s) x merged tokens. Token embeddings are a lookup, not a matmul: 0.
  "Before" is the modules' definition order, which for Qwen-VL is the forward's (vision tower, merger,
  embeddings, decoder layers in order, lm_head), except that siblings reading one input are in sequence: with
  adapters only, the first decoder layer's k/v base weights count an input gradient they do not need (q's
  adapters come first; < 0.1% of a 7B step), as do Qwen3-VL's deepstack mergers under a trained merger (they read
  the vision blocks; < 0.5%). Text-only samples are counted as if the vision tower had run before them.
  Attention: the language model causal within each sample, 2 H D T^2 per layer forward; the vision tower 4 C n^2
  per block and window or image (C its width); backward 2x forward when something before it trains.
"""

import re
import time
from collections import Counter

import torch

import model as M
from common import print0


def matmul_costs(model):
    """{"per_token": {"text"|"head"|"patch"|"merged": FLOPs per token of those weights}, "text_attn": [1 or 3 per
    decoder layer], "vision_attn": [1 or 3 per vision block]} of a model (meta, sharded or real), from which
    parameters train (requires_grad)."""
    per_token, attn, trains_before = Counter(), {"text": {}, "vision": {}}, False
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
            where = ("head" if name == "lm_head" else "merged" if M.param_kind(name + ".weight") == "merger"
                     else "patch" if name.startswith("model.visual.") else "text")
            per_token[where] += (2 + 2 * trains_before + 2 * m.weight.requires_grad) * m.weight.numel()
        block = re.fullmatch(r"model\.(?:language_model\.layers|visual\.blocks)\.(\d+)\.(?:self_attn\.o_proj|attn\.proj)", name)
        if block:  # the attention output's projection: backward reaches the attention iff it reaches this input
            attn["vision" if name.startswith("model.visual") else "text"][int(block.group(1))] = 3 if trains_before else 1
        trains_before |= any(p.requires_grad for p in m.parameters(recurse=False))
    return {"per_token": dict(per_token), "text_attn": [attn["text"][i] for i in sorted(attn["text"])],
            "vision_attn": [attn["vision"][i] for i in sorted(attn["vision"])]}


def vision_segments(config, grid):
    """Sequence lengths (in patches) one image attends over: (windows, full) where `windows` is one entry per
    window (Qwen2.5-VL's windowed blocks; edge windows are smaller) and `full` one per frame."""
    vc = config.vision_config
    t, h, w = (int(v) for v in grid)
    full = [h * w] * t
    if not hasattr(vc, "fullatt_block_indexes"):  # Qwen3-VL: every block attends over the whole image
        return [], full
    m, ws = vc.spatial_merge_size, vc.window_size // vc.spatial_merge_size // vc.patch_size  # ws in merged tokens

    def chunks(n):
        return [ws] * (n // ws) + ([n % ws] if n % ws else [])

    windows = [a * b * m * m for a in chunks(h // m) for b in chunks(w // m)] * t
    return windows, full


def step_flops(costs, config, samples):
    """{"language model", "vision"}: model FLOPs of forward + backward over samples [sample_stats] (matmul_costs
    gives the weights' part)."""
    tc, vc = config.text_config, config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    full_blocks = set(getattr(vc, "fullatt_block_indexes", range(vc.depth)))
    merge, rate = vc.spatial_merge_size ** 2, costs["per_token"]
    flops = Counter()
    for tokens, supervised, grid in samples:
        flops["language model"] += rate.get("text", 0) * tokens + rate.get("head", 0) * supervised
        flops["language model"] += sum(costs["text_attn"]) * 2 * tc.num_attention_heads * head_dim * tokens**2
        for g in ([] if grid is None else grid):
            patches = int(g.prod())
            flops["vision"] += rate.get("patch", 0) * patches + rate.get("merged", 0) * patches // merge
            win, full = vision_segments(config, g)
            for block, mult in enumerate(costs["vision_attn"]):
                flops["vision"] += mult * 4 * vc.hidden_size * sum(n * n for n in (full if block in full_blocks else win))
    return flops


# Dense bf16 tensor-core peak per GPU from the vendors' data sheets (what papers divide by); the first name found
# in torch.cuda.get_device_name wins.
SPEC_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H100", 989e12), ("H200", 989e12),
                  ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("B200", 2250e12))


def spec_peak(device, dtype):
    """The card's spec dense bf16 FLOP/s; None off CUDA, in fp32, or for a card not in the table."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in SPEC_BF16_PEAK if key in name), None)


def mfu_peaks(device, dtype):
    """The two MFU denominators of the metrics line, said once: {"mfu": the card's spec peak, "mfu_measured": the
    matmul peak measured here (GPU only: a CPU's says little)}."""
    peaks = {"mfu": spec_peak(device, dtype), "mfu_measured": matmul_peak(device, dtype) if device.type == "cuda" else None}
    if any(peaks.values()):
        print0("  MFU against " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in peaks.items() if v)
               + " per GPU (mfu: the card's spec dense bf16 peak; mfu_measured: a matmul measured now)")
    return peaks


def matmul_peak(device, dtype):
    """Measured matmul FLOP/s of this device in `dtype`: a large square matmul, timed (the measured MFU's
    denominator: what this card, clock and software stack really deliver)."""
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)
