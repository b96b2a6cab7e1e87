"""train.py and launch.sh on CPU (gloo) with the tiny checkpoints: data mixture, sampler, token-budget batches
and schedule as units; then real multi-process runs: two launch.sh "nodes" on localhost, a 2-rank FSDP run
against one process on the same global batches, SIGKILL mid-training and while checkpointing then
--resume auto (exported weights bit-identical), a rank with only text-only records, a non-finite loss."""
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

import model
import train
from common import UserError, read_records, run_cli


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
ENV.pop("WORLD_SIZE", None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """img.jsonl: 5 image records (vqa, caption, det rendered from meta, cls, two-image chat);
    text.jsonl: 6 text-only records of different lengths."""
    d = tmp_path_factory.mktemp("records")
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


def mixture(data):
    return f"{data}/img.jsonl,{data}/text.jsonl*2"


def common(data, tiny, out, steps=6):
    return ["--model", tiny, "--data", mixture(data), "--out", str(out), "--max-steps", str(steps),
            "--save-every", "2", "--keep-last", "2", "--max-length", "512", "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--seed", "3"]


def run(cmd, timeout=240, **kw):
    t0 = time.time()
    p = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    print(f"{time.time() - t0:.1f}s: {' '.join(map(str, cmd[:6]))} ...")
    return p


def metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(Path(out) / "final" / "model.safetensors"))


# Test-only hooks: a wrapper that runs train.main() with one function patched, so the run dies exactly where we
# want with a real SIGKILL (no test flags in train.py).
WRAPPER = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import train
rank, what, at = int(os.environ["RANK"]), os.environ["HOOK"], int(os.environ["HOOK_STEP"])
if what == "pause":  # block inside optimizer step `at` (after its forward/backward) until the test kills us
    get_lr = train.get_lr
    def paused(step, *a):
        if step + 1 == at:
            with open(os.environ["HOOK_MARK"] + f".{{rank}}", "w") as f:
                f.write(str(os.getpid()))
            time.sleep(600)
        return get_lr(step, *a)
    train.get_lr = paused
if what == "sigterm":  # only rank 0 gets SIGTERM, during optimizer step `at` (as a scheduler's preemption)
    get_lr = train.get_lr
    def signalled(step, *a):
        if step + 1 == at and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return get_lr(step, *a)
    train.get_lr = signalled
if os.environ.get("KEEP_LOADER"):  # the DataLoader iterator stays referenced until exit (as a reference cycle can)
    import torch
    kept, make_iter = [], torch.utils.data.DataLoader.__iter__
    def keeping(self):
        it = make_iter(self)
        kept.append(it)
        return it
    torch.utils.data.DataLoader.__iter__ = keeping
if what == "stale_listing":  # rank 1 lists no checkpoint (a shared filesystem that shows it files late)
    listing = train.complete_checkpoints
    train.complete_checkpoints = lambda d: [] if rank == 1 else listing(d)
if what == "kill_in_save":  # rank 1 is SIGKILLed right after writing its shards of checkpoint `at`
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


def run_hooked(tmp_path, hook, step, train_args):
    """torchrun with 2 ranks of WRAPPER, the hook `hook` armed at `step`; returns the finished process."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    env = {**ENV, "HOOK": hook, "HOOK_STEP": str(step)}
    return subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", str(wrapper), *train_args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


# -----------------------------------------------------------------------------
# Units: mixture, sampler, batches, schedule


def test_parse_mixture_and_errors():
    assert train.parse_mixture("a.jsonl*25, b.jsonl%50,c.jsonl,d.jsonl%12.5*2") == [
        ("a.jsonl", 25, 100.0), ("b.jsonl", 1, 50.0), ("c.jsonl", 1, 100.0), ("d.jsonl", 2, 12.5)]
    for bad, why in (("a.jsonl*1.5", "whole number"), ("a.jsonl%0", "(0, 100]"), ("a.jsonl%150", "(0, 100]"),
                     ("a.jsonl*x", "not a number"), (",", "names no file")):
        with pytest.raises(ValueError) as e:
            train.parse_mixture(bad)
        assert why in str(e.value) and bad in str(e.value)


def test_mixture_repeats_subsets_and_stream(tmp_path):
    for name, n in (("a", 10), ("b", 40)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"id": f"{name}{i}", "messages": [{"role": "user", "content": "hi"}]}) + "\n" for i in range(n)))
    files, entries = train.build_mixture(f"{tmp_path}/a.jsonl*3,{tmp_path}/b.jsonl%25", seed=0)
    assert np.bincount(entries[:, 0]).tolist() == [30, 10]
    a = entries[entries[:, 0] == 0, 1]
    assert sorted(a.tolist()) == sorted(list(range(10)) * 3)
    b = entries[entries[:, 0] == 1, 1]
    assert len(set(b.tolist())) == 10
    # the subset is seeded: same seed same subset, another seed another subset
    assert np.array_equal(train.build_mixture(f"{tmp_path}/a.jsonl*3,{tmp_path}/b.jsonl%25", 0)[1], entries)
    assert not np.array_equal(train.build_mixture(f"{tmp_path}/a.jsonl*3,{tmp_path}/b.jsonl%25", 1)[1], entries)
    with pytest.raises(UserError, match="nope.jsonl"):
        train.build_mixture(f"{tmp_path}/nope.jsonl", 0)
    with pytest.raises(UserError, match=f"{tmp_path} is a folder: give a record file .*a.jsonl"):
        train.build_mixture(f"{tmp_path}", 0)
    # two ranks deal every entry of a pass exactly once; the next pass is another permutation
    n = len(entries)
    per_pass = [[train.stream_entry(k, r, 2, n, seed=5) for k in range(e * n // 2, (e + 1) * n // 2) for r in range(2)]
                for e in range(2)]
    assert sorted(per_pass[0]) == sorted(per_pass[1]) == list(range(n)) and per_pass[0] != per_pass[1]


def test_stream_workers_and_token_budget_batches_resume(data, tiny_qwen25):
    proc = model.load_processor(tiny_qwen25)
    files, entries = train.build_mixture(mixture(data), seed=0)

    def batches(start, workers, n, max_tokens=160, batch_size=3):
        stream = train.MixtureStream(files, entries, proc, 0, 2, 0, start, 512, "skip")
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        mb = train.MicroBatches(iter(loader), start, batch_size, max_tokens, len(entries))
        return [[s["id"] for s in mb.next()] for _ in range(n)], mb.cursor

    ref, cursor = batches(0, 0, 6)
    # every batch within the budget (or a single sample), some split by tokens before batch_size
    stream = train.MixtureStream(files, entries, proc, 0, 2, 0, 0, 512, "skip")
    lens = {}
    for k in range(cursor):
        s = stream.load(k)
        lens.setdefault(s["id"], len(s["input_ids"]))
    for b in ref:
        assert len(b) == 1 or len(b) * max(lens[i] for i in b) <= 160
    assert any(len(b) < 3 for b in ref) and any(len(b) > 1 for b in ref)
    # two DataLoader workers give the same order; restarting at the cursor continues exactly
    assert batches(0, 2, 6)[0] == ref
    first, mid = batches(0, 0, 3)
    assert first == ref[:3] and batches(mid, 2, 3)[0] == ref[3:]
    # overlong: skip counts, error names the record, truncate cuts to max_length
    long = train.MixtureStream(files, entries, proc, 0, 1, 0, 0, 40, "error")
    with pytest.raises(UserError, match=r"\.jsonl:\d+ \(record '\w+'\): \d+ tokens > --max-length 40"):
        train.MicroBatches(iter(long), 0, 1, 10**6, len(entries)).next()
    lengths = [len(train.MixtureStream(files, entries, proc, 0, 1, 0, 0, 512, "skip").load(k)["input_ids"])
               for k in range(len(entries))]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the records are longer
    skip = train.MicroBatches(iter(train.MixtureStream(files, entries, proc, 0, 1, 0, 0, limit, "skip")), 0, 1, 10**6,
                              len(entries))
    kept = [len(skip.next()[0]["input_ids"]) for _ in range(sum(n <= limit for n in lengths))]
    assert skip.skipped == sum(n > limit for n in lengths[: skip.cursor]) > 0
    assert sorted(kept) == sorted(n for n in lengths if n <= limit)
    # nothing fits at all: an error, not an endless loop
    none_fit = train.MicroBatches(iter(train.MixtureStream(files, entries, proc, 0, 1, 0, 0, 5, "skip")), 0, 1, 10**6,
                                  len(entries))
    with pytest.raises(RuntimeError, match="in a row are longer than --max-length"):
        none_fit.next()
    trunc = train.MixtureStream(files, entries, proc, 0, 1, 0, 0, 40, "truncate")
    text_only = [k for k in range(len(entries)) if not trunc.record(k)[1]["images"] and lengths[k] > 40]
    assert text_only and all(len(trunc.load(k)["input_ids"]) == 40 for k in text_only)


def test_lr_schedule():
    lrs = [train.get_lr(s, 100, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert train.get_lr(100, 100, 10, 0.1) == pytest.approx(0.1)


# -----------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def baseline(data, tiny_qwen25, tmp_path_factory):
    """Uninterrupted reference: two launch.sh 'nodes' on localhost (NNODES=2, one process each)."""
    out = tmp_path_factory.mktemp("runs") / "baseline"
    env = {**ENV, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "1"}
    args = common(data, tiny_qwen25, out, steps=6) + ["--num-workers", "0"]
    t0 = time.time()
    nodes = [subprocess.Popen(["bash", "launch.sh", f"NODE_RANK={i}", *args], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 0)]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    print(f"{time.time() - t0:.1f}s: baseline (two launch.sh nodes)")
    assert all(p.returncode == 0 for p in nodes), logs[1][-3000:] + logs[0][-3000:]
    return out, logs[1]


def test_two_node_launch_trains_exports_and_reloads(baseline, data, tiny_qwen25):
    from transformers import AutoModelForImageTextToText

    out, log = baseline
    assert "node 0 of 2, 1 processes" in log and "2 rank(s) on cpu" in log
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 7)) and m[-1]["loss"] < m[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mem_gb"} <= set(m[0])
    assert (out / "loss.png").stat().st_size > 0 and json.loads((out / "args.json").read_text())["max_steps"] == 6
    # --keep-last 2 of the checkpoints at steps 2, 4, 6
    assert [d.name for d in train.complete_checkpoints(out / "ckpt")] == ["step_00000004", "step_00000006"]
    # the export reloads with model.load (processor included) and with transformers, and generates
    net, proc = model.load(out / "final")
    recs = read_records(data / "img.jsonl")[:2] + read_records(data / "text.jsonl")[:1]
    texts = model.generate(net, proc, recs, max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    hf = AutoModelForImageTextToText.from_pretrained(out / "final")
    exported = weights(out)
    assert set(exported) == set(load_file(str(Path(tiny_qwen25) / "model.safetensors")))  # same names as the input
    assert all(torch.equal(v, exported[k]) for k, v in hf.state_dict().items() if k in exported)


def test_two_ranks_match_one_process_and_text_only_rank(baseline, data, tiny_qwen25, tmp_path):
    """The 2-rank run (1 micro-batch per rank) and one process with --grad-accum 2 see the same global batches
    (one sample per micro-batch): same loss and gradient norm at every step. The single process also runs
    activation checkpointing and two DataLoader workers, which must change nothing."""
    out, _ = baseline
    files, entries = train.build_mixture(mixture(data), seed=3)
    has_image = [[bool(files[f][1][i]["images"]) for f, i in [entries[train.stream_entry(k, r, 2, len(entries), 3)]
                                                              for r in range(2)]] for k in range(6)]
    # the premise: at some step exactly one rank has an image (the other must still join the vision collectives)
    assert any(a != b for a, b in has_image), has_image
    one = tmp_path / "one"
    p = run([sys.executable, "train.py", *common(data, tiny_qwen25, one), "--grad-accum", "2", "--grad-ckpt",
             "--num-workers", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = metrics(out), metrics(one)
    for a, b in zip(ref, got):
        assert a["samples"] == b["samples"] == 2 and a["supervised_tokens"] == b["supervised_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # reference for step 1, without FSDP or train.py's loss code: plain transformers forward/backward on the
    # same two samples, cross-entropy summed over supervised tokens / their number (not a mean of means)
    net, proc = model.load(tiny_qwen25)
    net.train()
    total, n_tokens = 0.0, 0
    for r in range(2):
        f, i = entries[train.stream_entry(0, r, 2, len(entries), 3)]
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
    # and the run really trained: weights moved
    start = load_file(str(Path(tiny_qwen25) / "model.safetensors"))
    assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-4


def test_sigkill_mid_training_then_resume_is_bit_identical(baseline, data, tiny_qwen25, tmp_path):
    out, _ = baseline
    run_dir, mark = tmp_path / "killed", tmp_path / "paused"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    # pause inside step 5 (checkpoint 4 written, step 5 forward/backward done), then SIGKILL every process
    env = {**ENV, "HOOK": "pause", "HOOK_STEP": "5", "HOOK_MARK": str(mark)}
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", str(wrapper), *common(data, tiny_qwen25, run_dir),
           "--num-workers", "2"]
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    pids = {}
    try:
        while len(pids) < 2:
            assert p.poll() is None and time.time() - t0 < 200, p.stdout.read().decode()[-3000:]
            time.sleep(0.1)
            pids = {r: Path(f"{mark}.{r}").read_text() for r in range(2) if Path(f"{mark}.{r}").exists()}
            pids = {r: int(v) for r, v in pids.items() if v}
    finally:  # SIGKILL the training processes (torchrun starts each in its own session), then torchrun
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    print(f"{time.time() - t0:.1f}s: run killed in step 5")
    assert not (run_dir / "final").exists()
    assert [d.name for d in train.complete_checkpoints(run_dir / "ckpt")] == ["step_00000002", "step_00000004"]
    # resume (plain launch.sh, one node, two processes) and finish
    r = run(["bash", "launch.sh", "NPROC_PER_NODE=2", *common(data, tiny_qwen25, run_dir), "--resume", "auto",
             "--num-workers", "0"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming from" in r.stdout + r.stderr and "step_00000004 at step 4" in r.stdout + r.stderr
    # bit-identical: same exported bytes, same logged losses (metrics.jsonl has steps 1..6 once each)
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()
    assert [(m["step"], m["loss"]) for m in metrics(run_dir)] == [(m["step"], m["loss"]) for m in metrics(out)]


def test_sigterm_saves_at_the_next_step_on_every_rank_then_resume_is_bit_identical(baseline, data, tiny_qwen25, tmp_path):
    out, _ = baseline
    run_dir = tmp_path / "preempted"
    p = run_hooked(tmp_path, "sigterm", 2, [*common(data, tiny_qwen25, run_dir), "--num-workers", "2"])
    # rank 0 noticed the signal during step 2; both ranks agreed at step 3's all-reduce, finished step 3,
    # saved it (not a --save-every step) and left with 143; the DataLoader workers did not die on the way
    assert p.returncode != 0 and "stopping on a signal after step 3" in p.stdout + p.stderr, p.stderr[-3000:]
    assert [d.name for d in train.complete_checkpoints(run_dir / "ckpt")] == ["step_00000002", "step_00000003"]
    assert not (run_dir / "final").exists()
    r = run(["bash", "launch.sh", "NPROC_PER_NODE=2", *common(data, tiny_qwen25, run_dir), "--num-workers", "0"])
    assert r.returncode == 0 and "step_00000003 at step 3" in r.stdout + r.stderr, r.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


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


def preempt_launch(tmp_path, run_dir, data, tiny, how):
    """bash launch.sh with 2 ranks and 2 DataLoader workers each; once step 1 is logged the ranks are frozen
    (SIGSTOP: so the signal lands inside training, however fast the steps are), the scheduler's signal is sent,
    and the ranks thawed. how: 'term-group' = SIGTERM to launch.sh's process group (bash + torchrun, as a
    terminal or `kill -- -PGID` does), 'usr1-all' = SIGUSR1 to every process: launch.sh, torchrun, the ranks
    and their workers (as `scancel --signal=USR1` does). Returns (exit code, stdout, stderr)."""
    cmd = ["bash", "launch.sh", "NPROC_PER_NODE=2", *common(data, tiny, run_dir), "--num-workers", "2"]
    p = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    t0 = time.time()
    try:
        while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().strip()):
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
                try:  # as scancel: every process alive now (a pass's DataLoader workers end with their pass)
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


@pytest.mark.parametrize("how", ["term-group", "usr1-all"])
def test_preemption_through_launch_saves_exits_143_and_resumes_bit_identical(baseline, data, tiny_qwen25, tmp_path, how):
    out, _ = baseline
    run_dir = tmp_path / "preempted"
    code, stdout, stderr = preempt_launch(tmp_path, run_dir, data, tiny_qwen25, how)
    assert code == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == ("launch.sh: every rank saved a checkpoint and stopped on a signal; "
                                              "the same command resumes")
    stopped = int(re.search(r"stopping on a signal after step (\d+)", stdout).group(1))
    assert 1 < stopped < 6 and not (run_dir / "final").exists()
    assert train.complete_checkpoints(run_dir / "ckpt")[-1].name == f"step_{stopped:08d}"
    assert "killed by signal" not in stderr and "ConnectionResetError" not in stderr  # no worker died
    r = run(["bash", "launch.sh", "NPROC_PER_NODE=2", *common(data, tiny_qwen25, run_dir), "--num-workers", "2"])
    assert r.returncode == 0 and f"step_{stopped:08d} at step {stopped}" in r.stdout, r.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()
    assert [(m["step"], m["loss"]) for m in metrics(run_dir)] == [(m["step"], m["loss"]) for m in metrics(out)]


def test_every_rank_resumes_from_rank0s_choice(baseline, data, tiny_qwen25, tmp_path):
    """Rank 1 lists no checkpoint at all; rank 0 lists step 4: both must resume at step 4 (else rank 1 would
    start from scratch beside a resumed rank 0), and the result is the uninterrupted run's, bit for bit."""
    out, _ = baseline
    run_dir = tmp_path / "stale"
    (run_dir / "ckpt").mkdir(parents=True)
    shutil.copytree(out / "ckpt" / "step_00000004", run_dir / "ckpt" / "step_00000004")
    p = run_hooked(tmp_path, "stale_listing", 0, [*common(data, tiny_qwen25, run_dir), "--num-workers", "0"])
    assert p.returncode == 0 and "step_00000004 at step 4" in p.stdout, p.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


def test_resume_keeps_the_schedule_and_refuses_another(data, tiny_qwen25, tmp_path):
    """--epochs 1 over 5 records: 5 steps on 1 process, 3 on 2 ranks. A run resumed at step 4 on 2 ranks keeps
    the 5-step schedule (recomputing would end the run at once) with the same learning rate at step 5; a
    resume that asks for another --lr is refused with one line."""
    run_dir = tmp_path / "sched"
    args = ["--model", tiny_qwen25, "--data", f"{data}/img.jsonl", "--out", str(run_dir), "--max-steps", "0",
            "--epochs", "1", "--save-every", "2", "--keep-last", "5", "--lr", "1e-3", "--warmup-ratio", "0.2",
            "--num-workers", "0", "--max-length", "512"]
    p = run([sys.executable, "train.py", *args])
    assert p.returncode == 0, p.stderr[-3000:]
    first = metrics(run_dir)
    assert [m["step"] for m in first] == [1, 2, 3, 4, 5]
    shutil.rmtree(run_dir / "ckpt" / "step_00000005")
    shutil.rmtree(run_dir / "final")
    r = run(["torchrun", "--standalone", "--nproc-per-node", "2", "train.py", *args])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "keeping the checkpoint's schedule: 5 steps, warmup 1 (this run's 2 ranks would make it 3 steps)" in r.stdout
    again = metrics(run_dir)
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5] and again[4]["lr"] == first[4]["lr"] > 0
    # another learning rate: refused before any step, one line naming the flag and the values
    bad = run([sys.executable, "train.py", *[a if a != "1e-3" else "2e-3" for a in args]])
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert "another schedule (--lr 0.001 -> 0.002)" in lines[0] and lines[0].startswith("error: ")


def test_input_errors_are_one_line_exit_2(data, tiny_qwen25, tmp_path, capfd, monkeypatch):
    """User mistakes end with exit code 2 and one stderr line that names the input; no traceback."""
    good = ["--model", tiny_qwen25, "--data", f"{data}/img.jsonl", "--out", str(tmp_path / "o"), "--max-steps", "1",
            "--num-workers", "0"]

    def with_(flag, value):
        return [value if prev == flag else a for prev, a in zip([None] + good, good)]

    export = tmp_path / "run_x" / "final"  # a user points --model at the run folder instead of run_x/final
    shutil.copytree(tiny_qwen25, export)
    cases = [(with_("--data", str(data)), f"{data} is a folder: give a record file (.jsonl), e.g. {data}/img.jsonl"),
             (with_("--data", f"{data}/nope.jsonl"), f"--data file '{data}/nope.jsonl' not found"),
             (with_("--data", f"{data}/img.jsonl*1.5"), "repeat *1.5 must be a whole number"),
             (with_("--model", str(export.parent)), f"{export.parent}: no config.json, not a Hugging Face checkpoint "
                                                    f"directory; checkpoints below it: {export}"),
             (good + ["--resume", str(tmp_path)], f"--resume {tmp_path}: not a complete checkpoint")]
    # the first case as the script runs (a process of its own), the others through the same entry point
    # (run_cli(train.main)) in this process: 5 s of imports each saved
    p = run([sys.executable, "train.py", *cases[0][0]])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: " + cases[0][1]), p.stderr
    handlers = {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS}
    try:
        for argv, expected in cases[1:]:
            capfd.readouterr()
            with pytest.raises(SystemExit) as e, monkeypatch.context() as m:
                m.setattr(sys, "argv", ["train.py", *argv])
                run_cli(train.main)
            lines = capfd.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
            assert expected in lines[0], (expected, lines[0])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if train.dist.is_initialized():
            train.dist.destroy_process_group()
    # --debug brings the traceback back
    p = run([sys.executable, "train.py", *with_("--data", str(data)), "--debug"])
    assert p.returncode == 1 and "Traceback" in p.stderr and "UserError" in p.stderr


def test_bad_record_in_a_dataloader_worker_is_the_last_line_under_launch(data, tiny_qwen25, tmp_path):
    """A record whose image is missing, read by a DataLoader worker on one of two ranks under launch.sh: exit 2,
    and the last line printed names the file:line and the record (not a worker traceback nor torchrun's)."""
    records = [json.loads(l) for l in (data / "img.jsonl").read_text().splitlines()]
    for r in records:
        r["images"] = [str(data / i) for i in r["images"]]
    records[3]["images"] = [str(tmp_path / "gone.png")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    p = run(["bash", "launch.sh", "NPROC_PER_NODE=2", "--model", tiny_qwen25, "--data", str(bad), "--out",
             str(tmp_path / "o"), "--max-steps", "4", "--num-workers", "2", "--max-length", "512"])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-3000:]
    assert re.fullmatch(rf"launch.sh: rank \d: error: {re.escape(str(bad))}:4 \(record 'cls3'\): cannot read image "
                        rf"{re.escape(str(tmp_path / 'gone.png'))}: .*", last), last


def test_exits_when_its_dataloader_workers_outlive_main(data, tiny_qwen25, tmp_path):
    """The workers ignore SIGTERM (a scheduler's signal must not kill them before their rank saves), and
    Python's exit sends them SIGTERM and waits: a run whose DataLoader iterator is still referenced at exit would
    wait forever, unless train.py ends the workers itself (train.stop_workers, registered with atexit). Both ways
    out: done (0), and stopped by a signal (143: SIGTERM during step 2 of 6)."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    for hook, steps, code in (("none", 3, 0), ("sigterm", 6, 143)):
        env = {**ENV, "HOOK": hook, "HOOK_STEP": "2", "RANK": "0", "KEEP_LOADER": "1"}
        p = subprocess.run([sys.executable, str(wrapper), *common(data, tiny_qwen25, tmp_path / hook, steps=steps),
                            "--num-workers", "2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == code, (hook, p.stderr[-3000:])


def test_kill_while_checkpointing_resumes_from_previous(baseline, data, tiny_qwen25, tmp_path):
    out, _ = baseline
    run_dir = tmp_path / "torn"
    p = run_hooked(tmp_path, "kill_in_save", 4, [*common(data, tiny_qwen25, run_dir), "--num-workers", "0"])
    assert p.returncode != 0 and "SIGKILL" in p.stderr + p.stdout
    # rank 1 wrote its shards, died before the checkpoint was complete: only a .tmp, never a step_00000004
    assert (run_dir / "ckpt" / "step_00000004.tmp").is_dir()
    assert [d.name for d in train.complete_checkpoints(run_dir / "ckpt")] == ["step_00000002"]
    r = run(["bash", "launch.sh", "NPROC_PER_NODE=2", *common(data, tiny_qwen25, run_dir), "--num-workers", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_00000002 at step 2" in r.stdout + r.stderr
    assert not (run_dir / "ckpt" / "step_00000004.tmp").exists()
    assert (run_dir / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tiny_qwen25, tmp_path):
    out = tmp_path / "nan"
    # lr 1e30 blows the weights up in step 1; step 2's loss is NaN
    args = common(data, tiny_qwen25, out) + ["--lr", "1e30", "--save-every", "1", "--num-workers", "0"]
    p = run([sys.executable, "train.py", *args])
    assert p.returncode == 1
    assert "step 2: non-finite loss" in p.stderr and "step_00000001" in p.stderr
    assert [d.name for d in train.complete_checkpoints(out / "ckpt")] == ["step_00000001"]
    assert not list((out / "ckpt").glob("*.tmp")) and not (out / "final").exists()
    assert [m["step"] for m in metrics(out)] == [1]


def test_qwen3_two_ranks_text_only_rank_frozen_vision(data, tiny_qwen3, tmp_path):
    """Qwen3-VL (deepstack features from the vision tower) with text-only micro-batches on a rank, the vision
    tower frozen (its FSDP unit also holds the trained merger), an intermediate export."""
    out = tmp_path / "q3"
    files, entries = train.build_mixture(mixture(data), seed=3)
    imgs = [[bool(files[f][1][i]["images"]) for f, i in [entries[train.stream_entry(k, r, 2, len(entries), 3)]
                                                          for r in range(2)]] for k in range(3)]
    assert any(a != b for a, b in imgs), imgs
    p = run(["torchrun", "--standalone", "--nproc-per-node", "2", "train.py", *common(data, tiny_qwen3, out, steps=3),
             "--num-workers", "0", "--save-every", "100", "--freeze-vision", "--export-every", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    start, end = load_file(str(Path(tiny_qwen3) / "model.safetensors")), weights(out)
    moved = {k: not torch.equal(start[k], end[k]) for k in start}
    kind = {k: train.param_kind(k) for k in start}  # Qwen3-VL files use the in-memory names (model.visual...)
    assert sum(kind[k] == "vision" for k in start) > 10 and not any(moved[k] for k in start if kind[k] == "vision")
    assert any(moved[k] for k in start if kind[k] == "merger") and any(moved[k] for k in start if kind[k] == "llm")
    assert (out / "export" / "step_2" / "model.safetensors").is_file()
    net, proc = model.load(out / "final")
    assert len(model.generate(net, proc, read_records(data / "img.jsonl")[:1], max_new_tokens=3)) == 1
