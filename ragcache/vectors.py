"""The FAISS view of the stored embeddings, of the kind an index fixes when it is built (IndexMeta.vector_index).

flat: exact inner product over L2-normalised vectors (= cosine), every float held in memory.
ivfpq: IVF-PQ codes in memory, 1-4% of the floats' size; a search takes a shortlist from them
and re-ranks it exactly with the float embeddings read from LMDB, so the scores are the flat ones.
Below TRAIN_AT vectors there is too little to train it on, and an ivfpq view holds a flat index.

It is only a view: LMDB holds every embedding, and the file here is stamped with the LMDB
transaction it matches. A missing or stale file is rebuilt from LMDB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from .errors import RagcacheError
from .vocab import VectorIndex

# Stored (ids, vectors) for the given ids, those since deleted left out: Store.embeddings_of
Fetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

FILL_BATCH = 65536  # embeddings read from LMDB at a time when a view is rebuilt
ID_BYTES = 8  # FAISS keeps each id as an int64
REV_MAP_BYTES = 36  # IndexIDMap2's id -> slot hash map, per entry (measured: libstdc++ unordered_map)
KSUB = 256  # centroids per PQ sub-quantiser: 8-bit codes
TRAIN_AT = 10_000  # an ivfpq view trains once it holds this many: 39 points per PQ centroid, FAISS's minimum
MAX_CODE_BYTES = 128  # PQ sub-quantisers at most: 32 dimensions each for GritLM's 4096
# The shortlist re-ranked exactly: RERANK per result wanted, never fewer than RERANK_MIN. SciFact's top 10
# are all in the first 100; 200 guards against coarser codes (GritLM's 32 dimensions a byte, MiniLM's 8)
# and less clustered vectors, for 200 reads from LMDB (3 MiB of GritLM's floats) a question.
RERANK = 10
RERANK_MIN = 200


class Vectors:
    """The flat view: exact, and the base of the IVF-PQ one."""

    kind: VectorIndex = "flat"

    def __init__(self, dim: int):
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, ids: list[int] | np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: list[int]) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def fill(self, ids: np.ndarray, fetch: Fetch) -> None:
        """Add the stored embeddings `ids`, read through `fetch` a batch at a time."""
        for start in range(0, len(ids), FILL_BATCH):
            self.add(*fetch(ids[start : start + FILL_BATCH]))

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k nearest (id, score), best first."""
        k = min(k, len(self))
        if k <= 0:
            return []
        scores, ids = self.index.search(_row(query), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def contents(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every id held, in the order they were added, and its vector (None where only codes are held)."""
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return ids, self.index.index.reconstruct_n(0, len(self)) if len(self) else np.zeros((0, self.dim), np.float32)

    def describe(self) -> dict:
        """The kind, the FAISS structure, how many vectors and the memory they take."""
        return {"kind": self.kind, "structure": "IDMap2,Flat", "count": len(self),
                "memory_bytes": flat_bytes(len(self), self.dim)}

    def save(self, path: Path, stamp: int) -> None:
        """Write the view and its stamp; a reader never sees a half-written index file."""
        tmp = path.with_suffix(".tmp")
        try:
            faiss.write_index(self.index, str(tmp))
            tmp.replace(path)
            path.with_suffix(".json").write_text(json.dumps({"stamp": stamp, "dim": self.dim} | self.describe()))
        except (OSError, RuntimeError) as e:  # faiss reports a failed write as RuntimeError
            why = e.strerror if isinstance(e, OSError) else str(e).splitlines()[0]
            raise RagcacheError(f"cannot save the vector index '{path}' ({why}); the stored chunks are safe "
                                "and it is rebuilt from them when the index is next opened") from None

    @staticmethod
    def load(path: Path, stamp: int, fetch: Fetch | None = None) -> "Vectors | None":
        """The saved view if it matches LMDB transaction `stamp`, else None; an ivfpq view searches through `fetch`."""
        info = saved(path, stamp)
        if info is None:
            return None
        try:
            vectors = create(info.get("kind", "flat"), info["dim"], fetch)  # written before ivfpq: flat
            vectors.index = faiss.read_index(str(path))
            return vectors
        except (OSError, ValueError, KeyError, RuntimeError):
            return None


class IvfPqVectors(Vectors):
    """IVF-PQ codes for a shortlist, re-ranked exactly with floats `fetch` reads from LMDB.

    LMDB is memory-mapped already, so the floats a re-rank reads are pages of the OS's cache, not
    memory this process holds, and there is no second copy to keep in step. The lists and codes are
    trained once, on the vectors there are when the view first holds TRAIN_AT (or, rebuilt from LMDB,
    on a sample of all): a corpus that grows far past that keeps its lists, which then grow longer.
    """

    kind: VectorIndex = "ivfpq"

    def __init__(self, dim: int, fetch: Fetch | None, train_at: int | None = None):
        super().__init__(dim)  # flat until trained
        self.fetch = fetch
        self.train_at = max(TRAIN_AT if train_at is None else train_at, KSUB)  # PQ needs a point per centroid

    @property
    def trained(self) -> bool:
        return isinstance(self.index, faiss.IndexIVFPQ)

    def add(self, ids: list[int] | np.ndarray, vectors: np.ndarray) -> None:
        if not self.trained and len(self) + len(ids) >= self.train_at:
            held_ids, held = super().contents()
            ids, vectors = np.concatenate([held_ids, np.asarray(ids, np.int64)]), np.concatenate([held, vectors])
            self._train(np.ascontiguousarray(vectors, dtype=np.float32), len(ids))
        super().add(ids, vectors)

    def fill(self, ids: np.ndarray, fetch: Fetch) -> None:
        """Train on a sample of `ids` first, when there are enough, so that the floats need not all be in memory."""
        if not self.trained and len(self) + len(ids) >= self.train_at:
            sample = np.random.default_rng(0).choice(ids, min(len(ids), train_size(lists(len(ids)))), replace=False)
            self._train(fetch(np.sort(sample))[1], len(ids))
        super().fill(ids, fetch)

    def _train(self, sample: np.ndarray, n: int) -> None:
        """Replace the flat index with an empty IVF-PQ one trained on `sample`, sized for `n` vectors."""
        held = self.index
        nlist = lists(n)
        index = faiss.index_factory(self.dim, f"IVF{nlist},PQ{code_bytes(self.dim)}", faiss.METRIC_INNER_PRODUCT)
        # polysemous training speeds a Hamming-filtered search, which is not used, and takes most of the time
        index.do_polysemous_training = False
        index.train(sample)
        self.index = index
        held.reset()

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        if not self.trained:
            return super().search(query, k)
        k = min(k, len(self))
        if k <= 0:
            return []
        q = _row(query)
        _, shortlist = self.index.search(q, min(len(self), max(RERANK * k, RERANK_MIN)),
                                         params=faiss.SearchParametersIVF(nprobe=probes(self.index.nlist)))
        ids, vecs = self.fetch(shortlist[0][shortlist[0] >= 0])
        if not len(ids):
            return []
        scores = vecs @ q[0]
        best = np.argsort(-scores, kind="stable")[:k]
        return [(int(ids[i]), float(scores[i])) for i in best]

    def contents(self) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.trained:
            return super().contents()
        lists_ = self.index.invlists
        ids = [faiss.rev_swig_ptr(lists_.get_ids(i), lists_.list_size(i)).copy() for i in range(lists_.nlist)
               if lists_.list_size(i)]
        return (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)), None

    def describe(self) -> dict:
        if not self.trained:
            return super().describe() | {"kind": self.kind, "train_at": self.train_at}
        nlist, m = self.index.nlist, self.index.pq.M
        return {"kind": self.kind, "structure": f"IVF{nlist},PQ{m}", "count": len(self), "probes": probes(nlist),
                "memory_bytes": ivfpq_bytes(len(self), self.dim, nlist, m)}


def create(kind: VectorIndex, dim: int, fetch: Fetch | None) -> Vectors:
    """An empty view of `kind`; an ivfpq one re-ranks with the floats `fetch` reads."""
    return IvfPqVectors(dim, fetch) if kind == "ivfpq" else Vectors(dim)


def saved(path: Path, stamp: int) -> dict | None:
    """What the saved view's stamp file says (dim, kind, structure, count, memory), if it matches `stamp`."""
    try:
        info = json.loads(path.with_suffix(".json").read_text())
        return info if isinstance(info, dict) and info.get("stamp") == stamp else None
    except (OSError, ValueError):
        return None


def account(path: Path, stamp: int, kind: VectorIndex, dim: int, count: int) -> dict:
    """The view's kind, structure, size and memory, for `ragcache info`, without loading it.

    The saved stamp file says; where it is stale, missing or older than these accounts, a flat view's
    memory follows from `count` alone, and an IVF-PQ one's is unknown (None) until it is saved again.
    """
    info = saved(path, stamp)
    if info is not None and "memory_bytes" in info:
        return {k: v for k, v in info.items() if k not in ("stamp", "dim")}
    if kind == "flat":
        return {"kind": kind, "structure": "IDMap2,Flat", "count": count, "memory_bytes": flat_bytes(count, dim)}
    return {"kind": kind, "count": count, "memory_bytes": None}


def account_line(info: dict) -> str:
    """`account` as a line of text."""
    if info["memory_bytes"] is None:
        return f"{info['kind']} vector index (its memory is known once the index is next opened)"
    if "train_at" in info:
        shape = f"exact until {info['train_at']:,} vectors, then IVF-PQ"
    elif info["kind"] == "ivfpq":
        shape = f"{info['structure']}, {info['probes']} lists probed, the shortlist re-ranked exactly"
    else:
        shape = "exact"
    return (f"{info['kind']} vector index ({shape}): {info['count']:,} vectors, "
            f"{info['memory_bytes'] / 2**20:.1f} MiB in memory")


# ---- sizes -------------------------------------------------------------------------------------
def lists(n: int) -> int:
    """IVF lists for n vectors: a power of two near 4 sqrt(n), each list trained on at least 39 points."""
    near = 2 ** round(math.log2(4 * math.sqrt(n)))
    return max(1, min(near, 2 ** int(math.log2(max(n // 39, 1)))))


def train_size(nlist: int) -> int:
    """Points to train on: 39 per IVF list and per PQ centroid (FAISS's minimum), never more than needed."""
    return 39 * max(nlist, KSUB)


def code_bytes(dim: int) -> int:
    """PQ sub-quantisers (one byte each): the most that divides dim, has 8 dimensions or more each,
    and is at most MAX_CODE_BYTES."""
    return max(m for m in range(1, min(MAX_CODE_BYTES, max(dim // 8, 1)) + 1) if dim % m == 0)


def probes(nlist: int) -> int:
    """Lists searched per query: an eighth of them, at least 64 (all, up to 64 lists).

    Questions and passages are embedded unlike each other, so a question's relevant passages lie in
    lists far from it: on SciFact with all-MiniLM-L6-v2 (5,183 abstracts, 128 lists), nDCG@10 falls
    4.95 points below flat with 16 probes, 0.85 with 32 and 0.14 with 64.
    """
    return min(nlist, max(64, nlist // 8))


def flat_bytes(n: int, dim: int) -> int:
    """Memory of a flat view: the floats, the ids and IndexIDMap2's map back from ids."""
    return n * (4 * dim + ID_BYTES + REV_MAP_BYTES)


def ivfpq_bytes(n: int, dim: int, nlist: int, m: int) -> int:
    """Memory of an IVF-PQ view: a code and an id per vector, the coarse centroids and the PQ codebooks."""
    return n * (m + ID_BYTES) + 4 * dim * (nlist + KSUB)


def _row(query: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32)
