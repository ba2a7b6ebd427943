"""Streaming token data: sources -> documents -> split -> shuffle -> tokens -> packed (x, y) batches.

    from slm.data import DataConfig, TokenStream, check_source
    check_source(cfg)                       # fails early, naming the problem
    stream = TokenStream(cfg, split="train", block_size=T, batch_size=B, rank=r, world_size=n, seed=s)
    x, y = next(iter(stream)); state = stream.state_dict(); ...; stream.load_state_dict(state)

Modules: config (DataConfig), sources (--data syntax -> files), wiki_vital (embedded corpus),
readers (one file -> raw values), documents (what is a document, which split), producer (one
consumer's pipeline, no torch), stream (TokenStream: workers, prefetch, state), report (check,
inspect, bench).
"""

from slm.data.config import DataConfig
from slm.data.report import check_source
from slm.data.sources import Source, resolve_source

__all__ = ["DataConfig", "TokenStream", "check_source", "resolve_source", "Source"]


def __getattr__(name: str):
    # TokenStream needs torch; loader worker processes and `slm data inspect` import this package
    # without paying for torch's import (~2 s).
    if name == "TokenStream":
        from slm.data.stream import TokenStream

        return TokenStream
    raise AttributeError(f"module 'slm.data' has no attribute {name!r}")
