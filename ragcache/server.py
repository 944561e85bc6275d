"""The OpenAI-compatible HTTP server: one model and one index, loaded once, behind FastAPI.

GET  /v1/models             the served model, with its context length (max_model_len)
POST /v1/embeddings         GRIT embeddings; extra field `instruction`
POST /v1/chat/completions   plain chat, or RAG with the extra field `rag: {mode, top_k, order}`
GET  /health                liveness, never behind the API key or the model

One model on one device runs one request at a time, without batching: every embedding batch and
every generation holds `Service.lock` in a worker thread, so requests queue while the event loop
stays free for /health and for noticing clients that leave. Errors take OpenAI's shape.
Requests and errors are in openai_api.py, what each request asks of the engine in service.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from .engine import RagCache
from .errors import RagcacheError
from .openai_api import (
    ApiError,
    ChatRequest,
    EmbeddingRequest,
    Limits,
    as_api_error,
    validation_error,
)
from .service import Chat, Reply, Service, StopText

__all__ = ["Limits", "StopText", "create_app"]

log = logging.getLogger("ragcache.server")


# ---- responses ---------------------------------------------------------------------------------------
def _completion(head: dict, reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.text + reply.sources_text}
    body = head | {"object": "chat.completion", "usage": reply.usage,
                   "choices": [{"index": 0, "message": message, "logprobs": None,
                                "finish_reason": reply.finish_reason}]}
    if reply.sources is not None:
        body["sources"] = reply.sources_json
    return body


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _events(head: dict, first: tuple, queue: asyncio.Queue, cancel: threading.Event,
                  include_usage: bool) -> AsyncIterator[str]:
    """The SSE stream: role, content deltas, finish (with sources), usage if asked, [DONE].

    Starlette cancels this generator when the client disconnects; `finally` then tells the worker.
    """
    usage = {"usage": None} if include_usage else {}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse(head | {"object": "chat.completion.chunk", "choices": [choice]} | usage | extra)

    try:
        yield chunk({"role": "assistant", "content": ""})
        kind, value = first
        while kind == "text":
            yield chunk({"content": value})
            kind, value = await queue.get()
        if kind == "error":
            yield _sse(as_api_error(value).body())
        else:
            if value.sources_text:
                yield chunk({"content": value.sources_text})
            extra = {"sources": value.sources_json} if value.sources is not None else {}
            yield chunk({}, value.finish_reason, **extra)
            if include_usage:
                yield _sse(head | {"object": "chat.completion.chunk", "choices": [], "usage": value.usage})
        yield _sse("[DONE]")
    finally:
        cancel.set()


async def _stream(service: Service, chat: Chat, head: dict, include_usage: bool) -> Response:
    """Start generating in a thread; answer with an error if it fails before its first text, else stream."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def post(item: tuple) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            cancel.set()

    def work() -> None:
        try:
            post(("done", service.generate(chat, lambda text: post(("text", text)), cancel)))
        except Exception as e:  # the client gets it, as a response or in the stream
            if not isinstance(e, (ApiError, RagcacheError)):
                log.exception("generation failed")
            post(("error", e))

    threading.Thread(target=work, name="ragcache-generate", daemon=True).start()
    try:
        first = await queue.get()
    except BaseException:
        cancel.set()
        raise
    if first[0] == "error":
        return as_api_error(first[1]).response()
    return StreamingResponse(_events(head, first, queue, cancel, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


# ---- the app -----------------------------------------------------------------------------------------
class _Gate:
    """Before the app sees a request: the API key (all but /health), then the body size limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                error = ApiError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
                return await error.response()(scope, receive, send)
            if not secrets.compare_digest(given.strip().encode(), self.api_key.encode()):
                return await ApiError(401, "incorrect API key", code="invalid_api_key").response()(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                             code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)
        body, more = bytearray(), True
        while more:  # read it all here: a chunked body declares no length
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await too_large.response()(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from here on: only the disconnect, which streaming listens for
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def create_app(engine: RagCache, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """The server for one opened index; its model and index are used as they are, for every request."""
    service = Service(engine, limits)
    app = FastAPI(title="ragcache", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(_Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    @app.exception_handler(RagcacheError)
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown paths and methods
        return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()

    @app.exception_handler(Exception)  # logged with its traceback by Starlette; the server stays up
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.model_id, "busy": service.lock.locked(),
                "kv_tiers": service.engine.tier_stats()}

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "ragcache",
                "max_model_len": service.model.max_context}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        service.check_model(name)
        return model_card()

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict:
        return await run_in_threadpool(service.embed, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Response:
        chat = service.chat_from(req)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_id}
        if req.stream:
            return await _stream(service, chat, head, bool(req.stream_options and req.stream_options.include_usage))
        return JSONResponse(_completion(head, await run_in_threadpool(service.generate, chat)))

    return app
