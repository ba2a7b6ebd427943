"""Autoregressive sampling: temperature, top-k, top-p, seeds, and the context-window policy.

Works on token ids (the caller encodes and decodes), so the same loop serves the CLI, the
evaluators and the HTTP server. With the KV cache each new token costs one single-position
forward pass; without it the whole window is recomputed per token, as nanoGPT does.

Context window: a prompt longer than the window keeps its last `block_size` tokens. When
prompt + output fill the window, it slides forward by half its length: the model re-reads the
most recent half and continues (llama.cpp's context shift). Both modes, with and without the
cache, follow the same policy, so greedy outputs are identical.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from slm.errors import SlmError
from slm.model import GPT


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=200, metadata={"help": "stop after this many new tokens"})
    temperature: float = field(default=0.8, metadata={"help": "0 means greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0: off)"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    kv_cache: bool = field(default=True, metadata={"help": "reuse keys/values instead of recomputing"})

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise SlmError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SlmError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SlmError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SlmError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # the first forward pass, which yields the first token
    decode_seconds: float = 0.0  # every later forward pass
    finish_reason: str = "length"  # "stop" when end-of-text (or a stop id) was produced

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.new_tokens - 1  # the first new token came out of the prefill pass
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top one always stays).
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model: GPT, prompt: list[int], cfg: SamplingConfig, stop_ids: set[int] = frozenset(),
             vocab_limit: int | None = None, stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids one by one; a stop id ends generation and is not yielded.

    `vocab_limit` masks the padded rows of the embedding (ids >= the tokenizer's size),
    which a real tokenizer could not decode."""
    if not prompt:
        raise SlmError("the prompt is empty: give at least one token (e.g. <|endoftext|>)")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    block = model.config.block_size
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    cache = model.make_cache(batch_size=1) if cfg.kv_cache else None

    tokens = list(prompt)
    start = max(0, len(tokens) - block)  # a long prompt keeps its last `block` tokens
    fed = start  # with the cache, tokens[start:fed] are cached
    with torch.inference_mode():
        for i in range(cfg.max_new_tokens):
            t0 = time.perf_counter()
            if len(tokens) - start > block:  # the window is full: slide by half
                start = len(tokens) - max(1, block // 2)
                fed = start
                if cache is not None:
                    cache.reset()
            chunk = tokens[fed:] if cache is not None else tokens[start:]
            idx = torch.tensor([chunk], dtype=torch.long, device=device)
            logits, _ = model(idx, cache=cache, last_only=True)
            fed = len(tokens)
            logits = logits[:, -1, :vocab_limit] if vocab_limit else logits[:, -1, :]
            nxt = int(sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, gen))
            dt = time.perf_counter() - t0
            if i == 0:
                stats.prefill_seconds += dt
            else:
                stats.decode_seconds += dt
            if nxt in stop_ids:
                stats.finish_reason = "stop"
                return
            tokens.append(nxt)
            stats.new_tokens += 1
            yield nxt
    stats.finish_reason = "length"
