"""Fine-tuning data: formats, detection, sources, split, prompts, masking, batches."""

import json
import sqlite3

import pytest
import torch

from slm.errors import SlmError
from slm.tasks.examples import detect_format, load_examples, split_holdout
from slm.tasks.encode import IGNORE, BatchSampler, collate, encode_all, encode_example, prompt_and_completion_ids
from slm.tasks.sql.prompts import SYSTEM_PROMPT, compact_sql, prompt_messages
from slm.tokenizer import get_tokenizer

SCHEMA = "CREATE TABLE head (\n    id INTEGER primary key,\n    name   TEXT,  \"home  town\" TEXT\n);\n"
ROWS = {
    "gretel": {"sql_context": SCHEMA + "INSERT INTO head VALUES (1, 'Ann  Lee', 'Oslo');", "sql_prompt": "How many heads?",
               "sql": "SELECT COUNT(*) FROM head", "domain": "gov"},
    "bird": {"schema": SCHEMA, "question": "Name of head 1?", "evidence": "head 1 refers to id = 1",
             "SQL": "SELECT name FROM head WHERE id = 1", "db_id": "gov"},
    "sql-create-context": {"context": SCHEMA, "question": "All names?", "answer": "SELECT name FROM head"},
    "chat": {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    "prompt-completion": {"prompt": "2+2=", "completion": "4"},
}


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_formats_are_detected_and_normalized(tmp_path, fmt):
    examples, got, stats = load_examples(write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]] * 3))
    assert got == fmt and len(examples) == 3 and stats.rows == 3
    ex = examples[0]
    if fmt in ("chat", "prompt-completion"):
        assert not ex.is_sql and ex.messages[-1]["role"] == "user"
    else:
        assert ex.is_sql and ex.completion.startswith("SELECT") and "CREATE TABLE head" in ex.context
    if fmt == "bird":
        assert ex.evidence and ex.group == "gov"


def test_format_flag_and_unknown_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}])
    with pytest.raises(SlmError, match="cannot tell the data format.*--format"):
        load_examples(path)
    with pytest.raises(SlmError, match="unknown data format"):
        load_examples(path, "nope")
    # Forcing a format: rows lacking its columns are skipped and counted, then refused as empty.
    with pytest.raises(SlmError, match="no usable examples.*missing sql_context"):
        load_examples(path, "gretel")


def test_bad_lines_and_incomplete_rows_are_counted_not_fatal(tmp_path):
    good = ROWS["bird"]
    path = write_jsonl(tmp_path / "d.jsonl", [good, {**good, "SQL": ""}, good], ["{broken\n", "[1, 2]\n"])
    examples, _, stats = load_examples(path)
    assert len(examples) == 2 and stats.bad_lines == 2 and stats.skipped == {"missing SQL": 1}


def test_parquet_json_list_and_hf_local_dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [ROWS["sql-create-context"]] * 4
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert len(load_examples(tmp_path / "d.parquet")[0]) == 4
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(load_examples(tmp_path / "d.json")[0]) == 4
    # hf: goes through datasets.load_dataset, the same call that reads a hub id.
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", [ROWS["gretel"]] * 5)
    examples, fmt, _ = load_examples(f"hf:{tmp_path / 'hub'}")
    assert fmt == "gretel" and len(examples) == 5
    with pytest.raises(SlmError, match="data file not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_detection_order_prefers_specific_layouts():
    assert detect_format(["sql_context", "sql_prompt", "sql", "prompt"]) == "gretel"
    assert detect_format(["schema", "question", "SQL", "evidence", "db_id"]) == "bird"


def test_holdout_split_is_deterministic_and_order_free(tmp_path):
    rows = [{**ROWS["sql-create-context"], "question": f"q{i}?"} for i in range(200)]
    ex, _, _ = load_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    ex_rev, _, _ = load_examples(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))
    train, held = split_holdout(ex, 0.05)
    train2, held2 = split_holdout(ex_rev, 0.05)
    assert len(held) == 10 and len(train) == 190
    assert {e.question for e in held} == {e.question for e in held2}
    assert not {e.question for e in held} & {e.question for e in train}


def test_compact_sql_keeps_meaning_and_quotes():
    compact = compact_sql(SCHEMA + "INSERT INTO head VALUES (1, 'Ann  Lee', 'Oslo');")
    assert "'Ann  Lee'" in compact and '"home  town"' in compact and "  " not in compact.replace("Ann  Lee", "").replace("home  town", "")
    a, b = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    a.executescript(SCHEMA + "INSERT INTO head VALUES (1, 'Ann  Lee', 'Oslo');")
    b.executescript(compact)
    q = "SELECT * FROM head"
    assert a.execute(q).fetchall() == b.execute(q).fetchall() == [(1, "Ann  Lee", "Oslo")]
    cols = lambda c: [r[1:3] for r in c.execute("PRAGMA table_info(head)")]  # noqa: E731
    assert cols(a) == cols(b)


def test_sql_prompt_has_system_schema_question_and_hint(tmp_path):
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [ROWS["bird"]]))[0][0]
    msgs = prompt_messages(ex)
    assert msgs[0] == {"role": "system", "content": SYSTEM_PROMPT} and "database engineer" in SYSTEM_PROMPT
    user = msgs[1]["content"]
    assert user.index("CREATE TABLE head(") < user.index("Question: Name of head 1?") < user.index("Hint: head 1")


@pytest.fixture
def chat_tokenizer():
    """A GPT-2 tokenizer with a ChatML template, as an HF chat model's would be."""
    pytest.importorskip("transformers")
    from slm.interop.hf import gpt2_hf_tokenizer
    from slm.interop.hf_causal import HFTokenizer

    hf = gpt2_hf_tokenizer()
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.eos_token = "<|im_end|>"
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return HFTokenizer(hf, "gpt2-chatml")


def _check_masking(tok, ex, completion_text_end):
    enc = encode_example(tok, ex, max_seq_len=4096)
    prompt, completion = prompt_and_completion_ids(tok, ex)
    assert enc.ids == prompt + completion
    # Every prompt position is ignored; every completion position is learned.
    assert enc.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert enc.labels[len(prompt):] == completion and IGNORE not in completion
    assert tok.decode(completion).startswith(ex.completion)
    assert completion[-1] == completion_text_end
    return enc


def test_masking_plain_template_for_slm_models(tmp_path):
    tok = get_tokenizer()
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [ROWS["bird"]]))[0][0]
    _check_masking(tok, ex, tok.eot_id)
    assert tok.decode(prompt_and_completion_ids(tok, ex)[0]).endswith("### Assistant:\n")


def test_masking_chat_template(tmp_path, chat_tokenizer):
    tok = chat_tokenizer
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [ROWS["gretel"]]))[0][0]
    _check_masking(tok, ex, tok.hf.convert_tokens_to_ids("<|im_end|>"))
    prompt, _ = prompt_and_completion_ids(tok, ex)
    assert tok.hf.decode(prompt).endswith("<|im_start|>assistant\n")


def test_collate_ignores_padding_and_prompt(tmp_path):
    tok = get_tokenizer()
    rows = [ROWS["bird"], {**ROWS["bird"], "question": "A much longer question about the heads of departments?"}]
    encoded, stats = encode_all(tok, load_examples(write_jsonl(tmp_path / "d.jsonl", rows))[0], 4096)
    idx, tgt = collate(encoded, pad_id=0)
    assert idx.shape == tgt.shape == (2, max(map(len, encoded)) - 1)
    for i, e in enumerate(encoded):
        n = len(e) - 1
        assert idx[i, :n].tolist() == e.ids[:-1] and tgt[i, :n].tolist() == e.labels[1:]
        assert (tgt[i, n:] == IGNORE).all()  # padding is never learned
        n_prompt = e.labels.index(next(x for x in e.labels if x != IGNORE))
        assert (tgt[i, : n_prompt - 1] == IGNORE).all() and (tgt[i, n_prompt - 1:n] != IGNORE).all()
    assert int((tgt != IGNORE).sum()) == stats.completion_tokens


def test_truncation_left_or_drop_is_counted(tmp_path):
    tok = get_tokenizer()
    ex = load_examples(write_jsonl(tmp_path / "d.jsonl", [ROWS["bird"]]))[0]
    prompt, completion = prompt_and_completion_ids(tok, ex[0])
    limit = len(prompt) + len(completion) - 10
    kept, stats = encode_all(tok, ex, limit, "left")
    assert stats.truncated == 1 and len(kept[0]) == limit
    assert kept[0].ids == prompt[10:] + completion  # the prompt's start goes, the answer stays whole
    kept, stats = encode_all(tok, ex, limit, "drop")
    assert kept == [] and stats.dropped == 1
    kept, stats = encode_all(tok, ex, len(completion), "left")  # no room for any prompt: dropped
    assert kept == [] and stats.dropped == 1


def test_batch_sampler_resumes_exactly(tmp_path):
    tok = get_tokenizer()
    rows = [{**ROWS["prompt-completion"], "prompt": "x " * i} for i in range(1, 40)]
    data, _ = encode_all(tok, load_examples(write_jsonl(tmp_path / "d.jsonl", rows))[0], 512)
    a = BatchSampler(data, batch_size=4, seed=3)
    seen = [a.next() for _ in range(7)]
    state = a.state_dict()
    rest = [a.next() for _ in range(10)]  # crosses an epoch boundary (10 batches per epoch)
    b = BatchSampler(data, batch_size=4, seed=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, [b.next() for _ in range(10)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # An epoch serves every example once.
    c = BatchSampler(data, batch_size=4, seed=3)
    assert sum(c.next()[0].shape[0] for _ in range(c.batches_per_epoch)) == len(data)
    assert len(seen) == 7
