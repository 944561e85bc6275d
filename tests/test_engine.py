"""The equivalence contract, idempotent re-indexing and model identity, on a tiny random model."""

import json

import pytest
import torch
from conftest import build_model

from ragcache import GritModel, RagCache, RagcacheError
from ragcache.prompts import Segment
from ragcache.vocab import MODES

QUESTION = "What is the capital of France?"




@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [1, 3])
def test_cached_path_equals_full_masked_recompute(rc, mode, top_k):
    answer = rc.ask(QUESTION, mode=mode, top_k=top_k, max_new_tokens=8, ignore_eos=True)
    tokens, logits = rc.recompute(answer.layout, max_new_tokens=8, ignore_eos=True)
    assert answer.token_ids == tokens
    assert (answer.first_logits - logits).abs().max().item() < 1e-3
    docs = [s for s in answer.layout if s.kind == "doc"]
    assert len(docs) == (0 if mode in ("none", "query") else top_k)
    cached = {s.kind for s in answer.layout if s.cached}
    assert cached == {"none": set(), "rag": set(), "query": {"query"}, "doc": {"doc"},
                      "query-doc": {"query", "doc"}, "doc-query": {"query", "doc"}}[mode]
    for seg in answer.layout:
        assert seg.attention == (rc.meta.kv_attention if seg.cached else "causal")


def test_rag_query_first_matches_layout_order(rc):
    answer = rc.ask(QUESTION, mode="rag", order="query-first", top_k=2, max_new_tokens=4)
    assert [s.kind for s in answer.layout] == ["query", "prompt"]
    assert not any(s.cached for s in answer.layout)
    tokens, _ = rc.recompute(answer.layout, max_new_tokens=4)
    assert answer.token_ids == tokens


def test_cached_segment_equals_the_segment_encoded_alone(rc):
    """Stored KV = the model's KV for exactly the chunk's tokens from position 0, with the index's attention."""
    from ragcache import kv
    from ragcache.adapter import from_cache, padded_allowed
    cid = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=1).sources[0].chunk_id
    record = rc.store.chunk(cid)
    ids = torch.tensor([record.token_ids])
    bidirectional = rc.meta.kv_attention == "bidirectional"
    _, cache = rc.model.forward(ids, torch.arange(ids.shape[1])[None], padded_allowed([ids.shape[1]], bidirectional, rc.model.device))
    with rc.store.kv_views([cid]) as (blob,):
        stored = kv.deserialize(blob)
        assert torch.allclose(stored, from_cache(cache, 0, ids.shape[1]), atol=1e-5)


def test_causal_doc_cache_is_pure_speed(rc):
    if rc.meta.kv_attention != "causal":
        pytest.skip("only a causal index makes doc mode equal to plain RAG")
    doc = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=12, ignore_eos=True)
    rag = rc.ask(QUESTION, mode="rag", order="doc-first", top_k=1, max_new_tokens=12, ignore_eos=True)
    assert [s.token_ids for s in doc.layout] == [s.token_ids for s in rag.layout]
    assert doc.token_ids == rag.token_ids
    assert (doc.first_logits - rag.first_logits).abs().max().item() < 1e-4


def test_answer_json_shape(rc):
    out = json.loads(json.dumps(rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=3).to_dict()))
    assert set(out) >= {"answer", "token_ids", "sources", "timings_ms", "layout"}
    assert set(out["timings_ms"]) >= {"embed", "search", "kv_load", "prefill", "decode", "total"}
    assert {"title", "source", "score"} <= set(out["sources"][0])
    seg = out["layout"][0]
    assert {"kind", "token_ids", "cached", "attention"} <= set(seg)
    assert out["sources"][0]["score"] >= out["sources"][1]["score"]


def test_top_k_larger_than_corpus_returns_all(rc):
    answer = rc.ask(QUESTION, mode="doc", top_k=1000, max_new_tokens=1)
    assert len(answer.sources) == rc.store.count()


@pytest.mark.parametrize("bad", [dict(question=""), dict(mode="nope"), dict(top_k=0), dict(top_k=-2),
                                 dict(order="sideways"), dict(max_new_tokens=0)])
def test_bad_questions_are_clear_errors(rc, bad):
    kwargs = dict(question=QUESTION) | bad
    with pytest.raises(RagcacheError):
        rc.ask(kwargs.pop("question"), **kwargs)


def _small_context_index(tmp_path, max_positions: int, docs: int, text: str) -> RagCache:
    """An index of `docs` one-line files, under a model whose context is only `max_positions` tokens."""
    small = GritModel.load(str(build_model(tmp_path / "m", max_positions=max_positions)), device="cpu",
                           dtype="float32")
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(docs):
        (corpus / f"{i}.txt").write_text(f"Document {i} says that {text}")
    rc = RagCache.open(tmp_path / "idx", model=small)
    rc.index([corpus])
    return rc


def test_context_overflow_drops_lowest_ranked(tmp_path, capsys):
    with _small_context_index(tmp_path, 96, 4, "Paris is the capital of France and more words.") as rc:
        answer = rc.ask(QUESTION, mode="doc", top_k=4, max_new_tokens=8)
        assert 1 <= len(answer.sources) < 4
        assert sum(len(s.token_ids) for s in answer.layout) + 8 <= 96
        err = capsys.readouterr().err
        kept = len(answer.sources)
        said = "(rank 4) of 4" if kept == 3 else f"{4 - kept} sources (ranks {kept + 1}-4) of 4"
        assert said in err and err.count("dropped") == 1  # the lowest ranked, said once
        with pytest.raises(RagcacheError, match="context"):
            rc.ask("word " * 200, mode="doc", top_k=1)


def test_a_huge_top_k_warns_once(tmp_path, capsys):
    with _small_context_index(tmp_path, 128, 30, "Paris is the capital of France.") as rc:
        capsys.readouterr()
        answer = rc.ask(QUESTION, mode="doc", top_k=100_000, max_new_tokens=4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"sources (ranks {len(answer.sources) + 1}-30) of 30" in err[0], err


def test_another_model_is_refused(tmp_path, model, corpus_dir):
    path = tmp_path / "idx"
    with RagCache.open(path, model=model) as rc:
        rc.index([corpus_dir])
    other = GritModel.load(str(build_model(tmp_path / "other", seed=7)), device="cpu", dtype="float32")
    with pytest.raises(RagcacheError, match="only valid for the model that made them"):
        RagCache.open(path, model=other)
    bf16 = GritModel.load(str(model.name), device="cpu", dtype="bfloat16")
    with pytest.raises(RagcacheError, match="load the model in float32") as refused:
        RagCache.open(path, model=bf16)
    assert refused.value.param == "dtype"  # the CLI names its --dtype flag
    # without a model, the index loads its own
    with RagCache.open(path) as rc:
        assert rc.model.fingerprint() == model.fingerprint()


def test_recompute_matches_hand_built_layout(rc, model):
    layout = [Segment("prompt", model.tokenize("<s>Once upon a time"), False, "causal")]
    tokens, _ = rc.recompute(layout, max_new_tokens=4, ignore_eos=True)
    assert len(tokens) == 4


def test_on_token_returning_true_stops_generation(rc):
    pieces = []
    answer = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=8, ignore_eos=True,
                    on_token=lambda text: pieces.append(text) or len(pieces) == 3)
    assert len(pieces) == 3 and len(answer.token_ids) == 3
    printed = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=5, ignore_eos=True, on_token=lambda text: (text,))
    assert len(printed.token_ids) == 5  # only a literal True stops: a print-like callback's value does not


def test_streamed_pieces_never_split_a_character(rc, monkeypatch):
    """A character made of several byte tokens is passed on whole, not as replacement characters."""
    script = iter(rc.model.tokenize("a 🦀 b"))
    monkeypatch.setattr("ragcache.generation.sample", lambda *args: next(script))
    pieces = []
    answer = rc.ask(QUESTION, mode="none", max_new_tokens=len(rc.model.tokenize("a 🦀 b")), ignore_eos=True,
                    on_token=pieces.append)
    assert answer.answer == "a 🦀 b" and "".join(pieces) == "a 🦀 b"


@pytest.mark.parametrize("mode", MODES)
def test_streamed_text_is_the_answer(rc, mode):
    """What on_token streams, joined, is the answer, even when it ends inside a split character."""
    for seed in range(3):
        pieces = []
        answer = rc.ask(QUESTION, mode=mode, top_k=2, max_new_tokens=7, temperature=1.0, seed=seed,
                        ignore_eos=True, on_token=pieces.append)
        assert "".join(pieces) == answer.answer
