"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule.

As nanoGPT does: matrices and embeddings (2-D and up) are decayed, biases and LayerNorm gains are
not. The fused AdamW kernel is used where PyTorch has one for the parameters' device (CPU and
CUDA), the multi-tensor one otherwise. The schedule is a pure function of the step, so resuming
needs only the step number.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from slm.engine.config import TrainConfig


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in module.named_parameters():  # shared (tied) parameters are listed once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_available(params: list[torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and not isinstance(p, DTensor)
               for p in params)


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(module, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = fused_available(params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, peak: float, final: float, warmup: int, horizon: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup to `peak`, cosine decay to `final`
    at `horizon` steps, `final` after."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= horizon:
        return final
    progress = (step - warmup) / max(1, horizon - warmup)
    return final + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - final)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
