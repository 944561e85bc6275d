"""RagCache: question -> embedding -> hits -> layout -> KV from a source -> tokens, over one index and one model.

Each step is a call into the module that owns it: retrieval (retriever, index), the layout
(prompts), loading the cached prefix (kvload, through the index's KV source) and generation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import (
    blend,
    chunking,
    config,
    corpus,
    fidelity,
    generation,
    indexer,
    kvload,
    kvtiers,
    prompts,
    vocab,
)
from .diskcache import DiskCache
from .embedder import Embedder
from .errors import RagcacheError
from .fidelity import Drift
from .generation import OnToken, Sampling
from .index import Index
from .kvremote import ObjectKV
from .kvsource import KVSource, StoreKV
from .meta import IndexMeta
from .model import Encoded, GritModel
from .objstore import ObjectStore
from .prompts import Doc, Frame, Segment, Templates
from .records import Hit, Source
from .retriever import EmbedderRetriever, GritRetriever, Retriever

log = logging.getLogger(__name__)

# The codec of a new index's caches (README, "KV codecs", says why).
DEFAULT_KV_CODEC: vocab.KVCodec = "raw"


@dataclass
class Answer:
    answer: str
    token_ids: list[int]
    sources: list[Source]
    timings_ms: dict[str, float]
    layout: list[Segment]
    mode: vocab.Mode
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # (vocab,) at the first generated token
    kv_served_by: dict[int, str] = field(default_factory=dict)  # cached chunk id -> what served its KV
    kv_tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> this question's hits, misses

    def to_dict(self) -> dict:
        return {"answer": self.answer, "token_ids": self.token_ids, "sources": [s.to_dict() for s in self.sources],
                "mode": self.mode, "timings_ms": self.timings_ms, "layout": [s.to_dict() for s in self.layout],
                "kv_served_by": {str(k): v for k, v in self.kv_served_by.items()}, "kv_tiers": self.kv_tiers}


class RagCache:
    def __init__(self, stored: Index, model: GritModel, retriever: Retriever):
        self.stored, self.model, self.retriever = stored, model, retriever  # stored: the index on disk
        self._frame: tuple[str, Frame] | None = None  # the chat style's frame, for the preamble it was made with
        self.cost = kvtiers.CostModel()  # read or recompute: learnt from this process's reads and passes
        self.kv_source: KVSource
        self.use_tiers(gpu_gb=0, host_gb=0)  # the store alone, until a long-lived process asks for tiers
        # fill the cache layer by layer while the prefill runs: on a GPU, where a side stream copies
        self.streamed = model.device.type == "cuda"
        # decode at a fixed shape, so a GPU captures the step in a CUDA graph once and replays it
        self.static_decode = model.device.type == "cuda"

    def use_tiers(self, gpu_gb: float, host_gb: float, local_gb: float = config.DEFAULT_LOCAL_CACHE_GB) -> None:
        """Keep chunk caches warm in GPU and host memory (LRUs of these sizes) in front of the store.

        An index whose blobs live in an object store reads them through a local disk cache of
        `local_gb` (0: none) first.
        """
        self._tier_sizes = (gpu_gb, host_gb, local_gb)
        objects = self.stored.objects
        if objects is None:
            backing: KVSource = StoreKV(self.stored.store, on_read=self.cost.measured_read)
        else:
            disk = DiskCache(config.kv_cache_folder(), int(local_gb * kvtiers.GiB)) if local_gb > 0 else None
            backing = ObjectKV(self.stored.store, objects, disk, on_read=self.cost.measured_read)
        self.kv_source = kvtiers.build(backing, self.model.device, gpu_gb, host_gb)

    def tier_stats(self) -> dict:
        """Each memory tier's size, contents, hits, misses and evictions since the process began."""
        return self.kv_source.describe() if isinstance(self.kv_source, kvtiers.TieredKV) else {}

    @classmethod
    def open(cls, path: str | Path, model: GritModel | None = None, create: bool = True, device: str = "auto",
             dtype: str = "auto", embedder: Embedder | None = None) -> "RagCache":
        """Open (or create) the index at `path`. Without `model`, load the one the index was built with.

        `embedder` makes a new index retrieve with that encoder; an index built so reloads its own.
        """
        index = Index.open(path, create=create)
        try:
            meta = index.meta
            if model is None:
                if meta is None:
                    raise RagcacheError(f"index '{path}' is empty; name a model to build it", param="model")
                model = GritModel.load(meta.model.name, device=device,
                                       dtype=meta.model.dtype if dtype == "auto" else dtype)
            if meta is not None:
                meta.check_model(model.identity(), str(path))
            retriever = _retriever(meta, model, embedder, str(path))
        except BaseException:
            index.close()
            raise
        return cls(index, model, retriever)

    def close(self) -> None:
        self.stored.close()

    def __enter__(self) -> "RagCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def store(self):
        return self.stored.store

    @property
    def meta(self) -> IndexMeta | None:
        return self.stored.meta

    def vectors(self):
        return self.stored.vectors()

    @property
    def frame(self) -> Frame:
        """How this index lays out and computes cached segments: GRIT's formats, or the model's chat template."""
        meta = self.meta
        if meta is None or meta.layout == "grit":
            return prompts.GRIT
        if self._frame is None or self._frame[0] != meta.preamble:
            self._frame = (meta.preamble, prompts.chat_frame(self.model.tokenizer, meta.preamble))
        return self._frame[1]

    def default_layout(self) -> vocab.Style:
        """GRIT's layouts for a GRIT model (or one without a chat template), the chat template's otherwise."""
        template = getattr(self.model.tokenizer, "chat_template", None)
        return "chat" if template and not self.model.grit_trained else "grit"

    # ---- indexing ------------------------------------------------------------------------------
    def index_corpus(self, found: corpus.Discovery, roots: list[Path], chunk_tokens: int | None = None,
                     kv_attention: vocab.Attention | None = None, prune: bool = True, show_progress: bool = False,
                     batch_size: int = 8, warn: Callable[[str], None] = log.warning,
                     max_file_mb: float = corpus.MAX_FILE_MB, pipelined: bool | None = None,
                     layout: vocab.Style | None = None, kv_store: str | None = None, ray: str | None = None,
                     workers: int | None = None, vector_index: vocab.VectorIndex | None = None,
                     kv_codec: vocab.KVCodec | None = None) -> indexer.IndexStats:
        """Index the files `corpus.discover` found under `roots` (scanned once, by the caller).

        `pipelined` commits on a writer thread while the next batch computes (default: on a GPU).
        `layout` (a new index's; default_layout when None) is "grit" or "chat" (prompts.Frame).
        `kv_store` (a new index's) is an s3:// URL to keep the KV blobs in (kvremote.py), checked
        before anything is written. `ray` ("local", "auto" or "ray://host:port") chunks and encodes on
        a Ray cluster with `workers` actors (default: one per GPU, else one), committing here.
        `vector_index` (a new index's; default "flat") is "flat" or "ivfpq" (vectors.py).
        `kv_codec` (a new index's; default DEFAULT_KV_CODEC) is "raw" or a quantised "fp8", "int8", "int4".
        """
        vocab.index_options(kv_attention=kv_attention, layout=layout, vector_index=vector_index, kv_codec=kv_codec)
        meta = self.meta
        if meta is None:
            style = layout or self.default_layout()
            preamble = prompts.CHAT_PREAMBLE if style == "chat" else ""
            if style == "chat":
                prompts.chat_frame(self.model.tokenizer, preamble)  # refused before anything is written
            # a chat model was never trained to attend both ways: its chunks are cached causally
            attention = kv_attention or ("causal" if style == "chat" else self.retriever.default_kv_attention)
            meta = IndexMeta(self.model.identity(), self.retriever.dim, chunk_tokens or chunking.DEFAULT_CHUNK_TOKENS,
                             attention, embedder=self.retriever.identity(), layout=style, preamble=preamble,
                             kv_store=kv_store, vector_index=vector_index or "flat",
                             kv_codec=_stored_codec(kv_codec or DEFAULT_KV_CODEC))
        for name, value in (("chunk_tokens", chunk_tokens), ("kv_attention", kv_attention), ("layout", layout),
                            ("kv_store", kv_store), ("vector_index", vector_index)):
            if value is not None and value != getattr(meta, name):
                raise RagcacheError(f"this index was built with {name.replace('_', '-')}={getattr(meta, name)}; "
                                    f"use a new index for {value}", param=name)
        if kv_codec is not None and _stored_codec(kv_codec) != _stored_codec(codec_name(meta.kv_codec)):
            raise RagcacheError(f"this index stores its caches as {codec_name(meta.kv_codec)}; use a new index "
                                f"for {kv_codec}", param="kv_codec")
        if meta.kv_store is not None:  # unreachable, refused or no bucket: said before anything is written
            if self.meta is None:
                with contextlib.closing(ObjectStore.open(meta.kv_store)) as objects:
                    objects.check()
            else:
                self.stored.objects.check()
        with self.stored.writing():
            if self.meta is None:
                self.stored.create(meta)
                self.use_tiers(*self._tier_sizes)  # the new index's KV source: its object store, if it has one
                if meta.embedder is None and not self.model.grit_trained:
                    warn(f"model '{self.model.name}' was not trained to embed (it is no GRIT model), so its own "
                         "embeddings retrieve poorly; build the index with a separate embedder (--embedder PATH, "
                         "e.g. all-MiniLM-L6-v2)")
            vectors = self.stored.vectors()
            stats = indexer.run(self.stored, self.model, self.retriever, self.frame, vectors, found, roots, meta,
                                prune=prune, show_progress=show_progress, batch_size=batch_size, warn=warn,
                                max_file_mb=max_file_mb, pipelined=pipelined, ray_address=ray, ray_workers=workers)
            self.stored.save_vectors(vectors)
        return stats

    def index(self, paths: list[str | Path], **options) -> indexer.IndexStats:
        """Index files and folders; unchanged files are skipped, changed ones replaced, vanished ones pruned.

        Options as for index_corpus: chunk_tokens, kv_attention, prune, show_progress, batch_size, warn,
        max_file_mb, pipelined, layout, kv_store, ray, workers, vector_index, kv_codec.
        """
        return self.index_corpus(corpus.discover(paths), corpus.roots(paths), **options)

    # ---- asking --------------------------------------------------------------------------------
    def search(self, question: str, k: int) -> list[Hit]:
        """The k best chunks for `question`, best first: retrieval alone, nothing generated."""
        return self.stored.search(self.retriever.embed([question])[0], k)

    def ask(self, question: str, mode: str = "doc", top_k: int = 3, order: str = "doc-first",
            max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
            templates: Templates | None = None, on_token: OnToken | None = None,
            ignore_eos: bool = False, recompute: float = 0.0, chunk_order: str = "best-first") -> Answer:
        """Answer `question` in `mode`; `order` applies to mode='rag'.

        `on_token` gets each new piece of text; returning True stops generation there. `recompute`
        (0 to 1) recomputes that fraction of the cached tokens with full attention (blend.py).
        `chunk_order` places the top-ranked chunk first (right after the head) or last (right
        before the question); the sources are listed by rank either way.
        """
        vocab.fraction(recompute, "recompute")
        mode, order, arranged = vocab.ask_arguments(question, mode, order, top_k, max_new_tokens, chunk_order)
        self._check_question(question, max_new_tokens, mode)
        kv_attention = self.meta.kv_attention if self.meta else "bidirectional"
        timings = dict.fromkeys(("embed", "search", "kv_load", "recompute", "prefill", "decode", "ttft", "total"),
                                0.0)
        t_start = time.perf_counter()

        query, hits = self._retrieve(question, mode, top_k, kv_attention, timings)
        layout, hits = self._layout(mode, order, arranged, question, query, hits, templates or Templates(),
                                    kv_attention, max_new_tokens)
        t = time.perf_counter()
        room = sum(len(s.token_ids) for s in layout if not s.cached) + max_new_tokens
        sampling = Sampling(max_new_tokens, temperature, top_p, seed, ignore_eos)
        streamed = self.streamed and not recompute  # recomputing reads the whole prefix first
        with kvload.load_prefix(layout, self.kv_source, self.stored, self.model, kv_attention, self.frame,
                                self._computed(layout, query), room, self.cost, streamed) as loaded:
            timings["kv_load"] = time.perf_counter() - t  # streamed: until the first layer may start
            t = time.perf_counter()
            chosen = blend.choose(self.model, [s for s in layout if s.cached], loaded.cache, recompute)
            timings["recompute"] = time.perf_counter() - t  # choosing; the recompute itself is in the prefill
            out = generation.generate(self.model, layout, loaded.cache, loaded.n_cached, sampling, on_token,
                                      self.static_decode, chosen)

        timings["prefill"], timings["decode"] = out.prefill_s, out.decode_s
        self.cost.measured_prefill(sum(len(s.token_ids) for s in layout if not s.cached)
                                   + sum(chosen.carried) / len(chosen.carried),  # as whole tokens: token-layers / layers
                                   out.prefill_s)  # the recomputed tokens were in that pass too
        timings["total"] = time.perf_counter() - t_start
        timings["ttft"] = timings["total"] - timings["decode"]
        sources = [Source.of(rank, hit, self.stored.chunk(hit.chunk_id)) for rank, hit in enumerate(hits, 1)]
        return Answer(self.model.decode(out.token_ids), out.token_ids, sources,
                      {k: round(v * 1000, 3) for k, v in timings.items()}, layout, mode, out.first_logits,
                      loaded.served_by, self._tier_counts(loaded.served_by))

    def _tier_counts(self, served_by: dict[int, str]) -> dict[str, dict[str, int]]:
        """This question's hits and misses at each tier, in the order they are asked, the store last."""
        names = self.kv_source.levels
        counts, left = {}, list(served_by.values())
        for name in names:
            hits = sum(v == name for v in left)
            counts[name] = {"hits": hits, "misses": len(left) - hits}
            left = [v for v in left if v != name]
        counts["recomputed"] = {"hits": len(left), "misses": 0}
        return counts

    def fidelity(self, question: str, mode: str = "doc", top_k: int = 3, order: str = "doc-first",
                 reference: str = "", templates: Templates | None = None, recompute: float = 0.0,
                 chunk_order: str = "best-first") -> Drift:
        """How far `mode`'s next-token distributions drift from the full recompute of its layout order,
        at the first answer token and over `reference` (the gold answer) fed in token by token."""
        follow = self.model.tokenize(reference)[:-1] if reference else []
        mode, order, arranged = vocab.ask_arguments(question, mode, order, top_k, 1 + len(follow), chunk_order)
        self._check_question(question, 1 + len(follow), mode)
        kv_attention = self.meta.kv_attention if self.meta else "bidirectional"
        query, hits = self._retrieve(question, mode, top_k, kv_attention, {})
        layout, _ = self._layout(mode, order, arranged, question, query, hits, templates or Templates(),
                                 kv_attention, 1 + len(follow))
        room = sum(len(s.token_ids) for s in layout if not s.cached) + len(follow)
        with kvload.load_prefix(layout, self.kv_source, self.stored, self.model, kv_attention, self.frame,
                                self._computed(layout, query), room, self.cost) as loaded:
            chosen = blend.choose(self.model, [s for s in layout if s.cached], loaded.cache, recompute)
            cached = generation.forced_logits(self.model, layout, loaded.cache, loaded.n_cached, follow, chosen)
        return fidelity.drift(cached, generation.full_attention_logits(self.model, layout, follow))

    def recompute(self, layout: list[Segment], max_new_tokens: int = 16, ignore_eos: bool = False) -> tuple[list[int], torch.Tensor]:
        """Greedy tokens and first-step logits from one full forward with the layout's equivalent mask.

        No stored cache is read: this is the reference the cached path must match.
        """
        return generation.recompute(self.model, layout, Sampling(max_new_tokens, ignore_eos=ignore_eos))

    def _computed(self, layout: list[Segment], query: Encoded | None) -> dict[str, torch.Tensor]:
        """The KV of the layout's cached segments that no source holds: the question's, the chat head's."""
        out = {}
        if query is not None and query.kv is not None:
            out["query"] = query.kv
        if any(s.kind == "head" and s.cached for s in layout):
            out["head"] = self.model.head_kv(self.frame).kv  # computed once, by the model
        return out

    def _check_question(self, question: str, max_new_tokens: int, mode: vocab.Mode) -> None:
        asked = len(self.model.tokenize(question)) + max_new_tokens
        if asked > self.model.max_context:  # refused before an embedding pass longer than the model can hold
            raise RagcacheError(f"the question and answer need at least {asked} tokens, more than the model's "
                                f"context of {self.model.max_context}", param="question")
        if mode != "none" and (self.meta is None or self.stored.count() == 0):
            raise RagcacheError(f"the index '{self.stored.path}' holds no documents; run ragcache index first")

    def _retrieve(self, question: str, mode: vocab.Mode, top_k: int, kv_attention: vocab.Attention,
                  timings: dict) -> tuple[Encoded | None, list[Hit]]:
        """The question's embedding pass (with its KV when the mode caches it) and the top-k hits."""
        if mode == "none":
            return None, []
        t0 = time.perf_counter()
        query = self.retriever.encode([question], kv_attention if mode in vocab.QUERY_CACHED else None,
                                      self.frame, "query")[0]
        t = time.perf_counter()
        timings["embed"] = t - t0
        hits = self.stored.search(query.embedding, top_k)
        timings["search"] = time.perf_counter() - t
        return query, hits

    def _layout(self, mode: vocab.Mode, order: vocab.Order, chunk_order: vocab.ChunkOrder, question: str,
                query: Encoded | None, hits: list[Hit], templates: Templates, kv_attention: vocab.Attention,
                max_new_tokens: int) -> tuple[list[Segment], list[Hit]]:
        """The layout, with the lowest-ranked documents dropped whole until it fits the model's context."""
        chunks = [self.stored.chunk(h.chunk_id) for h in hits]
        docs = [Doc(h.chunk_id, prompts.passage(c.title, c.text), c.token_ids) for h, c in zip(hits, chunks)]
        query_ids = query.token_ids if query else []
        while True:
            placed = docs if chunk_order == "best-first" else docs[::-1]
            layout = prompts.build_layout(mode, order, question, query_ids, placed, self.model.tokenizer, templates,
                                          kv_attention, self.frame)
            length = sum(len(s.token_ids) for s in layout) + max_new_tokens
            if length <= self.model.max_context:
                break
            if not docs:
                raise RagcacheError(f"the question and answer need {length} tokens, more than the model's "
                                    f"context of {self.model.max_context}", param="question")
            docs.pop()
        if len(docs) < len(hits):  # said once, and only once the layout fits, so a failure says one thing
            first, last = len(docs) + 1, len(hits)
            which = f"source '{chunks[-1].title or chunks[-1].source}' (rank {last})" if first == last else \
                f"{last - first + 1} sources (ranks {first}-{last})"
            log.warning(f"dropped the {which} of {len(hits)}: with them the layout would exceed the model's "
                        f"context of {self.model.max_context} tokens")
        return layout, hits[: len(docs)]


def codec_name(stored: str) -> str:
    """The codec as users name it: a lossless index (probing, raw or zstd) is "raw"."""
    return "raw" if stored in ("auto", "raw", "zstd") else stored


def _stored_codec(name: str) -> str:
    """What a new index records for a codec a user names: raw is probed against zstd on the first batch."""
    return "auto" if name == "raw" else name


def _retriever(meta: IndexMeta | None, model: GritModel, embedder: Embedder | None, where: str) -> Retriever:
    """What the index retrieves with: the embedder it records (loaded again when not given), else the model."""
    recorded = meta.embedder if meta else None
    if meta is not None:
        meta.check_embedder(embedder.identity() if embedder else None, where)
    if recorded is not None and embedder is None:
        if not Path(recorded.name).is_dir():
            raise RagcacheError(f"index '{where}' retrieves with the embedder at '{recorded.name}', which is "
                                "missing; put it back there or build a new index", param="embedder")
        embedder = Embedder.load(recorded.name, device=str(model.device))
        meta.check_embedder(embedder.identity(), where)
    return EmbedderRetriever(embedder, model) if embedder is not None else GritRetriever(model)
