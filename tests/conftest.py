"""Shared fixtures: tiny models built in the test, never downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slm.config import ModelConfig
from slm.model import GPT

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(**kw) -> ModelConfig:
    base = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config()).eval()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (it exists beside the project in development and CI only)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def slm_cache_dir(tmp_path_factory):
    """Caches (the wiki-vital parquet shards) go to a per-session directory, not the user's."""
    import os

    old = os.environ.get("SLM_CACHE_DIR")
    os.environ["SLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("slm-cache"))
    yield os.environ["SLM_CACHE_DIR"]
    if old is None:
        del os.environ["SLM_CACHE_DIR"]
    else:
        os.environ["SLM_CACHE_DIR"] = old
