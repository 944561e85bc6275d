"""The FAISS view: exact cosine search, saved with the LMDB transaction it matches, rebuilt when stale."""

import numpy as np

from ragcache import RagCache
from ragcache.vectors import Vectors

QUESTION = "What is the capital of France?"


def test_search_is_best_first_and_removal_works(tmp_path):
    vectors = Vectors(4)
    vecs = np.eye(4, dtype=np.float32)
    vectors.add([10, 11, 12, 13], vecs)
    query = np.array([0.1, 0.9, 0.3, 0.0], np.float32)
    assert [i for i, _ in vectors.search(query, 3)] == [11, 12, 10]
    vectors.remove([11])
    assert [i for i, _ in vectors.search(query, 4)] == [12, 10, 13]
    assert vectors.search(query, 0) == []


def test_saved_view_loads_only_for_its_stamp(tmp_path):
    vectors = Vectors(4)
    vectors.add([1, 2], np.eye(4, dtype=np.float32)[:2])
    path = tmp_path / "vectors.faiss"
    vectors.save(path, stamp=7)
    loaded = Vectors.load(path, 7)
    assert loaded is not None and sorted(loaded.contents()[0].tolist()) == [1, 2]
    assert Vectors.load(path, 8) is None  # LMDB moved on: stale
    path.write_bytes(path.read_bytes()[:10])
    assert Vectors.load(path, 7) is None  # a cut file is rebuilt, never a crash


def test_stale_vectors_are_rebuilt_from_lmdb(tmp_path, model, corpus_dir):
    path = tmp_path / "idx"
    with RagCache.open(path, model=model) as rc:
        rc.index([corpus_dir])
        n = rc.store.count()
    (path / "vectors.faiss").unlink()
    with RagCache.open(path, model=model) as rc:
        assert len(rc.vectors()) == n
        assert rc.ask(QUESTION, top_k=2, max_new_tokens=1).sources
