import hashlib
import shutil

import pytest
import tiktoken

from slm.errors import SlmError
from slm.tokenizer import (
    TextDecoder, Tokenizer, TokenizerIdentity, default_bpe_dir, fingerprint, get_tokenizer, load_gpt2_encoding,
)

SAMPLES = ["Hello world", "  leading spaces\n\nand 'quotes' don't", "naïve café 東京 🙂", "x" * 1000, "<|endoftext|>"]


def test_gpt2_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256 and tok.n_vocab == 50257
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s


def test_special_token_text_is_not_special():
    # Untrusted text spelling <|endoftext|> must not become the end-of-text id.
    assert 50256 not in get_tokenizer().encode("<|endoftext|>")


def test_identical_to_tiktoken_own_gpt2(tmp_path, monkeypatch):
    """Seed tiktoken's own cache (keyed by the SHA-1 of its download URLs) with the package's
    files, then compare what tiktoken.get_encoding("gpt2") builds with ours."""
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copy(default_bpe_dir() / name, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding built before the env change
    theirs = tiktoken.get_encoding("gpt2")
    ours = get_tokenizer().encoding
    assert ours._mergeable_ranks == theirs._mergeable_ranks
    assert ours._special_tokens == theirs._special_tokens
    assert ours._pat_str == theirs._pat_str
    assert fingerprint(ours) == fingerprint(theirs)
    for s in SAMPLES:
        assert ours.encode_ordinary(s) == theirs.encode_ordinary(s)


def test_corrupted_vocab_is_a_clear_error(tmp_path):
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(default_bpe_dir() / name, tmp_path / name)
    data = bytearray((tmp_path / "vocab.bpe").read_bytes())
    data[1000] ^= 1
    (tmp_path / "vocab.bpe").write_bytes(bytes(data))
    with pytest.raises(SlmError, match="corrupted"):
        load_gpt2_encoding(tmp_path)


def test_missing_vocab_is_a_clear_error(tmp_path):
    shutil.copy(default_bpe_dir() / "vocab.bpe", tmp_path / "vocab.bpe")
    with pytest.raises(SlmError, match="encoder.json"):
        load_gpt2_encoding(tmp_path)


def test_fingerprint_depends_on_special_tokens():
    enc = get_tokenizer().encoding
    other = tiktoken.Encoding("gpt2", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                              special_tokens={"<|endoftext|>": 50256, "<|pad|>": 50257})
    assert fingerprint(other) != fingerprint(enc)


def test_mismatch_names_both_tokenizers():
    tok = get_tokenizer()
    tok.check(tok.identity.to_dict(), "model X")  # same identity: accepted
    with pytest.raises(SlmError) as e:
        tok.check(TokenizerIdentity("gpt2", "ab" * 32), "model X")
    msg = str(e.value)
    assert "tokenizer mismatch" in msg and "abababababab" in msg and tok.identity.fingerprint[:12] in msg
    with pytest.raises(SlmError, match="no tokenizer identity"):
        tok.check(None, "model X")


def test_text_decoder_joins_split_characters():
    tok = get_tokenizer()
    ids = tok.encode("東京 🙂")
    dec = TextDecoder(tok)
    assert "".join(dec.add(i) for i in ids) + dec.flush() == "東京 🙂"


def test_encode_batch_matches_single():
    tok = Tokenizer(get_tokenizer().encoding)
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
