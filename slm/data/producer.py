"""One consumer's token pipeline: files -> documents of a split -> shuffle window -> tokens -> packed windows.

A *consumer* is one (rank, loader worker) pair; consumer k of N owns unit u of file f when
(f + u) % N == k, so N consumers together read every unit exactly once per pass, whatever the
file layout. Each pass visits the files in a seeded order (and a parquet file's row groups in a
seeded order), fills windows of `shuffle_buffer` documents, permutes each window with a seed
derived from (seed, pass, consumer, window), and tokenizes documents in that order, each
followed by <|endoftext|>. The token stream is cut into windows of n+1 tokens advancing by n
(x = first n, y = last n: every token is a target exactly once, no padding).

The position between two batches is small and exact: where the current shuffle window starts
(pass, window, file, unit, row, byte offset), which document of the permuted window the next
token belongs to, how many of its tokens are already used, and the skip counts at the window
start. Restarting from it re-reads one window (bounded by the buffer size, not by how far the
stream had got) and re-tokenizes from that document on. This module knows nothing of torch.
"""

from __future__ import annotations

import queue
import time
import traceback
from collections import Counter, deque
from typing import Iterator

import numpy as np

from slm.data.config import DataConfig
from slm.data.documents import SPLITS, SkipLog, Splitter, documents
from slm.data.readers import FileSkip, make_reader
from slm.data.sources import Source, backoff_delay, is_transient, with_retries
from slm.errors import SlmError
from slm.memory import peak_rss_bytes
from slm.tokenizer import EOT, get_tokenizer

# Characters per tokenizer call: long enough to amortize the call, short enough that the GIL,
# which tiktoken holds while encoding, is never taken from a training thread for more than ~5 ms.
CHUNK_CHARS = 1 << 16
NO_SHUFFLE_WINDOW = 256  # unshuffled splits still read in windows: small ones start fast
CURSOR = ("pass", "window", "file", "unit", "row", "offset")


def start_position() -> dict:
    return {"pass": 0, "window": 0, "file": 0, "unit": 0, "row": 0, "offset": 0, "doc": 0, "token": 0,
            "skipped": {}}


class _Window:
    __slots__ = ("cursor", "skipped", "docs")

    def __init__(self, cursor: dict, skipped: dict, docs: list[str]):
        self.cursor, self.skipped, self.docs = cursor, skipped, docs


class _Segment:
    """Tokens of consecutive documents of one window; tokens[0] is token `token` of document `doc`;
    ends[i] is where the i-th document from there ends, relative to tokens[0]."""

    __slots__ = ("window", "doc", "token", "tokens", "ends")

    def __init__(self, window: _Window, doc: int, token: int, tokens: np.ndarray, ends: np.ndarray):
        self.window, self.doc, self.token, self.tokens, self.ends = window, doc, token, tokens, ends

    def position(self) -> dict:
        return {**self.window.cursor, "doc": self.doc, "token": self.token, "skipped": self.window.skipped}

    def consume(self, n: int) -> None:
        k = int(np.searchsorted(self.ends, n, side="right"))  # documents finished within the n tokens
        if k:
            self.doc += k
            self.token = n - int(self.ends[k - 1])
        else:
            self.token += n
        self.tokens, self.ends = self.tokens[n:], self.ends[k:] - n


class Producer:
    """Batches of packed tokens for consumer `consumer` of `consumers`, from `position` on."""

    def __init__(self, cfg: DataConfig, source: Source, split: str | None = "train", consumer: int = 0,
                 consumers: int = 1, seed: int = 0, loop: bool = True, shuffle: bool | None = None,
                 position: dict | None = None):
        if split is not None and split not in SPLITS:
            raise SlmError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        self.cfg, self.source, self.split = cfg, source, split
        self.consumer, self.consumers, self.seed, self.loop = consumer, consumers, seed, loop
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.window_size = cfg.shuffle_buffer if self.shuffle else NO_SHUFFLE_WINDOW
        self.splitter = Splitter(cfg.val_percent, cfg.test_percent)
        self.lo, self.hi = self.splitter.bounds(split) if split else (0, 1 << 64)  # None: every document
        self.position = {**start_position(), **(position or {})}
        self.skips = SkipLog(cfg.max_warnings, self.position["skipped"])
        self.stats: Counter = Counter()  # rows read, docs and chars tokenized, tokens delivered
        self.encoding = get_tokenizer().encoding
        self.eot = get_tokenizer().eot_id

    # -- order and ownership ---------------------------------------------------------------

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def owns(self, file_index: int, unit: int) -> bool:
        return (file_index + unit) % self.consumers == self.consumer

    def file_order(self, pass_index: int) -> list[int]:
        n = len(self.source.shards)
        return self._rng(pass_index, 0).permutation(n).tolist() if self.shuffle else list(range(n))

    def unit_order(self, pass_index: int, file_index: int, n_units: int) -> list[int]:
        owned = [u for u in range(n_units) if self.owns(file_index, u)]
        return self._rng(pass_index, 1, file_index).permutation(owned).tolist() if self.shuffle else owned

    # -- reading ---------------------------------------------------------------------------

    def _file_rows(self, p: int, fp: int, f: int, unit: int, row: int, offset: int):
        """(file position, unit, first row, unit offset, values, where) of file f from the given
        position; where(i) names the i-th value's place for warnings.
        Remote read errors are retried from the last position delivered; permanent ones skip
        the row group (parquet) or the rest of the file."""
        shard = self.source.shards[f]
        cfg, remote = self.cfg, not shard.is_local
        reader = make_reader(shard, cfg.text_field, cfg.max_doc_chars, cfg.txt_mode)
        try:
            with_retries(reader.open, f"opening {shard.name}", cfg.retries, remote)
        except FileSkip as e:
            self.skips.skip(e.reason, shard.name, str(e))
            reader.close()
            return
        except Exception as e:
            self.skips.skip("unreadable_file", shard.name, f"{type(e).__name__}: {e}")
            reader.close()
            return
        n_units = reader.units()
        order = self.unit_order(p, f, n_units) if n_units is not None else None
        attempt = 0
        try:
            while True:
                try:
                    if order is not None:
                        batches = reader.rows(order, unit, row)
                    else:
                        batches = reader.rows(lambda u: self.owns(f, u), unit, row, offset)
                    for u, r, off, values in batches:
                        self.stats["rows"] += len(values)
                        yield fp, u, r, off, values, lambda i: f"{shard.name} {reader.where(u, r + i)}"
                        unit, row, offset, attempt = u, r + len(values), off, 0
                    return
                except Exception as e:
                    if remote and attempt < cfg.retries and is_transient(e):
                        time.sleep(backoff_delay(attempt))
                        attempt += 1
                        reader.close()
                        reader = make_reader(shard, cfg.text_field, cfg.max_doc_chars, cfg.txt_mode)
                        try:
                            with_retries(reader.open, f"reopening {shard.name}", cfg.retries, remote)
                        except Exception as e2:
                            self.skips.skip("read_error", f"rest of {shard.name}", f"{type(e2).__name__}: {e2}")
                            return
                        continue
                    failed = getattr(reader, "current", None)
                    if order is not None and failed is not None and failed < len(order):
                        self.skips.skip("unreadable_row_group", f"{shard.name} row group {order[failed]}",
                                        f"{type(e).__name__}: {e}")
                        unit, row = failed + 1, 0
                        continue
                    self.skips.skip("read_error", f"rest of {shard.name}", f"{type(e).__name__}: {e}")
                    return
        finally:
            reader.close()

    def _rows(self, c: dict, order: list[int]):
        for fp in range(c["file"], len(order)):
            start = (c["unit"], c["row"], c["offset"]) if fp == c["file"] else (0, 0, 0)
            yield from self._file_rows(c["pass"], fp, order[fp], *start)

    def documents(self) -> Iterator[tuple[int, str]]:
        """(file index, text) of this consumer's documents, in read order, one pass (for inspection)."""
        self.skips.counting = True
        order = self.file_order(0)
        for fp, _, _, _, values, where in self._rows({k: 0 for k in CURSOR}, order):
            for _, text in documents(values, self.cfg.max_doc_chars, self.skips, where, self.lo, self.hi):
                yield order[fp], text

    def _windows(self, c: dict) -> Iterator[_Window]:
        """Windows of up to window_size documents of the split, permuted, from cursor c on."""
        W, max_chars = self.window_size, self.cfg.max_doc_chars
        while True:
            p = c["pass"]
            self.skips.counting = p == 0
            fresh = all(c[k] == 0 for k in CURSOR[1:])
            found = 0
            order = self.file_order(p)
            docs: list[str] = []
            start, start_skipped = dict(c), dict(self.skips.counts)
            for fp, u, r, off, values, where in self._rows(c, order):
                for i, text in documents(values, max_chars, self.skips, where, self.lo, self.hi):
                    docs.append(text)
                    if len(docs) == W:
                        yield self._window(start, start_skipped, docs)
                        found += W
                        start = {"pass": p, "window": start["window"] + 1, "file": fp, "unit": u,
                                 "row": r + i + 1, "offset": off}
                        start_skipped, docs = dict(self.skips.counts), []
            if docs:
                found += len(docs)
                yield self._window(start, start_skipped, docs)
            if not self.loop:
                return
            if fresh and not found:
                raise SlmError(self._nothing_found())
            c = {"pass": p + 1, "window": 0, "file": 0, "unit": 0, "row": 0, "offset": 0}

    def _nothing_found(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skips.counts.items())) or "nothing"
        msg = (f"no usable documents in the {self.split} split of {self.source.spec!r} "
               f"({len(self.source.shards)} file(s); skipped: {skipped})")
        if self.consumers > 1:
            msg += (f" for loader {self.consumer} of {self.consumers} (ranks x workers): each needs its own share of "
                    f"the files' units (parquet row groups, blocks of 1024 lines); use fewer workers or more files")
        return msg + f"; check the path, --text-field ({self.cfg.text_field!r}) and the split percentages"

    def _window(self, cursor: dict, skipped: dict, docs: list[str]) -> _Window:
        if self.shuffle and len(docs) > 1:
            perm = self._rng(cursor["pass"], 2, self.consumer, self.consumers, cursor["window"]).permutation(len(docs))
            docs = [docs[k] for k in perm]
        return _Window(cursor, skipped, docs)

    # -- tokens ----------------------------------------------------------------------------

    def encode(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of the documents, each followed by <|endoftext|>, and where each one ends.
        One tokenizer call for many documents: tiktoken splits at the special token first, so
        this equals encoding each document on its own (tested)."""
        tokens = self.encoding.encode_to_numpy(EOT.join(docs + [""]), allowed_special={EOT}, disallowed_special=())
        ends = np.flatnonzero(tokens == self.eot) + 1
        if len(ends) != len(docs):  # a document spells "<|endoftext|>" itself: that stays plain text
            parts = [self.encoding.encode_to_numpy(d, disallowed_special=()) for d in docs]
            tokens = np.concatenate([np.append(t, np.uint32(self.eot)) for t in parts])
            ends = np.cumsum([len(t) + 1 for t in parts])
        return tokens, ends

    def _segments(self) -> Iterator[_Segment]:
        pos = self.position
        skip_doc, skip_tokens = pos["doc"], pos["token"]
        for win in self._windows({k: pos[k] for k in CURSOR}):
            docs, i, drop = win.docs, skip_doc, skip_tokens
            skip_doc = skip_tokens = 0
            while i < len(docs):
                j, chars = i, 0
                while j < len(docs) and chars < CHUNK_CHARS:
                    chars += len(docs[j])
                    j += 1
                tokens, ends = self.encode(docs[i:j])
                self.stats["docs"] += j - i
                self.stats["chars"] += chars
                if drop:
                    tokens, ends = tokens[drop:], ends - drop
                yield _Segment(win, i, drop, tokens, ends)
                i, drop = j, 0
            win.docs = None  # the texts are tokenized; keep only the cursor

    def batches(self, n: int) -> Iterator[tuple[np.ndarray, dict, dict]]:
        """(n+1 tokens as uint32, position after this batch, progress) until the split ends
        (never, when looping). A finite stream drops its last, incomplete batch."""
        pending: deque[_Segment] = deque()
        have = 0
        for seg in self._segments():
            if not len(seg.tokens):
                continue
            pending.append(seg)
            have += len(seg.tokens)
            while have > n:
                out = np.empty(n + 1, dtype=np.uint32)
                filled = 0
                for s in pending:
                    take = min(len(s.tokens), n + 1 - filled)
                    out[filled:filled + take] = s.tokens[:take]
                    filled += take
                    if filled == n + 1:
                        break
                left = n  # advance by n: the last token is also the first of the next batch
                while left:
                    s = pending[0]
                    if len(s.tokens) <= left:
                        left -= len(s.tokens)
                        pending.popleft()
                    else:
                        s.consume(left)
                        left = 0
                have -= n
                self.stats["tokens"] += n
                self.position = pending[0].position()
                yield out, self.position, self.progress()

    def progress(self) -> dict:
        return {"skipped": dict(self.skips.counts), **self.stats}


# -- background producers ------------------------------------------------------------------
# Messages to the consumer: ("batches", [(tokens, position, progress), ...]), ("end",) or
# ("error", exception). Batches travel in groups of about GROUP_TOKENS tokens: one hand-over
# (a thread wake-up, or a pickled message) per group rather than per batch. When the loader is
# the bottleneck and the CPU is shared, per-batch wake-ups cost up to a third of the throughput.
GROUP_TOKENS = 1 << 16


def group_size(n_tokens: int, prefetch: int) -> int:
    """Batches per hand-over: about GROUP_TOKENS tokens, never more than `prefetch`."""
    return max(1, min(prefetch, GROUP_TOKENS // n_tokens))


def grouped(batches, k: int):
    group = []
    for b in batches:
        group.append(b)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def put_until_stopped(q, item, stop, parent=None) -> bool:
    """Put into a bounded queue, giving up (False) once `stop` is set or the parent process is gone
    (a SIGKILLed trainer does not stop its daemon processes)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            if parent is not None and not parent.is_alive():
                return False
    return False


def run_worker(cfg, source, split, consumer, consumers, seed, loop, shuffle, position, n, k, q, stop) -> None:
    """A loader process (it never imports torch): groups of k batches for one consumer until stopped
    or the split ends."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    try:
        producer = Producer(cfg, source, split, consumer, consumers, seed, loop, shuffle, position)
        for group in grouped(producer.batches(n), k):
            peak = peak_rss_bytes()
            for _, _, progress in group:
                progress["worker_peak_rss_bytes"] = peak  # the stream sums it over workers
            if not put_until_stopped(q, ("batches", group), stop, parent):
                q.cancel_join_thread()  # stopping: unsent batches may be dropped, don't wait to flush them
                return
        put_until_stopped(q, ("end",), stop, parent)
    except SlmError as e:
        put_until_stopped(q, ("error", e), stop, parent)
    except BaseException:
        error = RuntimeError(f"data loader process failed:\n{traceback.format_exc()}")
        put_until_stopped(q, ("error", error), stop, parent)
