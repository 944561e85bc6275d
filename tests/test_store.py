"""The on-disk format: typed records in LMDB, one transaction a file, a map that grows."""

import numpy as np
from conftest import spans

from ragcache import RagCache
from ragcache import store as storelib
from ragcache.records import Chunk
from ragcache.store import FilePart, Store


def test_files_and_chunks_round_trip_as_typed_records(tmp_path):
    store = Store(tmp_path / "idx", create=True)
    try:
        chunk = Chunk("d1", "Title", "Some text.", "/corpus/a.txt", 0, 10, [1, 2, 3])
        row = (chunk, np.ones(4, np.float32) / 2, b"blob")
        [(removed, added)] = store.put_batch([FilePart("/corpus/a.txt", "h1", [row], fresh=True, complete=True)])
        assert removed == [] and len(added) == 1
        assert store.chunk(added[0]) == chunk
        assert store.files()["/corpus/a.txt"].hash == "h1" and store.files()["/corpus/a.txt"].chunks == added
        with store.kv_views([added[0], 99]) as views:
            assert bytes(views[0]) == b"blob" and views[1] is None  # absent is None, not an error
        [(removed, again)] = store.put_batch([FilePart("/corpus/a.txt", "h2", [row], fresh=True, complete=False)])
        assert not store.file("/corpus/a.txt").complete
        [(none, more)] = store.put_batch([FilePart("/corpus/a.txt", "h2", [row], fresh=False, complete=True)])
        assert none == [] and store.file("/corpus/a.txt").chunks == again + more and store.file("/corpus/a.txt").complete
        assert removed == added and again != added and store.count() == 2
        assert store.remove_file("/corpus/a.txt") == again + more and store.count() == 0 and store.files() == {}
    finally:
        store.close()


def test_full_map_grows(tmp_path, many, model, monkeypatch):
    corpus, reference, _ = many
    monkeypatch.setattr(storelib, "_MAP_SIZE", 1 << 17)
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus], chunk_tokens=24)
        assert rc.store.env.info()["map_size"] >= 1 << 20
        assert spans(rc) == reference


def test_kv_source_tells_missing_from_damaged(tmp_path, model, corpus_dir):
    from conftest import damage_kv
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        first, second = sorted(rc.store.embeddings()[0].tolist())[:2]
        damage_kv(rc, second, "flip")
        with rc.kv_source.fetch([first, second, 10_000], model.device) as got:
            assert set(got.tensors) == {first} and got.served_by == {first: "store"}
            assert got.missing == [10_000] and "checksum" in got.damaged[second]
            assert got.tensors[first].shape[3] == len(rc.store.chunk(first).token_ids)
