"""The OpenAI API's wire format, as far as slm serves it: typed requests, responses, errors.

Requests are pydantic models in strict mode, so a wrong-typed field (`"max_tokens": "many"`)
is a 400 with the field named, never a silent coercion. Unknown fields are ignored, as clients
send extras (`user`, vendor options); known parameters slm cannot honour (n > 1, logprobs,
tools, penalties, ...) are refused by `refuse_unsupported` with the parameter named. Nothing
here knows about models or HTTP; app.py wires it up.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but common among local servers
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def refuse_unsupported(self) -> None:
        """Known OpenAI parameters whose non-default values slm does not implement."""
        if (self.n or 1) > 1:
            raise APIError(400, "n > 1 is not supported: send one request per completion", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by slm serve; leave it at 0", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by slm serve", "logit_bias")


class CompletionRequest(_Request):
    # A string, a list holding one string, or token ids (the way to send special tokens on purpose).
    prompt: str | list[str] | list[int] = ""
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise APIError(400, "several prompts in one request are not supported: send one request per prompt", "prompt")
        if self.echo:
            raise APIError(400, "echo is not supported by slm serve", "echo")
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported by slm serve", "logprobs")
        if (self.best_of or 1) > 1:
            raise APIError(400, "best_of > 1 is not supported by slm serve", "best_of")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported by slm serve", "suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        # "developer" is the newer name OpenAI gives the system role.
        role = "system" if self.role == "developer" else self.role
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": role, "content": content}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs are not supported by slm serve", "logprobs")
        if self.tools or self.functions:
            raise APIError(400, "tools and function calling are not supported by slm serve", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")


# ---------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish_reason: str | None, created: int | None = None,
               use: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if use is not None:
        out["usage"] = use
    return out


def chat_completion(rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, model: str, created: int, delta: dict | None, finish_reason: str | None = None,
               use: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def usage_chunk(rid: str, model: str, created: int, obj: str, use: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}
