"""KV tiers in front of the store, and the load-or-recompute rule: the same answer from every path."""

import pytest
import torch
from starlette.testclient import TestClient

from conftest import damage_kv
from ragcache import RagCache
from ragcache.kvtiers import CostModel, MemoryTier, TieredKV, default_sizes
from ragcache.server import create_app

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def rc(tmp_path_factory, model, corpus_dir):
    rc = RagCache.open(tmp_path_factory.mktemp("tiers") / "idx", model=model)
    rc.index([corpus_dir], chunk_tokens=24, kv_attention="causal")
    yield rc
    rc.close()


def test_a_tier_is_an_lru_bounded_in_bytes():
    tier = MemoryTier("host", capacity=3 * 64, device=torch.device("cpu"))
    parts = {i: torch.full((1, 2, 1, 4, 2), float(i)) for i in range(4)}  # 64 bytes each
    for i in range(3):
        tier.put(i, parts[i])
    assert tier.get(0) is not None  # 0 is now the most recent: 1 goes first
    tier.put(3, parts[3])
    assert 1 not in tier and {0, 2, 3} <= set(tier.entries) and tier.bytes == 3 * 64
    assert tier.stats.evictions == 1 and tier.get(1) is None and tier.stats.misses == 1
    view = parts[2].clone()
    tier.put(9, view)
    view.zero_()  # the tier holds its own copy, never a view of what it was given
    assert tier.get(9).sum() != 0
    tier.put(10, torch.zeros(1000))  # larger than the whole tier: not kept
    assert 10 not in tier


def test_second_question_is_served_from_the_host_tier_with_the_same_answer(rc):
    rc.use_tiers(gpu_gb=0, host_gb=0.01)
    try:
        first = rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
        second = rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
        assert set(first.kv_served_by.values()) == {"store"} and set(second.kv_served_by.values()) == {"host"}
        assert second.token_ids == first.token_ids
        assert torch.allclose(second.first_logits, first.first_logits, atol=1e-6)
        assert first.kv_tiers["host"] == {"hits": 0, "misses": 2} and first.kv_tiers["store"]["hits"] == 2
        assert second.kv_tiers["host"] == {"hits": 2, "misses": 0}
        assert second.to_dict()["kv_tiers"]["host"]["hits"] == 2
        assert rc.tier_stats()["host"]["entries"] == 2
    finally:
        rc.use_tiers(0, 0)


def test_a_warm_copy_outlives_damage_on_disk(rc):
    """The host tier's copy is its own: damage to the stored blob after it was read does not reach it."""
    rc.use_tiers(gpu_gb=0, host_gb=0.01)
    try:
        first = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=4, ignore_eos=True)
        cid = first.sources[0].chunk_id
        damage_kv(rc, cid, "flip")
        again = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=4, ignore_eos=True)
        assert again.kv_served_by == {cid: "host"} and again.token_ids == first.token_ids
    finally:
        rc.use_tiers(0, 0)
        from ragcache.verify import verify
        verify(rc, repair=True)


def test_recompute_is_chosen_when_reading_is_slower_and_answers_the_same(rc):
    loaded = rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
    saved = rc.cost
    rc.cost = CostModel(read_bytes_per_s=1.0, prefill_tokens_per_s=1e9)  # a disk slower than any model
    try:
        recomputed = rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
    finally:
        rc.cost = saved
    assert set(recomputed.kv_served_by.values()) == {"recomputed"}
    assert recomputed.token_ids == loaded.token_ids
    assert (recomputed.first_logits - loaded.first_logits).abs().max().item() < 1e-4


def test_cost_model_reads_until_it_has_measured_both_sides():
    cost = CostModel()
    assert not cost.recompute_is_faster(10**9, 10)
    cost.measured_read(10**9, 1.0)  # 1 GB/s
    assert not cost.recompute_is_faster(10**9, 10)
    cost.measured_prefill(10_000, 1.0)  # 10k tokens/s: 10 tokens take 1 ms, a GB takes 1 s
    assert cost.recompute_is_faster(10**9, 10) and not cost.recompute_is_faster(10**3, 10_000)


def test_defaults_keep_no_tier_for_one_question_and_a_host_tier_for_a_server():
    assert default_sizes(torch.device("cpu"), long_lived=False, kv_bytes_per_token=1, max_context=1) == (0.0, 0.0)
    gpu, host = default_sizes(torch.device("cpu"), long_lived=True, kv_bytes_per_token=1, max_context=1)
    assert gpu == 0.0 and 0 < host <= 16


def test_health_reports_the_tiers(rc):
    rc.use_tiers(gpu_gb=0, host_gb=0.01)
    try:
        rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=1)
        health = TestClient(create_app(rc)).get("/health").json()
        assert health["kv_tiers"]["host"]["entries"] == 1 and health["kv_tiers"]["host"]["misses"] >= 1
        assert isinstance(rc.kv_source, TieredKV)
    finally:
        rc.use_tiers(0, 0)


def test_ask_json_names_the_tier_of_each_chunk(rc, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from ragcache.cli import app
    copy = tmp_path / "idx"  # LMDB opens an environment once per process: the CLI gets its own copy
    shutil.copytree(rc.stored.path, copy)
    result = CliRunner().invoke(app, ["ask", QUESTION, "-i", str(copy), "--json", "-k", "2",
                                      "--host-cache-gb", "0.01", "--max-new-tokens", "1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["kv_served_by"].values()) == {"store"} and out["kv_tiers"]["host"] == {"hits": 0, "misses": 2}
    cpu = CliRunner().invoke(app, ["ask", QUESTION, "-i", str(copy), "--gpu-cache-gb", "1", "--max-new-tokens", "1"])
    assert cpu.exit_code == 0 and "--gpu-cache-gb is ignored" in cpu.stderr
    bad = CliRunner().invoke(app, ["ask", QUESTION, "-i", str(copy), "--host-cache-gb", "-1"])
    assert bad.exit_code == 1 and "--host-cache-gb must be 0 or more" in bad.output


@pytest.mark.parametrize("mode", ["doc", "query-doc", "doc-query", "query", "rag"])
def test_a_cache_filled_layer_by_layer_during_the_prefill_answers_the_same(rc, mode):
    """The loader thread stands in for a GPU's copy stream: each layer waits only for its own copy."""
    plain = rc.ask(QUESTION, mode=mode, top_k=3, max_new_tokens=6, ignore_eos=True)
    rc.streamed = True
    try:
        streamed = rc.ask(QUESTION, mode=mode, top_k=3, max_new_tokens=6, ignore_eos=True)
    finally:
        rc.streamed = False
    assert streamed.token_ids == plain.token_ids
    assert (streamed.first_logits - plain.first_logits).abs().max().item() < 1e-5


def test_each_layer_waits_for_its_own_copy(model):
    import threading

    from ragcache import adapter
    cfg = model.hf.config
    part = torch.randn(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 5, cfg.hidden_size // cfg.num_attention_heads)
    gate = threading.Event()
    filled = []
    real_rotate = adapter.rotate_keys

    def slow_rotate(keys, offset, inv_freq):
        if len(filled) == 1:
            gate.wait(5)  # layer 1 is held back until the test lets it go
        filled.append(1)
        return real_rotate(keys, offset, inv_freq)

    adapter.rotate_keys = slow_rotate
    try:
        cache, loader = adapter.assemble_streamed([part], model.inv_freq, cfg.num_hidden_layers, 4, model.device,
                                                  model.dtype)
        first = cache.layers[0]
        first.ready.wait()  # layer 0 is there while layer 1 still waits
        assert not cache.layers[1].ready.done.is_set()
        assert torch.equal(first.keys[0], part[0, 0]) and torch.equal(first.values[0], part[0, 1])
        gate.set()
        loader.join()
        assert all(layer.ready.done.is_set() for layer in cache.layers)
        assert torch.equal(cache.layers[1].values[0], part[1, 1])
    finally:
        adapter.rotate_keys = real_rotate


@pytest.mark.parametrize("mode", ["none", "doc", "doc-query", "rag"])
def test_static_decoding_gives_the_same_tokens(rc, mode):
    """The fixed-shape decode loop (which a GPU captures in a CUDA graph) against the growing one."""
    plain = rc.ask(QUESTION, mode=mode, top_k=2, max_new_tokens=10, ignore_eos=True)
    rc.static_decode = True
    try:
        static = rc.ask(QUESTION, mode=mode, top_k=2, max_new_tokens=10, ignore_eos=True)
        sampled = [rc.ask(QUESTION, mode=mode, top_k=2, max_new_tokens=6, temperature=1.0, seed=3,
                          ignore_eos=True).token_ids for _ in range(2)]
    finally:
        rc.static_decode = False
    assert static.token_ids == plain.token_ids
    assert sampled[0] == sampled[1] == rc.ask(QUESTION, mode=mode, top_k=2, max_new_tokens=6, temperature=1.0,
                                              seed=3, ignore_eos=True).token_ids
