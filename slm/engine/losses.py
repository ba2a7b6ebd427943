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
CHUNK_ROWS = 2048  # rows of logits per chunk: larger chunks make faster matmuls (measured on CPU)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, compute_dtype):
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n = h.shape[0]
        valid = targets != IGNORE_INDEX
        # 1/targets on valid rows, 0 elsewhere: applied to the small hidden-state rows, never to logits
        row_scale = (valid / valid.sum().clamp(min=1)).unsqueeze(1).to(h.dtype)
        safe_targets = torch.where(valid, targets, 0)
        w = weight.to(compute_dtype)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            hc, tgt, scale = h[s:e].to(compute_dtype), safe_targets[s:e], row_scale[s:e]
            rows = torch.arange(e - s, device=h.device)
            logits = torch.mm(hc, w.t())
            # one pass over the logits: softmax in their dtype (accumulating in fp32), which is also
            # the gradient's dtype for the matmuls below
            probs = torch.softmax(logits, dim=1)
            p_target = probs[rows, tgt]
            log_p = torch.log(p_target.float())
            under = torch.isinf(log_p)  # p_target underflowed: that row's loss exactly, from its logits
            if under.any():
                log_p[under] = torch.log_softmax(logits[under].float(), dim=1)[torch.arange(int(under.sum())),
                                                                                tgt[under]]
            del logits
            loss -= torch.where(valid[s:e], log_p * scale.float().squeeze(1), 0.0).sum()
            if needs_grad:
                # d(loss)/d(logits) = (softmax - onehot) * scale; the scale goes on the small side.
                # (index_put_, not scatter_: on CPU scatter_ copies the whole tensor.)
                probs.index_put_((rows, tgt), p_target - 1)
                grad_h[s:e] = torch.mm(probs, w).mul_(scale.to(compute_dtype))
                gw = torch.mm(probs.t(), hc * scale.to(compute_dtype))
                del probs
                grad_w = gw.float() if grad_w is None else grad_w.add_(gw)
        if needs_grad and grad_w is None:  # no rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
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
