"""Quantised KV: fp8, int8 and int4 forms of a segment's cache, with torch ops on the KV's own device.

Quantising runs where the KV was computed, so from a GPU only the packed bytes cross to the host;
dequantising runs where the KV is used. kv.py frames the payload in a blob (header, checksum).

Statistics follow KIVI: keys vary per channel (a few channels carry large magnitudes in every
token), so each key channel gets its own statistics over a group of `key_group` tokens; values vary
per token, so each token gets its own over `value_group` channels of head_dim. A length that does
not divide is cut into ceil(length / group) groups as equal as can be, the last one smaller.
int8/int4 are asymmetric: x ~ lo + q * scale with q in 0..2^bits-1; fp8 (float8_e4m3fn) is
x ~ q * scale with scale = amax / 448, the format's range.
Statistics are float16. lo is rounded down and scale up to float16 before the codes are computed, so
every x stays inside [lo, lo + scale * (2^bits - 1)] and |x - x^| <= scale / 2 holds exactly (fp8:
|x - x^| <= |x| / 16 + scale / 1024, the format's half step); a KV whose statistics overflow float16
(a step or fp8 scale past 65504) is refused.
The first `sink` tokens of a segment (the attention sink, whose keys are outliers) stay in the KV's
own dtype, and key groups start after them, so the sink does not widen the first group's range.

Payload, in order (each part aligned for its dtype by what precedes it):
    sink    (layers, 2, kv_heads, S, head_dim)               the KV's dtype, S = min(sink, tokens)
    key stats   (k, layers, kv_heads, ceil(T/key_group), head_dim)   float16, T = tokens - S
    value stats (k, layers, kv_heads, T, ceil(head_dim/value_group)) float16
                 k = 2 (scale, lo) for int8/int4, 1 (scale) for fp8
    codes   (layers, 2, kv_heads, T, head_dim)               uint8 / float8_e4m3fn bytes; int4: two
             codes a byte, flat element 2i in the low nibble, 2i + 1 in the high
Bytes per token (bits per value b, head_dim D, k statistics of 16 bits): keys b + 16k/key_group,
values b + 16k/min(value_group, D), averaged, plus the sink tokens at full width; short or ragged
segments pay a little more (a partial key group costs a whole one). On GritLM-7B's shape (D = 128) in
bfloat16 with 155-token passages (BEIR-NQ's) the defaults give int4 4.72 bits a value (0.295x of
bf16), int8 8.28 (0.517x), fp8 8.17 (0.510x); 64-token segments int4 0.301x, int8 0.531x, fp8 0.520x.

The defaults were measured (2026-11-23, 2-core CPU VM) on SmolLM2-135M-Instruct's causal KV (D = 64)
of 40 SQuAD paragraphs (139 tokens on average) stored in bfloat16, each paragraph followed by its
question and answer, against the float32 KV: the attention error is the relative error of
softmax(q K^T / sqrt(d)) V over the paragraph for the real queries of the question's tokens, every
layer and head; KL that of the next-token distributions over question and answer (in nats).
    codec (key_group/value_group/sink)   x bf16 here   attention error   KL
    bf16 itself                              1.000          0.0026        0.00001
    int8 (256/128/1)                         0.529          0.0049        0.00004
    fp8  (256/128/1)                         0.517          0.0250        0.0015
    int4 (32/128/1)                          0.308          0.056         0.0042
- One sink token halves the attention error of every codec (int4 0.109 -> 0.056, int8 0.0079 ->
  0.0049, fp8 0.036 -> 0.025) and cuts the KL by a third or more; four tokens gain nothing more.
- int4's KL follows the key group (16 tokens 0.0029, 32 0.0042, 64 0.0055); the value group barely
  matters (16 to 64 channels: within 5%). 32-token key groups are the finest that keep int4 under
  0.30x on GritLM-7B's shape. int8 and fp8 hardly depend on the groups (int8 KL 0.00003-0.00006 from
  32 to 4,096 tokens), so their key statistics span up to 256 tokens to stay under 0.52x.
- fp8 (3 mantissa bits: up to 6% off per value) errs 5x more than int8 in attention and 40x in KL
  at the same size; it suits hardware that computes in fp8, int8 is the better store.
- float32 statistics instead of float16 change nothing measurable (int4 KL 0.0064 vs 0.0066).
- Pre-RoPE keys (KVQuant) are not done: un-rotating keys before quantising lowers int4's key error
  by 11% (0.038 -> 0.034), but the attention error by 3% and the KL by 5% (0.0042 -> 0.0040) at the
  defaults, and raised the KL at other settings (0.0048 -> 0.0052 with 32-token groups cut 32, 32,
  ..., 10); int8 and fp8 do not change. A gain of 3-5% that changes sign between settings is not
  worth a per-token rotation on every write and load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8, INT8, INT4 = "fp8", "int8", "int4"
_BITS = {FP8: 8, INT8: 8, INT4: 4}
_FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


@dataclass(frozen=True)
class Params:
    """A quantised form: its kind and the statistics' extents, all recorded in a blob's header."""

    kind: str  # FP8, INT8 or INT4
    key_group: int  # tokens per key statistic at most (each channel its own)
    value_group: int  # channels of head_dim per value statistic at most (each token its own)
    sink: int  # leading tokens kept in the KV's dtype

    def __post_init__(self) -> None:
        if self.kind not in _BITS or not (0 < self.key_group < 1 << 16 and 0 < self.value_group < 1 << 16
                                          and 0 <= self.sink < 1 << 16):  # u16 fields of the blob header
            raise ValueError(f"bad quantisation parameters {self}")


DEFAULTS = {FP8: Params(FP8, 256, 128, 1), INT8: Params(INT8, 256, 128, 1), INT4: Params(INT4, 32, 128, 1)}


def payload_size(p: Params, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of the payload `quantize` makes for a KV of this shape and dtype."""
    layers, _, heads, tokens, head_dim = shape
    s = min(p.sink, tokens)
    t, k = tokens - s, _stat_count(p.kind)
    stats = k * layers * heads * (-(-t // p.key_group) * head_dim + t * -(-head_dim // p.value_group))
    codes = layers * 2 * heads * t * head_dim
    return layers * 2 * heads * s * head_dim * dtype.itemsize + 2 * stats + codes * _BITS[p.kind] // 8


def quantize(kv: torch.Tensor, p: Params) -> torch.Tensor:
    """The payload (uint8, flat, on kv's device) of a (layers, 2, kv_heads, tokens, head_dim) tensor."""
    s = min(p.sink, kv.shape[3])
    y = kv[:, :, :, s:].to(torch.float32, copy=True)  # (layers, 2, kv_heads, T, head_dim), coded in place
    key_stats = _encode(y[:, 0], -2, p.key_group, p.kind)  # keys: per channel over token groups
    value_stats = _encode(y[:, 1], -1, p.value_group, p.kind)  # values: per token over channel groups
    if p.kind == FP8:
        codes = y.to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)
    else:
        codes = y.to(torch.uint8).reshape(-1)
        if p.kind == INT4:
            codes = codes.view(-1, 2)  # an even count: keys and values alike
            codes = codes[:, 0] | (codes[:, 1] << 4)
    sink = kv[:, :, :, :s].contiguous()
    # flattened before the dtype view, which refuses the odd strides a size-1 axis may carry
    parts = [t.reshape(-1).view(torch.uint8) for t in (sink, key_stats, value_stats)]
    return torch.cat(parts + [codes])


def dequantize(payload: torch.Tensor, p: Params, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`, on payload's device; payload holds exactly payload_size(p, shape, dtype) bytes."""
    layers, _, heads, tokens, head_dim = shape
    s = min(p.sink, tokens)
    t, k = tokens - s, _stat_count(p.kind)
    key_shape = (k, layers, heads, -(-t // p.key_group), head_dim)
    value_shape = (k, layers, heads, t, -(-head_dim // p.value_group))
    sizes = [layers * 2 * heads * s * head_dim * dtype.itemsize, 2 * math.prod(key_shape), 2 * math.prod(value_shape)]
    sink, key_stats, value_stats, codes = torch.split(payload, sizes + [payload.numel() - sum(sizes)])
    if p.kind == FP8:  # torch does not promote float8 in arithmetic
        codes = codes.view(torch.float8_e4m3fn).to(torch.float32)
    elif p.kind == INT4:  # low nibble first
        codes = torch.stack((codes & 15, codes >> 4), dim=-1)
    codes = codes.view(layers, 2, heads, t, head_dim)
    out = torch.empty(shape, dtype=dtype, device=payload.device)  # (layers, 2, kv_heads, tokens, head_dim)
    out[:, :, :, :s] = sink.view(dtype).view(layers, 2, heads, s, head_dim)
    _decode(codes[:, 0], out[:, 0, :, s:], -2, p.key_group, key_stats.view(torch.float16).view(key_shape))
    _decode(codes[:, 1], out[:, 1, :, s:], -1, p.value_group, value_stats.view(torch.float16).view(value_shape))
    return out


def _stat_count(kind: str) -> int:
    return 1 if kind == FP8 else 2


def _groups(x: torch.Tensor, dim: int, group: int) -> list[torch.Tensor]:
    """Views of x (dim < 0) in ceil(length / group) groups along dim, as equal as the length allows:
    the full groups as (..., n, size, ...), then the smaller last as (..., 1, r, ...). The group index
    is axis dim - 1; writes go through to x. Equal groups (139 tokens as 47, 47, 45 rather than 64,
    64, 11) cost the same bytes and keep every group's range small."""
    length = x.shape[dim]
    size = -(-length // -(-length // group)) if length else group
    n, r = divmod(length, size)
    parts = [x.narrow(dim, 0, n * size).unflatten(dim, (n, size))] if n else []
    if r:
        parts.append(x.narrow(dim, n * size, r).unsqueeze(dim - 1))
    return parts


def _per_group(parts: list[torch.Tensor], dim: int, stats: torch.Tensor):
    """(part, its groups' stats) pairs; stats (..., groups, 1, ...) broadcast over each group."""
    start = 0
    for part in parts:
        count = part.shape[dim - 1]
        yield part, stats.narrow(dim - 1, start, count)
        start += count


def _encode(x: torch.Tensor, dim: int, group: int, kind: str) -> torch.Tensor:
    """Turn float32 x into codes in place (grouped along dim); returns the float16 stats (k, ..., groups, ...)."""
    parts = _groups(x, dim, group)
    if not parts:  # no token past the sink: no key groups
        return x.new_empty((_stat_count(kind), *x.shape), dtype=torch.float16)
    if kind == FP8:
        amax = torch.cat([part.abs().amax(dim, keepdim=True) for part in parts], dim - 1)
        scale = _half(amax / _FP8_MAX, up=True)
        _check(scale)
        scale = torch.where(scale == 0, 1, scale)  # an all-zero group: any scale codes it exactly
        for part, sc in _per_group(parts, dim, scale.float()):
            part.div_(sc)  # within 448 and a rounding error, which the cast rounds to 448 (NaN from 480)
        return scale.squeeze(dim)[None]
    levels = (1 << _BITS[kind]) - 1
    lo = _half(torch.cat([part.amin(dim, keepdim=True) for part in parts], dim - 1), up=False)
    hi = torch.cat([part.amax(dim, keepdim=True) for part in parts], dim - 1)
    scale = _half((hi - lo.float()) / levels, up=True)  # from the rounded lo: the range still covers hi
    _check(lo), _check(scale)
    scale = torch.where(scale == 0, 1, scale)  # a constant group equal to lo: codes 0
    for (part, sc), (_, low) in zip(_per_group(parts, dim, scale.float()), _per_group(parts, dim, lo.float())):
        part.sub_(low).div_(sc).round_().clamp_(0, levels)
    return torch.stack((scale, lo)).squeeze(dim)


def _decode(codes: torch.Tensor, out: torch.Tensor, dim: int, group: int, stats: torch.Tensor) -> None:
    """Write the values of `codes` (grouped along dim) into `out`, with stats (k, ..., groups, ...) from
    `_encode`: one pass per group view, computed in float32 and rounded once to out's dtype."""
    parts, outs = _groups(codes, dim, group), _groups(out, dim, group)
    stats = stats.float().unsqueeze(dim)  # (k, ..., groups, 1, ...): dim < 0 counts from the end alike
    scales = _per_group(parts, dim, stats[0])
    if stats.shape[0] == 1:
        for (part, sc), o in zip(scales, outs):
            torch.mul(part, sc, out=o)
        return
    for (part, sc), (_, low), o in zip(scales, _per_group(parts, dim, stats[1]), outs):
        torch.addcmul(low, part, sc, out=o)


def _half(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x rounded to float16 toward +inf (up) or -inf, so that a range built from it only widens."""
    h = x.to(torch.float16)
    off = h.float() < x if up else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, math.inf if up else -math.inf)), h)


def _check(stats: torch.Tensor) -> None:
    if not bool(torch.isfinite(stats).all()):
        raise ValueError("KV values too large (or not finite) for float16 quantisation statistics; store them raw")
