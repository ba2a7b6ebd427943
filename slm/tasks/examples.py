"""Fine-tuning data: read rows, recognize their layout, normalize them to `Example`s, split.

Sources: a JSONL file (or a `.json` list), a parquet file (local or any fsspec URL), or a
Hugging Face dataset `hf:NAME[:SPLIT]` (a hub id, or a local directory laid out like one).

Layouts, detected from the columns of the first row or chosen with `--format`:

| format             | columns                                                   |
|--------------------|-----------------------------------------------------------|
| gretel             | sql_context, sql_prompt, sql (gretelai/synthetic_text_to_sql) |
| bird               | schema, question, SQL, optional evidence and db_id (BIRD/Spider) |
| sql-create-context | context, question, answer (b-mc2/sql-create-context)      |
| chat               | messages: [{role, content}, ...], the last one the assistant's |
| prompt-completion  | prompt, completion                                        |

Unreadable lines and rows missing a field are skipped and counted, never fatal. This module
knows nothing about tokenizers or prompts (see prompting.py and encode.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from slm.errors import SlmError


@dataclass
class Example:
    completion: str  # what the model learns to write (the gold SQL for SQL formats)
    question: str | None = None  # SQL formats: the question, its context and hint
    context: str | None = None  # CREATE TABLE / INSERT statements
    evidence: str | None = None
    group: str | None = None  # database id, when the data names one
    messages: list[dict] | None = None  # chat / prompt-completion: the prompt's messages

    @property
    def is_sql(self) -> bool:
        return self.question is not None

    def key(self) -> str:
        """A content hash: decides the held-out split independently of row order."""
        payload = [self.question, self.context, self.evidence, self.messages, self.completion]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# format -> (required columns, optional columns)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gretel": (("sql_context", "sql_prompt", "sql"), ()),
    "bird": (("schema", "question", "SQL"), ("evidence", "db_id")),
    "sql-create-context": (("context", "question", "answer"), ()),
    "chat": (("messages",), ()),
    "prompt-completion": (("prompt", "completion"), ()),
}


@dataclass
class LoadStats:
    rows: int = 0
    bad_lines: int = 0  # lines that are not JSON objects
    skipped: Counter = field(default_factory=Counter)  # reason -> rows

    def summary(self) -> dict:
        return {"rows": self.rows, "bad_lines": self.bad_lines, "skipped": dict(self.skipped)}


def detect_format(columns) -> str:
    cols = set(columns)
    for name, (required, _) in FORMATS.items():
        if set(required) <= cols:
            return name
    wanted = "; ".join(f"{n}: {', '.join(r)}" for n, (r, _) in FORMATS.items())
    raise SlmError(f"cannot tell the data format from the columns {sorted(cols)}; expected one of ({wanted}), "
                   f"or choose one with --format")


def _text(row: dict, col: str) -> str | None:
    v = row.get(col)
    return v.strip() if isinstance(v, str) and v.strip() else None


def normalize(row: dict, fmt: str) -> Example | str:
    """An `Example`, or the reason the row cannot be used."""
    required, _ = FORMATS[fmt]
    if fmt != "chat":
        missing = [c for c in required if _text(row, c) is None]
        if missing:
            return f"missing {missing[0]}"
    if fmt == "gretel":
        return Example(_text(row, "sql"), question=_text(row, "sql_prompt"), context=_text(row, "sql_context"),
                       group=_text(row, "domain"))
    if fmt == "bird":
        return Example(_text(row, "SQL"), question=_text(row, "question"), context=_text(row, "schema"),
                       evidence=_text(row, "evidence"), group=_text(row, "db_id"))
    if fmt == "sql-create-context":
        return Example(_text(row, "answer"), question=_text(row, "question"), context=_text(row, "context"))
    if fmt == "prompt-completion":
        return Example(_text(row, "completion"), messages=[{"role": "user", "content": _text(row, "prompt")}])
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages is not a list"
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
               for m in msgs):
        return "a message lacks a known role or string content"
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return "the last message is not a non-empty assistant reply"
    return Example(msgs[-1]["content"], messages=[{"role": m["role"], "content": m["content"]} for m in msgs[:-1]])


# ---------------------------------------------------------------------------- reading rows


def _open(path: str):
    import fsspec

    if "://" not in path and not Path(path).is_file():
        raise SlmError(f"data file not found: {path}")
    try:
        return fsspec.open(path, "rb", compression="infer").open()
    except (OSError, ValueError) as e:
        raise SlmError(f"cannot open {path}: {e}") from None


def _json_rows(path: str, stats: LoadStats) -> Iterator[dict]:
    with _open(path) as f:
        head = f.read(1)
        f.seek(0)
        if head == b"[":  # a JSON list (e.g. Spider's train.json)
            try:
                rows = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SlmError(f"{path} starts like a JSON list but is not valid JSON: {e}") from None
            for row in rows:
                if isinstance(row, dict):
                    yield row
                else:
                    stats.bad_lines += 1
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if isinstance(row, dict):
                yield row
            else:
                stats.bad_lines += 1
                if stats.bad_lines <= 3:
                    print(f"warning: {path}:{n} is not a JSON object; skipped", file=sys.stderr)


def _parquet_rows(path: str) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as f:
        try:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()
        except pa.ArrowException as e:
            raise SlmError(f"cannot read parquet file {path}: {e}") from None


def _hf_rows(spec: str) -> Iterator[dict]:
    """`hf:NAME[:SPLIT]`: a hub dataset id (needs the network) or a local dataset directory."""
    try:
        import datasets
    except ImportError:
        raise SlmError("hf: datasets need the datasets package: pip install 'slm[hf]'") from None
    name, _, split = spec[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types (network, missing split, bad files)
        raise SlmError(f"cannot load dataset {name!r} (split {split or 'train'}): {str(e).splitlines()[0]}") from None
    yield from ds


def read_rows(source: str | Path, stats: LoadStats) -> Iterator[dict]:
    source = str(source)
    if source.startswith("hf:"):
        yield from _hf_rows(source)
    elif source.endswith(".parquet"):
        yield from _parquet_rows(source)
    elif source.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
        yield from _json_rows(source, stats)
    else:
        raise SlmError(f"unknown data source {source!r}: give a .jsonl, .json or .parquet file, or hf:DATASET[:SPLIT]")


def load_examples(source: str | Path, fmt: str | None = None, limit: int | None = None) -> tuple[list[Example], str, LoadStats]:
    """Examples of `source` (at most `limit`), the format used, and what was skipped."""
    if fmt is not None and fmt not in FORMATS:
        raise SlmError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stats, out = LoadStats(), []
    for row in read_rows(source, stats):
        if fmt is None:
            fmt = detect_format(row.keys())
        stats.rows += 1
        ex = normalize(row, fmt)
        if isinstance(ex, str):
            stats.skipped[ex] += 1
            continue
        out.append(ex)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise SlmError(f"no usable examples in {source} ({stats.rows} rows, {stats.bad_lines} unreadable lines, "
                       f"skipped: {dict(stats.skipped) or 'none'})")
    return out, fmt, stats


def split_holdout(examples: list[Example], fraction: float = 0.05, max_examples: int = 64) -> tuple[list[Example], list[Example]]:
    """(train, held-out): the held-out examples are those with the smallest content hashes,
    so the split is the same on every run and for any row order."""
    if not 0.0 <= fraction < 1.0:
        raise SlmError(f"held-out fraction must be in [0, 1), got {fraction}")
    n = min(max_examples, round(fraction * len(examples)))
    if n == 0 or len(examples) < 2:
        return list(examples), []
    held = set(sorted(range(len(examples)), key=lambda i: examples[i].key())[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]
