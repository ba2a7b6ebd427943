"""`TrainConfig`: the training loop's knobs, the same for every recipe.

It knows nothing about what is trained: each recipe pairs it with its own settings
(slm/recipes/config.py), and `slm train`/`slm finetune` build their flags from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slm.errors import SlmError
from slm.runtime import AUTOCAST_DTYPES, DEFAULT_DEVICE, DEFAULT_DTYPE, dtype_name


@dataclass
class TrainConfig:
    # -- length
    max_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps to train; the LR schedule spans them"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "wall-clock budget; without --max-steps the schedule spans the steps that fit"})
    # -- batch
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per device"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    # -- optimizer and schedule
    lr: float = field(default=6e-4, metadata={"help": "peak learning rate"})
    min_lr: float | None = field(default=None, metadata={"help": "LR at the end of the cosine decay (default: lr/10)"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (default: 100, at most a tenth of the run)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay on matrices and embeddings"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0 = off)"})
    # -- evaluation
    eval_every: int = field(default=100, metadata={"help": "validate every N steps (0 = only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    # -- checkpoints
    ckpt_every: int | None = field(default=None, metadata={"help": "checkpoint every N steps"})
    ckpt_minutes: float | None = field(default=30.0, metadata={"help": "checkpoint every M minutes"})
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept besides the best by validation loss"})
    # -- numerics and hardware
    seed: int = field(default=1337, metadata={"help": "seed for initialization, data order and dropout"})
    dtype: str = field(default=DEFAULT_DTYPE, metadata={
        "help": "bf16 autocast or fp32 (auto: bf16 where the CPU/GPU has native bf16)",
        "choices": list(AUTOCAST_DTYPES)})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model (pays off on long runs)"})
    device: str = field(default=DEFAULT_DEVICE, metadata={"help": "cpu, cuda, cuda:N or auto"})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads (default: one per core; on a busy machine 1 can be faster)"})
    fsdp: bool = field(default=False, metadata={"help": "shard weights, gradients and optimizer over ranks (FSDP)"})
    memory_gb: float | None = field(default=None, metadata={
        "help": "device memory to plan for, GB (default: what the device reports)"})
    check_memory: bool = field(default=True, metadata={"help": "refuse a configuration the plan says will not fit"})
    # -- stability
    max_bad_steps: int = field(default=5, metadata={
        "help": "consecutive non-finite steps (skipped) before the run stops"})
    spike_zscore: float = field(default=6.0, metadata={
        "help": "a loss this many standard deviations above the recent mean is a spike (0 = off)"})
    spike_window: int = field(default=50, metadata={"help": "steps in the running loss window for spikes"})
    spike_rollback: bool = field(default=False, metadata={
        "help": "on a spike, go back to the last checkpoint and lower the LR"})
    spike_lr_factor: float = field(default=0.5, metadata={"help": "LR multiplier applied at each rollback"})
    max_rollbacks: int = field(default=3, metadata={"help": "rollbacks before spikes are only logged"})
    # -- output
    log_every: int = field(default=10, metadata={"help": "console line every N steps when stderr is not a terminal"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also write TensorBoard event files beside metrics.jsonl (tensorboard --logdir compares runs)"})

    def __post_init__(self) -> None:
        positive = ["batch_size", "grad_accum", "eval_batches", "keep_last", "max_bad_steps", "spike_window",
                    "log_every"]
        for name in positive:
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "ckpt_every", "warmup_steps", "threads"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "warmup_steps" else 1):
                raise SlmError(f"{name} must be positive, got {v}")
        for name in ("max_minutes", "ckpt_minutes", "memory_gb"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SlmError(f"{name} must be positive, got {v}")
        if self.lr <= 0 or (self.min_lr is not None and not 0 <= self.min_lr <= self.lr):
            raise SlmError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        for name in ("weight_decay", "grad_clip", "eval_every", "spike_zscore", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise SlmError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise SlmError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 < self.spike_lr_factor <= 1:
            raise SlmError(f"spike_lr_factor must be in (0, 1], got {self.spike_lr_factor}")
        self.dtype = dtype_name(self.dtype, AUTOCAST_DTYPES)

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def warmup_for(self, horizon: int | None) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return 100 if horizon is None else min(100, horizon // 10)
