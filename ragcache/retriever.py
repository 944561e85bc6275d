"""The retriever: what embeds chunks and questions for search, beside the generator that caches them.

Two implementations of one interface:
- GritRetriever: the GRIT model embeds for itself; one bidirectional pass gives a chunk's embedding
  and (with bidirectional KV attention) its cache.
- EmbedderRetriever: a separate sentence-transformers encoder (the two-model baseline) embeds; the
  generator runs its own pass for the cache, causal by default.

`encode` pairs each text's retrieval vector with the generator's embedding-prompt tokens and KV, so
indexing, recomputing a damaged cache, verify --repair and the question's pass never ask which
retriever they have.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .embedder import Embedder
from .errors import RagcacheError
from .meta import EmbedderIdentity
from .model import Encoded, GritModel
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

    def encode(self, texts: list[str], kv: Attention | None, batch_size: int = 8) -> list[Encoded]:
        """Each text's retrieval vector, with the generator's embedding-prompt tokens and, when `kv`, its KV."""
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

    def encode(self, texts: list[str], kv: Attention | None, batch_size: int = 8) -> list[Encoded]:
        return self.model.encode(texts, kv=kv, batch_size=batch_size)


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

    def encode(self, texts: list[str], kv: Attention | None, batch_size: int = 8) -> list[Encoded]:
        vectors = self.embedder.embed(texts)
        if kv is None:  # the generator's tokens only: no pass of its own
            return [Encoded(self.model.embed_tokens(t)[0], v, None) for t, v in zip(texts, vectors)]
        encoded = self.model.encode(texts, kv=kv, batch_size=batch_size, embed=False)
        for enc, vector in zip(encoded, vectors):
            enc.embedding = vector
        return encoded
