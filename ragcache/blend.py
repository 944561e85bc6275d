"""Selective recompute: which cached tokens to recompute with full attention.

Cached segments were computed alone, so their tokens never attended to the segments before them.
CacheBlend's repair: find the tokens whose KV deviates most from what a full pass would give, and
recompute those, in every layer, with causal attention to everything before them, keeping the rest
of the cache as it is.

Deviation is measured where it first appears: layer 0's keys and values depend on a token alone,
so they are equal either way; layer 1's depend on layer 0's attention. One pass through layer 0,
stopped inside layer 1 once its keys and values exist, gives the full-attention KV of layer 1,
compared token by token with the cached one (keys and values, L2). The leading segments whose cache already is the full pass's (the chat head
and the chunk right after it, or a causal first chunk) are read from the cache, not passed again:
they cannot deviate, so the pass covers only the tokens after them.

`choose` returns the positions; the recompute itself rides in the prefill of the question
(generation.prefill): one pass through all layers for the chosen tokens and the question together,
so the model's weights are read once.

fraction 0 is the pure cached path; fraction 1 recomputes every token, which is a full causal pass:
token for token the `rag` baseline of the same order.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from . import adapter
from .model import GritModel
from .prompts import Segment


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
def choose(model: GritModel, prefix: list[Segment], cache, fraction: float) -> torch.Tensor:
    """Positions (k,) ascending of the most deviating `fraction` of the prefix's tokens in `cache`."""
    ids_list = [t for s in prefix for t in s.token_ids]
    n = len(ids_list)
    k = min(n, round(fraction * n))
    device = model.device
    if k == 0 or k == n:
        return torch.arange(k, device=device)
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
        keys, values = full.layers[1].keys[0, :, exact:], full.layers[1].values[0, :, exact:]  # (kv_heads, n-exact, head_dim)
        cached = cache.layers[1]
        deviation[exact:] = ((keys - cached.keys[0, :, exact:n]).float().pow(2).sum((0, 2))
                             + (values - cached.values[0, :, exact:n]).float().pow(2).sum((0, 2)))
    return deviation.topk(k).indices.sort().values
