"""train.py and launch.sh on CPU (gloo) with the tiny checkpoints. Units: the mixture, the step planner (pure in
the step, padded and packed, overlong records, workers), the schedule, flags, attention choices, the old
checkpoint format. Then real runs, each checked against one reference: two launch.sh "nodes" with --pack
(exported, reloaded); one process with --grad-accum, padded, activation checkpointing and workers (the same
numbers); ONE run folder taken through every way a run is interrupted (SIGTERM to one rank; a rank listing no
checkpoint and another SIGKILLed while saving; SIGTERM to launch.sh's process group; SIGUSR1 to every process),
each resume continuing it (DataLoader workers that outlive the loop at 143 and at the end), and at the end
bit-identical to the reference; a finished run re-run; input errors, also through launch.sh; a non-finite loss."""
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import attention
import mixture
import model
import train
from cli_helpers import run_main
from common import UserError, read_records, run_cli


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
ENV.pop("WORLD_SIZE", None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_records(d):
    """img.jsonl: 5 image records (vqa, caption, det rendered from meta, cls, two-image chat); text.jsonl: 6
    text-only records of different lengths."""
    rng = np.random.default_rng(0)
    sizes = [(56, 84), (112, 56), (84, 84), (56, 56), (60, 90), (90, 60)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")

    def rec(i, task, images, q, a, meta=None):
        return {"id": f"{task}{i}", "task": task, "images": images, "meta": meta or {},
                "messages": [{"role": "user", "content": "<image>" * len(images) + q}, {"role": "assistant", "content": a}]}

    det_meta = {"width": 84, "height": 56, "classes": ["plane", "ship"],
                "objects": [{"poly": [10, 10, 40, 10, 40, 30, 10, 30], "label": "ship", "difficult": 0}]}
    imgs = [rec(0, "vqa", ["im0.png"], "Is there a ship?", "yes"),
            rec(1, "caption", ["im1.png"], "Describe the image.", "A satellite image with several buildings."),
            rec(2, "det", ["im0.png"], "Detect all objects.", "(rendered from meta)", det_meta),
            rec(3, "cls", ["im3.png"], "Classify the image.", "forest"),
            rec(4, "chat", ["im4.png", "im5.png"], "Compare the two images.", "The first is darker.")]
    texts = [rec(i, "chat", [], "Describe the image. " * (1 + i % 3), "There are none." + " yes" * i) for i in range(6)]
    for name, recs in (("img.jsonl", imgs), ("text.jsonl", texts)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_records(tmp_path_factory.mktemp("records"))


def mixture_spec(data):
    return f"{data}/img.jsonl,{data}/text.jsonl*2"


def common(data, tiny, out, steps=6):
    return ["--model", tiny, "--data", mixture_spec(data), "--out", str(out), "--max-steps", str(steps),
            "--save-every", "2", "--keep-last", "2", "--max-length", "512", "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--seed", "3"]


# The reference run and the run taken through every interruption: 2 ranks x 2 packed rows, 8 samples a step.
STEPS = 10
PACKED = ["--pack", "--grad-accum", "2", "--batch-size", "2"]


def run(cmd, timeout=240, env=None, **kw):
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], env=env or ENV, cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, **kw)
    print(f"{time.time() - t0:.1f}s: {' '.join(map(str, cmd[:6]))} ...")
    return p


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(m["step"], m["loss"]) for m in metrics(out)]


def weights(out):
    return load_file(str(Path(out) / "final" / "model.safetensors"))


def checkpoints(out):
    return [d.name for d in train.complete_checkpoints(Path(out) / "ckpt")]


def in_process(argv, threads=1):
    """`python train.py ARGV` in this process (~5 s of imports saved): run_cli(train.main) with sys.argv set, on
    one thread like the subprocess runs (so that their bits compare). Returns (exit code, stdout, stderr); puts
    back what train.py changes in a process: signal handlers, process group, thread count."""
    import contextlib
    import io

    handlers = {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS}
    saved_threads, saved_argv = torch.get_num_threads(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["train.py", *map(str, argv)]
    torch.set_num_threads(threads)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            run_cli(train.main)
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if train.dist.is_initialized():
            train.dist.destroy_process_group()
    return exit_.value.code, out.getvalue(), err.getvalue()


# Test-only hooks: a wrapper that runs train.main() with functions patched, so the run dies exactly where we want
# with a real signal (no test flags in train.py). HOOKS: comma-separated; HOOK_STEP: the step they act at.
WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import train
rank, hooks, at = int(os.environ["RANK"]), os.environ.get("HOOKS", "").split(","), int(os.environ.get("HOOK_STEP", 0))
get_lr = train.get_lr
def hooked_lr(step, *a):
    if "pause" in hooks and step + 1 == at:  # block inside step `at` (after its forward/backward) until killed
        with open(os.environ["HOOK_MARK"] + f".{{rank}}", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    if "sigterm" in hooks and step + 1 == at and rank == 0:  # only rank 0 gets SIGTERM, as from a scheduler
        os.kill(os.getpid(), signal.SIGTERM)
    return get_lr(step, *a)
train.get_lr = hooked_lr
if "keep_loader" in hooks:  # the DataLoader iterator stays referenced until exit (as a reference cycle can)
    import torch
    kept, make_iter = [], torch.utils.data.DataLoader.__iter__
    def keeping(self):
        it = make_iter(self)
        kept.append(it)
        return it
    torch.utils.data.DataLoader.__iter__ = keeping
if "stale_listing" in hooks:  # rank 1 lists no checkpoint (a shared filesystem that shows it files late)
    listing = train.complete_checkpoints
    train.complete_checkpoints = lambda d: [] if rank == 1 else listing(d)
if "kill_in_save" in hooks:  # rank 1 is SIGKILLed right after writing its shards of checkpoint `at`
    save = train.dcp.save
    class DCP:
        load = train.dcp.load
        @staticmethod
        def save(state, checkpoint_id):
            save(state, checkpoint_id=checkpoint_id)
            if rank == 1 and checkpoint_id.endswith(f"step_{{at:08d}}.tmp"):
                os.kill(os.getpid(), signal.SIGKILL)
    train.dcp = DCP
sys.argv = ["train.py"] + sys.argv[1:]
train.main()
"""


def wrapper(tmp_path):
    path = tmp_path / "wrapper.py"
    path.write_text(WRAPPER.format(repo=str(REPO)))
    return path


def run_hooked(tmp_path, hooks, step, train_args, ranks=2):
    """torchrun (or python, ranks=1) of WRAPPER with HOOKS armed at `step`; returns the finished process."""
    env = {**ENV, "HOOKS": hooks, "HOOK_STEP": str(step)}
    cmd = TORCHRUN if ranks == 2 else [sys.executable]
    if ranks == 1:
        env["RANK"] = "0"
    return run([*cmd, wrapper(tmp_path), *train_args], env=env)


# -----------------------------------------------------------------------------
# Units: mixture, planner, schedule, flags, attention, old checkpoints


def test_parse_mixture_and_errors():
    assert mixture.parse_mixture("a.jsonl*25, b.jsonl%50,c.jsonl,d.jsonl%12.5*2") == [
        ("a.jsonl", 25, 100.0), ("b.jsonl", 1, 50.0), ("c.jsonl", 1, 100.0), ("d.jsonl", 2, 12.5)]
    for bad, why in (("a.jsonl*1.5", "whole number"), ("a.jsonl%0", "(0, 100]"), ("a.jsonl%150", "(0, 100]"),
                     ("a.jsonl*x", "not a number"), (",", "names no file")):
        with pytest.raises(ValueError) as e:
            mixture.parse_mixture(bad)
        assert why in str(e.value) and bad in str(e.value)


def planner(entries, lengths, world=2, grad_accum=2, batch_size=2, max_tokens=0, pack=False, start=(0, 0), seed=5):
    args = SimpleArgs(seed=seed, grad_accum=grad_accum, batch_size=batch_size, max_tokens=max_tokens, max_length=512, pack=pack)
    return mixture.StepPlanner(entries, lengths, args, world, *start)


class SimpleArgs:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_mixture_repeats_subsets_and_every_entry_once_per_pass(tmp_path):
    for name, n in (("a", 10), ("b", 40)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"id": f"{name}{i}", "messages": [{"role": "user", "content": "hi"}]}) + "\n" for i in range(n)))
    files, entries = mixture.build_mixture(f"{tmp_path}/a.jsonl*3,{tmp_path}/b.jsonl%25", seed=0)
    assert np.bincount(entries[:, 0]).tolist() == [30, 10]
    a = entries[entries[:, 0] == 0, 1]
    assert sorted(a.tolist()) == sorted(list(range(10)) * 3)
    b = entries[entries[:, 0] == 1, 1]
    assert len(set(b.tolist())) == 10
    # the subset is seeded: same seed same subset, another seed another subset
    assert np.array_equal(mixture.build_mixture(f"{tmp_path}/a.jsonl*3,{tmp_path}/b.jsonl%25", 0)[1], entries)
    assert not np.array_equal(mixture.build_mixture(f"{tmp_path}/a.jsonl*3,{tmp_path}/b.jsonl%25", 1)[1], entries)
    with pytest.raises(UserError, match="nope.jsonl"):
        mixture.build_mixture(f"{tmp_path}/nope.jsonl", 0)
    with pytest.raises(UserError, match=f"{tmp_path} is a folder: give a record file .*a.jsonl"):
        mixture.build_mixture(f"{tmp_path}", 0)
    # the steps of a pass (40 entries, 8 a step) hold every entry once, whatever the ranks; the next pass is
    # another permutation
    lengths = [np.full(30, 10), np.full(40, 10)]
    plan = planner(entries, lengths)
    per_pass = [[tuple(e) for g in range(5 * p, 5 * p + 5) for rank in plan.plan(g)[0] for m in rank for e in m]
                for p in range(2)]
    one = [tuple(e) for g in range(5) for rank in planner(entries, lengths, world=1, grad_accum=4).plan(g)[0]
           for m in rank for e in m]
    assert sorted(per_pass[0]) == sorted(per_pass[1]) == sorted(map(tuple, entries.tolist())) == sorted(one)
    assert per_pass[0] != per_pass[1]


@pytest.fixture(scope="module")
def measured(data, tiny_qwen25):
    """(files, entries, lengths at --max-length 512, processor) of the test mixture (record_lengths on a
    one-process group)."""
    proc = model.load_processor(tiny_qwen25)
    files, entries = mixture.build_mixture(mixture_spec(data), seed=0)
    train.dist.init_process_group("gloo", store=train.dist.HashStore(), rank=0, world_size=1)
    try:
        lengths = mixture.record_lengths(files, proc, 512, "skip", torch.device("cpu"))
        with pytest.raises(UserError, match=r"\.jsonl:\d+ \(record '\w+'\): \d+ tokens > --max-length 40 \(see --overlong\)"):
            mixture.record_lengths(files, proc, 40, "error", torch.device("cpu"))
        with pytest.raises(UserError, match="every record is longer than --max-length 5"):
            mixture.record_lengths(files, proc, 5, "skip", torch.device("cpu"))
        short = mixture.record_lengths(files, proc, 40, "truncate", torch.device("cpu"))
    finally:
        train.dist.destroy_process_group()
    # model.sample_length (headers only) == the tokenized length
    assert [list(x) for x in lengths] == [[len(model.tokenize(r, proc)["input_ids"]) for r in recs] for _, recs in files]
    assert all(n == 40 for x in short for n, m in zip(x, lengths[0]) if m > 40)
    return files, entries, lengths, proc


def test_planner_is_a_function_of_the_step_padded_and_packed(measured):
    """Every rank gets the same number of micro-batches; padded ones within --batch-size and --max-tokens (some
    split by tokens), packed rows within --max-tokens; both hold exactly the step's block; restarting at a step,
    or on another number of ranks at the same stream position, plans the same samples."""
    files, entries, lengths, _ = measured
    for pack in (False, True):
        ref = planner(entries, lengths, max_tokens=120, pack=pack)
        split = False
        for g in range(6):
            plan, skipped = ref.plan(g)
            assert skipped == 0 and len({len(rank) for rank in plan}) == 1
            kept, _ = ref.block(g)
            assert sorted(map(tuple, kept)) == sorted(tuple(e) for rank in plan for m in rank for e in m)
            for m in (m for rank in plan for m in rank):
                sizes = [int(lengths[f][i]) for f, i in m]
                assert len(m) <= 1 or (len(m) * max(sizes) <= 120 if not pack else sum(sizes) <= 120)
                assert pack or len(m) <= 2
                split |= not pack and 0 < len(m) < 2
            assert len(plan[0]) >= 2 or not pack
        assert split or pack
        again = planner(entries, lengths, max_tokens=120, pack=pack, start=(3, ref.position(3)))
        assert [again.plan(g) for g in (3, 4)] == [ref.plan(g) for g in (3, 4)]
        one_rank = planner(entries, lengths, world=1, grad_accum=4, pack=pack, start=(3, ref.position(3)))
        assert sorted(map(tuple, one_rank.block(3)[0])) == sorted(map(tuple, ref.block(3)[0]))
    # overlong records (-1) are left out of the plan and counted
    short = [np.where(x > 60, -1, x) for x in lengths]
    kept, skipped = planner(entries, short).block(0)
    assert skipped > 0 and len(kept) + skipped == 8 and all(short[f][i] > 0 for f, i in kept)


def test_steps_are_the_same_with_workers_and_truncate_cuts(measured, tiny_qwen25):
    """The DataLoader with two workers hands back the micro-batches of one in order; --overlong truncate cuts a
    text-only record to --max-length; a bad image read in a worker comes back as its one line."""
    files, entries, lengths, proc = measured
    net, _ = model.load(tiny_qwen25)
    args = SimpleArgs(max_length=512, pack=True)

    def steps(start, workers, n, plan=None, files=files, max_length=512):
        args.max_length = max_length
        ds = mixture.Steps(plan or planner(entries, lengths, pack=True), 1, start, files, proc, net, args)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        return [next(it) for _ in range(n)]

    ref = steps(0, 0, 4)
    for (g, micro, info), (g2, micro2, info2) in zip(ref[2:], steps(2, 2, 2)):
        assert g == g2 and [s[:2] for s in info["samples"]] == [s[:2] for s in info2["samples"]]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(micro, micro2) for k in a if a[k] is not None)
    text = [i for i, n in enumerate(lengths[1]) if n > 40]
    cut = mixture.load_sample(files, (1, text[0]), proc, 40)
    assert len(cut["input_ids"]) == 40 and text
    gone = [(path, [dict(r, images=[str(Path(r["images"][0]).with_name("gone.png"))]) if r["images"] else r
                    for r in recs]) for path, recs in files]
    out = steps(0, 0, 3, files=gone)
    assert any(m is None and re.search(r"img\.jsonl:\d+ \(record '\w+'\): cannot read image .*gone\.png", info)
               for _, m, info in out)


def test_lr_schedule():
    lrs = [train.get_lr(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.get_lr(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_flag_mistakes_are_one_line_errors():
    base = ["--model", "m", "--data", "d", "--out", "o"]
    assert train.get_args(base).ac == "none" and train.get_args(base + ["--ac", "every-3"]).ac == "every-3"
    for extra, expected in ((["--ac", "every-0"], "--ac: expected none, full, vision or every-K"),
                            (["--grad-ckpt"], "unrecognized arguments: --grad-ckpt"),
                            (["--attn", "sdap"], "--attn: invalid choice: 'sdap'"),
                            (["--lr", "x"], "--lr: invalid float value: 'x'"),
                            (["--grad-accum", "0"], "--grad-accum: must be >= 1")):
        with pytest.raises(UserError, match=re.escape(expected)):
            train.get_args(base + extra)


def test_attention_choices_leave_args_alone_and_fp32_gets_no_flash_kernel(monkeypatch):
    """On a (simulated) GPU: bf16 gets flash_attention_2 / varlen, fp32 the exact paths (flash kernels take bf16
    only), and an explicit flash request in fp32 is one line. The flags are never rewritten."""
    monkeypatch.setattr(attention, "default_attn", lambda device: "flash_attention_2")
    monkeypatch.setattr(attention, "varlen_kernel", lambda device, dtype: "reference" if dtype == torch.float32 else "flash_attn")
    gpu = torch.device("cuda", 0)
    args = train.get_args(["--model", "m", "--data", "d", "--out", "o", "--pack"])
    before = dict(vars(args))
    assert train.choose_attention(args, gpu, torch.bfloat16) == {
        "attn": "flash_attention_2", "text_varlen": False, "vision_varlen": True, "varlen_kernel": "flash_attn"}
    assert train.choose_attention(args, gpu, torch.float32) == {
        "attn": "sdpa", "text_varlen": False, "vision_varlen": False, "varlen_kernel": "reference"}
    monkeypatch.setattr(attention, "default_attn", lambda device: "sdpa")
    assert train.choose_attention(args, gpu, torch.bfloat16)["text_varlen"]  # --pack, no flash-attn: varlen rows
    assert vars(args) == before
    args.attn = "flash_attention_2"
    with pytest.raises(UserError, match="--attn flash_attention_2 with --dtype fp32"):
        train.choose_attention(args, gpu, torch.float32)
    with pytest.raises(UserError, match="--attn varlen needs --pack"):
        train.choose_attention(train.get_args(["--model", "m", "--data", "d", "--out", "o", "--attn", "varlen"]),
                               torch.device("cpu"), torch.float32)


def test_a_checkpoint_of_the_old_format_continues_at_the_slowest_rank(capsys):
    """Checkpoints before the step planner saved each rank's stream cursor, not a position: the run continues
    at the slowest rank's place (exact for --pack runs, whose cursors were equal) and says so in one line."""
    rng = train.rng_state()
    old = {"step": 4, "world_size": 2, "ranks": [{"cursor": 9, "rng": rng}, {"cursor": 8, "rng": rng}]}
    assert train.resume_point(old, "ckpt/step_00000004", 2, 0) == (4, 16)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  ckpt/step_00000004 predates the step planner (per-rank stream cursors): continuing at stream "
                     "position 16, the slowest rank's; samples between the ranks' cursors may come twice"]
    new = {"step": 4, "position": 32, "world_size": 4, "ranks": [{"rng": rng}] * 4}
    assert train.resume_point(new, "x", 2, 1) == (4, 32)
    assert "the checkpoint has 4 ranks, this run 2" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The reference run: two launch.sh "nodes" on localhost, --pack


@pytest.fixture(scope="module")
def baseline(data, tiny_qwen25, tmp_path_factory):
    """Uninterrupted reference: two launch.sh 'nodes' on localhost (NNODES=2, one process each), --pack."""
    out = tmp_path_factory.mktemp("runs") / "baseline"
    port = free_port()
    env = {**ENV, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NPROC_PER_NODE": "1"}
    args = [*common(data, tiny_qwen25, out, steps=STEPS), *PACKED, "--num-workers", "0"]
    t0 = time.time()
    nodes = [subprocess.Popen(["bash", "launch.sh", f"NODE_RANK={i}", *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    print(f"{time.time() - t0:.1f}s: baseline (two launch.sh nodes)")
    assert all(p.returncode == 0 for p in nodes), logs[1][-3000:] + logs[0][-3000:]
    return out, logs[1], port


@pytest.mark.slow
def test_two_node_launch_trains_exports_and_reloads(baseline, data, tiny_qwen25):
    from transformers import AutoModelForImageTextToText

    out, log, port = baseline
    assert f"node 0 of 2, 1 processes, master 127.0.0.1:{port}" in log and "2 rank(s) on cpu" in log
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1)) and m[-1]["loss"] < m[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "flops", "mem_gb"} <= set(m[0]) and m[0]["samples"] == 8
    assert (out / "loss.png").stat().st_size > 0 and json.loads((out / "args.json").read_text())["max_steps"] == STEPS
    assert json.loads((out / "args.json").read_text())["attn"] is None  # what was given, not what it resolved to
    assert json.loads((out / "resolved.json").read_text())["attn"] == "sdpa"
    assert checkpoints(out) == ["step_00000008", "step_00000010"]  # --keep-last 2
    # the export reloads with model.load (processor included) and with transformers, and generates
    net, proc = model.load(out / "final")
    recs = read_records(data / "img.jsonl")[:2] + read_records(data / "text.jsonl")[:1]
    texts = model.generate(net, proc, recs, max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    hf = AutoModelForImageTextToText.from_pretrained(out / "final")
    exported = weights(out)
    assert set(exported) == set(load_file(str(Path(tiny_qwen25) / "model.safetensors")))  # same names as the input
    assert all(torch.equal(v, exported[k]) for k, v in hf.state_dict().items() if k in exported)


@pytest.mark.slow
def test_one_process_padded_matches_two_ranks_packed(baseline, measured, data, tiny_qwen25, tmp_path):
    """One process with --grad-accum 4 (padded micro-batches of 2, activation checkpointing, two DataLoader
    workers) sees the reference's steps (2 ranks x 2 packed rows): the same samples, losses and gradient norms at
    every step. So --pack changes the speed, not the numbers, and neither do ranks, AC or workers."""
    out, _, _ = baseline
    files, entries, lengths, _ = measured
    plan = planner(entries, lengths, pack=True, seed=3)
    has_image = [[any(files[f][1][i]["images"] for m in rank for f, i in m) for rank in plan.plan(g)[0]] for g in range(STEPS)]
    # the premise: at some step one rank has no image (it must still join the vision tower's collectives)
    assert any(a != b for a, b in has_image), has_image
    one = tmp_path / "one"
    code, stdout, stderr = in_process([*common(data, tiny_qwen25, one, steps=STEPS), "--grad-accum", "4",
                                       "--batch-size", "2", "--ac", "full", "--num-workers", "2"])
    assert code == 0, stderr[-3000:]
    ref, got = metrics(out), metrics(one)
    for a, b in zip(ref, got):
        assert a["samples"] == b["samples"] == 8 and a["supervised_tokens"] == b["supervised_tokens"]
        assert a["flops"] == b["flops"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # reference for step 1, without FSDP or train.py's loss code: plain transformers forward/backward on the step's
    # samples, cross-entropy summed over supervised tokens / their number (not a mean of means)
    net, proc = model.load(tiny_qwen25)
    net.train()
    total, n_tokens = 0.0, 0
    for f, i in plan.block(0)[0]:
        b = model.collate([model.tokenize(files[f][1][i], proc)], proc.pad_token_id)
        labels = b.pop("labels")
        logits = net(**{k: v for k, v in b.items() if v is not None}).logits
        total = total + torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="sum")
        n_tokens += int((labels[0, 1:] != -100).sum())
    (total / n_tokens).backward()
    norm = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).norm().item()
    assert ref[0]["supervised_tokens"] == n_tokens
    assert ref[0]["loss"] == pytest.approx(total.item() / n_tokens, rel=1e-5)
    assert ref[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    w1, w2 = weights(out), weights(one)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    start = load_file(str(Path(tiny_qwen25) / "model.safetensors"))
    assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-4  # and the run really trained


# -----------------------------------------------------------------------------
# One run folder through every interruption, each resume continuing it; at the end bit-identical to the reference


@pytest.fixture(scope="module")
def chain(data, tiny_qwen25, tmp_path_factory):
    """The run folder and its command; each stage's fixture takes it one interruption further."""
    run_dir = tmp_path_factory.mktemp("chain") / "run"
    return run_dir, [*common(data, tiny_qwen25, run_dir, steps=STEPS), *PACKED]


def assert_same_so_far(run_dir, baseline):
    """Every step logged so far has the reference's loss, bit for bit (metrics.jsonl: each step once)."""
    got = losses(run_dir)
    assert got == losses(baseline[0])[:len(got)], (got, losses(baseline[0]))


@pytest.fixture(scope="module")
def signalled(chain, baseline, tmp_path_factory):
    """1. SIGTERM to rank 0 alone, inside step 2, the DataLoader iterator kept alive until exit (its workers
    ignore SIGTERM: train.py must end them itself or the exit waits forever)."""
    run_dir, cmd = chain
    p = run_hooked(tmp_path_factory.mktemp("hooks"), "sigterm,keep_loader", 2, [*cmd, "--num-workers", "2"])
    return p


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_the_next_step_on_every_rank(signalled, chain, baseline):
    run_dir, _ = chain
    # rank 0 noticed the signal during step 2; both ranks agreed at step 3's all-reduce, finished step 3, saved it
    # (not a --save-every step) and left with 143; the DataLoader workers did not die on the way
    assert signalled.returncode != 0 and "stopping on a signal after step 3" in signalled.stdout, signalled.stderr[-3000:]
    assert "killed by signal" not in signalled.stderr
    assert checkpoints(run_dir) == ["step_00000002", "step_00000003"] and not (run_dir / "final").exists()
    assert_same_so_far(run_dir, baseline)


@pytest.fixture(scope="module")
def torn(signalled, chain, tmp_path_factory):
    """2. Resumed with rank 1 listing no checkpoint (both must resume from rank 0's choice, step 3), then rank 1
    SIGKILLed right after writing its shards of checkpoint 4."""
    run_dir, cmd = chain
    return run_hooked(tmp_path_factory.mktemp("hooks"), "stale_listing,kill_in_save", 4, [*cmd, "--num-workers", "0"])


@pytest.mark.slow
def test_resume_follows_rank_0_and_a_torn_checkpoint_stays_a_tmp(torn, chain, baseline):
    run_dir, _ = chain
    assert "step_00000003 at step 3" in torn.stdout, torn.stderr[-3000:]
    assert torn.returncode != 0 and "SIGKILL" in torn.stderr + torn.stdout
    # rank 1 wrote its shards and died before the checkpoint was complete: only a .tmp, never a step_00000004
    assert (run_dir / "ckpt" / "step_00000004.tmp").is_dir()
    assert checkpoints(run_dir) == ["step_00000002", "step_00000003"]
    assert_same_so_far(run_dir, baseline)


def children(pid):
    """Direct children of a process (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def preempt_launch(run_dir, cmd, how):
    """bash launch.sh with 2 ranks and 2 DataLoader workers each; once the resumed run logs a step the ranks are
    frozen (SIGSTOP: so the signal lands inside training, however fast the steps are), the scheduler's signal is
    sent, and the ranks thawed. how: 'term-group' = SIGTERM to launch.sh's process group (bash + torchrun, as a
    terminal or `kill -- -PGID` does), 'usr1-all' = SIGUSR1 to every process: launch.sh, torchrun, the ranks
    and their workers (as `scancel --signal=USR1` does). Returns (exit code, stdout, stderr)."""
    logged = len(metrics(run_dir))
    p = subprocess.Popen(["bash", "launch.sh", "NPROC_PER_NODE=2", *cmd, "--num-workers", "2"], env=ENV, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    try:
        while len((run_dir / "metrics.jsonl").read_text().splitlines()) <= logged:
            assert p.poll() is None and time.time() - t0 < 200, p.communicate()
            time.sleep(0.05)
        torchrun = children(p.pid)
        ranks = [c for t in torchrun for c in children(t)]
        workers = [w for r in ranks for w in children(r)]
        assert len(ranks) == 2 and len(workers) >= 4, (ranks, workers)
        for r in ranks:
            os.kill(r, signal.SIGSTOP)
        if how == "term-group":
            os.killpg(p.pid, signal.SIGTERM)
        else:
            for pid in [p.pid, *torchrun, *ranks, *workers]:
                try:  # as scancel: every process alive now
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        for r in ranks:
            os.kill(r, signal.SIGCONT)
        stdout, stderr = p.communicate(timeout=200)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    print(f"{time.time() - t0:.1f}s: launch.sh preempted ({how})")
    return p.returncode, stdout, stderr


def assert_preempted(result, run_dir, baseline, resumed_at):
    code, stdout, stderr = result
    assert f"step_{resumed_at:08d} at step {resumed_at}" in stdout, stderr[-3000:]
    assert code == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("launch.sh: every rank saved a checkpoint and stopped on a signal; "
                                              "the same command resumes")
    stopped = int(re.search(r"stopping on a signal after step (\d+)", stdout).group(1))
    assert resumed_at < stopped < STEPS and not (run_dir / "final").exists()
    assert checkpoints(run_dir)[-1] == f"step_{stopped:08d}"
    assert "killed by signal" not in stderr and "ConnectionResetError" not in stderr  # no worker died
    assert "Traceback" not in stderr  # torchrun ignores the stop signals: no report of its own
    assert_same_so_far(run_dir, baseline)
    return stopped


@pytest.fixture(scope="module")
def term_group(torn, chain):
    """3. Resumed by launch.sh (from step 3: the torn .tmp is ignored), then SIGTERM to its process group."""
    return preempt_launch(*chain, "term-group")


@pytest.mark.slow
def test_sigterm_to_launch_group_saves_and_exits_143(term_group, chain, baseline):
    run_dir, _ = chain
    assert_preempted(term_group, run_dir, baseline, resumed_at=3)
    assert not (run_dir / "ckpt" / "step_00000004.tmp").exists()


@pytest.fixture(scope="module")
def usr1_all(term_group, chain):
    """4. Resumed by launch.sh, then SIGUSR1 to every process (workers too)."""
    return preempt_launch(*chain, "usr1-all")


@pytest.mark.slow
def test_usr1_to_every_process_saves_and_exits_143(usr1_all, term_group, chain, baseline):
    run_dir, _ = chain
    before = int(re.search(r"stopping on a signal after step (\d+)", term_group[1]).group(1))
    assert_preempted(usr1_all, run_dir, baseline, resumed_at=before)


@pytest.fixture(scope="module")
def finished(usr1_all, chain, tmp_path_factory):
    """5. Resumed and run to the end, the DataLoader iterator kept alive until exit (its workers ignore SIGTERM:
    train.py must end them itself, or the exit waits forever; the way out with 143: stage 1)."""
    return run_hooked(tmp_path_factory.mktemp("hooks"), "keep_loader", 0, [*chain[1], "--num-workers", "2"])


@pytest.mark.slow
def test_the_interrupted_run_ends_bit_identical_to_the_reference(finished, usr1_all, chain, baseline):
    run_dir, _ = chain
    stopped = int(re.search(r"stopping on a signal after step (\d+)", usr1_all[1]).group(1))
    assert finished.returncode == 0 and f"step_{stopped:08d} at step {stopped}" in finished.stdout, finished.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (baseline[0] / "final" / "model.safetensors").read_bytes()
    assert losses(run_dir) == losses(baseline[0])


@pytest.mark.slow
def test_a_finished_run_run_again_keeps_its_export(finished, chain, data, tiny_qwen25):
    """The same command after the end (--resume auto, here in one process: the 2-rank checkpoint resumes on
    another number of ranks): nothing to train, OUT/final not rewritten while a reader may be using it."""
    run_dir, cmd = chain
    final = run_dir / "final" / "model.safetensors"
    stamp = (final.stat().st_ino, final.stat().st_mtime_ns)
    code, stdout, stderr = in_process([*cmd, "--num-workers", "0"])
    assert code == 0, stderr[-3000:]
    assert f"{run_dir / 'final'} is already written: kept as it is" in stdout
    assert "the checkpoint has 2 ranks, this run 1" in stdout
    assert (final.stat().st_ino, final.stat().st_mtime_ns) == stamp and len(metrics(run_dir)) == STEPS


# -----------------------------------------------------------------------------
# Errors and other ways out


def test_input_errors_are_one_line_exit_2_and_leave_no_folder(data, tiny_qwen25, tmp_path, monkeypatch, capsys):
    """User mistakes end with exit code 2 and one stderr line that names the input; no traceback, no empty --out."""
    out = tmp_path / "o"
    good = ["--model", tiny_qwen25, "--data", f"{data}/img.jsonl", "--out", str(out), "--max-steps", "1",
            "--num-workers", "0"]

    def with_(flag, value):
        return [value if prev == flag else a for prev, a in zip([None] + good, good)]

    export = tmp_path / "run_x" / "final"  # a user points --model at the run folder instead of run_x/final
    shutil.copytree(tiny_qwen25, export)
    bad = tmp_path / "bad.jsonl"
    records = [json.loads(l) for l in (data / "img.jsonl").read_text().splitlines()]
    for r in records:
        r["images"] = [str(data / i) for i in r["images"]]
    records[3]["images"] = [str(tmp_path / "gone.png")]
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    cases = [(with_("--data", str(data)), f"{data} is a folder: give a record file (.jsonl), e.g. {data}/img.jsonl"),
             (with_("--data", f"{data}/nope.jsonl"), f"--data file '{data}/nope.jsonl' not found"),
             (with_("--data", f"{data}/img.jsonl*1.5"), "repeat *1.5 must be a whole number"),
             (with_("--data", str(bad)), f"{bad}:4 (record 'cls3'): cannot read image {tmp_path / 'gone.png'}"),
             (with_("--model", str(export.parent)), f"{export.parent}: no config.json, not a Hugging Face checkpoint "
                                                    f"directory; checkpoints below it: {export}"),
             (good + ["--resume", str(tmp_path)], f"--resume {tmp_path}: not a complete checkpoint")]
    # the first case as the script runs (a process of its own), the others through the same entry point
    p = run([sys.executable, "train.py", *cases[0][0]])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + cases[0][1]), p.stderr
    handlers = {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS}
    try:
        for argv, expected in cases[1:]:
            code, _, err = run_main("train.py", train.main, argv, monkeypatch, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
            assert expected in lines[0], (expected, lines[0])
            assert not out.exists()
            if train.dist.is_initialized():
                train.dist.destroy_process_group()
        # --debug brings the traceback back
        monkeypatch.setattr(sys, "argv", ["train.py", *with_("--data", str(data)), "--debug"])
        with pytest.raises(UserError):
            run_cli(train.main)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if train.dist.is_initialized():
            train.dist.destroy_process_group()


@pytest.mark.slow
def test_bad_record_in_a_dataloader_worker_is_the_last_line_under_launch(data, tiny_qwen25, tmp_path):
    """A record whose image has a readable header but no pixels (so it passes the start-up length check), read by
    a DataLoader worker of one of two ranks under launch.sh: exit 2, at most 3 lines on stderr, the last naming
    the file:line and the record; no worker traceback, no torchrun failure block."""
    records = [json.loads(l) for l in (data / "img.jsonl").read_text().splitlines()]
    for r in records:
        r["images"] = [str(data / i) for i in r["images"]]
    cut = tmp_path / "cut.png"
    cut.write_bytes((data / "im3.png").read_bytes()[:120])  # the header, then the file ends
    records[3]["images"] = [str(cut)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    p = run(["bash", "launch.sh", "NPROC_PER_NODE=2", "--model", tiny_qwen25, "--data", bad, "--out", tmp_path / "o",
             "--max-steps", "4", "--num-workers", "2", "--max-length", "512"])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) <= 3, p.stderr[-3000:]
    assert re.fullmatch(rf"launch.sh: rank \d: error: {re.escape(str(bad))}:4 \(record 'cls3'\): cannot read image "
                        rf"{re.escape(str(cut))}: .*", lines[-1]), lines[-1]
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tiny_qwen25, tmp_path):
    out = tmp_path / "nan"
    # lr 1e30 blows the weights up in step 1; step 2's loss is NaN
    code, _, stderr = in_process(common(data, tiny_qwen25, out) + ["--lr", "1e30", "--save-every", "1", "--num-workers", "0"])
    assert code == 1
    assert "step 2: non-finite loss" in stderr and "step_00000001" in stderr
    assert checkpoints(out) == ["step_00000001"]
    assert not list((out / "ckpt").glob("*.tmp")) and not (out / "final").exists()
    assert [m["step"] for m in metrics(out)] == [1]
