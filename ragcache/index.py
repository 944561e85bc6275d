"""An index on disk: the LMDB store, the FAISS view of its vectors, and its description (IndexMeta).

Opening checks every format first (meta.check_format); IndexMeta then checks, once a model and a
retriever are known, that they are the ones that made the stored caches and vectors. The FAISS view is rebuilt from LMDB
when it is stale or missing, and saved when no other process is writing.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from . import kv as kvlib
from . import kvremote
from .errors import RagcacheError
from .meta import IndexMeta
from .objstore import ObjectStore
from .records import Chunk, FileRecord, Hit
from .store import Store
from .vectors import Vectors, create

log = logging.getLogger(__name__)


class Index:
    def __init__(self, store: Store):
        self.store = store
        self._meta: IndexMeta | None = None
        self._vectors: Vectors | None = None
        self._vectors_stamp = -1
        self._objects: ObjectStore | None = None
        self.meta  # parse (and check the formats of) what is there now

    @classmethod
    def open(cls, path: str | Path, create: bool = True) -> "Index":
        store = Store(Path(path), create=create)
        try:
            return cls(store)
        except BaseException:
            store.close()
            raise

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def meta(self) -> IndexMeta | None:
        """The index's description; None until the first `index` run writes it (then it never changes)."""
        if self._meta is None:
            raw = self.store.meta()
            self._meta = IndexMeta.from_json(raw, str(self.path)) if raw else None
        return self._meta

    def create(self, meta: IndexMeta) -> None:
        """Write the description of a new index (under the writer lock)."""
        self.store.set_meta(meta.to_json())
        self._meta = meta

    def set_kv_codec(self, codec: str) -> None:
        """Record the KV codec chosen for this index (by the first batch's probe)."""
        self.meta.kv_codec = codec
        self.store.set_meta(self.meta.to_json())

    @property
    def objects(self) -> ObjectStore | None:
        """The object store that holds the KV blobs, when the index names one (kvremote.py); opened on first use."""
        url = self.meta.kv_store if self.meta is not None else None
        if url is not None and self._objects is None:
            self._objects = ObjectStore.open(url)
        return self._objects if url is not None else None

    def close(self) -> None:
        if self._objects is not None:
            self._objects.close()
        self.store.close()

    # ---- reading -------------------------------------------------------------------------------
    def count(self) -> int:
        return self.store.count()

    def chunk(self, cid: int) -> Chunk:
        return self.store.chunk(cid)

    def files(self) -> dict[str, FileRecord]:
        return self.store.files()

    def kv_bytes(self, sample: int = 64) -> dict:
        """Bytes per token of the stored KV (headers and quantisation statistics included), from the first
        `sample` blobs held in LMDB, beside the raw width; empty when the blobs live in an object store."""
        stored = tokens = raw = 0
        with self.store.snapshot() as txn:
            for n, (_, v) in enumerate(txn.cursor(db=self.store.db["kv"])):
                if n == sample or kvremote.referenced_key(v) is not None:
                    break
                try:
                    h = kvlib.header(v)
                except RagcacheError:
                    continue  # verify reports it
                layers, _, heads, t, head_dim = h.shape
                stored, tokens, raw = stored + len(v), tokens + t, layers * 2 * heads * head_dim * h.dtype.itemsize
        return {"per_token": stored / tokens, "raw_per_token": raw} if tokens else {}

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The k nearest chunks to `vector`, best first."""
        return [Hit(cid, score) for cid, score in self.vectors().search(vector, k)]

    def vectors(self) -> Vectors:
        """The FAISS view, loaded if current, else rebuilt from LMDB (and saved when possible)."""
        stamp = self.store.version()
        if self._vectors is not None and self._vectors_stamp == stamp:
            return self._vectors
        if self.meta is None:
            raise RagcacheError(f"the index '{self.path}' holds no documents; run ragcache index first")
        path = self.path / "vectors.faiss"
        vectors = Vectors.load(path, stamp, self.store.embeddings_of)
        if vectors is not None and vectors.kind != self.meta.vector_index:  # not this index's kind: rebuilt
            vectors = None
        if vectors is None:
            existed = path.exists()
            vectors = self._from_lmdb()
            if len(vectors) and self._save_rebuilt(vectors, stamp):
                log.warning(f"the vector index was {'out of date' if existed else 'missing'} (an interrupted run?); "
                            f"rebuilt it from {len(vectors)} stored embeddings")
        self._vectors, self._vectors_stamp = vectors, stamp
        return vectors

    def _save_rebuilt(self, vectors: Vectors, stamp: int) -> bool:
        """Save a rebuilt view so that later opens load it; False when a live writer elsewhere made it stale.

        That writer saves its own view when it ends, so there is nothing to report or save.
        """
        try:
            with self.writing():
                if self.store.version() == stamp:  # nothing was committed since the embeddings were read
                    try:
                        vectors.save(self.path / "vectors.faiss", stamp)
                    except RagcacheError:
                        pass  # a full disk or a read-only folder: the view in memory serves; the next open rebuilds
        except RagcacheError:
            return False
        return True

    # ---- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock for the block (re-entrant); fails at once, naming the process that holds it."""
        held = self.store.writing
        if not held:
            self.store.lock_for_writing()
        try:
            yield
        finally:
            if not held:
                self.store.unlock()

    def save_vectors(self, vectors: Vectors) -> None:
        """Save `vectors`, kept in step with every commit by the writer, as the view of LMDB as it now stands."""
        stamp = self.store.version()
        vectors.save(self.path / "vectors.faiss", stamp)
        self._vectors, self._vectors_stamp = vectors, stamp

    def rebuild_vectors(self) -> None:
        """Drop the view and build it anew from LMDB, then save it (verify --repair)."""
        self.save_vectors(self._from_lmdb())

    def _from_lmdb(self) -> Vectors:
        """A view of the index's kind, read from LMDB a batch at a time: an IVF-PQ one never holds all the floats."""
        vectors = create(self.meta.vector_index, self.meta.dim, self.store.embeddings_of)
        vectors.fill(self.store.embedding_ids(), self.store.embeddings_of)
        return vectors
