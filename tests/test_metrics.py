"""Retrieval and answer metrics against hand-computed cases, and against pytrec_eval where it is installed."""

import math
import random
import statistics

import pytest

from ragcache import metrics
from ragcache.metrics import normalize_answer, qa_scores, rank, retrieval_scores


def approx(x):
    return pytest.approx(x, abs=1e-9)


def test_graded_query_by_hand():
    qrels = {"d1": 2, "d2": 1, "d3": 0, "d9": 1}  # three relevant; d9 is never retrieved
    run = {"d1": 0.9, "d3": 0.8, "d2": 0.7, "d4": 0.6}
    s = retrieval_scores(run, qrels)
    dcg = 2 / math.log2(2) + 1 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert s["ndcg@10"] == approx(dcg / idcg)
    assert s["map@10"] == approx((1 / 1 + 2 / 3) / 3)  # divided by all 3 relevant, not by the 2 retrieved
    assert s["mrr@10"] == approx(1.0)
    assert (s["recall@1"], s["recall@5"], s["recall@10"], s["recall@100"]) == (approx(1 / 3), approx(2 / 3),
                                                                              approx(2 / 3), approx(2 / 3))


def test_ties_break_by_doc_id_descending():
    assert rank({"a": 0.5, "b": 0.5, "c": 0.9}) == ["c", "b", "a"]
    s = retrieval_scores({"a": 0.5, "b": 0.5}, {"a": 1})  # the relevant 'a' ranks second
    assert s["mrr@10"] == approx(0.5)
    assert s["ndcg@10"] == approx(1 / math.log2(3))
    assert s["map@10"] == approx(0.5)
    assert s["recall@1"] == 0.0 and s["recall@5"] == 1.0
    # ids compare as strings, as trec_eval compares them: '9' > '10'
    assert rank({"10": 1.0, "9": 1.0}) == ["9", "10"]
    assert retrieval_scores({"10": 1.0, "9": 1.0}, {"10": 1})["mrr@10"] == approx(0.5)


def test_queries_without_a_relevant_hit_score_zero():
    assert set(retrieval_scores({"a": 0.9, "b": 0.8}, {"x": 1}).values()) == {0.0}
    assert set(retrieval_scores({"a": 0.9}, {"a": 0}).values()) == {0.0}  # judged, but nothing relevant
    assert set(retrieval_scores({}, {"a": 1}).values()) == {0.0}


def test_cutoffs_and_grades():
    relevant = {f"r{i:02d}": 1 for i in range(12)}
    run = {doc: 1.0 - i / 100 for i, doc in enumerate(relevant)}  # all twelve, best first
    s = retrieval_scores(run, relevant)
    assert s["map@10"] == approx(10 / 12) and s["recall@10"] == approx(10 / 12) and s["ndcg@10"] == approx(1.0)
    deep = {f"n{i:03d}": 1.0 - i / 1000 for i in range(49)} | {"rel": 0.1}  # relevant at rank 50
    s = retrieval_scores(deep, {"rel": 1})
    assert s["recall@10"] == 0.0 and s["recall@100"] == 1.0 and s["mrr@10"] == 0.0
    s = retrieval_scores({"a": 0.9, "b": 0.8}, {"a": -1, "b": 1})  # a negative grade gains nothing
    assert s["ndcg@10"] == approx(1 / math.log2(3)) and s["map@10"] == approx(0.5)


def test_agrees_with_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(7)
    qrels, runs = {}, {}
    for q in range(60):
        docs = [str(rng.randint(1, 400)) for _ in range(rng.randint(1, 150))]
        runs[f"q{q}"] = {d: round(rng.random(), 1) for d in docs}  # one decimal: many ties
        judged = rng.sample(docs, min(len(docs), rng.randint(1, 6))) + [str(rng.randint(401, 500))]
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2]) for d in judged}
    measures = {"ndcg_cut.10", "map_cut.10", "recall.1,5,10,100", "recip_rank"}
    reference = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(runs)
    for q, ref in reference.items():
        ours = retrieval_scores(runs[q], qrels[q])
        assert ours["ndcg@10"] == approx(ref["ndcg_cut_10"])
        assert ours["map@10"] == approx(ref["map_cut_10"])
        for k in metrics.RECALL_KS:
            assert ours[f"recall@{k}"] == approx(ref[f"recall_{k}"])
        assert ours["mrr@10"] == approx(ref["recip_rank"] if ref["recip_rank"] >= 0.1 else 0.0)


def test_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a day\n keeps") == "apple day keeps"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # articles only as whole words


def test_em_match_f1_by_hand():
    assert qa_scores("The answer is Paris.", ["Paris"]) == {"em": 0.0, "match": 1.0, "f1": approx(0.5)}
    assert qa_scores(" Paris, France", ["France", "paris france"]) == {"em": 1.0, "match": 1.0, "f1": 1.0}
    assert qa_scores("", ["Paris"]) == {"em": 0.0, "match": 0.0, "f1": 0.0}
    assert qa_scores("Lyon", ["Paris"]) == {"em": 0.0, "match": 0.0, "f1": 0.0}


def test_best_gold_is_chosen_by_em_then_match_then_f1():
    # gold 1: no match, F1 0.75; gold 2: match, F1 2/3. The reference keeps gold 2's triple whole.
    scores = qa_scores("in December 1972 UTC", ["14 December 1972 UTC", "December 1972"])
    assert scores == {"em": 0.0, "match": 1.0, "f1": approx(2 / 3)}


def test_paired_match_by_hand():
    reference = [True, True, False, False, True]
    hits = [True, False, True, True, True]  # loses question 2, gains 3 and 4
    p = metrics.paired(reference, hits)
    # per-question differences 0, -1, 1, 1, 0: mean 0.2, sample variance (3 - 5 * 0.04) / 4 = 0.7
    spread = 1.96 * math.sqrt(0.7 / 5)
    assert (p.lost, p.gained) == (1, 2) and p.difference == approx(20.0)
    assert (p.low, p.high) == (approx(100 * (0.2 - spread)), approx(100 * (0.2 + spread)))
    assert str(p) == "+20.0 (-53.3 to +93.3)"


def test_paired_agrees_with_the_per_question_differences():
    rng = random.Random(0)
    reference = [rng.random() < 0.3 for _ in range(400)]
    hits = [r if rng.random() < 0.8 else not r for r in reference]
    d = [int(h) - int(r) for r, h in zip(reference, hits)]
    mean, sd = sum(d) / len(d), statistics.stdev(d)
    p = metrics.paired(reference, hits)
    assert p.difference == approx(100 * mean)
    assert p.high - p.low == approx(2 * 100 * 1.96 * sd / math.sqrt(len(d)))


def test_paired_edge_cases():
    assert metrics.paired([True, False], [True, False]) == metrics.Paired(0, 0, 0.0, 0.0, 0.0)
    one = metrics.paired([True], [False])
    assert (one.difference, one.low, one.high) == (-100.0, None, None) and str(one) == "-100.0 (one question)"
    with pytest.raises(ValueError, match="same questions"):
        metrics.paired([True, False], [True])
