"""Runs generation requests for the server: each on its own worker thread, with its own KV
cache and sampling state, a bounded number at a time.

Design choice: no batching across requests. Each request runs `slm.generate.generate` (its own
KV cache, its own seeded torch.Generator) on a thread of a pool of `max_concurrency` threads,
so concurrent requests can never mix tokens and a greedy request gives the same text alone or
beside others. torch releases the GIL inside its kernels, so the event loop keeps serving
while tokens are computed. Batching several requests into one forward pass would raise
throughput (batch-1 decoding is bound by memory bandwidth), but needs a ragged-batch KV cache
and attention path in model.py; see bench/README.md for how throughput scales without it.

Each request computes with a fixed number of torch threads (`threads`, set on its worker
thread: OpenMP and MKL thread counts are per thread). Fixed, because a different thread count
changes the float summation order and so, on near ties, greedy tokens: a request's output
must not depend on what else is running. By default the server divides torch's threads among
the concurrent requests, so several requests use the cores side by side instead of
oversubscribing them (OpenMP teams spin-waiting on each other's cores).

Requests beyond `max_concurrency` wait (at most `max_queue` of them; more are refused as
busy). A cancelled request (client gone, server shutting down) stops at its next token and
frees its slot. Text is assembled here: incremental decoding and stop strings, so a stop
string split across tokens is still found and never streamed.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from slm.generate import GenerationStats, SamplingConfig, generate


@dataclass
class Job:
    prompt_ids: list[int]
    sampling: SamplingConfig
    stop: list[str]


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "cancelled"


class Busy(Exception):
    """Every slot is taken and the waiting line is full."""


class StopStrings:
    """Cuts generated text at the first stop string, holding back any tail that could be the
    start of one, so streamed text never contains (part of) a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Engine:
    def __init__(self, model, tokenizer, max_concurrency: int = 4, max_queue: int = 64, threads: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.threads = threads or torch.get_num_threads()
        self.active = 0
        self.waiting = 0
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="slm-generate")
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop
        self._closing = threading.Event()

    def _run(self, job: Job, emit, cancel: threading.Event) -> Result:
        """Worker thread: generate, decode incrementally, apply stop strings, emit text."""
        torch.set_num_threads(self.threads)  # this thread's OpenMP/MKL team
        tok = self.tokenizer
        stats = GenerationStats()
        decoder = tok.stream_decoder()
        stops = StopStrings(job.stop)
        pieces: list[str] = []

        def put(text: str) -> None:
            if text:
                pieces.append(text)
                emit(text)

        finish = None
        for t in generate(self.model, job.prompt_ids, job.sampling, stop_ids=tok.stop_ids,
                          vocab_limit=tok.n_vocab, stats=stats):
            if cancel.is_set() or self._closing.is_set():
                finish = "cancelled"
                break
            text, hit = stops.feed(decoder.add(t))
            put(text)
            if hit:
                finish = "stop"
                break
        if finish is None:
            text, hit = stops.feed(decoder.flush())
            put(text)
            if not hit:
                put(stops.flush())
            finish = "stop" if hit else stats.finish_reason
        return Result("".join(pieces), stats.prompt_tokens, stats.new_tokens, finish)

    async def stream(self, job: Job) -> AsyncIterator[str | Result]:
        """Text pieces as they are generated, then the `Result`. Closing the iterator early
        (or cancelling its task) stops the generation at its next token."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        if self._closing.is_set():
            raise Busy("the server is shutting down")
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise Busy(f"{self.active} requests are running and {self.waiting} waiting; retry later")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                cancel.set()

        def work() -> None:
            try:
                emit(self._run(job, emit, cancel))
            except BaseException as e:  # handed to the request's task, which raises it
                emit(e)

        def release(_) -> None:
            self.active -= 1
            self._slots.release()

        self.active += 1
        loop.run_in_executor(self._pool, work).add_done_callback(release)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Result):
                    return
        finally:
            cancel.set()

    async def complete(self, job: Job) -> Result:
        async for item in self.stream(job):
            if isinstance(item, Result):
                return item
        raise RuntimeError("generation ended without a result")

    def close(self) -> None:
        """Stop every running generation at its next token and wait for the threads."""
        self._closing.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
