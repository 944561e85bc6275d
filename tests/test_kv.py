import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache import kv
from ragcache.adapter import causal_allowed, from_cache, padded_allowed


def _compressible(shape, dtype):
    """Few distinct values: byte planes compress far past MIN_RATIO."""
    return torch.randint(0, 4, shape).to(dtype) / 4


def _codec(blob: bytes) -> int:
    return kv.header(blob).codec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [lambda s, d: torch.randn(s).to(d), _compressible], ids=["random", "compressible"])
def test_serialize_round_trip_is_bit_exact(dtype, make):
    t = make((3, 2, 2, 17, 8), dtype)
    back = kv.deserialize(kv.serialize(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_codec_is_chosen_by_what_compression_saves():
    assert _codec(kv.serialize(torch.randn(2, 2, 2, 64, 8))) == kv.RAW  # float noise: zstd saves little
    assert _codec(kv.serialize(_compressible((2, 2, 2, 64, 8), torch.float32))) == kv.ZSTD_PLANES


def test_raw_blob_is_read_in_place():
    blob = bytearray(kv.serialize(torch.randn(2, 2, 2, 9, 8)))
    t = kv.deserialize(memoryview(blob))
    blob[-4:] = bytes(4)  # the tensor is a view of the blob's memory, not a copy
    assert t.reshape(-1)[-1].item() == 0.0


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(1, 40), half=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_serialize_round_trip_any_shape(layers, heads, tokens, half, dtype):
    shape = (layers, 2, heads, tokens, 2 * half)
    t = torch.randn(shape).to(dtype) if tokens % 2 else _compressible(shape, dtype)  # both codecs
    assert torch.equal(kv.deserialize(kv.serialize(t)).view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("make", [lambda s: torch.randn(s), lambda s: _compressible(s, torch.float32)],
                         ids=["raw", "zstd"])
def test_damaged_blobs_are_detected(make):
    blob = bytearray(kv.serialize(make((2, 2, 2, 64, 8))))
    flipped = bytearray(blob)
    flipped[-5] ^= 0x10
    with pytest.raises(kv.CorruptKV):
        kv.deserialize(bytes(flipped))
    with pytest.raises(kv.CorruptKV):
        kv.deserialize(bytes(blob[: len(blob) // 2]))
    with pytest.raises(kv.CorruptKV):
        kv.deserialize(b"XXXX" + bytes(blob[4:]))


@settings(max_examples=25, deadline=None)
@given(a=st.integers(0, 5000), b=st.integers(0, 5000))
def test_rerotation_composes(a, b):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    keys = torch.randn(2, 2, 5, 8)  # (layers, kv_heads, tokens, head_dim)
    twice = kv.rotate_keys(kv.rotate_keys(keys, a, inv_freq), b, inv_freq)
    assert torch.allclose(twice, kv.rotate_keys(keys, a + b, inv_freq), atol=1e-3)


def test_rerotated_cache_equals_the_model_computing_in_place(model):
    """A segment encoded at 0 and re-rotated to 7 equals the same segment encoded at 7 (causal, alone)."""
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    _, at0 = model.forward(ids, torch.arange(6)[None], padded_allowed([6], False, model.device))
    _, at7 = model.forward(ids, torch.arange(7, 13)[None], padded_allowed([6], False, model.device))
    alone, placed = from_cache(at0, 0, 6), from_cache(at7, 0, 6)
    assert torch.allclose(kv.rotate_keys(alone[:, 0], 7, model.inv_freq), placed[:, 0], atol=1e-5)
    assert torch.allclose(alone[:, 1], placed[:, 1], atol=1e-5)  # values are position-free


def test_causal_allowed_shape():
    m = causal_allowed(2, 3, torch.device("cpu"))
    assert m.shape == (1, 2, 5)
    assert m[0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_checksum_is_tested_before_decompressing():
    blob = bytearray(kv.serialize(_compressible((2, 2, 2, 64, 8), torch.float32), kv.ZSTD_PLANES))
    blob[40] ^= 0x01  # inside the zstd frame
    with pytest.raises(kv.CorruptKV, match="checksum"):
        kv.deserialize(bytes(blob))


def test_blobs_of_another_format_are_refused():
    blob = bytearray(kv.serialize(torch.randn(1, 2, 1, 3, 8)))
    for version, message in ((kv.FORMAT_VERSION - 1, "rebuild the index"), (kv.FORMAT_VERSION + 1, "upgrade")):
        blob[4:6] = version.to_bytes(2, "little")
        with pytest.raises(kv.CorruptKV, match=message):
            kv.deserialize(bytes(blob))


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError):
        kv.serialize(torch.randn(1, 2, 1, 3, 8), 9)
