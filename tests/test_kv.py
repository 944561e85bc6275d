import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache import kv
from ragcache.model import causal_allowed, padded_allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_serialize_round_trip_is_bit_exact(dtype):
    t = torch.randn(3, 2, 2, 17, 8).to(dtype)
    back = kv.deserialize(kv.serialize(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(1, 40), half=st.integers(1, 8),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_serialize_round_trip_any_shape(layers, heads, tokens, half, dtype):
    t = torch.randn(layers, 2, heads, tokens, 2 * half).to(dtype)
    assert torch.equal(kv.deserialize(kv.serialize(t)).view(torch.uint8), t.view(torch.uint8))


def test_damaged_blobs_are_detected():
    blob = bytearray(kv.serialize(torch.randn(2, 2, 2, 9, 8)))
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
    t = torch.randn(2, 2, 2, 5, 8)
    twice = kv.rerotate(kv.rerotate(t, a, inv_freq), b, inv_freq)
    assert torch.allclose(twice, kv.rerotate(t, a + b, inv_freq), atol=1e-3)
    assert torch.equal(twice[:, 1], t[:, 1])  # values never move


def test_rerotated_cache_equals_the_model_computing_in_place(model):
    """A segment encoded at 0 and re-rotated to 7 equals the same segment encoded at 7 (causal, alone)."""
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    _, at0 = model.forward(ids, torch.arange(6)[None], padded_allowed([6], False, model.device))
    _, at7 = model.forward(ids, torch.arange(7, 13)[None], padded_allowed([6], False, model.device))
    moved = kv.rerotate(kv.from_cache(at0, 0, 6), 7, model.inv_freq)
    assert torch.allclose(moved, kv.from_cache(at7, 0, 6), atol=1e-5)


def test_causal_allowed_shape():
    m = causal_allowed(2, 3, torch.device("cpu"))
    assert m.shape == (1, 2, 5)
    assert m[0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
