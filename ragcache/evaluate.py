"""Evaluations over an open index: retrieval on BEIR-layout data, and answers on NQ-open-style questions.

Both write one JSON line per query (or per question and mode) as they go, so a long run leaves what
it has done, and return the averages that the CLI prints as a table.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, TextIO

from . import fidelity, metrics
from .engine import RagCache
from .errors import RagcacheError

RETRIEVAL_DEPTH = 100  # documents ranked per query: recall@100 needs them all


# ---- inputs and output -------------------------------------------------------------------------
def open_out(path: Path) -> TextIO:
    """The per-query JSONL file, opened before any model loads so that a bad path fails at once."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise RagcacheError(f"cannot write '{path}': {e.strerror}") from None


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RagcacheError(f"cannot read '{path}': {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise RagcacheError(f"{path}:{n}: not valid JSON") from None
        if not isinstance(record, dict):
            raise RagcacheError(f"{path}:{n}: not a JSON object")
        yield n, record


def load_queries(path: Path) -> dict[str, str]:
    """BEIR queries.jsonl: {"_id", "text"} per line."""
    queries = {}
    for n, record in _jsonl(path):
        if "_id" not in record or not isinstance(record.get("text"), str):
            raise RagcacheError(f"{path}:{n}: a query needs '_id' and 'text'")
        queries[str(record["_id"])] = record["text"]
    return queries


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """BEIR qrels TSV: query-id, corpus-id, score; a header line is skipped."""
    qrels: dict[str, dict[str, int]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as e:
        raise RagcacheError(f"cannot read '{path}': {e}") from None
    for n, row in enumerate(rows, 1):
        if not row or (n == 1 and row[0] == "query-id"):
            continue
        try:
            qid, doc, grade = row
            qrels.setdefault(qid, {})[doc] = int(grade)
        except ValueError:
            raise RagcacheError(f"{path}:{n}: expected query-id, corpus-id and an integer score") from None
    if not qrels:
        raise RagcacheError(f"'{path}' holds no relevance judgements")
    return qrels


def load_questions(path: Path) -> list[dict]:
    """NQ-open lines: {"question": str, "answer": [str, ...]} (a single string answer is accepted too);
    or SQuAD's own JSON (data -> paragraphs -> qas), whose answerable questions are taken."""
    if Path(path).suffix.lower() == ".json":
        return _squad_questions(path)
    questions = []
    for n, record in _jsonl(path):
        answers = record.get("answer")
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(record.get("question"), str) or not answers or not all(isinstance(a, str) for a in answers):
            raise RagcacheError(f"{path}:{n}: a line needs 'question' and 'answer' (a list of strings)")
        questions.append({"question": record["question"], "answers": answers})
    if not questions:
        raise RagcacheError(f"'{path}' holds no questions")
    return questions


def _squad_questions(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        questions = [{"question": qa["question"], "answers": list(dict.fromkeys(a["text"] for a in qa["answers"]))}
                     for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]
                     if not qa.get("is_impossible") and qa["answers"]]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RagcacheError(f"cannot read '{path}': {e}") from None
    except (KeyError, TypeError):
        raise RagcacheError(f"'{path}' is not SQuAD's JSON (data -> paragraphs -> qas -> answers)") from None
    if not questions:
        raise RagcacheError(f"'{path}' holds no answerable questions")
    return questions


def squad_paragraphs(path: Path) -> list[dict]:
    """SQuAD's paragraphs as corpus records ({_id, title, text}), for `ragcache index`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [{"_id": f"{a}-{p}", "title": article["title"], "text": paragraph["context"]}
            for a, article in enumerate(data["data"]) for p, paragraph in enumerate(article["paragraphs"])]


# ---- retrieval ---------------------------------------------------------------------------------
def rank_documents(rc: RagCache, question: str, depth: int = RETRIEVAL_DEPTH) -> dict[str, float]:
    """The best `depth` documents and their scores: a document scores as its best chunk (BEIR ranks documents)."""
    k = depth
    while True:
        hits = rc.search(question, k)
        docs: dict[str, float] = {}
        for hit in hits:
            doc = rc.stored.chunk(hit.chunk_id).doc_id
            if doc not in docs:  # hits come best first, so the first chunk of a document is its best
                docs[doc] = hit.score
                if len(docs) == depth:
                    return docs
        if len(hits) < k:  # the index holds no more chunks
            return docs
        k *= 2


def retrieval(rc: RagCache, queries: dict[str, str], qrels: dict[str, dict[str, int]], out: TextIO,
              depth: int = RETRIEVAL_DEPTH, advance: Callable[[int], None] = lambda n: None) -> dict:
    """Every judged query: rank documents, score them, write a line per query to `out`; the averages."""
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise RagcacheError(f"{len(missing)} judged queries are not in the queries file (first: '{missing[0]}')")
    totals = dict.fromkeys(metrics.RETRIEVAL_NAMES, 0.0)
    for qid, judged in qrels.items():
        run = rank_documents(rc, queries[qid], depth)
        scores = metrics.retrieval_scores(run, judged)
        for name, value in scores.items():
            totals[name] += value
        out.write(json.dumps({"query_id": qid, "query": queries[qid], **scores,
                              "relevant": {d: g for d, g in judged.items() if g >= 1},
                              "ranking": [[d, round(run[d], 6)] for d in metrics.rank(run)]}) + "\n")
        advance(1)
    return {"queries": len(qrels)} | {name: total / len(qrels) for name, total in totals.items()}


def retrieval_table(result: dict) -> str:
    names = metrics.RETRIEVAL_NAMES
    return "\n".join(["| queries | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names),
                      f"| {result['queries']} | " + " | ".join(f"{100 * result[n]:.2f}" for n in names) + " |"])


# ---- answers -----------------------------------------------------------------------------------
def qa(rc: RagCache, questions: list[dict], modes: list[str], out: TextIO, top_k: int = 1, max_new_tokens: int = 16,
       order: str = "doc-first", advance: Callable[[int], None] = lambda n: None, with_fidelity: bool = False,
       chunk_order: str = "best-first", **ask_kwargs) -> list[dict]:
    """Answer every question in every mode (questions outermost, so partial runs compare fairly).

    The defaults are the GRIT paper's reference setting: the top document only, 16 new tokens, greedy.
    Returns one summary row per mode: scores in percent and latency statistics in ms; with
    `with_fidelity`, also each mode's drift from the full recompute of its layout (fidelity.py),
    teacher-forced over the first gold answer.
    """
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    for n, item in enumerate(questions):
        for mode in modes:
            ans = rc.ask(item["question"], mode=mode, top_k=top_k, order=order, max_new_tokens=max_new_tokens,
                         chunk_order=chunk_order, **ask_kwargs)
            scores = metrics.qa_scores(ans.answer, item["answers"])
            if with_fidelity:
                scores |= rc.fidelity(item["question"], mode=mode, top_k=top_k, order=order,
                                      reference=item["answers"][0], templates=ask_kwargs.get("templates"),
                                      recompute=ask_kwargs.get("recompute", 0.0), chunk_order=chunk_order).to_dict()
            rows[mode].append(scores | {"timings_ms": ans.timings_ms})
            out.write(json.dumps({"index": n, "mode": mode, "question": item["question"], "answers": item["answers"],
                                  "prediction": ans.answer, **scores,
                                  "sources": [{"rank": s.rank, "doc_id": s.doc_id, "title": s.title,
                                               "score": s.score} for s in ans.sources],
                                  "layout": [{"kind": s.kind, "tokens": len(s.token_ids), "cached": s.cached}
                                             for s in ans.layout],
                                  "timings_ms": ans.timings_ms}) + "\n")
            out.flush()
            advance(1)
    summary = [_summary(mode, rows[mode]) for mode in modes]
    if "rag" in modes:  # what caching approximates: each other mode against it, question by question
        rag = [r["match"] > 0 for r in rows["rag"]]
        for s in summary:
            if s["mode"] != "rag":
                s["vs_rag"] = asdict(metrics.paired(rag, [r["match"] > 0 for r in rows[s["mode"]]]))
    return summary


def _summary(mode: str, rows: list[dict]) -> dict:
    total = sorted(r["timings_ms"]["total"] for r in rows)
    ttft = [r["timings_ms"]["ttft"] for r in rows]
    drift = {name: statistics.fmean(r[name] for r in rows) for name in fidelity.NAMES if name in rows[0]}
    return {"mode": mode, "questions": len(rows)} | drift | {
        name: 100 * statistics.fmean(r[name] for r in rows) for name in metrics.QA_NAMES} | {
        "ttft_ms_median": statistics.median(ttft), "total_ms_median": statistics.median(total),
        "total_ms_mean": statistics.fmean(total), "total_ms_p90": total[math.ceil(0.9 * len(total)) - 1]}  # nearest rank


def qa_table(summary: list[dict]) -> str:
    drift = "kl_first" in summary[0]
    vs_rag = any("vs_rag" in s for s in summary)
    head = "| mode | questions | EM | Match | F1 |"
    head += " Match vs rag (95% interval) |" if vs_rag else ""
    head += " TTFT ms (median) | total ms (median) | total ms (mean) | total ms (p90) |"
    head += " first-token KL | first-token top-1 | answer KL | answer top-1 |" if drift else ""
    lines = [head, "| --- |" + " ---: |" * (head.count("|") - 2)]
    for s in summary:
        line = f"| {s['mode']} | {s['questions']} | {s['em']:.2f} | {s['match']:.2f} | {s['f1']:.2f} |"
        if vs_rag:
            line += f" {metrics.Paired(**s['vs_rag'])} |" if "vs_rag" in s else " |"
        line += (f" {s['ttft_ms_median']:.1f} | {s['total_ms_median']:.1f} | {s['total_ms_mean']:.1f} | "
                 f"{s['total_ms_p90']:.1f} |")
        if drift:
            line += (f" {s['kl_first']:.4f} | {100 * s['top1_first']:.1f} | {s['kl_answer']:.4f} | "
                     f"{100 * s['top1_answer']:.1f} |")
        lines.append(line)
    return "\n".join(lines)
