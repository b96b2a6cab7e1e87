"""Shared fixtures: tiny random-init checkpoints (built once per test session and xdist worker), the real samples."""
import os
from pathlib import Path

# One thread per process, set before torch loads, inherited by the scripts the tests start: the tiny models gain
# nothing from a second thread, and with two xdist workers (pytest.ini) on two cores, or any other load, OpenMP
# threads that spin waiting for a descheduled sibling cost several times the work (test_generate: 5x the CPU).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The files with the longest runs (multi-process training, the demo), longest first: pytest.ini hands whole files
# to two xdist workers (--dist loadfile) in collection order, so these start at once and the many short files fill
# in behind them, and both workers finish together. Tests keep their order within a file.
LONGEST_FIRST = ["test_train.py", "test_demo.py", "test_fsdp.py", "test_lora.py", "test_suite.py", "test_bench.py",
                 "test_data_prep.py", "test_eval_vqa.py", "test_zoom.py", "test_generate.py", "test_eval_det.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory):
    import synth

    return synth.make_tiny(tmp_path_factory.mktemp("tiny") / "qwen2.5", "qwen2.5")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    import synth

    return synth.make_tiny(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (real DOTA/DIOR samples) is absent")
    return SHARED_DATA
