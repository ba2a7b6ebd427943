"""Resolve one `--data SOURCE` string into the list of shards (files) to stream.

Accepted forms, tried in this order:

- `wiki-vital`: the embedded corpus (see wiki_vital.py), parquet shards in a user cache dir.
- `fineweb-edu`: alias of `hf:HuggingFaceFW/fineweb-edu@sample-10BT:train`.
- `hf:OWNER/NAME[@CONFIG][:SPLIT]`: a Hugging Face Hub dataset. Its README's `configs:` say
  which files make up CONFIG/SPLIT; they are streamed through `HfFileSystem` at a pinned
  commit, never downloaded whole. `SLM_HF_MIRROR=DIR` reads `DIR/OWNER/NAME` instead, a local
  directory laid out like the hub repository (offline mirrors; the tests use it).
- any fsspec URL (`s3://`, `gs://`, `https://`, `memory://`, ...): a file, a directory or a glob.
- a local file, directory (searched recursively, hidden entries skipped) or glob.

Data files are recognised by extension: `.parquet`/`.pq`; `.jsonl`/`.ndjson`/`.json` (JSON
lines), optionally `.gz` or `.zst`; `.txt` (optionally `.gz`/`.zst`). This module only lists
files; readers.py reads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field

import fsspec
from fsspec.implementations.local import LocalFileSystem

from slm.errors import SlmError

log = logging.getLogger("slm.data")

ALIASES = {"fineweb-edu": "hf:HuggingFaceFW/fineweb-edu@sample-10BT:train"}
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
            ".txt": "txt"}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
_HUB_SPEC = re.compile(r"^hf:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<config>[^:@]+))?(?::(?P<split>[\w.-]+))?$")
KNOWN_EXTENSIONS = ".parquet, .pq, .jsonl, .ndjson, .json (JSON lines, optionally .gz/.zst), .txt"


@dataclass(frozen=True)
class Shard:
    """One file of a source: where it is, how to read it, and its name relative to the source."""

    url: str  # a local path or an fsspec URL
    format: str  # parquet | jsonl | txt
    compression: str | None = None  # gzip | zstd | None
    name: str = ""  # path relative to the source root, for messages and fingerprints
    size: int | None = None

    @property
    def is_local(self) -> bool:
        return "://" not in self.url


@dataclass
class Source:
    spec: str  # what the user wrote
    description: str
    shards: list[Shard] = field(default_factory=list)

    def fingerprint(self) -> str:
        """Changes when files are added, removed or resized: a saved position would then be stale."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}\0{s.size}\n".encode())
        return h.hexdigest()[:16]


def shard_format(path: str) -> tuple[str, str | None] | None:
    """(format, compression) from a file name, or None for files that are not data."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = None
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return None if (fmt == "parquet" and compression) else (fmt, compression)
    return None


# ---------------------------------------------------------------------------------------------
# Retries: remote reads fail transiently (rate limits, resets); local errors are permanent.

_PERMANENT = (SlmError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeError,
              ValueError, TypeError, KeyError)  # ValueError covers pyarrow's ArrowInvalid and JSON errors


def is_transient(exc: BaseException) -> bool:
    return not isinstance(exc, _PERMANENT)


def backoff_delay(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


def with_retries(fn, what: str, retries: int, remote: bool = True, permanent: tuple = ()):
    """fn(), retried `retries` times with backoff on transient errors of remote filesystems."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not remote or attempt >= retries or not is_transient(e) or isinstance(e, permanent):
                raise
            delay = backoff_delay(attempt)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1,
                        retries, delay)
            time.sleep(delay)
            attempt += 1


# ---------------------------------------------------------------------------------------------


def resolve_source(spec: str, retries: int = 5) -> Source:
    """The shards of a source, sorted by name; SlmError naming the source if there are none."""
    spec = spec.strip()
    if not spec:
        raise SlmError("empty data source; give a path, a URL, hf:OWNER/NAME, fineweb-edu or wiki-vital")
    if spec == "wiki-vital":
        from slm.data.wiki_vital import ensure_wiki_vital

        root = ensure_wiki_vital()
        src = _list_files(LocalFileSystem(), str(root), spec, retries)
        src.description = f"wiki-vital: English Wikipedia vital-article summaries, cached in {root}"
        return src
    if spec in ALIASES:
        src = _resolve_hub(ALIASES[spec], retries)
        src.spec, src.description = spec, f"{spec} = {ALIASES[spec]}; {src.description}"
        return src
    if spec.startswith("hf:"):
        return _resolve_hub(spec, retries)
    if "://" in spec:
        try:
            fs, path = fsspec.core.url_to_fs(spec)
        except (ImportError, ValueError) as e:
            raise SlmError(f"cannot open data source {spec!r}: {e}") from None
        return _list_files(fs, path, spec, retries)
    return _list_files(LocalFileSystem(), os.path.abspath(os.path.expanduser(spec)), spec, retries)


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _listing(fn, what: str, retries: int, remote: bool):
    """with_retries for finding a source's files: a remote failure that the retries did not cure
    is one clear error before training, not a traceback."""
    try:
        return with_retries(fn, what, retries, remote)
    except SlmError:
        raise
    except Exception as e:
        if not remote:
            raise
        raise SlmError(f"{what} failed after {retries} retries ({type(e).__name__}: {e}); check the URL, the "
                       f"network and any credentials") from None


def _list_files(fs, path: str, spec: str, retries: int) -> Source:
    remote = not _is_local(fs)
    call = lambda fn, what: _listing(fn, what, retries, remote)  # noqa: E731
    explicit_file = False
    if any(c in path for c in "*?["):
        paths = call(lambda: fs.glob(path, detail=True), f"listing {spec}")
        if not paths:
            raise SlmError(f"data source {spec!r} matches no files")
        root = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]  # the directory before the pattern
    elif call(lambda: fs.isdir(path), f"listing {spec}"):
        paths = call(lambda: fs.find(path, detail=True), f"listing {spec}")
        root = path
    elif call(lambda: fs.exists(path), f"opening {spec}"):
        paths = {path: call(lambda: fs.info(path), f"opening {spec}")}
        root, explicit_file = path.rsplit("/", 1)[0], True
    else:
        raise SlmError(f"data source {spec!r} does not exist (no such file or directory); give a path, a URL, "
                       f"hf:OWNER/NAME, fineweb-edu or wiki-vital")
    shards = []
    for p, info in sorted(paths.items()):
        if info.get("type") == "directory":
            continue
        rel = p[len(root):].lstrip("/") if p.startswith(root) else p
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files and directories (.cache, .git, temporary files)
        fmt = shard_format(p)
        if fmt is None:
            if explicit_file:
                raise SlmError(f"data file {spec!r} has an unknown extension; use one of: {KNOWN_EXTENSIONS}")
            continue
        shards.append(Shard(_url(fs, p), fmt[0], fmt[1], rel or p.rsplit("/", 1)[-1], info.get("size")))
    if not shards:
        raise SlmError(f"no data files found in {spec!r}; expected files ending in {KNOWN_EXTENSIONS}")
    return Source(spec, f"{len(shards)} file(s) from {spec}", shards)


def _resolve_hub(spec: str, retries: int) -> Source:
    m = _HUB_SPEC.match(spec)
    if not m:
        raise SlmError(f"bad Hugging Face source {spec!r}; expected hf:OWNER/NAME[@CONFIG][:SPLIT], "
                       f"e.g. hf:HuggingFaceFW/fineweb-edu@sample-10BT:train")
    repo, config, split = m["repo"], m["config"], m["split"]
    mirror = os.environ.get("SLM_HF_MIRROR")
    if mirror:
        fs, root = LocalFileSystem(), os.path.join(os.path.abspath(mirror), repo)
        if not os.path.isdir(root):
            raise SlmError(f"dataset {repo!r} is not in the hub mirror SLM_HF_MIRROR={mirror} (no directory {root})")
        where = f"mirror {root}"
    else:
        fs, root, where = _hub_filesystem(repo, retries)
    patterns, config, split = hub_data_files(fs, root, repo, config, split, retries)
    found: dict = {}
    for pattern in patterns:
        found.update(_listing(lambda: fs.glob(f"{root}/{pattern}", detail=True), f"listing {spec}", retries,
                              not _is_local(fs)))
    shards = []
    for p, info in sorted(found.items()):
        fmt = shard_format(p)
        if fmt and info.get("type") != "directory":
            shards.append(Shard(_url(fs, p), fmt[0], fmt[1], p[len(root):].lstrip("/"), info.get("size")))
    if not shards:
        raise SlmError(f"{spec}: config {config!r} split {split!r} lists no data files ({', '.join(patterns)}) "
                       f"with a known extension ({KNOWN_EXTENSIONS})")
    return Source(spec, f"{len(shards)} file(s) of {repo} config {config} split {split} ({where})", shards)


def _hub_filesystem(repo: str, retries: int):
    """HfFileSystem rooted at the dataset's current commit, so every rank, worker and resumed run
    sees the same files even if the repository changes meanwhile."""
    try:
        from huggingface_hub import HfApi, HfFileSystem
        from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError
    except ImportError:
        raise SlmError("hf: sources need huggingface_hub: pip install 'slm[hf]'") from None
    try:
        sha = with_retries(lambda: HfApi().dataset_info(repo).sha, f"looking up {repo} on the hub", retries,
                           permanent=(OfflineModeIsEnabled, RepositoryNotFoundError))
    except RepositoryNotFoundError:
        raise SlmError(f"dataset {repo!r} not found on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except Exception as e:
        raise SlmError(f"could not reach the Hugging Face Hub for {repo!r} ({type(e).__name__}: {e}); check the "
                       f"network, or use a local copy (a path, or SLM_HF_MIRROR)") from None
    return HfFileSystem(), f"datasets/{repo}@{sha}", f"hub commit {sha[:12]}"


def _readme_configs(fs, root: str, retries: int) -> list[dict]:
    import yaml

    readme = f"{root}/README.md"
    remote = not _is_local(fs)
    if not with_retries(lambda: fs.exists(readme), "reading README.md", retries, remote):
        return []
    text = with_retries(lambda: fs.cat_file(readme), "reading README.md", retries, remote).decode("utf-8", "replace")
    if not text.startswith("---"):
        return []
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def hub_data_files(fs, root: str, repo: str, config: str | None, split: str | None,
                   retries: int = 5) -> tuple[list[str], str, str]:
    """Glob patterns (relative to the repo root) of CONFIG/SPLIT, from the README's `configs:`
    the way the hub's dataset viewer reads them; without configs, every data file."""
    configs = _readme_configs(fs, root, retries)
    if not configs:
        if config:
            raise SlmError(f"{repo} declares no configs in its README.md, so @{config} cannot be chosen")
        return ["**"], "default", split or "train"
    names = [str(c.get("config_name", "default")) for c in configs]
    if config is None:
        chosen = next((c for c in configs if c.get("default")), None) or (
            configs[names.index("default")] if "default" in names else configs[0])
    elif config in names:
        chosen = configs[names.index(config)]
    else:
        raise SlmError(f"{repo} has no config {config!r}; its configs: {', '.join(names)}")
    name = str(chosen.get("config_name", "default"))
    files = chosen.get("data_files")
    by_split: dict[str, list[str]] = {}
    if isinstance(files, str):
        by_split["train"] = [files]
    elif isinstance(files, dict):
        by_split = {k: [v] if isinstance(v, str) else list(v) for k, v in files.items()}
    elif isinstance(files, list):
        for item in files:
            if isinstance(item, str):
                by_split.setdefault("train", []).append(item)
            elif isinstance(item, dict) and "path" in item:
                paths = item["path"]
                by_split.setdefault(str(item.get("split", "train")), []).extend(
                    [paths] if isinstance(paths, str) else paths)
    if not by_split:
        raise SlmError(f"{repo} config {name!r} lists no data_files in its README.md")
    split = split or ("train" if "train" in by_split else next(iter(by_split)))
    if split not in by_split:
        raise SlmError(f"{repo} config {name!r} has no split {split!r}; its splits: {', '.join(by_split)}")
    return by_split[split], name, split


def open_filesystem(url: str):
    """(filesystem, path) for a shard URL; local paths use the local filesystem."""
    if "://" not in url:
        return LocalFileSystem(), url
    return fsspec.core.url_to_fs(url)
