"""`slm eval-sql`: how often a model's SQL returns the right rows.

For each example: build its databases (sqlexec.prepare_suite: the context's own rows, or a
test suite of seeded databases for schema-only contexts), prompt the model exactly as
fine-tuning does (prompting.prompt_messages + the model's chat template), generate greedily,
extract the SQL from the reply, and run it next to the gold query.

Metrics: execution accuracy (same result on every database), exact match (after
normalizing case, whitespace and a trailing semicolon outside quotes), invalid rate
(no SQL found, or it fails to parse or run, or hits the time limit). Examples whose context or
gold query does not run in SQLite are skipped and reported, not counted as model errors.

Extraction is the same for every model, so a chatty base model is not penalized for
formatting: the first ```-fenced block, or else the first statement that starts a line with
SELECT/WITH (or an uppercase SELECT anywhere), up to its semicolon or a blank line.
Generation stops as soon as that first candidate is complete: later text cannot change it.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from slm.tasks.examples import Example
from slm.tasks.sql.prompts import compact_sql, prompt_messages
from slm.tasks.sql.execution import ContextError, Limits, judge, prepare_suite
from slm.generate import SamplingConfig, generate
from slm.prompts import chat_prompt


@dataclass
class EvalSqlConfig:
    """How `slm eval-sql` generates, runs and judges each example."""

    limit: int | None = field(default=None, metadata={"help": "evaluate the first N examples only"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest reply generated per question"})
    databases: int = field(default=3, metadata={"help": "seeded databases per schema-only context (test suite)"})
    timeout: float = field(default=5.0, metadata={"help": "seconds a query may run before it is stopped"})
    max_rows: int = field(default=10_000, metadata={"help": "rows fetched per query at most"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic database rows"})
    show: int = field(default=4, metadata={"help": "worked examples in the report"})


# ---------------------------------------------------------------------------- extracting SQL

_FENCE_OPEN = re.compile(r"```[ \t]*[A-Za-z]*[ \t]*\n?")
_START = re.compile(r"(?m)^[ \t>*]*((?i:SELECT|WITH))\b|\bSELECT\b")
# A fence, a quoted string or name (possibly still open), a semicolon, or a blank line.
_TOKEN = re.compile(r"```|'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|`[^`]*`?|;|\n[ \t]*\n")


def extract_sql(text: str) -> tuple[str | None, bool]:
    """(the first SQL candidate in `text` or None, whether it is complete)."""
    fence = _FENCE_OPEN.search(text)
    start = _START.search(text)
    if fence and (start is None or fence.start() <= start.start()):
        body = text[fence.end():]
        end = body.find("```")
        sql = (body if end < 0 else body[:end]).strip().rstrip(";").strip()
        return sql or None, end >= 0
    if start is None:
        return None, False
    body = text[start.start(1) if start.group(1) else start.start():]
    pos, complete = len(body), False
    for m in _TOKEN.finditer(body):
        tok = m.group(0)
        if tok[0] in "'\"`" and tok != "```":
            if len(tok) < 2 or tok[-1] != tok[0]:
                break  # a string still open: its end decides where the statement ends
            continue
        pos, complete = m.start(), True
        break
    return body[:pos].strip().rstrip(";").strip() or None, complete


def normalize_sql(sql: str) -> str:
    """Lowercase outside quotes, one space between tokens, no trailing semicolon."""
    compact = compact_sql(sql.strip().rstrip(";")).replace(";\n", "; ")
    parts = re.split(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")", compact)
    return "".join(p if i % 2 else p.lower() for i, p in enumerate(parts)).strip()


# ---------------------------------------------------------------------------- generation


def generate_reply(loaded, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy reply to `messages`, stopped once its first SQL candidate is complete."""
    tok = loaded.tokenizer
    prompt = tok.encode(chat_prompt(tok, messages))
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    decoder, text = tok.stream_decoder(), ""
    for t in generate(loaded.model, prompt, cfg, stop_ids=tok.stop_ids, vocab_limit=tok.n_vocab):
        text += decoder.add(t)
        if extract_sql(text)[1]:
            break
    return text + decoder.flush()


def model_replier(loaded, max_new_tokens: int) -> Callable[[list[dict]], str]:
    return lambda messages: generate_reply(loaded, messages, max_new_tokens)


# ---------------------------------------------------------------------------- evaluation


def evaluate(examples: list[Example], reply: Callable[[list[dict]], str], cfg: EvalSqlConfig,
             progress: bool = True) -> dict:
    """Score the replies `reply(messages)` gives to the examples' prompts (see
    `model_replier` for a model's)."""
    limits = Limits(cfg.timeout, cfg.max_rows)
    examples = [e for e in examples if e.is_sql][: cfg.limit]
    n = correct = exact = invalid = 0
    skipped: dict[str, int] = {}
    methods: dict[str, int] = {}
    gold_empty = 0
    shown_right, shown_wrong = [], []
    t0 = time.perf_counter()
    for i, ex in enumerate(examples):
        try:
            suite = prepare_suite(ex.context or "", ex.completion, cfg.seed * 1_000_003 + i, limits, cfg.databases)
        except ContextError as e:
            reason = str(e).split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        try:
            text = reply(prompt_messages(ex))
            pred, _ = extract_sql(text)
            ok, error = judge(suite, pred, limits) if pred else (False, "no SQL in the reply")
        finally:
            suite.close()
        n += 1
        methods[suite.method] = methods.get(suite.method, 0) + 1
        gold_empty += not any(g.rows for g in suite.gold)
        correct += ok
        invalid += error is not None
        exact += pred is not None and normalize_sql(pred) == normalize_sql(ex.completion)
        worked = {"question": ex.question, "gold": ex.completion, "reply": text[:400], "predicted": pred,
                  "correct": ok, "error": error}
        (shown_right if ok else shown_wrong).append(worked)
        if progress:
            print(f"[{i + 1}/{len(examples)}] execution accuracy {correct}/{n}, invalid {invalid}"
                  f"{'' if ok else ' (' + (error or 'wrong result') + ')'}", file=sys.stderr)
    half = cfg.show // 2
    shown = shown_right[:half] + shown_wrong[: cfg.show - min(half, len(shown_right))]
    rate = lambda k: round(k / n, 4) if n else 0.0  # noqa: E731
    return {
        "n": n,
        "execution_accuracy": rate(correct),
        "exact_match": rate(exact),
        "invalid_rate": rate(invalid),
        "skipped_contexts": sum(skipped.values()),
        "skipped_reasons": skipped,
        "method": methods,  # "context rows" or "test suite" -> examples judged that way
        "test_suite_databases": cfg.databases,
        "gold_empty_everywhere": gold_empty,  # judged on context rows where the gold result is empty
        "seconds": round(time.perf_counter() - t0, 1),
        "examples": shown,
    }
