"""Prompt formats and layouts, in one place.

Embedding:  <s><|user|>\\n{instruction}\\n<|embed|>\\n{text}   (no instruction: <s><|embed|>\\n{text})
Generation: <s><|user|>\\n{prompt}\\n<|assistant|>\\n
Chat:       <s><|system|>\\n{system}\\n<|user|>\\n{prompt}\\n<|assistant|>\\n{reply}</s>\\n<|user|>\\n...<|assistant|>\\n

A layout is the sequence of segments a question is answered from. A cached segment is the embedding
prompt of a document or of the question, `<s><|embed|>\\n{text}`, whose KV was computed alone from
position 0; everything else is computed causally in place. The default wording is the GRIT paper's
reference code (rag/eval.py): its cache formats for the caching modes and, for the `rag` baselines,
its `docemb`/`queryemb` prompts, which hold the very same tokens as the `doc`/`query` modes, so a
baseline differs from its caching mode only in attention, never in text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .errors import RagcacheError

MODES = ("none", "rag", "query", "doc", "query-doc", "doc-query")
ORDERS = ("doc-first", "query-first")
ATTENTIONS = ("bidirectional", "causal")


def embed_prompt(text: str, instruction: str, bos: str) -> tuple[str, str]:
    """The embedding prompt and its instruction part (which pooling skips)."""
    prefix = f"{bos}<|user|>\n{instruction}\n<|embed|>\n" if instruction else f"{bos}<|embed|>\n"
    return prefix + text, prefix


def passage(title: str, text: str) -> str:
    """A chunk as the model reads it, embedded or as text: the reference's '{title} {text}'."""
    return f"{title} {text}" if title else text


CHAT_ROLES = ("system", "user", "assistant")


def chat_prompt(turns: list[tuple[str, str]], eos: str) -> str:
    """A conversation in GritLM's chat format (Tulu 2's), ending where the assistant's reply begins.

    turns: (role, text) with roles among CHAT_ROLES. The leading <s> is left out: the engine adds it.
    One user turn gives exactly the generation format.
    """
    parts = [f"<|{role}|>\n{text}{eos if role == 'assistant' else ''}\n" for role, text in turns]
    return "".join(parts) + "<|assistant|>\n"


@dataclass
class Templates:
    """The text around cached segments; `{query}` and `{docs}` are filled in, `answer_prefix` follows."""

    none: str = "<|user|>\n{query}\n<|assistant|>\n"
    doc_first: str = "\n<|user|>\n{query}\n\nAnswer the prior query while optionally using the context prior to it\n<|assistant|>\n"
    query_first: str = "\n<|user|>\n{docs}\n\nOptionally using the prior context answer the query prior to it\n<|assistant|>\n"
    doc_query: str = "\n<|user|>\nAnswer the prior query while optionally using the context prior to it\n<|assistant|>\n"
    query_doc: str = "\n<|user|>\nOptionally using the prior context answer the query prior to it\n<|assistant|>\n"
    answer_prefix: str = "The answer is"
    doc_separator: str = "\n\n"

    @classmethod
    def chat(cls) -> "Templates":
        """Plain chat through mode 'none': the query is a whole chat_prompt, with no answer prefix."""
        return cls(none="{query}", answer_prefix="")

    @classmethod
    def load(cls, path: str | Path | None) -> "Templates":
        """Defaults, with any of their fields overridden by a JSON object in `path`."""
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise RagcacheError(f"cannot read templates from '{path}': {e}") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise RagcacheError(f"templates file '{path}' must be a JSON object with keys among: {', '.join(sorted(known))}")
        return cls(**data)


@dataclass
class Segment:
    kind: str  # "bos" | "doc" | "query" | "prompt"
    token_ids: list[int]
    cached: bool
    attention: str  # "bidirectional" | "causal"
    chunk_id: int | None = None  # for doc segments: the stored chunk it came from

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.chunk_id is None:
            del d["chunk_id"]
        return d


def build_layout(mode: str, order: str, query: str, query_ids: list[int], docs: list[tuple[int, str, list[int]]],
                 tokenize, bos_ids: list[int], templates: Templates, kv_attention: str) -> list[Segment]:
    """Segments for one question. docs: (chunk_id, passage text, embedding-prompt token ids), best first."""
    t = templates

    def prompt(text: str) -> Segment:
        return Segment("prompt", tokenize(text + t.answer_prefix), False, "causal")

    def doc_segs(cached: bool) -> list[Segment]:
        att = kv_attention if cached else "causal"
        return [Segment("doc", list(ids), cached, att, cid) for cid, _, ids in docs]

    def query_seg(cached: bool) -> Segment:
        return Segment("query", list(query_ids), cached, kv_attention if cached else "causal")

    doc_text = t.doc_separator.join(text for _, text, _ in docs)
    if mode == "none":
        return ([Segment("bos", bos_ids, False, "causal")] if bos_ids else []) + [prompt(t.none.format(query=query))]
    if mode == "rag" and order == "doc-first":
        return doc_segs(False) + [prompt(t.doc_first.format(query=query))]
    if mode == "rag":
        return [query_seg(False), prompt(t.query_first.format(docs=doc_text))]
    if mode == "query":
        return [query_seg(True), prompt(t.query_first.format(docs=doc_text))]
    if mode == "doc":
        return doc_segs(True) + [prompt(t.doc_first.format(query=query))]
    if mode == "query-doc":
        return [query_seg(True)] + doc_segs(True) + [prompt(t.query_doc)]
    if mode == "doc-query":
        return doc_segs(True) + [query_seg(True), prompt(t.doc_query)]
    raise RagcacheError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")


def layout_allowed(layout: list[Segment]) -> torch.Tensor:
    """(T, T) 'may attend' matrix equivalent to the cached computation of `layout`.

    Cached segments see only themselves (all of themselves, or causally); every other token sees
    everything before it. With positions 0..T-1 one masked forward reproduces the cached path.
    """
    total = sum(len(s.token_ids) for s in layout)
    idx = torch.arange(total)
    allowed = idx[None, :] <= idx[:, None]
    start = 0
    for seg in layout:
        end = start + len(seg.token_ids)
        if seg.cached:
            allowed[start:end, :] = False
            block = torch.ones(end - start, end - start, dtype=torch.bool)
            allowed[start:end, start:end] = block if seg.attention == "bidirectional" else block.tril()
        start = end
    return allowed


def explain(layout: list[Segment], decode) -> str:
    """A readable rendering of a layout, one line a segment."""
    lines, pos = [], 0
    for i, seg in enumerate(layout):
        n = len(seg.token_ids)
        how = f"cached, {seg.attention}" if seg.cached else "computed, causal"
        text = decode(seg.token_ids).replace("\n", "\\n")
        text = text if len(text) <= 70 else text[:67] + "..."
        chunk = f" chunk {seg.chunk_id}" if seg.chunk_id is not None else ""
        lines.append(f"{i:>2} {seg.kind:<6} positions {pos}-{pos + n - 1} ({n} tokens, {how}){chunk}: {text}")
        pos += n
    return "\n".join(lines)
