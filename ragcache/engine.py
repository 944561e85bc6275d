"""RagCache: question -> embedding -> hits -> assembled cache -> tokens, over one index and one model."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers.cache_utils import Cache

from . import chunking, corpus, indexer, prompts
from . import kv as kvlib
from . import store as storelib
from .embedder import Embedder
from .errors import RagcacheError
from .model import GritModel, causal_allowed, dtype_name
from .prompts import Segment, Templates
from .vectors import Vectors

PROMPT_FORMAT = "grit-v1"  # bump when prompts.embed_prompt changes: stored caches depend on it


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    sources: list[dict]
    timings_ms: dict[str, float]
    layout: list[Segment]
    mode: str
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # (vocab,) at the first generated token

    def to_dict(self) -> dict:
        return {"answer": self.answer, "token_ids": self.token_ids, "sources": self.sources, "mode": self.mode,
                "timings_ms": self.timings_ms, "layout": [s.to_dict() for s in self.layout]}


class RagCache:
    def __init__(self, store: storelib.Store, model: GritModel, embedder: Embedder | None = None):
        self.store, self.model = store, model
        self.embedder = embedder  # a separate retrieval encoder (two-model baseline), else None: the model embeds
        self._vectors: Vectors | None = None
        self._vectors_stamp = -1

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, model: GritModel | None = None, create: bool = True, device: str = "auto",
             dtype: str = "auto", embedder: Embedder | None = None) -> "RagCache":
        """Open (or create) the index at `path`. Without `model`, load the one the index was built with.

        `embedder` makes a new index retrieve with that encoder; an index built so reloads its own.
        """
        store = storelib.Store(Path(path), create=create)
        try:
            meta = store.meta()
            if meta and meta.get("format_version", 0) > storelib.FORMAT_VERSION:
                raise RagcacheError(f"index '{path}' has format version {meta['format_version']}, newer than this "
                                    f"ragcache ({storelib.FORMAT_VERSION}); upgrade ragcache")
            if meta and meta.get("format_version", 0) < storelib.FORMAT_VERSION:
                raise RagcacheError(f"index '{path}' has format version {meta['format_version']}, older than this "
                                    f"ragcache ({storelib.FORMAT_VERSION}); rebuild it with ragcache index")
            if model is None:
                if not meta:
                    raise RagcacheError(f"index '{path}' is empty; name a model with --model to build it")
                model = GritModel.load(meta["model"]["name"], device=device,
                                       dtype=meta["model"]["dtype"] if dtype == "auto" else dtype)
            if meta:
                _check_model(meta, model, path)
            embedder = _index_embedder(meta, embedder, path, str(model.device))
        except BaseException:
            store.close()
            raise
        return cls(store, model, embedder)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "RagCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def meta(self) -> dict | None:
        return self.store.meta()

    def vectors(self) -> Vectors:
        """The FAISS view, loaded if current, else rebuilt from LMDB (and saved when possible)."""
        stamp = self.store.version()
        if self._vectors is not None and self._vectors_stamp == stamp:
            return self._vectors
        path = self.store.path / "vectors.faiss"
        vectors = Vectors.load(path, stamp)
        if vectors is None:
            existed = path.exists()
            ids, vecs = self.store.embeddings()
            vectors = Vectors(self.embedder.dim if self.embedder else self.model.hf.config.hidden_size)
            vectors.add(ids, vecs)
            if len(ids) and self._save_rebuilt(vectors, stamp):
                _warn(f"the vector index was {'out of date' if existed else 'missing'} (an interrupted run?); "
                      f"rebuilt it from {len(ids)} stored embeddings")
        self._vectors, self._vectors_stamp = vectors, stamp
        return vectors

    def _save_rebuilt(self, vectors: Vectors, stamp: int) -> bool:
        """Save a rebuilt view so that later opens load it; False when a live writer elsewhere made it stale.

        That writer saves its own view when it ends, so there is nothing to report or save.
        """
        held = self.store.writing
        try:
            if not held:
                self.store.lock_for_writing()
        except RagcacheError:
            return False
        try:
            if self.store.version() == stamp:  # nothing was committed since the embeddings were read
                vectors.save(self.store.path / "vectors.faiss", stamp)
        except RagcacheError:
            pass  # a full disk or a read-only folder: the view in memory serves, and the next open rebuilds
        finally:
            if not held:
                self.store.unlock()
        return True

    # ---- indexing ------------------------------------------------------------------------------
    def index(self, paths: list[str | Path], chunk_tokens: int | None = None, kv_attention: str | None = None,
              prune: bool = True, show_progress: bool = False, batch_size: int = 8,
              warn: Callable[[str], None] = _warn, max_file_mb: float = corpus.MAX_FILE_MB) -> indexer.IndexStats:
        """Index files and folders; unchanged files are skipped, changed ones replaced, vanished ones pruned."""
        corpus.check_paths(paths)  # before anything is written
        default_attention = "causal" if self.embedder else "bidirectional"  # a plain decoder's caches are causal
        meta = self.meta or self._new_meta(chunk_tokens or chunking.DEFAULT_CHUNK_TOKENS, kv_attention or default_attention)
        for name, value in (("chunk_tokens", chunk_tokens), ("kv_attention", kv_attention)):
            if value is not None and value != meta[name]:
                raise RagcacheError(f"this index was built with {name.replace('_', '-')}={meta[name]}; "
                                    f"use a new index for {value}")
        if meta["kv_attention"] not in prompts.ATTENTIONS:
            raise RagcacheError(f"unknown kv attention '{meta['kv_attention']}': use bidirectional or causal")
        self.store.lock_for_writing()
        try:
            if self.meta is None:
                self.store.set_meta(meta)
            vectors = self.vectors()
            stats = indexer.run(self.store, self.model, vectors, paths, meta["chunk_tokens"], meta["kv_attention"],
                                prune=prune, show_progress=show_progress, batch_size=batch_size, warn=warn,
                                embedder=self.embedder, max_file_mb=max_file_mb)
            vectors.save(self.store.path / "vectors.faiss", self.store.version())
            self._vectors_stamp = self.store.version()
        finally:
            self.store.unlock()
        return stats

    def _new_meta(self, chunk_tokens: int, kv_attention: str) -> dict:
        cfg = self.model.hf.config
        return {
            "format_version": storelib.FORMAT_VERSION,
            "kv_format_version": kvlib.FORMAT_VERSION,
            "prompt_format": PROMPT_FORMAT,
            "model": {"name": self.model.name, "fingerprint": self.model.fingerprint(),
                      "dtype": dtype_name(self.model.dtype), "layers": cfg.num_hidden_layers,
                      "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads},
            "dim": self.embedder.dim if self.embedder else cfg.hidden_size,
            "chunk_tokens": chunk_tokens,
            "kv_attention": kv_attention,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        } | ({"embedder": self.embedder.identity()} if self.embedder else {})

    def search(self, question: str, k: int) -> list[tuple[int, float]]:
        """The k best (chunk id, score) for `question`, best first: retrieval alone, nothing generated."""
        return self.vectors().search(self._embed_question(question, None)[1], k)

    def _embed_question(self, question: str, kv: str | None) -> tuple[list[int], np.ndarray, torch.Tensor | None]:
        """The question's embedding-prompt tokens, its retrieval vector and, when `kv` is set, its KV."""
        if self.embedder is None:
            enc = self.model.encode([question], kv=kv)[0]
            return enc.token_ids, enc.embedding, enc.kv
        vector = self.embedder.embed([question])[0]
        if kv is None:
            return self.model.embed_tokens(question)[0], vector, None
        enc = self.model.encode([question], kv=kv, embed=False)[0]
        return enc.token_ids, vector, enc.kv

    # ---- asking --------------------------------------------------------------------------------
    def ask(self, question: str, mode: str = "doc", top_k: int = 3, order: str = "doc-first",
            max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            templates: Templates | None = None, on_token: Callable[[str], bool | None] | None = None,
            ignore_eos: bool = False) -> Answer:
        """Answer `question` in `mode`; `order` applies to mode='rag'.

        `on_token` gets each new piece of text; returning True stops generation there.
        """
        _validate(question, mode, order, top_k, max_new_tokens)
        asked = len(self.model.tokenize(question)) + max_new_tokens
        if asked > self.model.max_context:  # refused before an embedding pass longer than the model can hold
            raise RagcacheError(f"the question and answer need at least {asked} tokens, more than the model's "
                                f"context of {self.model.max_context}")
        meta = self.meta
        if meta is None or self.store.count() == 0:
            if mode != "none":
                raise RagcacheError(f"the index '{self.store.path}' holds no documents; run ragcache index first")
        kv_attention = meta["kv_attention"] if meta else "bidirectional"
        templates = templates or Templates()
        timings = dict.fromkeys(("embed", "search", "kv_load", "prefill", "decode", "ttft", "total"), 0.0)
        t_start = time.perf_counter()

        query_ids, query_kv, hits = [], None, []
        if mode != "none":
            cache_query = mode in ("query", "query-doc", "doc-query")
            query_ids, vector, query_kv = self._embed_question(question, kv_attention if cache_query else None)
            t = time.perf_counter()
            timings["embed"] = t - t_start
            hits = self.vectors().search(vector, top_k)
            timings["search"] = time.perf_counter() - t

        docs = []
        for cid, _ in hits:
            record = self.store.chunk(cid)
            docs.append((cid, prompts.passage(record["title"], record["text"]), record["token_ids"], record))
        bos_ids = self.model.tokenize(self.model.bos) if self.model.bos else []
        dropped = []  # (rank, record); said only once the layout fits, so a failure says one thing
        while True:
            layout = prompts.build_layout(mode, order, question, query_ids, [d[:3] for d in docs],
                                          self.model.tokenize, bos_ids, templates, kv_attention)
            length = sum(len(s.token_ids) for s in layout) + max_new_tokens
            if length <= self.model.max_context:
                break
            if not docs:
                raise RagcacheError(f"the question and answer need {length} tokens, more than the model's "
                                    f"context of {self.model.max_context}")
            record = docs.pop()[3]
            dropped.append((len(docs) + 1, record))
            hits = hits[: len(docs)]
        for rank, record in reversed(dropped):
            _warn(f"dropped source '{record['title'] or record['source']}' (rank {rank}): "
                  f"the layout would exceed the model's context of {self.model.max_context} tokens")

        t = time.perf_counter()
        cache, n_cached = self._load_cache(layout, query_kv, kv_attention, max_new_tokens)
        timings["kv_load"] = time.perf_counter() - t

        token_ids, first_logits, gen_times = self._generate(layout, cache, n_cached, max_new_tokens, temperature,
                                                            top_p, seed, on_token, ignore_eos)
        timings["prefill"], timings["decode"] = gen_times
        timings["total"] = time.perf_counter() - t_start
        timings["ttft"] = timings["total"] - timings["decode"]
        sources = [{"rank": r + 1, "chunk_id": cid, "score": round(score, 6), "doc_id": d[3]["doc_id"],
                    "title": d[3]["title"], "source": d[3]["source"], "start": d[3]["start"], "end": d[3]["end"]}
                   for r, ((cid, score), d) in enumerate(zip(hits, docs))]
        return Answer(self.model.decode(token_ids), token_ids, sources,
                      {k: round(v * 1000, 3) for k, v in timings.items()}, layout, mode, first_logits)

    def recompute(self, layout: list[Segment], max_new_tokens: int = 16, ignore_eos: bool = False) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and first-step logits from one full forward with the layout's equivalent mask.

        No stored cache is read: this is the reference the cached path must match.
        """
        ids = torch.tensor([t for s in layout for t in s.token_ids], device=self.model.device)[None]
        positions = torch.arange(ids.shape[1], device=self.model.device)[None]
        allowed = prompts.layout_allowed(layout).to(self.model.device)[None]
        hidden, cache = self.model.forward(ids, positions, allowed)
        logits = self.model.logits(hidden[0, -1])
        tokens, _ = self._decode(cache, logits, ids.shape[1], max_new_tokens, 0.0, 1.0, None, None, ignore_eos)
        return tokens, logits

    def _load_cache(self, layout: list[Segment], query_kv: torch.Tensor | None, kv_attention: str,
                    max_new_tokens: int) -> tuple[Cache, int]:
        """The cache of the layout's cached prefix, with room for the rest and the answer.

        Stored blobs are read in place from LMDB's memory map, checked, and copied once, re-rotated to
        their offsets, into the cache.
        """
        model = self.model
        prefix = list(itertools.takewhile(lambda s: s.cached, layout))
        if any(s.cached for s in layout[len(prefix):]):
            raise RagcacheError("cached segments must come before computed ones")
        room = sum(len(s.token_ids) for s in layout[len(prefix):]) + max_new_tokens
        doc_ids = [s.chunk_id for s in prefix if s.kind == "doc"]
        with self.store.kv_views(doc_ids) as views:
            blobs = dict(zip(doc_ids, views))
            parts = [(query_kv if seg.kind == "query" else self._stored_kv(seg, blobs[seg.chunk_id], kv_attention))
                     .to(model.device, model.dtype) for seg in prefix]  # (layers, 2, kv_heads, tokens, head_dim)
            cache = kvlib.assemble(parts, model.inv_freq, model.hf.config.num_hidden_layers, room)
        return cache, sum(len(s.token_ids) for s in prefix)

    def _stored_kv(self, seg: Segment, blob: memoryview, kv_attention: str) -> torch.Tensor:
        """A chunk's stored KV; a damaged blob is recomputed from the chunk's text, never used."""
        try:
            return kvlib.deserialize(blob)
        except kvlib.CorruptKV as e:
            _warn(f"the stored cache of chunk {seg.chunk_id} is damaged ({e}); recomputed it from its text "
                  "(ragcache verify --repair mends the index)")
        record = self.store.chunk(seg.chunk_id)
        enc = self.model.encode([prompts.passage(record["title"], record["text"])], kv=kv_attention)[0]
        if enc.token_ids != seg.token_ids:
            raise RagcacheError(f"chunk {seg.chunk_id} no longer tokenises as it was indexed; rebuild the index")
        return enc.kv

    def _generate(self, layout: list[Segment], cache: Cache, n_cached: int, max_new_tokens: int,
                  temperature: float, top_p: float, seed: int | None, on_token, ignore_eos: bool):
        """Prefill the layout's computed tokens after the cached prefix, then decode."""
        model, t0 = self.model, time.perf_counter()
        rest = [t for s in layout if not s.cached for t in s.token_ids]
        ids = torch.tensor(rest, device=model.device)[None]
        positions = torch.arange(n_cached, n_cached + len(rest), device=model.device)[None]
        hidden, cache = model.forward(ids, positions, causal_allowed(len(rest), n_cached, model.device), cache)
        logits = model.logits(hidden[0, -1])
        t_prefill = time.perf_counter() - t0
        tokens, t_decode = self._decode(cache, logits, n_cached + len(rest), max_new_tokens, temperature, top_p,
                                        seed, on_token, ignore_eos)
        return tokens, logits, (t_prefill, t_decode)

    def _decode(self, cache, logits: torch.Tensor, position: int, max_new_tokens: int, temperature: float,
                top_p: float, seed: int | None, on_token, ignore_eos: bool) -> tuple[list[int], float]:
        model, t0 = self.model, time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        tokens: list[int] = []
        shown = ""
        while True:
            token = _sample(logits, temperature, top_p, generator)
            if token == model.eos_id and not ignore_eos:
                break
            tokens.append(token)
            if on_token is not None:
                text = model.decode(tokens)
                if not text.endswith("\ufffd"):  # else a character is split across tokens: wait for its rest
                    stop = on_token(text[len(shown):])
                    shown = text
                    if stop is True:  # only a literal True: print-like callbacks return other things
                        break
            if len(tokens) >= max_new_tokens:
                break
            ids = torch.tensor([[token]], device=model.device)
            hidden, cache = model.forward(ids, torch.tensor([[position]], device=model.device), None, cache)
            logits = model.logits(hidden[0, -1])
            position += 1
        rest = model.decode(tokens)[len(shown):] if on_token is not None else ""
        if rest:  # generation ended inside a split character: stream what the answer itself holds
            on_token(rest)
        return tokens, time.perf_counter() - t0


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _validate(question: str, mode: str, order: str, top_k: int, max_new_tokens: int) -> None:
    if not question or not question.strip():
        raise RagcacheError("the question is empty")
    if mode not in prompts.MODES:
        raise RagcacheError(f"unknown mode '{mode}': use one of {', '.join(prompts.MODES)}")
    if order not in prompts.ORDERS:
        raise RagcacheError(f"unknown order '{order}': use doc-first or query-first")
    if top_k < 1:
        raise RagcacheError(f"top-k must be at least 1 (got {top_k})")
    if max_new_tokens < 1:
        raise RagcacheError(f"max-new-tokens must be at least 1 (got {max_new_tokens})")


def _check_model(meta: dict, model: GritModel, path) -> None:
    """Stored caches are valid only for the exact model and dtype that made them."""
    built = meta["model"]
    if built["fingerprint"] != model.fingerprint():
        raise RagcacheError(f"index '{path}' was built by model '{built['name']}' (fingerprint {built['fingerprint']}), "
                            f"not by '{model.name}' (fingerprint {model.fingerprint()}); its caches are only valid "
                            "for the model that made them: use that model or build a new index")
    if built["dtype"] != dtype_name(model.dtype):
        raise RagcacheError(f"index '{path}' holds {built['dtype']} caches; load the model with --dtype {built['dtype']}")
    if meta.get("prompt_format") != PROMPT_FORMAT:
        raise RagcacheError(f"index '{path}' uses prompt format {meta.get('prompt_format')}, not {PROMPT_FORMAT}; rebuild it")


def _index_embedder(meta: dict | None, embedder: Embedder | None, path, device: str) -> Embedder | None:
    """The embedder an index retrieves with: the one it records (loaded again when not given), else none."""
    recorded = (meta or {}).get("embedder")
    if recorded is None:
        if embedder is not None and meta:
            raise RagcacheError(f"index '{path}' retrieves with its model's own embeddings; build a new index "
                                "to use a separate embedder")
        return embedder
    if embedder is None:
        if not Path(recorded["name"]).is_dir():
            raise RagcacheError(f"index '{path}' retrieves with the embedder at '{recorded['name']}', which is "
                                "missing; put it back there or build a new index")
        embedder = Embedder.load(recorded["name"], device=device)
    if embedder.fingerprint() != recorded["fingerprint"]:
        raise RagcacheError(f"index '{path}' was built with embedder '{recorded['name']}' (fingerprint "
                            f"{recorded['fingerprint']}), not '{embedder.name}' (fingerprint {embedder.fingerprint()}); "
                            "its vectors are only valid for that embedder: use it or build a new index")
    return embedder
