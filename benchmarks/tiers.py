"""What each place a chunk cache can live in costs to read, and a question's TTFT from each.

One corpus of documents (N tokens each) is indexed twice with the same model: into a plain local
index (LMDB) and into one whose caches live in an S3-compatible object store. Then, for the same
`doc`-mode question, the median TTFT and the KV load time when the chunks come from:

  host memory (the host tier) | the local LMDB store (warm page cache) | the local disk cache in
  front of the object store | the object store itself (no local copy)

and the raw read throughput of each (KV bytes per second of load time). The target printed: a
question whose chunks are all in the local disk cache costs at most 1.1x the same question on a
plain local index.

Without --kv-store the object store is moto's server on loopback (pip install 'moto[server]'):
that is a floor for the protocol's cost on this machine, not a figure for a real S3, whose latency
and bandwidth are the network's. With --kv-store s3://bucket/prefix (and the AWS settings in the
environment) a real store is measured.

    python benchmarks/tiers.py --shape cpu-small --tokens 1000 --runs 10
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from latency import add_model_args, model_dir, text_of
from ragcache import GritModel, RagCache


def moto_store() -> tuple[str, object]:
    """A bucket on moto's S3 server on loopback, and the server to stop."""
    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3").create_bucket(Bucket="bench")
    return "s3://bench/kv", server


def timed_asks(rc: RagCache, question: str, k: int, runs: int, before=None) -> dict:
    """Median TTFT and KV load (ms) of `runs` doc-mode asks; `before()` runs ahead of each (to empty a tier)."""
    ttft, load, served = [], [], set()
    for _ in range(runs):
        if before is not None:
            before()
        a = rc.ask(question, mode="doc", top_k=k, max_new_tokens=1)
        ttft.append(a.timings_ms["ttft"])
        load.append(a.timings_ms["kv_load"])
        served |= set(a.kv_served_by.values())
    return {"ttft_ms": statistics.median(ttft), "kv_load_ms": statistics.median(load), "served_by": sorted(served)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=1000, help="tokens per document")
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("-k", "--top-k", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--kv-store", help="a real s3:// store to measure instead of moto on loopback")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["RAGCACHE_HOME"] = str(tmp / "home")  # the local disk cache goes under it
        server = None
        url = args.kv_store
        if url is None:
            url, server = moto_store()
        model = GritModel.load(str(model_dir(args, tmp)), device="cpu", dtype="float32")
        corpus = tmp / "corpus"
        corpus.mkdir()
        for i in range(args.docs):
            (corpus / f"doc{i}.txt").write_text(text_of(model, args.tokens, seed=i))
        question = "Which river runs north of the early modern city?"
        kv_mb = args.top_k * args.tokens * model.kv_bytes_per_token / 1e6
        print(f"{model}, {args.docs} documents of {args.tokens} tokens, top {args.top_k}: {kv_mb:.1f} MB of KV "
              f"a question; object store {'moto on loopback' if server else url}", flush=True)
        rows = {}
        try:
            with RagCache.open(tmp / "local", model=model) as rc:
                rc.index([corpus], chunk_tokens=args.tokens + 64)
                rc.cost.recompute_is_faster = lambda *a: False  # measure reads, never the recompute shortcut
                rows["local LMDB store (page cache warm)"] = timed_asks(rc, question, args.top_k, args.runs)
                rc.use_tiers(0, 64)
                rows["host memory tier"] = timed_asks(rc, question, args.top_k, args.runs)
            with RagCache.open(tmp / "remote", model=model) as rc:
                rc.index([corpus], chunk_tokens=args.tokens + 64, kv_store=url)
                rc.cost.recompute_is_faster = lambda *a: False
                rc.use_tiers(0, 0, local_gb=0)
                rows["object store, no local copy"] = timed_asks(rc, question, args.top_k, args.runs)
                rc.use_tiers(0, 0, local_gb=4)
                rc.ask(question, mode="doc", top_k=args.top_k, max_new_tokens=1)  # fills the disk cache
                rows["local disk cache (object store behind)"] = timed_asks(rc, question, args.top_k, args.runs)
        finally:
            if server is not None:
                server.stop()

    print("\n| where the chunks' KV is | TTFT ms (median) | KV load ms (median) | KV read MB/s | served by |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, r in rows.items():
        rate = kv_mb / (r["kv_load_ms"] / 1000) if r["kv_load_ms"] > 0 else float("inf")
        print(f"| {name} | {r['ttft_ms']:.1f} | {r['kv_load_ms']:.1f} | {rate:.0f} | {', '.join(r['served_by'])} |")
    ratio = rows["local disk cache (object store behind)"]["ttft_ms"] / rows["local LMDB store (page cache warm)"]["ttft_ms"]
    print(f"\n{'PASS' if ratio <= 1.1 else 'FAIL'}  TTFT from the local disk cache / from a plain local index: "
          f"{ratio:.2f}x (target <= 1.1x)")
    print(f"measured {datetime.now(timezone.utc):%Y-%m-%d} on {os.cpu_count()} CPU cores; argv: {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
