"""LoRA fine-tuning (train.py --lora) on CPU with the tiny checkpoints. Units, no run: which layers get adapters,
what trains and at which learning rate, the flag mistakes. Then real runs, each against a reference: a DoRA run
on the language model and the vision blocks keeps every base weight of --model while its adapters move, its
merged export gives the PEFT model's logits (base + OUT/final_adapter through PeftModel.from_pretrained) and its
checkpoint is a small fraction of a full fine-tune's; SIGKILL + resume is bit-identical (with adapter dropout:
the RNG continues exactly); 2 FSDP ranks == 1 process (DoRA, with --pack and activation checkpointing, the merger
trained in full beside the adapters); a resume with another LoRA flag is refused with one line.
Single-process runs go through train.py's entry point in this process (~5 s of imports saved each)."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flops
import mixture
import model
import test_train
import train
from cli_helpers import one_error_line
from common import UserError, read_records
from test_train import ENV, REPO, TORCHRUN, in_process, metrics, mixture_spec, run, wrapper


data = test_train.data  # fixture: the record files of test_train (images, text-only)


def lora_args(data, tiny, out, *extra, steps=4):
    return ["--model", tiny, "--data", mixture_spec(data), "--out", str(out), "--max-steps", str(steps), "--save-every", "2",
            "--max-length", "512", "--lr", "1e-2", "--warmup-ratio", "0", "--seed", "3", "--num-workers", "0", *extra]


# the main LoRA run: DoRA adapters on the language model and the vision blocks, dropout on (so a resume must
# continue the RNG exactly), nothing else trained
MAIN = ["--lora", "8", "--lora-targets", "llm+vision", "--dora", "--lora-dropout", "0.1", "--freeze-merger"]


def torchrun(args):
    return run([*TORCHRUN, "train.py", *args])


def checkpoint_keys(ckpt):
    """The model tensors a torch.distributed.checkpoint directory holds."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    return {k.removeprefix("model.") for k in meta.state_dict_metadata if k.startswith("model.")}


def size(folder):
    return sum(f.stat().st_size for f in Path(folder).iterdir())


def logits(net, proc, records):
    """Logits of each record (its prompt and answer) under net: [(T, V)]."""
    out = []
    for rec in records:
        b = model.collate([model.tokenize(rec, proc)], proc.pad_token_id)
        b.pop("labels")
        with torch.no_grad():
            out.append(net(**{k: v for k, v in b.items() if v is not None}).logits[0])
    return out


def assert_export_is_the_peft_model(out, tiny, records):
    """OUT/final (a plain Hugging Face checkpoint, adapters merged) and --model + OUT/final_adapter through PEFT
    give the same logits, and the adapter really changes them. Returns the PEFT model."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    merged, proc = model.load(out / "final")
    base = AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(base, out / "final_adapter").eval()
    with_adapter = logits(peft, proc, records)
    for a, b in zip(logits(merged, proc, records), with_adapter):
        assert (a - b).abs().max().item() < 1e-5
    with peft.disable_adapter():
        without = logits(peft, proc, records)
    assert max((a - b).abs().max().item() for a, b in zip(with_adapter, without)) > 1e-3
    return peft


# -----------------------------------------------------------------------------
# Units: adapters, what trains, learning rates, flag mistakes


LLM_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}
VISION_LINEARS = {"qwen2.5": {"attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
                  "qwen3": {"attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"}}


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_adapters_trained_parameters_and_learning_rates(family, tiny_qwen25, tiny_qwen3):
    from transformers import AutoConfig, AutoModelForImageTextToText

    tiny = {"qwen2.5": tiny_qwen25, "qwen3": tiny_qwen3}[family]
    config = AutoConfig.from_pretrained(tiny)
    for extra, vision in ((["--lora-targets", "llm+vision", "--dora", "--vision-lr", "1e-4", "--freeze-merger"], True),
                          (["--merger-lr", "1e-3"], False)):
        args = train.get_args(["--model", tiny, "--data", "x", "--out", "x", "--lora", "8", "--lr", "2e-4", *extra])
        with torch.device("meta"):
            net = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        train.apply_lora(net, args)
        train.set_trainable(net, args)
        # every linear of each decoder layer (and vision block), and nothing else: not lm_head, not the merger
        adapted = {n for n, m in net.named_modules() if hasattr(m, "lora_A")}
        expected = {f"model.language_model.layers.{i}.{s}" for i in range(2) for s in LLM_LINEARS}
        if vision:
            expected |= {f"model.visual.blocks.{i}.{s}" for i in range(2) for s in VISION_LINEARS[family]}
        assert adapted == expected
        trained = {n for n, p in net.named_parameters() if p.requires_grad}
        adapters = {n for n in trained if "lora_" in n}
        assert {n.split(".lora_")[0] for n in adapters} == expected
        assert args.dora == any("lora_magnitude_vector" in n for n in adapters)
        # the targeted parts' own weights are frozen; a part not targeted follows the freeze flags (the vision
        # tower and the merger train in full in the second case)
        in_full = trained - adapters
        assert {model.param_kind(n) for n in in_full} == (set() if vision else {"vision", "merger"})
        assert all(not p.requires_grad for n, p in net.named_parameters() if ".base_layer." in n)
        # learning rates per part, weight decay on matrices only (DoRA's magnitudes are vectors)
        groups = {g["name"]: g for g in train.build_optimizer(net, args).param_groups}
        if vision:
            assert set(groups) == {"llm", "llm_no_decay", "vision", "vision_no_decay"}
            assert groups["vision"]["base_lr"] == 1e-4 and groups["llm"]["base_lr"] == 2e-4
            assert all("lora_magnitude_vector" in n for n, p in net.named_parameters()
                       if any(p is q for q in groups["llm_no_decay"]["params"]))
        else:
            assert groups["merger"]["base_lr"] == 1e-3 and groups["llm"]["base_lr"] == 2e-4
            assert "llm_no_decay" not in groups
        assert sum(len(g["params"]) for g in groups.values()) == len(trained)


def test_lora_flag_mistakes_are_one_line_errors():
    base = ["--model", "m", "--data", "x", "--out", "o"]
    for extra, expected in (
            (["--dora"], "--dora without --lora R"),
            (["--lora-targets", "llm+vision"], "--lora-targets without --lora R"),
            (["--lora", "-1"], "--lora -1: give the adapter rank"),
            (["--lora", "8", "--lora-dropout", "1"], "--lora-dropout 1.0: must be in [0, 1)"),
            (["--lora", "8", "--freeze-llm"], "--freeze-llm with --lora"),
            (["--lora", "8", "--lora-targets", "llm+vision", "--freeze-vision"],
             "--freeze-vision with --lora-targets llm+vision")):
        with pytest.raises(UserError) as e:
            train.get_args(base + extra)
        assert expected in str(e.value), (extra, str(e.value))
    # the defaults fill in only with --lora (RSCoVLM's alpha 16 and dropout 0.05)
    args = train.get_args(base + ["--lora", "64"])
    assert (args.lora_alpha, args.lora_dropout, args.lora_targets, args.dora) == (16.0, 0.05, "llm", False)
    assert train.get_args(base).lora_alpha is None


# -----------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def lora_run(data, tiny_qwen25, tmp_path_factory):
    """The uninterrupted reference: one process, MAIN's adapters only, 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("lora") / "main"
    code, stdout, stderr = in_process(lora_args(data, tiny_qwen25, out, *MAIN))
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert "DoRA on 24 linears (llm+vision)" in stdout and "also trained in full: nothing" in stdout
    return out


def test_base_weights_stay_and_the_merged_export_is_the_peft_model(lora_run, data, tiny_qwen25):
    out = lora_run
    # compared as loaded (the files of Qwen2.5-VL keep transformers 4's names)
    start, end = (model.load(d)[0].state_dict() for d in (tiny_qwen25, out / "final"))
    assert set(start) == set(end)  # the layout of --model: no base_layer / lora_ names in the export
    adapter = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    adapted = {n.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for n in adapter}
    assert len(adapted) == 24 and adapted <= set(start)
    # everything without an adapter (embeddings, norms, biases, patch embedding, merger) is bit-identical to --model
    assert all(torch.equal(start[k], end[k]) for k in start if k not in adapted)
    # the adapted weights moved, and by exactly the adapters: PEFT's own merge of --model + OUT/final_adapter
    # (a base weight that had trained too would be off by about the learning rate, 1e-2)
    assert all(not torch.equal(start[k], end[k]) for k in adapted)
    records = read_records(data / "img.jsonl")[:3] + read_records(data / "text.jsonl")[:1]
    peft = assert_export_is_the_peft_model(out, tiny_qwen25, records)
    merged = peft.merge_and_unload().state_dict()
    assert max((merged[k] - end[k]).abs().max().item() for k in adapted) < 1e-6
    assert min((start[k] - end[k]).abs().max().item() for k in adapted) > 1e-4
    cfg = json.loads((out / "final_adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["use_dora"], cfg["modules_to_save"]) == (8, 16, 0.1, True, None)


@pytest.fixture(scope="module")
def full_run(data, tiny_qwen25, tmp_path_factory):
    """A full fine-tune of the same model, one step, the same flags otherwise."""
    out = tmp_path_factory.mktemp("lora") / "full"
    code, stdout, stderr = in_process(lora_args(data, tiny_qwen25, out, steps=1))
    assert code == 0, stderr[-3000:]
    return out


def test_checkpoint_holds_only_the_adapters_and_is_small(lora_run, full_run):
    """The LoRA checkpoint holds the adapters (and their AdamW moments) only; against a full fine-tune's checkpoint
    of the same model, measured here."""
    ckpt = lora_run / "ckpt" / "step_00000004"
    keys = checkpoint_keys(ckpt)
    assert keys and all("lora_" in k for k in keys)  # no base weight, no tied lm_head
    assert "model.language_model.layers.0.mlp.down_proj.weight" in checkpoint_keys(full_run / "ckpt" / "step_00000001")
    lora_bytes, full_bytes = size(ckpt), size(full_run / "ckpt" / "step_00000001")
    print(f"checkpoint: LoRA r 8 {lora_bytes / 1e6:.2f} MB, full fine-tune {full_bytes / 1e6:.2f} MB")
    assert lora_bytes < 0.25 * full_bytes


def test_logged_flops_are_bench_trains_formula_on_the_same_step(lora_run, full_run, data, tiny_qwen25):
    """The FLOPs train.py logs for step 1 (full fine-tune and LoRA) equal what bench/bench_train.py computes for the
    same sample (bench_train.prepare): flops.matmul_costs of a meta-device model of the config, here with the run's
    trained parameters, and flops.step_flops. So both MFUs share one numerator. LoRA's count is lower: its frozen
    base weights do no weight gradient (test_bench checks each rate against torch's FLOP counter)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoModelForImageTextToText

    config, proc = AutoConfig.from_pretrained(tiny_qwen25), model.load_processor(tiny_qwen25)
    files, entries = mixture.build_mixture(mixture_spec(data), seed=3)
    lengths = [[1] * len(recs) for _, recs in files]
    step1 = mixture.StepPlanner(entries, lengths, SimpleNamespace(seed=3, grad_accum=1, batch_size=1, max_tokens=0,
                                                                max_length=512, pack=False), 1).block(0)[0]
    samples = [mixture.sample_stats(model.tokenize(files[f][1][i], proc)) for f, i in step1]
    logged = {}
    for name, out, flags in (("full", full_run, []), ("lora", lora_run, MAIN)):
        with torch.device("meta"):
            meta = AutoModelForImageTextToText.from_config(config)
        args = train.get_args(lora_args(data, tiny_qwen25, out, *flags))
        train.apply_lora(meta, args)
        train.set_trainable(meta, args)
        logged[name] = sum(flops.step_flops(flops.matmul_costs(meta), config, samples).values())
        assert metrics(out)[0]["flops"] == logged[name], name
    assert logged["lora"] < logged["full"]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bit_identical(lora_run, data, tiny_qwen25, tmp_path):
    """A process of its own, SIGKILLed while inside step 3 (checkpoint 2 written), then the same command: the same
    export, adapter and losses as the uninterrupted run. The adapters' dropout draws from the RNG, so this also
    holds only if the resumed run's RNG continues exactly where checkpoint 2 left it."""
    run_dir, mark = tmp_path / "killed", tmp_path / "paused"
    args = lora_args(data, tiny_qwen25, run_dir, *MAIN)
    env = {**ENV, "HOOKS": "pause", "HOOK_STEP": "3", "HOOK_MARK": str(mark), "RANK": "0"}
    p = subprocess.Popen([sys.executable, str(wrapper(tmp_path)), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        while not (Path(f"{mark}.0").exists() and Path(f"{mark}.0").read_text()):
            assert p.poll() is None and time.time() - t0 < 200, p.stdout.read().decode()[-3000:]
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL
    assert [d.name for d in train.complete_checkpoints(run_dir / "ckpt")] == ["step_00000002"]
    assert not (run_dir / "final").exists()
    code, stdout, stderr = in_process(args)
    assert code == 0 and "step_00000002 at step 2" in stdout, stdout[-3000:] + stderr[-3000:]
    for f in ("final/model.safetensors", "final_adapter/adapter_model.safetensors", "final_adapter/adapter_config.json"):
        assert (run_dir / f).read_bytes() == (lora_run / f).read_bytes(), f
    assert [(m["step"], m["loss"]) for m in metrics(run_dir)] == [(m["step"], m["loss"]) for m in metrics(lora_run)]


@pytest.mark.slow
def test_two_ranks_match_one_process_with_pack_and_grad_ckpt(data, tiny_qwen25, tmp_path):
    """DoRA on the language model, the merger trained in full beside it (vision frozen), no dropout: 2 FSDP ranks
    with one micro-batch each == one process with --grad-accum 2, --pack and activation checkpointing (the same
    samples per step): the same losses and gradient norms, the same adapters. The adapter export then carries
    the merger as PEFT's modules_to_save, so base + adapter is again the merged export."""
    flags = ["--lora", "8", "--dora", "--lora-dropout", "0", "--freeze-vision", "--max-tokens", "512"]
    two, one = tmp_path / "two", tmp_path / "one"
    p = torchrun(lora_args(data, tiny_qwen25, two, *flags, steps=3))
    assert p.returncode == 0, p.stderr[-3000:]
    code, stdout, stderr = in_process(lora_args(data, tiny_qwen25, one, *flags, "--grad-accum", "2", "--pack", "--ac",
                                                "full", steps=3))
    assert code == 0, stderr[-3000:]
    assert "also trained in full: merger" in stdout
    ref, got = metrics(two), metrics(one)
    assert len(ref) == len(got) == 3
    for a, b in zip(ref, got):
        assert a["samples"] == b["samples"] == 2 and a["supervised_tokens"] == b["supervised_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    a2, a1 = (load_file(str(d / "final_adapter" / "adapter_model.safetensors")) for d in (two, one))
    assert set(a2) == set(a1) and any("merger" in k for k in a2)
    # AdamW turns rounding differences of near-zero gradients into steps of up to the learning rate (1e-2): the
    # merger (trained in full) differs by up to ~5e-5, the adapters by ~3e-6; 1e-4 is 1% of one step
    assert max((a2[k] - a1[k]).abs().max().item() for k in a2) < 1e-4
    assert max(a2[k].abs().max().item() for k in a2 if "lora_B" in k) > 1e-3  # the adapters did train
    assert_export_is_the_peft_model(two, tiny_qwen25, read_records(data / "img.jsonl")[:2])


def test_resume_with_another_lora_flag_is_refused(lora_run, data, tiny_qwen25, tmp_path):
    """A checkpoint holds only what trains: a resume that asks for other adapters (or none) is refused with one
    line before the model is built, and OUT/args.json keeps the flags of the run it would continue."""
    run_dir = tmp_path / "changed"
    shutil.copytree(lora_run / "ckpt" / "step_00000002", run_dir / "ckpt" / "step_00000002")
    shutil.copy(lora_run / "args.json", run_dir / "args.json")
    for flags, expected in (([a if a != "0.1" else "0.2" for a in MAIN], "--lora-dropout 0.1 -> 0.2"),
                            (["--lora", "8", "--lora-dropout", "0.1", "--freeze-merger"],
                             "--lora-targets llm+vision -> llm; --dora True -> False"),
                            ([], "--lora 8 -> 0")):
        result = in_process(lora_args(data, tiny_qwen25, run_dir, *flags))
        line = one_error_line(result, [expected, "trained other parameters", "step_00000002"])
        assert "resume with the flags it was started with" in line
    assert (run_dir / "args.json").read_text() == (lora_run / "args.json").read_text()
