"""Selective recompute (--recompute FRACTION): its contract, on a tiny random model."""

import pytest

from ragcache import RagcacheError

QUESTION = "What is the capital of France?"




def _ask(rc, **kwargs):
    return rc.ask(QUESTION, max_new_tokens=8, ignore_eos=True, **kwargs)


@pytest.mark.parametrize("mode", ["doc", "query-doc", "doc-query"])
def test_zero_is_the_pure_cached_path(rc, mode):
    plain, zero = _ask(rc, mode=mode, top_k=3), _ask(rc, mode=mode, top_k=3, recompute=0.0)
    assert zero.token_ids == plain.token_ids and (zero.first_logits - plain.first_logits).abs().max() == 0


def test_one_is_rag_in_the_same_order(rc):
    full = _ask(rc, mode="doc", top_k=3, recompute=1.0)
    rag = _ask(rc, mode="rag", order="doc-first", top_k=3)
    assert full.token_ids == rag.token_ids
    assert (full.first_logits - rag.first_logits).abs().max().item() < 1e-4


def test_a_fraction_moves_doc_toward_rag(rc):
    doc, rag = _ask(rc, mode="doc", top_k=3), _ask(rc, mode="rag", order="doc-first", top_k=3)
    part = _ask(rc, mode="doc", top_k=3, recompute=0.5)
    gap = (doc.first_logits - rag.first_logits).abs().max().item()
    if gap > 1e-5:  # the cached path differs from rag here: half recomputed is nearer
        assert (part.first_logits - rag.first_logits).abs().max().item() < gap


def test_any_fraction_is_exact_for_a_single_causal_chunk(rc):
    if rc.meta.kv_attention != "causal":
        pytest.skip("a bidirectional chunk's cache differs from a causal pass over it")
    rag = _ask(rc, mode="rag", order="doc-first", top_k=1)
    for fraction in (0.1, 0.3, 0.7):
        part = _ask(rc, mode="doc", top_k=1, recompute=fraction)
        assert part.token_ids == rag.token_ids
        assert (part.first_logits - rag.first_logits).abs().max().item() < 1e-4


def test_a_fraction_outside_zero_to_one_is_refused(rc):
    with pytest.raises(RagcacheError, match="from 0 to 1"):
        _ask(rc, mode="doc", top_k=1, recompute=1.5)
