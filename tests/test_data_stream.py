"""TokenStream: packing, split, shuffle, sharding over ranks x workers, exact resume."""

import json
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch

from datautil import corpus, make_docs, mixed_folder, write_parquet
from slm.data import DataConfig, TokenStream
from slm.data.documents import Splitter
from slm.data.producer import Producer
from slm.data.sources import resolve_source
from slm.errors import SlmError
from slm.tokenizer import get_tokenizer


def take(stream, k):
    it = iter(stream)
    out = [next(it) for _ in range(k)]
    it.close()
    return out


def doc_tokens(text):
    return get_tokenizer().encode(text) + [get_tokenizer().eot_id]


def stream_tokens(batches):
    """The token stream behind consecutive batches (each batch's rows advance by T, overlap by one)."""
    toks = []
    for x, y in batches:
        toks += x.flatten().tolist()
    return toks + [batches[-1][1][-1, -1].item()]


def split_docs(tokens):
    """Documents (as token tuples) of a token stream, cut at <|endoftext|>."""
    eot = get_tokenizer().eot_id
    docs, cur = [], []
    for t in tokens:
        if t == eot:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def test_batches_shape_shift_and_packing(tmp_path):
    d, docs = corpus(tmp_path, n_files=1, docs_per_file=60)
    cfg = DataConfig(source=str(d), val_percent=0, test_percent=0)
    batches = take(TokenStream(cfg, split="train", block_size=16, batch_size=4, loop=False, shuffle=False), 10)
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(x[1:, 0], y[:-1, -1])  # rows continue each other: no token skipped, no padding
    for (x0, y0), (x1, _) in zip(batches, batches[1:]):
        assert x1[0, 0] == y0[-1, -1]
    expected = [t for doc in docs for t in doc_tokens(doc)]
    got = stream_tokens(batches)
    assert got == expected[:len(got)]


def test_one_call_encoding_equals_per_document(shared_data):
    import pyarrow.parquet as pq

    texts = pq.read_table(shared_data / "fineweb_edu_sample" / "part-000.parquet").column("text").to_pylist()
    texts += ["spells <|endoftext|> itself", "naïve café 東京 🙂", "  spaces\n\n"]
    p = Producer(DataConfig(), resolve_source(str(shared_data / "fineweb_edu_sample")), "train")
    tokens, ends = p.encode(texts)
    assert tokens.tolist() == [t for doc in texts for t in doc_tokens(doc)]
    assert ends.tolist() == np.cumsum([len(doc_tokens(doc)) for doc in texts]).tolist()


def test_split_is_stable_disjoint_and_complete(tmp_path):
    docs = make_docs(3000)
    cfg = DataConfig(val_percent=5, test_percent=5)
    s = Splitter(cfg.val_percent, cfg.test_percent)
    counts = Counter(s.split_of(d) for d in docs)
    assert 100 < counts["val"] < 200 and 100 < counts["test"] < 200
    # Same split whatever the file layout: one file, or reversed over three files.
    write_parquet(tmp_path / "a" / "one.parquet", docs, 100)
    for i in range(3):
        write_parquet(tmp_path / "b" / f"p{i}.parquet", docs[::-1][i * 1000:(i + 1) * 1000], 64)
    for split in ("train", "val", "test"):
        got = []
        for src in ("a", "b"):
            c = DataConfig(source=str(tmp_path / src), val_percent=5, test_percent=5)
            got.append(sorted(t for _, t in Producer(c, resolve_source(c.source), split).documents()))
        assert got[0] == got[1] == sorted(d for d in docs if s.split_of(d) == split)


def test_shuffle_is_seeded_and_bounded(tmp_path):
    d, docs = corpus(tmp_path, n_files=2, docs_per_file=200)
    cfg = DataConfig(source=str(d), val_percent=0, test_percent=0, shuffle_buffer=50)

    def order(seed):
        return split_docs(stream_tokens(take(TokenStream(cfg, block_size=32, batch_size=4, seed=seed), 40)))

    a, b, c = order(1), order(1), order(2)
    assert a == b and a != c
    in_file_order = [tuple(get_tokenizer().encode(t)) for t in docs]
    assert a[:30] != in_file_order[:30]
    # Bounded: the first window is 50 documents, all from the first unit-ordered row groups read.
    window = set(a[:50])
    assert len(window) == 50 and window <= set(in_file_order)


def test_val_stream_is_finite_and_deterministic(tmp_path):
    d, _ = corpus(tmp_path, n_files=2, docs_per_file=300)
    cfg = DataConfig(source=str(d), val_percent=20, test_percent=0)

    def run():
        s = TokenStream(cfg, split="val", block_size=8, batch_size=2, loop=False)
        return [torch.stack([x, y]) for x, y in s]

    a, b = run(), run()
    assert 10 < len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def test_loop_reports_passes(tmp_path):
    d, _ = corpus(tmp_path, n_files=1, docs_per_file=20)
    cfg = DataConfig(source=str(d), val_percent=0, test_percent=0)
    s = TokenStream(cfg, block_size=32, batch_size=2, seed=0)
    it = iter(s)
    passes = [(next(it), s.pass_index)[1] for _ in range(40)]
    assert passes[0] == 0 and passes[-1] >= 2 and passes == sorted(passes)


def one_pass_documents(cfg, split, world_size, workers):
    """Every document the ranks x workers of one pass see (block 1, batch 1: no token is dropped).
    Batches come round robin from the workers; the state says which worker made each."""
    cfg = DataConfig(**{**cfg.to_dict(), "num_workers": workers})
    seen = Counter()
    for rank in range(world_size):
        s = TokenStream(cfg, split=split, block_size=1, batch_size=1, rank=rank, world_size=world_size, loop=False,
                        seed=3)
        per_worker = {}
        for x, y in s:
            w = (s.state_dict()["next"] - 1) % max(1, workers)
            per_worker.setdefault(w, []).append((x.clone(), y.clone()))
        for batches in per_worker.values():
            seen.update(split_docs(stream_tokens(batches)))
    return seen


def test_ranks_times_workers_see_each_document_once(tmp_path):
    d, docs = corpus(tmp_path, n_files=3, docs_per_file=40, row_group_size=10)
    cfg = DataConfig(source=str(d), val_percent=10, test_percent=0, shuffle_buffer=16)
    alone = one_pass_documents(cfg, "train", 1, 0)
    split = Splitter(10, 0)
    assert alone == Counter(tuple(get_tokenizer().encode(t)) for t in docs if split.split_of(t) == "train")
    assert one_pass_documents(cfg, "train", 2, 2) == alone  # 2 ranks x 2 worker processes


def test_consumers_partition_units(tmp_path):
    d, docs = corpus(tmp_path, n_files=3, docs_per_file=40, row_group_size=7)
    cfg = DataConfig(source=str(d), val_percent=0, test_percent=0)
    src = resolve_source(cfg.source)
    parts = [Counter(t for _, t in Producer(cfg, src, "train", consumer=k, consumers=4).documents()) for k in range(4)]
    assert all(parts) and sum(parts, Counter()) == Counter(docs)


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from slm.data import DataConfig, TokenStream
    args = json.loads(sys.argv[1])
    s = TokenStream(DataConfig(**args["cfg"]), block_size=args["T"], batch_size=args["B"], seed=args["seed"])
    s.load_state_dict(json.loads(open(args["state"]).read()))
    it = iter(s)
    out = [next(it) for _ in range(args["m"])]
    np.save(args["out"], np.stack([np.stack([x.numpy(), y.numpy()]) for x, y in out]))
    print(json.dumps(s.stats))
""")


@pytest.mark.parametrize("workers,ks", [(0, (1, 57, 128)), (2, (128,))])
def test_exact_resume_in_a_fresh_process(tmp_path, workers, ks):
    """k batches, state saved as JSON, a new process resumes: its m batches are batches k+1..k+m
    of the uninterrupted run, bit for bit (k=128 is in the second pass)."""
    d, _ = corpus(tmp_path, n_files=3, docs_per_file=100, row_group_size=20)
    cfg = DataConfig(source=str(d), shuffle_buffer=40, num_workers=workers, prefetch=3)
    T, B, seed, m = 16, 3, 5, 12
    full = take(TokenStream(cfg, block_size=T, batch_size=B, seed=seed), 140)  # ~3 passes
    for k in ks:
        s = TokenStream(cfg, block_size=T, batch_size=B, seed=seed)
        take(s, k)
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps(s.state_dict()))
        args = {"cfg": cfg.to_dict(), "T": T, "B": B, "seed": seed, "m": m, "state": str(state_file),
                "out": str(tmp_path / "out.npy")}
        subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(args)], check=True, capture_output=True)
        got = np.load(tmp_path / "out.npy")
        want = np.stack([np.stack([x.numpy(), y.numpy()]) for x, y in full[k:k + m]])
        assert np.array_equal(got, want), f"resume after {k} batches differs"


def test_resume_cost_does_not_grow_with_position():
    """A resumed stream re-reads at most one shuffle window (plus the rest of a reader batch),
    wherever the saved position is."""
    cfg = DataConfig(source="wiki-vital", shuffle_buffer=64)
    rows = {}
    for k in (2, 1200):
        s = TokenStream(cfg, block_size=256, batch_size=8, seed=0)
        it = iter(s)
        for _ in range(k):
            next(it)
        read_before = s.stats["rows"]
        state = s.state_dict()
        it.close()
        cfg_sync = DataConfig(**{**cfg.to_dict(), "prefetch": 0})  # no read-ahead: count what one batch needs
        r = TokenStream(cfg_sync, block_size=256, batch_size=8, seed=0)
        r.load_state_dict(state)
        next(iter(r))
        rows[k] = (read_before, r.stats["rows"])
    bound = 64 * 2 + 2 * 1024  # one window of train documents, at most two reader batches around it
    assert rows[1200][0] > 10 * bound  # the uninterrupted stream had read far more ...
    assert rows[2][1] <= bound and rows[1200][1] <= bound  # ... than any resume re-reads


def test_state_is_json_and_checked(tmp_path):
    d, _ = corpus(tmp_path, n_files=2, docs_per_file=50)
    cfg = DataConfig(source=str(d))
    s = TokenStream(cfg, block_size=8, batch_size=2, seed=1)
    take(s, 3)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["batches"] == 3
    with pytest.raises(SlmError, match="seed"):
        TokenStream(cfg, block_size=8, batch_size=2, seed=2).load_state_dict(state)
    with pytest.raises(SlmError, match="world_size"):
        TokenStream(cfg, block_size=8, batch_size=2, seed=1, world_size=2).load_state_dict(state)
    write_parquet(d / "part-999.parquet", make_docs(5, seed=9))
    with pytest.raises(SlmError, match="data files changed"):
        TokenStream(cfg, block_size=8, batch_size=2, seed=1).load_state_dict(state)


def test_state_is_what_the_consumer_received(tmp_path):
    """With a deep prefetch queue the producer runs ahead; the state must not."""
    d, _ = corpus(tmp_path, n_files=2, docs_per_file=100)
    cfg = DataConfig(source=str(d), prefetch=50)
    s = TokenStream(cfg, block_size=8, batch_size=2, seed=1)
    it = iter(s)
    first = [next(it) for _ in range(3)]
    state = s.state_dict()
    rest = [next(it) for _ in range(5)]
    it.close()
    r = TokenStream(cfg, block_size=8, batch_size=2, seed=1)
    r.load_state_dict(state)
    again = take(r, 5)
    assert state["batches"] == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(rest, again))
    assert not torch.equal(first[0][0], again[0][0])


def test_bad_input_is_skipped_and_counted_once(tmp_path):
    """Training over the acceptance check's folder (corrupt shard, null/empty rows, bad JSONL
    lines) runs through several passes; each bad item is counted once, in the first pass."""
    d = mixed_folder(tmp_path / "mixed")
    s = TokenStream(DataConfig(source=str(d), val_percent=0, test_percent=0), block_size=64, batch_size=4)
    it = iter(s)
    while s.pass_index < 3:
        next(it)
    assert s.skipped == Counter({"unreadable_file": 1, "null_text": 25, "empty_text": 25, "invalid_utf8": 1,
                                 "invalid_json": 1, "missing_field": 1})
    state = json.loads(json.dumps(s.state_dict()))
    it.close()
    r = TokenStream(DataConfig(source=str(d), val_percent=0, test_percent=0), block_size=64, batch_size=4)
    r.load_state_dict(state)
    next(iter(r))
    assert r.skipped == s.skipped  # the counts travel with the state


def test_zero_usable_documents_is_an_error(tmp_path):
    write_parquet(tmp_path / "d" / "empty.parquet", [None, "", "   "])
    s = TokenStream(DataConfig(source=str(tmp_path / "d")), block_size=8, batch_size=2)
    with pytest.raises(SlmError, match="no usable documents.*empty_text=2.*null_text=1"):
        next(iter(s))


def test_bad_arguments():
    with pytest.raises(SlmError, match="split"):
        TokenStream(DataConfig(), split="dev")
    with pytest.raises(SlmError, match="rank"):
        TokenStream(DataConfig(), rank=2, world_size=2)
    with pytest.raises(SlmError, match="val_percent"):
        DataConfig(val_percent=60, test_percent=50)
