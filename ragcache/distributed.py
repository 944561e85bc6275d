"""Indexing fanned out over a Ray cluster: actors chunk and encode, the driver alone commits.

    driver: scan, read and hash files -> batches of files -> actors -> results -> LMDB and FAISS
    actor (one per GPU, or per CPU slot; the model loaded once): chunk -> forward pass -> blobs

The driver keeps everything that makes a run safe to kill: it decides which files changed, and it
commits each file's chunks, embeddings and KV (or, with an object store, references to the objects
an actor wrote and verified) in the transactions a local run uses, the file being the unit. A killed
driver or actor therefore resumes as a local run does, with no duplicates. A dead actor is restarted
once by Ray and its batch run again; a second failure stops the run with one line, and running the
same command again resumes it.

Ray is an optional extra (`pip install 'ragcache[ray]'`); without `--ray` nothing here is imported.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import kv as kvlib
from . import kvremote, prompts
from .corpus import Document
from .errors import RagcacheError
from .meta import IndexMeta
from .records import Chunk

FILES_PER_TASK = 8  # files an actor chunks and encodes per call: small enough to spread, large enough to batch
TEXT_PER_TASK = 1 << 20  # ...or fewer, once they hold this many characters
TASKS_PER_ACTOR = 4  # ...or fewer still, so that results stream back while the actors work on
IN_FLIGHT = 2  # calls queued per actor, so the next starts as soon as one returns


@dataclass
class FileWork:
    source: str
    file_hash: str
    docs: list[Document]
    done: int  # chunks a cut-short run already committed: encode only the rest


@dataclass
class FileDone:
    source: str
    file_hash: str
    chunks: list[Chunk]  # every chunk of the file, token_ids filled for those from `done` on
    done: int
    embeddings: np.ndarray  # (len(chunks) - done, dim)
    blobs: list[bytes]  # the KV blobs of chunks[done:], or references to objects the actor wrote


def connect(address: str) -> None:
    """Join (or start) the cluster: "local" starts one on this machine; "auto" or "ray://..." joins one."""
    try:
        import ray
    except ImportError:
        raise RagcacheError("indexing on a Ray cluster needs Ray: pip install 'ragcache[ray]'", param="ray") from None
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise RagcacheError(f"cannot join the Ray cluster at '{address}': {str(e).splitlines()[0]}", param="ray") from None


def worker_slots(workers: int | None) -> tuple[int, float, int]:
    """(actors, GPUs each, CPUs each): one actor per GPU in the cluster, else `workers` (default 1)
    sharing the CPUs, each running torch on its share of them."""
    import ray
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (workers or gpus), 1.0, 1
    actors = workers or 1
    return actors, 0.0, max(1, int(resources.get("CPU", 1)) // actors)


def encode_files(works: list[FileWork], meta: IndexMeta, workers: int | None, batch_size: int) -> Iterator[FileDone]:
    """Each file's chunks encoded on the cluster, yielded as files finish (in no fixed order)."""
    import ray
    from ray.exceptions import RayError
    if not works:  # nothing changed: no worker need load the model
        return
    actors_n, gpus, cpus = worker_slots(workers)
    actor_cls = ray.remote(num_gpus=gpus, num_cpus=cpus, max_restarts=1, max_task_retries=1)(_Encoder)
    meta_json = meta.to_json()
    run = uuid.uuid4().hex[:8]  # named, so that an operator (or a test) can find and stop one
    device = "cuda" if gpus else "cpu"  # each worker's own GPU, whatever the driver runs on
    actors = [actor_cls.options(name=f"ragcache-encoder-{run}-{i}").remote(meta_json, device, batch_size, cpus)
              for i in range(max(1, min(actors_n, len(works))))]
    tasks = _tasks(works, len(actors))
    running: dict = {}  # object ref -> actor
    try:
        while tasks or running:
            for actor in actors:
                while tasks and sum(a is actor for a in running.values()) < IN_FLIGHT:
                    running[actor.encode.remote(tasks.pop(0))] = actor
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                running.pop(ref)
                yield from ray.get(ref)
    except RayError as e:
        raise RagcacheError(f"a Ray worker failed ({str(e).splitlines()[0][:200]}); what was committed is kept: "
                            "run the same command again to resume") from None
    finally:
        for actor in actors:
            ray.kill(actor)


def _tasks(works: list[FileWork], actors: int) -> list[list[FileWork]]:
    """Files grouped by count and size, the largest first so that no actor is left with one at the end.

    A task holds at most FILES_PER_TASK files and TEXT_PER_TASK characters, and a small corpus is still
    cut into about TASKS_PER_ACTOR tasks an actor: the driver commits (and the progress bar moves) as
    each returns, while the actors compute the next, instead of everything waiting for one last result.
    """
    sizes = {id(w): sum(len(d.text) for d in w.docs) for w in works}
    limit = min(TEXT_PER_TASK, max(1, sum(sizes.values()) // (actors * TASKS_PER_ACTOR)))
    tasks, task, size = [], [], 0
    for work in sorted(works, key=lambda w: -sizes[id(w)]):
        task.append(work)
        size += sizes[id(work)]
        if len(task) == FILES_PER_TASK or size >= limit:
            tasks.append(task)
            task, size = [], 0
    return tasks + ([task] if task else [])


class _Encoder:
    """A Ray actor: the index's model (and embedder) loaded once, chunking and encoding batches of files."""

    def __init__(self, meta_json: dict, device: str, batch_size: int, threads: int):
        import torch

        from .embedder import Embedder
        from .model import GritModel
        from .objstore import ObjectStore
        from .retriever import EmbedderRetriever, GritRetriever
        torch.set_num_threads(threads)  # Ray sets one thread per actor; a CPU actor owns its share of the cores
        self.meta = IndexMeta.from_json(meta_json, "the index")
        self.model = GritModel.load(self.meta.model.name, device=device, dtype=self.meta.model.dtype)
        self.meta.check_model(self.model.identity(), "the index")  # a worker with other weights must not write
        embedder = Embedder.load(self.meta.embedder.name, device=str(self.model.device)) if self.meta.embedder else None
        self.retriever = EmbedderRetriever(embedder, self.model) if embedder else GritRetriever(self.model)
        self.frame = prompts.chat_frame(self.model.tokenizer, self.meta.preamble) if self.meta.layout == "chat" \
            else prompts.GRIT
        self.objects = ObjectStore.open(self.meta.kv_store) if self.meta.kv_store else None
        self.codec = kvlib.CODECS[self.meta.kv_codec]
        self.batch_size = batch_size

    def encode(self, works: list[FileWork]) -> list[FileDone]:
        from .indexer import chunk_file
        out = []
        for work in works:
            chunks, passages = chunk_file(work.source, work.docs, self.model.tokenizer, self.meta.chunk_tokens)
            todo = passages[work.done:]
            encoded = self.retriever.encode(todo, kv=self.meta.kv_attention, frame=self.frame,
                                            batch_size=self.batch_size) if todo else []
            for chunk, enc in zip(chunks[work.done:], encoded):
                chunk.token_ids = enc.token_ids
            blobs = [bytes(kvlib.serialize(enc.kv, self.codec)) for enc in encoded]
            if self.objects is not None:  # written and verified here; the driver commits the references
                keys = [kvremote.object_key(self.meta, c.token_ids) for c in chunks[work.done:]]
                self.objects.put_many(dict(zip(keys, blobs)))
                blobs = [kvremote.reference(k) for k in keys]
            vectors = np.stack([e.embedding for e in encoded]) if encoded else np.zeros((0, self.meta.dim), np.float32)
            out.append(FileDone(work.source, work.file_hash, chunks, work.done, vectors, blobs))
        return out

