"""Typed records: a stored chunk, a file's record, a retrieval hit, and a source an answer cites.

store.py writes Chunk and FileRecord as JSON; everything past the store handles these types, never
the JSON's keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Chunk:
    """A span [start, end) of one document's text, and the tokens its cache was computed over."""

    doc_id: str
    title: str
    text: str
    source: str  # the file it came from, by its resolved path
    start: int
    end: int
    token_ids: list[int]  # the embedding prompt's tokens: the cached segment

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Chunk":
        """Raises KeyError or TypeError on a damaged record (verify reports those)."""
        chunk = cls(**{f: data[f] for f in ("doc_id", "title", "text", "source", "start", "end", "token_ids")})
        if not (isinstance(chunk.text, str) and isinstance(chunk.title, str) and isinstance(chunk.token_ids, list)):
            raise TypeError("a chunk record holds a field of the wrong type")
        return chunk


@dataclass
class FileRecord:
    """One indexed file: the hash of its bytes and the chunks it owns, in order.

    A file is committed in batches of chunks; `complete` turns true with its last batch. An
    incomplete record is a run cut short: the next run with the same bytes resumes after its chunks.
    """

    hash: str
    chunks: list[int]
    complete: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    score: float


EXCERPT_CHARS = 80


@dataclass
class Source:
    """A retrieved chunk as an answer cites it: which passage (record id, character span) and a glimpse of it."""

    rank: int
    chunk_id: int
    score: float
    doc_id: str
    title: str
    source: str
    start: int
    end: int
    excerpt: str

    @classmethod
    def of(cls, rank: int, hit: Hit, chunk: Chunk) -> "Source":
        text = " ".join(chunk.text.split())
        excerpt = text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1].rstrip() + "…"
        return cls(rank, hit.chunk_id, round(hit.score, 6), chunk.doc_id, chunk.title, chunk.source, chunk.start,
                   chunk.end, excerpt)

    def line(self) -> str:
        """How `ask` and the server's sources block print it: two lines, the passage and its excerpt."""
        name = f"{self.title} ({self.doc_id})" if self.title else self.doc_id
        return (f"[{self.rank}] {name}, chars {self.start}-{self.end} of {self.source} (score {self.score:.3f})\n"
                f"    \"{self.excerpt}\"")

    def to_dict(self) -> dict:
        return asdict(self)
