"""The GPT: token + learned position embeddings, pre-LayerNorm transformer blocks with causal
self-attention (PyTorch SDPA) and a GELU MLP, a final LayerNorm, and a head tied to the token
embedding. GPT-2's architecture, named as nanoGPT names it, so it reads top to bottom.

An optional `KVCache` lets generation feed one token at a time instead of re-reading the
whole context (slm/inference.py can run those steps in native kernels: Block.decode_step); the
model knows nothing about tokenizers or sampling (see generate.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from slm import kernels
from slm.config import ModelConfig


class KVCache:
    """Keys and values of every layer, preallocated for the whole context window: one
    (2, batch, n_head, block_size, head_dim) tensor per layer, so one copy stores both."""

    def __init__(self, config: ModelConfig, batch_size: int = 1, device=None, dtype=torch.float32):
        shape = (2, batch_size, config.n_head, config.block_size, config.head_dim)
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # number of positions filled
        self.capacity = config.block_size

    def reset(self) -> None:
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        # (3, B, nh, T, hd): q, k and v as views of one tensor (few ops: decoding is op-bound)
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        mask, causal = None, True
        if cache is not None:
            start = cache.pos
            cache.kv[layer][:, :, :, start : start + T] = qkv[1:]
            q = qkv[0]
            k, v = cache.kv[layer][:, :, :, : start + T].unbind(0)
            if T == 1:
                causal = False  # one new query may see every cached key
            elif start > 0:
                # A chunk appended to a non-empty cache: query i sees keys up to start + i.
                causal = False
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        else:
            q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return self.resid_dropout(y) if self.training else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        y = self.c_proj(self.gelu(self.c_fc(x)))
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.fused_decode = False  # set by slm/inference.py where its layers allow

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        if self.fused_decode and cache is not None and x.shape[1] == 1 and not self.training:
            return self.decode_step(x, cache, layer)
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))

    def decode_step(self, x, cache: KVCache, layer: int):
        """forward() for one new position in slm's native kernels (slm/kernels), in six calls
        instead of ~30: each LayerNorm and residual add fused into a product's call (linear
        layers with `fused`, as slm/inference.py sets up), attention and the cache update in one."""
        qkv = self.attn.c_attn.fused(x, norm=self.ln_1)
        x = self.attn.c_proj.fused(kernels.decode_attention(qkv, cache.kv[layer], cache.pos), residual=x)
        h = self.mlp.gelu(self.mlp.c_fc.fused(x, norm=self.ln_2))
        return self.mlp.c_proj.fused(h, residual=x)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.checkpoint_blocks = False  # activation checkpointing, for training with less memory
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def make_cache(self, batch_size: int = 1) -> KVCache:
        w = self.transformer.wpe.weight  # float even when the token table is quantized
        return KVCache(self.config, batch_size, w.device, w.dtype)

    def hidden_states(self, idx, cache: KVCache | None = None):
        """Final-LayerNorm outputs (B, T, n_embd): everything but the head. Training computes
        the head and the loss together from these (slm/engine/losses.py)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.checkpoint_blocks and self.training and cache is None:  # recomputed in the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy over targets that
        are not -100. With a cache, idx continues the cached sequence; `last_only` computes
        the head for the final position only, as sampling needs."""
        x = self.hidden_states(idx, cache)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100)
        return logits, loss
