"""The OpenAI-compatible HTTP API over any model `slm.loading.open_model` can load.

Routes: GET /health (no key needed), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions; `stream: true` answers with server-sent events ending in
`data: [DONE]`. Every failure a client can cause is an OpenAI-style error object with a 4xx
status: a missing or wrong API key (401), malformed JSON or wrong-typed fields (400), a prompt
longer than the context (400, code context_length_exceeded), max_tokens over the server's
limit (400), an unknown model (404), a body over the size limit (413), every slot and the
waiting line taken (429). Bugs are 500s with the same shape; the server keeps running.

Untrusted text never becomes special tokens: prompts are encoded with `encode_ordinary` and
chat messages with `chat_prompt_ids` (the template's own special tokens stay real). A token-id
prompt (a list of ints) is the way to send special tokens on purpose.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slm.errors import SlmError
from slm.generate import SamplingConfig
from slm.loading import LoadedModel
from slm.prompts import chat_prompt_ids
from slm.serve import protocol as p
from slm.serve.config import ServeConfig
from slm.serve.engine import Busy, Engine, Job, Result

log = logging.getLogger("slm.serve")
_TYPE_TAG = re.compile(r"(str|int|float|bool|list|dict|none|[a-z-]+\[.*\])")


def error_response(err: p.APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class Guard:
    """ASGI middleware run before routing and body parsing: the API key on /v1 routes, and the
    body size limit (Content-Length checked first, then the bytes actually received)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                err = p.APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                return await error_response(err)(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_big = p.APIError(413, f"request body over {self.max_body} bytes", code="request_too_large")
            try:
                declared = int(headers.get(b"content-length", b"0"))
            except ValueError:
                return await error_response(p.APIError(400, "malformed Content-Length header"))(scope, receive, send)
            if declared > self.max_body:
                return await error_response(too_big)(scope, receive, send)
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_body:
                    return await error_response(too_big)(scope, receive, send)
                if not msg.get("more_body"):
                    break
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # later messages: the disconnect

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


class Server:
    """The routes' logic: request -> validated job -> engine -> OpenAI-shaped answer."""

    def __init__(self, loaded: LoadedModel, cfg: ServeConfig):
        self.loaded, self.cfg = loaded, cfg
        self.model_id = loaded.name
        self.tokenizer = loaded.tokenizer
        self.block_size = loaded.model.config.block_size
        threads = cfg.threads_per_request or max(1, torch.get_num_threads() // cfg.max_concurrency)
        self.engine = Engine(loaded.model, loaded.tokenizer, cfg.max_concurrency, cfg.max_queue, threads)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name not in (self.model_id, self.loaded.path):
            raise p.APIError(404, f"model {name!r} does not exist; this server serves {self.model_id!r}",
                             "model", "model_not_found")

    def job(self, req: p.CompletionRequest | p.ChatRequest, prompt_ids: list[int], max_tokens: int) -> Job:
        req.refuse_unsupported()
        if len(prompt_ids) > self.block_size:
            raise p.APIError(400, f"this model's context is {self.block_size} tokens, but the prompt has "
                                  f"{len(prompt_ids)}; shorten it", "messages" if isinstance(req, p.ChatRequest)
                             else "prompt", "context_length_exceeded")
        if max_tokens > self.cfg.max_tokens_limit:
            raise p.APIError(400, f"max_tokens is {max_tokens}, over this server's limit of "
                                  f"{self.cfg.max_tokens_limit}", "max_tokens")
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                                  top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed)
        return Job(prompt_ids, sampling, req.stop_list())

    def completion_prompt(self, req: p.CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            bad = [t for t in prompt if not 0 <= t < self.tokenizer.n_vocab]
            if bad:
                raise p.APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{self.tokenizer.n_vocab - 1})",
                                 "prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) and prompt else prompt or ""
        return self.tokenizer.encode_ordinary(text) if text else list(self.tokenizer.start_ids)

    def chat_prompt(self, req: p.ChatRequest) -> list[int]:
        try:
            return chat_prompt_ids(self.tokenizer, [m.as_dict() for m in req.messages])
        except SlmError as e:
            raise p.APIError(400, str(e), "messages") from None
        except Exception as e:  # a chat template's own checks (e.g. roles must alternate)
            raise p.APIError(400, f"the model's chat template refused these messages: {e}", "messages") from None

    async def run(self, request: Request, job: Job, stream: bool, chunks: "CompletionChunks"):
        """Non-streaming: the finished answer. Streaming: SSE of chunks, then [DONE]."""
        if not stream:
            return JSONResponse(chunks.final(await _unless_disconnected(request, self.engine.complete(job))))
        items = self.engine.stream(job)
        # Waiting for the first piece here lets busy/model errors be a status code, not a broken stream.
        first = await _unless_disconnected(request, items.__anext__())

        async def events():
            try:
                for chunk in chunks.start():
                    yield {"data": json.dumps(chunk)}
                item = first
                while not isinstance(item, Result):
                    yield {"data": json.dumps(chunks.piece(item))}
                    item = await items.__anext__()
                for chunk in chunks.end(item):
                    yield {"data": json.dumps(chunk)}
                yield {"data": "[DONE]"}
            except Exception as e:  # after the headers went out, an error can only be an event
                log.exception("generation failed mid-stream")
                yield {"data": json.dumps(p.APIError(500, f"generation failed: {e}", type="server_error").body())}
            finally:  # also on a client disconnect: the generation stops, its slot frees
                await items.aclose()

        # send_timeout: a client that stops reading (but keeps the socket open) is dropped too.
        return EventSourceResponse(events(), ping=15, send_timeout=60)


class ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, cancelling it (which stops its generation) if the client leaves."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientGone()


class CompletionChunks:
    def __init__(self, model: str, include_usage: bool):
        self.rid, self.model, self.created, self.include_usage = p.new_id("cmpl"), model, int(time.time()), include_usage

    def start(self):
        return []

    def piece(self, text: str) -> dict:
        return p.completion(self.rid, self.model, text, None, self.created)

    def end(self, r: Result):
        out = [p.completion(self.rid, self.model, "", r.finish_reason, self.created)]
        if self.include_usage:
            out.append(p.usage_chunk(self.rid, self.model, self.created, "text_completion",
                                     p.usage(r.prompt_tokens, r.completion_tokens)))
        return out

    def final(self, r: Result) -> dict:
        return p.completion(self.rid, self.model, r.text, r.finish_reason, self.created,
                            p.usage(r.prompt_tokens, r.completion_tokens))


class ChatChunks(CompletionChunks):
    def __init__(self, model: str, include_usage: bool):
        super().__init__(model, include_usage)
        self.rid = p.new_id("chatcmpl")

    def start(self):
        return [p.chat_chunk(self.rid, self.model, self.created, {"role": "assistant", "content": ""})]

    def piece(self, text: str) -> dict:
        return p.chat_chunk(self.rid, self.model, self.created, {"content": text})

    def end(self, r: Result):
        out = [p.chat_chunk(self.rid, self.model, self.created, {}, r.finish_reason)]
        if self.include_usage:
            out.append(p.usage_chunk(self.rid, self.model, self.created, "chat.completion.chunk",
                                     p.usage(r.prompt_tokens, r.completion_tokens)))
        return out

    def final(self, r: Result) -> dict:
        return p.chat_completion(self.rid, self.model, r.text, r.finish_reason, p.usage(r.prompt_tokens, r.completion_tokens))


def create_app(loaded: LoadedModel, cfg: ServeConfig | None = None) -> Guard:
    """The ASGI app: FastAPI routes behind the key and body-size guard."""
    cfg = cfg or ServeConfig()
    server = Server(loaded, cfg)

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.close()  # on shutdown (Ctrl-C): running generations stop at their next token

    app = FastAPI(title="slm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(p.APIError)
    async def api_error(request, err: p.APIError):
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        e = exc.errors()[0]
        if e.get("type") == "json_invalid":
            return error_response(p.APIError(400, f"the request body is not valid JSON: {e.get('ctx', {}).get('error', '')}"))
        # pydantic names the union member it tried ("str", "list[int]"): not part of the field's name
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _TYPE_TAG.fullmatch(str(x))]
        param = ".".join(loc) or None
        if param is None:
            return error_response(p.APIError(400, "the request body must be a JSON object "
                                                  "(Content-Type: application/json)"))
        return error_response(p.APIError(400, f"invalid {param}: {e.get('msg')}", param))

    @app.exception_handler(SlmError)
    async def slm_error(request, err: SlmError):
        return error_response(p.APIError(400, str(err)))

    @app.exception_handler(Busy)
    async def busy(request, err: Busy):
        return error_response(p.APIError(429, f"server busy: {err}", code="server_busy", type="rate_limit_error"))

    @app.exception_handler(ClientGone)
    async def gone(request, err: ClientGone):
        return JSONResponse({}, status_code=499)  # nobody reads it; the generation was stopped

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error_response(p.APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def bug(request, exc: Exception):
        log.exception("internal error")
        return error_response(p.APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/health")
    async def health():
        e = server.engine
        return {"status": "ok", "model": server.model_id, "active": e.active, "waiting": e.waiting,
                "max_concurrency": e.max_concurrency, "threads_per_request": e.threads}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "slm", "context_length": server.block_size}]}

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, request: Request):
        server.check_model(req.model)
        ids = await asyncio.to_thread(server.completion_prompt, req)
        job = server.job(req, ids, 16 if req.max_tokens is None else req.max_tokens)
        return await server.run(request, job, bool(req.stream), CompletionChunks(server.model_id, req.include_usage()))

    @app.post("/v1/chat/completions")
    async def chat(req: p.ChatRequest, request: Request):
        server.check_model(req.model)
        ids = await asyncio.to_thread(server.chat_prompt, req)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = server.job(req, ids, cfg.max_tokens_limit if limit is None else limit)
        return await server.run(request, job, bool(req.stream), ChatChunks(server.model_id, req.include_usage()))

    return Guard(app, cfg.api_key, cfg.max_body_bytes)


def run(loaded: LoadedModel, cfg: ServeConfig, log_level: str = "info") -> None:
    """Serve until Ctrl-C / SIGTERM: uvicorn stops accepting, streams end, running
    generations stop at their next token, worker threads are joined."""
    import uvicorn

    uvicorn.run(create_app(loaded, cfg), host=cfg.host, port=cfg.port, log_level=log_level,
                timeout_graceful_shutdown=5, limit_concurrency=cfg.max_concurrency + cfg.max_queue + 32)
