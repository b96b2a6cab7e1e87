"""train.py's parallel layout on CPU (gloo) with the tiny checkpoints, each checked against a reference run:
HSDP (2 replicas x 2 ranks, forced on one node and from two launch.sh "nodes") against FSDP over 4 ranks; the FSDP units (per-block
vision, token embeddings, [norm, lm_head]) against the previous layout, for both families, with a text-only rank;
activation checkpointing choices against none, and which blocks really rerun."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import train
from test_train import ENV, REPO, common, data, free_port, metrics, mixture, run, weights  # noqa: F401 (data: fixture)


# Runs train.main() with two test-only changes: --old-layout puts back the FSDP layout train.py had before
# per-block vision units and separate embedding / head units (the reference), and rank 0 writes OUT/layout.json:
# the FSDP units (module names that share one unit) and how often each block's MLP started a forward (a child
# module: its hooks fire again when a checkpointed block reruns its forward in backward; a pre-hook, because the
# rerun stops as soon as it has rebuilt what backward needs, inside the MLP).
WRAPPER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import train
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

def old_apply_fsdp(model, param_dtype, *unused):
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model.model.visual, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model

if "--old-layout" in sys.argv:
    sys.argv.remove("--old-layout")
    train.apply_fsdp = old_apply_fsdp
layout = {{"units": {{}}, "mlp_calls": {{}}}}
build_model = train.build_model
def build_and_watch(args, *rest):
    model = build_model(args, *rest)
    for name, m in model.named_modules():
        if isinstance(m, FSDPModule):
            layout["units"].setdefault(str(id(fully_shard.state(m))), []).append(name)
    calls = layout["mlp_calls"]
    for stack, blocks in (("vision", model.model.visual.blocks), ("llm", model.model.language_model.layers)):
        for i, block in enumerate(blocks):
            block.mlp.register_forward_pre_hook(lambda *_, k=f"{{stack}}.{{i}}": calls.__setitem__(k, calls.get(k, 0) + 1))
    layout["out"] = args.out
    return model
train.build_model = build_and_watch
sys.argv = ["train.py"] + sys.argv[1:]
train.main()
if os.environ.get("RANK", "0") == "0":
    with open(os.path.join(layout["out"], "layout.json"), "w") as f:
        json.dump({{"units": sorted(layout["units"].values()), "mlp_calls": layout["mlp_calls"]}}, f)
"""


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("wrapper") / "wrapper.py"
    path.write_text(WRAPPER.format(repo=str(REPO)))
    return path


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


def text_only_rank_somewhere(data, world, steps):
    """The premise of the layout tests: in some micro-batch one rank has images and another has none (the
    text-only rank must still join the vision tower's collectives)."""
    files, entries = train.build_mixture(mixture(data), seed=3)
    has_image = [[bool(files[f][1][i]["images"]) for f, i in [entries[train.stream_entry(k, r, world, len(entries), 3)]
                                                              for r in range(world)]]
                 for k in range(steps)]
    return any(len(set(ranks)) > 1 for ranks in has_image)


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


def chunks(out, name):
    """Number of shards the checkpoint holds of parameter `name` (HSDP: one per rank of a replica)."""
    meta = dcp.FileSystemReader(str(train.complete_checkpoints(Path(out) / "ckpt")[-1])).read_metadata()
    return len(meta.state_dict_metadata[f"model.{name}"].chunks)


# -----------------------------------------------------------------------------


def test_ac_flag_and_its_alias():
    base = ["--model", "m", "--data", "d", "--out", "o"]
    assert train.get_args(base).ac == "none"
    assert train.get_args(base + ["--grad-ckpt"]).ac == "full"  # the old flag keeps working
    assert train.get_args(base + ["--ac", "every-3"]).ac == "every-3"
    for bad in ("every-0", "every-", "sometimes"):
        with pytest.raises(SystemExit) as e:
            train.get_args(base + ["--ac", bad])
        assert e.value.code == 2


def test_activation_checkpointing_changes_no_number_and_reruns_the_chosen_blocks(data, tiny_qwen25, wrapper, tmp_path):
    """One process, 3 steps of 2 micro-batches (some text-only: the tower runs on the blank image). Every --ac
    choice gives --ac none's losses and gradient norms; a checkpointed block's MLP runs twice per micro-batch
    (forward, then again in backward), any other block's once. Blocks are counted from 1 in each stack
    (every-2: the 2nd decoder layer and the 2nd vision block of the tiny model's two each)."""
    twice = {"none": set(), "full": {"vision.0", "vision.1", "llm.0", "llm.1"}, "vision": {"vision.0", "vision.1"},
             "every-2": {"vision.1", "llm.1"}}
    runs = {}
    for ac in twice:
        out = tmp_path / ac
        p = run([sys.executable, str(wrapper), *common(data, tiny_qwen25, out, steps=3), "--grad-accum", "2",
                 "--save-every", "100", "--num-workers", "0", "--ac", ac])
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"activation checkpointing: {ac}" in p.stdout
        runs[ac] = out
        calls = json.loads((out / "layout.json").read_text())["mlp_calls"]
        n_micro = 3 * 2
        assert calls == {k: n_micro * (2 if k in twice[ac] else 1) for k in ("vision.0", "vision.1", "llm.0", "llm.1")}, ac
    for ac in ("full", "vision", "every-2"):
        assert_same_steps(metrics(runs["none"]), metrics(runs[ac]))


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_fsdp_units_match_the_previous_layout(family, data, wrapper, request, tmp_path):
    """Untied checkpoints (own lm_head, so the token embeddings and [norm, lm_head] get their own units), 2 ranks,
    a text-only rank in some step, bf16 compute (in fp32 the casts FSDP makes at each unit's inputs would change
    nothing: casting the vision blocks' rotary cos/sin to bf16 shows here). The new units with per-block vision
    (Qwen3-VL: deepstack mergers run between the blocks) give the previous layout's losses, gradient norms and
    weights."""
    tiny = untie(request.getfixturevalue("tiny_qwen25" if family == "qwen2.5" else "tiny_qwen3"), tmp_path / "untied")
    assert text_only_rank_somewhere(data, world=2, steps=3)
    outs = {}
    for name, extra in (("old", ["--old-layout"]), ("new", ["--vision-shard", "blocks"])):
        outs[name] = tmp_path / name
        p = run(["torchrun", "--standalone", "--nproc-per-node", "2", str(wrapper),
                 *common(data, tiny, outs[name], steps=3), "--save-every", "100", "--num-workers", "0", "--dtype", "bf16",
                 *extra])
        assert p.returncode == 0, p.stderr[-3000:]
    units = {name: json.loads((out / "layout.json").read_text())["units"] for name, out in outs.items()}
    layers = ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert units["old"] == sorted([[""], ["model.visual"], *[[l] for l in layers]])
    assert units["new"] == sorted([[""], ["model.visual"], ["model.visual.blocks.0"], ["model.visual.blocks.1"],
                                   ["model.language_model.embed_tokens"], *[[l] for l in layers],
                                   ["model.language_model.norm", "lm_head"]])
    assert_same_steps(metrics(outs["old"]), metrics(outs["new"]))
    start = load_file(str(Path(tiny) / "model.safetensors"))
    assert_same_weights(outs["old"], outs["new"], start)
    assert not torch.equal(weights(outs["new"])["lm_head.weight"], start["lm_head.weight"])  # its own unit trained


def test_hsdp_2x2_matches_fsdp_over_4_ranks(data, tiny_qwen25, tmp_path):
    """4 ranks, 3 steps, per-block vision units (tied embeddings: in the root). FSDP over all 4 on one node
    (--hsdp auto stays off there) against HSDP as 2 replicas x 2 ranks from two launch.sh "nodes" of 2 ranks
    (auto turns it on): same losses, gradient norms and weights; each replica's checkpoint holds 2 shards,
    FSDP's 4. (--hsdp on --hsdp-replicas N builds the same mesh on one node; test_hsdp_replicas_must_divide_the_ranks
    checks that flag.)"""
    assert text_only_rank_somewhere(data, world=4, steps=3)

    def args(out):
        return [*common(data, tiny_qwen25, out, steps=3), "--save-every", "100", "--num-workers", "0",
                "--vision-shard", "blocks"]

    fsdp, hsdp = tmp_path / "fsdp", tmp_path / "hsdp"
    p = run(["torchrun", "--standalone", "--nproc-per-node", "4", "train.py", *args(fsdp)])
    assert p.returncode == 0 and "FSDP mesh {'shard': 4}" in p.stdout, p.stderr[-3000:]
    env = {**ENV, "NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen(["bash", "launch.sh", f"NODE_RANK={i}", *args(hsdp)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), logs[1][-3000:] + logs[0][-3000:]
    assert "HSDP mesh {'replicate': 2, 'shard': 2}" in logs[1]
    start = load_file(str(Path(tiny_qwen25) / "model.safetensors"))
    assert_same_steps(metrics(fsdp), metrics(hsdp))
    assert_same_weights(fsdp, hsdp, start)
    name = "model.language_model.layers.0.mlp.down_proj.weight"  # (64, 128): 4 shards of 16 rows, or 2 of 32
    assert (chunks(fsdp, name), chunks(hsdp, name)) == (4, 2)


def test_hsdp_replicas_must_divide_the_ranks(data, tiny_qwen25, tmp_path):
    """An --hsdp-replicas that does not divide the ranks is an input error: one line, exit 2."""
    p = run([sys.executable, "train.py", *common(data, tiny_qwen25, tmp_path / "o", steps=1), "--num-workers", "0",
             "--hsdp", "on", "--hsdp-replicas", "3"])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and lines == ["error: --hsdp-replicas 3: must divide the 1 ranks"], p.stderr[-3000:]
