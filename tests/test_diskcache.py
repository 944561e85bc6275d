"""The local-disk LRU: bounded in bytes, its order kept across a reopen, never half a blob under a name."""

import os
import time

import pytest

from ragcache import diskcache
from ragcache.diskcache import DiskCache
from ragcache.errors import RagcacheError


def blobs(cache: DiskCache) -> list:
    return sorted(p.name for p in cache.folder.iterdir() if p.name.endswith(diskcache.SUFFIX))


def test_an_lru_bounded_in_bytes(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=300)
    for key in ("a", "b", "c"):
        cache.put(key, key.encode() * 100)
    assert cache.get("a") == b"a" * 100  # a is now the most recent: b goes first
    cache.put("d", b"d" * 100)
    assert "b" not in cache and all(k in cache for k in "acd") and cache.bytes == 300
    assert cache.get("b") is None and cache.stats.evictions == 1 and cache.stats.misses == 1
    cache.put("e", b"e" * 150)  # two must go for this one: c, then a
    assert "c" not in cache and "a" not in cache and cache.bytes == 250 and len(blobs(cache)) == 2
    cache.put("huge", b"h" * 301)  # larger than the whole cache: not kept, nothing evicted for it
    assert "huge" not in cache and cache.bytes == 250
    assert cache.describe() == {"capacity_bytes": 300, "bytes": 250, "entries": 2, "hits": 1, "misses": 1,
                                "evictions": 3}


def test_rewriting_a_key_replaces_its_bytes(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=1000)
    cache.put("k", b"old" * 10)
    cache.put("k", b"new")
    assert cache.get("k") == b"new" and cache.bytes == 3 and len(cache) == 1


def test_the_order_survives_a_reopen(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=400)
    for key in "abcd":  # written within a millisecond: the stamps must still order them
        cache.put(key, key.encode() * 100)
    cache.get("a")
    cache.get("b")  # least recent first: c, d, a, b
    reopened = DiskCache(tmp_path, capacity_bytes=400)
    assert reopened.bytes == 400 and len(reopened) == 4
    reopened.put("e", b"e" * 200)
    assert [k in reopened for k in "abcde"] == [True, True, False, False, True]
    assert reopened.get("a") == b"a" * 100


def test_a_smaller_capacity_at_reopen_evicts_the_oldest(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=1000)
    for key in "abc":
        cache.put(key, b"x" * 100)
    reopened = DiskCache(tmp_path, capacity_bytes=150)
    assert [k in reopened for k in "abc"] == [False, False, True] and reopened.bytes == 100


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path, capacity_bytes=10_000)
    cache.put("k", b"1" * 100)
    assert sorted(os.listdir(tmp_path)) == blobs(cache)  # no temp file stays behind

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diskcache.os, "replace", crash)  # the write dies before its rename
    with pytest.raises(RagcacheError, match="cannot write the disk cache file.*No space left"):
        cache.put("k", b"2" * 100)
    monkeypatch.undo()
    assert cache.get("k") == b"1" * 100 and sorted(os.listdir(tmp_path)) == blobs(cache)


def test_temp_files_of_a_dead_writer_are_not_entries_and_old_ones_are_removed(tmp_path):
    DiskCache(tmp_path, capacity_bytes=1000).put("k", b"v")
    fresh, stale = tmp_path / ".abc.1.tmp", tmp_path / ".def.2.tmp"
    fresh.write_bytes(b"half a blob")  # perhaps another process writing right now: left alone
    stale.write_bytes(b"half a blob")
    old = time.time() - diskcache.STALE_TMP_S - 60
    os.utime(stale, (old, old))
    cache = DiskCache(tmp_path, capacity_bytes=1000)
    assert len(cache) == 1 and cache.bytes == 1 and fresh.exists() and not stale.exists()


def test_discard_drops_a_damaged_blob(tmp_path):
    cache = DiskCache(tmp_path, capacity_bytes=1000)
    cache.put("k", b"v" * 10)
    cache.discard("k")
    cache.discard("never-there")
    assert "k" not in cache and cache.bytes == 0 and cache.get("k") is None and blobs(cache) == []


def test_two_processes_sharing_a_folder(tmp_path):
    """Best effort: what one evicts is a miss to the other; what one writes, the other can read."""
    one, two = DiskCache(tmp_path, 1000), DiskCache(tmp_path, 1000)
    one.put("k", b"v" * 10)
    assert "k" in two and two.get("k") == b"v" * 10 and two.bytes == 10
    two.discard("k")
    assert one.get("k") is None and one.bytes == 0 and one.stats.misses == 1


def test_keys_of_any_shape_are_safe_file_names(tmp_path):
    cache = DiskCache(tmp_path / "new" / "folder", capacity_bytes=1000)  # made when missing
    keys = ["../../etc/passwd", "a/b/c", "", "ü" * 300, "CON"]
    for i, key in enumerate(keys):
        cache.put(key, bytes([i]))
    assert [cache.get(k) for k in keys] == [bytes([i]) for i in range(len(keys))]
    assert len(blobs(cache)) == 5 and all(p.parent == cache.folder for p in cache.folder.iterdir())


def test_an_unusable_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(RagcacheError, match="cannot use .* as a disk cache"):
        DiskCache(tmp_path / "file", capacity_bytes=10)
    with pytest.raises(RagcacheError, match="capacity"):
        DiskCache(tmp_path, capacity_bytes=-1)
