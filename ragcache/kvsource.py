"""The one way the engine obtains a chunk's KV: a source that is given chunk ids and a device.

A source answers a batch at once, and tells apart what it does not hold (`missing`: ask the next
tier, or recompute) from what it holds but failed its checks (`damaged`: recompute, never use). The
tensors it hands out are valid inside the `fetch` block only: the LMDB store's are views of its
memory map, read in place, so loading copies each byte once, into the model's cache.

StoreKV, over the index's LMDB store, is the first source; memory tiers and remote stores go behind
the same interface.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch

from . import kv as kvlib
from .store import Store


@dataclass
class KVBatch:
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> (layers, 2, kv_heads, tokens, head_dim)
    missing: list[int] = field(default_factory=list)  # not held here
    damaged: dict[int, str] = field(default_factory=dict)  # held, but failed its header or checksum: why
    served_by: dict[int, str] = field(default_factory=dict)  # id -> the name of the source that served it
    unavailable: str = ""  # why the source could not be asked at all (an unreachable store): said once for all


class KVSource(Protocol):
    name: str
    levels: list[str]  # the names it serves under (KVBatch.served_by), in the order it asks them

    def fetch(self, ids: list[int], device: torch.device) -> contextlib.AbstractContextManager[KVBatch]:
        """The KV of `ids` on `device` (or readable from there), valid until the block ends."""
        ...

    def resident(self, ids: list[int]) -> set[int]:
        """Those of `ids` held in memory now: the rest would be read from storage."""
        ...


class StoreKV:
    """The index's LMDB store: blobs checked and read in place from the memory map.

    Each read is timed, so `on_read(bytes, seconds)` learns the storage's bandwidth: the KV bytes it
    delivers per second, checksum and any decompression included.
    """

    name = "store"
    levels = ["store"]

    def __init__(self, store: Store, on_read: Callable[[int, float], None] | None = None):
        self.store, self.on_read = store, on_read

    def resident(self, ids: list[int]) -> set[int]:
        return set()

    @contextlib.contextmanager
    def fetch(self, ids: list[int], device: torch.device) -> Iterator[KVBatch]:
        batch = KVBatch()
        with self.store.kv_views(ids) as views:
            for cid, view in zip(ids, views):
                if view is None:
                    batch.missing.append(cid)
                    continue
                t0 = time.perf_counter()
                try:
                    # header, checksum, decompression or dequantisation (on `device`): every byte is read
                    tensor = kvlib.deserialize(view, device)
                except kvlib.CorruptKV as e:
                    batch.damaged[cid] = str(e)
                    continue
                if self.on_read is not None:  # in the KV's own bytes, as the cost model counts them
                    self.on_read(tensor.numel() * tensor.element_size(), time.perf_counter() - t0)
                batch.tensors[cid] = tensor  # a raw blob on the CPU: the view itself, copied once, into the cache
                batch.served_by[cid] = self.name
            yield batch
