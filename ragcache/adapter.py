"""Everything ragcache needs from transformers' internals, behind one module.

transformers' attention registry, mask interface, cache classes and rotary embedding change between
major versions (pyproject pins the one tested). Nothing else in ragcache imports them: the model,
the KV code and generation go through the functions here.

- Attention: HF's sdpa, except that on the CPU grouped-query heads are read in place (`_attention`).
- Masks: boolean "may attend" matrices (b, q, k), turned into the additive mask the decoder takes.
- Caches: a fresh dynamic cache, a reserved-capacity layer that decoding writes into in place, the
  assembly of stored segments into one cache, and cutting one sequence's KV out of a batched cache.
- Rotary: the inverse frequencies that cached keys are re-rotated with.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import accel
from .kv import rotate_keys


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's sdpa attention, except that on the CPU grouped-query heads are never copied.

    HF repeats the KV heads whenever a mask is given, which copies the whole cache in every layer at
    every step; the CPU kernel reads grouped heads in place, masked or not.
    """
    if query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    is_causal = module.is_causal if is_causal is None else is_causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True,
        is_causal=bool(is_causal and attention_mask is None and query.shape[2] > 1))
    return out.transpose(1, 2).contiguous(), None  # (b, q, heads, head_dim)


ATTENTION = "ragcache_sdpa"
AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


# ---- loading -----------------------------------------------------------------------------------------
def load_causal_lm(source: str, dtype: torch.dtype, local_only: bool):
    """(tokenizer, model) with ragcache's attention; raises OSError/ValueError as transformers does."""
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=ATTENTION,
                                              local_files_only=local_only)
    return tokenizer, hf


def convert_gguf(path: Path, out: Path) -> None:
    """A GGUF file (llama.cpp's, Ollama's) dequantised by transformers and saved as a model folder."""
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # transformers dequantises GGUF into plain float tensors but still marks the model quantized, which
    # save_pretrained refuses: what is saved is an ordinary float32 checkpoint
    hf.hf_quantizer, hf.is_quantized = None, False
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)


def rotary_inv_freq(hf) -> torch.Tensor | None:
    """(head_dim/2,) float32 inverse frequencies of the decoder's rotary embedding; None without one."""
    rotary = getattr(hf.get_decoder(), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return None
    return rotary.inv_freq.float()


def run_decoder(hf, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor | None,
                cache: Cache | None, dtype: torch.dtype) -> tuple[torch.Tensor, Cache]:
    """One decoder pass with explicit positions and mask; (last hidden states (b, q, hidden), cache)."""
    cache = DynamicCache() if cache is None else cache  # never the config's sliding layers: they drop tokens
    mask = None if allowed is None else allowed_to_mask(allowed, dtype)
    decoder = hf.get_decoder()
    out = decoder(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                  **{_cache_argument(decoder): cache})
    return out.last_hidden_state, cache  # filled in place


def _cache_argument(decoder) -> str:
    """The decoder's name for its cache: transformers 5.25 renamed `past_key_values` to `cache`, and the
    old name warns on every call."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


# ---- masks -------------------------------------------------------------------------------------------
def allowed_to_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (b, q, k) 'may attend' matrix -> additive (b, 1, q, k) mask the HF decoder takes as-is."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def padded_allowed(lengths: list[int], bidirectional: bool, device: torch.device) -> torch.Tensor:
    """(b, t, t) for right-padded sequences; pad keys stay invisible to real tokens.

    Each position may always see itself, so a pad row is never fully masked (which would give NaN
    under bf16 and leak through the pad tokens' keys into nothing, but is cleaner never to make).
    """
    t = max(lengths)
    idx = torch.arange(t, device=device)
    real = idx[None, :] < torch.tensor(lengths, device=device)[:, None]  # (b, t)
    allowed = real[:, None, :].expand(len(lengths), t, t)
    if not bidirectional:
        allowed = allowed & (idx[None, :] <= idx[:, None])
    return allowed | torch.eye(t, dtype=torch.bool, device=device)


def causal_allowed(q: int, past: int, device: torch.device) -> torch.Tensor:
    """(1, q, past+q): new tokens see every past token and the new ones up to themselves."""
    cols = torch.arange(past + q, device=device)
    rows = torch.arange(q, device=device) + past
    return (cols[None, :] <= rows[:, None])[None]


# ---- caches ------------------------------------------------------------------------------------------
def from_cache(cache: Cache, row: int, length: int, start: int = 0) -> torch.Tensor:
    """Cut one sequence's `length` tokens from `start` out of a batched HF cache, in one copy.

    The copy stays on the cache's device: a codec shrinks it there (kv.serialize), so the
    device-to-host copy carries the small form.
    """
    first = cache.layers[0].keys  # each layer: keys/values (batch, kv_heads, tokens, head_dim)
    out = torch.empty(len(cache.layers), 2, first.shape[1], length, first.shape[3], dtype=first.dtype,
                      device=first.device)
    for i, layer in enumerate(cache.layers):
        out[i, 0].copy_(layer.keys[row, :, start : start + length])
        out[i, 1].copy_(layer.values[row, :, start : start + length])
    return out  # (layers, 2, kv_heads, tokens, head_dim)


def prefix_cache(kv: torch.Tensor, batch: int) -> Cache:
    """A dynamic cache holding `kv` (layers, 2, kv_heads, tokens, head_dim), already at positions 0..,
    in each of `batch` rows: the past that a batched pass continues."""
    cache = DynamicCache()
    for i, (keys, values) in enumerate(kv):  # (kv_heads, tokens, head_dim) each
        cache.update(keys[None].expand(batch, -1, -1, -1), values[None].expand(batch, -1, -1, -1), i)
    return cache


class ReservedLayer(DynamicLayer):
    """A cache layer over a buffer with room to spare: new tokens are written in place.

    HF's DynamicLayer concatenates at every step, copying the whole cache per generated token; with
    thousands of cached tokens that copy, not the model, dominated decoding.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, new = self.length, key_states.shape[-2]
        if not self.is_initialized or n + new > self._keys.shape[-2]:
            needed = 2 * (n + new) if self.is_initialized else new  # double when outgrown
            self._grow(key_states, value_states, max(self.capacity, needed))
        self._keys[:, :, n : n + new] = key_states
        self._values[:, :, n : n + new] = value_states
        self.length = n + new
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        b, heads, _, dim = k.shape  # (batch, kv_heads, tokens, head_dim)
        keys, values = k.new_empty(b, heads, capacity, dim), v.new_empty(b, heads, capacity, dim)
        if self.is_initialized:
            keys[:, :, : self.length] = self._keys[:, :, : self.length]
            values[:, :, : self.length] = self._values[:, :, : self.length]
        self._keys, self._values = keys, values
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True


class StreamedLayer(ReservedLayer):
    """A reserved layer whose cached prefix arrives while the forward pass runs.

    The loader fills the prefix layer by layer and sets `ready`; the first `update` (this layer's
    attention in the prefill) waits for it, so layer 0 computes while later layers are still copied.
    """

    def __init__(self, capacity: int, prefix: int, like: torch.Tensor, device: torch.device, dtype: torch.dtype):
        super().__init__(capacity)
        heads, dim = like.shape[1], like.shape[3]  # like: (2, kv_heads, tokens, head_dim)
        self._keys = torch.empty(1, heads, capacity, dim, dtype=dtype, device=device)
        self._values = torch.empty(1, heads, capacity, dim, dtype=dtype, device=device)
        self.dtype, self.device, self.is_initialized = dtype, device, True
        self.length = prefix  # the sequence length is known before the bytes are
        self.keys, self.values = self._keys[:, :, :prefix], self._values[:, :, :prefix]
        self.ready = accel.LayerReady(device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.ready.wait()
        return super().update(key_states, value_states, *args, **kwargs)


def assemble_streamed(parts: list[torch.Tensor], inv_freq: torch.Tensor, layers: int, room: int,
                      device: torch.device, dtype: torch.dtype) -> tuple[Cache, "accel.Loader"]:
    """Like `assemble`, but returns at once: a loader fills the layers in order (a copy stream on a
    GPU, a thread on the CPU) while the model's forward pass waits for each layer only as it reaches it.

    The parts must stay valid until the loader is joined.
    """
    total = sum(p.shape[3] for p in parts)
    cache = Cache(layers=[StreamedLayer(total + room, total, parts[0][0], device, dtype) for _ in range(layers)])

    def fill(layer_idx: int) -> None:
        layer, offset = cache.layers[layer_idx], 0
        for kv in parts:  # (layers, 2, kv_heads, tokens, head_dim)
            n = kv.shape[3]
            keys, values = kv[layer_idx, 0].to(device, dtype, non_blocking=True), kv[layer_idx, 1].to(device, dtype, non_blocking=True)
            layer._keys[0, :, offset : offset + n] = rotate_keys(keys, offset, inv_freq)
            layer._values[0, :, offset : offset + n] = values
            offset += n

    return cache, accel.Loader(fill, [layer.ready for layer in cache.layers], device)


def assemble(parts: list[torch.Tensor], inv_freq: torch.Tensor, layers: int, room: int,
             device: torch.device, dtype: torch.dtype) -> Cache:
    """A batch-1 cache holding `parts` side by side, each re-rotated to its offset, with `room` to spare.

    parts: (layers, 2, kv_heads, tokens, head_dim) each, in sequence order. Each part is copied once,
    into the cache (moved to `device` and `dtype` on the way); only keys that move are computed anew.
    """
    total = sum(p.shape[3] for p in parts)
    cache = Cache(layers=[ReservedLayer(total + room) for _ in range(layers)])
    offset = 0
    for kv in parts:
        for layer, (keys, values) in zip(cache.layers, kv):  # layer by layer: the working set stays in cache
            keys, values = keys.to(device, dtype), values.to(device, dtype)
            layer.update(rotate_keys(keys, offset, inv_freq)[None], values[None])  # (1, kv_heads, tokens, head_dim)
        offset += kv.shape[3]
    return cache


class _Carried:
    """Which of a recomputing pass's front rows are cached tokens recomputed, shared by its layers.

    `positions` (k,) are the recomputed tokens' places in the cache, `carried[l]` how many of them
    layer l still computes (non-increasing); `rows` indexes `positions` for the rows now in the pass.
    `keep`, set by a layer that hands on fewer, holds the rows the next layer keeps.
    """

    def __init__(self, positions: torch.Tensor, carried: list[int]):
        self.positions, self.carried = positions, carried
        self.rows = torch.arange(len(positions), device=positions.device)
        self.keep: torch.Tensor | None = None


class _RecomputeLayer(DynamicLayer):
    """A view of a reserved layer for a pass that recomputes some of its tokens and appends new ones.

    The pass's front rows are cached tokens recomputed: their keys and values overwrite the cached
    ones at their positions; the rest are new tokens, appended. Attention then reads the whole cache,
    recomputed and cached tokens together. Where the next layer carries fewer recomputed tokens, it
    keeps those whose keys and values deviated most from the cached ones here (blend.py).
    """

    def __init__(self, layer: ReservedLayer, index: int, state: _Carried):
        super().__init__()
        self.layer, self.index, self.state = layer, index, state
        self.keys, self.values = layer.keys, layer.values
        self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        state = self.state
        c = len(state.rows)  # key_states: (1, kv_heads, c + new, head_dim)
        keys, values = self.layer.update(key_states[:, :, c:], value_states[:, :, c:])  # waits for a streamed layer
        at = state.positions[state.rows]
        after = state.carried[self.index + 1] if self.index + 1 < len(state.carried) else c
        if after < c:  # compared before the cached keys and values are overwritten
            deviation = ((key_states[0, :, :c] - self.layer._keys[0, :, at]).float().pow(2).sum((0, 2))
                         + (value_states[0, :, :c] - self.layer._values[0, :, at]).float().pow(2).sum((0, 2)))
            state.keep = deviation.topk(after).indices.sort().values  # (after,)
        self.layer._keys[:, :, at] = key_states[:, :, :c]
        self.layer._values[:, :, at] = value_states[:, :, :c]
        return keys, values


def _drop_rows(state: _Carried, module, args: tuple, kwargs: dict):
    """Before a decoder layer: leave out the recomputed rows no longer carried, from the hidden states
    (the layer before's output) and from the per-row inputs (mask rows, rotary cos/sin, position ids),
    which the decoder hands every layer whole, for all of the pass's rows."""
    hidden = args[0] if args else kwargs["hidden_states"]  # (1, rows, hidden)
    if state.keep is not None:  # the layer before handed on fewer
        c = len(state.rows)
        hidden = hidden[:, torch.cat([state.keep, torch.arange(c, hidden.shape[1], device=hidden.device)])]
        state.rows, state.keep = state.rows[state.keep], None
    k = len(state.positions)
    if len(state.rows) == k:
        return None
    total = hidden.shape[1] - len(state.rows) + k
    rows = torch.cat([state.rows, torch.arange(k, total, device=hidden.device)])
    mask, rope, ids = kwargs.get("attention_mask"), kwargs.get("position_embeddings"), kwargs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[2] == total:
        kwargs["attention_mask"] = mask[:, :, rows]  # (b, 1, rows, keys)
    if rope is not None:
        kwargs["position_embeddings"] = tuple(t[:, rows] for t in rope)  # cos, sin: (b, rows, head_dim)
    if ids is not None:
        kwargs["position_ids"] = ids[:, rows]
    if args:
        return (hidden, *args[1:]), kwargs
    return args, kwargs | {"hidden_states": hidden}


@contextmanager
def recomputing(hf, cache: Cache, positions: torch.Tensor, carried: list[int]) -> Iterator[Cache]:
    """A cache over the same buffers for a pass whose front rows recompute the cached tokens at
    `positions`, `carried[l]` of them in layer l (_RecomputeLayer): while it is open, the decoder
    layers leave out the rows dropped on the way, so the pass ends with `carried[-1]` of them."""
    state = _Carried(positions, carried)
    hooks = [layer.register_forward_pre_hook(partial(_drop_rows, state), with_kwargs=True)
             for layer in hf.get_decoder().layers]
    try:
        yield Cache(layers=[_RecomputeLayer(layer, i, state) for i, layer in enumerate(cache.layers)])
    finally:
        for hook in hooks:
            hook.remove()


class _Enough(Exception):
    """The last wanted layer's keys and values are cached: the rest of the pass is not needed."""


def first_layers_kv(hf, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype,
                    layers: int, past: Cache | None = None) -> Cache:
    """The cache of a pass through only the decoder's first `layers` layers, after `past` (which it
    extends) when given. The pass stops inside the last of them as soon as its keys and values are
    cached: that layer's attention and MLP, and every layer after it, would feed nothing returned."""
    cache = DynamicCache() if past is None else past
    update = cache.update

    def update_then_stop(key_states, value_states, layer_idx, *args, **kwargs):
        out = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx == layers - 1:
            raise _Enough
        return out

    cache.update = update_then_stop  # every HF attention module caches its keys and values through update
    try:
        run_decoder(hf, ids, positions, allowed, cache, dtype)
    except _Enough:
        pass
    finally:
        del cache.update
    return cache


class _StaticLayer(DynamicLayer):
    """A reserved layer read whole and written at `position`, a device tensor: every decode step has
    the same shapes and no host-side length, so the step can be captured once and replayed."""

    def __init__(self, layer: ReservedLayer, position: torch.Tensor):
        super().__init__()
        self.layer, self.position = layer, position
        self.keys, self.values = layer._keys, layer._values  # (1, kv_heads, capacity, head_dim)
        self.dtype, self.device, self.is_initialized = layer.dtype, layer.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.layer._keys.index_copy_(2, self.position, key_states)
        self.layer._values.index_copy_(2, self.position, value_states)
        return self.layer._keys, self.layer._values


class StaticDecoder:
    """One-token decode steps at a fixed shape over a reserved cache (capacity slots, a mask hiding
    the empty ones). On a GPU the step is captured in a CUDA graph after one eager step, and replayed
    (accel.capture); anywhere it cannot be, it runs eagerly, with the same results."""

    def __init__(self, hf, cache: Cache, length: int, dtype: torch.dtype, device: torch.device):
        capacity = cache.layers[0]._keys.shape[2]
        for layer in cache.layers:  # empty slots are read (and masked): they must hold numbers, not NaN
            layer._keys[:, :, length:].zero_()
            layer._values[:, :, length:].zero_()
        self.hf, self.capacity, self.length = hf, capacity, length  # length: on the host, never read back
        self.position = torch.tensor([length], device=device)
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.mask = torch.full((1, 1, 1, capacity), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.mask[..., :length] = 0
        self.cache = Cache(layers=[_StaticLayer(layer, self.position) for layer in cache.layers])
        self.hidden: torch.Tensor | None = None
        self.graph = accel.StepGraph(self._forward, device)

    def _forward(self) -> None:
        decoder = self.hf.get_decoder()
        out = decoder(input_ids=self.ids, position_ids=self.position[None], attention_mask=self.mask, use_cache=True,
                      **{_cache_argument(decoder): self.cache})
        self.hidden = out.last_hidden_state  # (1, 1, hidden)

    def step(self, token: int) -> torch.Tensor:
        """Feed `token` at the next position; its last hidden state (1, 1, hidden)."""
        if self.length >= self.capacity:
            raise AssertionError("the reserved cache is full")
        self.ids.fill_(token)
        self.mask.index_fill_(3, self.position, 0)
        self.graph.run()
        self.position += 1
        self.length += 1
        return self.hidden
