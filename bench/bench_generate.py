"""
bench_generate.py — greedy decoding throughput, side by side on the same prompts: transformers' `generate`
against model.py's built-in decode loop (`model.decode_greedy`, what `generate(backend="fast")` and the eval
scripts use), with the tokens checked identical. Prints new tokens/s per batch size and the time a
DOTA-val-sized evaluation would take, with the ratio lines last. Batch 1 runs only the first --batch1-prompts
prompts (8; all of them one at a time would take 20+ minutes on a real model): its time per prompt is what counts.
Tokens are checked identical in fp32; in bf16 the number of identical answers is reported (near-ties).

    python bench/bench_generate.py                                        # CPU: the tiny model, batches 1, 8, 32
    python bench/bench_generate.py --config qwen2.5-3b --batches 1,32,128 --max-new-tokens 256 --json-out $OUT/gen.json

Prompts are detection-like (bench_train.py's synthetic samples cut at the answer: a system/user header, one image of
DOTA-like size in the pixel budget, a prompt of 40-90 tokens), so no tokenizer or download is needed. Weights are
random, re-drawn at unit gain so that answers change token by token (the stock 0.02 init repeats one token,
which would flatter any decoder). Random weights never say <|im_end|>: the end token here is the token the model
first emits at the most varied steps across a probe batch, so answers end at mixed lengths as real ones do
(what finished-row removal is for); its length distribution is printed.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: model, train, ...

import attention
import bench_train
import model as M
from common import add_debug_flag, run_cli


# -----------------------------------------------------------------------------
# Arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description="greedy decoding: transformers' generate vs the built-in loop",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None, choices=["tiny", *bench_train.CONFIGS],
                   help="model: the tiny checkpoint, or a real-size config with random weights (default: qwen2.5-3b on GPU, tiny on CPU)")
    p.add_argument("--family", default="qwen2.5", choices=["qwen2.5", "qwen3"], help="family of the tiny model")
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1,32,128 on GPU, 1,8,32 on CPU)")
    p.add_argument("--prompts", type=int, default=None, help="prompts per batch size (default: the largest batch)")
    p.add_argument("--batch1-prompts", type=int, default=8, help="prompts at batch size 1 (all of them would take long)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer limit (default 256 on GPU, 48 on CPU)")
    p.add_argument("--set-size", type=int, default=5297,
                   help="records of the end-to-end estimate: DOTA-v1.0 val cut into 1024-px patches with gap 200 (5,297 as commonly reported)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="weights and compute (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--json-out", default=None, help="also write the numbers here")
    add_debug_flag(p)
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Model and prompts


def lively(net, seed):
    """Re-draw every matrix (embeddings excepted) at unit gain, std = fan_in^-1/2."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0, p.shape[1] ** -0.5)


def prompts_from_samples(samples):
    """bench_train.synthetic_samples' training samples cut where the answer starts: what generation is given."""
    out = []
    for s in samples:
        start = int((s["labels"] != -100).nonzero()[0])
        out.append({"input_ids": s["input_ids"][:start].tolist(), "pixel_values": s["pixel_values"],
                    "image_grid_thw": s["image_grid_thw"]})
    return out


def choose_end_token(net, proc, prompts, max_new_tokens, device, dtype):
    """The token whose first appearance falls on the most different steps of a free-running probe batch."""
    inputs = M.left_pad(prompts, proc, device, dtype)
    T = inputs["input_ids"].shape[1]
    free = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=proc.pad_token_id,
                        eos_token_id=[net.config.text_config.eos_token_id])[:, T:].tolist()
    first = {}
    for row in free:
        for t in set(row):
            first.setdefault(t, set()).add(row.index(t))
    return max(first, key=lambda t: (len(first[t]), -t))


# -----------------------------------------------------------------------------
# Timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_path(path, net, proc, prompts, batch, max_new_tokens, eos, device, dtype):
    """All prompts, longest first in batches of `batch` (as model.generate forms them). Returns (seconds, new
    token lists in prompt order)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]["input_ids"]))
    out = [None] * len(prompts)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        inputs = M.left_pad([prompts[i] for i in idx], proc, device, dtype)
        if path == "hf":
            T = inputs["input_ids"].shape[1]
            rows = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=proc.pad_token_id, eos_token_id=[eos])[:, T:].tolist()
            rows = [r[: r.index(eos) + 1] if eos in r else r for r in rows]
        else:
            rows = M.decode_greedy(net, inputs, max_new_tokens, [eos])
        for i, r in zip(idx, rows):
            out[i] = r
    sync(device)
    return time.perf_counter() - t0, out


# -----------------------------------------------------------------------------


@torch.no_grad()
def main():
    args = get_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    batches = [int(b) for b in (args.batches or ("1,32,128" if cuda else "1,8,32")).split(",")]
    n_prompts = args.prompts or max(batches)
    max_new = args.max_new_tokens or (256 if cuda else 48)
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(device) if cuda else None,
                "varlen_kernel": attention.varlen_kernel(device)}
    print(f"bench_generate.py: torch {versions['torch']}, transformers {versions['transformers']}, "
          f"{versions['gpu'] or 'CPU'}, varlen kernel {versions['varlen_kernel']}, {dtype}")

    # --- model: bench_train.py's configs and image processor setup, random weights at unit gain, eval mode
    config_name = args.config or ("qwen2.5-3b" if cuda else "tiny")
    config, image_processor = bench_train.config_and_image_processor(config_name, args.family)
    vc, tc = config.vision_config, config.text_config
    proc = SimpleNamespace(image_processor=image_processor, patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                           image_token_id=config.image_token_id, pad_token_id=tc.bos_token_id)
    net = bench_train.build_model(config, device, attention.default_attn(device)).to(dtype).eval()
    net.config.use_cache = True
    if cuda and attention.varlen_kernel(device) != "reference":
        attention.use_varlen_attention(net, vision=True)  # prefill: one attention call per vision layer
    lively(net, args.seed)
    rng = np.random.default_rng(args.seed)
    prompts = prompts_from_samples(bench_train.synthetic_samples(n_prompts, config, proc, rng))
    eos = choose_end_token(net, proc, prompts[:8], max_new, device, dtype)
    lengths = [len(p["input_ids"]) for p in prompts]
    print(f"  model {config_name}, {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters; {n_prompts} prompts of "
          f"{min(lengths)}..{max(lengths)} tokens; answers of at most {max_new} tokens, end token {eos}")

    # --- each batch size: transformers' generate, then the built-in loop, same prompts, same tokens
    exact = dtype == torch.float32  # bf16: a near-tie between the two best tokens can flip (see the note below)
    rows, warm = [], True
    for batch in batches:
        if warm:  # first-call costs (allocations, kernel selection) are not throughput
            run_path("fast", net, proc, prompts[:batch], batch, 4, eos, device, dtype)
            warm = False
        some = prompts[:args.batch1_prompts] if batch == 1 else prompts  # one at a time: time per prompt is enough
        rows.append(measure(net, proc, some, batch, max_new, eos, device, dtype))
        r = rows[-1]
        same = f"tokens identical: {r['identical']}" if exact else f"identical answers: {r['identical_answers']}/{len(some)}"
        print(f"  batch {batch:4d}: generate {r['hf_tok_s']:8.1f} new tokens/s, built-in {r['fast_tok_s']:8.1f} "
              f"({r['speedup']:.2f}x), {same}; answers median {r['answer_median']}, "
              f"{r['answers_at_limit']}/{len(some)} at the limit"
              + (f" (the first {len(some)} of {n_prompts} prompts: batch 1 runs a few)" if len(some) < n_prompts else ""))
    if not exact:
        print(f"  {dtype}: an answer differs from generate's where the two best logits of a step are within the "
              "rounding of bf16 (a near-tie), which the batch's padding and the kernels' summation order can flip; "
              "the answer then goes on differently. The tokens are checked identical in fp32 (--dtype fp32).")

    # --- end to end: a DOTA-val-sized set at the largest batch, from the measured time per prompt
    best = rows[-1]
    estimate = {path: args.set_size * best[f"{path}_s"] / best["prompts"] for path in ("hf", "fast")}
    print(f"  a {args.set_size}-record set (answers as above) at batch {best['batch']}: generate "
          f"{estimate['hf'] / 60:.1f} min, built-in {estimate['fast'] / 60:.1f} min (estimate: measured time per prompt x records)")
    summary = {"versions": versions, "config": config_name, "dtype": str(dtype), "max_new_tokens": max_new,
               "rows": rows, "set_size": args.set_size, "set_minutes": {k: v / 60 for k, v in estimate.items()}}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)

    print(f"\nsummary ({config_name}, {device.type}, {dtype}, greedy, <= {max_new} new tokens):")
    for r in rows:
        same = r["identical"] if exact else f"{r['identical_answers']}/{r['prompts']} answers"
        print(f"ratio built-in vs generate at batch {r['batch']}: {r['speedup']:.2f}x "
              f"({r['fast_tok_s']:.0f} vs {r['hf_tok_s']:.0f} new tokens/s, identical: {same})")
    if exact and not all(r["identical"] for r in rows):
        raise SystemExit("the built-in loop's tokens differ from transformers' generate (fp32)")
    return summary


def measure(net, proc, prompts, batch, max_new, eos, device, dtype):
    """generate, then the built-in loop, on the same prompts: times, new tokens/s, answers identical."""
    t_hf, hf = run_path("hf", net, proc, prompts, batch, max_new, eos, device, dtype)
    t_fast, fast = run_path("fast", net, proc, prompts, batch, max_new, eos, device, dtype)
    new = sum(len(r) for r in hf)
    answer_lengths = sorted(len(r) for r in hf)
    return {"batch": batch, "prompts": len(prompts), "new_tokens": new, "identical": hf == fast,
            "identical_answers": sum(a == b for a, b in zip(hf, fast)), "hf_s": t_hf, "fast_s": t_fast,
            "hf_tok_s": new / t_hf, "fast_tok_s": new / t_fast, "speedup": t_hf / t_fast,
            "answer_median": answer_lengths[len(answer_lengths) // 2],
            "answers_at_limit": sum(n == max_new for n in answer_lengths)}


if __name__ == "__main__":
    run_cli(main)
