"""`slm serve`'s settings, importable without the server's dependencies (the CLI builds flags from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slm.errors import SlmError


@dataclass
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; loopback unless you mean to expose it"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1 routes (or set SLM_API_KEY)"})
    max_concurrency: int = field(default=4, metadata={"help": "requests generating at the same time"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting for a slot before 429 busy"})
    threads_per_request: int = field(default=0, metadata={
        "help": "torch threads each request computes with (0: torch's threads divided by --max-concurrency, "
                "at least 1)"})
    max_tokens_limit: int = field(default=1024, metadata={"help": "largest max_tokens a request may ask for"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted"})

    def __post_init__(self):
        for name in ("max_concurrency", "max_queue", "max_tokens_limit", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SlmError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads_per_request < 0:
            raise SlmError(f"threads_per_request must be >= 0, got {self.threads_per_request}")
        if not 0 <= self.port < 65536:
            raise SlmError(f"port must be in 0..65535, got {self.port}")
