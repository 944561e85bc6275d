"""Real trained weights (stories260K) and real text (SQuAD) from ../shared; skipped when absent."""

import json

import pytest
from conftest import SQUAD, STORIES

from ragcache import GritModel, RagCache
from ragcache.prompts import Segment
from ragcache.vocab import MODES

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K is absent")


@pytest.fixture(scope="module")
def stories():
    return GritModel.load(str(STORIES), device="cpu", dtype="float32")


@needs_stories
def test_stories_greedy_continuation_through_the_cache_path(tmp_path, stories):
    with RagCache.open(tmp_path / "idx", model=stories) as rc:
        layout = [Segment("prompt", stories.tokenize("<s>Once upon a time"), False, "causal")]
        tokens, _ = rc.recompute(layout, max_new_tokens=24)
    text = stories.decode(stories.tokenize("<s>Once upon a time") + tokens)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")


@needs_stories
@pytest.mark.skipif(not SQUAD.exists(), reason="../shared SQuAD sample is absent")
def test_squad_end_to_end_every_mode(tmp_path, stories):
    data = json.loads(SQUAD.read_text())["data"][0]
    corpus = tmp_path / "squad.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"p{i}", "title": data["title"], "text": p["context"]}) + "\n"
                              for i, p in enumerate(data["paragraphs"][:12])))
    question = data["paragraphs"][0]["qas"][0]["question"]
    with RagCache.open(tmp_path / "idx", model=stories) as rc:
        stats = rc.index([corpus], chunk_tokens=96, kv_attention="causal")
        assert stats.chunks >= 12
        for mode in MODES:
            answer = rc.ask(question, mode=mode, top_k=2, max_new_tokens=6)
            tokens, logits = rc.recompute(answer.layout, max_new_tokens=6)
            assert answer.token_ids == tokens
            assert (answer.first_logits - logits).abs().max().item() < 1e-3
        doc = rc.ask(question, mode="doc", top_k=1, max_new_tokens=10)
        rag = rc.ask(question, mode="rag", top_k=1, max_new_tokens=10)
        assert doc.token_ids == rag.token_ids
