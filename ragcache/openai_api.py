"""The OpenAI-compatible API's vocabulary: request bodies, errors in OpenAI's shape, and the server's limits.

Unknown OpenAI fields are accepted and ignored; `rag` (ours, the way vLLM takes extra_body fields)
forbids unknown keys, so a misspelt option never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator

from .errors import RagcacheError


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
        return ApiError(400, str(exc), param=exc.param)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


def validation_error(exc: RequestValidationError) -> ApiError:
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
    sources_in_text: bool = False  # also close the message with the sources block (they return in chat history)
    recompute: float = Field(0.0, ge=0, le=1)  # fraction of cached tokens recomputed with full attention
    order: str = "doc-first"
    chunk_order: str = "best-first"  # or best-last: the top-ranked chunk right before the question


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
