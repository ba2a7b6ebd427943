"""Helpers for the training tests: tiny tasks and one compute thread."""

from __future__ import annotations

import pytest
import torch

from slm.engine.gpt import RandomBatches, gpt_task

from conftest import tiny_config

VOCAB = 128


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_config(**kw):
    return tiny_config(vocab_size=VOCAB, **kw)


def small_task(seed=0, batch_size=2, block_size=32):
    torch.manual_seed(seed)
    cfg = small_config(block_size=block_size)
    return gpt_task(cfg, RandomBatches(cfg, batch_size, seed=seed),
                    eval_batches=lambda split: RandomBatches(cfg, batch_size, seed=99 if split == "val" else 98))
