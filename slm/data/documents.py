"""Which raw values are documents, and which split each document belongs to.

A document is a non-empty string of at most `max_doc_chars` characters. Everything else is
skipped and counted by reason (`SkipLog`), with a bounded number of warnings. The split is a
pure function of the text (a stable 64-bit BLAKE2b hash), so a document lands in the same split
on every run, rank and worker count, and wherever it sits in the corpus.

Skip reasons, and what each counts:
  files:      unreadable_file, missing_column, wrong_column_type
  row groups: unreadable_row_group (parquet data that fails to decode)
  rows:       null_text, empty_text, not_string, too_long, invalid_utf8, invalid_json,
              not_an_object, missing_field (JSONL), read_error (rest of a file after an I/O error)
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter

from slm.data.readers import BLANK, Bad

log = logging.getLogger("slm.data")
SPLITS = ("train", "val", "test")


class SkipLog:
    """Counts skipped input by reason and prints the first `max_warnings` of each reason."""

    def __init__(self, max_warnings: int = 5, counts: dict | None = None):
        self.max_warnings = max_warnings
        self.counts: Counter = Counter(counts or {})
        self.counting = True  # off for passes after the first: the same bad rows again
        self._warned: Counter = Counter()

    def skip(self, reason: str, where, detail: str = "") -> None:
        """Count one skipped file/row group/row; `where` may be a function (called only to warn)."""
        if not self.counting:
            return
        self.counts[reason] += 1
        if self._warned[reason] < self.max_warnings:
            self._warned[reason] += 1
            last = self._warned[reason] == self.max_warnings
            log.warning("slm data: skipped %s: %s%s%s", where() if callable(where) else where, reason,
                        f" ({detail})" if detail else "",
                        f"; further '{reason}' skips are counted, not shown" if last else "")


class Splitter:
    """Maps a document's text to train/val/test by a stable hash, and filters values for one split."""

    def __init__(self, val_percent: float, test_percent: float):
        full = 1 << 64
        self.val_end = int(full * val_percent / 100)
        self.test_end = int(full * (val_percent + test_percent) / 100)

    @staticmethod
    def hash64(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")

    def split_of(self, text: str) -> str:
        h = self.hash64(text)
        return "val" if h < self.val_end else "test" if h < self.test_end else "train"

    def bounds(self, split: str) -> tuple[int, int]:
        """[lo, hi) of the hash values of a split."""
        return {"val": (0, self.val_end), "test": (self.val_end, self.test_end),
                "train": (self.test_end, 1 << 64)}[split]


def judge(value, max_chars: int) -> str | None:
    """None if the value is a document, else the skip reason."""
    if type(value) is str:
        if len(value) > max_chars:
            return "too_long"
        if not value or value.isspace():
            return "empty_text"
        return None
    if value is None:
        return "null_text"
    if isinstance(value, Bad):
        return value.reason
    return "not_string"


def documents(values: list, max_chars: int, skips: SkipLog, where, lo: int = 0, hi: int = 1 << 64):
    """(index, text) of the values that are documents whose hash is in [lo, hi); the others are
    counted in `skips` (except blank JSONL lines and documents of other splits)."""
    every = lo == 0 and hi == 1 << 64
    blake2b = hashlib.blake2b
    for i, v in enumerate(values):
        if type(v) is str and 0 < len(v) <= max_chars and not v.isspace():
            if every or lo <= int.from_bytes(blake2b(v.encode("utf-8"), digest_size=8).digest(), "big") < hi:
                yield i, v
        elif v is not BLANK:
            skips.skip(judge(v, max_chars), lambda: where(i))
