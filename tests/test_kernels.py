"""attention.varlen_attention's kernel dispatch, on CPU: each variable-length kernel a GPU may offer is replaced by a
fake with the kernel's real signature (recorded below from its source) that computes the exact result under its
own argument names, so a call spelled for another signature fails; which kernel is chosen for a (device, dtype),
decided once, with CUDA simulated; and a packed row's forward makes no host sync inside the decoder layers.

Recorded signatures (the variable-length entry point of each kernel; read from the released sources):
- FlashAttention-2: Dao-AILab/flash-attention, flash_attn/flash_attn_interface.py at tag v2.8.3 (line 1370).
- FlashAttention-3: Dao-AILab/flash-attention, hopper/flash_attn_interface.py (module `flash_attn_interface` of the
  flash_attn_3 package, "3.0.0") at main 0251105a (2026-08); at fa60e7cc (2025-03, "3.0.0.b1") the same call
  returned (out, softmax_lse): commits 7a802796 (2025-01) to ed209409 (2025-07, "[FA3] Don't return lse").
- torch.nn.attention.varlen.varlen_attn, torch/nn/attention/varlen.py of the released wheels: absent in 2.9.0;
  2.10.0 takes is_causal and no scale; 2.11.0 keyword-only scale and window_size; 2.12.0 and 2.13.0 add
  enable_gqa (and seqused_k, block_table, num_splits). Docs: docs.pytorch.org/docs/2.12/nn.attention.varlen.html.
"""
import types

import pytest
import torch
from PIL import Image

import attention
import model


def attend(q, k, v, cu, scale, causal):
    """The exact result, sequence by sequence: q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D)."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale  # (H, L, L)
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b])
    return out


def check_call(q, cu_q, cu_k, max_q, max_k):
    """What every kernel requires of the boundaries: int32 (N+1,) and ints at least the longest sequence."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and torch.equal(cu_q, cu_k) and int(cu_q[-1]) == q.shape[0]
    assert isinstance(max_q, int) and isinstance(max_k, int) and max_q >= int(cu_q.diff().max())


# -----------------------------------------------------------------------------
# The recorded signatures, each computing the exact result with its own arguments


def flash_attn_2(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                 causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                 return_attn_probs=False, block_table=None):
    check_call(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    assert window_size == (-1, -1) and dropout_p == 0.0  # causal says causal; no sliding window
    return attend(q, k, v, cu_seqlens_q, softmax_scale, causal)  # fewer K/V heads taken as they are


def flash_attn_3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
                 softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None, v_descale=None,
                 window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None,
                 deterministic=False, sm_margin=0, return_attn_probs=False):
    check_call(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    assert window_size == (-1, -1)
    return attend(q, k, v, cu_seqlens_q, softmax_scale, causal)


def flash_attn_3_2025(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                      seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                      v_descale=None, window_size=(-1, -1), softcap=0.0, num_splits=1, pack_gqa=None,
                      deterministic=False, sm_margin=0):
    check_call(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = attend(q, k, v, cu_seqlens_q, softmax_scale, causal)
    return out, torch.zeros(q.shape[1], q.shape[0])  # (out, softmax_lse)


def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    check_call(query, cu_seq_q, cu_seq_k, max_q, max_k)
    assert key.shape[1] == query.shape[1], "no GQA in 2.10: K/V heads must come repeated"
    return attend(query, key, value, cu_seq_q, None, is_causal)  # its scale is always 1/sqrt(D)


def torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
    check_call(query, cu_seq_q, cu_seq_k, max_q, max_k)
    assert key.shape[1] == query.shape[1], "no GQA in 2.11: K/V heads must come repeated"
    assert window_size in ((-1, -1), (-1, 0))
    return attend(query, key, value, cu_seq_q, scale, window_size == (-1, 0))  # as 2.11 reads it


def torch_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    check_call(query, cu_seq_q, cu_seq_k, max_q, max_k)
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Try setting enable_gqa=True for GQA.")  # what 2.12 and 2.13 raise
    return attend(query, key, value, cu_seq_q, scale, window_size == (-1, 0))


# name given to the dispatcher, fake, and the call the dispatcher should read from the signature
RECORDED = {
    "flash_attn 2.8.3": ("flash_attn", flash_attn_2, ("softmax_scale", "causal", "native")),
    "flash_attn_3 2026": ("flash_attn_3", flash_attn_3, ("softmax_scale", "causal", "native")),
    "flash_attn_3 2025": ("flash_attn_3", flash_attn_3_2025, ("softmax_scale", "causal", "native")),
    "torch 2.10": ("torch", torch_2_10, (None, "is_causal", "repeat")),
    "torch 2.11": ("torch", torch_2_11, ("scale", "window_size", "repeat")),
    "torch 2.12/2.13": ("torch", torch_2_12, ("scale", "window_size", "enable_gqa")),
}


def test_the_installed_torch_has_the_recorded_signature():
    """The record for the torch this suite runs on is its real signature (2.9: no varlen module)."""
    import inspect

    record = {(2, 10): torch_2_10, (2, 11): torch_2_11, (2, 12): torch_2_12, (2, 13): torch_2_12}
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if version not in record and version != (2, 9):
        pytest.skip(f"no signature recorded for torch {torch.__version__}")
    real = attention._import_kernel("torch.nn.attention.varlen", "varlen_attn")
    if version == (2, 9):
        assert real is None
        return
    assert list(inspect.signature(real).parameters) == list(inspect.signature(record[version]).parameters)


@pytest.mark.parametrize("recorded", list(RECORDED))
def test_each_kernel_is_called_as_its_signature_reads(recorded, monkeypatch):
    """Causal and not, GQA and not, Qwen's scale and another: the kernel's result equals the exact one; and
    varlen_attention with that kernel equals its reference path."""
    name, fake, expected = RECORDED[recorded]
    kernel = attention._adapt(name, fake)
    assert (kernel.scale, kernel.causal, kernel.gqa) == expected
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13, 20])
    for hkv, scale, causal in [(4, None, False), (2, None, True), (2, 0.3, False), (4, 0.3, True)]:
        q = torch.randn(20, 4, 8, generator=g)
        k, v = torch.randn(2, 20, hkv, 8, generator=g)
        got = attention._run_kernel(kernel, q, k, v, cu, 7, scale, causal)
        assert torch.allclose(got, attend(q, k, v, cu, scale, causal), atol=1e-5), (hkv, scale, causal)
    module = types.SimpleNamespace(is_causal=True)
    query, key, value = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H, T, D)
    ref = attention.varlen_attention(module, query, key, value, scaling=0.3, cu_seq_lens_q=cu)[0]
    monkeypatch.setattr(attention, "_varlen_call", lambda device, dtype: kernel)
    for max_len in (None, 7):  # a packed row passes none: its length bounds it
        got = attention.varlen_attention(module, query, key, value, scaling=0.3, cu_seq_lens_q=cu, max_length_q=max_len)
        assert got[0].shape == (1, 20, 4, 8) and torch.allclose(got[0], ref, atol=1e-5)


# -----------------------------------------------------------------------------
# Which kernel, for which GPU and dtype


@pytest.fixture
def gpu(monkeypatch):
    """A simulated CUDA machine: gpu(capability, installed fakes by module) -> the modules looked up."""
    looked_up = []

    def setup(capability, installed):
        attention._varlen_call.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

        def lookup(module, function):
            looked_up.append(module)
            return installed.get(module)
        monkeypatch.setattr(attention, "_import_kernel", lookup)
        return looked_up

    yield setup
    attention._varlen_call.cache_clear()


ALL = {"flash_attn_interface": flash_attn_3, "flash_attn": flash_attn_2, "torch.nn.attention.varlen": torch_2_12}


@pytest.mark.parametrize("capability, installed, dtype, expected", [
    ((9, 0), ALL, torch.bfloat16, "flash_attn_3"),  # H100/H200: FlashAttention-3 first
    ((9, 0), ALL, torch.float16, "flash_attn_3"),
    ((8, 0), ALL, torch.bfloat16, "flash_attn"),  # A100: FlashAttention-3 is Hopper only
    ((10, 0), ALL, torch.bfloat16, "flash_attn"),  # B200: not Hopper either
    ((9, 0), {"torch.nn.attention.varlen": torch_2_10}, torch.bfloat16, "torch"),  # no flash-attn package
    ((9, 0), {}, torch.bfloat16, "reference"),  # torch 2.9: no varlen module
    ((7, 5), ALL, torch.float16, "reference"),  # T4: no flash kernel runs there
    ((9, 0), ALL, torch.float32, "reference"),  # fp32: every flash kernel refuses it
])
def test_kernel_choice(gpu, capability, installed, dtype, expected):
    gpu(capability, installed)
    assert attention.varlen_kernel("cuda:0", dtype) == expected
    kernel = attention._varlen_call(torch.device("cuda:0"), dtype)
    assert (kernel.fn is None) == (expected == "reference")


def test_kernel_decided_once_per_device_and_dtype(gpu):
    """The imports are tried once per (device, dtype), not per attention call; CPUs try none."""
    looked_up = gpu((8, 0), {"torch.nn.attention.varlen": torch_2_11})
    for _ in range(3):
        assert attention.varlen_kernel("cuda:0", torch.bfloat16) == "torch"
    assert looked_up == ["flash_attn", "torch.nn.attention.varlen"]
    assert attention.varlen_kernel("cpu", torch.bfloat16) == "reference" and len(looked_up) == 2
    attention.varlen_kernel("cuda:0", torch.float16)
    assert len(looked_up) == 4


def test_fp32_on_a_gpu_takes_the_exact_paths(gpu, monkeypatch):
    """--dtype fp32 on a GPU with flash-attn installed: no flash kernel anywhere (they refuse fp32). The vision
    tower is not routed through varlen_attention, and the built-in attention is sdpa."""
    gpu((9, 0), ALL)
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attention.varlen_kernel("cuda:0", torch.float32) == "reference"
    assert attention.default_attn("cuda:0", torch.float32) == "sdpa"
    assert attention.default_attn("cuda:0", torch.bfloat16) == "flash_attention_2"


# -----------------------------------------------------------------------------
# A packed row: no host sync inside the decoder layers


SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.repeat_interleave.Tensor", "aten._unique2.default", "aten.unique_consecutive.default"}


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make a GPU process wait for the device (a value read back: item/int/bool, nonzero,
    boolean indexing, ...) while `active`."""

    def __init__(self):
        super().__init__()
        self.active, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = str(func) == "aten.index.Tensor" and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if self.active and (str(func) in SYNCING or boolean_index):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def count_layer_syncs(net, row):
    """Forward of a packed row; the syncing ops run inside the language model's decoder layers."""
    counter = SyncCounter()
    hooks = []
    for layer in net.model.language_model.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *a: setattr(counter, "active", True)))
        hooks.append(layer.register_forward_hook(lambda *a: setattr(counter, "active", False)))
    try:
        with counter, torch.no_grad():
            logits = net(**{k: v for k, v in row.items() if v is not None and k != "labels"}, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return counter.seen, logits


@pytest.mark.versions
@pytest.mark.parametrize("fam", ["qwen2.5", "qwen3"])
def test_packed_row_has_no_host_sync_in_the_decoder_layers(fam, tiny_qwen25, tiny_qwen3, tmp_path):
    """transformers hands pack()'s boundaries to every decoder layer's varlen_attention, which reads nothing
    back from the device; the packed logits are the samples' own. A layer that reads one value back is seen."""
    net, proc = model.load({"qwen2.5": tiny_qwen25, "qwen3": tiny_qwen3}[fam])
    Image.new("RGB", (150, 100), (40, 90, 160)).save(tmp_path / "a.png")
    records = [{"id": str(i), "task": "chat", "images": [str(tmp_path / "a.png")] * (i % 2), "meta": {},
                "messages": [{"role": "user", "content": "<image>" * (i % 2) + "Is there a ship? " * (i + 1)},
                             {"role": "assistant", "content": "no"}]} for i in range(3)]
    samples = [model.tokenize(r, proc) for r in records]
    attention.use_varlen_attention(net, vision=True, text=True)
    seen, logits = count_layer_syncs(net, model.pack(samples, net))
    assert seen == []
    start = 0
    for s in samples:
        alone = count_layer_syncs(net, model.pack([s], net))[1][0]
        assert torch.allclose(logits[0, start:start + len(alone)], alone, atol=2e-5)
        start += len(alone)
    # the counter sees a read-back inside a layer: one per layer
    from transformers import AttentionInterface

    def reading(module, *args, **kwargs):
        int(kwargs["cu_seq_lens_q"].diff().max())
        return attention.varlen_attention(module, *args, **kwargs)

    AttentionInterface.register(attention.VARLEN_ATTENTION, reading)
    try:
        seen, _ = count_layer_syncs(net, model.pack(samples, net))
    finally:
        AttentionInterface.register(attention.VARLEN_ATTENTION, attention.varlen_attention)
    assert seen == ["aten._local_scalar_dense.default"] * len(net.model.language_model.layers)


def test_a_row_without_boundaries_is_refused():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="model.pack"):
        attention.varlen_attention(types.SimpleNamespace(is_causal=True), q, q, q, position_ids=torch.arange(4))


@pytest.mark.parametrize("fam", ["qwen2.5", "qwen3"])
def test_patch_embedding_as_a_matmul_equals_the_conv3d(fam, tiny_qwen25, tiny_qwen3):
    """model.load (and train.py, bench_train.py's project step) run the vision patch embedding as x @ W.T + b:
    the same output and the same weight/bias gradients as transformers' Conv3d over the processor's flattened
    patches (a wrong flattening order or a dropped bias fails this), and the checkpoint's weights untouched."""
    from transformers import AutoModelForImageTextToText

    ckpt = tiny_qwen25 if fam == "qwen2.5" else tiny_qwen3
    ours = model.load(ckpt)[0].model.visual.patch_embed
    ref = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).model.visual.patch_embed
    assert "forward" in vars(ours) and "forward" not in vars(ref)  # ours is patched, the reference is not
    assert ours.proj.weight.shape == ref.proj.weight.shape and torch.equal(ours.proj.weight, ref.proj.weight)
    x = torch.randn(37, ref.proj.weight[0].numel(), generator=torch.Generator().manual_seed(0))
    outs = []
    for embed in (ours, ref):
        y = embed(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y, embed.proj.weight.grad, embed.proj.bias.grad if embed.proj.bias is not None else None))
    (y, gw, gb), (y_ref, gw_ref, gb_ref) = outs
    assert y.shape == y_ref.shape and torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gw, gw_ref, atol=1e-5, rtol=1e-5)
    assert (gb is None) == (gb_ref is None) == (fam == "qwen2.5")  # Qwen2.5-VL's patch embedding has no bias
    if gb is not None:
        assert torch.allclose(gb, gb_ref, atol=1e-5, rtol=1e-5)
