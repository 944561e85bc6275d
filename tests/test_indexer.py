"""Indexing: incremental re-runs, pruning, and the settings fixed when an index is created."""

import shutil

import pytest

from ragcache import RagCache, RagcacheError


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
