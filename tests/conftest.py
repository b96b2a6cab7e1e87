"""Shared fixtures: tiny random-init checkpoints (built once per test session) and the real samples."""
import os
from pathlib import Path

import pytest

import synth


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_qwen25(tmp_path_factory):
    import model

    return synth.make_tiny(tmp_path_factory.mktemp("tiny") / "qwen2.5", "qwen2.5")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    import model

    return synth.make_tiny(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (real DOTA/DIOR samples) is absent")
    return SHARED_DATA
