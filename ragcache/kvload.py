"""A layout's cached prefix -> the model's cache: KV from a source, re-rotated into place.

Each chunk's KV comes from the KV source. One that the source does not hold, or holds damaged, is
recomputed from the chunk's text with the index's model and KV attention, with one warning, and never
used damaged. One that no warm tier holds is also recomputed, silently, when the cost model says that
is faster than reading it (kvtiers.CostModel). The answer is the same either way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import adapter
from .errors import RagcacheError
from .index import Index
from .kvsource import KVSource
from .kvtiers import CostModel
from .model import GritModel
from .prompts import Frame, Segment, passage
from .vocab import Attention

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    cache: object  # the model's cache: the cached prefix, with room for the rest and the answer
    n_cached: int  # tokens in the cached prefix
    served_by: dict[int, str] = field(default_factory=dict)  # chunk id -> the source's name, or "recomputed"


@contextlib.contextmanager
def load_prefix(layout: list[Segment], source: KVSource, index: Index, model: GritModel, kv_attention: Attention,
                frame: Frame, computed: dict[str, torch.Tensor], room: int, cost: CostModel | None = None,
                streamed: bool = False) -> Iterator[Loaded]:
    """The cache of the layout's cached segments, which come first; `room` more tokens fit after them.

    `computed` holds the KV of the cached segments no source holds, by kind: the question's ("query")
    and the chat style's head ("head"); chunks ("doc") come from the source, in `frame`'s style.

    Generate inside the block: the source's tensors stay valid until it ends. With a cost model, a
    chunk no warm tier holds is recomputed instead of read when that is faster. `streamed` yields the
    cache at once and fills it layer by layer while the prefill runs (adapter.assemble_streamed).
    """
    prefix = list(itertools.takewhile(lambda s: s.cached, layout))
    if any(s.cached for s in layout[len(prefix):]):
        raise AssertionError("cached segments must come before computed ones")
    docs = {s.chunk_id: len(s.token_ids) for s in prefix if s.kind == "doc"}
    warm = source.resident(list(docs))
    faster = {cid for cid, tokens in docs.items() if cid not in warm and cost is not None
              and cost.recompute_is_faster(tokens * model.kv_bytes_per_token, tokens)}
    with source.fetch([cid for cid in docs if cid not in faster], model.device) as got:
        served = dict(got.served_by)
        if got.unavailable:
            log.warning(f"{got.unavailable}; recomputing {len(got.missing)} chunk caches from their text")
        for cid in docs:
            if cid in faster:
                got.tensors[cid] = _recompute(index, model, kv_attention, frame, cid, cost)
                served[cid] = "recomputed"  # faster than reading it: the same cache either way
            elif cid not in got.tensors:
                why = f"damaged ({got.damaged[cid]})" if cid in got.damaged else "missing"
                if not got.unavailable:
                    log.warning(f"the stored cache of chunk {cid} is {why}; recomputed it from its text "
                                "(ragcache verify --repair mends the index)")
                got.tensors[cid] = _recompute(index, model, kv_attention, frame, cid, cost)
                served[cid] = "recomputed"
        parts = [got.tensors[seg.chunk_id] if seg.kind == "doc" else computed[seg.kind] for seg in prefix]
        layers, n_cached = model.hf.config.num_hidden_layers, sum(len(s.token_ids) for s in prefix)
        if not (streamed and parts):  # (layers, 2, kv_heads, tokens, head_dim) each, copied in once
            yield Loaded(adapter.assemble(parts, model.inv_freq, layers, room, model.device, model.dtype),
                         n_cached, served)
            return
        cache, loader = adapter.assemble_streamed(parts, model.inv_freq, layers, room, model.device, model.dtype)
        try:
            yield Loaded(cache, n_cached, served)
        finally:
            loader.join()  # before the source's views may go


def _recompute(index: Index, model: GritModel, kv_attention: Attention, frame: Frame, cid: int,
               cost: CostModel | None) -> torch.Tensor:
    chunk = index.chunk(cid)
    t0 = time.perf_counter()
    enc = model.encode_segments([passage(chunk.title, chunk.text)], frame, kv_attention)[0]
    if cost is not None:
        cost.measured_prefill(len(enc.token_ids), time.perf_counter() - t0)
    if enc.token_ids != chunk.token_ids:
        raise RagcacheError(f"chunk {cid} no longer tokenises as it was indexed; rebuild the index")
    return enc.kv
