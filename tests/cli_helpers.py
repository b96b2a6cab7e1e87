"""Running a stage script as a user does, for the tests of its input errors: as a subprocess, or through the same
entry point (run_cli(main)) in the test process, which saves ~2 s of imports per case."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import run_cli


REPO = Path(__file__).resolve().parents[1]


def run_script(script, argv):
    """`python SCRIPT ARGV` as a user runs it: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, script, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def run_main(script, main, argv, monkeypatch, capsys):
    """What `python SCRIPT ARGV` runs, in this process: run_cli(main) with sys.argv set as the shell sets
    it. Returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    monkeypatch.delenv("RSCOVLM_DEBUG", raising=False)
    monkeypatch.delenv("RSCOVLM_STATUS_DIR", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def one_error_line(result, names):
    """The `error: ...` line of a run that must end with exactly that one stderr line, exit code 2, naming
    every one of names."""
    code, _, err = result
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert all(str(n) in lines[0] for n in names), (lines[0], names)
    return lines[0]


def training_run(run, step=4):
    """What train.py leaves in its --out: args.json, the training checkpoint ckpt/step_0000000N (loop.pt), the export
    export/step_N and final (config.json). Only the files the eval scripts look at. Returns the run folder."""
    (run / "ckpt" / f"step_{step:08d}").mkdir(parents=True)
    (run / "ckpt" / f"step_{step:08d}" / "loop.pt").write_bytes(b"")
    for export in (run / "export" / f"step_{step}", run / "final"):
        export.mkdir(parents=True)
        (export / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (run / "args.json").write_text('{"model": "base"}')
    return run


def scripted_generate(answers, calls):
    """A stand-in for model.generate that knows each record's answer and writes it as a model would: token by
    token until <|im_end|>, or until max_new_tokens, when the answer is cut (model.generate's contract)."""
    def generate(net, processor, records, batch_size=8, max_new_tokens=512, backend="fast", details=False, vllm_args=None):
        out = []
        for r in records:
            calls.append({"id": r["id"], "max_new_tokens": max_new_tokens, "backend": backend})
            toks = processor.tokenizer.encode(answers[r["id"]], add_special_tokens=False) + [processor.end_of_turn_id]
            out.append({"text": processor.tokenizer.decode(toks[:max_new_tokens], skip_special_tokens=True).strip(),
                        "new_tokens": min(len(toks), max_new_tokens), "cut": len(toks) > max_new_tokens})
        return out if details else [o["text"] for o in out]
    return generate
