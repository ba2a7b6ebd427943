"""`DataConfig`: everything that decides which documents a token stream yields, and in which order.

One dataclass, so `slm data`, `slm train` and `slm eval` get the same flags from it
(`slm/cli/args.py`); `source` itself is given as `--data SOURCE`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from slm.errors import SlmError

# Fields that change the document sequence: a saved stream position is only valid with the same ones.
_SEQUENCE_FIELDS = ("source", "text_field", "val_percent", "test_percent", "shuffle_buffer", "max_doc_chars",
                    "txt_mode")


@dataclass
class DataConfig:
    source: str = field(default="wiki-vital", metadata={
        "help": "data source: a path/dir/glob of .parquet/.jsonl[.gz|.zst]/.txt files, an fsspec URL, "
                "hf:OWNER/NAME[@CONFIG][:SPLIT], fineweb-edu or wiki-vital"})
    text_field: str = field(default="text", metadata={"help": "column (parquet) or key (JSONL) holding the text"})
    val_percent: float = field(default=1.0, metadata={
        "help": "percent of documents (by a stable hash of their text) in the val split"})
    test_percent: float = field(default=1.0, metadata={
        "help": "percent of documents (by a stable hash of their text) in the test split"})
    shuffle_buffer: int = field(default=8192, metadata={
        "help": "training documents shuffled together in memory (bounded, seeded shuffle; 1 = file order)"})
    num_workers: int = field(default=0, metadata={
        "help": "loader processes per rank (0 = one background thread in the training process)"})
    prefetch: int = field(default=8, metadata={"help": "batches prepared ahead of the consumer (0 = none)"})
    max_doc_chars: int = field(default=1_000_000, metadata={
        "help": "longer documents are skipped as absurd (counted as too_long)"})
    txt_mode: str = field(default="file", metadata={
        "help": ".txt files: one document per file, or per blank-line-separated paragraph",
        "choices": ["file", "paragraph"]})
    retries: int = field(default=5, metadata={
        "help": "retries, with exponential backoff, of a failed remote read before its file is skipped"})
    max_warnings: int = field(default=5, metadata={
        "help": "warnings printed per skip reason (all skips are still counted)"})

    def __post_init__(self) -> None:
        for name in ("val_percent", "test_percent"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise SlmError(f"{name} must be between 0 and 100, got {getattr(self, name)}")
        if self.val_percent + self.test_percent >= 100.0:
            raise SlmError(f"val_percent + test_percent must leave some training data, got "
                           f"{self.val_percent} + {self.test_percent}")
        for name in ("shuffle_buffer", "max_doc_chars"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("num_workers", "prefetch", "retries", "max_warnings"):
            if getattr(self, name) < 0:
                raise SlmError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.txt_mode not in ("file", "paragraph"):
            raise SlmError(f"txt_mode must be 'file' or 'paragraph', got {self.txt_mode!r}")
        if not self.text_field:
            raise SlmError("text_field must not be empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sequence_fields(self) -> dict:
        """The fields a saved stream position depends on."""
        return {k: getattr(self, k) for k in _SEQUENCE_FIELDS}

    def sequence_fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.sequence_fields(), sort_keys=True).encode()).hexdigest()[:16]
