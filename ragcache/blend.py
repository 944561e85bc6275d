"""Selective recompute: a fraction of a cached prefix's tokens recomputed with full attention.

Cached segments were computed alone, so their tokens never attended to the segments before them.
CacheBlend's repair: find the tokens whose KV deviates most from what a full pass would give, and
recompute those, in every layer, with causal attention to everything before them, keeping the rest
of the cache as it is.

Deviation is measured where it first appears: layer 0's keys and values depend on a token alone,
so they are equal either way; layer 1's depend on layer 0's attention. One pass through the first
two layers over the whole prefix gives the full-attention KV of layer 1, compared token by token
with the cached one (keys and values, L2). The top `fraction` of tokens are then run through all
layers at their own positions, each seeing every prefix position up to its own; their new keys and
values overwrite the cached ones in place, layer by layer.

fraction 0 is the pure cached path; fraction 1 recomputes every token, which is a full causal pass:
token for token the `rag` baseline of the same order.
"""

from __future__ import annotations

import torch

from . import adapter
from .model import GritModel
from .prompts import Segment


@torch.inference_mode()
def recompute_tokens(model: GritModel, prefix: list[Segment], cache, fraction: float) -> int:
    """Recompute the most deviating `fraction` of the prefix's tokens in `cache`; how many were."""
    ids_list = [t for s in prefix for t in s.token_ids]
    n = len(ids_list)
    k = min(n, round(fraction * n))
    if k == 0:
        return 0
    device = model.device
    ids = torch.tensor(ids_list, device=device)[None]
    if k == n:
        chosen = torch.arange(n, device=device)
    else:
        pos = torch.arange(n, device=device)[None]
        full = adapter.first_layers_kv(model.hf, ids, pos, adapter.causal_allowed(n, 0, device), model.dtype, 2)
        cached = cache.layers[1]
        deviation = ((full.layers[1].keys[0] - cached.keys[0, :, :n]).float().pow(2).sum((0, 2))
                     + (full.layers[1].values[0] - cached.values[0, :, :n]).float().pow(2).sum((0, 2)))  # (n,)
        chosen = deviation.topk(k).indices.sort().values
    rows = chosen[:, None]
    allowed = (torch.arange(n, device=device)[None, :] <= rows)[None]  # (1, k, n): each sees up to itself
    model.forward(ids[:, chosen], chosen[None], allowed, adapter.overwriting(cache, chosen))
    return k
