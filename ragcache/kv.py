"""The KV layout, in one place: how a segment's keys and values are held, moved and serialised.

A segment's cache is one tensor shaped (layers, 2, kv_heads, tokens, head_dim): index 0 of the
second axis holds keys, index 1 values. Keys are stored already rotated (RoPE) for positions
0..tokens-1, exactly as the model computed them for the segment alone; `rotate_keys` moves them to
the segment's real offset in an assembled sequence.

On disk a blob is a fixed header followed by the tensor's bytes, raw or compressed:
    magic b"RCKV" | version u16 | dtype u8 | codec u8 | layers u16 | kv_heads u16 | head_dim u16 |
    tokens u32 | xxh3-64 of the raw bytes u64
codec 0 is the raw bytes. Codec 1 is zstd over byte planes: each value's bytes are split so that the
sign-and-exponent bytes lie together, which compresses far better than interleaved floats. A blob is
stored compressed only when that saves a third of its bytes (MIN_RATIO): raw bytes are read straight
from the memory map at copy speed, while decompressing runs several times slower, so a smaller
saving costs more load time than the disk it frees is worth. benchmarks/storage.py measures both.
"""

from __future__ import annotations

import math
import struct
import warnings

import numpy as np
import torch
import xxhash
import zstandard
from transformers.cache_utils import Cache, DynamicLayer

from .errors import RagcacheError

MAGIC = b"RCKV"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sHBBHHHIQ")
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
RAW, ZSTD_PLANES = 0, 1
ZSTD_LEVEL = 1  # higher levels gain ~1% on KV bytes at 2-3x the time
MIN_RATIO = 1.5


class CorruptKV(RagcacheError):
    """A stored KV blob failed its header or checksum test."""


def from_cache(cache: Cache, row: int, length: int) -> torch.Tensor:
    """Cut one sequence's first `length` tokens out of a batched HF cache, in one copy, onto the CPU."""
    first = cache.layers[0].keys  # each layer: keys/values (batch, kv_heads, tokens, head_dim)
    out = torch.empty(len(cache.layers), 2, first.shape[1], length, first.shape[3], dtype=first.dtype)
    for i, layer in enumerate(cache.layers):
        out[i, 0].copy_(layer.keys[row, :, :length])
        out[i, 1].copy_(layer.values[row, :, :length])
    return out  # (layers, 2, kv_heads, tokens, head_dim)


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


def assemble(parts: list[torch.Tensor], inv_freq: torch.Tensor, layers: int, room: int) -> Cache:
    """A batch-1 cache holding `parts` side by side, each re-rotated to its offset, with `room` to spare.

    parts: (layers, 2, kv_heads, tokens, head_dim) each, in sequence order. Each part is copied once,
    into the cache; only keys that move are computed anew.
    """
    total = sum(p.shape[3] for p in parts)
    cache = Cache(layers=[ReservedLayer(total + room) for _ in range(layers)])
    offset = 0
    for kv in parts:
        for layer, (keys, values) in zip(cache.layers, kv):  # layer by layer: the working set stays in cache
            layer.update(rotate_keys(keys, offset, inv_freq)[None], values[None])  # (1, kv_heads, tokens, head_dim)
        offset += kv.shape[3]
    return cache


def rotate_keys(keys: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys (..., tokens, head_dim) computed at positions 0.. moved to offset..

    RoPE rotations compose additively, so rotating every key by `offset` angles turns the cache of a
    segment encoded alone into the cache of the same segment placed at `offset`. One vectorised step
    over all layers and heads, in float32 to keep bf16 keys from drifting.
    """
    if offset == 0:
        return keys
    angles = offset * inv_freq.to(device=keys.device, dtype=torch.float32)  # (head_dim/2,)
    cos, sin = angles.cos(), angles.sin()
    x = keys.float()
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    # (lo, hi) -> (lo cos - hi sin, hi cos + lo sin): rotate_half written out, without its copies
    return torch.cat((lo * cos - hi * sin, hi * cos + lo * sin), dim=-1).to(keys.dtype)


def serialize(kv: torch.Tensor) -> bytes:
    """Header + payload of a (layers, 2, kv_heads, tokens, head_dim) tensor; see the module docstring."""
    layers, two, heads, tokens, head_dim = kv.shape
    assert two == 2, kv.shape
    raw = kv.detach().contiguous().cpu().view(torch.uint8).numpy()
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_planes(raw, kv.element_size()))
    codec, payload = (ZSTD_PLANES, packed) if raw.nbytes >= MIN_RATIO * len(packed) else (RAW, raw.tobytes())
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, _DTYPE_CODES[kv.dtype], codec, layers, heads, head_dim, tokens,
                        xxhash.xxh3_64_intdigest(raw))
    return head + payload


def header(blob: bytes | memoryview) -> dict:
    """Parse a blob's header; raises CorruptKV when it is not one of ours."""
    if len(blob) < _HEADER.size:
        raise CorruptKV("KV blob shorter than its header")
    magic, version, code, codec, layers, heads, head_dim, tokens, checksum = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptKV("KV blob has a wrong header")
    if version > FORMAT_VERSION:
        raise RagcacheError(f"KV format version {version} is newer than this ragcache ({FORMAT_VERSION}); upgrade ragcache")
    if version < FORMAT_VERSION:
        raise RagcacheError(f"KV format version {version} is older than this ragcache ({FORMAT_VERSION}); rebuild the index")
    if code not in _DTYPES or codec not in (RAW, ZSTD_PLANES):
        raise CorruptKV("KV blob has a wrong header")
    return {"dtype": _DTYPES[code], "codec": codec, "shape": (layers, 2, heads, tokens, head_dim), "checksum": checksum}


def deserialize(blob: bytes | memoryview) -> torch.Tensor:
    """Inverse of `serialize`; the checksum is tested before any byte is used.

    A raw blob handed over as a memoryview is not copied: the tensor reads the view's memory (for
    LMDB, the memory map), so it is valid only while the view is, and must not be written to.
    """
    h = header(blob)
    dtype, shape = h["dtype"], h["shape"]
    nbytes = math.prod(shape) * dtype.itemsize
    payload = memoryview(blob)[_HEADER.size :]
    if h["codec"] == RAW:
        if len(payload) != nbytes:
            raise CorruptKV("KV blob is truncated")
        raw = payload
    else:
        try:
            planes = zstandard.ZstdDecompressor().decompress(payload, max_output_size=nbytes)
        except zstandard.ZstdError as e:
            raise CorruptKV(f"KV blob does not decompress: {e}") from None
        if len(planes) != nbytes:
            raise CorruptKV("KV blob is truncated")
        raw = _unplanes(planes, dtype.itemsize)
    if xxhash.xxh3_64_intdigest(raw) != h["checksum"]:
        raise CorruptKV("KV blob fails its checksum")
    with warnings.catch_warnings():  # a read-only map is fine: callers copy out of it, never into it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=dtype).view(shape)


def _planes(raw: np.ndarray, itemsize: int) -> bytes:
    """Byte planes: every value's first byte, then every second byte...: exponents sit together and compress."""
    return raw.reshape(-1, itemsize).T.tobytes()


def _unplanes(planes: bytes, itemsize: int) -> bytearray:
    out = bytearray(len(planes))
    values = np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)
    for i, plane in enumerate(np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)):
        values[:, i] = plane  # one plane at a time: ~9x faster than numpy's transposed copy
    return out
