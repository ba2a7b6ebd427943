"""Looking at a source before and instead of training on it: check, inspect, bench.

`check_source` is what `slm train` calls first: it fails with an SlmError naming the problem
(missing path, no file with the text field, no usable document) instead of failing halfway
through a run. `inspect_source` and `bench_source` back `slm data inspect` and `slm data bench`.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np

from slm.data.config import DataConfig
from slm.data.documents import SPLITS
from slm.data.producer import Producer
from slm.data.readers import FileSkip, make_reader
from slm.data.sources import Source, resolve_source
from slm.errors import SlmError
from slm.memory import peak_rss_bytes

_FIELD_REASONS = {"missing_column", "missing_field", "wrong_column_type"}


def _columns(cfg: DataConfig, source: Source, limit: int = 5) -> list[str]:
    """Columns of the first readable parquet file among the first few (for messages)."""
    for shard in [s for s in source.shards if s.format == "parquet"][:limit]:
        reader = make_reader(shard, cfg.text_field, cfg.max_doc_chars, cfg.txt_mode)
        try:
            reader.open()
            return reader.columns()
        except FileSkip:
            return reader.columns() if reader.pf is not None else []
        except Exception:
            continue
        finally:
            reader.close()
    return []


def _describe_skips(counts: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "nothing"


def check_source(cfg: DataConfig, split: str | None = None, source: Source | None = None) -> dict:
    """Fail early unless the source exists and has at least one usable document (in `split`, if
    given). Reads only until it finds one. Returns {"source", "description", "files", "first_document"}."""
    source = source or resolve_source(cfg.source, cfg.retries)
    producer = Producer(cfg, source, split, loop=False, shuffle=False)
    for f, text in producer.documents():
        return {"source": source.spec, "description": source.description, "files": len(source.shards),
                "first_document": source.shards[f].name}
    counts = producer.skips.counts
    where = f"the {split} split of " if split else ""
    if counts and set(counts) <= _FIELD_REASONS | {"unreadable_file"} and set(counts) & _FIELD_REASONS:
        cols = _columns(cfg, source)
        raise SlmError(f"no file of {cfg.source!r} has a text field {cfg.text_field!r}"
                       f"{' (columns: ' + ', '.join(cols) + ')' if cols else ''}; name the column holding the "
                       f"text with --text-field")
    raise SlmError(f"{where}{cfg.source!r} has no usable documents ({len(source.shards)} file(s); skipped: "
                   f"{_describe_skips(counts)})")


def inspect_source(cfg: DataConfig, max_docs: int = 20_000, sample_chars: int = 400) -> dict:
    """Files, columns, a sample document, document/token statistics and split sizes over the
    first `max_docs` documents (in file order), and skipped input by reason."""
    source = resolve_source(cfg.source, cfg.retries)
    producer = Producer(cfg, source, None, loop=False, shuffle=False)
    splits: Counter = Counter()
    chars: list[int] = []
    batch: list[str] = []
    lengths: list[np.ndarray] = []
    sample = None
    truncated = False

    def flush():
        if batch:
            _, ends = producer.encode(batch)
            lengths.append(np.diff(ends, prepend=0) - 1)  # without the <|endoftext|> separator
            batch.clear()

    for _, text in producer.documents():
        if len(chars) == max_docs:
            truncated = True
            break
        if sample is None:
            sample = text[:sample_chars] + ("..." if len(text) > sample_chars else "")
        splits[producer.splitter.split_of(text)] += 1
        chars.append(len(text))
        batch.append(text)
        if len(batch) == 512:
            flush()
    flush()
    toks = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return {
        "source": source.spec,
        "description": source.description,
        "files": len(source.shards),
        "file_list": [{"name": s.name, "format": s.format + (f"+{s.compression}" if s.compression else ""),
                       "bytes": s.size} for s in source.shards[:20]],
        "columns": _columns(cfg, source),
        "text_field": cfg.text_field,
        "sample": sample,
        "documents": len(chars),
        "tokens": int(toks.sum()),
        "chars": int(sum(chars)),
        "tokens_per_document": _summary(toks),
        "splits": {s: splits[s] for s in SPLITS},
        "split_percent": {"val": cfg.val_percent, "test": cfg.test_percent},
        "skipped": dict(sorted(producer.skips.counts.items())),
        "truncated": truncated,
    }


def _summary(x: np.ndarray) -> dict:
    if not len(x):
        return {"mean": 0, "median": 0, "p95": 0, "max": 0}
    return {"mean": round(float(x.mean()), 1), "median": float(np.median(x)),
            "p95": float(np.percentile(x, 95)), "max": int(x.max())}


def bench_source(cfg: DataConfig, seconds: float = 10.0, block_size: int = 1024, batch_size: int = 8,
                 split: str = "train", max_tokens: int | None = None, seed: int = 0) -> dict:
    """End-to-end loader throughput: TokenStream batches (read, split, shuffle, tokenize, pack,
    tensors) for `seconds` after the first batch, which is timed separately as start-up."""
    from slm.data.stream import TokenStream

    t0 = time.perf_counter()
    stream = TokenStream(cfg, split=split, block_size=block_size, batch_size=batch_size, loop=True, seed=seed)
    it = iter(stream)
    next(it)
    startup = time.perf_counter() - t0
    before = stream.stats
    per_batch = block_size * batch_size
    batches = 0
    t1 = time.perf_counter()
    while True:
        next(it)
        batches += 1
        elapsed = time.perf_counter() - t1
        if elapsed >= seconds or (max_tokens and batches * per_batch >= max_tokens):
            break
    after = stream.stats
    it.close()
    docs = after.get("docs", 0) - before.get("docs", 0)
    chars = after.get("chars", 0) - before.get("chars", 0)
    return {
        "source": cfg.source,
        "split": split,
        "block_size": block_size,
        "batch_size": batch_size,
        "num_workers": cfg.num_workers,
        "seconds": round(elapsed, 3),
        "startup_s": round(startup, 3),
        "batches": batches,
        "tokens": batches * per_batch,
        "tokens_per_s": round(batches * per_batch / elapsed),
        "docs_per_s": round(docs / elapsed, 1),
        "mb_per_s": round(chars / elapsed / 1e6, 2),
        "passes": stream.pass_index + 1,
        # this process, plus the loader processes' peaks when there are any
        "peak_rss_bytes": peak_rss_bytes() + after.get("worker_peak_rss_bytes", 0),
        "skipped": dict(sorted(stream.skipped.items())),
    }
