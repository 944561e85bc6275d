"""The `ragcache` command: index, ask, serve, verify, info. Errors the user can fix end as one line and exit 1."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from . import __version__, config, prompts
from .corpus import MAX_FILE_MB
from .errors import RagcacheError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrieval-augmented generation on one GRIT model, reusing the KV caches of its embedding pass.")

ModelOpt = typer.Option(None, "-m", "--model", help="Hub id or local model directory (env RAGCACHE_MODEL; "
                        "default: the index's own model, else GritLM/GritLM-7B)")
IndexOpt = typer.Option(None, "-i", "--index", help="Index folder, or a name under the home (env RAGCACHE_INDEX)")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu or cuda")
DtypeOpt = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16 (auto: the index's, else "
                        "bfloat16 on cuda and float32 on cpu)")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of text")


def _errors(fn):
    """Turn the errors a user can act on into one line on stderr and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RagcacheError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _open(index: Optional[str], model: Optional[str], device: str, dtype: str, create: bool):
    """Open an index; load the model named, else the index's own, else the default."""
    from .engine import RagCache
    from .model import GritModel
    from .store import check
    _quiet_transformers()
    path = config.resolve_index(index)
    if model is None and not check(path, must_exist=not create):
        model = config.default_model()
    loaded = GritModel.load(model, device=device, dtype=dtype) if model else None
    return RagCache.open(path, model=loaded, create=create, device=device, dtype=dtype)


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
    max_file_mb: float = typer.Option(MAX_FILE_MB, "--max-file-mb", help="Skip (and count) larger files"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every skipped file and why"),
    as_json: bool = JsonOpt,
) -> None:
    """Chunk CORPUS and store each chunk's embedding and KV cache."""
    if kv_attention is not None and kv_attention not in prompts.ATTENTIONS:
        raise RagcacheError(f"unknown --kv-attention '{kv_attention}': use bidirectional or causal")
    if chunk_tokens is not None and chunk_tokens < 8:
        raise RagcacheError("--chunk-tokens must be at least 8")
    if max_file_mb <= 0:
        raise RagcacheError("--max-file-mb must be more than 0")
    from .corpus import discover
    from .store import check, check_no_writer
    found = discover(corpus)  # before a model loads or an index is created
    path = config.resolve_index(index)
    check_no_writer(path)
    if not found.files and not check(path, must_exist=False):
        raise RagcacheError(f"nothing to index: no .txt, .md, .jsonl or .json file in {', '.join(map(str, corpus))}"
                            + (f" ({len(found.skipped)} other files skipped)" if found.skipped else ""))
    rc = _open(index, model, device, dtype, create=True)
    with rc:
        stats = rc.index(corpus, chunk_tokens=chunk_tokens, kv_attention=kv_attention, prune=prune,
                         show_progress=not as_json and sys.stderr.isatty(), batch_size=batch_size,
                         max_file_mb=max_file_mb)
    if as_json:
        typer.echo(json.dumps(stats.__dict__ | {"index": str(rc.store.path)}))
        return
    if verbose:
        for path, why in stats.skipped:
            typer.echo(f"skipped {path}: {why}", err=True)
    hint = " (--verbose lists them)" if stats.skipped and not verbose else ""
    typer.echo(stats.summary() + hint + f" -> {rc.store.path}")


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
) -> None:
    """Answer QUESTION from the index, citing the sources."""
    from .prompts import Templates
    tmpl = Templates.load(templates)
    rc = _open(index, model, device, dtype, create=False)
    with rc:
        stream = None if as_json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        answer = rc.ask(question, mode=mode, top_k=top_k, order=order, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, templates=tmpl, on_token=stream)
        if as_json:
            typer.echo(json.dumps(answer.to_dict()))
            return
        typer.echo("")
        if answer.sources:
            typer.echo("\nSources:")
            for s in answer.sources:
                typer.echo(f"  [{s['rank']}] {s['title'] or s['doc_id']} - {s['source']} (score {s['score']:.3f})")
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
) -> None:
    """Serve the index over an OpenAI-compatible HTTP API, one request on the model at a time."""
    from .server import Limits, create_app
    given = {"max_tokens": max_tokens_limit, "max_input_count": max_input_count, "max_body_bytes": max_body_bytes,
             "max_top_k": max_top_k}
    limits = Limits(**{k: v for k, v in given.items() if v is not None})  # before the model loads
    rc = _open(index, model, device, dtype, create=False)
    with rc:
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
    from .store import Store, check
    if check(path, must_exist=False):
        store = Store(path, create=False)
        try:
            meta = store.meta() or {}
            out["index_info"] = {"chunks": store.count(), "files": len(store.files()),
                                 "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())} | meta
        finally:
            store.close()
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"ragcache {out['version']}\nhome:  {out['home']}  [RAGCACHE_HOME]\n"
               f"index: {out['index']}  [RAGCACHE_INDEX, -i]\nmodel: {out['model']}  [RAGCACHE_MODEL, -m]")
    if "index_info" in out:
        i = out["index_info"]
        typer.echo(f"  {i['chunks']} chunks from {i['files']} files, {i['bytes'] / 2**20:.1f} MiB on disk; "
                   f"model {i['model']['name']} ({i['model']['dtype']}, fingerprint {i['model']['fingerprint']}); "
                   f"chunks of at most {i['chunk_tokens']} tokens; KV attention {i['kv_attention']}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
