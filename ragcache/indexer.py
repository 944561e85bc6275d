"""Corpus -> chunks -> one forward pass per chunk -> (embedding, KV) -> store.

Re-runs are incremental: a file whose bytes hash as before is skipped, a changed file is replaced
whole, a file a killed run left part-way resumes after its committed chunks, and files that vanished
from under the given roots are pruned (unless prune=False).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from . import chunking, corpus, kvremote, prompts
from . import kv as kvlib
from .errors import RagcacheError
from .index import Index
from .meta import IndexMeta
from .model import Encoded, GritModel
from .records import Chunk
from .retriever import Retriever
from .store import FilePart
from .vectors import Vectors

BATCH_CHUNKS = 64  # chunks encoded and committed together: bounds memory and what a crash loses


@dataclass
class IndexStats:
    files_indexed: int = 0
    files_unchanged: int = 0
    files_removed: int = 0
    files_skipped: int = 0
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"indexed {self.files_indexed} files ({self.chunks} chunks, {self.tokens} tokens, {rate:,.0f} tokens/s), "
                f"{self.files_unchanged} unchanged, {self.files_removed} removed, {self.files_skipped} skipped "
                f"in {self.seconds:.1f}s")


@dataclass
class _Pending:
    source: str
    file_hash: str
    chunks: list[Chunk]  # token_ids filled in by the forward pass
    passages: list[str]
    done: int = 0  # chunks a cut-short run already committed (same bytes): the run resumes after them


def run(index: Index, model: GritModel, retriever: Retriever, frame: prompts.Frame, vectors: Vectors,
        found: corpus.Discovery, roots: list[Path], meta: IndexMeta, prune: bool = True, show_progress: bool = True, batch_size: int = 8,
        warn: Callable[[str], None] = lambda m: None, max_file_mb: float = corpus.MAX_FILE_MB,
        pipelined: bool | None = None, ray_address: str | None = None, ray_workers: int | None = None) -> IndexStats:
    """Index the files found under `roots`: the retriever makes the vectors, the model the KV caches
    (each chunk's cached segment in `frame`'s layout style).

    Chunks are encoded and committed BATCH_CHUNKS at a time, across files and within one, so memory
    stays bounded whatever a file's size, and a run cut short loses at most one batch. `pipelined`
    (default: when the model runs on a GPU) packs and commits on a writer thread meanwhile.
    `ray_address` ("local", "auto" or "ray://...") chunks and encodes on a Ray cluster instead
    (distributed.py), and commits here, file by file.
    """
    pipelined = model.device.type == "cuda" if pipelined is None else pipelined
    t0 = time.perf_counter()
    store = index.store
    stats = IndexStats()
    stats.skipped += [(str(p), why) for p, why in found.skipped]
    known = store.files()

    pending: list[_Pending] = []
    remote: list = []  # distributed.FileWork: the files a Ray cluster chunks and encodes
    for path in found.files:
        source = str(path)  # the resolved real path: one file, however it was named
        held = known.get(source)
        try:
            data = corpus.read(path, max_file_mb)
            file_hash = corpus.content_hash(data)
            if held is not None and held.hash == file_hash and held.complete:
                stats.files_unchanged += 1
                continue
            docs, warnings = corpus.parse(path, data)
        except (OSError, RagcacheError) as e:
            stats.skipped.append((source, str(e.strerror if isinstance(e, OSError) else e)))
            continue
        for w in warnings:
            warn(w)
        stats.warnings += warnings
        done = len(held.chunks) if held is not None and held.hash == file_hash else 0  # resume after those
        if ray_address is not None:
            from .distributed import FileWork
            remote.append(FileWork(source, file_hash, docs, done))
            continue
        chunks, passages = chunk_file(source, docs, model.tokenizer, meta.chunk_tokens)
        if not chunks:
            _empty(index, vectors, stats, source, held is not None)
            continue
        pending.append(_Pending(source, file_hash, chunks, passages, done))

    if prune:
        real_roots = [r.resolve() for r in roots]
        seen = {str(p) for p in found.files}
        for source in known:
            if source not in seen and any(Path(source).is_relative_to(r) for r in real_roots):
                vectors.remove(store.remove_file(source))
                stats.files_removed += 1

    if ray_address is not None:
        _run_on_cluster(index, vectors, remote, meta, stats, show_progress, batch_size, ray_address, ray_workers,
                        known)
        stats.files_skipped = len(stats.skipped)
        stats.seconds = time.perf_counter() - t0
        return stats
    total = sum(len(p.chunks) - p.done for p in pending)
    codec = kvlib.CODECS.get(meta.kv_codec)  # None until the first batch's probe chooses it
    with _progress(show_progress, total) as advance, _Writer(index, vectors, stats, advance, pipelined) as writer:
        for batch in _batches(pending):
            passages = [p.passages[i] for p, start, end in batch for i in range(start, end)]
            encoded = retriever.encode(passages, kv=meta.kv_attention, frame=frame, batch_size=batch_size)
            blobs = None
            if codec is None:
                codec, blobs = _probe_codec(index, [e.kv for e in encoded])
            writer.submit(batch, encoded, codec, blobs)
    stats.files_skipped = len(stats.skipped)
    stats.seconds = time.perf_counter() - t0
    return stats


def _probe_codec(index: Index, kvs: list) -> tuple[int, list]:
    """Choose the index's KV codec once, from its first batch: zstd only if it saves a third overall.

    Returns the codec and the batch's blobs in it (those the trial already made in it are kept).
    """
    blobs = [kvlib.serialize(kv) for kv in kvs]  # the trial, on one batch only
    raw = sum(kv.numel() * kv.element_size() for kv in kvs)
    stored = sum(len(b) for b in blobs)
    name = "zstd" if raw >= kvlib.MIN_RATIO * stored else "raw"
    index.set_kv_codec(name)
    codec = kvlib.CODECS[name]
    return codec, [b if kvlib.header(b).codec == codec else kvlib.serialize(kv, codec) for b, kv in zip(blobs, kvs)]


class _Writer:
    """Packs, checks and commits each batch; with `pipelined`, on a thread while the next batch computes.

    At most QUEUE_BATCHES batches wait, so memory stays bounded. A failure in the thread (a full disk)
    is raised in the caller at its next submit or when the block ends. On the CPU the thread would
    compete with torch's own threads for the cores, so it is used where the model runs on a GPU.
    """

    QUEUE_BATCHES = 2

    def __init__(self, index: Index, vectors: Vectors, stats: IndexStats, advance, pipelined: bool):
        self.index, self.vectors, self.stats, self.advance = index, vectors, stats, advance
        self.queue: queue.Queue = queue.Queue(maxsize=self.QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ragcache-writer", daemon=True) if pipelined else None

    def __enter__(self) -> "_Writer":
        if self.thread is not None:
            self.thread.start()
        return self

    def submit(self, batch: list, encoded: list, codec: int, blobs: list | None = None) -> None:
        """Commit `batch`; `blobs`, when given, are its KV already packed (by the codec probe)."""
        if self.thread is None:
            return self._write(batch, encoded, codec, blobs)
        self._raise()
        self.queue.put((batch, encoded, codec, blobs))  # blocks while QUEUE_BATCHES wait: bounded memory

    def __exit__(self, kind, *rest) -> None:
        if self.thread is None:
            return
        if kind is not None:
            self.stop.set()  # interrupted or failed: what is committed stays, what waits is dropped
        self.queue.put(None)
        self.thread.join()
        if kind is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None and not self.stop.is_set():
                try:
                    self._write(*item)
                except BaseException as e:  # handed to the caller, which raises it
                    self.error = e

    def _write(self, batch: list, encoded: list, codec: int, blobs: list | None) -> None:
        parts, embeddings = [], []
        blobs = blobs or [None] * len(encoded)
        for p, start, end in batch:
            mine, encoded = encoded[: end - start], encoded[end - start :]
            packed, blobs = blobs[: end - start], blobs[end - start :]
            rows = []
            for chunk, enc, blob in zip(p.chunks[start:end], mine, packed):
                chunk.token_ids = enc.token_ids
                rows.append((chunk, enc.embedding, blob if blob is not None else kvlib.serialize(enc.kv, codec)))
            parts.append(FilePart(p.source, p.file_hash, rows, fresh=start == 0, complete=end == len(p.chunks)))
            embeddings.append(np.stack([e.embedding for e in mine]))
        if self.index.objects is not None:  # the objects first, verified: then the commit that references them
            parts = [_uploaded(self.index, part) for part in parts]
        for (removed, added), vecs in zip(self.index.store.put_batch(parts), embeddings):
            self.vectors.remove(removed)
            self.vectors.add(added, vecs)
        tokens = sum(len(row[0].token_ids) for part in parts for row in part.rows)
        chunks = sum(len(part.rows) for part in parts)
        self.stats.files_indexed += sum(part.complete for part in parts)
        self.stats.chunks += chunks
        self.stats.tokens += tokens
        self.advance(chunks, tokens)


def _uploaded(index: Index, part: FilePart) -> FilePart:
    """`part` with its KV blobs put in the index's object store, and references to them in their place."""
    rows, uploads = [], {}
    for chunk, emb, blob in part.rows:
        key = kvremote.referenced_key(blob)  # a Ray worker may have written the object already
        if key is None:
            key = kvremote.object_key(index.meta, chunk.token_ids)
            uploads[key] = blob
        rows.append((chunk, emb, kvremote.reference(key)))
    index.objects.put_many(uploads)
    return replace(part, rows=rows)


def chunk_file(source: str, docs: list[corpus.Document], tokenizer, chunk_tokens: int) -> tuple[list[Chunk], list[str]]:
    """A file's chunks (token ids filled in by the forward pass) and their passages as the model reads them."""
    records, passages = [], []
    for doc in docs:
        for start, end in chunking.chunk_spans(doc.text, tokenizer, chunk_tokens):
            text = doc.text[start:end]
            records.append(Chunk(doc.doc_id, doc.title, text, source, start, end, []))
            passages.append(prompts.passage(doc.title, text))
    return records, passages


def _empty(index: Index, vectors: Vectors, stats: IndexStats, source: str, held: bool) -> None:
    stats.skipped.append((source, "empty"))
    if held:  # it held text before: what was stored for it goes
        vectors.remove(index.store.remove_file(source))
        stats.files_removed += 1


def _run_on_cluster(index: Index, vectors: Vectors, works: list, meta: IndexMeta, stats: IndexStats,
                    show_progress: bool, batch_size: int, address: str, workers: int | None, known: dict) -> None:
    """Chunk and encode `works` on a Ray cluster; commit each file here as it comes back."""
    from . import distributed
    distributed.connect(address)
    if meta.kv_codec == "auto":  # no probe batch here: the workers need the codec before they start
        index.set_kv_codec("raw")
    codec = kvlib.CODECS[meta.kv_codec]
    with _progress(show_progress, None) as advance, _Writer(index, vectors, stats, advance, False) as writer:
        for fd in distributed.encode_files(works, meta, workers, batch_size):
            if not fd.chunks:
                _empty(index, vectors, stats, fd.source, fd.source in known)
                continue
            if fd.done < len(fd.chunks):
                part = _Pending(fd.source, fd.file_hash, fd.chunks, [], fd.done)
                encoded = [Encoded(c.token_ids, e, None) for c, e in zip(fd.chunks[fd.done:], fd.embeddings)]
                writer.submit([(part, fd.done, len(fd.chunks))], encoded, codec, fd.blobs)


def _batches(pending: list[_Pending]) -> Iterator[list[tuple[_Pending, int, int]]]:
    """Runs of BATCH_CHUNKS chunks, as (file, first, end) spans: small files share a batch, big ones span several."""
    batch, size = [], 0
    for p in pending:
        start = p.done
        while start < len(p.chunks):
            end = min(len(p.chunks), start + BATCH_CHUNKS - size)
            batch.append((p, start, end))
            size += end - start
            start = end
            if size == BATCH_CHUNKS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _progress:
    """A rich bar of chunks with a tokens-per-second column, or nothing."""

    def __init__(self, show: bool, total: int | None):
        self.show, self.total = show and (total is None or total > 0), total  # None: not known ahead

    def __enter__(self):
        if not self.show:
            return lambda chunks, tokens: None
        self.bar = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                            TextColumn("{task.fields[rate]} tokens/s"), TimeElapsedColumn(), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("indexing", total=self.total, rate="-")
        t0, seen = time.perf_counter(), [0]

        def advance(chunks: int, tokens: int) -> None:
            seen[0] += tokens
            rate = seen[0] / max(time.perf_counter() - t0, 1e-9)
            self.bar.update(task, advance=chunks, rate=f"{rate:,.0f}")
        return advance

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
