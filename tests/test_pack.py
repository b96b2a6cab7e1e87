"""Training throughput paths on CPU against their references: the vision tower's one-call-per-layer varlen
attention against transformers' per-window loop; packed rows (model.pack) against the unpacked samples
(logits, loss, gradients, per-sample positions, isolation); the row planner; and train.py --pack against the
same command without it (1 and 2 ranks), plus bit-identical SIGKILL resume with --pack."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attention
import model
import train
from test_train import ENV, REPO, WRAPPER, common, data, metrics, mixture, run  # noqa: F401 (data: a fixture)


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
        plan = train.pack_rows(lengths, world, rows_per_rank, capacity)
        assert plan == train.pack_rows(lengths, world, rows_per_rank, capacity)  # deterministic
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
    plan = train.pack_rows(lengths, 4, 1, 12288)
    loads = [sum(lengths[i] for row in rank for i in row) for rank in plan]
    dealt = [sum(lengths[r::4]) for r in range(4)]
    assert max(loads) - min(loads) < (max(dealt) - min(dealt)) / 5, (loads, dealt)


def test_packed_steps_resume_and_workers(data, tiny_qwen25):
    """Step g's rows are a function of g: restarting at a step, or reading with workers, gives the same rows;
    the rows of all ranks together hold exactly the step's samples."""
    proc = model.load_processor(tiny_qwen25)
    files, entries = train.build_mixture(mixture(data), seed=0)
    train.dist.init_process_group("gloo", store=train.dist.HashStore(), rank=0, world_size=1)
    try:
        lengths = train.record_lengths(files, proc, 512, "skip", torch.device("cpu"))
    finally:
        train.dist.destroy_process_group()
    assert [list(x) for x in lengths] == [[len(model.tokenize(r, proc)["input_ids"]) for r in recs] for _, recs in files]

    def steps(rank, start, n, workers=0):
        ds = train.PackedSteps(files, entries, lengths, proc, rank, 2, 0, start, 6, 2, 400, 512, "skip")
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        return [[[s["id"] for s in row] for row in next(it)[1]] for _ in range(n)]

    ref = [steps(r, 0, 4) for r in range(2)]
    assert [steps(r, 2, 2) for r in range(2)] == [x[2:] for x in ref]
    assert steps(1, 0, 4, workers=2) == ref[1]
    for g in range(4):
        block = [entries[train.global_entry(p, len(entries), 0)] for p in range(6 * g, 6 * g + 6)]
        ids = sorted(files[f][1][i]["id"] for f, i in block)
        assert sorted(i for r in range(2) for row in ref[r][g] for i in row) == ids
        assert len(ref[0][g]) == len(ref[1][g]) >= 2


# -----------------------------------------------------------------------------
# train.py --pack == train.py


def test_pack_trains_the_same_steps_as_without_on_two_ranks(data, tiny_qwen25, tmp_path):
    """The same command with and without --pack: the same samples per step, the same losses and gradient
    norms step by step (2 ranks, 2 micro-batches of 2 samples each; with --pack the step's 8 samples are
    planned into rows across the ranks)."""
    runs = {}
    for name, extra in (("plain", []), ("pack", ["--pack", "--max-tokens", "400"])):
        out = tmp_path / name
        p = run(["torchrun", "--standalone", "--nproc-per-node", "2", "train.py", *common(data, tiny_qwen25, out, steps=4),
                 "--batch-size", "2", "--grad-accum", "2", "--num-workers", "1", *extra])
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = metrics(out)
    assert len(runs["pack"]) == 4
    for a, b in zip(runs["plain"], runs["pack"]):
        assert a["samples"] == b["samples"] == 8 and a["supervised_tokens"] == b["supervised_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_pack_qwen3_one_process_with_varlen_attention(data, tiny_qwen3, tmp_path):
    """Qwen3-VL (deepstack), one process, packed rows through attention.varlen_attention (text and vision, its CPU
    reference) against the plain command: the same losses step by step."""
    runs = {}
    for name, extra in (("plain", []), ("pack", ["--pack", "--attn", "varlen", "--vision-attn", "varlen"])):
        out = tmp_path / name
        p = run([sys.executable, "train.py", *common(data, tiny_qwen3, out, steps=3), "--batch-size", "3",
                 "--num-workers", "0", *extra])
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = metrics(out)
        if name == "pack":
            assert "attention: language model varlen, vision varlen (reference kernel)" in p.stdout
    for a, b in zip(runs["plain"], runs["pack"]):
        assert a["samples"] == b["samples"] == 3 and a["supervised_tokens"] == b["supervised_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_sigkill_then_resume_with_pack_is_bit_identical(data, tiny_qwen25, tmp_path):
    base, killed, mark = tmp_path / "base", tmp_path / "killed", tmp_path / "paused"
    extra = ["--pack", "--max-tokens", "400", "--batch-size", "2", "--num-workers", "2"]
    p = run(["torchrun", "--standalone", "--nproc-per-node", "2", "train.py", *common(data, tiny_qwen25, base), *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    env = {**ENV, "HOOK": "pause", "HOOK_STEP": "5", "HOOK_MARK": str(mark)}
    proc = subprocess.Popen(["torchrun", "--standalone", "--nproc-per-node", "2", str(wrapper),
                             *common(data, tiny_qwen25, killed), *extra], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    t0, pids = time.time(), {}
    try:
        while len(pids) < 2:
            assert proc.poll() is None and time.time() - t0 < 200, proc.stdout.read().decode()[-3000:]
            time.sleep(0.1)
            pids = {r: Path(f"{mark}.{r}").read_text() for r in range(2) if Path(f"{mark}.{r}").exists()}
            pids = {r: int(v) for r, v in pids.items() if v}
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [d.name for d in train.complete_checkpoints(killed / "ckpt")] == ["step_00000002", "step_00000004"]
    r = run(["torchrun", "--standalone", "--nproc-per-node", "2", "train.py", *common(data, tiny_qwen25, killed), *extra])
    assert r.returncode == 0 and "step_00000004 at step 4" in r.stdout, r.stderr[-3000:]
    assert (killed / "final" / "model.safetensors").read_bytes() == (base / "final" / "model.safetensors").read_bytes()
    assert [(m["step"], m["loss"]) for m in metrics(killed)] == [(m["step"], m["loss"]) for m in metrics(base)]
