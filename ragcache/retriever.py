"""The retriever: what embeds chunks and questions for search, beside the generator that caches them.

Two implementations of one interface:
- GritRetriever: the GRIT model embeds for itself; one bidirectional pass gives a chunk's embedding
  and (with bidirectional KV attention) its cache.
- EmbedderRetriever: a separate sentence-transformers encoder (the two-model baseline) embeds; the
  generator runs its own pass for the cache, causal by default.

`encode` pairs each text's retrieval vector with the generator's tokens and KV for the text's cached
segment in the index's layout style (prompts.Frame), so indexing, recomputing a damaged cache,
verify --repair and the question's pass never ask which retriever or style they have. Only the GRIT
style with the GRIT model gets both from one pass, the paper's point; the chat style runs the
generator's segment pass (GritModel.encode_segments) beside the embedding.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .embedder import Embedder
from .errors import RagcacheError
from .meta import EmbedderIdentity
from .model import Encoded, GritModel
from .prompts import GRIT, Frame
from .vocab import Attention


class Retriever(Protocol):
    name: str
    dim: int
    default_kv_attention: Attention

    def identity(self) -> EmbedderIdentity | None:
        """What the index records to find this retriever again; None when the generator embeds itself."""
        ...

    def embed(self, texts: list[str], instruction: str = "", batch_size: int = 8) -> np.ndarray:
        """L2-normalised (n, dim) float32 vectors."""
        ...

    def token_counts(self, texts: list[str], instruction: str = "") -> list[int]:
        """Tokens each text takes in the embedding pass; a text too long for it is an error."""
        ...

    def encode(self, texts: list[str], kv: Attention | None, frame: Frame = GRIT, role: str = "doc",
               batch_size: int = 8) -> list[Encoded]:
        """Each text's retrieval vector, with the generator's tokens of its segment (a chunk's, role "doc",
        or the question's, "query") in `frame` and, when `kv`, that segment's KV."""
        ...


class GritRetriever:
    default_kv_attention: Attention = "bidirectional"

    def __init__(self, model: GritModel):
        self.model, self.name, self.dim = model, model.name, model.dim

    def identity(self) -> None:
        return None

    def embed(self, texts: list[str], instruction: str = "", batch_size: int = 8) -> np.ndarray:
        return self.model.embed(texts, instruction=instruction, batch_size=batch_size)

    def token_counts(self, texts: list[str], instruction: str = "") -> list[int]:
        counts = [len(self.model.embed_tokens(t, instruction)[0]) for t in texts]
        for i, n in enumerate(counts):
            if n > self.model.max_context:
                raise RagcacheError(f"input {i} takes {n} tokens, more than the model's context of "
                                    f"{self.model.max_context}", param="input")
        return counts

    def encode(self, texts: list[str], kv: Attention | None, frame: Frame = GRIT, role: str = "doc",
               batch_size: int = 8) -> list[Encoded]:
        if frame.style == "grit":  # the embedding pass is the segment's: one pass gives both
            return self.model.encode(texts, kv=kv, batch_size=batch_size)
        vectors = self.model.embed(texts, batch_size=batch_size)
        return _with_vectors(self.model, texts, vectors, kv, frame, role, batch_size)


class EmbedderRetriever:
    default_kv_attention: Attention = "causal"  # a plain decoder's own caches are causal

    def __init__(self, embedder: Embedder, model: GritModel):
        self.embedder, self.model = embedder, model
        self.name, self.dim = embedder.name, embedder.dim

    def identity(self) -> EmbedderIdentity:
        return self.embedder.identity()

    def embed(self, texts: list[str], instruction: str = "", batch_size: int = 8) -> np.ndarray:
        if instruction:
            raise RagcacheError("this index embeds with a separate sentence-transformers model, which takes no "
                                "instruction", param="instruction")
        return self.embedder.embed(texts)

    def token_counts(self, texts: list[str], instruction: str = "") -> list[int]:
        """It cuts each text at its own limit, as sentence-transformers does: no text is too long."""
        tokenizer = self.embedder.tokenizer
        return [min(len(tokenizer(t)["input_ids"]), self.embedder.max_tokens) for t in texts]

    def encode(self, texts: list[str], kv: Attention | None, frame: Frame = GRIT, role: str = "doc",
               batch_size: int = 8) -> list[Encoded]:
        return _with_vectors(self.model, texts, self.embedder.embed(texts), kv, frame, role, batch_size)


def _with_vectors(model: GritModel, texts: list[str], vectors: np.ndarray, kv: Attention | None, frame: Frame,
                  role: str, batch_size: int) -> list[Encoded]:
    """The retrieval vectors beside the generator's segment tokens and, when `kv`, its segment pass."""
    if kv is None:  # the generator's tokens only: no pass of its own
        return [Encoded(model.segment_tokens(t, frame, role), v, None) for t, v in zip(texts, vectors)]
    encoded = model.encode_segments(texts, frame, kv, role, batch_size)
    for enc, vector in zip(encoded, vectors):
        enc.embedding = vector
    return encoded
