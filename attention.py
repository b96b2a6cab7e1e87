"""
attention.py — the variable-length attention backend: many sequences end to end in one row, one kernel call per
layer, each sequence attending only to itself.

transformers' Qwen-VL vision attention calls sdpa once per image or window (a Python loop over
`lengths.tolist()`: ~81 calls x 32 blocks per 1008-px image), unless the implementation's name contains
"flash", in which case it makes ONE call with the sequence boundaries (cu_seqlens). Measured on an H100 before
this project's BENCHMARKS.md existed (torch 2.11, no flash-attn; not re-measured since): a 7B training step 5.6 s
with the loop, 1.9 s with one varlen call per layer. The same
function serves packed language-model rows (train.py --pack): one row holds several samples, their boundaries
come with the row from model.pack(), and attention is causal within each sample only.

    from attention import use_varlen_attention, varlen_kernel
    use_varlen_attention(model, vision=True, text=packed)   # after the model is built (sharded or not)
    varlen_kernel(device, torch.bfloat16)                    # 'flash_attn_3' | 'flash_attn' | 'torch' | 'reference'
"""

import functools
import importlib
import inspect
from dataclasses import dataclass

import torch


def default_attn(device, dtype=torch.bfloat16):
    """The attention implementation used when none is asked for: flash_attention_2 when importable on CUDA for
    fp16/bf16 (the flash kernels refuse fp32), else sdpa."""
    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


VARLEN_ATTENTION = "flash_varlen_rscovlm"  # "flash" in the name selects the cu_seqlens path (see above)

# The variable-length kernels, most preferred first: (name, module, function, the GPUs it runs on). Their
# signatures differ across packages and versions (recorded, with sources, in tests/test_kernels.py); the call
# is adapted to the signature found, once per (device, dtype).
VARLEN_KERNELS = (
    ("flash_attn_3", "flash_attn_interface", "flash_attn_varlen_func", lambda cc: cc == (9, 0)),  # Hopper only
    ("flash_attn", "flash_attn", "flash_attn_varlen_func", lambda cc: cc >= (8, 0)),
    ("torch", "torch.nn.attention.varlen", "varlen_attn", lambda cc: cc >= (8, 0)),  # torch >= 2.10
)


@dataclass(frozen=True)
class VarlenKernel:
    """A variable-length attention kernel and how its signature spells our call."""
    name: str  # 'flash_attn_3', 'flash_attn', 'torch' or 'reference'
    fn: object = None  # the kernel function; None for the reference path
    scale: str | None = None  # keyword of the softmax scale; None: it has none (its default is 1/sqrt(D))
    causal: str = "causal"  # 'causal' / 'is_causal' take a bool; 'window_size' takes (-1, 0) or (-1, -1)
    gqa: str = "native"  # fewer K/V heads: 'native' as they are, 'enable_gqa' with that flag, 'repeat' copied


def _import_kernel(module, function):
    """`module.function`, or None when it is not installed (flash_attn missing, torch < 2.10 for varlen)."""
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError):
        return None


def _adapt(name, fn):
    """The VarlenKernel for `fn`, read from its signature."""
    params = inspect.signature(fn).parameters
    scale = next((p for p in ("softmax_scale", "scale") if p in params), None)
    causal = next((p for p in ("causal", "is_causal", "window_size") if p in params), None)
    if causal is None:
        raise RuntimeError(f"{name} varlen kernel {fn.__module__}.{fn.__name__}: no causal or window_size argument")
    gqa = "native" if name != "torch" else "enable_gqa" if "enable_gqa" in params else "repeat"
    return VarlenKernel(name, fn, scale, causal, gqa)


@functools.lru_cache(maxsize=None)
def _varlen_call(device, dtype):
    """The VarlenKernel for `dtype` tensors on `device`, decided once per pair (an import attempt costs ~0.6 ms)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return VarlenKernel("reference")  # CPUs; and fp32, which every flash kernel refuses
    capability = torch.cuda.get_device_capability(device)
    for name, module, function, runs_on in VARLEN_KERNELS:
        fn = _import_kernel(module, function) if runs_on(capability) else None
        if fn is not None:
            return _adapt(name, fn)
    return VarlenKernel("reference")


def varlen_kernel(device, dtype=torch.bfloat16):
    """Which kernel varlen_attention runs for `dtype` tensors on `device`: 'flash_attn_3' (FlashAttention-3,
    Hopper, when installed), 'flash_attn' (FlashAttention-2), 'torch' (torch >= 2.10's varlen_attn, sm80+), or
    'reference' (one sdpa call with an exact block-diagonal mask: CPUs, GPUs without a kernel, fp32; memory grows
    with T^2). Decided once per (device, dtype)."""
    return _varlen_call(torch.device(device), dtype).name


def _run_kernel(kernel, q, k, v, cu_seqlens, max_len, scaling, causal):
    """q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D) through a flash kernel, called the way its signature reads."""
    kw = {}
    if kernel.scale:
        kw[kernel.scale] = scaling
    elif scaling is not None and abs(scaling * q.shape[-1] ** 0.5 - 1) > 1e-6:  # fold the scale into q
        q = q * (scaling * q.shape[-1] ** 0.5)
    if kernel.causal == "window_size":  # a tuple: torch 2.11 tests `window_size == (-1, 0)`
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw[kernel.causal] = causal
    if k.shape[1] != q.shape[1] and kernel.gqa == "enable_gqa":
        kw["enable_gqa"] = True
    elif k.shape[1] != q.shape[1] and kernel.gqa == "repeat":  # torch 2.10/2.11: every query head its own copy
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    cu = cu_seqlens.to(torch.int32)
    out = kernel.fn(q, k, v, cu, cu, max_len, max_len, **kw)
    return out[0] if isinstance(out, tuple) else out  # FlashAttention-3 of Jan-Jul 2025 returns (out, lse)


def _reference_attention(query, key, value, cu_seqlens, scaling, causal):
    """The exact result in one sdpa call: query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (T, Hq, D)."""
    T = query.shape[2]
    seg = torch.searchsorted(cu_seqlens[1:].to(query.device), torch.arange(T, device=query.device), right=True)
    mask = seg[:, None] == seg[None, :]  # (T, T): the same sequence
    if causal:
        mask &= torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=key.shape[1] != query.shape[1])
    return out[0].transpose(0, 1)


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """transformers attention interface: query (1, Hq, T, D), key/value (1, Hkv, T, D) hold several sequences
    end to end, their boundaries in cu_seq_lens_q (N+1,): the vision tower's images or windows (non-causal), or
    the samples of a packed text row (causal), computed once by pack() so that no layer waits for the device to
    find them. Returns ((1, T, Hq, D), None).
    max_length_q: the longest sequence, an int (the vision tower's). A packed row's is bounded by its length T
    instead: reading a maximum off the device would wait for it, and the kernels skip the blocks they launch
    past each sequence's end."""
    if query.shape[0] != 1 or attention_mask is not None:
        raise RuntimeError("varlen_attention takes one packed row without padding (train.py --pack)")
    if cu_seq_lens_q is None:
        raise RuntimeError("varlen_attention needs the row's sequence boundaries cu_seq_lens_q: make packed rows "
                           "with model.pack")
    causal = bool(getattr(module, "is_causal", False))
    kernel = _varlen_call(query.device, query.dtype)
    if kernel.fn is None:
        return _reference_attention(query, key, value, cu_seq_lens_q, scaling, causal).unsqueeze(0), None
    max_len = max_length_q if isinstance(max_length_q, int) else query.shape[2]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    return _run_kernel(kernel, q, k, v, cu_seq_lens_q, max_len, scaling, causal).unsqueeze(0), None


def use_varlen_attention(model, vision=True, text=False):
    """Route the vision tower's attention (and with text=True the language model's: packed rows only, no
    padding, no KV cache) through varlen_attention. Registered through transformers' attention interface for
    those configs alone; works on a model already built, sharded or not."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    if vision:
        model.config.vision_config._attn_implementation = VARLEN_ATTENTION
    if text:
        model.config.text_config._attn_implementation = VARLEN_ATTENTION
