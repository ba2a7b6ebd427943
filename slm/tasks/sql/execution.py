"""Running SQL safely in SQLite, and the databases an evaluation runs on.

- `build_database(context)`: an in-memory database from an example's CREATE/INSERT
  statements, made read-only once built.
- `run_query`: one statement under a time limit (SQLite's progress handler interrupts it) and
  a row cap, so a runaway prediction (a cross join, a recursive CTE) cannot stall the evaluation.
- `fill_synthetic`: seeded rows for contexts that only create tables (BIRD, Spider). Values
  come from small shared pools (so joins on keys and on same-named columns find partners) mixed
  with the literals of the gold query (so its WHERE clauses select something): the idea of
  test-suite execution accuracy (Zhong et al., 2020). A prediction counts as correct only if it
  matches the gold query on every database of the suite.
- `same_result`: result sets compared as multisets, or as lists when the gold query orders.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass



class QueryError(Exception):
    """The statement failed to parse or run, or hit the time limit."""


@dataclass
class Limits:
    timeout_s: float = 5.0
    max_rows: int = 10_000


@dataclass
class Result:
    rows: list[tuple]
    truncated: bool  # more than max_rows rows existed


def build_database(context: str) -> sqlite3.Connection:
    """An in-memory database holding `context`; raises sqlite3.Error if it does not run."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
    except (sqlite3.Error, ValueError):
        conn.close()
        raise
    return conn


def tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                       "AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def has_rows(conn: sqlite3.Connection) -> bool:
    return any(conn.execute(f"SELECT 1 FROM {quote_name(t)} LIMIT 1").fetchone() for t in tables(conn))


# What a query may do: read. A predicted DELETE, DROP or ATTACH (which would create a file) is refused.
_READ_ONLY = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _read_only(action, *_):
    return sqlite3.SQLITE_OK if action in _READ_ONLY else sqlite3.SQLITE_DENY


def run_query(conn: sqlite3.Connection, sql: str, limits: Limits) -> Result:
    """Run one query read-only, within the time limit, keeping at most `max_rows` + 1 rows."""
    deadline = time.monotonic() + limits.timeout_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    conn.set_authorizer(_read_only)
    try:
        cur = conn.execute(sql)
        rows = cur.fetchmany(limits.max_rows + 1)
    except sqlite3.OperationalError as e:
        msg = "time limit exceeded" if "interrupt" in str(e) else str(e)
        raise QueryError(msg) from None
    except (sqlite3.Error, ValueError, OverflowError) as e:  # ValueError: e.g. a NUL character
        raise QueryError(str(e)) from None
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)
    return Result(rows[: limits.max_rows], len(rows) > limits.max_rows)


# ---------------------------------------------------------------------------- comparing results


def _norm_value(v):
    if isinstance(v, float):
        return round(v, 6) + 0.0  # 1/3 computed two ways may differ in the last bits; -0.0 == 0.0
    if isinstance(v, bytes):
        return v.hex()
    return v


def _norm_rows(rows: list[tuple]) -> list[tuple]:
    return [tuple(_norm_value(v) for v in r) for r in rows]


def same_result(gold: Result, pred: Result, ordered: bool) -> bool:
    if gold.truncated != pred.truncated:
        return False
    g, p = _norm_rows(gold.rows), _norm_rows(pred.rows)
    return g == p if ordered else Counter(g) == Counter(p)


_STRING = r"'(?:[^']|'')*'"
_QUOTED = re.compile(rf"""{_STRING}|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\]""")


def _unquoted(sql: str) -> str:
    """`sql` with quoted strings and names blanked out (same length)."""
    return _QUOTED.sub(lambda m: " " * len(m.group(0)), sql)


def orders_rows(sql: str) -> bool:
    """Whether the outermost query has ORDER BY (one inside a subquery orders nothing visible)."""
    text, depth, plain = _unquoted(sql), 0, []
    for ch in text:
        depth += ch == "("
        plain.append(ch if depth == 0 else " ")
        depth -= ch == ")" and depth > 0
    return re.search(r"\bORDER\s+BY\b", "".join(plain), re.I) is not None


# ---------------------------------------------------------------------------- synthetic rows


@dataclass
class Column:
    name: str
    kind: str  # "int", "real", "date", "text"
    notnull: bool
    pk: bool


def _kind(decl: str, name: str) -> str:
    d = decl.upper()
    if "INT" in d:
        return "int"
    if any(k in d for k in ("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL")):
        return "real"
    if "DATE" in d or "TIME" in d or re.search(r"date|time", name, re.I):
        return "date"
    return "text"


_IDENT = r"""(?:\w+\.)?(`[^`]+`|"[^"]+"|\[[^\]]+\]|\w+)"""
_VALUE = rf"({_STRING}|-?\d+(?:\.\d+)?)"
_COMPARE = re.compile(rf"{_IDENT}\s*(=|==|!=|<>|<=|>=|<|>|\bNOT\s+LIKE\b|\bLIKE\b)\s*{_VALUE}", re.I)
_IN_LIST = re.compile(rf"{_IDENT}\s+(?:NOT\s+)?IN\s*\(([^()]*)\)", re.I)
_BETWEEN = re.compile(rf"{_IDENT}\s+BETWEEN\s+{_VALUE}\s+AND\s+{_VALUE}", re.I)


@dataclass
class Literals:
    """What a gold query compares against: all its literals, and those tied to a column name."""

    strings: list[str]
    numbers: list[float]
    by_column: dict[str, list]  # lowercased column name -> values compared with it


def _literal(tok: str, like: bool = False):
    if tok.startswith("'"):
        s = tok[1:-1].replace("''", "'")
        return s.replace("%", "").replace("_", "b") if like else s  # a string the LIKE pattern matches
    return float(tok)


def gold_literals(sql: str) -> Literals:
    """The literals of a query, for seeding rows its conditions select: LIKE patterns become
    matching strings ('%Bike%' -> 'Bike'); numbers compared with < or > bring their neighbours,
    so both sides of the boundary exist; numeric strings count as numbers too."""
    by_column: dict[str, list] = {}
    likes = set()

    def tie(col: str, value) -> None:
        by_column.setdefault(col.strip('`"[]').lower(), []).append(value)

    for m in _COMPARE.finditer(sql):
        like = "LIKE" in m.group(2).upper()
        v = _literal(m.group(3), like)
        if like:
            likes.add(m.group(3))
        tie(m.group(1), v)
        if isinstance(v, float) and m.group(2) in ("<", ">", "<=", ">="):
            tie(m.group(1), v - 1)
            tie(m.group(1), v + 1)
    for m in _IN_LIST.finditer(sql):
        for tok in re.findall(rf"{_STRING}|-?\d+(?:\.\d+)?", m.group(2)):
            tie(m.group(1), _literal(tok))
    for m in _BETWEEN.finditer(sql):
        for tok in m.group(2, 3):
            tie(m.group(1), _literal(tok))
    strings = [_literal(t, like=t in likes) for t in re.findall(_STRING, sql)]
    numbers = [float(t) for t in re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])", _unquoted(sql))]
    for v in strings:
        try:
            numbers.append(float(v))
        except ValueError:
            pass
    dedup = lambda xs: list(dict.fromkeys(xs))  # noqa: E731 (keeps first-seen order)
    return Literals(dedup(strings), dedup(numbers), {k: dedup(v) for k, v in by_column.items()})


def _columns(conn: sqlite3.Connection, table: str) -> list[Column]:
    out = []
    for _cid, name, decl, notnull, _default, pk in conn.execute(f"PRAGMA table_info({quote_name(table)})"):
        out.append(Column(name, _kind(decl or "", name), bool(notnull), bool(pk)))
    return out


def fill_synthetic(conn: sqlite3.Connection, gold_sql: str, seed: int, min_rows: int = 6, max_rows: int = 16) -> None:
    """Insert seeded rows into every (empty) table of `conn`."""
    rng = random.Random(seed)
    lit = gold_literals(gold_sql)
    years = [int(n) for n in lit.numbers if n == int(n) and 1900 <= n <= 2100]
    dates = [s for s in lit.strings if re.match(r"\d{4}(-\d\d)?", s)] + [f"{y}-01-15" for y in years]
    # Small shared pools: the same key values and words appear in every table, so joins and
    # comparisons across tables find partners, as they do in real data.
    words = lit.strings + [f"w{rng.randint(0, 99)}" for _ in range(max(3, 6 - len(lit.strings)))]
    ints = [int(n) for n in lit.numbers if n == int(n) and abs(n) < 2**62]
    for table in tables(conn):
        cols = _columns(conn, table)
        if not cols:
            continue
        n = rng.randint(min_rows, max_rows)
        single_pk = sum(c.pk for c in cols) == 1
        rows = []
        for i in range(n):
            row = []
            for c in cols:
                tied = lit.by_column.get(c.name.lower())
                if c.pk and single_pk and c.kind == "int":
                    v = i + 1  # keys 1..n, the range every other int column draws from
                elif c.pk and single_pk:
                    v = words[i] if i < len(words) else f"k{i}"
                elif not c.notnull and not c.pk and rng.random() < 0.05:
                    v = None
                elif tied and rng.random() < 0.5:  # a value the gold query compares this column with
                    v = _as_kind(rng.choice(tied), c.kind)
                else:
                    v = _value(c.kind, rng, words, ints, lit.numbers, dates, max_rows)
                row.append(v)
            rows.append(row)
        names = ", ".join(quote_name(c.name) for c in cols)
        marks = ", ".join("?" * len(cols))
        conn.executemany(f"INSERT OR IGNORE INTO {quote_name(table)} ({names}) VALUES ({marks})", rows)
    conn.commit()


def _as_kind(v, kind: str):
    """A number compared with a column, stored as that column holds values."""
    if not isinstance(v, float) or kind == "real":
        return v
    whole = v == int(v)
    if kind == "int":
        return int(v) if whole else v
    return str(int(v)) if whole else str(v)


def _value(kind, rng, words, ints, numbers, dates, max_rows):
    literal = rng.random() < 0.3
    if kind == "int":
        return rng.choice(ints) if literal and ints else rng.randint(1, max_rows)
    if kind == "real":
        return rng.choice(numbers) if literal and numbers else round(rng.uniform(0, 100), 2)
    if kind == "date":
        if literal and dates:
            return rng.choice(dates)
        return f"{rng.randint(2000, 2020)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return rng.choice(words)


@dataclass
class Suite:
    """The databases one example is judged on, with the gold results on each."""

    databases: list[sqlite3.Connection]
    gold: list[Result]
    ordered: bool
    method: str  # "context rows" or "test suite"

    def close(self) -> None:
        for c in self.databases:
            c.close()


class ContextError(Exception):
    """The example's context or gold query does not run in SQLite: not the model's fault."""


def prepare_suite(context: str, gold_sql: str, seed: int, limits: Limits, n_databases: int = 3,
                  tries: int = 3) -> Suite:
    """The databases to judge a prediction on: the context itself when it has rows, else
    `n_databases` seeded fillings (up to `tries` candidates each, preferring ones where the gold
    query returns rows, which tell right from wrong far better than empty results). A gold query
    that returns rows on none of them is a ContextError: any empty answer would match it."""
    if not context.strip():
        raise ContextError("no context (CREATE TABLE statements) to build a database from")
    try:
        probe = build_database(context)
    except (sqlite3.Error, ValueError) as e:
        raise ContextError(f"context does not run in SQLite: {e}") from None
    ordered = orders_rows(gold_sql)
    if has_rows(probe):
        try:
            gold = run_query(probe, gold_sql, limits)
        except QueryError as e:
            probe.close()
            raise ContextError(f"gold query fails on the context: {e}") from None
        probe.execute("PRAGMA query_only = ON")
        return Suite([probe], [gold], ordered, "context rows")
    probe.close()
    candidates: list[tuple[sqlite3.Connection, Result]] = []
    try:
        for k in range(n_databases * tries):
            conn = build_database(context)
            fill_synthetic(conn, gold_sql, seed * 7919 + k)
            conn.execute("PRAGMA query_only = ON")
            try:
                candidates.append((conn, run_query(conn, gold_sql, limits)))
            except QueryError as e:
                conn.close()
                raise ContextError(f"gold query fails in SQLite: {e}") from None
            if sum(bool(g.rows) for _, g in candidates) >= n_databases:
                break
    except ContextError:
        for c, _ in candidates:
            c.close()
        raise
    if not any(g.rows for _, g in candidates):
        # Every prediction that selects nothing would "match": no verdict is better than a false one.
        for c, _ in candidates:
            c.close()
        raise ContextError("gold query returns no rows on any generated database: execution cannot judge it")
    # Databases where the gold query returns rows first, then empty ones if needed.
    candidates.sort(key=lambda cg: not cg[1].rows)
    for c, _ in candidates[n_databases:]:
        c.close()
    keep = candidates[:n_databases]
    return Suite([c for c, _ in keep], [g for _, g in keep], ordered, "test suite")


def judge(suite: Suite, pred_sql: str, limits: Limits) -> tuple[bool, str | None]:
    """(correct, error): error is set when the prediction fails to parse or run."""
    correct = True
    for conn, gold in zip(suite.databases, suite.gold):
        try:
            res = run_query(conn, pred_sql, limits)
        except QueryError as e:
            return False, str(e)
        correct = correct and same_result(gold, res, suite.ordered)
    return correct, None
