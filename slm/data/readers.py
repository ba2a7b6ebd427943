"""Read one shard as batches of raw text values, unit by unit, from any position.

A shard is cut into *units*, the pieces handed out to ranks and loader workers: a parquet row
group, a block of `ROWS_PER_UNIT` lines of a JSONL file (or paragraphs of a .txt file), or a
whole .txt file. A position inside a shard is (unit, row within the unit, byte offset of the
unit in the decompressed file), so a reader can restart exactly there without reading what
comes before (parquet: one row group is decoded; plain files: a seek; .gz/.zst: decompression
up to the offset, since compressed streams cannot seek).

Readers yield batches `(unit, first_row, unit_offset, values)` where each value is the text
field as found (a str, None, another JSON type) or a `Bad` marker saying why the row is not a
document; judging values is the caller's job (documents.py). Bounded memory: parquet is read in
batches of one column, lines with a length limit.
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from slm.data.sources import Shard, open_filesystem

ROWS_PER_UNIT = 1024  # lines/paragraphs per unit of a line-based file
BATCH_ROWS = 1024  # values per yielded batch
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())

Batch = tuple[int, int, int, list]


class Bad:
    """A row that is not a document, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


BLANK = Bad("blank")  # blank lines between JSONL records: ignored, not counted
TOO_LONG = Bad("too_long")


class FileSkip(Exception):
    """The whole file is unusable (reason, e.g. missing_column), with details for the warning."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def open_binary(shard: Shard):
    """A binary file object for the shard, decompressed if needed."""
    if shard.is_local:
        raw = open(shard.url, "rb")
    else:
        fs, path = open_filesystem(shard.url)
        raw = fs.open(path, "rb")
    if shard.compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if shard.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise FileSkip("unreadable_file", "reading .zst files needs the 'zstandard' package") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


class ParquetReader:
    """Units are row groups; only the text column is read."""

    def __init__(self, shard: Shard, field: str, max_chars: int):
        self.shard, self.field = shard, field
        self._file = None
        self.pf: pq.ParquetFile | None = None
        self.current: int | None = None  # index into `order` of the row group being read

    def open(self) -> None:
        self._file = self.shard.url if self.shard.is_local else open_binary(self.shard)
        self.pf = pq.ParquetFile(self._file)
        schema = self.pf.schema_arrow
        if self.field not in schema.names:
            raise FileSkip("missing_column", f"no column {self.field!r} (columns: {', '.join(schema.names)})")
        if schema.field(self.field).type not in _TEXT_TYPES:
            raise FileSkip("wrong_column_type",
                           f"column {self.field!r} holds {schema.field(self.field).type}, not text")

    def columns(self) -> list[str]:
        return list(self.pf.schema_arrow.names)

    def units(self) -> int:
        return self.pf.metadata.num_row_groups

    def unit_rows(self, unit_index: int) -> int:
        return self.pf.metadata.row_group(unit_index).num_rows

    def rows(self, order: list[int], pos: int, row: int) -> Iterator[Batch]:
        """Row groups order[pos:], starting at `row` of the first; `unit` in a batch is the index
        into `order`, offsets are 0."""
        self._order = order
        for p in range(pos, len(order)):
            self.current = p
            skip = row if p == pos else 0
            r = 0
            for batch in self.pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[order[p]], columns=[self.field]):
                n = batch.num_rows
                if r + n <= skip:
                    r += n
                    continue
                col = batch.column(0)
                lo = max(0, skip - r)
                yield p, r + lo, 0, (col.slice(lo) if lo else col).to_pylist()
                r += n

    def where(self, unit: int, row: int) -> str:
        return f"row group {self._order[unit]} row {row}"

    def close(self) -> None:
        if self._file is not None and not isinstance(self._file, str):
            self._file.close()
        self._file = self.pf = None


class _LineBasedReader:
    """JSONL lines or text paragraphs; units are blocks of ROWS_PER_UNIT records read in file order.
    Records of units this consumer does not own are scanned over without being parsed."""

    def __init__(self, shard: Shard, field: str, max_chars: int):
        self.shard, self.field = shard, field
        self.limit = 6 * max_chars + 1024  # bytes: JSON escapes take up to 6 bytes per character
        self._f = None

    def open(self) -> None:
        self._f = open_binary(self.shard)

    def columns(self) -> list[str]:
        return []

    def units(self) -> None:
        return None  # unknown until read

    def _records(self) -> Iterator[tuple[bytes | Bad, int]]:
        """(record bytes or TOO_LONG, start offset); subclasses decide what a record is."""
        raise NotImplementedError

    def _parse(self, record: bytes):
        raise NotImplementedError

    def _seek(self, offset: int) -> None:
        self._pos = offset
        if offset == 0:
            return
        if self._f.seekable() and self.shard.compression is None:
            self._f.seek(offset)
            return
        left = offset  # compressed: decompress and discard up to the offset
        while left:
            chunk = self._f.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def _line(self) -> tuple[bytes | Bad, int]:
        """The next line (b"" at the end) and its start offset; longer than the limit: TOO_LONG."""
        start = self._pos
        line = self._f.readline(self.limit)
        self._pos += len(line)
        if len(line) == self.limit and not line.endswith(b"\n"):
            while True:  # consume the rest of the absurd line in bounded pieces
                more = self._f.readline(1 << 20)
                self._pos += len(more)
                if not more or more.endswith(b"\n"):
                    return TOO_LONG, start
        return line, start

    def rows(self, owned: Callable[[int], bool], unit: int, row: int, offset: int) -> Iterator[Batch]:
        """Records from unit `unit` (starting at byte `offset`), skipping its first `row` records,
        then every later unit this consumer owns."""
        self._seek(offset)
        u, r, unit_offset = unit, 0, offset
        values: list = []
        first = row
        for record, start in self._records():
            if r == ROWS_PER_UNIT:
                if values:
                    yield u, first, unit_offset, values
                    values = []
                u, r, unit_offset = u + 1, 0, start
                first = 0
            if owned(u) and (u != unit or r >= row):
                if not values:
                    first = r
                values.append(record if isinstance(record, Bad) else self._parse(record))
                if len(values) == BATCH_ROWS:
                    yield u, first, unit_offset, values
                    values = []
            r += 1
        if values:
            yield u, first, unit_offset, values

    def where(self, unit: int, row: int) -> str:
        return f"{self.record} {unit * ROWS_PER_UNIT + row + 1}"

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = None


class JsonlReader(_LineBasedReader):
    record = "line"

    def _records(self):
        while True:
            line, start = self._line()
            if not line:
                return
            yield line, start

    def _parse(self, line: bytes):
        try:
            s = line.decode("utf-8")
        except UnicodeDecodeError:
            return Bad("invalid_utf8")
        if not s.strip():
            return BLANK
        try:
            obj = json.loads(s)
        except ValueError:
            return Bad("invalid_json")
        if not isinstance(obj, dict):
            return Bad("not_an_object")
        if self.field not in obj:
            return Bad("missing_field")
        v = obj[self.field]
        if isinstance(v, str) and not v.isascii():
            try:
                v.encode("utf-8")  # JSON escapes can spell lone surrogates, which are not text
            except UnicodeEncodeError:
                return Bad("invalid_utf8")
        return v


class ParagraphReader(_LineBasedReader):
    """.txt in paragraph mode: records are runs of non-blank lines."""

    record = "paragraph"

    def _records(self):
        parts: list[bytes] = []
        size, start, too_long = 0, 0, False
        while True:
            line, at = self._line()
            if line is TOO_LONG or (line and line.strip()):
                if not parts and not too_long:
                    start = at
                if line is TOO_LONG or too_long or size + len(line) > self.limit:
                    too_long, parts = True, []
                else:
                    parts.append(line)
                    size += len(line)
                continue
            if parts or too_long:
                yield (TOO_LONG if too_long else b"".join(parts)), start
                parts, size, too_long = [], 0, False
            if not line:
                return

    def _parse(self, paragraph: bytes):
        try:
            return paragraph.decode("utf-8").strip()
        except UnicodeDecodeError:
            return Bad("invalid_utf8")


class TextFileReader:
    """.txt in file mode: the whole file is one document (one unit, one row)."""

    def __init__(self, shard: Shard, field: str, max_chars: int):
        self.shard, self.limit = shard, 4 * max_chars

    def open(self) -> None:
        pass

    def columns(self) -> list[str]:
        return []

    def units(self) -> int:
        return 1

    def rows(self, order: list[int], pos: int, row: int) -> Iterator[Batch]:
        if pos >= len(order) or row > 0:
            return
        with open_binary(self.shard) as f:
            data = f.read(self.limit + 1)
        if len(data) > self.limit:
            yield 0, 0, 0, [TOO_LONG]
            return
        try:
            yield 0, 0, 0, [data.decode("utf-8").strip()]
        except UnicodeDecodeError:
            yield 0, 0, 0, [Bad("invalid_utf8")]

    def where(self, unit: int, row: int) -> str:
        return "(the whole file)"

    def close(self) -> None:
        pass


def make_reader(shard: Shard, field: str, max_chars: int, txt_mode: str):
    if shard.format == "parquet":
        return ParquetReader(shard, field, max_chars)
    if shard.format == "jsonl":
        return JsonlReader(shard, field, max_chars)
    if txt_mode == "paragraph":
        return ParagraphReader(shard, field, max_chars)
    return TextFileReader(shard, field, max_chars)
