"""Text-to-SQL prompts: the same messages for fine-tuning, `slm eval-sql` and serving.

A SQL example becomes two chat messages, rendered later by `slm.prompts.chat_prompt` (the
model's chat template, or slm's plain template for slm's own models):

    system: SYSTEM_PROMPT
    user:   Database schema:
            CREATE TABLE head(id INTEGER primary key, name TEXT);
            ...

            Question: How many heads are there?

            Hint: ...            (BIRD's evidence, when the row has one)

The schema is compacted (runs of whitespace outside quoted names and strings become one
space, one statement per line): BIRD's schemas are indented for people, and the spaces cost a
share of the prompt's tokens (bench/README.md) without telling the model anything.
"""

from __future__ import annotations

import re

from slm.tasks.examples import Example

SYSTEM_PROMPT = (
    "You are a database engineer. Given a database schema and a question, write one valid SQLite "
    "query that answers the question, using only the tables and columns of the schema. "
    "Reply with the SQL query only."
)

# A quoted string or name (kept as is), punctuation with the spaces around it, or a space run.
_SQL_PIECES = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*"|`[^`]*`|\[[^\]]*\])|\s*([(),;])\s*|(\s+)""")
_PUNCT = {"(": "(", ")": ")", ",": ", ", ";": ";\n"}


def compact_sql(text: str) -> str:
    """Whitespace-compacted SQL that SQLite reads exactly as the original (tested)."""
    def piece(m: re.Match) -> str:
        if m.group(1):
            return m.group(1)
        if m.group(2):
            return _PUNCT[m.group(2)]
        return " "

    return _SQL_PIECES.sub(piece, text).strip()


def user_message(ex: Example) -> str:
    parts = [f"Database schema:\n{compact_sql(ex.context or '')}", f"Question: {ex.question}"]
    if ex.evidence:
        parts.append(f"Hint: {ex.evidence}")
    return "\n\n".join(parts)


def prompt_messages(ex: Example) -> list[dict]:
    """The messages the model answers: SQL examples get the system prompt, chat data its own."""
    if ex.is_sql:
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_message(ex)}]
    return list(ex.messages or [])
