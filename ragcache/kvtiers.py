"""KV tiers: chunk caches kept warm in memory in front of the store, and the load-or-recompute rule.

    fetch(ids) -> GPU tier (device memory) -> host tier (pinned when a GPU is used) -> the store

Each tier is an LRU bounded in bytes. A chunk read from the store is promoted into every tier, so
the next question that retrieves it skips the disk (and, with a GPU tier, the PCIe copy). On the
CPU the host tier saves the page-cache read: the memory map's pages can be evicted, the tier's
copy stays until the LRU drops it.

A chunk that no warm tier holds is read from the store only when that is faster than recomputing it
with the embedding pass indexing ran: the bytes to read at the measured read bandwidth, against its
tokens at the measured prefill throughput (CostModel). Either way the answer is the same.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch

from . import accel
from .kvsource import KVBatch, KVSource

GiB = 1 << 30


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class MemoryTier:
    """An LRU of chunk caches in one memory (a device, or host memory), bounded by `capacity` bytes."""

    def __init__(self, name: str, capacity: int, device: torch.device, pin: bool = False):
        self.name, self.capacity, self.device, self.pin = name, capacity, torch.device(device), pin
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.stats = TierStats()

    def get(self, cid: int) -> torch.Tensor | None:
        tensor = self.entries.get(cid)
        if tensor is None:
            self.stats.misses += 1
            return None
        self.entries.move_to_end(cid)
        self.stats.hits += 1
        return tensor

    def __contains__(self, cid: int) -> bool:
        return cid in self.entries

    def put(self, cid: int, tensor: torch.Tensor) -> None:
        """Keep a copy of `tensor` (read-only views of a memory map must not outlive their block)."""
        size = tensor.numel() * tensor.element_size()
        if size > self.capacity or cid in self.entries:
            return
        while self.bytes + size > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.stats.evictions += 1
        self.entries[cid] = accel.copy_to(tensor, self.device, pin=self.pin)
        self.bytes += size

    def describe(self) -> dict:
        return {"capacity_bytes": self.capacity, "bytes": self.bytes, "entries": len(self.entries),
                "hits": self.stats.hits, "misses": self.stats.misses, "evictions": self.stats.evictions}


class TieredKV:
    """Memory tiers in front of a backing source (the store), behind the one KV-source interface."""

    name = "tiers"

    def __init__(self, tiers: list[MemoryTier], backing: KVSource):
        self.tiers, self.backing = [t for t in tiers if t.capacity > 0], backing
        self.levels = [t.name for t in self.tiers] + backing.levels

    def resident(self, ids: list[int]) -> set[int]:
        return {cid for cid in ids if any(cid in tier for tier in self.tiers)}

    @contextlib.contextmanager
    def fetch(self, ids: list[int], device: torch.device) -> Iterator[KVBatch]:
        batch, rest = KVBatch(), []
        for cid in ids:
            for tier in self.tiers:
                tensor = tier.get(cid)
                if tensor is not None:
                    batch.tensors[cid] = tensor  # assembly copies it to the model's device, once
                    batch.served_by[cid] = tier.name
                    break
            else:
                rest.append(cid)
        with self.backing.fetch(rest, device) as got:
            for cid, tensor in got.tensors.items():
                for tier in self.tiers:
                    tier.put(cid, tensor)
            batch.tensors |= got.tensors
            batch.served_by |= got.served_by
            batch.missing, batch.damaged = got.missing, got.damaged
            yield batch

    def describe(self) -> dict:
        return {tier.name: tier.describe() for tier in self.tiers}


@dataclass
class CostModel:
    """Read or recompute, from throughputs measured as the process runs (bytes/s and tokens/s).

    Until both are measured, chunks are read: that is what indexing stored them for.
    """

    read_bytes_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    smoothing: float = 0.3  # weight of the newest measurement

    def measured_read(self, nbytes: int, seconds: float) -> None:
        if nbytes and seconds > 0:
            self.read_bytes_per_s = self._blend(self.read_bytes_per_s, nbytes / seconds)

    def measured_prefill(self, tokens: int, seconds: float) -> None:
        if tokens and seconds > 0:
            self.prefill_tokens_per_s = self._blend(self.prefill_tokens_per_s, tokens / seconds)

    def recompute_is_faster(self, nbytes: int, tokens: int) -> bool:
        if not self.read_bytes_per_s or not self.prefill_tokens_per_s:
            return False
        return tokens / self.prefill_tokens_per_s < nbytes / self.read_bytes_per_s

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new


def default_sizes(device: torch.device, long_lived: bool, kv_bytes_per_token: int,
                  max_context: int) -> tuple[float, float]:
    """(GPU tier GiB, host tier GiB) when the user names none.

    A one-shot `ask` gains nothing from warm tiers, so it keeps none. A long-lived process keeps a
    host tier of an eighth of the machine's memory (at most 16 GiB) and, on a GPU, a device tier of
    half of what is free (the weights are loaded by then) once the longest answer's cache is set aside.
    """
    if not long_lived:
        return 0.0, 0.0
    host = min(16.0, accel.host_memory_bytes() / 8 / GiB)
    if torch.device(device).type != "cuda":
        return 0.0, host
    free = accel.free_device_bytes(device) - 2 * kv_bytes_per_token * max_context
    return max(0.0, free / 2 / GiB), host


def build(store_source: KVSource, device: torch.device, gpu_gb: float, host_gb: float) -> KVSource:
    """The KV source for a process: the store alone, or memory tiers in front of it."""
    if gpu_gb <= 0 and host_gb <= 0:
        return store_source
    tiers = []
    if gpu_gb > 0 and torch.device(device).type == "cuda":
        tiers.append(MemoryTier("gpu", int(gpu_gb * GiB), device))
    if host_gb > 0:
        tiers.append(MemoryTier("host", int(host_gb * GiB), torch.device("cpu"), pin=accel.can_pin()))
    return TieredKV(tiers, store_source)
