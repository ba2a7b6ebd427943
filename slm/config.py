"""Model shapes: the `ModelConfig` dataclass and the named presets.

"Small" is a matter of parameters, context window and width, so every model size is a
`ModelConfig`; presets are just named ones. Parameter counts are computed here from the
shape alone, so `slm info --preset 1b` never allocates a billion weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slm.errors import SlmError

# GPT-2's 50257 tokens padded to a multiple of 64: matmuls on a round size run faster, and
# the padded logits simply learn to be very negative (never sampled: see generate.py).
GPT2_VOCAB = 50257
PADDED_VOCAB = 50304


@dataclass
class ModelConfig:
    """Shape of a nanoGPT-style GPT: learned positions, pre-LN blocks, tied head."""

    block_size: int = 256  # context window in tokens
    vocab_size: int = PADDED_VOCAB
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise SlmError(f"model {name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise SlmError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise SlmError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SlmError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (the tied head counted once). Non-embedding excludes the
        token and position tables, the usual convention for scaling laws."""
        d, L = self.n_embd, self.n_layer
        b = 1 if self.bias else 0
        ln = d + b * d
        attn = d * 3 * d + b * 3 * d + d * d + b * d
        mlp = d * 4 * d + b * 4 * d + 4 * d * d + b * d
        blocks = L * (2 * ln + attn + mlp) + ln  # + final LayerNorm
        if non_embedding:
            return blocks
        return blocks + self.vocab_size * d + self.block_size * d

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B:
        6N for the weights plus 12*L*d*T for attention scores."""
        T = seq_len or self.block_size
        n = self.num_params(non_embedding=True) + self.vocab_size * self.n_embd  # head matmul
        return 6 * n + 12 * self.n_layer * self.n_embd * T


PRESETS: dict[str, ModelConfig] = {
    # Trains on a 2-core CPU in minutes.
    "tiny": ModelConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    # GPT-2 small, 124M.
    "gpt2": ModelConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # GPT-2 medium, 350M.
    "gpt2-medium": ModelConfig(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    # The talk's GPTConfig: ~1.3B parameters.
    "1b": ModelConfig(block_size=2048, n_layer=24, n_head=32, n_embd=2048),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise SlmError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def resolve_model_config(preset_name: str | None = None, **overrides) -> ModelConfig:
    """A preset (default `tiny`) with any shape fields overridden; None means 'keep'."""
    base = preset(preset_name or "tiny")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **changes)
