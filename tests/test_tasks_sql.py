"""SQL execution, test-suite databases, extraction, the synthetic generator and `slm eval-sql`."""

import json
import sqlite3

import pytest

from slm.tasks.examples import load_examples
from slm.tasks.sql.scoring import EvalSqlConfig
from slm.tasks.sql.scoring import evaluate, extract_sql, model_replier, normalize_sql
from slm.tasks.sql.execution import (ContextError, Limits, QueryError, Result, build_database, fill_synthetic, gold_literals, judge,
                                  orders_rows, prepare_suite, run_query, same_result)
from slm.tasks.sql.synthetic import SCHEMAS, TEMPLATES, generate_examples

SCHEMA = """CREATE TABLE region (id INTEGER not null primary key, region_name TEXT default NULL);
CREATE TABLE sales (region_id INTEGER, game TEXT, num_sales REAL,
    foreign key (region_id) references region(id));"""
GOLD = ("SELECT T2.game FROM region AS T1 INNER JOIN sales AS T2 ON T1.id = T2.region_id "
        "WHERE T1.region_name = 'North America' AND T2.num_sales > 0.5")


def test_time_limit_and_row_cap():
    conn = build_database("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (3);")
    slow = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT COUNT(*) FROM c"
    with pytest.raises(Exception, match="time limit"):
        run_query(conn, slow, Limits(timeout_s=0.2))
    res = run_query(conn, "SELECT * FROM t, t AS u", Limits(max_rows=5))
    assert len(res.rows) == 5 and res.truncated
    assert not run_query(conn, "SELECT * FROM t", Limits()).truncated


def test_queries_only_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conn = build_database("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2), (3);")
    for sql in ["DELETE FROM t", "DROP TABLE t", "ATTACH 'x.db' AS x", "INSERT INTO t VALUES (4)",
                "CREATE TABLE u (y)", "PRAGMA writable_schema = 1"]:
        with pytest.raises(QueryError, match="not authorized"):
            run_query(conn, sql, Limits())
    assert not list(tmp_path.iterdir())  # ATTACH made no file
    assert run_query(conn, "WITH c AS (SELECT x FROM t) SELECT COUNT(*), MAX(x) FROM c", Limits()).rows == [(3, 3)]
    conn.execute("INSERT INTO t VALUES (4)")  # the connection itself stays writable for building databases


def test_comparison_order_only_when_gold_orders():
    a, b = Result([(1,), (2,)], False), Result([(2,), (1,)], False)
    assert same_result(a, b, ordered=False) and not same_result(a, b, ordered=True)
    assert not same_result(Result([(1,), (1,)], False), Result([(1,)], False), ordered=False)  # multisets
    assert same_result(Result([(1 / 3,)], False), Result([(0.3333333333,)], False), ordered=False)
    assert orders_rows("SELECT a FROM t ORDER BY a DESC LIMIT 1")
    assert not orders_rows("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)")
    assert not orders_rows("SELECT 'ORDER BY' FROM t")


def test_literals_of_the_gold_query():
    lit = gold_literals("SELECT x FROM t WHERE a = 'It''s' AND b LIKE '%Bike_%' AND T1.c > 10 AND T1.`d e` = 'x_y' "
                        "AND f IN ('p', 3) AND g BETWEEN 1 AND 2")
    assert lit.strings == ["It's", "Bikeb", "x_y", "p"] and lit.numbers == [10.0, 3.0, 1.0, 2.0]
    assert lit.by_column == {"a": ["It's"], "b": ["Bikeb"], "c": [10.0, 9.0, 11.0], "d e": ["x_y"], "f": ["p", 3.0],
                             "g": [1.0, 2.0]}


def test_test_suite_for_schema_only_contexts():
    suite = prepare_suite(SCHEMA, GOLD, seed=1, limits=Limits(), n_databases=3)
    assert suite.method == "test suite" and len(suite.databases) == 3
    assert all(g.rows for g in suite.gold)  # databases where the gold query selects something
    # The gold literals were planted: the filter matches, so right and wrong answers differ.
    assert judge(suite, GOLD, Limits()) == (True, None)
    assert judge(suite, GOLD.replace("> 0.5", "> 0.5 ORDER BY T2.game"), Limits())[0]  # order-insensitive
    assert judge(suite, "SELECT game FROM sales", Limits()) == (False, None)
    wrong_region = GOLD.replace("North America", "Europe")
    assert not judge(suite, wrong_region, Limits())[0]
    ok, error = judge(suite, "SELECT nope FROM sales", Limits())
    assert not ok and "no such column" in error
    # Databases are read-only once built: a prediction cannot change them.
    assert "not authorized" in judge(suite, "DELETE FROM sales", Limits())[1]
    # The same seed builds the same databases.
    again = prepare_suite(SCHEMA, GOLD, seed=1, limits=Limits(), n_databases=3)
    assert [g.rows for g in again.gold] == [g.rows for g in suite.gold]
    # A gold query no filling makes return rows cannot be judged (any empty answer would match):
    # it is excluded and reported, not scored.
    with pytest.raises(ContextError, match="no rows on any generated database"):
        prepare_suite(SCHEMA, "SELECT game FROM sales WHERE num_sales > 1 AND num_sales < 0", 1, Limits())


def test_context_rows_are_used_when_present_and_broken_contexts_refused():
    ctx = "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);"
    suite = prepare_suite(ctx, "SELECT SUM(x) FROM t", 0, Limits())
    assert suite.method == "context rows" and suite.gold[0].rows == [(3,)]
    with pytest.raises(ContextError, match="does not run"):
        prepare_suite("CREATE TABLE (", "SELECT 1", 0, Limits())
    with pytest.raises(ContextError, match="gold query fails"):
        prepare_suite(ctx, "SELECT y FROM t", 0, Limits())


def test_synthetic_rows_respect_keys():
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA + "CREATE TABLE pair (a TEXT, b TEXT, PRIMARY KEY (a, b));")
    fill_synthetic(conn, GOLD, seed=0)
    ids = [r[0] for r in conn.execute("SELECT id FROM region")]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 6
    assert conn.execute("SELECT COUNT(*) FROM pair").fetchone()[0] >= 1  # duplicates ignored, not fatal


def test_extract_sql_is_fair_to_chatty_replies():
    assert extract_sql("Sure! Here it is:\n```sql\nSELECT a FROM t;\n```\nIt selects a.") == ("SELECT a FROM t", True)
    assert extract_sql("SELECT a FROM t WHERE b = 'x;y'; -- done") == ("SELECT a FROM t WHERE b = 'x;y'", True)
    assert extract_sql("To select rows, run:\n\nselect * from t\n\nThat's all.") == ("select * from t", True)
    assert extract_sql("I cannot answer that.") == (None, False)
    assert extract_sql("SELECT a FROM t WHERE b = 'x;") == ("SELECT a FROM t WHERE b = 'x", False)  # still open
    assert extract_sql("```sql\nSELECT 1") == ("SELECT 1", False)


def test_normalized_exact_match():
    assert normalize_sql("SELECT  A ,B FROM T WHERE x = 'Abc' ;") == normalize_sql("select a, b from t where X = 'Abc'")
    assert normalize_sql("SELECT a FROM t WHERE x = 'abc'") != normalize_sql("SELECT a FROM t WHERE x = 'Abc'")


def test_generator_covers_the_sql_features_and_verifies_every_query():
    rows = generate_examples(300, seed=5)
    assert rows == generate_examples(300, seed=5) and rows != generate_examples(300, seed=6)
    sqls = " ".join(r["sql"] for r in rows)
    for feature in ("WHERE", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", "JOIN", "COUNT(", "AVG(", "SUM(", "DISTINCT"):
        assert feature in sqls
    assert {r["domain"] for r in rows} == set(SCHEMAS) and len({r["sql_prompt"] for r in rows}) > 150
    for r in rows:
        conn = build_database(r["sql_context"])
        assert conn.execute(r["sql"]).fetchall()  # runs, and returns rows
    assert len(TEMPLATES) >= 10


def test_scoring_counts_right_wrong_invalid_and_exact(tmp_path):
    rows = generate_examples(4, seed=1)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _, _ = load_examples(path)
    replies = {  # a stand-in for a model: one reply per question
        examples[0].question: f"```sql\n{examples[0].completion.lower()}\n```",  # right, exact after normalizing
        examples[1].question: f"Here you go: {examples[1].completion} ; -- done",  # right and exact
        examples[2].question: "SELECT no_such_column FROM nowhere",  # invalid
        examples[3].question: "I do not know.",  # no SQL: invalid
    }
    report = evaluate(examples, lambda msgs: replies[msgs[-1]["content"].split("Question: ")[1].split("\n")[0]],
                      EvalSqlConfig(), progress=False)
    assert report["n"] == 4 and report["execution_accuracy"] == 0.5 and report["exact_match"] == 0.5
    assert report["invalid_rate"] == 0.5


def test_eval_sql_end_to_end_with_a_tiny_model(tmp_path, tiny_model):
    """The real path: open_model on an slm directory, greedy generation, extraction, SQLite."""
    from slm.artifacts import save_model
    from slm.loading import open_model

    save_model(tmp_path / "m", tiny_model)
    path = tmp_path / "d.jsonl"
    rows = generate_examples(3, seed=0) + [{"sql_context": "CREATE TABLE (", "sql_prompt": "q?", "sql": "SELECT 1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, _, _ = load_examples(path)
    report = evaluate(examples, model_replier(open_model(tmp_path / "m"), 8), EvalSqlConfig(), progress=False)
    assert report["n"] == 3 and report["skipped_contexts"] == 1 and report["method"] == {"context rows": 3}
    # A random tiny model writes no SQL: every prediction is invalid, none is right.
    assert report["execution_accuracy"] == 0.0 and report["invalid_rate"] == 1.0
    assert {"n", "execution_accuracy", "exact_match", "invalid_rate", "skipped_contexts"} <= set(report)
    assert report["examples"] and report["examples"][0]["gold"].startswith("SELECT")
