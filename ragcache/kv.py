"""The KV layout, in one place: how a segment's keys and values are held, moved and serialised.

A segment's cache is one tensor shaped (layers, 2, kv_heads, tokens, head_dim): index 0 of the
second axis holds keys, index 1 values. Keys are stored already rotated (RoPE) for positions
0..tokens-1, exactly as the model computed them for the segment alone; `rerotate` moves them to
the segment's real offset in an assembled sequence.

On disk a blob is a fixed header followed by the zstd-compressed raw bytes of that tensor:
    magic b"RCKV" | version u16 | dtype u8 | layers u16 | kv_heads u16 | head_dim u16 | tokens u32 | crc32 u32
"""

from __future__ import annotations

import struct
import zlib

import torch
import zstandard
from transformers.cache_utils import Cache, DynamicLayer

from .errors import RagcacheError

MAGIC = b"RCKV"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHBHHHII")
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
ZSTD_LEVEL = 1  # KV bytes compress little; a fast level keeps loading and indexing cheap


class CorruptKV(RagcacheError):
    """A stored KV blob failed its header or checksum test."""


def from_cache(cache: Cache, row: int, length: int) -> torch.Tensor:
    """Cut one sequence's first `length` tokens out of a batched HF cache."""
    # each layer: keys/values (batch, kv_heads, tokens, head_dim)
    return torch.stack(
        [torch.stack((layer.keys[row, :, :length], layer.values[row, :, :length])) for layer in cache.layers]
    )  # (layers, 2, kv_heads, tokens, head_dim)


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

    parts: (layers, 2, kv_heads, tokens, head_dim) each, in sequence order.
    """
    total = sum(p.shape[3] for p in parts)
    cache = Cache(layers=[ReservedLayer(total + room) for _ in range(layers)])
    offset = 0
    for kv in parts:
        kv = rerotate(kv, offset, inv_freq)
        for layer, (keys, values) in zip(cache.layers, kv):
            layer.update(keys[None], values[None])
        offset += kv.shape[3]
    return cache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(kv: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Return kv with keys moved from positions 0.. to offset.. (values are position-free).

    RoPE rotations compose additively, so rotating every key by `offset` angles turns the cache of a
    segment encoded alone into the cache of the same segment placed at `offset`. One vectorised step
    over all layers and heads, in float32 to keep bf16 keys from drifting.
    """
    if offset == 0:
        return kv
    angles = offset * inv_freq.to(device=kv.device, dtype=torch.float32)  # (head_dim/2,)
    angles = torch.cat((angles, angles))  # (head_dim,)
    cos, sin = angles.cos(), angles.sin()
    keys = kv[:, 0].float()  # (layers, kv_heads, tokens, head_dim)
    rotated = (keys * cos + _rotate_half(keys) * sin).to(kv.dtype)
    return torch.stack((rotated, kv[:, 1]), dim=1)


def serialize(kv: torch.Tensor) -> bytes:
    """Header + zstd(raw bytes) of a (layers, 2, kv_heads, tokens, head_dim) tensor."""
    layers, two, heads, tokens, head_dim = kv.shape
    assert two == 2, kv.shape
    raw = kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, _DTYPE_CODES[kv.dtype], layers, heads, head_dim, tokens, zlib.crc32(raw)
    )
    return header + zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)


def header(blob: bytes) -> dict:
    """Parse a blob's header; raises CorruptKV when it is not one of ours."""
    if len(blob) < _HEADER.size:
        raise CorruptKV("KV blob shorter than its header")
    magic, version, code, layers, heads, head_dim, tokens, crc = _HEADER.unpack_from(blob)
    if magic != MAGIC or code not in _DTYPES:
        raise CorruptKV("KV blob has a wrong header")
    if version > FORMAT_VERSION:
        raise RagcacheError(f"KV format version {version} is newer than this ragcache ({FORMAT_VERSION}); upgrade ragcache")
    return {"dtype": _DTYPES[code], "layers": layers, "kv_heads": heads, "head_dim": head_dim, "tokens": tokens, "crc32": crc}


def deserialize(blob: bytes | memoryview) -> torch.Tensor:
    """Inverse of `serialize`; checks the checksum before any byte is used."""
    blob = bytes(blob)
    h = header(blob)
    shape = (h["layers"], 2, h["kv_heads"], h["tokens"], h["head_dim"])
    nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=h["dtype"]).element_size()
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob[_HEADER.size :], max_output_size=nbytes)
    except zstandard.ZstdError as e:
        raise CorruptKV(f"KV blob does not decompress: {e}") from None
    if len(raw) != nbytes or zlib.crc32(raw) != h["crc32"]:
        raise CorruptKV("KV blob fails its checksum")
    return torch.frombuffer(bytearray(raw), dtype=h["dtype"]).view(shape)
