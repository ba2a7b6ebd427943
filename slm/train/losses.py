"""Training losses: the LM head and cross-entropy fused and chunked, and the module a recipe trains.

A GPT's head turns (B*T, d) hidden states into (B*T, 50304) logits: for the `tiny` preset at
batch 8 x 256 that is 412 MB in fp32, written, read and written again by log-softmax and its
backward, and the head is ~65% of the model's FLOPs. `linear_cross_entropy` never builds the
whole table: it walks over row chunks, computes each chunk's logits, loss and gradients at once
(the loss is the last op, so its gradient is known in the forward pass) and keeps only the
gradients of the hidden states and of the head weight. Same math, same FLOPs, a few MB of
logits at a time (the idea of Liger-Kernel's fused linear cross-entropy).

It knows nothing about the model beyond "hidden states times a weight"; `CausalLMLoss` wires it
to slm's GPT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slm.model import GPT

IGNORE_INDEX = -100
CHUNK_ROWS = 512  # rows of logits per chunk (tuned on CPU: bench/train.py)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n, vocab = h.shape[0], weight.shape[0]
        valid = targets != IGNORE_INDEX
        scale = 1.0 / max(int(valid.sum()), 1)
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
        row_scale = (valid * scale).unsqueeze(1).float()
        w = weight.to(compute_dtype)
        rows = min(CHUNK_ROWS, n)
        logits32 = torch.empty(rows, vocab, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, rows):
            e = min(s + rows, n)
            hc, lg = h[s:e].to(compute_dtype), logits32[: e - s]
            if compute_dtype == torch.float32:
                torch.mm(hc, w.t(), out=lg)
            else:
                lg.copy_(torch.mm(hc, w.t()))
            torch.log_softmax(lg, dim=1, out=lg)
            tgt = safe_targets[s:e]
            loss -= (lg.gather(1, tgt) * row_scale[s:e]).sum()
            if needs_grad:
                # d(loss)/d(logits) = (softmax - onehot) * scale on valid rows
                grad = lg.exp_()
                grad.scatter_add_(1, tgt, torch.full_like(tgt, -1, dtype=grad.dtype))
                grad = torch.mul(grad, row_scale[s:e], out=grad) if compute_dtype == torch.float32 else (
                    grad.mul_(row_scale[s:e]).to(compute_dtype))
                torch.mm(grad, w, out=grad_h[s:e]) if h.dtype == compute_dtype else grad_h[s:e].copy_(grad @ w)
                if compute_dtype == torch.float32:
                    grad_w.addmm_(grad.t(), hc)
                else:
                    grad_w += torch.mm(grad.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place, no copies of the head's gradient
        return grad_h.mul_(grad_out), grad_w.mul_(grad_out), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` (-100 = ignored), without building
    the logits. Under autocast the matmuls run in the autocast dtype; softmax is always fp32."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), dtype)


class CausalLMLoss(nn.Module):
    """GPT + next-token loss in one module: what DDP/FSDP wrap and the trainer calls as
    `module(x, y) -> mean loss`. The GPT is `self.model`, so weights save without the wrapper."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(self.model.hidden_states(x), self.model.lm_head.weight, y)
