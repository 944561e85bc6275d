"""Prompt formats and layouts, in one place.

Embedding:  <s><|user|>\\n{instruction}\\n<|embed|>\\n{text}   (no instruction: <s><|embed|>\\n{text})
            tokenised as GritLM's reference `encode` does: the string without <s>, with the tokenizer's
            own special tokens, so the tokenizer adds BOS and SentencePiece's dummy prefix applies to the
            first piece; pooling skips as many tokens as the instruction part alone tokenises to.
Generation: <s><|user|>\\n{prompt}\\n<|assistant|>\\n, or the model's own chat template when it has one,
            rendered and tokenised as the tokenizer's apply_chat_template does.
Chat:       <s><|system|>\\n{system}\\n<|user|>\\n{prompt}\\n<|assistant|>\\n{reply}</s>\\n<|user|>\\n...<|assistant|>\\n

A layout is the sequence of segments a question is answered from. A cached segment is the embedding
prompt of a document or of the question, `<s><|embed|>\\n{text}`, whose KV was computed alone from
position 0; everything else is computed causally in place. The default wording is the GRIT paper's
reference code (rag/eval.py): its cache formats for the caching modes and, for the `rag` baselines,
its `docemb`/`queryemb` prompts, which hold the very same tokens as the `doc`/`query` modes, so a
baseline differs from its caching mode only in attention, never in text.

That is the `grit` layout style, for GRIT models (and models without a chat template). A model that
was not trained to embed reads GRIT's `<|user|>` text as noise, so an index over one with a chat
template uses the `chat` style (Frame): the question is one user turn of the model's own template,
and the retrieved chunks sit inside it after a fixed context preamble,

    [template up to the user's words + preamble] [chunk]\n\n [chunk]\n\n Question: {query} [template's end]

The head (template and preamble) is cached once; every chunk's (and the question's) cache is computed
after it, as it will be read, so each starts from the same attention sink (EPIC, APE).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from .errors import RagcacheError
from .vocab import Attention, Mode, Order, Style

# Bump when the tokens of a cached segment change: stored caches were computed over them.
# grit-v2: embedding prompts tokenised as GritLM's reference encode does (tokenizer-added BOS).
PROMPT_FORMAT = "grit-v2"
# The chat style's context preamble, recorded in each index: its chunks' caches were computed after it.
CHAT_PREAMBLE = "Answer the question using the passages below.\n\n"
_CONTENT = "\u2063ragcache-user-content\u2063"  # stands for the user's words while a template is split


def embed_instruction(instruction: str) -> str:
    """The part before the text that pooling skips (the reference's `gritlm_instruction`)."""
    return f"<|user|>\n{instruction}\n<|embed|>\n" if instruction else "<|embed|>\n"


def embed_tokens(tokenizer, text: str, instruction: str = "") -> tuple[list[int], int]:
    """Tokens of the embedding prompt and where pooling begins, token for token as GritLM.encode.

    The reference tokenises `instruction + text` with the tokenizer's own special tokens and masks
    the first len(tokenizer(instruction)) positions out of the mean.
    """
    prefix = embed_instruction(instruction)
    ids = tokenizer(prefix + text, add_special_tokens=True)["input_ids"]
    return ids, min(len(tokenizer(prefix, add_special_tokens=True)["input_ids"]), len(ids))


def passage(title: str, text: str) -> str:
    """A chunk as the model reads it, embedded or as text: the reference's '{title} {text}'."""
    return f"{title} {text}" if title else text


CHAT_ROLES = ("system", "user", "assistant")


def chat_prompt(turns: list[tuple[str, str]], eos: str) -> str:
    """A conversation in GritLM's chat format (Tulu 2's), ending where the assistant's reply begins.

    turns: (role, text) with roles among CHAT_ROLES. The leading <s> is left out: chat_text adds it.
    One user turn gives exactly the generation format.
    """
    parts = [f"<|{role}|>\n{text}{eos if role == 'assistant' else ''}\n" for role, text in turns]
    return "".join(parts) + "<|assistant|>\n"


def chat_text(tokenizer, turns: list[tuple[str, str]]) -> str:
    """The conversation as the model reads it, BOS included: its chat template, else GritLM's format.

    Tokenised with add_special_tokens=False, it gives exactly apply_chat_template's tokens.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": text} for role, text in turns]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + chat_prompt(turns, tokenizer.eos_token or "")


@dataclass(frozen=True)
class Frame:
    """How an index's cached segments are computed and read (the module docstring has both styles).

    grit: a segment is its embedding prompt, computed alone from position 0. chat: `head` (the chat
    template up to the user's words, then the preamble) is computed once; a chunk's or question's
    segment is its text below, computed after the head; `tail` (the template after the user's words)
    ends every prompt.
    """

    style: Style = "grit"
    head: str = ""
    tail: str = ""

    def text(self, text: str, role: str) -> str:
        """A chunk's passage (role "doc") or the question (role "query") as its cached segment holds it."""
        if self.style == "grit":
            return text  # the embedding prompt is put around it when it is tokenised (embed_tokens)
        return f"{text}\n\n" if role == "doc" else f"Question: {text}\n\n"


GRIT = Frame()


def chat_frame(tokenizer, preamble: str) -> Frame:
    """The chat style's frame: the model's template split around one user turn's words."""
    if not getattr(tokenizer, "chat_template", None):
        raise RagcacheError("the chat layout needs a model with a chat template; this one has none: use "
                            "the grit layout", param="layout")
    pieces = chat_text(tokenizer, [("user", _CONTENT)]).split(_CONTENT)
    if len(pieces) != 2:
        raise RagcacheError("the model's chat template does not place the user's words once; use the grit "
                            "layout", param="layout")
    return Frame("chat", pieces[0] + preamble, pieces[1])


def segment_tokens(tokenizer, frame: Frame, text: str, role: str) -> list[int]:
    """The tokens of a cached segment: the embedding prompt (grit), or the text as it sits in the turn (chat)."""
    if frame.style == "grit":
        return embed_tokens(tokenizer, text)[0]
    return tokenizer(frame.text(text, role), add_special_tokens=False)["input_ids"]


@dataclass
class Templates:
    """The text around cached segments; `{query}` and `{docs}` are filled in, `answer_prefix` follows.

    `none` None is the model's own chat format of the question (chat_text); a string replaces it,
    after BOS.
    """

    none: str | None = None
    doc_first: str = "\n<|user|>\n{query}\n\nAnswer the prior query while optionally using the context prior to it\n<|assistant|>\n"
    query_first: str = "\n<|user|>\n{docs}\n\nOptionally using the prior context answer the query prior to it\n<|assistant|>\n"
    doc_query: str = "\n<|user|>\nAnswer the prior query while optionally using the context prior to it\n<|assistant|>\n"
    query_doc: str = "\n<|user|>\nOptionally using the prior context answer the query prior to it\n<|assistant|>\n"
    answer_prefix: str = "The answer is"
    doc_separator: str = "\n\n"
    # the chat style's prompts: the template's end (Frame.tail) follows each, then chat_answer_prefix
    chat_question: str = "Question: {query}"  # after the chunks, when they come first
    chat_answer: str = "Answer the question."  # after the chunks, when the question came first
    chat_answer_prefix: str = ""

    @classmethod
    def chat(cls) -> "Templates":
        """Plain chat through mode 'none': the query is a whole chat text after BOS, with no answer prefix."""
        return cls(none="{query}", answer_prefix="")

    @classmethod
    def load(cls, path: str | Path | None) -> "Templates":
        """Defaults, with any of their fields overridden by a JSON object in `path`."""
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise RagcacheError(f"cannot read templates from '{path}': {e}", param="templates") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known or not all(isinstance(v, str) for v in data.values()):
            raise RagcacheError(f"templates file '{path}' must be a JSON object of strings with keys among: "
                                f"{', '.join(sorted(known))}", param="templates")
        return cls(**data)


@dataclass
class Segment:
    kind: str  # "bos" | "head" | "doc" | "query" | "prompt"
    token_ids: list[int]
    cached: bool
    attention: Attention
    chunk_id: int | None = None  # for doc segments: the stored chunk it came from
    context: int = 0  # cached segments: the leading tokens their KV attended to (the chat style's head)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.chunk_id is None:
            del d["chunk_id"]
        return d


@dataclass
class Doc:
    """A retrieved chunk as a layout places it: its passage text and its cached segment's tokens."""

    chunk_id: int
    text: str
    token_ids: list[int]


def build_layout(mode: Mode, order: Order, query: str, query_ids: list[int], docs: list[Doc], tokenizer,
                 templates: Templates, kv_attention: Attention, frame: Frame = GRIT) -> list[Segment]:
    """Segments for one question, docs in the order given; `query_ids` are the question's segment tokens."""
    if frame.style == "chat" and mode != "none":
        return _chat_layout(mode, order, query, query_ids, docs, tokenizer, templates, kv_attention, frame)
    t = templates

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(text: str) -> Segment:
        return Segment("prompt", tokenize(text + t.answer_prefix), False, "causal")

    def doc_segs(cached: bool) -> list[Segment]:
        att = kv_attention if cached else "causal"
        return [Segment("doc", list(d.token_ids), cached, att, d.chunk_id) for d in docs]

    def query_seg(cached: bool) -> Segment:
        return Segment("query", list(query_ids), cached, kv_attention if cached else "causal")

    doc_text = t.doc_separator.join(d.text for d in docs)
    if mode == "none":  # one string, BOS included: a tokenizer reads what follows a special token differently
        text = chat_text(tokenizer, [("user", query)]) if t.none is None else \
            (tokenizer.bos_token or "") + t.none.format(query=query)
        ids = tokenize(text + t.answer_prefix)
        n_bos = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
        return ([Segment("bos", ids[:n_bos], False, "causal")] if n_bos else []) + \
            [Segment("prompt", ids[n_bos:], False, "causal")]
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
    raise AssertionError(f"mode {mode!r} was not parsed by vocab.mode")


def _chat_layout(mode: Mode, order: Order, query: str, query_ids: list[int], docs: list[Doc], tokenizer,
                 t: Templates, kv_attention: Attention, frame: Frame) -> list[Segment]:
    """The chat style: the head, then chunks and question inside the user turn, then the template's end."""
    head = tokenizer(frame.head, add_special_tokens=False)["input_ids"]
    after = len(head)

    def prompt(text: str) -> Segment:
        return Segment("prompt", tokenizer(text + frame.tail + t.chat_answer_prefix, add_special_tokens=False)
                       ["input_ids"], False, "causal")

    def doc_segs(cached: bool) -> list[Segment]:
        return [Segment("doc", list(d.token_ids), cached, kv_attention if cached else "causal", d.chunk_id,
                        after if cached else 0) for d in docs]

    def query_seg(cached: bool) -> Segment:
        return Segment("query", list(query_ids), cached, kv_attention if cached else "causal",
                       context=after if cached else 0)

    cached_docs = mode in ("doc", "query-doc", "doc-query")
    cached_query = mode in ("query", "query-doc", "doc-query")
    preamble = [Segment("head", head, cached_docs or cached_query, "causal")]
    question = prompt(t.chat_question.format(query=query))
    if mode == "doc" or (mode == "rag" and order == "doc-first"):
        return preamble + doc_segs(cached_docs) + [question]
    if mode == "doc-query":
        return preamble + doc_segs(True) + [query_seg(True), prompt(t.chat_answer)]
    return preamble + [query_seg(cached_query)] + doc_segs(cached_docs) + [prompt(t.chat_answer)]


def layout_allowed(layout: list[Segment]) -> torch.Tensor:
    """(T, T) 'may attend' matrix equivalent to the cached computation of `layout`.

    Cached segments see only themselves (all of themselves, or causally) and their `context` (the
    chat style's head); every other token sees everything before it. With positions 0..T-1 one
    masked forward reproduces the cached path exactly, but for the chat style's second and later
    cached segments: each was computed right after the head, and placed further on it sees the head
    from further away than that (the approximation EPIC and APE make; fidelity.py measures it).
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
            allowed[start:end, : seg.context] = True
        start = end
    return allowed


def explain(layout: list[Segment], decode: Callable[[list[int]], str]) -> str:
    """A readable rendering of a layout, one line a segment."""
    lines, pos = [], 0
    for i, seg in enumerate(layout):
        n = len(seg.token_ids)
        how = f"cached, {seg.attention}" if seg.cached else "computed, causal"
        how += f", after the first {seg.context}" if seg.context else ""
        text = decode(seg.token_ids).replace("\n", "\\n")
        text = text if len(text) <= 70 else text[:67] + "..."
        chunk = f" chunk {seg.chunk_id}" if seg.chunk_id is not None else ""
        lines.append(f"{i:>2} {seg.kind:<6} positions {pos}-{pos + n - 1} ({n} tokens, {how}){chunk}: {text}")
        pos += n
    return "\n".join(lines)
