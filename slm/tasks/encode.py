"""Examples -> token ids with the loss on the completion only, and padded batches.

The prompt is rendered exactly as at inference (`slm.prompts.chat_prompt`) and tokenized on
its own; the completion follows, ended by the model's end-of-turn token (the chat template's,
or <|endoftext|> for slm's plain template). Labels are -100 on every prompt and padding
position, so the loss covers the completion tokens only.

An example longer than `max_seq_len` either loses tokens from the start of its prompt
("left") or is dropped ("drop"); both are counted. Batches are right-padded: with causal
attention, padding after a sequence cannot change the positions before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from slm.engine.losses import IGNORE_INDEX
from slm.errors import SlmError
from slm.tasks.examples import Example
from slm.tasks.sql.prompts import prompt_messages
from slm.prompts import chat_prompt, plain_chat_prompt

IGNORE = IGNORE_INDEX  # labels of prompt and padding positions
TRUNCATION = ("left", "drop")  # what happens to an example longer than max_seq_len


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]  # IGNORE on prompt positions; the completion's ids elsewhere

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncodeStats:
    examples: int = 0
    kept: int = 0
    truncated: int = 0  # kept with prompt tokens cut from the start
    dropped: int = 0  # longer than max_seq_len (or a completion alone too long)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def summary(self) -> dict:
        return dict(self.__dict__)


def prompt_and_completion_ids(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """The ids the model reads at inference, and the ids it should answer with."""
    messages = prompt_messages(ex)
    if getattr(tokenizer, "has_chat_template", False):
        prompt = chat_prompt(tokenizer, messages)
        full = chat_prompt(tokenizer, messages + [{"role": "assistant", "content": ex.completion}],
                           add_generation_prompt=False)
        if not full.startswith(prompt):
            raise SlmError("the model's chat template renders a conversation differently from its own prompt; "
                           "cannot tell the completion apart for masking")
        return tokenizer.encode(prompt), tokenizer.encode(full[len(prompt):].rstrip())
    return tokenizer.encode(plain_chat_prompt(messages)), tokenizer.encode(ex.completion) + [tokenizer.eot_id]


def encode_example(tokenizer, ex: Example, max_seq_len: int, truncation: str = "drop",
                   stats: EncodeStats | None = None) -> Encoded | None:
    if truncation not in TRUNCATION:
        raise SlmError(f"unknown truncation {truncation!r}; choose one of {', '.join(TRUNCATION)}")
    stats = stats if stats is not None else EncodeStats()
    stats.examples += 1
    prompt, completion = prompt_and_completion_ids(tokenizer, ex)
    excess = len(prompt) + len(completion) - max_seq_len
    if excess > 0:
        if truncation == "drop" or excess >= len(prompt):
            stats.dropped += 1
            return None
        prompt = prompt[excess:]
        stats.truncated += 1
    stats.kept += 1
    stats.prompt_tokens += len(prompt)
    stats.completion_tokens += len(completion)
    return Encoded(prompt + completion, [IGNORE] * len(prompt) + completion)


def encode_all(tokenizer, examples: list[Example], max_seq_len: int, truncation: str = "drop") -> tuple[list[Encoded], EncodeStats]:
    stats = EncodeStats()
    out = [e for ex in examples if (e := encode_example(tokenizer, ex, max_seq_len, truncation, stats)) is not None]
    return out, stats


def collate(batch: list[Encoded], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T): inputs are ids[:-1], targets labels[1:], right-padded
    with `pad_id` and IGNORE."""
    T = max(len(e) for e in batch) - 1
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e) - 1
        idx[i, :n] = torch.tensor(e.ids[:-1])
        tgt[i, :n] = torch.tensor(e.labels[1:])
    return idx, tgt


@dataclass
class BatchSampler:
    """Endless shuffled batches of encoded examples, resumable from `state_dict()`.

    Each epoch is a seeded permutation; within windows of `bucket` batches, examples are
    sorted by length so a batch pads little, and the batches are then shuffled again."""

    data: list[Encoded]
    batch_size: int
    seed: int = 0
    bucket: int = 16
    pad_id: int = 0
    epoch: int = 0
    position: int = 0  # batches already served in this epoch
    _order: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.data:
            raise SlmError("no training examples left after encoding (all were dropped as too long?)")
        self._order = self._epoch_batches(self.epoch)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        perm = list(range(len(self.data)))
        rng.shuffle(perm)
        window = self.batch_size * self.bucket
        batches = []
        for w in range(0, len(perm), window):
            chunk = sorted(perm[w:w + window], key=lambda i: len(self.data[i]))
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self._order)

    def __iter__(self):
        while True:
            yield self.next()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_batches(self.epoch)
        ids = self._order[self.position]
        self.position += 1
        return collate([self.data[i] for i in ids], self.pad_id)

    @property
    def pass_index(self) -> int:
        """The epoch: each pass over the examples is a new permutation."""
        return self.epoch

    @property
    def skipped(self) -> dict[str, int]:
        return {}  # examples too long were dropped when encoding (EncodeStats), not here

    def close(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._epoch_batches(self.epoch)
