"""The words users pick from: modes, orders, attention kinds, devices and dtypes, parsed in one place.

Every entry point (the Python API, the CLI, the server, `eval qa`) parses names through here, so an
unknown name gets the same one-line error everywhere. The error names the parameter (`param`); the
CLI turns it into its flag, the server into its field.
"""

from __future__ import annotations

from typing import Literal, TypeVar, get_args

from .errors import RagcacheError

Mode = Literal["none", "rag", "query", "doc", "query-doc", "doc-query"]
Order = Literal["doc-first", "query-first"]
ChunkOrder = Literal["best-first", "best-last"]  # where the top-ranked chunk sits among the retrieved ones
Attention = Literal["bidirectional", "causal"]
KVCodec = Literal["raw", "fp8", "int8", "int4"]  # how chunk caches are stored (kv.py, quant.py)
Style = Literal["grit", "chat"]  # how cached segments are laid out: GRIT's paper formats, or a chat template
VectorIndex = Literal["flat", "ivfpq"]  # the FAISS view (vectors.py): exact, or IVF-PQ re-ranked exactly

MODES: tuple[Mode, ...] = get_args(Mode)
ORDERS: tuple[Order, ...] = get_args(Order)
CHUNK_ORDERS: tuple[ChunkOrder, ...] = get_args(ChunkOrder)
ATTENTIONS: tuple[Attention, ...] = get_args(Attention)
STYLES: tuple[Style, ...] = get_args(Style)
KV_CODECS: tuple[KVCodec, ...] = get_args(KVCodec)
VECTOR_INDEXES: tuple[VectorIndex, ...] = get_args(VectorIndex)
QUERY_CACHED: tuple[Mode, ...] = ("query", "query-doc", "doc-query")  # modes whose question segment is cached

T = TypeVar("T", bound=str)


def _parse(value: str, allowed: tuple[T, ...], what: str, param: str) -> T:
    if value not in allowed:
        raise RagcacheError(f"unknown {what} '{value}': use one of {', '.join(allowed)}", param=param)
    return value  # type: ignore[return-value]


def mode(value: str) -> Mode:
    return _parse(value, MODES, "mode", "mode")


def order(value: str) -> Order:
    return _parse(value, ORDERS, "order", "order")


def chunk_order(value: str) -> ChunkOrder:
    return _parse(value, CHUNK_ORDERS, "chunk order", "chunk_order")


def attention(value: str) -> Attention:
    return _parse(value, ATTENTIONS, "kv attention", "kv_attention")


def kv_codec(value: str) -> KVCodec:
    return _parse(value, KV_CODECS, "KV codec", "kv_codec")


def style(value: str) -> Style:
    return _parse(value, STYLES, "layout", "layout")


def vector_index(value: str) -> VectorIndex:
    return _parse(value, VECTOR_INDEXES, "vector index", "vector_index")


_INDEX_WORDS = {"kv_attention": attention, "layout": style, "vector_index": vector_index, "kv_codec": kv_codec}


def index_options(**given: str | None) -> None:
    """Parse the words that fix a new index (kv_attention, layout, vector_index, kv_codec; None: not given)."""
    for name, value in given.items():
        if value is not None:
            _INDEX_WORDS[name](value)


def modes(value: str) -> list[Mode]:
    """A comma-separated list of modes, at least one."""
    chosen = [m.strip() for m in value.split(",") if m.strip()]
    if not chosen:
        raise RagcacheError(f"no mode in '{value}': use a comma-separated list of {', '.join(MODES)}", param="modes")
    return [_parse(m, MODES, "mode", "modes") for m in chosen]


def at_least(value: int | float, low: int | float, what: str, param: str) -> None:
    if value < low:
        raise RagcacheError(f"{what} must be at least {low} (got {value})", param=param)


def ask_arguments(question: str, mode_name: str, order_name: str, top_k: int, max_new_tokens: int,
                  chunk_order_name: str = "best-first") -> tuple[Mode, Order, ChunkOrder]:
    """Check a question's arguments, none of which needs the model: the parsed mode and both orders."""
    parsed = mode(mode_name), order(order_name), chunk_order(chunk_order_name)
    if not question or not question.strip():
        raise RagcacheError("the question is empty", param="question")
    at_least(top_k, 1, "top-k", "top_k")
    at_least(max_new_tokens, 1, "max-new-tokens", "max_new_tokens")
    return parsed


def fraction(value: float, param: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise RagcacheError(f"{param} must be a fraction from 0 to 1 (got {value})", param=param)
    return value
