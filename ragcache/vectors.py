"""The FAISS view of the stored embeddings: exact inner product over L2-normalised vectors (= cosine).

It is only a view: LMDB holds every embedding, and the file here is stamped with the LMDB
transaction it matches. A missing or stale file is rebuilt from LMDB.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from .errors import RagcacheError


class Vectors:
    def __init__(self, dim: int):
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, ids: list[int] | np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k nearest (id, score), best first."""
        k = min(k, len(self))
        if k <= 0:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def contents(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, vector) held, in the order they were added."""
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return ids, self.index.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.dim), np.float32)

    def save(self, path: Path, stamp: int) -> None:
        """Write the view and its stamp; a reader never sees a half-written index file."""
        tmp = path.with_suffix(".tmp")
        try:
            faiss.write_index(self.index, str(tmp))
            tmp.replace(path)
            path.with_suffix(".json").write_text(json.dumps({"stamp": stamp, "dim": self.dim}))
        except (OSError, RuntimeError) as e:  # faiss reports a failed write as RuntimeError
            why = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]
            raise RagcacheError(f"cannot save the vector index '{path}' ({why}); the stored chunks are safe "
                                "and it is rebuilt from them when the index is next opened") from None

    @classmethod
    def load(cls, path: Path, stamp: int) -> "Vectors | None":
        """The saved view if it matches LMDB transaction `stamp`, else None."""
        try:
            info = json.loads(path.with_suffix(".json").read_text())
            if info["stamp"] != stamp:
                return None
            vectors = cls(info["dim"])
            vectors.index = faiss.read_index(str(path))
            return vectors
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
