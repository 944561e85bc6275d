"""A local-disk LRU of blobs keyed by string, bounded in bytes and kept across restarts.

It sits between the memory tiers and a remote object store: a chunk's cache fetched over the network
once is read from local disk from then on, also after the process restarts.

FOLDER/<blake2b of the key, 32 hex>.blob    one blob per file, its bytes exactly as given
FOLDER/.<name>.<random>.tmp                 a write in progress (or one a crash cut short)

A blob is written to a temp file and renamed over its name (os.replace), so no reader ever sees half
a blob under a real name after a process crash. Nothing is fsynced: after a power loss a file may be
short or empty, and the blob's own checksum (kv.deserialize raises CorruptKV) catches that; the
caller then calls discard(). A file's mtime is its last use: set on write and on every hit, read back
at open, so the LRU order survives a restart. Stamps are set explicitly, each later than the last,
because the times the kernel sets may tick in milliseconds (its coarse clock) or seconds (some
filesystems), and writes a microsecond apart would tie.

Two processes may share a folder, best effort: writes are atomic, a file another process evicted is
a miss, and each process evicts by its own count of the bytes, which misses the other's new files
until it reopens (so the folder can briefly exceed the capacity).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .errors import RagcacheError

SUFFIX = ".blob"
STALE_TMP_S = 3600  # a temp file this old belongs to a writer that died: a live write takes milliseconds


@dataclass
class DiskCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class DiskCache:
    """Blobs in `folder`, at most `capacity_bytes` in all; the least recently used go first."""

    def __init__(self, folder: Path, capacity_bytes: int):
        if capacity_bytes < 0:
            raise RagcacheError(f"a disk cache's capacity is a number of bytes, not {capacity_bytes}")
        self.folder, self.capacity = Path(folder), capacity_bytes
        self.entries: OrderedDict[str, int] = OrderedDict()  # file name -> size, least recent first
        self.bytes = 0
        self.stats = DiskCacheStats()
        self._stamp = 0  # the last mtime set, in ns
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            found = []
            for entry in os.scandir(self.folder):
                try:
                    st = entry.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                if entry.name.endswith(SUFFIX):
                    found.append((st.st_mtime_ns, entry.name, st.st_size))
                elif entry.name.endswith(".tmp") and time.time() - st.st_mtime > STALE_TMP_S:
                    _unlink(Path(entry.path))
        except OSError as e:
            raise RagcacheError(f"cannot use '{self.folder}' as a disk cache: {e}") from None
        for mtime, name, size in sorted(found):
            self.entries[name] = size
            self.bytes += size
            self._stamp = max(self._stamp, mtime)
        self._evict()  # the capacity may have been lowered since the last run

    def __contains__(self, key: str) -> bool:
        return (self.folder / _name(key)).exists()  # the folder, not this process's list: it may be shared

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> bytes | None:
        name = _name(key)
        path = self.folder / name
        try:
            blob = path.read_bytes()
        except FileNotFoundError:  # never written, or evicted (perhaps by another process)
            self._forget(name)
            self.stats.misses += 1
            return None
        except OSError as e:
            raise RagcacheError(f"cannot read the disk cache file '{path}': {e}") from None
        try:
            self._touch(path)
        except FileNotFoundError:  # evicted since the read: the bytes in hand are still whole
            pass
        if name not in self.entries:  # written by another process
            self.bytes += len(blob)
        self.entries[name] = len(blob)
        self.entries.move_to_end(name)
        self.stats.hits += 1
        self._evict()
        return blob

    def put(self, key: str, blob: bytes) -> None:
        """Keep `blob` under `key`; a blob larger than the whole capacity is not kept."""
        if len(blob) > self.capacity:
            return
        name = _name(key)
        path, tmp = self.folder / name, None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            self._touch(Path(tmp))  # stamped before the rename: the file appears with its place in the LRU
            os.replace(tmp, path)
        except OSError as e:  # a full disk, a folder removed under us
            if tmp is not None:
                _unlink(Path(tmp))
            raise RagcacheError(f"cannot write the disk cache file '{path}': {e}") from None
        self.bytes += len(blob) - self.entries.pop(name, 0)
        self.entries[name] = len(blob)  # the most recent: the blob fits the capacity, so it stays
        self._evict()

    def discard(self, key: str) -> None:
        """Drop `key`'s blob, as when it failed its checksum."""
        name = _name(key)
        _unlink(self.folder / name)
        self._forget(name)

    def describe(self) -> dict:
        return {"capacity_bytes": self.capacity, "bytes": self.bytes, "entries": len(self.entries),
                "hits": self.stats.hits, "misses": self.stats.misses, "evictions": self.stats.evictions}

    def _evict(self) -> None:
        while self.bytes > self.capacity:
            name = next(iter(self.entries))
            _unlink(self.folder / name)
            self._forget(name)
            self.stats.evictions += 1

    def _forget(self, name: str) -> None:
        self.bytes -= self.entries.pop(name, 0)

    def _touch(self, path: Path) -> None:
        self._stamp = max(time.time_ns(), self._stamp + 1)
        os.utime(path, ns=(self._stamp, self._stamp))


def _name(key: str) -> str:
    """A fixed-length file name for any key: no separators, no case or length limits to meet."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest() + SUFFIX


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:  # gone already: another process evicted or discarded it
        pass
    except OSError as e:
        raise RagcacheError(f"cannot remove the disk cache file '{path}': {e}") from None
