"""bench/bench_train.py on CPU (the tiny model): `python bench/bench_train.py --steps 1 --warmup 0 --json-out F` runs every variant, ends with one
ratio line per variant, counts attention calls the way the variants really make them (varlen: one call per vision
block per tower forward; transformers' loop: one per window), packs without padding, starts every variant from the
same weights (same first loss), and writes the numbers it prints to the JSON file. Plus the pieces the GPU run
relies on that a CPU can check: the window plan against transformers' own, and the real-size configs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_train.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}  # the CPU comparison, on any machine
    proc = subprocess.run([sys.executable, "bench/bench_train.py", "--steps", "1", "--warmup", "0", "--json-out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def variants(report):
    return {v["name"]: v for v in report["variants"]}


@pytest.mark.slow
def test_every_variant_runs_and_the_summary_ends_with_its_ratio_lines(bench_run):
    stdout, report = bench_run
    runs = variants(report)
    assert {"hf", "hf+ac-full", "project", "project+varlen", "project+pack", "project+varlen+pack",
            "project+varlen+pack+fused", "project+varlen+pack+fused+blocks", "project+varlen+pack+fused+ac-vision",
            "project+varlen+pack+fused+ac-full"} <= set(runs)
    assert all(v["status"] == "ok" for v in runs.values()), {n: v["status"] for n, v in runs.items()}
    lines = stdout.strip().splitlines()
    ratio = [ln for ln in lines if ln.startswith("ratio vs plain HF: ")]
    assert [ln.split()[4] for ln in ratio] == [n for n in runs if n != "hf"]
    # the ratio lines are the last thing printed (the AC-to-AC comparisons follow the plain ones)
    tail = lines[-len(ratio) - 2:]
    assert all(ln.startswith("ratio vs plain HF") for ln in tail), tail
    # ... and say what the JSON says
    for ln in ratio:
        name, value = re.fullmatch(r"ratio vs plain HF: (\S+) ([\d.]+)x", ln).groups()
        assert float(value) == pytest.approx(round(runs[name]["speedup_vs_hf"], 2), abs=1e-9)
        assert runs[name]["speedup_vs_hf"] == pytest.approx(runs["hf"]["step_s"] / runs[name]["step_s"])
    assert report["summary"] == [ln for ln in lines if ln.startswith("ratio vs plain HF")]


@pytest.mark.slow
def test_attention_calls_varlen_one_per_block_hf_one_per_window(bench_run):
    _, report = bench_run
    runs, depth = variants(report), report["samples"]["vision_depth"]
    per_segment = report["samples"]["per_segment_vision_calls"]
    for name in ("project+varlen", "project+varlen+pack"):
        v = runs[name]
        assert v["vision_attn"] == f"varlen x{v['vision_attn_calls']}"
        assert v["vision_attn_calls"] == depth * v["tower_forwards"] and v["vision_calls_per_block_forward"] == 1.0
    for name in ("hf", "project", "project+pack"):
        v = runs[name]
        assert v["vision_attn"] == f"sdpa x{v['vision_attn_calls']}"
        # transformers' loop: one call per window (or image, in full-attention blocks), as the bench's window plan says
        assert v["vision_attn_calls"] == per_segment > depth * v["tower_forwards"]
    # activation checkpointing reruns the blocks' forward in backward: twice the calls
    assert runs["hf+ac-full"]["vision_attn_calls"] == 2 * per_segment
    assert runs["project+varlen+pack+fused+ac-vision"]["vision_calls_per_block_forward"] == 2.0
    text_calls = runs["project+varlen+pack"]["text_attn_calls"]
    assert runs["project+varlen+pack+fused+ac-vision"]["text_attn_calls"] == text_calls
    assert runs["project+varlen+pack+fused+ac-full"]["text_attn_calls"] == 2 * text_calls


@pytest.mark.slow
def test_packed_rows_have_no_padding_and_every_variant_starts_from_the_same_point(bench_run):
    _, report = bench_run
    runs = variants(report)
    for name, v in runs.items():
        if v["variant"]["pack"]:
            assert v["pad_frac"] == 0 and v["tokens_computed"] == report["samples"]["tokens"], name
        else:
            assert v["pad_frac"] > 0 and v["tokens_computed"] > report["samples"]["tokens"], name
    # same initial weights and samples: the first step's loss (before any update) agrees across all paths
    first = [v["loss_first"] for v in runs.values()]
    assert max(first) - min(first) < 1e-5 * abs(first[0]), first
    # the varlen kernel (the exact reference on CPU) against transformers' per-window loop in fp32
    assert report["vision_check"]["varlen_vs_ref"] < 1e-5


@pytest.mark.slow
def test_the_table_prints_the_json_numbers(bench_run):
    stdout, report = bench_run
    rows = {ln.split()[0]: ln.split() for ln in stdout.splitlines() if ln.split() and ln.split()[0] in variants(report)
            and not ln.startswith("ratio")}
    for name, v in variants(report).items():
        cols = rows[name]
        assert float(cols[1]) == pytest.approx(v["step_s"], abs=5e-4)
        assert float(cols[2]) == pytest.approx(v["tokens_per_s"], abs=0.5)
        assert float(cols[3]) == pytest.approx(100 * v["pad_frac"], abs=0.05)
        assert f"{v['vision_attn']}," in " ".join(cols)
        assert cols[-5] == "-" and v["mfu"] is None  # no spec peak on a CPU
        assert float(cols[-4]) == pytest.approx(100 * v["mfu_measured"], abs=0.005)
        assert float(cols[-3]) == pytest.approx(v["mem_gb"], abs=0.005)
        assert float(cols[-2]) == pytest.approx(v["loss_first"], abs=5e-6)
        assert float(cols[-1]) == pytest.approx(v["speedup_vs_hf"], abs=0.005)
        assert v["tokens_per_s"] == pytest.approx(report["samples"]["tokens"] / v["step_s"])


def test_window_plan_matches_transformers():
    """The windows bench_train.py counts FLOPs and expected calls with are the ones transformers' Qwen2.5-VL tower uses."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers has no vision_utils.get_vision_window_index")
    import bench_train
    import flops

    config = bench_train.real_config("qwen2.5-3b")
    vc = config.vision_config
    for grid in [(1, 72, 72), (1, 58, 58), (1, 36, 36), (1, 72, 48), (1, 40, 26), (1, 8, 8)]:
        _, cu = vision_utils.get_vision_window_index(torch.tensor([grid]), vc.spatial_merge_size, vc.window_size,
                                                     vc.patch_size)
        windows, full = flops.vision_segments(config, torch.tensor(grid))
        assert sorted(windows) == sorted((cu[1:] - cu[:-1]).tolist()) and full == [grid[1] * grid[2]], grid
    # a 1008x1008 image: 81 windows in 28 windowed blocks + 4 full-attention blocks (model.py's note)
    one = [{"image_grid_thw": torch.tensor([[1, 72, 72]])}]
    assert bench_train.per_segment_calls(config, one) == 81 * 28 + 4


@pytest.mark.parametrize("name,billions,vision", [("qwen2.5-3b", 3.755, 0.669), ("qwen2.5-7b", 8.292, 0.677),
                                                  ("qwen3-vl-4b", 4.438, 0.415), ("qwen3-vl-8b", 8.767, 0.576)])
def test_real_configs_have_the_published_parameter_counts(name, billions, vision):
    """Guards the hand-written configs: their parameter counts are those of the published checkpoints
    (3.75B, 8.29B, 4.44B, 8.77B), and one image of 1024x1024 becomes the expected number of image tokens."""
    import numpy as np
    from transformers import AutoModelForImageTextToText

    import bench_train

    config = bench_train.real_config(name)
    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(config)
    assert sum(p.numel() for p in net.parameters()) / 1e9 == pytest.approx(billions, abs=5e-4)
    assert sum(p.numel() for p in net.model.visual.parameters()) / 1e9 == pytest.approx(vision, abs=5e-4)
    assert (net.lm_head.weight is net.model.language_model.embed_tokens.weight) == bench_train.CONFIGS[name]["tie"]
    ordinary = bench_train.ordinary_token_ids(config)
    assert ordinary.max() < config.text_config.bos_token_id  # no special token among the text tokens
    # 1024x1024 into the RSCoVLM budget: 1008x1008 (36x36 tokens) at patch 14, 992x992 (31x31) at patch 16
    from types import SimpleNamespace

    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vc = config.vision_config
    ip = Qwen2VLImageProcessorPil(patch_size=vc.patch_size, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": bench_train.RSCOVLM_PIXELS[0], "longest_edge": bench_train.RSCOVLM_PIXELS[1]})
    grid = ip(images=[Image.new("RGB", (1024, 1024))], return_tensors="pt")["image_grid_thw"][0].tolist()
    assert grid == ([1, 72, 72] if vc.patch_size == 14 else [1, 62, 62])
    proc = SimpleNamespace(image_processor=ip, patch_size=vc.patch_size, merge_size=2, image_token_id=config.image_token_id)
    for s in bench_train.synthetic_samples(4, config, proc, np.random.default_rng(0)):
        n_image = int(s["image_grid_thw"].prod()) // 4
        assert int((s["input_ids"] == config.image_token_id).sum()) == n_image == int(s["mm_token_type_ids"].sum())
        answer = int((s["labels"] != -100).sum()) - 1  # the answer tokens and their <|im_end|>
        assert bench_train.ANSWER_TOKENS[0] <= answer <= bench_train.ANSWER_TOKENS[1]
        assert s["labels"][s["labels"] != -100][-1] == config.text_config.eos_token_id


@pytest.mark.parametrize("fam,lora", [("qwen2.5", False), ("qwen3", False), ("qwen2.5", True)])
def test_step_flops_match_torch_flop_counter(fam, lora, tiny_qwen25, tiny_qwen3):
    """flops.step_flops (the MFU numerator of train.py and bench_train.py) against torch's FLOP counter on a real
    forward + backward (tiny widths, a 308-px image: Qwen2.5-VL's tower runs 3 x 3 windows, the edge ones partial;
    the window plan of larger images: test_window_plan_matches_transformers): the vision tower
    exactly; the language model exactly once its attention is counted the way sdpa's math kernel runs it (the
    whole T x T square, where step_flops counts the causal half). Every parameter trained: 4 FLOPs per weight
    and token for the patch embedding (no input gradient: the pixels need none), 6 for the rest. LoRA on the
    language model, vision tower frozen, merger trained: the tower does a forward only (2, attention without
    backward), the merger 4 (its weight's gradient, not its input's), the frozen base weights and lm_head 4
    (forward and input gradient: the merger trains before them), the adapters 6."""
    import copy
    from types import SimpleNamespace

    import numpy as np
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    import bench_train
    import flops
    import mixture
    import train

    tiny = tiny_qwen25 if fam == "qwen2.5" else tiny_qwen3
    config = AutoConfig.from_pretrained(tiny)
    vc, tc = config.vision_config, config.text_config
    ip = Qwen2VLImageProcessorPil(patch_size=vc.patch_size, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": bench_train.RSCOVLM_PIXELS[0], "longest_edge": 128 * 28 * 28})
    proc = SimpleNamespace(image_processor=ip, patch_size=vc.patch_size, merge_size=2, image_token_id=config.image_token_id)
    sample = next(s for s in bench_train.synthetic_samples(8, config, proc, np.random.default_rng(0))
                  if int(s["image_grid_thw"][0, 1]) % (2 * 4))  # an image whose edge windows are partial
    torch.manual_seed(0)
    net = AutoModelForImageTextToText.from_config(copy.deepcopy(config), attn_implementation="sdpa").train()
    if lora:
        args = train.get_args(["--model", tiny, "--data", "x", "--out", "x", "--lora", "4", "--freeze-vision"])
        train.apply_lora(net, args)
        train.set_trainable(net, args)
    step = flops.step_flops(flops.matmul_costs(net), config, [mixture.sample_stats(sample)])

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = net.model.visual(sample["pixel_values"], grid_thw=sample["image_grid_thw"])
        (out.pooler_output.sum() + sum(f.sum() for f in (getattr(out, "deepstack_features", None) or []))).backward()
    assert counter.get_total_flops() == step["vision"]

    T = len(sample["input_ids"])
    keep = (sample["labels"][1:] != -100).nonzero().squeeze(1)  # logits only where the next token is a target
    embeds = torch.randn(1, T, tc.hidden_size, requires_grad=True)  # (1, T, C): the image features need a gradient
    positions = torch.arange(T).view(1, 1, -1).expand(4, 1, -1)  # (4, 1, T)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        hidden = net.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        net.lm_head(hidden[:, keep]).sum().backward()
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    masked_half = 6 * tc.num_hidden_layers * tc.num_attention_heads * head_dim * T * T
    assert counter.get_total_flops() == step["language model"] + masked_half
