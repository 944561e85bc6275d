"""The on-disk format, in one place: an LMDB environment that is the index's source of truth.

INDEX/                  an LMDB environment (data.mdb, lock.mdb), plus
INDEX/vectors.faiss     a FAISS view of the embeddings, rebuilt from LMDB when it is stale
INDEX/writer.lock       held by the one process that may write

Named databases:
  meta    b"index"          -> JSON: an IndexMeta (meta.py: formats, model identity, dtype, chunking, KV attention)
          b"next_id"        -> the next chunk id, as decimal text
  files   source path       -> JSON: a FileRecord (records.py): sha256 of the file's bytes, its chunk ids
  chunks  id (u64 BE)       -> JSON: a Chunk (records.py): doc_id, title, text, source, start, end, token_ids
  emb     id (u64 BE)       -> float32 bytes of the pooled, L2-normalised embedding
  kv      id (u64 BE)       -> a KV blob (see kv.py): header + raw or zstd bytes

Files are identified by their resolved real path. A file's chunks are committed in batches: each
batch's chunks, embeddings, KV blobs and the file's `files` record are one transaction, and the record
says `complete` only with the file's last batch. Whenever the writer dies, every chunk is whole (text,
embedding and KV, or none of them) and each file holds a prefix of its chunks; the next run resumes.

Before any page is read, the data file's size is checked against LMDB's own account of its last page:
a truncated data.mdb would otherwise kill the process with SIGBUS when a missing page is touched. Readers see the last committed
snapshot while the one writer works; when another process has grown the map, a reader adopts its size.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np

from .errors import RagcacheError
from .records import Chunk, FileRecord

_ID = struct.Struct(">Q")
_PAGE = os.sysconf("SC_PAGE_SIZE")  # LMDB's page size: the OS's
_MAP_SIZE = 1 << 36  # 64 GiB of address space to start; LMDB files stay sparse, and it doubles when full


def key(cid: int) -> bytes:
    return _ID.pack(cid)


def unkey(raw: bytes | memoryview) -> int:
    return _ID.unpack(raw)[0]


class Store:
    def __init__(self, path: Path, create: bool):
        """Open the index at `path`, creating it when `create`; readers and the writer share one env."""
        self.path = path
        check(path, must_exist=not create)
        data = path / "data.mdb"
        if data.exists() and data.stat().st_size < 2 * _PAGE:  # not even LMDB's two meta pages
            raise _truncated(data, data.stat().st_size, 2 * _PAGE)
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(str(path), map_size=_MAP_SIZE, max_dbs=8, lock=True)
            self.env.reader_check()  # free the reader slots of killed processes, which pin old pages
        except (OSError, lmdb.Error) as e:
            raise RagcacheError(f"cannot open the index at '{path}': {e}") from None
        try:
            self._check_size()
            self.db = self._open_dbs(create)
        except BaseException:
            self.env.close()
            raise
        self._lock = None

    def _check_size(self) -> None:
        """The data file must hold every page LMDB has committed (read from the meta pages, not the map)."""
        needed = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        size = (self.path / "data.mdb").stat().st_size
        if size < needed:
            raise _truncated(self.path / "data.mdb", size, needed)

    def _open_dbs(self, create: bool) -> dict:
        """The named databases; a writer creates those missing, as after a first run killed mid-creation."""
        names = ("meta", "files", "chunks", "emb", "kv")
        with self.env.begin() as txn:  # the main database holds the names of the others
            held = {bytes(k) for k, _ in txn.cursor()}
        if held - {n.encode() for n in names}:
            raise RagcacheError(f"'{self.path}' is not a ragcache index")
        if not create and len(held) < len(names):
            raise RagcacheError(f"no index at '{self.path}'; build one with: ragcache index CORPUS -i {self.path}")
        try:
            return {n: self.env.open_db(n.encode(), create=create) for n in names}
        except lmdb.Error as e:
            raise RagcacheError(f"cannot open the index at '{self.path}': {e}") from None

    def lock_for_writing(self) -> None:
        """Become the index's one writer, or fail at once naming the process that is."""
        if self._lock is None:
            self._lock = _take_writer_lock(self.path / "writer.lock")

    @property
    def writing(self) -> bool:
        """Whether this process holds the writer lock."""
        return self._lock is not None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def close(self) -> None:
        self.unlock()
        self.env.close()

    # ---- reads ---------------------------------------------------------------------------------
    def meta(self) -> dict | None:
        """The index's description as stored (meta.IndexMeta parses and checks it), None before the first run."""
        with self._begin(db=self.db["meta"]) as txn:
            raw = txn.get(b"index")
        return json.loads(raw) if raw else None

    def files(self) -> dict[str, FileRecord]:
        with self._begin(db=self.db["files"]) as txn:
            return {k.decode(): FileRecord(**json.loads(v)) for k, v in txn.cursor()}

    def file(self, source: str) -> FileRecord | None:
        with self._begin(db=self.db["files"]) as txn:
            raw = txn.get(source.encode())
        return FileRecord(**json.loads(raw)) if raw else None

    def chunk(self, cid: int) -> Chunk:
        with self._begin(db=self.db["chunks"]) as txn:
            raw = txn.get(key(cid))
        if raw is None:
            raise RagcacheError(f"chunk {cid} is missing from the index")
        return Chunk.from_json(json.loads(raw))

    @contextlib.contextmanager
    def kv_views(self, cids: list[int]) -> Iterator[list[memoryview | None]]:
        """Zero-copy views of the KV blobs of `cids` in LMDB's memory map (None where there is none),
        valid only inside the block."""
        with self._begin(db=self.db["kv"], buffers=True) as txn:
            yield [txn.get(key(cid)) for cid in cids]

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[lmdb.Transaction]:
        """One read transaction over every database (values as buffers): a consistent view of the index."""
        with self._begin(buffers=True) as txn:
            yield txn

    def count(self) -> int:
        with self._begin() as txn:
            return txn.stat(self.db["chunks"])["entries"]

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors) in id order, every float in memory at once."""
        ids, vecs = [], []
        with self._begin(db=self.db["emb"]) as txn:
            for k, v in txn.cursor():
                ids.append(unkey(k))
                vecs.append(np.frombuffer(v, dtype=np.float32))
        return np.array(ids, dtype=np.int64), (np.stack(vecs) if vecs else np.zeros((0, 0), np.float32))

    def embedding_ids(self) -> np.ndarray:
        """Every stored embedding's id, in id order, without reading the vectors."""
        with self._begin(db=self.db["emb"]) as txn:
            return np.array([unkey(k) for k in txn.cursor().iternext(keys=True, values=False)], dtype=np.int64)

    def embeddings_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (ids, vectors) of those of `ids` still stored, in their order: what an IVF-PQ view re-ranks with."""
        found, vecs = [], []
        with self._begin(db=self.db["emb"]) as txn:
            for cid in ids:
                raw = txn.get(key(int(cid)))
                if raw is not None:
                    found.append(int(cid))
                    vecs.append(np.frombuffer(raw, dtype=np.float32))
        return np.array(found, dtype=np.int64), (np.stack(vecs) if vecs else np.zeros((0, 0), np.float32))

    def version(self) -> int:
        """The last committed transaction: FAISS files are stamped with it to detect staleness."""
        return self.env.info()["last_txnid"]

    # ---- writes --------------------------------------------------------------------------------
    def set_meta(self, meta: dict) -> None:
        self._write(lambda txn: txn.put(b"index", json.dumps(meta).encode(), db=self.db["meta"]))

    def put_batch(self, parts: list[FilePart]) -> list[tuple[list[int], list[int]]]:
        """Commit parts of files in one transaction; for each part, the (removed, added) chunk ids.

        A part marked `fresh` first drops everything stored for its file (an older version, or a
        cut-short run over other bytes); later parts append to the file's record.
        """
        def work(txn):
            raw = txn.get(b"next_id", db=self.db["meta"])
            next_id = int(raw) if raw else 0
            out = []
            for part in parts:
                removed = self._drop(txn, part.source) if part.fresh else []
                held = txn.get(part.source.encode(), db=self.db["files"])
                record = FileRecord(**json.loads(held)) if held else FileRecord(part.file_hash, [], False)
                added = list(range(next_id, next_id + len(part.rows)))
                next_id += len(part.rows)
                for cid, (chunk, emb, blob) in zip(added, part.rows):
                    txn.put(key(cid), json.dumps(chunk.to_json()).encode(), db=self.db["chunks"])
                    txn.put(key(cid), np.asarray(emb, dtype=np.float32).tobytes(), db=self.db["emb"])
                    txn.put(key(cid), blob, db=self.db["kv"])
                record.chunks += added
                record.complete = part.complete
                txn.put(part.source.encode(), json.dumps(record.to_json()).encode(), db=self.db["files"])
                out.append((removed, added))
            txn.put(b"next_id", str(next_id).encode(), db=self.db["meta"])
            return out
        return self._write(work)

    def rename_file(self, old: str, new: str) -> None:
        """File `old`'s record and chunks under the name `new` (verify --repair: paths made real)."""
        def work(txn):
            record = FileRecord(**json.loads(txn.get(old.encode(), db=self.db["files"])))
            for cid in record.chunks:
                raw = txn.get(key(cid), db=self.db["chunks"])
                if raw is not None:
                    txn.put(key(cid), json.dumps(json.loads(raw) | {"source": new}).encode(), db=self.db["chunks"])
            txn.delete(old.encode(), db=self.db["files"])
            txn.put(new.encode(), json.dumps(record.to_json()).encode(), db=self.db["files"])
        self._write(work)

    def remove_file(self, source: str) -> list[int]:
        return self._write(lambda txn: self._drop(txn, source))

    def put_parts(self, cid: int, emb: np.ndarray | None, blob: bytes | None) -> None:
        """Rewrite a stored chunk's embedding and/or KV blob (verify --repair)."""
        def work(txn):
            if emb is not None:
                txn.put(key(cid), np.asarray(emb, dtype=np.float32).tobytes(), db=self.db["emb"])
            if blob is not None:
                txn.put(key(cid), blob, db=self.db["kv"])
        self._write(work)

    def remove_chunks(self, ids: list[int]) -> None:
        """Delete every part of chunks that no file owns (verify --repair)."""
        def work(txn):
            for cid in ids:
                for name in ("chunks", "emb", "kv"):
                    txn.delete(key(cid), db=self.db[name])
        self._write(work)

    def _drop(self, txn, source: str) -> list[int]:
        raw = txn.get(source.encode(), db=self.db["files"])
        if raw is None:
            return []
        ids = FileRecord(**json.loads(raw)).chunks
        for cid in ids:
            for name in ("chunks", "emb", "kv"):
                txn.delete(key(cid), db=self.db[name])
        txn.delete(source.encode(), db=self.db["files"])
        return ids

    def _begin(self, **kwargs) -> lmdb.Transaction:
        """A transaction; when another process has grown the map past ours, adopt its size first."""
        try:
            return self.env.begin(**kwargs)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)  # 0: the size the environment has now
            return self.env.begin(**kwargs)

    def _write(self, work):
        """Run `work(txn)` in one write transaction, growing the map and retrying when it is full.

        Any other failure (a full disk, a read-only folder) aborts the transaction, so what was
        committed before stays whole, and becomes one line that says so.
        """
        while True:
            try:
                with self._begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except (lmdb.Error, OSError) as e:
                kept = "everything committed before is kept"
                if isinstance(e, lmdb.DiskError):
                    raise RagcacheError(f"cannot write to the index '{self.path}': the disk is full; {kept}: free "
                                        "some space and run the same command again to resume") from None
                raise RagcacheError(f"cannot write to the index '{self.path}': {e}; {kept}") from None


@dataclass
class FilePart:
    """A batch of one file's chunks, ready to commit: (chunk, embedding, KV blob) each."""

    source: str
    file_hash: str
    rows: list[tuple[Chunk, np.ndarray, bytes]]
    fresh: bool  # the file's first batch in this run: whatever was stored for it goes first
    complete: bool  # the file's last batch


def _truncated(data: Path, size: int, needed: int) -> RagcacheError:
    return RagcacheError(f"the index file '{data}' is truncated ({size:,} bytes, but its committed pages end at "
                         f"{needed:,}); restore it from a backup, or delete the index folder and build it again "
                         "with ragcache index")


def check(path: Path, must_exist: bool) -> bool:
    """Whether an index is at `path`; a file there, or no index where one must be, is an error."""
    if path.exists() and not path.is_dir():
        raise RagcacheError(f"index path '{path}' is a file, not a folder")
    exists = (path / "data.mdb").exists()
    if must_exist and not exists:
        raise RagcacheError(f"no index at '{path}'; build one with: ragcache index CORPUS -i {path}")
    return exists


def check_no_writer(path: Path) -> None:
    """Fail at once, naming the process, when another process is writing the index at `path`.

    Commands that will write call this before loading a model, which can take minutes; they take the
    lock itself (lock_for_writing) once the model is loaded.
    """
    if (path / "writer.lock").exists():
        _take_writer_lock(path / "writer.lock", claim=False).close()


def _take_writer_lock(path: Path, claim: bool = True):
    """The locked file, with our PID in it when we `claim` it; without, a probe that leaves the file as it was."""
    try:
        handle = open(path, "a+")
    except OSError as e:
        raise RagcacheError(f"cannot write to the index '{path.parent}': {e.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RagcacheError(f"the index '{path.parent}' is being written by process {holder}; wait for it to finish") from None
    if claim:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
    return handle
