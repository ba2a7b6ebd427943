"""slm's GPT as a `TrainTask`, and seeded random batches to measure and test it with.

`gpt_task` is what pretraining (and any recipe training slm's own GPT) gives the trainer: the
model with its chunked loss (losses.CausalLMLoss), checkpoints that are slm model directories
(loadable wherever `--model` is taken), and FSDP units per transformer block. `RandomBatches`
feed the same step with seeded random tokens: `slm plan`'s CPU measurement, benchmarks and
tests time the very step training takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slm.artifacts import TIED_KEYS, gpt_header, read_artifact, read_tensors, save_tensors, verify_weights
from slm.config import ModelConfig
from slm.engine.losses import CausalLMLoss
from slm.engine.trainer import TrainTask
from slm.errors import SlmError
from slm.model import GPT
from slm.tokenizer import get_tokenizer

PREFIX = "model."  # CausalLMLoss holds the GPT as .model


class RandomBatches:
    """Seeded random token batches with a resumable position (a `BatchSource`)."""

    pass_index = None  # endless: no passes over data
    skipped: dict[str, int] = {}

    def __init__(self, cfg: ModelConfig, batch_size: int, seed: int = 0, vocab: int | None = None):
        self.shape = (batch_size, cfg.block_size + 1)
        self.vocab = vocab or cfg.vocab_size
        self.seed, self.index = seed, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
            t = torch.randint(0, self.vocab, self.shape, generator=g)
            self.index += 1
            yield t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]

    def close(self) -> None:
        pass


def gpt_task(model_cfg: ModelConfig, batches, eval_batches=None, model: GPT | None = None) -> TrainTask:
    """A TrainTask for slm's GPT: checkpoints are slm model directories."""
    model = model if model is not None else GPT(model_cfg)
    identity = get_tokenizer().identity

    def save_model(directory: Path, state_dict: dict, metadata: dict) -> None:
        tensors = {k[len(PREFIX):]: v for k, v in state_dict.items()}
        tensors = {k: v for k, v in tensors.items() if k not in TIED_KEYS}
        save_tensors(directory, tensors, gpt_header(model_cfg, identity, metadata))

    def load_model(directory: Path) -> dict:
        art = read_artifact(directory)
        if art.model != model_cfg:
            raise SlmError(f"{directory} holds a model of another shape ({art.model}) than this run's ({model_cfg})")
        tensors = read_tensors(verify_weights(art.path, art.raw))
        for tied in TIED_KEYS:
            tensors[tied] = tensors["transformer.wte.weight"]
        return {PREFIX + k: v for k, v in tensors.items()}

    return TrainTask(module=CausalLMLoss(model), batches=batches, save_model=save_model, load_model=load_model,
                     eval_batches=eval_batches, flops_per_token=model_cfg.flops_per_token(model_cfg.block_size),
                     shard_units=list(model.transformer.h))
