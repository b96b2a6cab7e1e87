"""train.py's parallel layout on CPU (gloo) with the tiny checkpoints, each checked against a reference run: the
FSDP units (per-block vision, token embeddings, [norm, lm_head]) for both families against the one-unit tower;
activation checkpointing choices against none, and which blocks really rerun; HSDP (2 replicas x 2 ranks from two
launch.sh "nodes", Qwen3-VL, frozen vision, an intermediate export) against one process with the same steps, and
its checkpoint resumed on another number of ranks with the schedule it started with."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule, fully_shard

import model
import train
from common import read_records
from test_train import (ENV, REPO, common, data, free_port, in_process, measured, metrics,  # noqa: F401 (fixtures)
                        mixture_spec, planner, weights)


def untie(tiny, out):
    """A copy of a tiny (tied) checkpoint with its own lm_head: the layout of Qwen2.5-VL-7B / Qwen3-VL-8B."""
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(config))
    w = load_file(str(out / "model.safetensors"))
    embed = next(v for k, v in w.items() if k.endswith("embed_tokens.weight"))
    w["lm_head.weight"] = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


@pytest.fixture
def layout(monkeypatch):
    """Watches the model train.main builds: its FSDP units (module names that share one unit) and how often each
    block's MLP starts a forward (a child module: its hooks fire again when a checkpointed block reruns its
    forward in backward; a pre-hook, because the rerun stops as soon as it has rebuilt what backward needs)."""
    seen = {"units": {}, "mlp_calls": {}}
    build = train.build_model

    def build_and_watch(*a):
        net = build(*a)
        seen["units"].clear()
        seen["mlp_calls"].clear()
        for name, m in net.named_modules():
            if isinstance(m, FSDPModule):
                seen["units"].setdefault(id(fully_shard.state(m)), []).append(name)
        calls = seen["mlp_calls"]
        for stack, blocks in (("vision", net.model.visual.blocks), ("llm", net.model.language_model.layers)):
            for i, block in enumerate(blocks):
                block.mlp.register_forward_pre_hook(lambda *_, k=f"{stack}.{i}": calls.__setitem__(k, calls.get(k, 0) + 1))
        return net

    monkeypatch.setattr(train, "build_model", build_and_watch)
    return seen


def assert_same_steps(ref, got):
    assert [m["step"] for m in ref] == [m["step"] for m in got] and ref
    for a, b in zip(ref, got):
        assert a["samples"] == b["samples"] and a["supervised_tokens"] == b["supervised_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)


def assert_same_weights(ref_out, out, start):
    w1, w2 = weights(ref_out), weights(out)
    assert set(w1) == set(w2)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-4  # and the runs really trained


# -----------------------------------------------------------------------------


@pytest.mark.slow
def test_activation_checkpointing_changes_no_number_and_reruns_the_chosen_blocks(data, tiny_qwen25, layout, tmp_path):
    """One process, 3 steps of 2 micro-batches (some text-only: the tower runs on the blank image). Every --ac
    choice gives --ac none's losses and gradient norms; a checkpointed block's MLP runs twice per micro-batch
    (forward, then again in backward), any other block's once. Blocks are counted from 1 in each stack
    (every-2: the 2nd decoder layer and the 2nd vision block of the tiny model's two each)."""
    twice = {"none": set(), "full": {"vision.0", "vision.1", "llm.0", "llm.1"}, "vision": {"vision.0", "vision.1"},
             "every-2": {"vision.1", "llm.1"}}
    for ac in twice:
        code, stdout, stderr = in_process([*common(data, tiny_qwen25, tmp_path / ac, steps=3), "--grad-accum", "2",
                                           "--save-every", "100", "--num-workers", "0", "--ac", ac])
        assert code == 0, stderr[-3000:]
        assert f"activation checkpointing: {ac}" in stdout
        n_micro = 3 * 2
        assert layout["mlp_calls"] == {k: n_micro * (2 if k in twice[ac] else 1)
                                       for k in ("vision.0", "vision.1", "llm.0", "llm.1")}, ac
    for ac in ("full", "vision", "every-2"):
        assert_same_steps(metrics(tmp_path / "none"), metrics(tmp_path / ac))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_per_block_vision_units_match_the_one_unit_tower(family, data, layout, request, tmp_path):
    """Untied checkpoints (own lm_head, so the token embeddings and [norm, lm_head] get their own units), one
    process, bf16 compute (in fp32 the casts FSDP makes at each unit's inputs would change nothing: casting the
    vision blocks' rotary cos/sin to bf16 shows here), some micro-batches text-only. --vision-shard blocks (Qwen3-VL:
    deepstack mergers run between the blocks) gives the one-unit tower's losses, gradient norms and weights. (Its
    sharding over ranks: the HSDP run below.)"""
    tiny = untie(request.getfixturevalue("tiny_qwen25" if family == "qwen2.5" else "tiny_qwen3"), tmp_path / "untied")
    units = {}
    for shard in ("tower", "blocks"):
        code, _, stderr = in_process([*common(data, tiny, tmp_path / shard, steps=3), "--save-every", "100",
                                      "--num-workers", "0", "--dtype", "bf16", "--vision-shard", shard])
        assert code == 0, stderr[-3000:]
        units[shard] = sorted(layout["units"].values())
    layers = [["model.language_model.layers.0"], ["model.language_model.layers.1"]]
    common_units = [[""], ["model.visual"], ["model.language_model.embed_tokens"], *layers,
                    ["model.language_model.norm", "lm_head"]]
    assert units["tower"] == sorted(common_units)
    assert units["blocks"] == sorted(common_units + [["model.visual.blocks.0"], ["model.visual.blocks.1"]])
    assert_same_steps(metrics(tmp_path / "tower"), metrics(tmp_path / "blocks"))
    start = load_file(str(Path(tiny) / "model.safetensors"))
    assert_same_weights(tmp_path / "tower", tmp_path / "blocks", start)
    assert not torch.equal(weights(tmp_path / "blocks")["lm_head.weight"], start["lm_head.weight"])  # its own unit trained


def hsdp_args(data, tiny, out):
    """--epochs 1 over the 17 entries: 5 steps of 4 samples (4 ranks x 1, or 1 process x 4)."""
    return ["--model", tiny, "--data", mixture_spec(data), "--out", str(out), "--max-steps", "0", "--epochs", "1",
            "--save-every", "2", "--keep-last", "5", "--max-length", "512", "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--seed", "3", "--num-workers", "0", "--vision-shard", "blocks", "--freeze-vision", "--export-every", "2"]


def chunks(ckpt, name):
    """Number of shards a checkpoint holds of parameter `name` (HSDP: one per rank of a replica)."""
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    return len(meta.state_dict_metadata[f"model.{name}"].chunks)


@pytest.mark.slow
def test_hsdp_2x2_matches_one_process_and_resumes_on_one_rank_with_its_schedule(data, measured, tiny_qwen3, tmp_path):
    """Qwen3-VL (deepstack), the vision tower frozen (its blocks' units hold no trained parameter, the tower's unit
    the trained merger), per-block units, an export at step 2. HSDP as 2 replicas x 2 ranks from two launch.sh
    "nodes" of 2 ranks (auto turns it on) against one process with --grad-accum 4 (the same steps): same losses,
    gradient norms and weights; each replica's checkpoint holds 2 shards. Then its step-4 checkpoint resumed in one
    process keeps the 5-step schedule (1 process would make 17) with the same learning rate at step 5; a resume
    with another --lr is refused with one line."""
    files, entries, lengths, _ = measured
    plan = planner(entries, lengths, world=4, grad_accum=1, batch_size=1, seed=3)
    has_image = [[any(files[f][1][i]["images"] for m in rank for f, i in m) for rank in plan.plan(g)[0]] for g in range(5)]
    assert any(len(set(ranks)) > 1 for ranks in has_image)  # a text-only rank beside one with images
    hsdp, one = tmp_path / "hsdp", tmp_path / "one"
    env = {**ENV, "NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen(["bash", "launch.sh", f"NODE_RANK={i}", *hsdp_args(data, tiny_qwen3, hsdp)], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    code, _, stderr = in_process([*hsdp_args(data, tiny_qwen3, one), "--grad-accum", "4"])  # meanwhile
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), logs[1][-3000:] + logs[0][-3000:]
    assert code == 0, stderr[-3000:]
    assert "HSDP mesh {'replicate': 2, 'shard': 2}" in logs[1]
    start = load_file(str(Path(tiny_qwen3) / "model.safetensors"))
    assert_same_steps(metrics(one), metrics(hsdp))
    assert_same_weights(one, hsdp, start)
    name = "model.language_model.layers.0.mlp.down_proj.weight"
    assert (chunks(one / "ckpt" / "step_00000004", name), chunks(hsdp / "ckpt" / "step_00000004", name)) == (1, 2)
    end, kind = weights(hsdp), {k: model.param_kind(k) for k in start}
    moved = {k: not torch.equal(start[k], end[k]) for k in start}
    assert sum(kind[k] == "vision" for k in start) > 10 and not any(moved[k] for k in start if kind[k] == "vision")
    assert any(moved[k] for k in start if kind[k] == "merger") and any(moved[k] for k in start if kind[k] == "llm")
    assert (hsdp / "export" / "step_2" / "model.safetensors").is_file()
    net, proc = model.load(hsdp / "final")
    assert len(model.generate(net, proc, read_records(data / "img.jsonl")[:1], max_new_tokens=3)) == 1

    resumed = tmp_path / "resumed"
    shutil.copytree(hsdp / "ckpt" / "step_00000004", resumed / "ckpt" / "step_00000004")
    code, stdout, stderr = in_process(hsdp_args(data, tiny_qwen3, resumed))
    assert code == 0, stderr[-3000:]
    assert "keeping the checkpoint's schedule: 5 steps, warmup 1 (this run's 1 ranks would make it 17 steps)" in stdout
    assert [m["step"] for m in metrics(resumed)] == [5] and metrics(resumed)[0]["lr"] == metrics(hsdp)[4]["lr"] > 0
    shutil.rmtree(resumed / "ckpt" / "step_00000005")
    code, _, stderr = in_process([a if a != "1e-3" else "2e-3" for a in hsdp_args(data, tiny_qwen3, resumed)])
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "another schedule (--lr 0.001 -> 0.002)" in lines[0]


def test_hsdp_replicas_must_divide_the_ranks(data, tiny_qwen25, tmp_path):
    """An --hsdp-replicas that does not divide the ranks is an input error: one line, exit 2."""
    code, _, stderr = in_process([*common(data, tiny_qwen25, tmp_path / "o", steps=1), "--num-workers", "0",
                                  "--hsdp", "on", "--hsdp-replicas", "3"])
    assert code == 2 and stderr.strip().splitlines() == ["error: --hsdp-replicas 3: must divide the 1 ranks"], stderr
