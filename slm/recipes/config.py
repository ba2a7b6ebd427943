"""Fine-tuning's typed options: `slm finetune` and `slm eval-sql` flags come from these.

Kept apart from the code that uses them, so building the CLI does not import the training
loop, peft or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slm.errors import SlmError
from slm.tasks.examples import FORMATS
from slm.engine.config import TrainConfig

TRUNCATION = ("left", "drop")
GPT_TARGETS = ["c_attn", "c_proj", "c_fc"]  # LoRA on slm's GPT: every projection, not the tied head
HF_TARGETS = "all-linear"  # peft: every linear layer of a transformers model except its output head


@dataclass
class FinetuneConfig:
    """What to fine-tune, on which examples, and how they become sequences."""

    base: str = field(default="smollm2-135m-instruct", metadata={
        "help": "model to fine-tune: slm model or run directory, Hugging Face directory or hub id, .gguf file, alias"})
    data: str | None = field(default=None, metadata={
        "help": "training examples: .jsonl, .json, .parquet or hf:DATASET[:SPLIT]"})
    val_data: str | None = field(default=None, metadata={
        "help": "held-out examples (default: carved off --data deterministically)"})
    format: str | None = field(default=None, metadata={
        "help": "data layout (default: detected from the columns)", "choices": list(FORMATS)})
    method: str = field(default="lora", metadata={"help": "lora (adapter) or full (every weight)",
                                                  "choices": ["lora", "full"]})
    max_seq_len: int = field(default=768, metadata={"help": "tokens per example, prompt + completion"})
    truncation: str = field(default="drop", metadata={
        "help": "longer examples: drop them, or cut the prompt's start (left)", "choices": list(TRUNCATION)})
    epochs: float | None = field(default=None, metadata={"help": "train this many passes (instead of --max-steps)"})
    holdout_fraction: float = field(default=0.05, metadata={"help": "share of --data held out when no --val-data"})
    holdout_max: int = field(default=64, metadata={"help": "held-out examples at most"})
    limit: int | None = field(default=None, metadata={"help": "read at most N examples of --data"})
    merge: bool = field(default=False, metadata={"help": "also write OUT/model: the base with the adapter merged in"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each layer's input and recompute the rest in the backward pass: much less memory "
                "for more compute (SmolLM2-135M LoRA, 3 x 768 tokens, CPU: peak 7.2 -> 2.7 GB, 0.72x the speed)"})

    def __post_init__(self):
        if self.max_seq_len < 8:
            raise SlmError(f"max_seq_len must be at least 8, got {self.max_seq_len}")
        if self.epochs is not None and self.epochs <= 0:
            raise SlmError(f"epochs must be positive, got {self.epochs}")


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """The training loop's options with fine-tuning defaults: a small LoRA on CPU for minutes."""

    batch_size: int = field(default=3, metadata={"help": "sequences per micro-batch per device"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on matrices and embeddings"})
    eval_every: int = field(default=50, metadata={"help": "validate every N steps (0 = only at the end)"})
    ckpt_minutes: float | None = field(default=10.0, metadata={"help": "checkpoint every M minutes"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept besides the best by validation loss"})
    seed: int = field(default=0, metadata={"help": "seed for LoRA initialization, data order and dropout"})


@dataclass
class LoraSettings:
    """LoRA's shape: rank, scale, dropout and which layers get adapters."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator (the update is B A * alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_targets: list[str] | None = field(default=None, metadata={
        "help": "module names to adapt (default: every projection: all-linear for transformers models, "
                f"{' '.join(GPT_TARGETS)} for slm's GPT)"})

    def __post_init__(self):
        if self.lora_r < 1:
            raise SlmError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SlmError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


@dataclass
class EvalSqlConfig:
    """How `slm eval-sql` generates, runs and judges each example."""

    limit: int | None = field(default=None, metadata={"help": "evaluate the first N examples only"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest reply generated per question"})
    databases: int = field(default=3, metadata={"help": "seeded databases per schema-only context (test suite)"})
    timeout: float = field(default=5.0, metadata={"help": "seconds a query may run before it is stopped"})
    max_rows: int = field(default=10_000, metadata={"help": "rows fetched per query at most"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic database rows"})
    show: int = field(default=4, metadata={"help": "worked examples in the report"})
