"""The chat layout style: a model with a chat template that is no GRIT model reads its chunks inside a
user turn, after a fixed preamble that every chunk's cache was computed after (prompts.Frame)."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from ragcache import GritModel, RagCache, RagcacheError, blend
from ragcache import kv as kvlib
from ragcache.adapter import causal_allowed, first_layers_kv, from_cache, padded_allowed
from ragcache.cli import app
from ragcache.prompts import CHAT_PREAMBLE, layout_allowed
from ragcache.vocab import MODES

QUESTION = "What is the capital of France?"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, model_dir):
    """The tiny random model, with a ChatML chat template: a chat model that was not trained to embed."""
    out = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(model_dir, out)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    return GritModel.load(str(chat_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module", params=["causal", "bidirectional"])
def chat_rc(request, tmp_path_factory, chat_model, corpus_dir):
    rc = RagCache.open(tmp_path_factory.mktemp("chat-idx") / "idx", model=chat_model)
    rc.index([corpus_dir], chunk_tokens=24, kv_attention=None if request.param == "causal" else "bidirectional")
    yield rc
    rc.close()


def test_a_chat_model_gets_the_chat_layout_with_causal_caches(chat_rc):
    meta = chat_rc.meta
    assert meta.layout == "chat" and meta.preamble == CHAT_PREAMBLE
    assert meta.kv_attention in ("causal", "bidirectional")  # causal unless asked for
    head = chat_rc.frame.head
    assert head.startswith("<|im_start|>user\n") and head.endswith(CHAT_PREAMBLE)
    assert chat_rc.frame.tail == "<|im_end|>\n<|im_start|>assistant\n"


def _each_segment_after_the_head(rc, layout) -> torch.Tensor:
    """First-step logits of `layout` built by hand: each cached segment run right after the head (plain
    forwards, not the code under test), moved to its offset, then the rest computed causally."""
    model = rc.model
    head = layout[0].token_ids
    parts, offset = [], 0
    for seg in layout:
        if not seg.cached:
            break
        ids = seg.token_ids if seg.kind == "head" else head + seg.token_ids
        n, start = len(ids), 0 if seg.kind == "head" else len(head)
        allowed = padded_allowed([n], False, model.device)
        if seg.kind != "head" and seg.attention == "bidirectional":
            allowed[:, start:, start:] = True
        _, cache = model.forward(torch.tensor([ids]), torch.arange(n)[None], allowed)
        kv = from_cache(cache, 0, n - start, start=start)
        kv[:, 0] = kvlib.rotate_keys(kv[:, 0], offset - start, model.inv_freq)
        parts.append(kv)
        offset += len(seg.token_ids)
    rest = [t for s in layout if not s.cached for t in s.token_ids]
    ids, past = torch.tensor([[t for s in layout for t in s.token_ids]]), offset
    allowed = torch.ones(1, len(rest), len(ids[0]), dtype=torch.bool).tril(past)
    from transformers import DynamicCache
    cache = DynamicCache()
    for layer in range(model.hf.config.num_hidden_layers):
        cache.update(torch.cat([p[layer, 0] for p in parts], 1)[None], torch.cat([p[layer, 1] for p in parts], 1)[None], layer)
    hidden, _ = model.forward(ids[:, past:], torch.arange(past, ids.shape[1])[None], allowed, cache)
    return model.logits(hidden[0, -1])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [1, 3])
def test_cached_path_equals_its_reference(chat_rc, mode, top_k):
    """One cached segment after the head is exactly the masked recompute of the layout; a later one sees
    the head from further away than when it was computed (the approximation of EPIC and APE), so it
    is checked against the layout built by hand from its definition."""
    answer = chat_rc.ask(QUESTION, mode=mode, top_k=top_k, max_new_tokens=8, ignore_eos=True)
    tokens, logits = chat_rc.recompute(answer.layout, max_new_tokens=8, ignore_eos=True)
    after_head = [s for s in answer.layout if s.cached and s.kind != "head"]
    if len(after_head) <= 1:
        assert answer.token_ids == tokens
        assert (answer.first_logits - logits).abs().max().item() < 1e-3
    else:
        by_hand = _each_segment_after_the_head(chat_rc, answer.layout)
        assert (answer.first_logits - by_hand).abs().max().item() < 1e-3
    kinds = [s.kind for s in answer.layout]
    if mode == "none":
        assert "head" not in kinds
        return
    assert kinds[0] == "head" and kinds[-1] == "prompt" and kinds.count("doc") == top_k
    head = len(answer.layout[0].token_ids)
    for seg in answer.layout[1:]:  # cached chunks and questions attended to the head, nothing else
        assert seg.context == (head if seg.cached else 0)
    decode = chat_rc.model.tokenizer.decode
    assert decode(answer.layout[-1].token_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert answer.layout[0].cached == any(s.cached for s in answer.layout[1:])


def test_a_stored_chunk_is_its_kv_computed_after_the_head(chat_rc):
    cid = chat_rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=1).sources[0].chunk_id
    record, model = chat_rc.store.chunk(cid), chat_rc.model
    head = model.tokenize(chat_rc.frame.head)
    assert model.decode(record.token_ids).endswith("\n\n")  # the passage as the user turn holds it
    expected = _kv_after_head(model, head, record.token_ids, chat_rc.meta.kv_attention == "bidirectional")
    with chat_rc.store.kv_views([cid]) as (blob,):
        assert torch.allclose(kvlib.deserialize(blob), expected, atol=1e-5)


def test_the_head_is_computed_once_and_read_as_every_segments_past(chat_rc, monkeypatch):
    """A question's pass (and a batch of chunks') runs its own tokens only, after the head's KV computed
    once; each segment's KV is still the one-pass computation after the head, padding or not."""
    model, frame = chat_rc.model, chat_rc.frame
    head = model.head_kv(frame)
    texts = [QUESTION, "Which river runs through Paris, and how long is it?"]
    widths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **k: widths.append(ids.shape[1]) or forward(ids, *a, **k))
    encoded = model.encode_segments(texts, frame, "causal", role="query")
    monkeypatch.undo()
    toks = [model.segment_tokens(t, frame, "query") for t in texts]
    assert widths == [max(len(t) for t in toks)]  # one batched pass, no head tokens in it
    for enc, ids in zip(encoded, toks):
        assert enc.token_ids == ids and torch.allclose(enc.kv, _kv_after_head(model, head.token_ids, ids), atol=1e-5)


def _kv_after_head(model, head: list[int], ids: list[int], bidirectional: bool = False) -> torch.Tensor:
    """The reference: `ids`' KV from one pass over the head and them, keys turned back to position 0
    as stored."""
    n, after = len(ids), len(head)
    allowed = padded_allowed([after + n], False, model.device)
    if bidirectional:
        allowed[:, after:, after:] = True
    _, cache = model.forward(torch.tensor([head + ids]), torch.arange(after + n)[None], allowed)
    expected = from_cache(cache, 0, n, start=after)
    expected[:, 0] = kvlib.rotate_keys(expected[:, 0], -after, model.inv_freq)  # stored from position 0
    return expected


def test_one_causal_chunk_cached_is_rag_and_recompute_one_is_rag(chat_rc):
    rag = chat_rc.ask(QUESTION, mode="rag", top_k=3, max_new_tokens=8, ignore_eos=True)
    full = chat_rc.ask(QUESTION, mode="doc", top_k=3, max_new_tokens=8, ignore_eos=True, recompute=1.0)
    assert full.token_ids == rag.token_ids
    assert (full.first_logits - rag.first_logits).abs().max().item() < 1e-4
    if chat_rc.meta.kv_attention == "causal":  # after the same head, a lone causal chunk is exact
        rag1 = chat_rc.ask(QUESTION, mode="rag", top_k=1, max_new_tokens=8, ignore_eos=True)
        for fraction in (0.0, 0.3):
            one = chat_rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=8, ignore_eos=True, recompute=fraction)
            assert one.token_ids == rag1.token_ids
            assert (one.first_logits - rag1.first_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode", ["rag", "doc", "doc-query"])
def test_best_last_places_the_top_chunk_before_the_question_and_keeps_the_contract(chat_rc, mode):
    """--chunk-order best-last reverses the chunks in the layout, not the sources; the cached path is
    still its layout's reference, and recompute 1 is still rag in the same chunk order."""
    kw = dict(top_k=3, max_new_tokens=8, ignore_eos=True)
    first = chat_rc.ask(QUESTION, mode=mode, **kw)
    last = chat_rc.ask(QUESTION, mode=mode, chunk_order="best-last", **kw)
    placed = lambda a: [s.chunk_id for s in a.layout if s.kind == "doc"]
    assert len(set(placed(first))) == 3
    assert placed(last) == placed(first)[::-1] == [s.chunk_id for s in last.sources][::-1]
    assert [s.rank for s in last.sources] == [1, 2, 3] and last.sources == first.sources
    if mode == "rag":
        tokens, logits = chat_rc.recompute(last.layout, max_new_tokens=8, ignore_eos=True)
        assert last.token_ids == tokens and (last.first_logits - logits).abs().max().item() < 1e-3
    else:
        by_hand = _each_segment_after_the_head(chat_rc, last.layout)
        assert (last.first_logits - by_hand).abs().max().item() < 1e-3
        rag = chat_rc.ask(QUESTION, mode="rag", chunk_order="best-last", **kw)
        full = chat_rc.ask(QUESTION, mode=mode, chunk_order="best-last", recompute=1.0, **kw)
        if mode == "doc":
            assert full.token_ids == rag.token_ids
            assert (full.first_logits - rag.first_logits).abs().max().item() < 1e-4
        causal = [replace(s, cached=False, attention="causal", context=0) for s in last.layout]
        tokens, _ = chat_rc.recompute(causal, max_new_tokens=8, ignore_eos=True)  # one causal pass over it all
        assert full.token_ids == tokens


def test_recompute_chooses_as_a_full_two_layer_pass_would_without_passing_the_exact_tokens(chat_rc):
    """The deviation pass starts after the head and the first causal chunk, reading their layers 0
    and 1 from the cache; the tokens it picks are those a pass over the whole prefix would pick."""
    answer = chat_rc.ask(QUESTION, mode="doc", top_k=3, max_new_tokens=1)
    prefix = [s for s in answer.layout if s.cached]
    head, first = len(prefix[0].token_ids), len(prefix[1].token_ids)
    exact = blend.exact_tokens(prefix)
    assert exact == (head + first if chat_rc.meta.kv_attention == "causal" else head)
    model, n = chat_rc.model, sum(len(s.token_ids) for s in prefix)
    ids = torch.tensor([t for s in prefix for t in s.token_ids])[None]
    pos = torch.arange(n)[None]
    _, cache = model.forward(ids, pos, layout_allowed(prefix)[None])  # the cached path's keys and values
    full = first_layers_kv(model.hf, ids, pos, causal_allowed(n, 0, model.device), model.dtype, 2)
    _, whole = model.forward(ids, pos, causal_allowed(n, 0, model.device))  # every layer, attention and MLP
    for layer in (0, 1):  # the two-layer pass stops after layer 1's keys and values, which are the whole pass's
        for f in ("keys", "values"):
            assert torch.allclose(getattr(full.layers[layer], f), getattr(whole.layers[layer], f), atol=1e-5)
    deviation = sum((getattr(full.layers[1], f) - getattr(cache.layers[1], f))[0].pow(2).sum((0, 2))
                    for f in ("keys", "values"))  # (n,)
    assert deviation[:exact].max() < 1e-6 * deviation.max()  # the exact tokens cannot deviate
    layers = model.hf.config.num_hidden_layers
    for fraction in (0.1, 0.3):
        plan = blend.choose(model, prefix, cache, fraction)
        assert plan.carried == blend.carried(n, fraction, layers)
        assert plan.positions.tolist() == deviation.topk(plan.carried[0]).indices.sort().values.tolist()
    assert blend.choose(model, prefix, cache, 1.0).positions.tolist() == list(range(n))


def test_a_damaged_chat_chunk_is_recomputed_after_the_head(chat_rc, tmp_path):
    from conftest import damage_kv
    before = chat_rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
    damage_kv(chat_rc, before.sources[0].chunk_id, "flip")
    after = chat_rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
    assert after.kv_served_by[before.sources[0].chunk_id] == "recomputed"
    assert after.token_ids == before.token_ids
    assert (after.first_logits - before.first_logits).abs().max().item() < 1e-4


def test_a_grit_model_keeps_the_papers_layout(rc):
    assert rc.meta.layout == "grit"
    layout = rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=1).layout
    assert [s.kind for s in layout] == ["doc", "doc", "prompt"] and all(s.context == 0 for s in layout)


def test_the_layout_is_fixed_per_index_and_needs_a_template(tmp_path, model, chat_model, corpus_dir):
    with RagCache.open(tmp_path / "grit", model=chat_model) as rc:
        rc.index([corpus_dir], chunk_tokens=24, layout="grit")  # asked for: GRIT's formats
        assert rc.meta.layout == "grit" and rc.ask(QUESTION, mode="doc", max_new_tokens=1).layout[0].kind == "doc"
        with pytest.raises(RagcacheError, match="layout=grit") as e:
            rc.index([corpus_dir], layout="chat")
        assert e.value.param == "layout"
    with RagCache.open(tmp_path / "plain", model=model) as rc:
        with pytest.raises(RagcacheError, match="needs a model with a chat template") as e:
            rc.index([corpus_dir], layout="chat")
        assert rc.meta is None  # refused before the index was written


def test_cli_index_info_and_explain_show_the_chat_layout(chat_model_dir, corpus_dir, tmp_path):
    runner, idx = CliRunner(), str(tmp_path / "idx")
    result = runner.invoke(app, ["index", str(corpus_dir), "-i", idx, "-m", str(chat_model_dir),
                                 "--chunk-tokens", "24"])
    assert result.exit_code == 0, result.output
    assert "chat layout" in runner.invoke(app, ["info", "-i", idx]).stdout
    out = runner.invoke(app, ["ask", QUESTION, "-i", idx, "--mode", "doc", "-k", "2", "--explain",
                              "--max-new-tokens", "2"])
    assert out.exit_code == 0, out.output
    assert " head " in out.stdout and "after the first" in out.stdout
    bad = runner.invoke(app, ["index", str(corpus_dir), "-i", str(tmp_path / "x"), "-m", str(chat_model_dir),
                              "--layout", "nope"])
    assert bad.exit_code != 0 and "unknown layout 'nope'" in bad.output and "Traceback" not in bad.output
    assert json.loads(runner.invoke(app, ["info", "-i", idx, "--json"]).stdout)["index_info"]["layout"] == "chat"
