"""`TokenStream`: (x, y) batches of packed tokens from a source, resumable bit for bit.

Each rank runs one stream; the stream runs `num_workers` loader processes (or, with 0, one
background thread), each a `Producer` for its own consumer index rank * workers + w, and hands
out their batches round robin. Batches are prepared `prefetch` ahead, so training does not
wait on tokenization.

`state_dict()` is the position right after the last batch the caller received (not what the
background producers have made ahead): every worker's position and whose turn is next. It is a
small JSON-serializable dict; `load_state_dict()` makes the next `iter()` continue exactly
there, re-reading only the current shuffle window of each worker.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import queue
import threading
from collections import Counter

import numpy as np
import torch

from slm.data.config import DataConfig
from slm.data.producer import Producer, put_until_stopped, run_worker, start_position
from slm.data.sources import Source, resolve_source
from slm.errors import SlmError

STATE_VERSION = 1


class TokenStream:
    """Iterate for (x, y) int64 tensors of shape (batch_size, block_size); y is x shifted by one."""

    def __init__(self, cfg: DataConfig, split: str = "train", block_size: int = 256, batch_size: int = 8,
                 rank: int = 0, world_size: int = 1, loop: bool = True, seed: int = 0, shuffle: bool | None = None,
                 source: Source | None = None):
        if block_size < 1 or batch_size < 1:
            raise SlmError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        if not 0 <= rank < world_size:
            raise SlmError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if seed < 0:
            raise SlmError(f"seed must be >= 0, got {seed}")
        self.cfg, self.split, self.loop, self.seed, self.shuffle = cfg, split, loop, seed, shuffle
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.source = source or resolve_source(cfg.source, cfg.retries)
        self.workers = max(1, cfg.num_workers)
        self._state = {"positions": [start_position() for _ in range(self.workers)], "next": 0, "batches": 0}
        self._progress: list[dict] = [{} for _ in range(self.workers)]
        self._stop: threading.Event | None = None
        Producer(cfg, self.source, split)  # validates the split before any thread starts

    # -- what the trainer reads ------------------------------------------------------------

    @property
    def pass_index(self) -> int:
        """Which pass over the split the next batch comes from (0-based; for several workers,
        the lowest)."""
        return min(w["pass"] for w in self._state["positions"])

    @property
    def skipped(self) -> Counter:
        """Rows/files skipped so far (first pass only) by reason, as far as the loader has read."""
        total: Counter = Counter()
        for w, p in zip(self._state["positions"], self._progress):
            total.update(p.get("skipped", w["skipped"]))
        return total

    @property
    def stats(self) -> dict:
        """Loader counters since this object started: rows read, docs and chars tokenized, tokens."""
        total: Counter = Counter()
        for p in self._progress:
            total.update({k: v for k, v in p.items() if k != "skipped"})
        return dict(total)

    # -- state -----------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"split": self.split, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "workers": self.workers, "shuffle": self.shuffle, "source": self.source.fingerprint(),
                "config": self.cfg.sequence_fingerprint()}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), **copy.deepcopy(self._state)}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise SlmError("not a token stream state (or from another slm version)")
        differ = [k for k, v in self._identity().items() if state.get(k) != v]
        if differ:
            hint = " (the data files changed since the state was saved)" if "source" in differ else ""
            raise SlmError(f"the saved data position does not fit this stream: {', '.join(differ)} differ{hint}; "
                           f"resume with the same data source and settings")
        self._state = {"positions": copy.deepcopy(state["positions"]), "next": state["next"], "batches": state["batches"]}
        self._progress = [{} for _ in range(self.workers)]

    # -- iteration -------------------------------------------------------------------------

    def _producer(self, w: int) -> Producer:
        return Producer(self.cfg, self.source, self.split, consumer=self.rank * self.workers + w,
                        consumers=self.world_size * self.workers, seed=self.seed, loop=self.loop,
                        shuffle=self.shuffle, position=self._state["positions"][w])

    def __iter__(self):
        self.close()
        self._stop = stop = threading.Event() if self.cfg.num_workers == 0 else mp.get_context("spawn").Event()
        if self.cfg.num_workers == 0:
            items = self._thread_items(stop) if self.cfg.prefetch else self._local_items()
        else:
            items = self._process_items(stop)
        return self._batches(items)

    def _batches(self, items):
        """Turn (worker, tokens, position, progress) items into (x, y) and record the position."""
        B, T = self.batch_size, self.block_size
        for w, flat, position, progress in items:
            n = len(self._state["positions"])
            self._state["positions"][w] = position
            self._state["next"] = (w + 1) % n
            self._state["batches"] += 1
            self._progress[w] = progress
            t = torch.from_numpy(flat.astype(np.int64))
            yield t[:-1].view(B, T), t[1:].view(B, T)

    def _local_items(self):
        for flat, position, progress in self._producer(0).batches(self.batch_size * self.block_size):
            yield 0, flat, position, progress

    def _thread_items(self, stop: threading.Event):
        q: queue.Queue = queue.Queue(maxsize=self.cfg.prefetch)
        producer = self._producer(0)
        n = self.batch_size * self.block_size

        def run():
            try:
                for item in producer.batches(n):
                    if not put_until_stopped(q, ("batch", *item), stop):
                        return
                put_until_stopped(q, ("end",), stop)
            except BaseException as e:  # handed to the consumer, who raises it
                put_until_stopped(q, ("error", e), stop)

        thread = threading.Thread(target=run, name="slm-data", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item[0] == "end":
                    return
                if item[0] == "error":
                    raise item[1]
                yield (0, *item[1:])
        finally:
            stop.set()
            thread.join(timeout=5)

    def _process_items(self, stop):
        """Round robin over worker processes, skipping those whose finite stream has ended."""
        ctx = mp.get_context("spawn")  # safe with torch's threads, and what CUDA needs
        n = self.batch_size * self.block_size
        queues, procs = [], []
        for w in range(self.workers):
            q = ctx.Queue(maxsize=max(1, self.cfg.prefetch))
            p = ctx.Process(target=run_worker, name=f"slm-data-{w}", daemon=True,
                            args=(self.cfg, self.source, self.split, self.rank * self.workers + w,
                                  self.world_size * self.workers, self.seed, self.loop, self.shuffle,
                                  self._state["positions"][w], n, q, stop))
            p.start()
            queues.append(q)
            procs.append(p)
        live = [True] * self.workers
        w = self._state["next"]
        try:
            while any(live):
                if not live[w]:
                    w = (w + 1) % self.workers
                    continue
                item = _get(queues[w], procs[w])
                if item[0] == "end":
                    live[w] = False
                elif item[0] == "error":
                    raise item[1]
                else:
                    yield (w, *item[1:])
                w = (w + 1) % self.workers
        finally:
            stop.set()
            for q in queues:  # unblock workers waiting to put
                while True:
                    try:
                        q.get_nowait()
                    except (queue.Empty, OSError, ValueError):
                        break
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
                    p.join()

    def close(self) -> None:
        """Stop background producers (iterators made earlier end)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None


def _get(q, proc, poll: float = 1.0):
    while True:
        try:
            return q.get(timeout=poll)
        except queue.Empty:
            if not proc.is_alive():
                raise SlmError(f"data loader process {proc.name} died (exit code {proc.exitcode})") from None
