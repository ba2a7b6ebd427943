"""Small corpora for the data tests, written into a test's tmp_path."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the cat sat on a mat while rivers carry silt toward deltas and stars burn hydrogen into helium "
         "as cells divide by mitosis").split()


def make_docs(n: int, seed: int = 0, words: int = 12) -> list[str]:
    """n distinct short documents."""
    import random

    rng = random.Random(seed)
    return [f"Document {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words))) + "."
            for i in range(n)]


def write_parquet(path: Path, texts: list, row_group_size: int = 50, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, "id": [str(i) for i in range(len(texts))], **columns}), path,
                   row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, rows: list, compression: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows)
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def corpus(tmp: Path, n_files: int = 3, docs_per_file: int = 120, row_group_size: int = 25) -> tuple[Path, list[str]]:
    """A directory of parquet shards with several row groups each; returns (dir, all documents)."""
    d = tmp / "corpus"
    docs = []
    for f in range(n_files):
        texts = make_docs(docs_per_file, seed=f)
        write_parquet(d / f"part-{f:03d}.parquet", texts, row_group_size)
        docs += texts
    return d, docs


def mixed_folder(d: Path) -> Path:
    """The acceptance check's folder: a good shard with null/empty rows, a corrupt shard, bad JSONL."""
    d.mkdir(parents=True)
    texts = ["Photosynthesis converts light energy into chemical energy. " * 20, None, "",
             "The French Revolution began in 1789. " * 30] * 25
    write_parquet(d / "good.parquet", texts)
    (d / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(4000))
    write_jsonl(d / "rows.jsonl", [{"text": "Cells divide by mitosis. " * 10}, b'{"text": "broken \xff\xfe bytes"}\n',
                                   b'{"text": \n', {"other": 1}])
    return d
