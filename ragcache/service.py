"""What the server asks of the engine: validated chat and embedding requests, run one at a time.

One model on one device runs one request at a time, without batching: every embedding batch and
every generation holds `Service.lock`, in a worker thread, so the event loop stays free.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import prompts, vocab
from .engine import RagCache
from .errors import RagcacheError
from .openai_api import (
    ApiError,
    ChatRequest,
    EmbeddingRequest,
    Limits,
    Message,
    RagOptions,
)
from .prompts import Templates
from .records import Source


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
    sources: list[Source] | None  # None for plain chat
    sources_in_text: bool = False

    @property
    def sources_text(self) -> str:
        """The sources as the reply's closing lines, as `ragcache ask` prints them, when the request asks."""
        if not self.sources or not self.sources_in_text:
            return ""
        return "\n\nSources:\n" + "\n".join(s.line() for s in self.sources)

    @property
    def sources_json(self) -> list[dict] | None:
        return None if self.sources is None else [s.to_dict() for s in self.sources]

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
        retriever = self.engine.retriever  # what retrieval embeds with, so it is what we serve
        dim = retriever.dim
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
            tokens = sum(retriever.token_counts(texts, req.instruction))  # refuses a text too long to embed
            vectors = list(retriever.embed(texts, instruction=req.instruction))
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
        if req.rag is None:  # the model's chat format after BOS, which the 'none' layout puts first
            question = prompts.chat_text(self.model.tokenizer, turns).removeprefix(self.model.tokenizer.bos_token or "")
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
                recompute=rag.recompute, chunk_order=rag.chunk_order,
                on_token=on_token if emit is not None or chat.stops or cancel is not None else None)
        tail = text.flush()
        if tail and emit is not None:
            emit(tail)
        finish = "length" if len(answer.token_ids) >= chat.max_tokens and not text.hit else "stop"
        return Reply(text.text if text.hit else answer.answer, finish, sum(len(s.token_ids) for s in answer.layout),
                     len(answer.token_ids), answer.sources if chat.rag else None,
                     bool(chat.rag and chat.rag.sources_in_text))


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
    try:
        vocab.mode(rag.mode)
        vocab.order(rag.order)
        vocab.chunk_order(rag.chunk_order)
    except RagcacheError as e:
        raise ApiError(400, str(e), param=f"rag.{e.param}") from None
    if rag.top_k > limits.max_top_k:
        raise ApiError(400, f"top_k {rag.top_k} is more than this server's limit of {limits.max_top_k}",
                       param="rag.top_k")
