"""What the stored KV costs on disk and to load: bytes per token, compression, throughput, projection.

For each dtype: the KV of real text is serialised with every codec the store knows (raw; zstd over
byte planes; fp8, int8 and int4 quantised), timed, and a small corpus is indexed to weigh LMDB's own
overhead. Compression ratios depend on the weights: random weights (`--shape`) give a floor, a trained
model (`--model`, e.g. ../shared/models/stories260K, or a GGUF file) a realistic figure. Quantised
sizes depend only on the shape; their error (relative, keys and values apart) on the weights.

    python benchmarks/storage.py --shape cpu-small
    python benchmarks/storage.py --model ../shared/models/stories260K --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash
import zstandard
from transformers import AutoTokenizer

from latency import add_model_args, model_dir, text_of
from ragcache import GritModel, RagCache
from ragcache import kv as kvlib
from ragcache import quant

SQUAD = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "squad-v2-sample" / "dev-first5articles.json"
GRITLM_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # layers x (k, v) x kv_heads x head_dim x bf16 = 128 KiB
BEIR_NQ_PASSAGES = 2_681_468


def timed(fn, runs: int = 5) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def codecs(kv: torch.Tensor) -> dict:
    """Size, speed and error of each codec on one segment's KV; MB/s count the KV's own bytes."""
    raw, itemsize = kv.contiguous().view(torch.uint8).numpy(), kv.element_size()
    tokens, mb = kv.shape[3], raw.nbytes / 1e6
    out = {"tokens": tokens, "raw_bytes_per_token": raw.nbytes / tokens}
    for level in (1, 3):
        compress = lambda: zstandard.ZstdCompressor(level=level).compress(kvlib._planes(raw, itemsize))
        packed = compress()
        c = timed(compress)
        d = timed(lambda: kvlib._unplanes(zstandard.ZstdDecompressor().decompress(packed), itemsize))
        out[f"zstd{level}"] = {"ratio": raw.nbytes / len(packed), "compress_MBps": mb / c, "decompress_MBps": mb / d}
    plain = zstandard.ZstdCompressor(level=1).compress(raw.tobytes())
    out["zstd1_interleaved_ratio"] = raw.nbytes / len(plain)
    blob = kvlib.serialize(kv)
    out["stored_codec"] = "zstd" if kvlib.header(blob).codec == kvlib.ZSTD_PLANES else "raw"
    out["stored_bytes_per_token"] = len(blob) / tokens
    out["xxh3_MBps"] = mb / timed(lambda: xxhash.xxh3_64_intdigest(raw))
    bf16_bytes = kv.numel() * 2
    for name, codec in kvlib.CODECS.items():
        blob = kvlib.serialize(kv, codec)
        view = memoryview(blob)
        back = kvlib.deserialize(view).float()
        error = {part: float((back[:, i] - kv[:, i].float()).norm() / kv[:, i].float().norm())
                 for i, part in enumerate(("keys", "values"))}
        out[name] = {"bytes_per_token": len(blob) / tokens, "ratio_to_bf16": len(blob) / bf16_bytes,
                     "encode_MBps": mb / timed(lambda: kvlib.serialize(kv, codec)),
                     # raw: checksum and the one copy out of the map that loading makes
                     "decode_MBps": mb / timed(lambda: kvlib.deserialize(view).clone() if codec == kvlib.RAW
                                               else kvlib.deserialize(view)),
                     "relative_error": error}
    return out


def projected_bytes(name: str, tokens: int, zstd_ratio: float) -> float:
    """Bytes of one passage's blob with GritLM-7B's shape in bfloat16 (the header included)."""
    shape = (32, 2, 8, tokens, 128)
    if name in ("raw", "zstd"):
        return 32 + tokens * GRITLM_BYTES_PER_TOKEN / (zstd_ratio if name == "zstd" else 1.0)
    return 32 + quant.payload_size(quant.DEFAULTS[name], shape, torch.bfloat16)


def lmdb_overhead(model: GritModel, texts: list[str], workdir: Path) -> dict:
    """Index `texts` and compare the LMDB file with the sum of its KV blobs."""
    workdir.mkdir(parents=True)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    with RagCache.open(workdir / "index", model=model) as rc:
        stats = rc.index([corpus], show_progress=False)
        with rc.store.env.begin(db=rc.store.db["kv"]) as txn:
            blobs = sum(len(v) for _, v in txn.cursor())
        rc.store.env.sync(True)
    disk = (workdir / "index" / "data.mdb").stat().st_blocks * 512  # allocated, not the sparse size
    return {"chunks": stats.chunks, "tokens": stats.tokens, "kv_blob_bytes": blobs, "data_mdb_bytes": disk,
            "disk_bytes_per_token": disk / stats.tokens, "overhead": disk / blobs - 1}


def squad_tokens_per_100_words(tokenizer_dir: Path) -> float | None:
    """Mistral tokens (GritLM-7B's) in a 100-word Wikipedia passage (DPR's unit, BEIR-NQ's), from the SQuAD sample."""
    if not SQUAD.is_file() or not tokenizer_dir.is_dir():
        return None
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    paras = [p["context"] for a in json.loads(SQUAD.read_text())["data"] for p in a["paragraphs"]]
    words = sum(len(p.split()) for p in paras)
    return 100 * sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in paras) / words


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--tokens", type=int, default=1000, help="tokens in the measured segment")
    p.add_argument("--passages", type=int, default=BEIR_NQ_PASSAGES, help="corpus size to project")
    p.add_argument("--threads", type=int, help="torch CPU threads (on a shared machine 1 keeps others' load "
                   "from stalling every parallel step)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = model_dir(args, tmp)
        for dtype in args.dtypes.split(","):
            model = GritModel.load(str(folder), device="cpu", dtype=dtype)
            n = min(args.tokens, model.max_context - 16)
            kv = model.encode([text_of(model, n, seed=1)], kv="bidirectional")[0].kv
            texts = [text_of(model, 200, seed=s) for s in range(16)]
            report[dtype] = {"codecs": codecs(kv), "lmdb": lmdb_overhead(model, texts, tmp / dtype)}
        per_100 = squad_tokens_per_100_words(args.tokenizer)

    print(f"model: {args.model or args.shape or 'cpu-small'}")
    for dtype, r in report.items():
        c, l = r["codecs"], r["lmdb"]
        print(f"\n{dtype}: raw {c['raw_bytes_per_token']:,.0f} B/token; stored as {c['stored_codec']}, "
              f"{c['stored_bytes_per_token']:,.0f} B/token; on disk with LMDB {l['disk_bytes_per_token']:,.0f} B/token "
              f"(LMDB overhead {100 * l['overhead']:+.1f}% over the blobs)")
        for level in (1, 3):
            z = c[f"zstd{level}"]
            print(f"  zstd {level} over byte planes: {z['ratio']:.2f}x, compress {z['compress_MBps']:,.0f} MB/s, "
                  f"decompress {z['decompress_MBps']:,.0f} MB/s")
        print(f"  zstd 1 on interleaved bytes: {c['zstd1_interleaved_ratio']:.2f}x; xxh3 {c['xxh3_MBps']:,.0f} MB/s")
        print(f"  {'codec':6s} {'B/token':>9s} {'x bf16':>7s} {'encode MB/s':>12s} {'decode MB/s':>12s} "
              f"{'key err':>8s} {'value err':>9s}")
        for name in kvlib.CODECS:
            k = c[name]
            print(f"  {name:6s} {k['bytes_per_token']:9,.0f} {k['ratio_to_bf16']:7.3f} {k['encode_MBps']:12,.0f} "
                  f"{k['decode_MBps']:12,.0f} {k['relative_error']['keys']:8.4f} {k['relative_error']['values']:9.4f}")
    if per_100:
        tokens = math.ceil(per_100) + 8  # + the embedding prompt (<s><|embed|>\n) and a short title
        ratio = max(report.get("bfloat16", next(iter(report.values())))["codecs"]["zstd1"]["ratio"], 1.0)
        print(f"\nprojection: BEIR-NQ, {args.passages:,} passages x {tokens} tokens (100 words = {per_100:.0f} "
              f"Mistral tokens on the SQuAD sample, + prompt and title), GritLM-7B's shape in bfloat16 "
              f"(32 layers x 8 KV heads x head_dim 128 = 128 KiB/token); the GRIT paper: 30 TB")
        for name in kvlib.CODECS:
            total = args.passages * projected_bytes(name, tokens, ratio)
            note = f" (at the {ratio:.2f}x measured above)" if name == "zstd" else ""
            print(f"  {name:6s} {total / args.passages / tokens / 1024:6.1f} KiB/token  {total / 1e12:5.1f} TB{note}")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "storage.json").write_text(json.dumps({"argv": sys.argv, "threads": torch.get_num_threads(),
                                                  "report": report, "tokens_per_100_words": per_100}, indent=1))


if __name__ == "__main__":
    main()
