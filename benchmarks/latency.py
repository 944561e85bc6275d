"""The GRIT paper's Table 7, rerun: latency of every mode, with caches read from a real index on disk.

Sample A: a 1-token question and an N-token document. Sample B: an N-token question and a 1-token
document. The realistic case (not in --quick): a 20-token question and the top 3 of 500-token
documents. Each row answers through `RagCache.ask` (the code path of `ragcache ask`) with 16 tokens
forced (EOS ignored); the end-to-end time runs from the question to the last token, embedding,
retrieval and cache loading included. The `two-model rag` row is the traditional pipeline: a separate
sentence-transformers encoder (`--embedder`, else random weights of all-MiniLM-L6-v2's shape) embeds the
question for an index built with it, and the generator reads the document afresh (rag, doc first).

    python benchmarks/latency.py --shape cpu-small --quick
    python benchmarks/latency.py --shape gritlm-7b --device cuda --dtype bfloat16 --runs 20
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, MistralConfig, MistralForCausalLM

from ragcache import GritModel, RagCache
from ragcache.embedder import Embedder

HERE = Path(__file__).resolve().parent
SHARED_TOKENIZER = HERE.parent.parent / "shared" / "tokenizers" / "mistral-7b-v0.1"
SHAPES = {  # Mistral-family configurations; latency does not depend on weight values
    "gritlm-7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=32000),
    "cpu-small": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                      intermediate_size=2048, vocab_size=32000),
}
TWO_MODEL = "two-model rag"  # answered from an index that a separate embedder built
ROWS = [("none", {}), ("rag query-first", {"mode": "rag", "order": "query-first"}),
        ("rag doc-first", {"mode": "rag", "order": "doc-first"}), ("query", {}), ("doc", {}),
        ("query-doc", {}), ("doc-query", {}), (TWO_MODEL, {"mode": "rag", "order": "doc-first"})]
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    max_position_embeddings=512)
WORDS = ("the river city capital north water report history science music light house early modern field "
         "garden story people region market valley table number system energy school letter").split()


def build_shape(name: str, tokenizer_dir: Path, out: Path) -> Path:
    if not tokenizer_dir.is_dir():
        sys.exit(f"error: --shape needs a tokenizer; no folder at '{tokenizer_dir}' (pass --tokenizer PATH)")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = MistralConfig(**SHAPES[name], max_position_embeddings=32768, sliding_window=None,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_embedder(tokenizer_dir: Path, out: Path) -> Path:
    """A sentence-transformers folder with random weights of all-MiniLM-L6-v2's shape (mean pooling, 256 tokens)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), **MINILM_SHAPE)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 384,
                                                               "pooling_mode_mean_tokens": True}))
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model or --shape, and --tokenizer: the model flags every benchmark takes."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local model directory")
    src.add_argument("--shape", choices=sorted(SHAPES), help="random weights of a named configuration (default cpu-small)")
    p.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER, help="tokenizer folder for --shape")


def model_dir(args: argparse.Namespace, workdir: Path) -> Path:
    """The --model folder, or a --shape built with random weights under workdir."""
    return Path(args.model) if args.model else build_shape(args.shape or "cpu-small", args.tokenizer, workdir / "model")


def text_of(model: GritModel, n_tokens: int, seed: int) -> str:
    """Plain words whose tokens number exactly n_tokens (as the text tokenises alone)."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(n_tokens + 8))
    ids = model.tokenize(words)
    text = model.tokenizer.decode(ids[:n_tokens])
    while len(model.tokenize(text)) > n_tokens:
        text = text.rsplit(" ", 1)[0]
    return text


def measure(rc: RagCache, question: str, rows, top_k: int, runs: int, warmup: int, tokens: int) -> dict:
    """Every row once per round, round after round: a slow spell on a shared machine hits all rows alike."""
    times = {label: {"ttft_ms": [], "e2e_ms": []} for label, _ in rows}
    for i in range(warmup + runs):
        for label, kwargs in rows:
            answer = rc.ask(question, top_k=top_k, max_new_tokens=tokens, ignore_eos=True, **(kwargs or {"mode": label}))
            assert len(answer.token_ids) == tokens
            if i >= warmup:
                times[label]["ttft_ms"].append(answer.timings_ms["ttft"])
                times[label]["e2e_ms"].append(answer.timings_ms["total"])
    def stats(xs):
        return {"median": statistics.median(xs), "mean": statistics.fmean(xs),
                "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "min": min(xs), "runs": xs}
    return {label: {key: stats(xs) for key, xs in row.items()} for label, row in times.items()}


def sample_texts(model: GritModel, sample: str, n: int) -> tuple[str, list[str]]:
    """The question and documents of a sample: A and B as in the paper, R the realistic case."""
    if sample == "A":  # a 1-token question, an N-token document
        return text_of(model, 1, seed=n + 1), [text_of(model, n, seed=n)]
    if sample == "B":  # an N-token question, a 1-token document
        return text_of(model, n, seed=n + 1), [text_of(model, 1, seed=n)]
    return text_of(model, 20, seed=1), [text_of(model, 500, seed=10 + i) for i in range(3)]  # top-3 of 500


def run_sample(model: GritModel, embedder: Embedder | None, key: str, question: str, docs: list[str], rows,
               runs: int, warmup: int, tokens: int, workdir: Path, kv_codec: str | None = None) -> dict:
    folder = workdir / key / "corpus"
    folder.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(doc)
    chunk_tokens = max(max(len(model.tokenize(d)) for d in docs) + 16, 32)  # one chunk per document
    results = {}
    for two_model in (False, True):
        mine = [(label, kwargs) for label, kwargs in rows if (label == TWO_MODEL) == two_model]
        if not mine:
            continue
        index = workdir / key / ("index-two-model" if two_model else "index")
        with RagCache.open(index, model=model, embedder=embedder if two_model else None) as rc:
            rc.index([folder], chunk_tokens=chunk_tokens, kv_codec=kv_codec)
            assert rc.store.count() == len(docs)
            results |= measure(rc, question, mine, len(docs), runs, warmup, tokens)
            for label, _ in mine:
                print(f"  {key:<6} {label:<16} ttft {results[label]['ttft_ms']['median']:9.1f} ms   "
                      f"16-token e2e {results[label]['e2e_ms']['median']:9.1f} ms", flush=True)
    return results


def targets(result: dict, n: int) -> list[tuple[str, float, float, bool]]:
    """(name, measured, bound, pass) for the CPU targets of the benchmark issue, on sample A at n."""
    a = result[f"A{n}"]
    med = lambda row, key: a[row][key]["median"]
    out = []
    for mode in ("doc", "query-doc", "doc-query"):
        speedup = med("rag doc-first", "ttft_ms") / med(mode, "ttft_ms")
        out.append((f"{mode} TTFT speed-up over rag doc-first (N={n})", speedup, 30.0, speedup >= 30.0))
        ratio = med(mode, "e2e_ms") / med("none", "e2e_ms")
        out.append((f"{mode} 16-token e2e / none (N={n})", ratio, 1.25, ratio <= 1.25))
    return out


def markdown(results: dict, lengths: list[int], samples: list[str]) -> str:
    lines = []
    for sample in samples:
        for key, title in (("ttft_ms", "time to first token"), ("e2e_ms", "16 tokens end to end")):
            lines.append(f"\n**Sample {sample}, {title}, median ms**\n")
            lines.append("| mode | " + " | ".join(f"N={n}" for n in lengths) + " |")
            lines.append("| --- |" + " ---: |" * len(lengths))
            for label, _ in ROWS:
                if label in results[f"{sample}{lengths[0]}"]:
                    cells = [f"{results[f'{sample}{n}'][label][key]['median']:.1f}" for n in lengths]
                    lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "R" in results:
        lines.append("\n**Realistic: a 20-token question, the top 3 of 500-token documents, median ms**\n")
        lines.append("| mode | TTFT | 16 tokens end to end |\n| --- | ---: | ---: |")
        for label, row in results["R"].items():
            lines.append(f"| {label} | {row['ttft_ms']['median']:.1f} | {row['e2e_ms']['median']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, lengths: list[int], samples: list[str], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(samples), figsize=(6 * len(samples), 4), squeeze=False)
    for ax, sample in zip(axes[0], samples):
        for label, _ in ROWS:
            if label in results[f"{sample}{lengths[0]}"]:
                ax.plot(lengths, [results[f"{sample}{n}"][label]["e2e_ms"]["median"] for n in lengths], marker="o", label=label)
        ax.set(title=f"Sample {sample}: 16 tokens end to end", xlabel="N (tokens)", ylabel="median ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--embedder", type=Path, help="sentence-transformers folder for the two-model row "
                   "(default: random weights of all-MiniLM-L6-v2's shape)")
    p.add_argument("--lengths", default="250,500,1000,2000,4000")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quick", action="store_true", help="sample A at N=2000, the target rows, 5 runs")
    p.add_argument("--kv-codec", help="how the indexes store their caches (default: ragcache's default)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()
    lengths = [2000] if args.quick else [int(x) for x in args.lengths.split(",")]
    samples = ["A"] if args.quick else ["A", "B"]
    quick_rows = ("none", "rag doc-first", "doc", "query-doc", "doc-query")
    rows = [r for r in ROWS if r[0] in quick_rows] if args.quick else ROWS
    runs, warmup = (5, 1) if args.quick else (args.runs, args.warmup)
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = model_dir(args, tmp)
        model = GritModel.load(str(folder), device=args.device, dtype=args.dtype)
        embedder = None  # built only when the two-model row runs (not in --quick)
        if any(label == TWO_MODEL for label, _ in rows):
            embedder = Embedder.load(args.embedder or build_embedder(folder, tmp / "embedder"), device=str(model.device))
        print(f"{model} on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
        results = {}
        for sample in samples:
            for n in lengths:
                question, docs = sample_texts(model, sample, n)
                results[f"{sample}{n}"] = run_sample(model, embedder, f"{sample}{n}", question, docs, rows, runs,
                                                     warmup, args.tokens, tmp, args.kv_codec)
        if not args.quick:
            question, docs = sample_texts(model, "R", 0)
            results["R"] = run_sample(model, embedder, "R", question, docs, rows, runs, warmup, args.tokens, tmp,
                                      args.kv_codec)

    checks = targets(results, 2000) if "A2000" in results and str(model.device) == "cpu" else []
    for name, value, bound, ok in checks:
        op = ">=" if "speed-up" in name else "<="
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f} (target {op} {bound})")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {"model": model.name, "shape": args.shape, "embedder": str(args.embedder or "random all-MiniLM-L6-v2 shape"),
            "device": str(model.device), "dtype": str(model.dtype),
            "threads": torch.get_num_threads(), "date": stamp, "argv": sys.argv, "runs": runs, "warmup": warmup}
    (args.out / f"latency-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results,
                                                              "targets": checks}, indent=1))
    table = markdown(results, lengths, samples)
    (args.out / f"latency-{stamp}.md").write_text(f"{json.dumps(meta)}\n{table}\n")
    plot(results, lengths, samples, args.out / f"latency-{stamp}.png")
    print(table)


if __name__ == "__main__":
    main()
