"""Damage, crashes and concurrency: the index explains itself and loses nothing."""

import pytest

from ragcache import RagCache
from ragcache.store import key

QUESTION = "What is the capital of France?"


def _damage(rc: RagCache, cid: int, how: str) -> None:
    with rc.store.env.begin(write=True, db=rc.store.db["kv"]) as txn:
        blob = bytearray(txn.get(key(cid)))
        if how == "flip":
            blob[len(blob) // 2] ^= 0x04
        elif how == "truncate":
            del blob[len(blob) // 3 :]
        else:
            blob[:4] = b"JUNK"
        txn.put(key(cid), bytes(blob))


@pytest.mark.parametrize("how", ["flip", "truncate", "header"])
def test_damaged_cache_is_recomputed_from_text_with_a_warning(tmp_path, model, corpus_dir, capsys, how):
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        before = rc.ask(QUESTION, mode="doc-query", top_k=2, max_new_tokens=6, ignore_eos=True)
        _damage(rc, before.sources[0]["chunk_id"], how)
        capsys.readouterr()
        after = rc.ask(QUESTION, mode="doc-query", top_k=2, max_new_tokens=6, ignore_eos=True)
    assert after.token_ids == before.token_ids
    assert (after.first_logits - before.first_logits).abs().max().item() < 1e-4
    err = capsys.readouterr().err
    assert err.count("damaged") == 1 and f"chunk {before.sources[0]['chunk_id']}" in err
