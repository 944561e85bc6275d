"""The KV layout, in one place: how a segment's keys and values are held, moved and serialised.

A segment's cache is one tensor shaped (layers, 2, kv_heads, tokens, head_dim): index 0 of the
second axis holds keys, index 1 values. Keys are stored already rotated (RoPE) for positions
0..tokens-1, exactly as the model computed them for the segment alone; `rotate_keys` moves them to
the segment's real offset in an assembled sequence. Assembling segments into a model's cache is the
adapter's (adapter.assemble), which calls rotate_keys.

On disk a blob is a fixed 32-byte header followed by the payload, little-endian:
    magic b"RCKV" | version u16 | xxh3-64 u64 of every byte after it | dtype u8 | codec u8 |
    layers u16 | kv_heads u16 | head_dim u16 | tokens u32 | key_group u16 | value_group u16 | sink u16
The checksum covers the rest of the header and the payload as stored, so it is tested before any
byte is decompressed or dequantised, and a damaged shape, dtype or codec field fails it too. A blob
whose version is not this ragcache's is refused as damaged: an index whose meta passed the format
check (meta.py) holds no other, and one that did not is never opened.
Codecs (CODECS names them):
- raw (0): the tensor's bytes, read straight from the memory map at copy speed.
- zstd (1): zstd over byte planes: each value's bytes are split so that the sign-and-exponent bytes
  lie together, which compresses far better than interleaved floats. A blob is stored compressed
  only when that saves a third of its bytes (MIN_RATIO): decompressing runs several times slower
  than a copy, so a smaller saving costs more load time than the disk it frees is worth.
- fp8 (2), int8 (3), int4 (4): lossy, quantised on the KV's device and dequantised on the device
  that uses it (quant.py, which documents the payload); key_group, value_group and sink are the
  statistics' extents and the leading tokens kept exact (0 for raw and zstd).
An index chooses raw or zstd once, from a probe of its first batch (IndexMeta.kv_codec), so indexing
never compresses a blob only to throw the result away. benchmarks/storage.py measures every codec.
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

from . import accel, quant
from .errors import RagcacheError
from .meta import KV_FORMAT as FORMAT_VERSION

MAGIC = b"RCKV"
_HEADER = struct.Struct("<4sHQBBHHHIHHH")
_CHECKED = 14  # the checksum covers blob[_CHECKED:]: the header after it, and the payload
_DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
RAW, ZSTD_PLANES, FP8, INT8, INT4 = 0, 1, 2, 3, 4
CODECS = {"raw": RAW, "zstd": ZSTD_PLANES, "fp8": FP8, "int8": INT8, "int4": INT4}
_QUANT = {FP8: quant.FP8, INT8: quant.INT8, INT4: quant.INT4}
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


def serialize(kv: torch.Tensor, codec: int | None = None, params: quant.Params | None = None) -> bytearray:
    """Header + payload of a (layers, 2, kv_heads, tokens, head_dim) tensor; see the module docstring.

    `codec` fixes the codec (an index chooses it once); None tries zstd and keeps it only when it saves
    a third (MIN_RATIO). A quantised codec runs on kv's device and copies only its payload to the host;
    `params` overrides its defaults (quant.DEFAULTS) and must be of the codec's kind.
    """
    layers, two, heads, tokens, head_dim = kv.shape
    assert two == 2, kv.shape
    if codec is not None and codec not in CODECS.values():
        raise ValueError(f"no KV codec {codec}")
    if codec in _QUANT:
        params = params or quant.DEFAULTS[_QUANT[codec]]
        if params.kind != _QUANT[codec]:
            raise ValueError(f"quantisation parameters {params} do not fit codec {codec}")
        payload = accel.to_host(quant.quantize(kv.detach(), params)).numpy()  # quantised where kv is
        groups = (params.key_group, params.value_group, params.sink)
    else:
        payload, groups = accel.to_host(kv.detach().contiguous()).view(torch.uint8).numpy().reshape(-1), (0, 0, 0)
        if codec != RAW:
            packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(_planes(payload, kv.element_size()))
            if codec is None:
                codec = ZSTD_PLANES if payload.nbytes >= MIN_RATIO * len(packed) else RAW
            if codec == ZSTD_PLANES:
                payload = np.frombuffer(packed, dtype=np.uint8)
    out = bytearray(_HEADER.size + payload.nbytes)  # one copy of the payload, straight after the header
    _HEADER.pack_into(out, 0, MAGIC, FORMAT_VERSION, 0, _DTYPE_CODES[kv.dtype], codec, layers, heads, head_dim,
                      tokens, *groups)
    np.frombuffer(out, dtype=np.uint8)[_HEADER.size :] = payload
    struct.pack_into("<Q", out, _CHECKED - 8, xxhash.xxh3_64_intdigest(memoryview(out)[_CHECKED:]))
    return out


@dataclass(frozen=True)
class Header:
    dtype: torch.dtype
    codec: int  # one of CODECS' values
    shape: tuple[int, int, int, int, int]  # (layers, 2, kv_heads, tokens, head_dim)
    checksum: int  # xxh3-64 of the blob after the checksum: the rest of the header and the payload
    params: quant.Params | None  # a quantised codec's kind, groups and sink; None for raw and zstd


def header(blob: bytes | memoryview) -> Header:
    """Parse a blob's header; raises CorruptKV when it is not one of ours."""
    if len(blob) < _HEADER.size:
        raise CorruptKV("KV blob shorter than its header")
    magic, version, checksum, code, codec, layers, heads, head_dim, tokens, key_group, value_group, sink = \
        _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptKV("KV blob has a wrong header")
    if version != FORMAT_VERSION:
        advice = "upgrade ragcache" if version > FORMAT_VERSION else "rebuild the index"
        raise CorruptKV(f"KV format version {version} is {'newer' if version > FORMAT_VERSION else 'older'} than "
                        f"this ragcache ({FORMAT_VERSION}); {advice}")
    if code not in _DTYPES or codec not in CODECS.values():
        raise CorruptKV("KV blob has a wrong header")
    params = None
    if codec in _QUANT:
        try:
            params = quant.Params(_QUANT[codec], key_group, value_group, sink)
        except ValueError:
            raise CorruptKV("KV blob has a wrong header") from None
    return Header(_DTYPES[code], codec, (layers, 2, heads, tokens, head_dim), checksum, params)


def deserialize(blob: bytes | memoryview, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse of `serialize`, in the original dtype and shape; the checksum is tested before any byte is used.

    A raw blob handed over as a memoryview and read on the CPU (`device` None or the CPU) is not
    copied: the tensor reads the view's memory (for LMDB, the memory map), so it is valid only while
    the view is, and must not be written to. A quantised blob's payload is copied to `device`
    (default the CPU) and dequantised there.
    """
    h = header(blob)
    dtype, shape = h.dtype, h.shape
    nbytes = math.prod(shape) * dtype.itemsize
    view = memoryview(blob)
    payload = view[_HEADER.size :]
    if h.codec != ZSTD_PLANES and len(payload) != (nbytes if h.params is None else
                                                    quant.payload_size(h.params, shape, dtype)):
        raise CorruptKV("KV blob is truncated or overlong")
    if xxhash.xxh3_64_intdigest(view[_CHECKED:]) != h.checksum:
        raise CorruptKV("KV blob fails its checksum")
    if h.codec == ZSTD_PLANES:
        try:
            planes = zstandard.ZstdDecompressor().decompress(payload, max_output_size=nbytes)
        except zstandard.ZstdError as e:
            raise CorruptKV(f"KV blob does not decompress: {e}") from None
        if len(planes) != nbytes:
            raise CorruptKV("KV blob is truncated")
        payload = _unplanes(planes, dtype.itemsize)
    with warnings.catch_warnings():  # a read-only map is fine: callers copy out of it, never into it
        warnings.simplefilter("ignore", UserWarning)
        if h.params is not None:
            packed = torch.frombuffer(payload, dtype=torch.uint8).to(device or "cpu")  # on the CPU: no copy
            return quant.dequantize(packed, h.params, shape, dtype)
        tensor = torch.frombuffer(payload, dtype=dtype).view(shape)
    return tensor if device is None else tensor.to(device)


def _planes(raw: np.ndarray, itemsize: int) -> bytes:
    """Byte planes: every value's first byte, then every second byte...: exponents sit together and compress."""
    return raw.reshape(-1, itemsize).T.tobytes()


def _unplanes(planes: bytes, itemsize: int) -> bytearray:
    out = bytearray(len(planes))
    values = np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)
    for i, plane in enumerate(np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)):
        values[:, i] = plane  # one plane at a time: ~9x faster than numpy's transposed copy
    return out
