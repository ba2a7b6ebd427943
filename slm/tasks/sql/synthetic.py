"""An offline generator of verified text-to-SQL examples (the default data without the hub).

Five small databases (company, library, shop, school, sports). Every example gets its own
seeded rows, written into its context as CREATE TABLE + INSERT statements (the gretel layout:
`sql_context`, `sql_prompt`, `sql`, plus `domain`), a question in one of several phrasings,
and a gold query covering SELECT/WHERE, aggregates, GROUP BY/HAVING, ORDER BY/LIMIT and
JOINs. Each gold query is executed in SQLite on its context while generating; one that fails
or returns no rows is replaced by another draw, so every example teaches a query that works.
"""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from slm.errors import SlmError


@dataclass
class Col:
    name: str
    kind: str  # "id", "name", "cat", "num", "fk"
    values: tuple = ()  # name/cat: the words; num: (low, high, step)
    ref: str | None = None  # fk: the referenced table

    @property
    def noun(self) -> str:
        return self.name.replace("_", " ")


@dataclass
class Table:
    name: str
    noun: str
    plural: str
    cols: list[Col] = field(default_factory=list)

    def of(self, kind: str) -> list[Col]:
        return [c for c in self.cols if c.kind == kind]


PEOPLE = ("Ava Chen", "Liam Patel", "Noah Kim", "Emma Rossi", "Mia Novak", "Lucas Silva", "Zoe Martin", "Omar Haddad",
          "Ines Garcia", "Yuki Tanaka", "Leo Dubois", "Sara Berg", "Ivan Petrov", "Nora Ali", "Hugo Weber", "Maya Cohen")
CITIES = ("Berlin", "Lyon", "Osaka", "Austin", "Porto", "Oslo")

SCHEMAS = {
    "company": [
        Table("departments", "department", "departments", [
            Col("id", "id"), Col("name", "name", ("Sales", "Engineering", "Marketing", "Finance", "Support", "Legal")),
            Col("budget", "num", (100_000, 900_000, 1000))]),
        Table("employees", "employee", "employees", [
            Col("id", "id"), Col("name", "name", PEOPLE), Col("department_id", "fk", ref="departments"),
            Col("salary", "num", (30_000, 120_000, 500)), Col("city", "cat", CITIES),
            Col("hire_year", "num", (2005, 2023, 1))]),
    ],
    "library": [
        Table("authors", "author", "authors", [
            Col("id", "id"), Col("name", "name", PEOPLE), Col("country", "cat", ("France", "Japan", "Brazil", "Canada", "Kenya")),
            Col("birth_year", "num", (1900, 1990, 1))]),
        Table("books", "book", "books", [
            Col("id", "id"), Col("title", "name", ("Night Train", "Blue River", "Paper Moon", "Cold Stars", "Salt Road",
                                                  "Glass City", "Iron Garden", "Quiet Sea", "Red Hills", "Last Winter")),
            Col("author_id", "fk", ref="authors"), Col("genre", "cat", ("mystery", "poetry", "history", "fantasy")),
            Col("pages", "num", (90, 900, 1)), Col("published_year", "num", (1950, 2023, 1))]),
    ],
    "shop": [
        Table("customers", "customer", "customers", [
            Col("id", "id"), Col("name", "name", PEOPLE), Col("city", "cat", CITIES), Col("age", "num", (18, 80, 1))]),
        Table("products", "product", "products", [
            Col("id", "id"), Col("name", "name", ("desk lamp", "kettle", "backpack", "monitor", "headphones",
                                                 "chair", "notebook", "umbrella")),
            Col("category", "cat", ("home", "office", "electronics", "travel")), Col("price", "num", (2, 500, 0.5))]),
        Table("orders", "order", "orders", [
            Col("id", "id"), Col("customer_id", "fk", ref="customers"), Col("product_id", "fk", ref="products"),
            Col("quantity", "num", (1, 10, 1)), Col("order_year", "num", (2019, 2024, 1))]),
    ],
    "school": [
        Table("students", "student", "students", [
            Col("id", "id"), Col("name", "name", PEOPLE), Col("city", "cat", CITIES), Col("age", "num", (11, 18, 1))]),
        Table("courses", "course", "courses", [
            Col("id", "id"), Col("title", "name", ("Algebra", "Biology", "Chemistry", "Drawing", "Economics", "French")),
            Col("credits", "num", (1, 6, 1))]),
        Table("enrollments", "enrollment", "enrollments", [
            Col("id", "id"), Col("student_id", "fk", ref="students"), Col("course_id", "fk", ref="courses"),
            Col("score", "num", (40, 100, 1))]),
    ],
    "sports": [
        Table("teams", "team", "teams", [
            Col("id", "id"), Col("name", "name", ("Falcons", "Tigers", "Rovers", "Comets", "Wolves", "Pirates")),
            Col("city", "cat", CITIES), Col("founded_year", "num", (1880, 2010, 1))]),
        Table("players", "player", "players", [
            Col("id", "id"), Col("name", "name", PEOPLE), Col("team_id", "fk", ref="teams"),
            Col("position", "cat", ("goalkeeper", "defender", "midfielder", "forward")),
            Col("goals", "num", (0, 40, 1)), Col("age", "num", (18, 38, 1))]),
    ],
}
SQL_TYPES = {"id": "INTEGER PRIMARY KEY", "name": "TEXT", "cat": "TEXT", "fk": "INTEGER"}


def _sql_literal(v) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else repr(v)


def _num_type(c: Col) -> str:
    return "REAL" if isinstance(c.values[2], float) else "INTEGER"


def make_rows(schema: list[Table], rng: random.Random) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for t in schema:  # parents come first in SCHEMAS
        n = rng.randint(5, 8)
        names = {c.name: rng.sample(c.values, min(n, len(c.values))) for c in t.of("name")}
        n = min([n] + [len(v) for v in names.values()])
        out = []
        for i in range(n):
            r = {}
            for c in t.cols:
                if c.kind == "id":
                    r[c.name] = i + 1
                elif c.kind == "name":
                    r[c.name] = names[c.name][i]
                elif c.kind == "cat":
                    r[c.name] = rng.choice(c.values)
                elif c.kind == "fk":
                    r[c.name] = rng.randint(1, len(rows[c.ref]))
                else:
                    lo, hi, step = c.values
                    v = lo + step * rng.randint(0, int((hi - lo) / step))
                    r[c.name] = round(v, 2) if isinstance(step, float) else int(v)
            out.append(r)
        rows[t.name] = out
    return rows


def context_sql(schema: list[Table], rows: dict[str, list[dict]]) -> str:
    parts = []
    for t in schema:
        cols = ", ".join(f"{c.name} {SQL_TYPES.get(c.kind) or _num_type(c)}" for c in t.cols)
        parts.append(f"CREATE TABLE {t.name} ({cols});")
    for t in schema:
        vals = ", ".join("(" + ", ".join(_sql_literal(r[c.name]) for c in t.cols) + ")" for r in rows[t.name])
        parts.append(f"INSERT INTO {t.name} VALUES {vals};")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- question templates
# Each takes (rng, table, schema, rows) and returns (question, sql) or None when it does not apply.


def _pick(rng, seq):
    return rng.choice(seq) if seq else None


def t_filter_num(rng, t, s, rows):
    name, num = _pick(rng, t.of("name")), _pick(rng, t.of("num"))
    if not (name and num):
        return None
    v = rng.choice(rows[t.name])[num.name]
    op, words = rng.choice([(">", ("greater than", "above", "more than")), ("<", ("less than", "below", "under"))])
    w = rng.choice(words)
    q = rng.choice([f"List the {name.noun}s of {t.plural} with {num.noun} {w} {v}.",
                    f"Which {t.plural} have {num.noun} {w} {v}? Give their {name.noun}s.",
                    f"Show the {name.noun} of every {t.noun} whose {num.noun} is {w} {v}."])
    return q, f"SELECT {name.name} FROM {t.name} WHERE {num.name} {op} {v}"


def t_count_cat(rng, t, s, rows):
    cat = _pick(rng, t.of("cat"))
    if not cat:
        return None
    v = rng.choice(rows[t.name])[cat.name]
    q = rng.choice([f"How many {t.plural} have {cat.noun} {v}?", f"Count the {t.plural} whose {cat.noun} is {v}.",
                    f"What is the number of {t.plural} with {cat.noun} '{v}'?"])
    return q, f"SELECT COUNT(*) FROM {t.name} WHERE {cat.name} = {_sql_literal(v)}"


AGGS = {"AVG": ("average", "mean"), "MAX": ("highest", "maximum", "largest"), "MIN": ("lowest", "minimum", "smallest"),
        "SUM": ("total",)}


def t_aggregate(rng, t, s, rows):
    num = _pick(rng, t.of("num"))
    if not num:
        return None
    agg = rng.choice(list(AGGS))
    w = rng.choice(AGGS[agg])
    cat = _pick(rng, t.of("cat"))
    if cat and rng.random() < 0.5:
        v = rng.choice(rows[t.name])[cat.name]
        q = rng.choice([f"What is the {w} {num.noun} of {t.plural} with {cat.noun} {v}?",
                        f"Find the {w} {num.noun} among {t.plural} whose {cat.noun} is {v}."])
        return q, f"SELECT {agg}({num.name}) FROM {t.name} WHERE {cat.name} = {_sql_literal(v)}"
    q = rng.choice([f"What is the {w} {num.noun} of all {t.plural}?", f"Find the {w} {num.noun} across {t.plural}.",
                    f"Compute the {w} {num.noun} of the {t.plural}."])
    return q, f"SELECT {agg}({num.name}) FROM {t.name}"


def t_group_count(rng, t, s, rows):
    cat = _pick(rng, t.of("cat"))
    if not cat:
        return None
    q = rng.choice([f"How many {t.plural} are there for each {cat.noun}?", f"Count the {t.plural} per {cat.noun}.",
                    f"For every {cat.noun}, give the number of {t.plural}."])
    return q, f"SELECT {cat.name}, COUNT(*) FROM {t.name} GROUP BY {cat.name}"


def t_group_agg(rng, t, s, rows):
    cat, num = _pick(rng, t.of("cat")), _pick(rng, t.of("num"))
    if not (cat and num):
        return None
    agg = rng.choice(["AVG", "MAX", "SUM"])
    w = rng.choice(AGGS[agg])
    q = rng.choice([f"What is the {w} {num.noun} of {t.plural} in each {cat.noun}?",
                    f"For each {cat.noun}, show the {w} {num.noun} of its {t.plural}."])
    return q, f"SELECT {cat.name}, {agg}({num.name}) FROM {t.name} GROUP BY {cat.name}"


def t_having(rng, t, s, rows):
    cat = _pick(rng, t.of("cat"))
    if not cat:
        return None
    k = rng.randint(1, 2)
    q = rng.choice([f"Which {cat.noun} values have more than {k} {t.plural}?",
                    f"List each {cat.noun} shared by more than {k} {t.plural}."])
    return q, f"SELECT {cat.name} FROM {t.name} GROUP BY {cat.name} HAVING COUNT(*) > {k}"


def t_top(rng, t, s, rows):
    name, num = _pick(rng, t.of("name")), _pick(rng, t.of("num"))
    if not (name and num):
        return None
    desc = rng.random() < 0.6
    word = "highest" if desc else "lowest"
    order = "DESC" if desc else "ASC"
    k = rng.choice([1, 1, 2, 3])
    if k == 1:
        q = rng.choice([f"Which {t.noun} has the {word} {num.noun}? Give its {name.noun}.",
                        f"What is the {name.noun} of the {t.noun} with the {word} {num.noun}?"])
    else:
        q = rng.choice([f"List the {name.noun}s of the {k} {t.plural} with the {word} {num.noun}.",
                        f"Show the top {k} {t.plural} by {'highest' if desc else 'lowest'} {num.noun}."])
    return q, f"SELECT {name.name} FROM {t.name} ORDER BY {num.name} {order} LIMIT {k}"


def t_sorted(rng, t, s, rows):
    name, num = _pick(rng, t.of("name")), _pick(rng, t.of("num"))
    if not (name and num):
        return None
    q = rng.choice([f"List all {t.plural} sorted by {num.noun} from high to low, showing {name.noun} and {num.noun}.",
                    f"Show the {name.noun} and {num.noun} of every {t.noun}, largest {num.noun} first."])
    return q, f"SELECT {name.name}, {num.name} FROM {t.name} ORDER BY {num.name} DESC"


def _fk(rng, t, s):
    fk = _pick(rng, t.of("fk"))
    if not fk:
        return None, None
    return fk, next(p for p in s if p.name == fk.ref)


def t_join_filter(rng, t, s, rows):
    fk, p = _fk(rng, t, s)
    if not fk:
        return None
    pcol = _pick(rng, p.of("name") + p.of("cat"))
    shown = _pick(rng, t.of("name") + t.of("num"))
    if not (pcol and shown):
        return None
    v = rng.choice(rows[p.name])[pcol.name]
    q = rng.choice([f"List the {shown.noun} of {t.plural} whose {p.noun} has {pcol.noun} {v}.",
                    f"For {t.plural} linked to the {p.noun} with {pcol.noun} {v}, show their {shown.noun}."])
    return q, (f"SELECT T1.{shown.name} FROM {t.name} AS T1 JOIN {p.name} AS T2 ON T1.{fk.name} = T2.id "
               f"WHERE T2.{pcol.name} = {_sql_literal(v)}")


def t_join_count(rng, t, s, rows):
    fk, p = _fk(rng, t, s)
    if not fk or not p.of("name"):
        return None
    pname = p.of("name")[0]
    q = rng.choice([f"How many {t.plural} does each {p.noun} have? Show the {p.noun} {pname.noun}.",
                    f"For each {p.noun} {pname.noun}, count its {t.plural}."])
    return q, (f"SELECT T2.{pname.name}, COUNT(*) FROM {t.name} AS T1 JOIN {p.name} AS T2 ON T1.{fk.name} = T2.id "
               f"GROUP BY T2.{pname.name}")


def t_join_top(rng, t, s, rows):
    fk, p = _fk(rng, t, s)
    num = _pick(rng, t.of("num"))
    if not fk or not num or not p.of("name"):
        return None
    pname = p.of("name")[0]
    q = rng.choice([f"Which {p.noun} has the highest total {num.noun} over its {t.plural}? Give its {pname.noun}.",
                    f"Find the {p.noun} {pname.noun} with the largest sum of {t.noun} {num.noun}."])
    return q, (f"SELECT T2.{pname.name} FROM {t.name} AS T1 JOIN {p.name} AS T2 ON T1.{fk.name} = T2.id "
               f"GROUP BY T2.id ORDER BY SUM(T1.{num.name}) DESC LIMIT 1")


def t_distinct_and(rng, t, s, rows):
    cat, num = _pick(rng, t.of("cat")), _pick(rng, t.of("num"))
    if not (cat and num):
        return None
    v = rng.choice(rows[t.name])[num.name]
    q = rng.choice([f"Which distinct {cat.noun} values appear among {t.plural} with {num.noun} at least {v}?",
                    f"List the different {cat.noun}s of {t.plural} whose {num.noun} is {v} or more."])
    return q, f"SELECT DISTINCT {cat.name} FROM {t.name} WHERE {num.name} >= {v}"


TEMPLATES = [t_filter_num, t_count_cat, t_aggregate, t_group_count, t_group_agg, t_having, t_top, t_sorted,
             t_join_filter, t_join_count, t_join_top, t_distinct_and]


def generate_examples(n: int, seed: int = 0, domains: list[str] | None = None) -> list[dict]:
    """`n` verified examples (gretel layout). The same (n, seed, domains) give the same rows."""
    domains = domains or list(SCHEMAS)
    unknown = set(domains) - set(SCHEMAS)
    if unknown:
        raise SlmError(f"unknown domains {sorted(unknown)}; choose from {', '.join(SCHEMAS)}")
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        domain = rng.choice(domains)
        schema = SCHEMAS[domain]
        rows = make_rows(schema, rng)
        context = context_sql(schema, rows)
        for _ in range(20):  # draws until a query runs and returns rows
            made = rng.choice(TEMPLATES)(rng, rng.choice(schema), schema, rows)
            if made and _verified(context, made[1]):
                out.append({"domain": domain, "sql_context": context, "sql_prompt": made[0], "sql": made[1]})
                break
    return out


def _verified(context: str, sql: str) -> bool:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
        return bool(conn.execute(sql).fetchall())
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path
