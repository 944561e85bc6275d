"""Evaluation metrics as pure functions: retrieval (BEIR's, with trec_eval's conventions) and QA answers.

Retrieval. A run is {doc_id: score} for one query and qrels are {doc_id: grade}. A document is relevant
when its grade is at least 1 and its gain is its grade (negative grades gain nothing). The run is
ranked as trec_eval ranks it, so ties come out as pytrec_eval gives them: score descending, then doc id
descending (as strings). MAP@k and recall@k divide by all relevant documents of the query, not by k;
nDCG@k uses linear gains and log2(rank + 1) discounts; MRR@k is BEIR's: 1 / rank of the first
relevant document within k. A query with no relevant document scores 0 on every metric.

Answers. The SQuAD normalisation (lowercase, no ASCII punctuation, no articles, collapsed whitespace),
and the GRIT paper's reference scoring (rag/tasks/evaluation.py in ContextualAI/gritlm): exact match,
Match (the normalised gold answer is a substring of the normalised prediction) and token F1. Over
several gold answers a question keeps the best (EM, Match, F1) triple, compared in that order.

Comparing two ways of answering the same questions. Their Match scores differ by single questions, so
`paired` counts the questions each side matches that the other misses and gives a 95% interval for the
difference (normal approximation over the per-question differences): what the questions asked can tell
apart, which the two scores alone do not say.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass

RECALL_KS = (1, 5, 10, 100)
CUTOFF = 10  # the k of nDCG, MAP and MRR
RETRIEVAL_NAMES = (f"ndcg@{CUTOFF}", f"map@{CUTOFF}", f"mrr@{CUTOFF}") + tuple(f"recall@{k}" for k in RECALL_KS)
QA_NAMES = ("em", "match", "f1")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# ---- retrieval ---------------------------------------------------------------------------------
def rank(run: dict[str, float]) -> list[str]:
    """Doc ids best first: score descending, ties by doc id descending (trec_eval's order)."""
    return [doc for doc, _ in sorted(run.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def _relevant(qrels: dict[str, int]) -> set[str]:
    return {doc for doc, grade in qrels.items() if grade >= 1}


def ndcg_at(ranked: list[str], qrels: dict[str, int], k: int) -> float:
    dcg = sum(max(qrels.get(doc, 0), 0) / math.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in qrels.values() if g >= 1), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def map_at(ranked: list[str], qrels: dict[str, int], k: int) -> float:
    relevant = _relevant(qrels)
    hits, total = 0, 0.0
    for i, doc in enumerate(ranked[:k]):
        if doc in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / len(relevant) if relevant else 0.0


def mrr_at(ranked: list[str], qrels: dict[str, int], k: int) -> float:
    relevant = _relevant(qrels)
    return next((1.0 / (i + 1) for i, doc in enumerate(ranked[:k]) if doc in relevant), 0.0)


def recall_at(ranked: list[str], qrels: dict[str, int], k: int) -> float:
    relevant = _relevant(qrels)
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def retrieval_scores(run: dict[str, float], qrels: dict[str, int]) -> dict[str, float]:
    """Every reported retrieval metric of one query, keyed as in RETRIEVAL_NAMES."""
    ranked = rank(run)
    scores = {f"ndcg@{CUTOFF}": ndcg_at(ranked, qrels, CUTOFF), f"map@{CUTOFF}": map_at(ranked, qrels, CUTOFF),
              f"mrr@{CUTOFF}": mrr_at(ranked, qrels, CUTOFF)}
    return scores | {f"recall@{k}": recall_at(ranked, qrels, k) for k in RECALL_KS}


# ---- answers -----------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def match(prediction: str, gold: str) -> float:
    return float(normalize_answer(gold) in normalize_answer(prediction))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    """EM, Match and F1 against the gold answer whose (EM, Match, F1) is best, as the reference does."""
    best = max((exact_match(prediction, g), match(prediction, g), f1(prediction, g)) for g in golds)
    return dict(zip(QA_NAMES, best))


@dataclass(frozen=True)
class Paired:
    """`hits` against `reference` on the same questions; the difference and its interval in points."""

    lost: int  # questions reference matches and hits misses
    gained: int  # questions hits matches and reference misses
    difference: float  # Match of hits minus Match of reference
    low: float | None  # the 95% interval of the difference; None from a single question
    high: float | None

    def __str__(self) -> str:
        interval = "one question" if self.low is None else f"{self.low:+.1f} to {self.high:+.1f}"
        return f"{self.difference:+.1f} ({interval})"


def paired(reference: list[bool], hits: list[bool]) -> Paired:
    """Match of `hits` against `reference`, question by question (both in the same question order)."""
    if len(reference) != len(hits) or not hits:
        raise ValueError(f"paired needs the same questions on both sides (got {len(reference)} and {len(hits)})")
    lost = sum(r and not h for r, h in zip(reference, hits))
    gained = sum(h and not r for r, h in zip(reference, hits))
    n = len(hits)
    mean = (gained - lost) / n  # the per-question differences are -1, 0 or 1
    if n == 1:
        return Paired(lost, gained, 100 * mean, None, None)
    spread = 1.96 * math.sqrt((lost + gained - n * mean * mean) / (n - 1) / n)
    return Paired(lost, gained, 100 * mean, 100 * (mean - spread), 100 * (mean + spread))
