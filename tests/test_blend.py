"""Selective recompute (--recompute FRACTION): its contract, on a tiny random model."""

import pytest
import torch
from transformers.cache_utils import Cache, DynamicLayer

from conftest import build_model
from ragcache import GritModel, RagcacheError, adapter, blend, generation
from ragcache.prompts import Segment, layout_allowed

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


def test_the_plan_tapers_and_costs_the_fraction():
    for fraction in (0.05, 0.15, 0.3, 0.6, 0.9):
        counts = blend.carried(1000, fraction, 30)
        assert counts[0] == counts[1] > counts[-1]  # layer 1 chooses more than the last layer keeps
        assert all(a >= b for a, b in zip(counts, counts[1:]))
        assert abs(sum(counts) / (30 * 1000) - fraction) < 0.01  # the fraction is the token-layers' share
    assert blend.carried(1000, 1.0, 30) == [1000] * 30 and blend.carried(1000, 0.0, 30) == [0] * 30


class _WritesCarried(DynamicLayer):
    """The oracle's layer: every chosen token passes every layer, but a layer writes only those its
    plan carries (the most deviating at the layer before, among those that one carried)."""

    def __init__(self, layer, index, positions, counts, state):
        super().__init__()
        self.layer, self.index, self.positions, self.counts, self.state = layer, index, positions, counts, state
        self.keys, self.values = layer.keys, layer.values
        self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        k = len(self.positions)
        keys, values = self.layer.update(key_states[:, :, k:], value_states[:, :, k:])
        active = self.state["active"]
        nxt = self.counts[self.index + 1] if self.index + 1 < len(self.counts) else len(active)
        dev = ((key_states[0, :, active] - self.layer._keys[0, :, self.positions[active]]).pow(2).sum((0, 2))
               + (value_states[0, :, active] - self.layer._values[0, :, self.positions[active]]).pow(2).sum((0, 2)))
        self.layer._keys[:, :, self.positions[active]] = key_states[:, :, active]
        self.layer._values[:, :, self.positions[active]] = value_states[:, :, active]
        self.state["active"] = active[dev.topk(nxt).indices.sort().values]
        return keys, values


def test_a_tapering_plan_leaves_what_a_pass_that_stops_writing_the_dropped_tokens_would(tmp_path):
    model = GritModel.load(str(build_model(tmp_path / "model", layers=4)), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    head, one, two, question = (torch.randint(5, 60, (n,), generator=g).tolist() for n in (6, 10, 10, 5))
    layout = [Segment("head", head, True, "causal"), Segment("doc", one, True, "causal", context=6),
              Segment("doc", two, True, "causal", context=6), Segment("prompt", question, False, "causal")]
    prefix = layout[:3]
    n, ids = 26, torch.tensor(head + one + two)[None]
    _, dyn = model.forward(ids, torch.arange(n)[None], layout_allowed(prefix)[None])  # the cached path's KV
    kv = adapter.from_cache(dyn, 0, n)  # (layers, 2, kv_heads, n, head_dim)

    def cache():
        return adapter.assemble([kv], model.inv_freq, 4, 8, model.device, model.dtype)

    positions, counts = torch.tensor([6, 8, 9, 11, 16, 17, 20, 25]), [8, 8, 5, 2]
    tapered = cache()
    hidden = generation.prefill(model, layout, tapered, n, [], blend.Plan(positions, counts))
    assert hidden.shape[1] == len(question)

    oracle, state = cache(), {"active": torch.arange(len(positions))}
    rows = torch.cat([positions, torch.arange(n, n + len(question))])
    allowed = torch.arange(n + len(question))[None, :] <= rows[:, None]  # each token sees up to itself
    writes = Cache(layers=[_WritesCarried(layer, i, positions, counts, state) for i, layer in enumerate(oracle.layers)])
    expected, _ = model.forward(torch.cat([ids[0, positions], torch.tensor(question)])[None], rows[None],
                                allowed[None], writes)
    assert torch.allclose(hidden, expected[:, len(positions):], atol=1e-5)
    for a, b in zip(tapered.layers, oracle.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)

    uniform = cache()
    generation.prefill(model, layout, uniform, n, [], blend.Plan(positions, [8] * 4))
    assert not torch.allclose(uniform.layers[3].keys, tapered.layers[3].keys, atol=1e-5)  # it did drop tokens
