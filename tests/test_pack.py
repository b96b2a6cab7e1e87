"""Training throughput paths on CPU against their references: the vision tower's one-call-per-layer varlen
attention against transformers' per-window loop; packed rows (model.pack) against the unpacked samples
(logits, loss, gradients, per-sample positions, isolation); the row planner; and train.py --pack against the
same command without it, one process (two ranks with --pack, and a SIGKILL resume with it: test_train's reference
run and the run it interrupts)."""

import numpy as np
import pytest
import torch
from PIL import Image

import attention
import mixture
import model
import train
from test_train import common, data, in_process, metrics  # noqa: F401 (data: a fixture)


FAMILIES = ["qwen2.5", "qwen3"]


@pytest.fixture(scope="module")
def nets(tiny_qwen25, tiny_qwen3):
    out = {}
    for fam, path in (("qwen2.5", tiny_qwen25), ("qwen3", tiny_qwen3)):
        net, proc = model.load(path)
        out[fam] = (net.train(), proc)
    return out


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Records: images large enough for several 112-px attention windows (Qwen2.5-VL's tiny tower), a
    two-image record, text-only records."""
    d = tmp_path_factory.mktemp("pack")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(300, 420), (150, 90), (260, 260), (90, 200)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")

    def rec(i, images, q, a):
        return {"id": f"r{i}", "task": "chat", "images": [str(d / f"im{k}.png") for k in images], "meta": {},
                "messages": [{"role": "user", "content": "<image>" * len(images) + q},
                             {"role": "assistant", "content": a}]}

    return [rec(0, [0], "Describe the image.", "A satellite image with several buildings."),
            rec(1, [], "Is there a ship? " * 3, "yes"),
            rec(2, [1, 2], "Compare the two images.", "The first is darker."),
            rec(3, [], "hello", "There are none."),
            rec(4, [3], "Is there a ship?", "no")]


def forward(net, batch):
    labels = batch.pop("labels")
    logits = net(**{k: v for k, v in batch.items() if v is not None}, use_cache=False).logits
    return logits, labels


# -----------------------------------------------------------------------------
# Vision tower: one varlen call per layer == transformers' per-window loop


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_vision_varlen_equals_the_per_window_loop(fam, nets, samples):
    net, proc = nets[fam]
    pv, grid, _ = model.process_images(proc, samples[0]["images"] + samples[2]["images"])
    visual = net.model.visual

    def run_tower():
        visual.zero_grad()
        out = visual(pv, grid_thw=grid)
        feats = [out.pooler_output] + list(getattr(out, "deepstack_features", None) or [])
        sum((f.float() * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in feats).backward()
        return [f.detach().clone() for f in feats], {n: p.grad.clone() for n, p in visual.named_parameters()}

    calls = []

    def counting(*a, **k):
        calls.append(k.get("cu_seq_lens_q"))
        return attention.varlen_attention(*a, **k)

    net.config.vision_config._attn_implementation = "sdpa"
    ref_out, ref_grad = run_tower()
    from transformers import AttentionInterface

    attention.use_varlen_attention(net, vision=True)
    AttentionInterface.register(attention.VARLEN_ATTENTION, counting)
    try:
        out, grad = run_tower()
    finally:
        net.config.vision_config._attn_implementation = "sdpa"
        AttentionInterface.register(attention.VARLEN_ATTENTION, attention.varlen_attention)
    # one call per block (not per window), and at least one of them covered several windows / images at once
    assert len(calls) == len(visual.blocks) and max(len(c) - 1 for c in calls) >= 3
    for a, b in zip(ref_out, out):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    for name, g in ref_grad.items():
        assert torch.allclose(g, grad[name], atol=1e-5, rtol=1e-4), name


# -----------------------------------------------------------------------------
# Packed rows == the samples alone


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_rope_positions_equal_the_sample_alone(fam, nets, samples):
    net, proc = nets[fam]
    toks = [model.tokenize(r, proc) for r in samples]
    batch = model.collate(toks, proc.pad_token_id)  # right-padded: the model's own positions per row
    ref, _ = net.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                      image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    for i, s in enumerate(toks):
        pos = model.rope_positions(net, s)  # (4, 1, T)
        n = len(s["input_ids"])
        assert torch.equal(pos[0, 0], torch.arange(n))
        assert torch.equal(pos[1:, 0], ref[:, i, :n]), s
    assert not torch.equal(model.rope_positions(net, toks[0])[1], torch.arange(len(toks[0]["input_ids"])))


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("text_attn", ["sdpa", "varlen"])
def test_packed_row_equals_unpacked_samples(fam, text_attn, nets, samples):
    """Logits at every sample's positions, the summed loss and every gradient: one packed row (image,
    text-only and two-image samples) == the samples one by one. text_attn: the row's attention through
    transformers' sdpa mask built from the positions, or attention.varlen_attention's CPU reference."""
    net, proc = nets[fam]
    toks = [model.tokenize(r, proc) for r in samples]
    net.zero_grad()
    ref_logits, ref_loss = [], 0.0
    for s in toks:
        logits, labels = forward(net, model.collate([s], proc.pad_token_id))
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")
        ce.backward()
        ref_logits.append(logits[0].detach())
        ref_loss += ce.item()
    ref_grad = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    attention.use_varlen_attention(net, vision=False, text=text_attn == "varlen")
    try:
        logits, labels = forward(net, model.pack(toks, net))
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")
        ce.backward()
    finally:
        net.config.text_config._attn_implementation = "sdpa"
    start = 0
    for s, ref in zip(toks, ref_logits):
        n = len(s["input_ids"])
        assert torch.allclose(logits[0, start:start + n], ref, atol=2e-5), s
        start += n
    assert start == logits.shape[1]
    assert ce.item() == pytest.approx(ref_loss, rel=1e-5)
    # the same supervised targets as the samples alone (the first token of a sample is never a target)
    assert int((labels[0, 1:] != -100).sum()) == sum(int((s["labels"][1:] != -100).sum()) for s in toks)
    for name, g in ref_grad.items():
        got = dict(net.named_parameters())[name].grad
        assert torch.allclose(got, g, atol=1e-5, rtol=1e-4), name


@pytest.mark.versions
@pytest.mark.parametrize("text_attn", ["sdpa", "varlen"])
def test_a_packed_sample_cannot_see_another(text_attn, nets, samples):
    """Changing the first sample's tokens and image leaves the others' logits unchanged. The same check on a row
    whose positions run on without restarting (what a packing bug looks like: one causal sequence) does see
    the change, so this test would catch a leak."""
    net, proc = nets["qwen2.5"]
    toks = [model.tokenize(r, proc) for r in samples]
    changed = dict(toks[0])
    changed["input_ids"] = toks[0]["input_ids"].clone()
    text = (changed["mm_token_type_ids"] == 0).nonzero().flatten()[3:8]
    changed["input_ids"][text] = (changed["input_ids"][text] + 7) % 300
    changed["pixel_values"] = toks[0]["pixel_values"] + 1.0
    n0 = len(toks[0]["input_ids"])
    attention.use_varlen_attention(net, vision=False, text=text_attn == "varlen")
    try:
        with torch.no_grad():
            a = forward(net, model.pack(toks, net))[0][0, n0:]
            b = forward(net, model.pack([changed] + toks[1:], net))[0][0, n0:]
            assert torch.equal(a, b)
            leaky = [model.pack(t, net) for t in (toks, [changed] + toks[1:])]
            for row in leaky:  # positions 0..T-1 over the whole row, boundaries [0, T]: no sample boundaries
                T = row["input_ids"].shape[1]
                row["position_ids"] = torch.arange(T).view(1, 1, -1).expand(4, 1, -1)
                row["cu_seq_lens_q"] = row["cu_seq_lens_k"] = torch.tensor([0, T], dtype=torch.int32)
            c, d = (forward(net, row)[0][0, n0:] for row in leaky)
            assert (c - d).abs().max() > 1e-3
    finally:
        net.config.text_config._attn_implementation = "sdpa"


# -----------------------------------------------------------------------------
# The row planner


def test_pack_rows_balances_ranks_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    for trial in range(200):
        world, rows_per_rank = int(rng.integers(1, 5)), int(rng.integers(1, 3))
        capacity = int(rng.integers(300, 3000))
        lengths = rng.integers(20, 2500, int(rng.integers(0, 40))).tolist()
        plan = mixture.pack_rows(lengths, world, rows_per_rank, capacity)
        assert plan == mixture.pack_rows(lengths, world, rows_per_rank, capacity)  # deterministic
        counts = {len(r) for r in plan}
        assert len(counts) == 1 and counts.pop() >= rows_per_rank  # the same number of rows on every rank
        flat = sorted(i for rank in plan for row in rank for i in row)
        assert flat == list(range(len(lengths)))  # every sample once
        for rank in plan:
            for row in rank:
                assert row == sorted(row)
                assert len(row) <= 1 or sum(lengths[i] for i in row) <= capacity
    # balance: 16 samples of mixed lengths on 4 ranks: the spread between the heaviest and the lightest rank is
    # a fraction of what dealing the same samples in stream order (unpacked training) gives
    lengths = [300, 6000, 450, 2200, 5100, 800, 300, 3900, 1200, 600, 5800, 350, 2500, 700, 4100, 900]
    plan = mixture.pack_rows(lengths, 4, 1, 12288)
    loads = [sum(lengths[i] for row in rank for i in row) for rank in plan]
    dealt = [sum(lengths[r::4]) for r in range(4)]
    assert max(loads) - min(loads) < (max(dealt) - min(dealt)) / 5, (loads, dealt)


# -----------------------------------------------------------------------------
# train.py --pack == train.py


@pytest.mark.slow
def test_pack_qwen3_one_process_with_varlen_attention(data, tiny_qwen3, tmp_path):
    """Qwen3-VL (deepstack), one process, packed rows through attention.varlen_attention (text and vision, its CPU
    reference) against the plain command: the same losses step by step."""
    runs = {}
    for name, extra in (("plain", []), ("pack", ["--pack", "--attn", "varlen", "--vision-attn", "varlen"])):
        out = tmp_path / name
        code, stdout, stderr = in_process([*common(data, tiny_qwen3, out, steps=3), "--batch-size", "3",
                                           "--num-workers", "0", *extra])
        assert code == 0, stderr[-3000:]
        runs[name] = metrics(out)
        if name == "pack":
            assert "attention: language model varlen, vision varlen (reference kernel)" in stdout
    for a, b in zip(runs["plain"], runs["pack"]):
        assert a["samples"] == b["samples"] == 3 and a["supervised_tokens"] == b["supervised_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
