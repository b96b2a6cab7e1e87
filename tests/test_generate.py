"""The built-in decode path (model.decode_greedy, generate backend='fast') against transformers' greedy
generate: the same tokens for both families, batch sizes 1, 3 and 8, mixed prompt lengths, image sizes and
text-only prompts, including rows that end early and leave the batch; the cut flag; --max-new-tokens auto."""
import numpy as np
import pytest
import torch
from PIL import Image

import bench_generate
import model


FAMILIES = ["qwen2.5", "qwen3"]


@pytest.fixture(scope="module")
def nets(tiny_qwen25, tiny_qwen3):
    """The tiny checkpoints with their matrices re-drawn at unit gain: the stock random init (std 0.02) answers
    one token over and over, which would make any two decoders agree; these answers change token by token and
    depend on positions and image content."""
    out = {}
    for fam, path in (("qwen2.5", tiny_qwen25), ("qwen3", tiny_qwen3)):
        net, proc = model.load(path)
        bench_generate.lively(net, seed=0)
        out[fam] = (net, proc)
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return mixed_records(tmp_path_factory.mktemp("gen"), 9)


def mixed_records(d, n):
    """n prompts of mixed lengths: images of several sizes (one with two images) and text-only ones."""
    rng = np.random.default_rng(0)
    sizes = [(56, 84), (200, 120), (90, 300), (150, 150), (64, 64)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    questions = ["Is there a ship?", "Describe the image.", "How many vehicles are there? Answer with a number.",
                 "Where is the red plane in the top left corner?"]
    recs = []
    for i in range(n):
        images = [str(d / f"im{i % 5}.png")] if i % 4 != 3 else []
        if i == 5:
            images.append(str(d / "im1.png"))
        q = questions[i % 4] * (1 + i % 3)
        recs.append({"id": f"r{i}", "task": "chat", "images": images, "meta": {},
                     "messages": [{"role": "user", "content": "<image>" * len(images) + q}]})
    return recs


@pytest.mark.parametrize("fam", FAMILIES)
def test_fast_path_equals_hf_generate(fam, nets, records):
    net, proc = nets[fam]
    for bs in (1, 3, 8):
        hf = model.generate(net, proc, records, batch_size=bs, max_new_tokens=12, backend="hf", details=True)
        fast = model.generate(net, proc, records, batch_size=bs, max_new_tokens=12, backend="fast", details=True)
        assert fast == hf, bs
    # the answers are not one token repeated (else any decoder would agree), and none ended: all were cut
    assert all(len(set(proc.tokenizer.encode(a["text"]))) > 2 for a in hf[:3]), hf[:3]
    assert all(a["cut"] and a["new_tokens"] == 12 for a in hf)
    assert model.generate(net, proc, records[:2], max_new_tokens=5) == [a["text"] for a in
                                                                         model.generate(net, proc, records[:2], max_new_tokens=5, details=True)]


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_rows_that_end_early_leave_the_batch_with_the_same_tokens(fam, nets, records):
    """(Marked `versions`: decode == generate under the floor too; test_fast_path_equals_hf_generate adds batch
    sizes 1 and 3 and the text of the answers, in the main run.) The random model never says <|im_end|>, so the end token is one it does produce: the token each row first
    emits at different steps. decode_greedy drops rows as they end (the cache rows too) and must still give
    transformers' tokens for every row."""
    net, proc = nets[fam]
    prompts = [model._prompt(r, proc) for r in records]
    inputs = model.left_pad(prompts, proc, net.device, torch.float32)
    T = inputs["input_ids"].shape[1]
    free = net.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=proc.pad_token_id,
                        eos_token_id=[proc.end_of_turn_id])[:, T:]
    # the token whose first occurrence falls on the most different steps across rows
    first = {}
    for row in free.tolist():
        for t in set(row):
            first.setdefault(t, set()).add(row.index(t))
    eos = max(first, key=lambda t: (len(first[t]), -t))
    assert len(first[eos]) >= 3, first[eos]
    ref = net.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=proc.pad_token_id,
                       eos_token_id=[eos])[:, T:].tolist()
    got = model.decode_greedy(net, inputs, 16, [eos])
    for r, g in zip(ref, got):
        end = r.index(eos) + 1 if eos in r else len(r)
        assert g == r[:end]
    lengths = {len(g) for g in got}
    assert len(lengths) >= 3 and min(lengths) < 16  # rows really left at different steps


def test_auto_max_new_tokens_covers_the_longest_reference(nets, tmp_path):
    """auto: the longest reference answer as this family writes it (+ <|im_end|>), x 1.25 + 32; a dense
    detection record's rendered answer drives it; without references it falls back to 2048."""
    _, proc = nets["qwen2.5"]
    Image.new("RGB", (300, 300)).save(tmp_path / "p.png")
    objs = [{"poly": [x, y, x + 9, y, x + 9, y + 9, x, y + 9], "label": "small vehicle", "difficult": 0}
            for x in range(5, 290, 20) for y in range(5, 290, 20)]
    det = {"id": "d", "task": "det", "images": [str(tmp_path / "p.png")], "messages": [{"role": "user", "content": "<image>Detect."}],
           "meta": {"width": 300, "height": 300, "classes": ["small vehicle"], "objects": objs}}
    vqa = {"id": "v", "task": "vqa", "images": [], "meta": {"answer": "yes"},
           "messages": [{"role": "user", "content": "Is it?"}, {"role": "assistant", "content": "yes"}]}
    answer = model.target_messages(det, proc, [(300, 300)])[-1]["content"]
    n = len(proc.tokenizer.encode(answer, add_special_tokens=False)) + 1
    assert n > 2048 // 2  # 225 objects: a dense patch
    auto = model.auto_max_new_tokens([vqa, det], proc)
    assert auto == int(n * 1.25) + 32
    assert model.auto_max_new_tokens([vqa, det], proc, context=n + 200) < auto  # capped by the context
    assert model.auto_max_new_tokens([{**det, "meta": {}, "task": "chat"}], proc) == 2048


@pytest.mark.slow
def test_bench_generate_runs_on_cpu_and_prints_its_ratios(tmp_path):
    """bench_generate.py on the tiny model (fp32): exits 0, the built-in loop's tokens identical to generate's at
    every batch size, batch 1 on the first few prompts only (and saying so), one ratio line per batch size last,
    and the same numbers in --json-out."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gen.json"
    p = subprocess.run([sys.executable, "bench/bench_generate.py", "--batches", "1,4", "--prompts", "8", "--batch1-prompts",
                        "3", "--max-new-tokens", "16", "--json-out", str(out)], cwd=repo, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(the first 3 of 8 prompts: batch 1 runs a few)" in p.stdout
    last = p.stdout.strip().splitlines()[-2:]
    assert [l.split(":")[0] for l in last] == ["ratio built-in vs generate at batch 1", "ratio built-in vs generate at batch 4"]
    assert all("identical: True" in l for l in last)
    summary = json.loads(out.read_text())
    assert [(r["batch"], r["prompts"]) for r in summary["rows"]] == [(1, 3), (4, 8)] and all(r["identical"] for r in summary["rows"])
    assert all(r["new_tokens"] > 0 and r["answers_at_limit"] < r["prompts"] for r in summary["rows"])  # some answers ended early



def test_a_replaced_vllm_engine_is_shut_down(tiny_qwen25, monkeypatch):
    """One vLLM engine is kept between calls; the engine of another checkpoint replaces it only after the old
    one's engine core has been shut down and vLLM's memory cleanup has run (dropped from the dict alone, it
    keeps its GPU memory). vLLM itself stands in as a fake recording those calls."""
    import sys
    import types

    events = []

    class LLM:
        def __init__(self, model, **kwargs):
            shutdown = lambda: events.append(("shutdown", model))  # noqa: E731
            self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=shutdown))
            events.append(("start", model))

    vllm, distributed, state = (types.ModuleType(n) for n in ("vllm", "vllm.distributed", "vllm.distributed.parallel_state"))
    vllm.LLM, vllm.distributed, distributed.parallel_state = LLM, distributed, state
    state.cleanup_dist_env_and_memory = lambda: events.append(("cleanup",))
    for mod in (vllm, distributed, state):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(model, "_VLLM_ENGINES", {})
    proc = model.load_processor(tiny_qwen25)
    first = model._vllm_engine("ckpt_a", proc, 1, 1, {})
    assert model._vllm_engine("ckpt_a", proc, 1, 1, {}) is first and events == [("start", "ckpt_a")]
    model._vllm_engine("ckpt_b", proc, 1, 1, {})
    assert events == [("start", "ckpt_a"), ("shutdown", "ckpt_a"), ("cleanup",), ("start", "ckpt_b")]
    assert len(model._VLLM_ENGINES) == 1
