"""Indexing: incremental re-runs, pruning, and the settings fixed when an index is created."""

import shutil

import pytest

from ragcache import RagCache, RagcacheError, indexer


def test_reindex_is_idempotent_and_tracks_changes(tmp_path, model, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        first = rc.index([corpus])
        assert first.files_indexed == 4 and first.files_skipped == 1
        ids = sorted(rc.store.embeddings()[0].tolist())
        again = rc.index([corpus])
        assert again.files_indexed == 0 and again.files_unchanged == 4 and again.chunks == 0
        assert sorted(rc.store.embeddings()[0].tolist()) == ids

        (corpus / "france.txt").write_text("Lyon is a city in France.")
        (corpus / "moon.json").unlink()
        changed = rc.index([corpus])
        assert (changed.files_indexed, changed.files_removed, changed.files_unchanged) == (1, 1, 2)
        texts = [rc.store.chunk(i).text for i in rc.store.embeddings()[0].tolist()]
        assert "Lyon is a city in France." in texts
        assert not any("Paris" in t or "moon" in t for t in texts)
        assert len(rc.vectors()) == rc.store.count()
        hit = rc.ask("Lyon", mode="doc", top_k=rc.store.count(), max_new_tokens=1)
        assert {s.chunk_id for s in hit.sources} == set(rc.store.embeddings()[0].tolist())


def test_no_prune_keeps_vanished_files(tmp_path, model, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus])
        n = rc.store.count()
        (corpus / "moon.json").unlink()
        assert rc.index([corpus], prune=False).files_removed == 0
        assert rc.store.count() == n


def test_settings_are_fixed_at_creation(tmp_path, model, corpus_dir):
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], kv_attention="causal")
        assert rc.meta.kv_attention == "causal"
        with pytest.raises(RagcacheError, match="kv-attention=causal"):
            rc.index([corpus_dir], kv_attention="bidirectional")
        with pytest.raises(RagcacheError, match="chunk-tokens"):
            rc.index([corpus_dir], chunk_tokens=99)


def test_pipelined_indexing_stores_what_the_plain_path_does(tmp_path, model, many):
    """The writer thread (on by default on a GPU) commits the same chunks, vectors and caches."""
    from conftest import spans
    corpus, reference, _ = many
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        stats = rc.index([corpus], chunk_tokens=24, pipelined=True)
        assert stats.chunks == sum(map(len, reference.values())) and spans(rc) == reference
        assert len(rc.vectors()) == rc.store.count()
        answer = rc.ask("Where is Paris?", mode="doc", top_k=2, max_new_tokens=4, ignore_eos=True)
        assert answer.token_ids == rc.recompute(answer.layout, max_new_tokens=4, ignore_eos=True)[0]


def test_a_failure_in_the_writer_thread_reaches_the_caller(tmp_path, model, many, monkeypatch):
    from ragcache import store as storelib
    corpus, _, _ = many
    calls = []
    real = storelib.Store.put_batch

    def fails_second(self, parts):
        calls.append(1)
        if len(calls) == 2:
            raise RagcacheError("cannot write to the index: the disk is full")
        return real(self, parts)

    monkeypatch.setattr(storelib.Store, "put_batch", fails_second)
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        with pytest.raises(RagcacheError, match="disk is full"):
            rc.index([corpus], chunk_tokens=24, pipelined=True)
        monkeypatch.undo()
        assert rc.store.count() == indexer.BATCH_CHUNKS  # the first batch, whole; nothing after the failure
        rc.index([corpus], chunk_tokens=24)
        assert all(r.complete for r in rc.store.files().values())


def test_the_codec_is_chosen_once_from_the_first_batch(tmp_path, model, corpus_dir, monkeypatch):
    from ragcache import kv as kvlib
    with RagCache.open(tmp_path / "raw", model=model) as rc:
        rc.index([corpus_dir])
        assert rc.meta.kv_codec == "raw"  # random float32 KV: zstd saves far less than a third
        with rc.store.kv_views(list(rc.store.embeddings()[0])) as views:
            assert {kvlib.header(v).codec for v in views} == {kvlib.RAW}
    monkeypatch.setattr(kvlib, "MIN_RATIO", 1.0)  # any saving counts: the probe picks zstd for the index
    with RagCache.open(tmp_path / "zstd", model=model) as rc:
        rc.index([corpus_dir])
        assert rc.meta.kv_codec == "zstd"
        with rc.store.kv_views(list(rc.store.embeddings()[0])) as views:
            assert {kvlib.header(v).codec for v in views} == {kvlib.ZSTD_PLANES}
        assert rc.ask("Where is Paris?", mode="doc", top_k=1, max_new_tokens=2).sources
