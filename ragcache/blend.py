"""Selective recompute: which cached tokens to recompute with full attention.

Cached segments were computed alone, so their tokens never attended to the segments before them.
CacheBlend's repair: find the tokens whose KV deviates most from what a full pass would give, and
recompute those, in every layer, with causal attention to everything before them, keeping the rest
of the cache as it is.

Deviation is measured where it first appears: layer 0's keys and values depend on a token alone,
so they are equal either way; layer 1's depend on layer 0's attention. One pass through layer 0,
stopped inside layer 1 once its keys and values exist, gives the full-attention KV of layer 1,
compared token by token with the cached one (keys and values, L2). The leading segments whose
cache already is the full pass's (the chat head and the chunk right after it, or a causal first
chunk) are read from the cache, not passed again: they cannot deviate, so the pass covers only the
tokens after them.

CacheBlend's gradual filtering spends the recompute where it still matters: layer 1 chooses more
tokens than the fraction, and each deeper layer carries on only those whose keys and values still
deviate most from the cached ones, linearly down to a share of them at the last layer (`carried`).
`fraction` is what it costs: the share of the prefix's token-layers recomputed.

`choose` returns the plan; the recompute itself rides in the prefill of the question
(generation.prefill): one pass for the chosen tokens and the question together, so the model's
weights are read once, and a token dropped after layer l is not computed beyond it.

fraction 0 is the pure cached path; fraction 1 recomputes every token in every layer, which is a
full causal pass: token for token the `rag` baseline of the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from . import adapter
from .model import GritModel
from .prompts import Segment

TAPER = 0.5  # the last layer carries this share of the tokens layer 1 chose (while it starts below all)


@dataclass(frozen=True)
class Plan:
    """The cached tokens a pass recomputes: `positions` (k,) ascending, as layer 1 chose them, and
    `carried[l]`, how many of them layer l computes (k in layers 0 and 1, then non-increasing)."""

    positions: torch.Tensor
    carried: list[int]


def carried(n: int, fraction: float, layers: int) -> list[int]:
    """Tokens each layer recomputes out of the prefix's `n`, for `fraction` of its token-layers: a
    start `s` through layer 1 tapering linearly to TAPER * s at the last layer, or from all `n` down
    to what keeps the mean when that start would be more than all."""
    if layers < 3:
        return [min(n, round(fraction * n))] * layers
    start, end = 2 * fraction / (1 + TAPER), 2 * fraction * TAPER / (1 + TAPER)
    if start > 1:
        start, end = 1.0, 2 * fraction - 1
    share = [start] * 2 + [start + (end - start) * (l - 1) / (layers - 2) for l in range(2, layers)]
    return [min(n, round(f * n)) for f in share]


def exact_tokens(prefix: list[Segment]) -> int:
    """How many leading tokens of the cached prefix hold what a full causal pass would give them:
    causal segments that attended to exactly everything before them."""
    offset = 0
    for seg in prefix:
        if seg.attention != "causal" or seg.context != offset:
            break
        offset += len(seg.token_ids)
    return offset


@torch.inference_mode()
def choose(model: GritModel, prefix: list[Segment], cache, fraction: float) -> Plan:
    """The plan for recomputing `fraction` of the prefix's token-layers in `cache`: layer 1 takes
    the most deviating tokens, deeper layers fewer of them (`carried`)."""
    ids_list = [t for s in prefix for t in s.token_ids]
    n = len(ids_list)
    device = model.device
    counts = carried(n, fraction, model.hf.config.num_hidden_layers)
    k = counts[0]
    if k == 0 or k == n:
        return Plan(torch.arange(k, device=device), counts)
    exact = exact_tokens(prefix)
    deviation = torch.zeros(n, device=device)  # exact tokens: none, so they are chosen only after all others
    if exact < n:
        past = DynamicCache()
        for i in range(2):  # layers 0 and 1 of the exact tokens, as the full pass would have them
            layer = cache.layers[i]
            past.update(layer.keys[:, :, :exact], layer.values[:, :, :exact], i)
        ids = torch.tensor(ids_list[exact:], device=device)[None]
        pos = torch.arange(exact, n, device=device)[None]
        full = adapter.first_layers_kv(model.hf, ids, pos, adapter.causal_allowed(n - exact, exact, device),
                                       model.dtype, 2, past)
        # (kv_heads, n - exact, head_dim)
        keys, values = full.layers[1].keys[0, :, exact:], full.layers[1].values[0, :, exact:]
        cached = cache.layers[1]
        deviation[exact:] = ((keys - cached.keys[0, :, exact:n]).float().pow(2).sum((0, 2))
                             + (values - cached.values[0, :, exact:n]).float().pow(2).sum((0, 2)))
    return Plan(deviation.topk(k).indices.sort().values, counts)
