"""The OpenAI-compatible HTTP server: one model and one index, loaded once, behind FastAPI.

GET  /v1/models             the served model, with its context length (max_model_len)
POST /v1/embeddings         GRIT embeddings; extra field `instruction`
POST /v1/chat/completions   plain chat, or RAG with the extra field `rag: {mode, top_k, order}`
GET  /health                liveness, never behind the API key or the model

One model on one device runs one request at a time, without batching: every embedding batch and
every generation holds `Service.lock` in a worker thread, so requests queue while the event loop
stays free for /health and for noticing clients that leave. Errors take OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, AsyncIterator, Callable, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from . import prompts
from .engine import RagCache
from .errors import RagcacheError
from .prompts import Templates

log = logging.getLogger("ragcache.server")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything more is refused with a 400 (a body: 413)."""

    max_body_bytes: int = 1 << 20
    max_input_count: int = 256  # embedding inputs, or chat messages, per request
    max_tokens: int = 1024  # tokens one completion may generate; also the default
    max_top_k: int = 32  # documents one RAG request may retrieve

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 1:
                raise RagcacheError(f"the {name.replace('_', '-')} limit must be at least 1 (got {value})")


# ---- errors ----------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error the client sees as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RagcacheError):  # the engine's errors are the user's to fix
        return ApiError(400, str(exc))
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return ApiError(400, "the request body is not valid JSON")
    where = [str(p) for p in err["loc"] if p != "body"]
    if not where:
        return ApiError(400, f"the request body: {err['msg']}")
    return ApiError(400, f"{'.'.join(where)}: {err['msg'].removeprefix('Value error, ')}", param=where[0])


# ---- request bodies (unknown OpenAI fields are accepted and ignored) ---------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _one_of(kinds: str) -> WrapValidator:
    """A union's error as one sentence, instead of one error per member type."""
    def check(value, handler):
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"must be {kinds}") from None
    return WrapValidator(check)


class EmbeddingRequest(_Body):
    model: str
    input: Annotated[str | list[str] | list[int] | list[list[int]],
                     _one_of("a string, a list of strings, a list of token ids, or a list of such lists")]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    instruction: str = ""  # GRIT's embedding instruction; empty embeds the text as it is


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: Annotated[str | list[ContentPart] | None, _one_of("a string or a list of text parts")] = None


class RagOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option must not silently fall back to a default
    mode: str = "doc"
    top_k: int = Field(3, ge=1)
    order: str = "doc-first"


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Annotated[str | list[str] | None, _one_of("a string or a list of strings")] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    rag: RagOptions | None = None  # not OpenAI's: retrieval, the way vLLM takes extra_body fields
    ignore_eos: bool = False  # vLLM's: generate max_tokens whatever the model says


# ---- generation --------------------------------------------------------------------------------------
@dataclass
class Chat:
    """A validated chat request: what the engine is asked, and how."""

    question: str  # the whole conversation as a chat prompt; with `rag`, the last user message
    rag: RagOptions | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    ignore_eos: bool


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop": end of sequence or a stop string; "length": max_tokens reached
    prompt_tokens: int
    completion_tokens: int
    sources: list[dict] | None  # None for plain chat

    @property
    def sources_text(self) -> str:
        """The sources as the reply's closing lines, as `ragcache ask` prints them."""
        if not self.sources:
            return ""
        lines = [f"[{s['rank']}] {s['title'] or s['doc_id']} - {s['source']} (score {s['score']:.3f})"
                 for s in self.sources]
        return "\n\nSources:\n" + "\n".join(lines)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopText:
    """The reply as it grows: cut at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.hit = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, delta: str) -> str:
        """Add new text; return the part that is safe to send now."""
        self.text += delta
        # an earlier stop string would have been found already: everything before `sent` was checked
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.hit = self.text[: min(cuts)], True
            return self.flush()
        ready = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : ready], ready
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class Service:
    """The model and index behind the endpoints; `lock` makes one request use the model at a time."""

    def __init__(self, engine: RagCache, limits: Limits):
        self.engine, self.model, self.limits = engine, engine.model, limits
        self.model_id = self.model.name
        self.created = int(time.time())
        self.lock = threading.Lock()

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    # ---- embeddings ----------------------------------------------------------------------------
    def embed(self, req: EmbeddingRequest) -> dict:
        """Runs in a worker thread. Token-id inputs are decoded to text and embedded like text."""
        self.check_model(req.model)
        one = isinstance(req.input, str) or (req.input and isinstance(req.input[0], int))  # text, or one id list
        inputs = [req.input] if one else req.input
        if not inputs:
            raise ApiError(400, "input is empty", param="input")
        if len(inputs) > self.limits.max_input_count:
            raise ApiError(400, f"{len(inputs)} inputs, more than this server's limit of "
                                f"{self.limits.max_input_count} per request", param="input")
        embedder = self.engine.embedder  # a two-model index retrieves with it, so it is what we serve
        if embedder is not None and req.instruction:
            raise ApiError(400, "this index embeds with a separate sentence-transformers model, which takes no "
                                "instruction", param="instruction")
        dim = embedder.dim if embedder is not None else self.model.hf.config.hidden_size
        if req.dimensions is not None and req.dimensions > dim:
            raise ApiError(400, f"dimensions {req.dimensions} is more than the model's {dim}", param="dimensions")
        vocab = len(self.model.tokenizer)
        for i, item in enumerate(inputs):
            if not item:
                raise ApiError(400, f"input {i} is empty", param="input")
            if not isinstance(item, str) and not all(0 <= t < vocab for t in item):
                raise ApiError(400, f"input {i} holds token ids outside the vocabulary (0-{vocab - 1})", param="input")
        with self.lock:  # the tokenizer too: it is not safe to share between threads
            texts = [item if isinstance(item, str) else self.model.decode(item) for item in inputs]
            if embedder is not None:  # it cuts each text at its own limit, as sentence-transformers does
                vectors = list(embedder.embed(texts))
                tokens = sum(min(len(embedder.tokenizer(t)["input_ids"]), embedder.max_tokens) for t in texts)
            else:
                for i, text in enumerate(texts):
                    n = len(self.model.embed_tokens(text, req.instruction)[0])
                    if n > self.model.max_context:
                        raise ApiError(400, f"input {i} takes {n} tokens, more than the model's context of "
                                            f"{self.model.max_context}", param="input")
                encoded = self.model.encode(texts, req.instruction)
                vectors, tokens = [e.embedding for e in encoded], sum(len(e.token_ids) for e in encoded)
        data = []
        for i, vec in enumerate(vectors):
            vec = vec[: req.dimensions]
            if req.dimensions is not None:
                vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
            vec = vec.astype("<f4")
            value = base64.b64encode(vec.tobytes()).decode() if req.encoding_format == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---- chat ----------------------------------------------------------------------------------
    def chat_from(self, req: ChatRequest) -> Chat:
        """Validate a chat request without touching the model (so a bad one never waits in the queue)."""
        self.check_model(req.model)
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if len(req.messages) > self.limits.max_input_count:
            raise ApiError(400, f"{len(req.messages)} messages, more than this server's limit of "
                                f"{self.limits.max_input_count}", param="messages")
        turns = [_turn(i, m) for i, m in enumerate(req.messages)]
        max_tokens = req.max_completion_tokens or req.max_tokens or self.limits.max_tokens
        if max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is more than this server's limit of "
                                f"{self.limits.max_tokens}", param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        if req.rag is None:
            question = prompts.chat_prompt(turns, self.model.tokenizer.eos_token or "")
        else:
            _check_rag(req.rag, self.limits)
            users = [text for role, text in turns if role == "user"]
            if not users:
                raise ApiError(400, "rag needs a user message: the last one is the question", param="messages")
            question = users[-1]
        return Chat(question, req.rag, max_tokens, req.temperature or 0.0, req.top_p or 1.0, req.seed, stops,
                    req.ignore_eos)

    def generate(self, chat: Chat, emit: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Reply:
        """Runs in a worker thread. `emit` gets the text as it may be sent; `cancel` ends it early."""
        text = StopText(chat.stops)

        def on_token(delta: str) -> bool:
            out = text.feed(delta)
            if out and emit is not None:
                emit(out)
            return text.hit or (cancel is not None and cancel.is_set())

        rag = chat.rag or RagOptions(mode="none")
        with self.lock:
            answer = self.engine.ask(
                chat.question, mode=rag.mode, top_k=rag.top_k, order=rag.order, max_new_tokens=chat.max_tokens,
                temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed,
                templates=None if chat.rag else Templates.chat(), ignore_eos=chat.ignore_eos,
                on_token=on_token if emit is not None or chat.stops or cancel is not None else None)
        tail = text.flush()
        if tail and emit is not None:
            emit(tail)
        finish = "length" if len(answer.token_ids) >= chat.max_tokens and not text.hit else "stop"
        return Reply(text.text if text.hit else answer.answer, finish, sum(len(s.token_ids) for s in answer.layout),
                     len(answer.token_ids), answer.sources if chat.rag else None)


def _turn(i: int, message: Message) -> tuple[str, str]:
    role = "system" if message.role == "developer" else message.role  # OpenAI's newer name for system
    if role not in prompts.CHAT_ROLES:
        raise ApiError(400, f"messages.{i}.role '{message.role}' is not supported: use system, user or assistant",
                       param="messages")
    if isinstance(message.content, str):
        return role, message.content
    if not message.content or any(p.type != "text" or p.text is None for p in message.content):
        raise ApiError(400, f"messages.{i}.content must be text, or a list of text parts", param="messages")
    return role, "\n".join(p.text for p in message.content)


def _check_rag(rag: RagOptions, limits: Limits) -> None:
    if rag.mode not in prompts.MODES:
        raise ApiError(400, f"unknown mode '{rag.mode}': use one of {', '.join(prompts.MODES)}", param="rag.mode")
    if rag.order not in prompts.ORDERS:
        raise ApiError(400, f"unknown order '{rag.order}': use doc-first or query-first", param="rag.order")
    if rag.top_k > limits.max_top_k:
        raise ApiError(400, f"top_k {rag.top_k} is more than this server's limit of {limits.max_top_k}",
                       param="rag.top_k")


# ---- responses ---------------------------------------------------------------------------------------
def _completion(head: dict, reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.text + reply.sources_text}
    body = head | {"object": "chat.completion", "usage": reply.usage,
                   "choices": [{"index": 0, "message": message, "logprobs": None,
                                "finish_reason": reply.finish_reason}]}
    if reply.sources is not None:
        body["sources"] = reply.sources
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
            extra = {"sources": value.sources} if value.sources is not None else {}
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
        return _validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown paths and methods
        return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()

    @app.exception_handler(Exception)  # logged with its traceback by Starlette; the server stays up
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": service.model_id, "busy": service.lock.locked()}

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
