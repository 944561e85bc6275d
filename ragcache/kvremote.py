"""Chunk caches in an S3-compatible object store: how they are named, referenced and read.

An index built with `--kv-store s3://bucket/prefix` keeps its text, embeddings, vectors, file
records and description in its own folder, and each chunk's KV blob in the store. Its LMDB `kv`
record is then a reference, `REF + object key`, committed only after the object was written and
verified (the writer uploads, then commits), so a crash at any point leaves no reference to a
missing object: at worst an object that nothing references, which `ragcache gc` lists and removes.

Objects are content-addressed: the key holds the model's fingerprint, the codec and a hash of
everything the cache was computed from (prompt format, layout style and preamble, KV attention,
dtype, the chunk's tokens). Identical chunks in two indexes, or in two replicas of one, are one object.

ObjectKV is the KV source over such an index: a local disk cache (diskcache.py, an LRU kept across
restarts) first, then parallel GETs for the rest, each blob checked by its checksum before use. An
unreachable store at question time makes every chunk it would have served `missing`, so kvload
recomputes them from their text; a deleted object is missing too, and verify reports it.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Callable, Iterator

import torch
import xxhash

from . import kv as kvlib
from .diskcache import DiskCache
from .kvsource import KVBatch
from .meta import IndexMeta
from .objstore import ObjectStore, StoreUnavailable
from .store import Store

REF = b"RCOBJ:"  # an LMDB kv record holding this prefix names an object instead of holding the blob


def object_key(meta: IndexMeta, token_ids: list[int]) -> str:
    """The content address of a chunk's cache: {model fingerprint}/{codec}/{hash of what made it}."""
    made_of = json.dumps([meta.prompt_format, meta.layout, meta.preamble, meta.kv_attention, meta.model.dtype,
                          token_ids])
    return f"{meta.model.fingerprint}/{meta.kv_codec}/{xxhash.xxh3_128_hexdigest(made_of.encode())}"


def reference(key: str) -> bytes:
    return REF + key.encode()


def referenced_key(record: bytes | memoryview) -> str | None:
    """The object key a kv record names, or None when the record is a blob (or no reference at all)."""
    if bytes(record[: len(REF)]) != REF:
        return None
    return bytes(record[len(REF):]).decode(errors="replace")


class ObjectKV:
    """The KV source of an index whose blobs live in an object store, with a local disk cache in front."""

    name = "object-store"

    def __init__(self, store: Store, objects: ObjectStore, disk: DiskCache | None = None,
                 on_read: Callable[[int, float], None] | None = None):
        self.store, self.objects, self.disk, self.on_read = store, objects, disk, on_read
        self.levels = (["disk"] if disk is not None else []) + [self.name]

    def resident(self, ids: list[int]) -> set[int]:
        """Those in the local disk cache: read at local-disk speed, not over the network."""
        if self.disk is None:
            return set()
        keys = self._keys(ids, KVBatch())
        return {cid for cid, key in keys.items() if key in self.disk}

    @contextlib.contextmanager
    def fetch(self, ids: list[int], device: torch.device) -> Iterator[KVBatch]:
        batch = KVBatch()
        keys = self._keys(ids, batch)
        rest = []
        for cid, key in keys.items():
            blob = self.disk.get(key) if self.disk is not None else None
            if blob is not None and self._use(batch, cid, blob, "disk", device):
                continue
            if blob is not None:
                self.disk.discard(key)  # damaged on the local disk: fetched again from the store
            rest.append(cid)
        if rest:
            t0 = time.perf_counter()
            try:
                got = self.objects.get_many([keys[cid] for cid in rest])
            except StoreUnavailable as e:  # the answer is computed from text instead; kvload says so once
                batch.missing += rest
                batch.unavailable = str(e)
                got = {}
            kv_bytes = 0
            for cid in (cid for cid in rest if keys[cid] in got):
                blob = got[keys[cid]]
                if blob is None:
                    batch.missing.append(cid)  # deleted behind the index's back
                elif self._use(batch, cid, blob, self.name, device):
                    kv_bytes += batch.tensors[cid].numel() * batch.tensors[cid].element_size()
                    if self.disk is not None:
                        self.disk.put(keys[cid], blob)
            if self.on_read is not None and kv_bytes:  # the KV's own bytes per second, as the cost model counts
                self.on_read(kv_bytes, time.perf_counter() - t0)
        yield batch

    def _keys(self, ids: list[int], batch: KVBatch) -> dict[int, str]:
        keys = {}
        with self.store.kv_views(ids) as records:
            for cid, record in zip(ids, records):
                key = referenced_key(record) if record is not None else None
                if record is None:
                    batch.missing.append(cid)
                elif key is None:
                    batch.damaged[cid] = "its KV record names no object"
                else:
                    keys[cid] = key
        return keys

    def _use(self, batch: KVBatch, cid: int, blob: bytes, where: str, device: torch.device) -> bool:
        try:
            # header and checksum first: a damaged blob is never used; dequantised on the device that uses it
            tensor = kvlib.deserialize(blob, device)
        except kvlib.CorruptKV as e:
            if where != "disk":
                batch.damaged[cid] = str(e)
            return False
        batch.tensors[cid] = tensor
        batch.served_by[cid] = where
        return True
