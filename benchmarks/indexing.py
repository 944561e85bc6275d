"""Indexing throughput, tokens per second, three ways over the same chunks.

- index:    `ragcache index` itself (chunking, the embedding pass, KV serialisation, LMDB writes).
- floor:    the embedding forward pass alone over the same chunks, nothing kept or stored.
- two-pass: an embedding pass plus a separate causal pass for the KV, stored the same way
            (`ragcache index --kv-attention causal`), the naive way to get a generation cache.
- ray N:    with --ray, `ragcache index --ray local --workers N` for N = 1 and 2 on a local Ray
            cluster started for the run (worker start-up and model loading included, as a user
            pays them): on one machine it measures Ray's overhead, on a multi-GPU one the scaling.

    python benchmarks/indexing.py --shape cpu-small
    python benchmarks/indexing.py --shape cpu-small --ray --docs 96
    python benchmarks/indexing.py --shape gritlm-7b --device cuda --dtype bfloat16 --docs 256
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from latency import add_model_args, model_dir, text_of
from ragcache import GritModel, RagCache, prompts

SCIFACT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "scifact" / "corpus.jsonl"


def write_corpus(model: GritModel, docs: int, path: Path, files: int = 1) -> str:
    """SciFact abstracts when ../shared has them, else plain words; `files` JSONL files in folder `path`
    (Ray spreads files over its workers)."""
    if SCIFACT.is_file():
        with SCIFACT.open() as f:
            lines = [next(f) for _ in range(docs)]
        source = "SciFact abstracts"
    else:
        lines = [json.dumps({"_id": str(i), "text": text_of(model, 300, seed=i)}) + "\n" for i in range(docs)]
        source = "generated text"
    path.mkdir()
    for i in range(files):
        (path / f"part{i}.jsonl").write_text("".join(lines[i::files]))
    return source


def index_rate(model: GritModel, corpus: Path, where: Path, kv_attention: str, chunk_tokens: int,
               batch_size: int, **options) -> tuple[float, list[str]]:
    """Tokens per second of a fresh `ragcache index`, and the passages it embedded."""
    with RagCache.open(where, model=model) as rc:
        stats = rc.index([corpus], chunk_tokens=chunk_tokens, kv_attention=kv_attention, show_progress=False,
                         batch_size=batch_size, **options)
        with rc.store.env.begin(db=rc.store.db["chunks"]) as txn:
            records = [json.loads(v) for _, v in txn.cursor()]
    return stats.tokens / stats.seconds, [prompts.passage(r["title"], r["text"]) for r in records]


def floor_rate(model: GritModel, passages: list[str], batch_size: int) -> float:
    t = time.perf_counter()
    encoded = model.encode(passages, kv=None, batch_size=batch_size)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(e.token_ids) for e in encoded) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--docs", type=int, default=24, help="documents to index")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ray", action="store_true", help="also index on a local Ray cluster with 1 and 2 workers")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = model_dir(args, tmp)
        model = GritModel.load(str(folder), device=args.device, dtype=args.dtype)
        corpus = tmp / "corpus"
        source = write_corpus(model, args.docs, corpus, files=8 if args.ray else 1)
        print(f"{model} on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
              f"{args.docs} {source}", flush=True)
        model.encode([text_of(model, 64, seed=0)] * args.batch_size, kv="causal")  # warm-up
        rates = {}
        rates["index"], passages = index_rate(model, corpus, tmp / "one", "bidirectional", args.chunk_tokens, args.batch_size)
        rates["floor"] = floor_rate(model, passages, args.batch_size)
        rates["two-pass"], _ = index_rate(model, corpus, tmp / "two", "causal", args.chunk_tokens, args.batch_size)
        if args.ray:
            import ray
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            for workers in (1, 2):
                rates[f"ray {workers}"], _ = index_rate(model, corpus, tmp / f"ray{workers}", "bidirectional",
                                                       args.chunk_tokens, args.batch_size, ray="local",
                                                       workers=workers)
            ray.shutdown()

    for name, rate in rates.items():
        print(f"  {name:<9} {rate:10,.0f} tokens/s")
    gpu = model.device.type == "cuda"
    checks = [("index / floor", rates["index"] / rates["floor"], 0.8 if gpu else 0.85, ">="),
              ("index / two-pass", rates["index"] / rates["two-pass"], None if gpu else 1.6, ">=")]
    if args.ray:
        checks += [("ray 1 worker / index", rates["ray 1"] / rates["index"], 0.85, ">="),
                   ("ray 2 workers / index", rates["ray 2"] / rates["index"], None, ">=")]
    for name, value, bound, op in checks:
        verdict = "" if bound is None else ("PASS  " if value >= bound else "FAIL  ")
        print(f"{verdict}{name}: {value:.2f}" + ("" if bound is None else f" (target {op} {bound})"))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {"model": model.name, "shape": args.shape, "device": str(model.device), "dtype": str(model.dtype),
            "threads": torch.get_num_threads(), "date": stamp, "argv": sys.argv, "passages": len(passages)}
    (args.out / f"indexing-{stamp}.json").write_text(json.dumps({"meta": meta, "tokens_per_s": rates}, indent=1))


if __name__ == "__main__":
    main()
