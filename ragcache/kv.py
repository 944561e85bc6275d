"""The KV layout, in one place: how a segment's keys and values are held, moved and serialised.

A segment's cache is one tensor shaped (layers, 2, kv_heads, tokens, head_dim): index 0 of the
second axis holds keys, index 1 values. Keys are stored already rotated (RoPE) for positions
0..tokens-1, exactly as the model computed them for the segment alone; `rotate_keys` moves them to
the segment's real offset in an assembled sequence. Assembling segments into a model's cache is the
adapter's (adapter.assemble), which calls rotate_keys.

On disk a blob is a fixed header followed by the tensor's bytes, raw or compressed:
    magic b"RCKV" | version u16 | dtype u8 | codec u8 | layers u16 | kv_heads u16 | head_dim u16 |
    tokens u32 | xxh3-64 of the raw bytes u64
codec 0 is the raw bytes. Codec 1 is zstd over byte planes: each value's bytes are split so that the
sign-and-exponent bytes lie together, which compresses far better than interleaved floats. A blob is
stored compressed only when that saves a third of its bytes (MIN_RATIO): raw bytes are read straight
from the memory map at copy speed, while decompressing runs several times slower, so a smaller
saving costs more load time than the disk it frees is worth. An index chooses its codec once, from a
probe of its first batch (IndexMeta.kv_codec), so indexing never compresses a blob only to throw the
result away. benchmarks/storage.py measures both.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
import zstandard

from .errors import RagcacheError
from .meta import KV_FORMAT as FORMAT_VERSION

MAGIC = b"RCKV"
_HEADER = struct.Struct("<4sHBBHHHIQ")
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
RAW, ZSTD_PLANES = 0, 1
ZSTD_LEVEL = 1  # higher levels gain ~1% on KV bytes at 2-3x the time
MIN_RATIO = 1.5


class CorruptKV(RagcacheError):
    """A stored KV blob failed its header or checksum test."""


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


def serialize(kv: torch.Tensor, codec: int | None = None) -> bytes | bytearray:
    """Header + payload of a (layers, 2, kv_heads, tokens, head_dim) tensor; see the module docstring.

    `codec` RAW or ZSTD_PLANES fixes the codec (an index chooses it once); None tries zstd and keeps it
    only when it saves a third (MIN_RATIO).
    """
    layers, two, heads, tokens, head_dim = kv.shape
    assert two == 2, kv.shape
    raw = kv.detach().contiguous().cpu().view(torch.uint8).numpy().reshape(-1)
    packed = None
    if codec != RAW:
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_planes(raw, kv.element_size()))
        if codec is None:
            codec = ZSTD_PLANES if raw.nbytes >= MIN_RATIO * len(packed) else RAW
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, _DTYPE_CODES[kv.dtype], codec, layers, heads, head_dim, tokens,
                        xxhash.xxh3_64_intdigest(raw))
    if codec == ZSTD_PLANES:
        return head + packed
    out = bytearray(len(head) + raw.nbytes)  # one copy of the raw bytes, straight after the header
    out[: len(head)] = head
    np.frombuffer(out, dtype=np.uint8)[len(head) :] = raw
    return out


@dataclass(frozen=True)
class Header:
    dtype: torch.dtype
    codec: int  # RAW or ZSTD_PLANES
    shape: tuple[int, int, int, int, int]  # (layers, 2, kv_heads, tokens, head_dim)
    checksum: int  # xxh3-64 of the raw bytes


def header(blob: bytes | memoryview) -> Header:
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
    return Header(_DTYPES[code], codec, (layers, 2, heads, tokens, head_dim), checksum)


def deserialize(blob: bytes | memoryview) -> torch.Tensor:
    """Inverse of `serialize`; the checksum is tested before any byte is used.

    A raw blob handed over as a memoryview is not copied: the tensor reads the view's memory (for
    LMDB, the memory map), so it is valid only while the view is, and must not be written to.
    """
    h = header(blob)
    dtype, shape = h.dtype, h.shape
    nbytes = math.prod(shape) * dtype.itemsize
    payload = memoryview(blob)[_HEADER.size :]
    if h.codec == RAW:
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
    if xxhash.xxh3_64_intdigest(raw) != h.checksum:
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
