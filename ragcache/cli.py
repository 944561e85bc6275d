"""The `ragcache` command: index, ask, serve, verify, info, eval. Errors the user can fix end as one line and exit 1."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__, config, prompts, vocab
from .corpus import MAX_FILE_MB
from .errors import RagcacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrieval-augmented generation on one GRIT model, reusing the KV caches of its embedding pass.")

ModelOpt = typer.Option(None, "-m", "--model", help="Hub id, local model directory or GGUF file (env RAGCACHE_MODEL; "
                        "default: the index's own model, else GritLM/GritLM-7B)")
IndexOpt = typer.Option(None, "-i", "--index", help="Index folder, or a name under the home (env RAGCACHE_INDEX)")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda")
DtypeOpt = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 (auto: the index's, else "
                        "bfloat16 on cuda and float32 on cpu)")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of text")
GpuCacheOpt = typer.Option(None, "--gpu-cache-gb", envvar="RAGCACHE_GPU_CACHE_GB", help="GPU memory for warm chunk "
                           "caches (LRU; default: none for ask, half the free memory for serve and eval)")
RecomputeOpt = typer.Option(0.0, "--recompute", help="Fraction (0-1) of the cached tokens to recompute with "
                            "full attention, those whose KV deviates most (CacheBlend); 1 equals rag")
ChunkOrderOpt = typer.Option("best-first", "--chunk-order", help="best-first or best-last: the top-ranked chunk "
                             "right after the head, or right before the question (sources stay listed by rank)")
LocalCacheOpt = typer.Option(None, "--local-cache-gb", envvar="RAGCACHE_LOCAL_CACHE_GB", help="Local disk for "
                             "chunk caches read from an object store (LRU under the home, kept across runs; "
                             f"default {config.DEFAULT_LOCAL_CACHE_GB:g})")
HostCacheOpt = typer.Option(None, "--host-cache-gb", envvar="RAGCACHE_HOST_CACHE_GB", help="Host memory for warm "
                            "chunk caches, pinned on a GPU machine (LRU; default: none for ask, an eighth of RAM "
                            "up to 16 for serve and eval)")


def _version(show: bool) -> None:
    if show:
        typer.echo(f"ragcache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit")) -> None:
    """Retrieval-augmented generation on one GRIT model, reusing the KV caches of its embedding pass."""


# The library names the parameter at fault; where its message does not say which flag that is
# (a mode or an order names itself), the CLI adds the flag.
FLAGS = {"model": "--model", "dtype": "--dtype", "device": "--device", "embedder": "--embedder",
         "chunk_tokens": "--chunk-tokens", "kv_attention": "--kv-attention", "layout": "--layout",
         "kv_store": "--kv-store", "ray": "--ray", "kv_codec": "--kv-codec", "vector_index": "--vector-index"}


def _errors(fn):
    """Turn the errors a user can act on into one line on stderr, naming the flag, and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RagcacheError as e:
            flag = FLAGS.get(e.param or "")
            typer.echo(f"error: {e}" + (f" [{flag}]" if flag else ""), err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _check_tier_sizes(gpu_gb: Optional[float], host_gb: Optional[float], local_gb: Optional[float]) -> None:
    for name, value in (("--gpu-cache-gb", gpu_gb), ("--host-cache-gb", host_gb), ("--local-cache-gb", local_gb)):
        if value is not None and value < 0:
            raise RagcacheError(f"{name} must be 0 or more (got {value})")


def _tiers(rc, gpu_gb: Optional[float], host_gb: Optional[float], local_gb: Optional[float],
           long_lived: bool) -> None:
    """Memory tiers in front of the store: the sizes given, else the defaults for this kind of process."""
    from .kvtiers import default_sizes
    model = rc.model
    if gpu_gb and model.device.type != "cuda":
        typer.echo("warning: the model runs on the CPU, so --gpu-cache-gb is ignored", err=True)
    gpu_default, host_default = default_sizes(model.device, long_lived, model.kv_bytes_per_token, model.max_context)
    rc.use_tiers(gpu_default if gpu_gb is None else gpu_gb, host_default if host_gb is None else host_gb,
                 config.DEFAULT_LOCAL_CACHE_GB if local_gb is None else local_gb)


def _open(index: Optional[str], model: Optional[str], device: str, dtype: str, create: bool,
          embedder: Optional[Path] = None):
    """Open an index; load the model named, else the index's own, else the default (and an embedder if named)."""
    from .embedder import Embedder
    from .engine import RagCache
    from .model import GritModel, resolve_device
    from .store import check
    _quiet_transformers()
    logging.getLogger("ragcache").setLevel(logging.INFO)  # "loading model ...": loads take seconds to minutes
    path = config.resolve_index(index)
    if model is None and not check(path, must_exist=not create):
        model = config.default_model()
    loaded_embedder = Embedder.load(embedder, device=resolve_device(device)) if embedder else None
    loaded = GritModel.load(model, device=device, dtype=dtype) if model else None
    return RagCache.open(path, model=loaded, create=create, device=device, dtype=dtype, embedder=loaded_embedder)


@app.command()
@_errors
def index(
    corpus: list[Path] = typer.Argument(..., help="Files and folders (.txt, .md, .jsonl, .json)"),
    index: Optional[str] = IndexOpt,
    model: Optional[str] = ModelOpt,
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="Maximum tokens per chunk (default 256)"),
    kv_attention: Optional[str] = typer.Option(None, "--kv-attention", help="bidirectional (one pass, as in the "
                                               "paper; default) or causal (a second pass for exact caches)"),
    prune: bool = typer.Option(True, "--prune/--no-prune", help="Remove indexed files that vanished from under CORPUS"),
    batch_size: int = typer.Option(8, "--batch-size", help="Chunks per forward pass"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Local sentence-transformers folder that "
                                            "embeds for retrieval instead of the model (the two-model baseline; "
                                            "KV attention then defaults to causal)"),
    max_file_mb: float = typer.Option(MAX_FILE_MB, "--max-file-mb", help="Skip (and count) larger files"),
    layout: Optional[str] = typer.Option(None, "--layout", help="grit (the paper's prompts) or chat (the model's "
                                         "chat template, chunks cached after a fixed preamble); default: grit "
                                         "for GRIT models, chat for others that have a chat template"),
    vector_index: Optional[str] = typer.Option(None, "--vector-index", help="flat (exact search, every vector in "
                                               "memory; default) or ivfpq (compressed codes, their shortlist "
                                               "re-ranked exactly: for millions of chunks); a new index's"),
    kv_store: Optional[str] = typer.Option(None, "--kv-store", help="s3://bucket/prefix: keep the KV caches in an "
                                           "S3-compatible object store (AWS_ENDPOINT_URL, credentials and region "
                                           "as for the AWS CLI); a new index's, fixed thereafter"),
    kv_codec: Optional[str] = typer.Option(None, "--kv-codec", help="How chunk caches are stored: raw (the model's "
                                           "dtype, lossless; default), int8 (half), int4 (under a third) or fp8; "
                                           "a new index's"),
    ray: Optional[str] = typer.Option(None, "--ray", help="Chunk and encode on a Ray cluster: local (start one "
                                      "here), auto (the running one) or ray://host:port; this process commits"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray actors, each loading the model once "
                                          "(default: one per GPU in the cluster, else one)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every skipped file and why"),
    as_json: bool = JsonOpt,
) -> None:
    """Chunk CORPUS and store each chunk's embedding and KV cache."""
    # refused before a model loads
    vocab.index_options(kv_attention=kv_attention, layout=layout, vector_index=vector_index, kv_codec=kv_codec)
    if chunk_tokens is not None and chunk_tokens < 8:
        raise RagcacheError("--chunk-tokens must be at least 8")
    if max_file_mb <= 0:
        raise RagcacheError("--max-file-mb must be more than 0")
    if workers is not None and workers < 1:
        raise RagcacheError("--workers must be at least 1")
    from .corpus import discover, roots
    from .store import check, check_no_writer
    found = discover(corpus)  # the one scan of the corpus, before a model loads or an index is created
    path = config.resolve_index(index)
    check_no_writer(path)
    existed, folder_existed = check(path, must_exist=False), path.exists()
    if not found.files and not existed:
        raise RagcacheError(f"nothing to index: no .txt, .md, .jsonl or .json file in {', '.join(map(str, corpus))}"
                            + (f" ({len(found.skipped)} other files skipped)" if found.skipped else ""))
    if kv_store is not None and not existed:  # a store fault is said before a model loads or a folder appears
        from .objstore import ObjectStore
        with ObjectStore.open(kv_store) as objects:
            objects.check()
    rc = _open(index, model, device, dtype, create=True, embedder=embedder)
    with rc:
        stats = rc.index_corpus(found, roots(corpus), chunk_tokens=chunk_tokens, kv_attention=kv_attention,
                                prune=prune, show_progress=not as_json and sys.stderr.isatty(),
                                batch_size=batch_size, max_file_mb=max_file_mb, layout=layout, kv_store=kv_store,
                                ray=ray, workers=workers, vector_index=vector_index, kv_codec=kv_codec)
        empty = rc.stored.count() == 0
    if empty:  # nothing could be indexed and nothing was there: say why, and leave no empty index behind
        if not existed:
            _remove_new_index(path, folder_existed)
        reasons = "; ".join(f"{p}: {why}" for p, why in stats.skipped[:3])
        more = f" (and {len(stats.skipped) - 3} more)" if len(stats.skipped) > 3 else ""
        raise RagcacheError(f"nothing could be indexed: {len(stats.skipped)} files skipped: {reasons}{more}")
    if as_json:
        typer.echo(json.dumps(stats.__dict__ | {"index": str(rc.store.path)}))
        return
    if verbose:
        for path, why in stats.skipped:
            hint = " (--max-file-mb raises it)" if why.endswith("MB limit") else ""
            typer.echo(f"skipped {path}: {why}{hint}", err=True)
    hint = " (--verbose lists them)" if stats.skipped and not verbose else ""
    typer.echo(stats.summary() + hint + f" -> {rc.store.path}")


def _remove_new_index(path: Path, folder_existed: bool) -> None:
    """Remove an index this run created and left empty: its files, and its folder if the run made it."""
    if not folder_existed:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in ("data.mdb", "lock.mdb", "writer.lock", "vectors.faiss", "vectors.json"):
        (path / name).unlink(missing_ok=True)


@app.command()
@_errors
def ask(
    question: str = typer.Argument(..., help="The question"),
    index: Optional[str] = IndexOpt,
    model: Optional[str] = ModelOpt,
    mode: str = typer.Option("doc", "--mode", help="none, rag, query, doc, query-doc or doc-query"),
    order: str = typer.Option("doc-first", "--order", help="For --mode rag: doc-first or query-first"),
    top_k: int = typer.Option(3, "-k", "--top-k", help="Documents to retrieve"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Most tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 decodes greedily"),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling"),
    templates: Optional[Path] = typer.Option(None, "--templates", help="JSON file overriding prompt templates"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
    explain: bool = typer.Option(False, "--explain", help="Print the layout: every segment, cached or computed"),
    gpu_cache_gb: Optional[float] = GpuCacheOpt,
    host_cache_gb: Optional[float] = HostCacheOpt,
    local_cache_gb: Optional[float] = LocalCacheOpt,
    recompute: float = RecomputeOpt,
    chunk_order: str = ChunkOrderOpt,
) -> None:
    """Answer QUESTION from the index, citing the sources."""
    from .prompts import Templates
    vocab.ask_arguments(question, mode, order, top_k, max_new_tokens, chunk_order)  # before a model loads
    vocab.fraction(recompute, "recompute")
    _check_tier_sizes(gpu_cache_gb, host_cache_gb, local_cache_gb)
    tmpl = Templates.load(templates)
    rc = _open(index, model, device, dtype, create=False)
    with rc:
        _tiers(rc, gpu_cache_gb, host_cache_gb, local_cache_gb, long_lived=False)
        stream = None if as_json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        answer = rc.ask(question, mode=mode, top_k=top_k, order=order, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, templates=tmpl, on_token=stream,
                        recompute=recompute, chunk_order=chunk_order)
        if as_json:
            typer.echo(json.dumps(answer.to_dict()))
            return
        typer.echo("")
        if answer.sources:
            typer.echo("\nSources:")
            for s in answer.sources:
                typer.echo("  " + s.line().replace("\n", "\n  "))
        if explain:
            decode = lambda ids: rc.model.tokenizer.decode(ids, skip_special_tokens=False)
            typer.echo("\nLayout:\n" + prompts.explain(answer.layout, decode))
            t = answer.timings_ms
            typer.echo("Timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))


@app.command()
@_errors
def serve(
    index: Optional[str] = IndexOpt,
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
    port: int = typer.Option(8000, "--port", help="Port to listen on"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RAGCACHE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on every request but /health"),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit", help="Most tokens one completion "
                                                   "may generate; also the default (1024)"),
    max_input_count: Optional[int] = typer.Option(None, "--max-input-count", help="Most embedding inputs, or "
                                                  "chat messages, per request (default 256)"),
    max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes", help="Largest request body in bytes "
                                                 "(default 1048576)"),
    max_top_k: Optional[int] = typer.Option(None, "--max-top-k", help="Most documents one RAG request may "
                                            "retrieve (default 32)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    gpu_cache_gb: Optional[float] = GpuCacheOpt,
    host_cache_gb: Optional[float] = HostCacheOpt,
    local_cache_gb: Optional[float] = LocalCacheOpt,
) -> None:
    """Serve the index over an OpenAI-compatible HTTP API, one request on the model at a time."""
    from .server import Limits, create_app
    given = {"max_tokens": max_tokens_limit, "max_input_count": max_input_count, "max_body_bytes": max_body_bytes,
             "max_top_k": max_top_k}
    limits = Limits(**{k: v for k, v in given.items() if v is not None})  # before the model loads
    _check_tier_sizes(gpu_cache_gb, host_cache_gb, local_cache_gb)
    rc = _open(index, model, device, dtype, create=False)
    with rc:
        _tiers(rc, gpu_cache_gb, host_cache_gb, local_cache_gb, long_lived=True)
        import uvicorn
        typer.echo(f"serving {rc.store.path} with {rc.model.name} on http://{host}:{port}/v1", err=True)
        uvicorn.run(create_app(rc, api_key=api_key or None, limits=limits), host=host, port=port)


@app.command()
@_errors
def verify(
    index: Optional[str] = IndexOpt,
    model: Optional[str] = ModelOpt,
    repair: bool = typer.Option(False, "--repair", help="Recompute damaged caches and embeddings from the chunks' "
                                "text, drop what cannot be recomputed, rebuild FAISS (takes the writer lock)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Check every chunk (KV header, decompression, checksum; embedding; file records), FAISS and the model."""
    from .store import check_no_writer
    from .verify import verify as check_index
    if repair:
        check_no_writer(config.resolve_index(index))  # before the model loads
    with _open(index, model, device, dtype, create=False) as rc:
        report = check_index(rc, repair=repair)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for problem in report.problems:
            typer.echo(problem.line())
        typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@_errors
def info(index: Optional[str] = IndexOpt, as_json: bool = JsonOpt) -> None:
    """Where ragcache keeps its data, its defaults, and what an index holds."""
    path = config.resolve_index(index)
    out = {"version": __version__, "home": str(config.home().absolute()), "index": str(path.absolute()),
           "model": config.default_model(),
           "env": {"RAGCACHE_HOME": "folder of indexes", "RAGCACHE_INDEX": "default index",
                   "RAGCACHE_MODEL": "default model"}}
    from .index import Index
    from .store import check
    meta = None
    if check(path, must_exist=False):
        with contextlib.closing(Index.open(path, create=False)) as idx:
            meta = idx.meta
            out["index_info"] = {"chunks": idx.count(), "files": len(idx.files()),
                                 "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())} | \
                                (meta.to_json() if meta else {})
            if idx.objects is not None:
                out["index_info"]["kv_store_usage"] = _store_usage(idx.objects)
            if meta is not None:
                out["index_info"]["kv_bytes"] = idx.kv_bytes()
                from .vectors import account
                out["index_info"]["vectors"] = account(path / "vectors.faiss", idx.store.version(),
                                                       meta.vector_index, meta.dim, idx.count())
    if meta is not None:  # the index's own model is the one that answers from it
        out["model"] = meta.model.name
    if as_json:
        typer.echo(json.dumps(out | {"default_model": config.default_model()}, indent=2))
        return
    typer.echo(f"ragcache {out['version']}\nindex: {out['index']}  [RAGCACHE_INDEX, -i]")
    if meta is not None:
        i, m = out["index_info"], meta.model
        typer.echo(f"  model {m.name} ({m.dtype}, fingerprint {m.fingerprint})\n"
                   f"  {i['chunks']} chunks from {i['files']} files, {i['bytes'] / 2**20:.1f} MiB on disk; "
                   f"chunks of at most {meta.chunk_tokens} tokens; KV attention {meta.kv_attention}; "
                   f"{meta.layout} layout")
        from .engine import codec_name
        kb = i["kv_bytes"]
        typer.echo(f"  KV codec {codec_name(meta.kv_codec)}" + (f" ({meta.kv_codec})" if meta.kv_codec == "zstd" else "")
                   + (f": {kb['per_token']:,.0f} bytes per token stored, {kb['per_token'] / kb['raw_per_token']:.2f}x "
                      f"of raw {m.dtype} ({kb['raw_per_token']:,} bytes)" if kb else ""))
        from .vectors import account_line
        typer.echo("  " + account_line(i["vectors"]))
        if meta.kv_store is not None:
            u = out["index_info"]["kv_store_usage"]
            typer.echo(f"  KV caches in {meta.kv_store}: " + (f"{u['objects']} objects, {u['bytes'] / 2**20:.1f} MiB "
                       "under its prefix (shared by every index that uses it)" if "error" not in u else u["error"]))
        if meta.embedder is not None:
            e = meta.embedder
            typer.echo(f"  retrieval by embedder {e.name} (fingerprint {e.fingerprint}, {e.dim} dimensions, "
                       f"texts cut at {e.max_tokens} tokens)")
    else:
        typer.echo(f"  no index there yet\nmodel: {out['model']}  [RAGCACHE_MODEL, -m] (for a new index)")
    typer.echo(f"home:  {out['home']}  [RAGCACHE_HOME]")


def _store_usage(objects) -> dict:
    """Objects and bytes under the store's prefix; an unreachable store is reported, not raised: info still informs."""
    from .objstore import StoreUnavailable
    try:
        count, nbytes = objects.usage()
    except StoreUnavailable as e:
        return {"error": str(e)}
    return {"objects": count, "bytes": nbytes}


@app.command()
@_errors
def gc(
    kv_store: str = typer.Argument(..., help="The object store, s3://bucket/prefix"),
    indexes: list[str] = typer.Option(..., "-i", "--index", help="Every index that uses the store (repeat -i)"),
    yes: bool = typer.Option(False, "--yes", help="Delete without asking"),
    as_json: bool = JsonOpt,
) -> None:
    """List the objects in KV_STORE that none of the given indexes references, and delete them once confirmed.

    Objects are shared by every index over the same model and codec: name them all, or their caches go.
    """
    from . import kvremote
    from .index import Index
    from .objstore import ObjectStore
    from .store import check
    referenced: set[str] = set()
    with contextlib.ExitStack() as held, ObjectStore.open(kv_store) as objects:
        for name in indexes:  # each held under its writer lock: no object is uploaded and referenced meanwhile
            path = config.resolve_index(name)
            check(path, must_exist=True)
            idx = held.enter_context(contextlib.closing(Index.open(path, create=False)))
            held.enter_context(idx.writing())
            if idx.meta is None or idx.meta.kv_store != kv_store:
                raise RagcacheError(f"index '{path}' does not keep its caches in {kv_store}", param="index")
            with idx.store.snapshot() as txn:
                referenced |= {key for _, v in txn.cursor(db=idx.store.db["kv"])
                               if (key := kvremote.referenced_key(v)) is not None}
        orphans = [key for key in objects.list_keys() if key not in referenced]
        if as_json:
            typer.echo(json.dumps({"referenced": len(referenced), "orphans": orphans, "deleted": yes}))
        else:
            typer.echo(f"{len(referenced)} objects referenced by {len(indexes)} indexes; {len(orphans)} referenced by none")
            for key in orphans[:20]:
                typer.echo(f"  {key}")
            if len(orphans) > 20:
                typer.echo(f"  … and {len(orphans) - 20} more")
        if orphans and (yes or (not as_json and typer.confirm(f"delete {len(orphans)} objects?"))):
            objects.delete_many(orphans)
            if not as_json:
                typer.echo(f"deleted {len(orphans)} objects")


eval_app = typer.Typer(no_args_is_help=True, help="Measure retrieval and answer quality on an index.")
app.add_typer(eval_app, name="eval")


@eval_app.command("retrieval")
@_errors
def eval_retrieval(
    queries: Path = typer.Option(..., "--queries", help="BEIR queries.jsonl: _id and text per line"),
    qrels: Path = typer.Option(..., "--qrels", help="BEIR qrels TSV: query-id, corpus-id, score"),
    index: Optional[str] = IndexOpt,
    model: Optional[str] = ModelOpt,
    out: Path = typer.Option(Path("eval-retrieval.jsonl"), "--out", help="Per-query results (JSONL)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """nDCG@10, MAP@10, MRR@10 and recall@1/5/10/100 of the index's retrieval (BEIR's definitions)."""
    from . import evaluate
    from .progress import bar
    from .store import check
    query_texts, judgements = evaluate.load_queries(queries), evaluate.load_qrels(qrels)
    check(config.resolve_index(index), must_exist=True)  # before the output file is made
    with evaluate.open_out(out) as f, _open(index, model, device, dtype, create=False) as rc:
        if rc.store.count() == 0:
            raise RagcacheError(f"the index '{rc.store.path}' holds no documents; run ragcache index first")
        with bar(not as_json and sys.stderr.isatty(), "queries", len(judgements)) as advance:
            result = evaluate.retrieval(rc, query_texts, judgements, f, advance=advance)
    typer.echo(json.dumps(result | {"per_query": str(out)}) if as_json
               else evaluate.retrieval_table(result) + f"\nper-query results: {out}")


@eval_app.command("qa")
@_errors
def eval_qa(
    questions: Path = typer.Option(..., "--questions", help="JSONL of {\"question\", \"answer\": [...]} (NQ-open), "
                                   "or SQuAD's JSON (its answerable questions)"),
    modes: str = typer.Option(",".join(vocab.MODES), "--modes", help="Comma-separated modes to compare"),
    index: Optional[str] = IndexOpt,
    model: Optional[str] = ModelOpt,
    top_k: int = typer.Option(1, "-k", "--top-k", help="Documents per question (the paper uses 1)"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Most tokens per answer (the paper uses 16)"),
    order: str = typer.Option("doc-first", "--order", help="For mode rag: doc-first or query-first"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions"),
    templates: Optional[Path] = typer.Option(None, "--templates", help="JSON file overriding prompt templates"),
    out: Path = typer.Option(Path("eval-qa.jsonl"), "--out", help="Per-question results, every mode (JSONL)"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = JsonOpt,
    with_fidelity: bool = typer.Option(False, "--fidelity", help="Also measure each mode's drift from the full "
                                       "recompute of its layout: first-token and teacher-forced KL and top-1"),
    recompute: float = RecomputeOpt,
    chunk_order: str = ChunkOrderOpt,
    gpu_cache_gb: Optional[float] = GpuCacheOpt,
    host_cache_gb: Optional[float] = HostCacheOpt,
    local_cache_gb: Optional[float] = LocalCacheOpt,
) -> None:
    """EM, Match and F1 of the answers in each mode, with latency, one row per mode."""
    from . import evaluate
    from .progress import bar
    from .prompts import Templates
    from .store import check
    chosen = vocab.modes(modes)
    vocab.order(order)
    vocab.chunk_order(chunk_order)
    vocab.fraction(recompute, "recompute")
    _check_tier_sizes(gpu_cache_gb, host_cache_gb, local_cache_gb)
    if limit is not None and limit < 1:
        raise RagcacheError(f"--limit must be at least 1 (got {limit})")
    items = evaluate.load_questions(questions)[:limit]
    tmpl = Templates.load(templates)
    check(config.resolve_index(index), must_exist=True)  # before the output file is made
    with evaluate.open_out(out) as f, _open(index, model, device, dtype, create=False) as rc:
        _tiers(rc, gpu_cache_gb, host_cache_gb, local_cache_gb, long_lived=True)
        with bar(not as_json and sys.stderr.isatty(), "answers", len(items) * len(chosen)) as advance:
            summary = evaluate.qa(rc, items, chosen, f, top_k=top_k, max_new_tokens=max_new_tokens, order=order,
                                  advance=advance, templates=tmpl, recompute=recompute,
                                  with_fidelity=with_fidelity, chunk_order=chunk_order)
    typer.echo(json.dumps({"modes": summary, "per_question": str(out)}) if as_json
               else evaluate.qa_table(summary) + f"\nper-question results: {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
