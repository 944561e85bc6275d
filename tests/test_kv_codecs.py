"""Indexes whose caches are stored quantised (--kv-codec fp8|int8|int4): fixed per index, shown by
info, and the cached path is exactly the one over the dequantised cache."""

import json
import math

import pytest
import torch
from conftest import damage_kv
from typer.testing import CliRunner

from ragcache import RagCache, RagcacheError
from ragcache import kv as kvlib
from ragcache.cli import app
from ragcache.store import key

QUESTION = "What is the capital of France?"
LOSSY = ["fp8", "int8", "int4"]


@pytest.fixture(scope="module", params=LOSSY)
def coded(request, tmp_path_factory, model, corpus_dir):
    rc = RagCache.open(tmp_path_factory.mktemp(f"codec-{request.param}") / "idx", model=model)
    rc.index([corpus_dir], chunk_tokens=24, kv_codec=request.param)
    yield rc
    rc.close()


def _ask(rc, **kw):
    return rc.ask(QUESTION, mode="doc", top_k=3, max_new_tokens=8, ignore_eos=True, **kw)


def test_the_codec_is_recorded_and_every_blob_carries_it(coded):
    codec = coded.meta.kv_codec
    with coded.store.snapshot() as txn:
        codes = {kvlib.header(v).codec for _, v in txn.cursor(db=coded.store.db["kv"])}
    assert codec in LOSSY and codes == {kvlib.CODECS[codec]}


def test_the_cached_path_equals_the_one_over_the_dequantised_cache(coded, tmp_path, model, corpus_dir):
    """The same index with each blob replaced by its dequantised cache stored raw answers identically."""
    with RagCache.open(tmp_path / "raw", model=model) as raw:
        raw.index([corpus_dir], chunk_tokens=24, kv_codec="raw")
        with coded.store.snapshot() as txn:
            quantised = {bytes(k): bytes(v) for k, v in txn.cursor(db=coded.store.db["kv"])}
        assert raw.store.count() == len(quantised)  # the same chunks under the same ids: one corpus, one order
        with raw.store.env.begin(write=True, db=raw.store.db["kv"]) as txn:
            for k, blob in quantised.items():
                txn.put(k, bytes(kvlib.serialize(kvlib.deserialize(blob).clone(), kvlib.RAW)))
        want = _ask(raw)
    got = _ask(coded)
    assert got.token_ids == want.token_ids
    assert (got.first_logits - want.first_logits).abs().max().item() < 1e-5
    exact = _ask(coded, recompute=1.0)  # recomputing everything gives rag's full-precision answer
    rag = coded.ask(QUESTION, mode="rag", top_k=3, max_new_tokens=8, ignore_eos=True)
    assert exact.token_ids == rag.token_ids


@pytest.mark.parametrize("how", ["flip", "truncate", "header"])
def test_a_damaged_blob_of_every_codec_is_recomputed(coded, how, capsys):
    cid = _ask(coded).sources[0].chunk_id
    with coded.store.kv_views([cid]) as (blob,):
        kept = bytes(blob)
    damage_kv(coded, cid, how)
    capsys.readouterr()
    after = _ask(coded)
    assert after.kv_served_by[cid] == "recomputed" and f"chunk {cid} is damaged" in capsys.readouterr().err
    with coded.store.env.begin(write=True, db=coded.store.db["kv"]) as txn:
        txn.put(key(cid), kept)


def test_the_codec_is_fixed_per_index(coded, corpus_dir):
    other = "int4" if coded.meta.kv_codec != "int4" else "raw"
    with pytest.raises(RagcacheError, match="stores its caches as") as e:
        coded.index([corpus_dir], kv_codec=other)
    assert e.value.param == "kv_codec"
    coded.index([corpus_dir], kv_codec=coded.meta.kv_codec)  # the same codec: fine, nothing to do


def test_cli_kv_codec_and_info(tmp_path, model_dir, corpus_dir):
    runner = CliRunner()
    sizes = {}
    for codec in ("raw", "int8", "int4"):
        idx = str(tmp_path / codec)
        result = runner.invoke(app, ["index", str(corpus_dir), "-i", idx, "-m", str(model_dir), "--chunk-tokens", "24",
                                     "--kv-codec", codec])
        assert result.exit_code == 0, result.output
        info = runner.invoke(app, ["info", "-i", idx])
        assert f"KV codec {codec}" in info.stdout and "bytes per token stored" in info.stdout
        sizes[codec] = json.loads(runner.invoke(app, ["info", "-i", idx, "--json"]).stdout)["index_info"]["kv_bytes"]
    ratio = {c: s["per_token"] / s["raw_per_token"] for c, s in sizes.items()}
    assert ratio["int4"] < ratio["int8"] < 0.5 < ratio["raw"]  # float32 caches: int8 is about a quarter
    bad = runner.invoke(app, ["index", str(corpus_dir), "-i", str(tmp_path / "x"), "-m", str(model_dir),
                              "--kv-codec", "int3"])
    assert bad.exit_code == 1 and "unknown KV codec 'int3'" in bad.output and "Traceback" not in bad.output


def test_the_host_receives_the_quantised_form(tmp_path, model, corpus_dir, monkeypatch):
    """Indexing quantises where the model computed the KV: what crosses to the host is the payload, a
    third of the cache's bytes at int4, never the cache itself (on a GPU, the device-to-host copy)."""
    crossed = []
    real = kvlib.accel.to_host
    monkeypatch.setattr(kvlib.accel, "to_host", lambda t: crossed.append(t) or real(t))
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24, kv_codec="int4")
        with rc.store.snapshot() as txn:
            blobs = [kvlib.header(v) for _, v in txn.cursor(db=rc.store.db["kv"])]
    kv_bytes = sum(math.prod(h.shape) * h.dtype.itemsize for h in blobs)
    assert len(crossed) == len(blobs) and all(t.dtype == torch.uint8 for t in crossed)
    assert sum(t.numel() for t in crossed) < 0.35 * kv_bytes
