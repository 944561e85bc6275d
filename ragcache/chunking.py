"""Documents -> chunks: token-bounded spans that end at paragraph, sentence or word boundaries.

A chunk is a character span [start, end) of its document's text. Spans follow each other with only
whitespace between them, so no text is lost or repeated, and each span's own tokens number at most
`max_tokens`. A word is cut only when a single word is longer than the whole limit.
"""

from __future__ import annotations

import re
from bisect import bisect_right

DEFAULT_CHUNK_TOKENS = 256  # about the 100-word passages of the paper's Wikipedia index, with room for long words

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"[.!?。][\"')\]]*\s")
_WORD = re.compile(r"\s")


def chunk_spans(text: str, tokenizer, max_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[tuple[int, int]]:
    if max_tokens < 8:
        raise ValueError("max_tokens must be at least 8")
    ends = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    breaks = {
        "paragraph": [m.start() for m in _PARAGRAPH.finditer(text)],
        "sentence": [m.end() - 1 for m in _SENTENCE.finditer(text)],
        "word": [m.start() for m in _WORD.finditer(text)],
    }
    spans, start, tok = [], _skip_space(text, 0), 0
    while start < len(text):
        while tok < len(ends) and ends[tok] <= start:
            tok += 1
        budget = max_tokens
        while True:
            end = _pick_end(text, start, ends, tok, budget, breaks)
            if _count(tokenizer, text[start:end]) <= max_tokens or end - start <= 1:
                break
            budget -= max(1, _count(tokenizer, text[start:end]) - max_tokens)
        spans.append((start, _trim(text, start, end)))
        start = _skip_space(text, end)
    return spans


def _pick_end(text: str, start: int, ends: list[int], tok: int, budget: int, breaks: dict) -> int:
    """The best boundary within `budget` tokens of `start`: paragraph, else sentence, else word."""
    if tok + budget >= len(ends):
        return len(text)
    limit = ends[tok + budget - 1]  # the chunk may reach the end of its budget's last token
    for kind in ("paragraph", "sentence", "word"):
        points = breaks[kind]  # sorted
        i = bisect_right(points, limit) - 1
        # a paragraph or sentence break in the first half would waste most of the budget
        floor = start + (limit - start) // 2 if kind != "word" else start
        if i >= 0 and points[i] > floor:
            return points[i]
    return max(limit, start + 1)  # one word longer than the limit: cut it at a token boundary


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _trim(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end
