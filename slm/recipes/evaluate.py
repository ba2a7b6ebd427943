"""`slm eval`: a model's loss and perplexity on a split of a data source.

Any `--model` spec works (an slm model directory, a training run or a checkpoint inside one, a
Hugging Face model), as long as it reads GPT-2 tokens, which is what the data stream produces.
slm's GPTs are evaluated in the training layout with the chunked loss; other models through
their own forward pass.
"""

from __future__ import annotations

import math
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn

from slm.artifacts import GPT_KIND, artifact_kind, load_model, resolve_artifact_dir
from slm.data import DataConfig, TokenStream, check_source
from slm.engine.evaluation import evaluate_loss
from slm.engine.losses import CausalLMLoss
from slm.errors import SlmError
from slm.loading import open_model
from slm.runtime import DEFAULT_DTYPE, autocast_dtype, resolve_device
from slm.tokenizer import require_gpt2


class _ForwardLoss(nn.Module):
    """`model(x, y) -> loss` for models with the GPT call interface returning (logits, loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model(x, y)[1]


def load_for_eval(spec: str, device: torch.device) -> tuple[nn.Module, int, str]:
    """(module computing the loss, context length, resolved path) for a --model spec."""
    path = Path(spec)
    if path.is_dir():
        path = resolve_artifact_dir(path)
        if artifact_kind(path) == GPT_KIND:
            model, _ = load_model(path, device=device)
            return CausalLMLoss(model), model.config.block_size, str(path)
    loaded = open_model(spec, device=device)
    return loss_module(loaded, spec), loaded.model.config.block_size, loaded.path


def loss_module(loaded, spec: str) -> nn.Module:
    """`module(x, y) -> loss` for a model `open_model` loaded, if it reads GPT-2 tokens."""
    require_gpt2(loaded.tokenizer, spec, "its loss on them would mean nothing")
    return _ForwardLoss(loaded.model)


def split_loss(module: nn.Module, context: int, data: DataConfig, split: str = "val",
               max_tokens: int | None = None, batch_size: int = 8, block_size: int | None = None,
               dtype: torch.dtype = torch.float32) -> dict:
    """Loss and perplexity of `module(x, y) -> loss` on the `split` of `data`, in blocks of at
    most `context` tokens. The batches go where the module is: a quantized model stays on the
    CPU whatever device was asked for."""
    T = min(block_size or context, context)
    device = next(chain(module.parameters(), module.buffers())).device
    stream = TokenStream(data, split=split, block_size=T, batch_size=batch_size, loop=False, seed=0)
    loss, n = evaluate_loss(module, stream, None, device, dtype, max_targets=max_tokens)
    if n == 0:
        raise SlmError(f"the {split} split of {data.source} has fewer than {T + 1} tokens; nothing to evaluate")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": n, "split": split,
            "source": data.source, "block_size": T}


def evaluate_model(spec: str, data: DataConfig, split: str = "val", max_tokens: int | None = None,
                   batch_size: int = 8, block_size: int | None = None, device: str = "auto",
                   dtype: str = DEFAULT_DTYPE) -> dict:
    if split not in ("train", "val", "test"):
        raise SlmError(f"split must be train, val or test, got {split!r}")
    if max_tokens is not None and max_tokens < 1:
        raise SlmError(f"max_tokens must be positive, got {max_tokens}")
    dev = resolve_device(device)
    check_source(data, split=split)
    module, context, path = load_for_eval(spec, dev)
    amp = autocast_dtype(dtype, dev)
    return {**split_loss(module, context, data, split, max_tokens, batch_size, block_size, amp), "model": path}
