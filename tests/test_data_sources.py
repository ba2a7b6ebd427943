"""Sources (--data syntax), readers, bad input, retries, the hub layout, wiki-vital, check_source."""

import io
import json
import logging
import os

import fsspec
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from datautil import corpus, make_docs, mixed_folder, write_jsonl, write_parquet
from slm.data import DataConfig, check_source, resolve_source
from slm.data.producer import Producer
from slm.data.report import inspect_source
from slm.data.wiki_vital import ensure_wiki_vital
from slm.errors import SlmError


def docs_of(cfg, split=None):
    p = Producer(cfg, resolve_source(cfg.source, cfg.retries), split, loop=False, shuffle=False)
    return [t for _, t in p.documents()], dict(p.skips.counts)


# -- the --data syntax -------------------------------------------------------------------------


def test_local_file_dir_glob(tmp_path):
    d, docs = corpus(tmp_path, n_files=3, docs_per_file=10)
    (d / "notes.md").write_text("not data")
    (d / ".hidden").mkdir()
    write_parquet(d / ".hidden" / "x.parquet", ["hidden"])
    assert [s.name for s in resolve_source(str(d)).shards] == ["part-000.parquet", "part-001.parquet",
                                                                "part-002.parquet"]
    assert len(resolve_source(str(d / "part-00[01].parquet")).shards) == 2
    assert resolve_source(str(d / "part-001.parquet")).shards[0].format == "parquet"
    assert docs_of(DataConfig(source=str(d)))[0] == docs


def test_missing_and_unusable_sources_are_named(tmp_path):
    with pytest.raises(SlmError, match="does-not-exist.*does not exist"):
        resolve_source(str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlmError, match="no data files found"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(SlmError, match="unknown extension"):
        resolve_source(str(tmp_path / "a.csv"))
    with pytest.raises(SlmError, match="matches no files"):
        resolve_source(str(tmp_path / "*.parquet"))


def test_jsonl_plain_gzip_zstd_and_txt(tmp_path):
    docs = make_docs(30)
    for comp, name in ((None, "a.jsonl"), ("gzip", "b.jsonl.gz"), ("zstd", "c.jsonl.zst")):
        write_jsonl(tmp_path / "j" / name, [{"text": t, "n": i} for i, t in enumerate(docs)], comp)
    got, skipped = docs_of(DataConfig(source=str(tmp_path / "j")))
    assert got == docs * 3 and skipped == {}
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text("First paragraph,\nstill first.\n\n\nSecond one.\n  \nThird.")
    (tmp_path / "t" / "two.txt").write_text("Only one.\n")
    assert docs_of(DataConfig(source=str(tmp_path / "t")))[0] == [
        "First paragraph,\nstill first.\n\n\nSecond one.\n  \nThird.", "Only one."]
    assert docs_of(DataConfig(source=str(tmp_path / "t"), txt_mode="paragraph"))[0] == [
        "First paragraph,\nstill first.", "Second one.", "Third.", "Only one."]


def test_unreachable_https_source_is_one_clear_error_after_retries():
    import socket

    with socket.socket() as sock:  # a local port with nobody listening: refused at once, no network needed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SlmError, match=r"listing https://127\.0\.0\.1:\d+/a\.parquet failed after 1 retries"):
        resolve_source(f"https://127.0.0.1:{port}/a.parquet", retries=1)


def test_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    docs = make_docs(20)
    buf = io.BytesIO()
    pq.write_table(__import__("pyarrow").table({"text": docs}), buf, row_group_size=7)
    fs.pipe("/urltest/shard-0.parquet", buf.getvalue())
    fs.pipe("/urltest/rows.jsonl", b"".join(json.dumps({"text": t}).encode() + b"\n" for t in docs))
    src = resolve_source("memory://urltest")
    assert [s.url for s in src.shards] == ["memory:///urltest/rows.jsonl", "memory:///urltest/shard-0.parquet"]
    assert docs_of(DataConfig(source="memory://urltest"))[0] == docs * 2


# -- bad input ---------------------------------------------------------------------------------


def test_mixed_folder_counts_every_reason(tmp_path):
    d = mixed_folder(tmp_path / "mixed")
    r = inspect_source(DataConfig(source=str(d)))
    assert r["documents"] == 51
    assert r["skipped"] == {"unreadable_file": 1, "null_text": 25, "empty_text": 25, "invalid_utf8": 1,
                            "invalid_json": 1, "missing_field": 1}


def test_row_level_reasons(tmp_path):
    rows = [{"text": "fine document"}, {"text": 42}, {"text": None}, {"text": "   "}, {"text": "x" * 500},
            [1, 2], b"\n", {"text": "lone \ud800 surrogate"}, {"text": "also fine"}]
    write_jsonl(tmp_path / "r.jsonl", rows)
    got, skipped = docs_of(DataConfig(source=str(tmp_path / "r.jsonl"), max_doc_chars=100))
    assert got == ["fine document", "also fine"]
    assert skipped == {"not_string": 1, "null_text": 1, "empty_text": 1, "too_long": 1, "not_an_object": 1,
                       "invalid_utf8": 1}


def test_invalid_utf8_in_parquet(tmp_path):
    import pyarrow as pa

    raw = pa.array([b"first", b"bad \xff\xfe bytes", b"last"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": raw}), tmp_path / "u.parquet")
    assert docs_of(DataConfig(source=str(tmp_path / "u.parquet"))) == (["first", "last"], {"invalid_utf8": 1})


def test_absurd_line_is_skipped_without_reading_it_whole(tmp_path):
    # A 20 MB line vs a 1,000-character limit: the reader takes it in bounded pieces.
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "' + b"a" * (20 << 20) + b'"}\n')
        f.write(json.dumps({"text": "after the absurd one"}).encode() + b"\n")
    got, skipped = docs_of(DataConfig(source=str(p), max_doc_chars=1000))
    p.unlink()
    assert got == ["after the absurd one"] and skipped == {"too_long": 1}


def test_file_level_reasons(tmp_path):
    write_parquet(tmp_path / "d" / "a.parquet", make_docs(5))
    pq.write_table(__import__("pyarrow").table({"content": ["x"]}), tmp_path / "d" / "b.parquet")
    pq.write_table(__import__("pyarrow").table({"text": [1, 2]}), tmp_path / "d" / "c.parquet")
    (tmp_path / "d" / "d.parquet").write_bytes(b"not parquet at all")
    got, skipped = docs_of(DataConfig(source=str(tmp_path / "d")))
    assert len(got) == 5 and skipped == {"missing_column": 1, "wrong_column_type": 1, "unreadable_file": 1}


def test_corrupt_row_group_is_skipped(tmp_path):
    docs = make_docs(90)
    p = write_parquet(tmp_path / "rg.parquet", docs, row_group_size=30)
    meta = pq.ParquetFile(p).metadata.row_group(1).column(0)
    data = bytearray(p.read_bytes())
    start = meta.data_page_offset + 20
    data[start:start + 200] = os.urandom(200)
    p.write_bytes(bytes(data))
    got, skipped = docs_of(DataConfig(source=str(p)))
    assert skipped == {"unreadable_row_group": 1} and got == docs[:30] + docs[60:]


def test_warnings_are_bounded(tmp_path, caplog):
    write_parquet(tmp_path / "n.parquet", [None] * 40 + ["ok"])
    with caplog.at_level(logging.WARNING, logger="slm.data"):
        got, skipped = docs_of(DataConfig(source=str(tmp_path / "n.parquet"), max_warnings=3))
    assert got == ["ok"] and skipped == {"null_text": 40}
    msgs = [r.getMessage() for r in caplog.records if "null_text" in r.getMessage()]
    assert len(msgs) == 3 and "not shown" in msgs[-1] and "not shown" not in msgs[0]


# -- remote reads: retries with backoff, through fsspec ----------------------------------------


class FlakyFS(MemoryFileSystem):
    """Memory filesystem whose first open fails and whose second file fails mid-read."""

    protocol = ("flaky",)
    opens = 0

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        if "r" not in mode:
            return f
        FlakyFS.opens += 1
        if FlakyFS.opens == 1:
            raise ConnectionError("connection refused (simulated)")
        return _FailingFile(f.getvalue(), fail_at=6 if FlakyFS.opens == 2 else None)


class _FailingFile(io.BytesIO):
    def __init__(self, data, fail_at):
        super().__init__(data)
        self.calls, self.fail_at = 0, fail_at

    def _tick(self):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("connection reset by peer (simulated)")

    def read(self, n=-1):
        self._tick()
        return super().read(n)

    def readline(self, n=-1):
        self._tick()
        return super().readline(n)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_remote_reads_are_retried_from_where_they_failed(tmp_path, monkeypatch, fmt):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr("slm.data.sources.time.sleep", lambda s: None)
    monkeypatch.setattr("slm.data.producer.time.sleep", lambda s: None)
    docs = make_docs(200)
    if fmt == "parquet":
        buf = io.BytesIO()
        pq.write_table(__import__("pyarrow").table({"text": docs}), buf, row_group_size=20)
        data = buf.getvalue()
    else:
        data = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in docs)
    FlakyFS().pipe(f"/flaky/{fmt}/shard.{fmt}", data)
    FlakyFS.opens = 0
    got, skipped = docs_of(DataConfig(source=f"flaky://flaky/{fmt}", retries=3))
    assert FlakyFS.opens >= 3 and got == docs and skipped == {}
    FlakyFS.opens = 0
    got, skipped = docs_of(DataConfig(source=f"flaky://flaky/{fmt}", retries=0))
    assert got == [] and skipped == {"unreadable_file": 1}


# -- the Hugging Face Hub layout (a local mirror; the same resolution as HfFileSystem) ----------

README = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb-Edu (test mirror)
"""


def hub_mirror(tmp_path, monkeypatch):
    repo = tmp_path / "mirror" / "HuggingFaceFW" / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "README.md").write_text(README)
    write_parquet(repo / "sample" / "10BT" / "000_00000.parquet", make_docs(30, seed=1))
    write_parquet(repo / "sample" / "10BT" / "001_00000.parquet", make_docs(30, seed=2))
    write_parquet(repo / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", make_docs(30, seed=3))
    monkeypatch.setenv("SLM_HF_MIRROR", str(tmp_path / "mirror"))
    return repo


def test_hub_configs_and_alias(tmp_path, monkeypatch):
    hub_mirror(tmp_path, monkeypatch)
    src = resolve_source("fineweb-edu")
    assert [s.name for s in src.shards] == ["sample/10BT/000_00000.parquet", "sample/10BT/001_00000.parquet"]
    assert "sample-10BT" in src.description
    assert docs_of(DataConfig(source="fineweb-edu"))[0] == make_docs(30, seed=1) + make_docs(30, seed=2)
    assert [s.name for s in resolve_source("hf:HuggingFaceFW/fineweb-edu").shards] == [
        "data/CC-MAIN-2024-10/000_00000.parquet"]
    with pytest.raises(SlmError, match="no config 'nope'.*default, sample-10BT"):
        resolve_source("hf:HuggingFaceFW/fineweb-edu@nope")
    with pytest.raises(SlmError, match="no split 'validation'"):
        resolve_source("hf:HuggingFaceFW/fineweb-edu@sample-10BT:validation")
    with pytest.raises(SlmError, match="not in the hub mirror"):
        resolve_source("hf:someone/else")
    with pytest.raises(SlmError, match="expected hf:OWNER/NAME"):
        resolve_source("hf:just-a-name")


def test_real_fineweb_rows_through_the_hub_path(tmp_path, monkeypatch, shared_data):
    repo = hub_mirror(tmp_path, monkeypatch)
    for f in (repo / "sample" / "10BT").iterdir():
        f.unlink()
    (repo / "sample" / "10BT" / "000_00000.parquet").write_bytes(
        (shared_data / "fineweb_edu_sample" / "part-000.parquet").read_bytes())
    r = inspect_source(DataConfig(source="fineweb-edu"))
    assert r["documents"] == 74 and r["skipped"] == {} and r["columns"] == ["text", "id", "score"]
    assert r["tokens"] > 30_000


# -- wiki-vital and the up-front check -----------------------------------------------------------


def test_wiki_vital_cache():
    d = ensure_wiki_vital()
    files = sorted(d.iterdir())
    assert len(files) == 4
    stamp = [f.stat().st_mtime_ns for f in files]
    assert ensure_wiki_vital() == d and [f.stat().st_mtime_ns for f in files] == stamp  # built once
    pf = pq.ParquetFile(files[0])
    assert pf.schema_arrow.names[:6] == ["text", "id", "dump", "url", "language", "token_count"]
    assert pf.metadata.num_row_groups > 1
    assert 9_500 < sum(pq.ParquetFile(f).metadata.num_rows for f in files) < 10_500


def test_check_source(tmp_path):
    d, _ = corpus(tmp_path, n_files=1, docs_per_file=5)
    assert check_source(DataConfig(source=str(d)))["files"] == 1
    with pytest.raises(SlmError, match="nowhere.*does not exist"):
        check_source(DataConfig(source=str(tmp_path / "nowhere")))
    with pytest.raises(SlmError, match="no file of .* has a text field 'body' \\(columns: text, id\\)"):
        check_source(DataConfig(source=str(d), text_field="body"))
    write_jsonl(tmp_path / "j.jsonl", [{"content": "x"}])
    with pytest.raises(SlmError, match="text field 'text'"):
        check_source(DataConfig(source=str(tmp_path / "j.jsonl")))
    write_parquet(tmp_path / "e.parquet", [None, ""])
    with pytest.raises(SlmError, match="no usable documents.*empty_text=1, null_text=1"):
        check_source(DataConfig(source=str(tmp_path / "e.parquet")))
    with pytest.raises(SlmError, match="the val split of"):
        check_source(DataConfig(source=str(d), val_percent=0.001), split="val")
