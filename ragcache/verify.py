"""`ragcache verify`: check every stored chunk against the on-disk format, and mend what is damaged.

Per chunk: its record parses; its embedding is present, of the index's dimension, finite and of unit
length; its KV blob has our header, decompresses, matches its xxh3 checksum and holds exactly the
chunk's tokens for the index's model and dtype; exactly one file record owns it, and every chunk a
file record lists exists. Each file is recorded once, by its resolved real path (an index written
before ragcache resolved paths may hold a file twice). Then the saved FAISS view must be of the index's
kind and hold the same ids and vectors as LMDB (an IVF-PQ view, which keeps codes: the same ids). The
model's fingerprint is checked when the index is opened (RagCache.open refuses any other model).

All checks read one LMDB snapshot, so a concurrent `index` cannot make them disagree with each other.

repair=True, under the writer lock: a damaged or missing KV blob or embedding is recomputed from the
chunk's text with the index's model and KV attention. A chunk whose text is lost cannot be, so the
record of the file it came from is dropped and `ragcache index` reads that file again. Parts that no
file owns are deleted. A file recorded twice keeps one record (the real path's); one recorded by
another path is recorded by its real one. Last, FAISS is rebuilt from LMDB and saved.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from . import kv as kvlib
from . import kvremote, prompts
from .engine import RagCache
from .errors import RagcacheError
from .model import dtype_name
from .records import Chunk, FileRecord
from .store import unkey
from .vectors import Vectors

ENCODE_BATCH = 32  # chunks recomputed per call to the model


@dataclass
class Problem:
    chunk_id: int | None  # None: the index as a whole
    part: str  # record, embedding, kv, file or faiss
    what: str
    fix: str = ""  # what repair did, or what is left to do
    repaired: bool = False

    def line(self) -> str:
        where = f"chunk {self.chunk_id}" if self.chunk_id is not None else "index"
        return f"{where}: {self.part}: {self.what}" + (f" -> {self.fix}" if self.fix else "")


@dataclass
class Report:
    chunks: int = 0
    files: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing is wrong, or everything wrong was repaired."""
        return all(p.repaired for p in self.problems)

    def summary(self) -> str:
        repaired = sum(p.repaired for p in self.problems)
        found = f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}" if self.problems else "no problems"
        return (f"checked {self.chunks} chunks from {self.files} files: {found}"
                + (f", {repaired} repaired" if repaired else ""))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "chunks": self.chunks, "files": self.files,
                "problems": [asdict(p) for p in self.problems]}


def verify(rc: RagCache, repair: bool = False) -> Report:
    """Check the index behind `rc`; with `repair`, mend what can be mended (see the module docstring)."""
    if not repair:
        return _check(rc)[0]
    with rc.stored.writing():  # fails at once, naming the process, while an `index` runs
        report, found = _check(rc)
        _repair(rc, found)
    return report


@dataclass
class _Found:
    """What the check found, by the repair each needs."""
    problems: dict[int, list[Problem]] = field(default_factory=dict)  # chunk id -> its problems
    recompute: dict[int, tuple[set[str], str]] = field(default_factory=dict)  # id -> ({"kv", "embedding"}, file)
    drop_files: dict[str, set[int]] = field(default_factory=dict)  # file -> its chunks that cannot be mended
    orphans: set[int] = field(default_factory=set)  # chunks no file owns
    faiss: Problem | None = None
    renames: list[tuple[str, str, Problem]] = field(default_factory=list)  # (recorded path, real path, problem)
    path_twins: list[tuple[str, Problem]] = field(default_factory=list)  # another record of a file recorded already


def _check(rc: RagCache) -> tuple[Report, _Found]:
    store, meta = rc.store, rc.meta
    if meta is None:
        raise RagcacheError(f"index '{store.path}' is empty: there is nothing to verify")
    report, found = Report(), _Found()
    dim, built = meta.dim, meta.model

    def problem(cid: int | None, part: str, what: str) -> Problem:
        p = Problem(cid, part, what)
        report.problems.append(p)
        found.problems.setdefault(cid, []).append(p)
        return p

    with store.snapshot() as txn:
        tokens: dict[int, int] = {}  # chunk id -> token count, for sound records
        records = set()
        for k, v in txn.cursor(db=store.db["chunks"]):
            cid = unkey(k)
            records.add(cid)
            try:
                tokens[cid] = len(Chunk.from_json(json.loads(bytes(v))).token_ids)
            except (ValueError, TypeError, KeyError):
                problem(cid, "record", "does not parse: the chunk's text is lost")
        vectors: dict[int, np.ndarray] = {}
        for k, v in txn.cursor(db=store.db["emb"]):
            cid = unkey(k)
            if len(v) != 4 * dim:
                problem(cid, "embedding", f"holds {len(v)} bytes, not {4 * dim}")
                continue
            vectors[cid] = np.frombuffer(v, dtype=np.float32).copy()
            if not np.isfinite(vectors[cid]).all() or abs(float(np.linalg.norm(vectors[cid])) - 1) > 1e-3:
                problem(cid, "embedding", "is not a finite unit vector")
        blobs, refs = set(), {}

        def check_blob(cid: int, blob) -> None:
            try:
                kv = kvlib.deserialize(blob)  # header, decompression, checksum
                expected = (built.layers, 2, built.kv_heads, tokens.get(cid, kv.shape[3]))
                if tuple(kv.shape[:4]) != expected or dtype_name(kv.dtype) != built.dtype:
                    raise kvlib.CorruptKV(f"KV blob holds {dtype_name(kv.dtype)} {tuple(kv.shape)}, not "
                                          f"{built.dtype} {expected + (kv.shape[4],)}")
            except RagcacheError as e:
                problem(cid, "kv", str(e))

        for k, v in txn.cursor(db=store.db["kv"]):
            cid = unkey(k)
            blobs.add(cid)
            key = kvremote.referenced_key(v)
            if key is not None and rc.stored.objects is not None:
                refs[cid] = key  # read from the object store below, in parallel batches
            else:
                check_blob(cid, v)
        ids = sorted(refs)
        for b in range(0, len(ids), ENCODE_BATCH):  # an unreachable store fails the whole check, in one line
            got = rc.stored.objects.get_many([refs[cid] for cid in ids[b : b + ENCODE_BATCH]])
            for cid in ids[b : b + ENCODE_BATCH]:
                if got[refs[cid]] is None:
                    problem(cid, "kv", f"object '{refs[cid]}' is missing from {meta.kv_store}")
                else:
                    check_blob(cid, got[refs[cid]])
        for cid in sorted(records - vectors.keys()):
            if not any(p.part == "embedding" for p in found.problems.get(cid, [])):  # not there at all
                problem(cid, "embedding", "is missing")
        for cid in sorted(records - blobs):
            problem(cid, "kv", "is missing")
        for cid in sorted((vectors.keys() | blobs) - records):
            problem(cid, "record", "is missing: the chunk's text is lost")

        owners: dict[int, list[str]] = {}
        sources: list[str] = []
        for k, v in txn.cursor(db=store.db["files"]):
            source = bytes(k).decode()
            sources.append(source)
            report.files += 1
            for cid in FileRecord(**json.loads(bytes(v))).chunks:
                owners.setdefault(cid, []).append(source)
                if cid not in records and cid not in found.problems:  # else its record's problem says it
                    problem(cid, "file", f"'{source}' lists it, but it is not stored")
        for cid in sorted(records):
            if len(owners.get(cid, [])) > 1:
                problem(cid, "file", f"is listed by {len(owners[cid])} files")
        stamp = txn.id()

    report.chunks = len(records)
    for cid, ps in found.problems.items():
        mine = owners.get(cid, [])
        if cid in tokens and len(mine) == 1:  # its text is there
            found.recompute[cid] = ({p.part for p in ps}, mine[0])
        elif mine:  # its text is lost, or two files claim it: read those files again
            for source in mine:
                found.drop_files.setdefault(source, set()).add(cid)
        else:
            found.orphans.add(cid)
    for cid in sorted(records - owners.keys()):
        problem(cid, "file", "no file owns it")
        found.orphans.add(cid)
    _check_paths(sources, found, problem)

    report.problems.sort(key=lambda p: (p.chunk_id is None, p.chunk_id or 0))  # stable: by chunk, then part
    saved = Vectors.load(store.path / "vectors.faiss", stamp)
    if saved is None and vectors:  # with no embeddings, there is nothing for a view to disagree with
        found.faiss = problem(None, "faiss", "missing or older than LMDB (it is rebuilt when the index is opened)")
    elif saved is not None:
        ids, vecs = saved.contents()  # an IVF-PQ view holds codes, not vectors: its ids are compared
        same = saved.kind == meta.vector_index and sorted(ids.tolist()) == sorted(vectors) and (vecs is None or all(
            np.array_equal(v, vectors[int(i)]) for i, v in zip(ids, vecs)))
        if not same:
            found.faiss = problem(None, "faiss", "does not hold the same vectors as LMDB")
    return report, found


def _check_paths(sources: list[str], found: _Found, problem) -> None:
    """A file is recorded once, by its resolved real path: spelt otherwise, or twice, it is mended."""
    by_real: dict[str, list[str]] = {}
    for source in sources:
        by_real.setdefault(os.path.realpath(source), []).append(source)
    for real, names in sorted(by_real.items()):
        if names == [real]:
            continue
        keep = real if real in names else names[0]
        for name in names:
            if name == keep and keep != real:
                found.renames.append((name, real, problem(None, "file", f"'{name}' is recorded by a path that is "
                                                                        f"not its real one, '{real}'")))
            elif name != keep:
                found.path_twins.append((name, problem(None, "file", f"'{name}' is the same file as '{keep}', "
                                                                      "recorded twice: its chunks are duplicates")))


def _repair(rc: RagCache, found: _Found) -> None:
    store, meta = rc.store, rc.meta

    def mark(cid: int, fix: str, repaired: bool) -> None:
        for p in found.problems[cid]:
            p.fix, p.repaired = fix, repaired

    todo = list(found.recompute.items())
    for b in range(0, len(todo), ENCODE_BATCH):
        batch = todo[b : b + ENCODE_BATCH]
        chunks = [store.chunk(cid) for cid, _ in batch]
        encoded = rc.retriever.encode([prompts.passage(c.title, c.text) for c in chunks], kv=meta.kv_attention,
                                      frame=rc.frame)
        for (cid, (parts, source)), chunk, enc in zip(batch, chunks, encoded):
            if enc.token_ids != chunk.token_ids:  # the text no longer yields its cache: read the file anew
                found.drop_files.setdefault(source, set()).add(cid)
                continue
            blob = kvlib.serialize(enc.kv, kvlib.CODECS.get(meta.kv_codec)) if "kv" in parts else None
            if blob is not None and rc.stored.objects is not None:  # the object first, then the reference to it
                key = kvremote.object_key(meta, chunk.token_ids)
                rc.stored.objects.put_many({key: blob})
                blob = kvremote.reference(key)
            store.put_parts(cid, enc.embedding if "embedding" in parts else None, blob)
            mark(cid, "recomputed from the chunk's text", True)
    for source, cids in sorted(found.drop_files.items()):
        store.remove_file(source)
        for cid in cids:
            mark(cid, f"dropped the record of '{source}': run ragcache index on it to read it again", False)
    if found.orphans:
        store.remove_chunks(sorted(found.orphans))
    for cid in found.orphans:
        mark(cid, "deleted: no file owns it", True)
    for source, p in found.path_twins:
        store.remove_file(source)
        p.fix, p.repaired = "dropped that record and its duplicate chunks", True
    for source, real, p in found.renames:
        if store.file(source) is not None:
            store.rename_file(source, real)
        p.fix, p.repaired = f"recorded it as '{real}'", True
    rc.stored.rebuild_vectors()
    if found.faiss is not None:
        found.faiss.fix, found.faiss.repaired = "rebuilt from LMDB", True
