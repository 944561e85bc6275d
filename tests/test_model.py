import numpy as np
import pytest
import torch
from conftest import build_model

from ragcache import GritModel, RagcacheError
from ragcache.adapter import padded_allowed


@pytest.mark.parametrize("family", ["mistral", "llama", "qwen2"])
def test_attention_switch_per_call(tmp_path, family):
    """Changing the last token moves the first token's state under bidirectional attention only."""
    model = GritModel.load(str(build_model(tmp_path / family, family=family)), device="cpu", dtype="float32")
    a = torch.tensor([[5, 6, 7, 8, 9]])
    b = torch.tensor([[5, 6, 7, 8, 10]])
    pos = torch.arange(5)[None]
    first = {}
    for bidirectional in (True, False):
        allowed = padded_allowed([5], bidirectional, model.device)
        ha, _ = model.forward(a, pos, allowed)
        hb, _ = model.forward(b, pos, allowed)
        first[bidirectional] = (ha[0, 0] - hb[0, 0]).abs().max().item()
    assert first[True] > 1e-4
    assert first[False] == 0.0


def test_embed_is_normalised_numpy(model):
    vecs = model.embed(["Paris is the capital of France.", "A spider has eight legs."])
    assert isinstance(vecs, np.ndarray) and vecs.dtype == np.float32 and vecs.shape == (2, 64)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert model.embed("one text").shape == (64,)


def test_padding_never_changes_an_embedding(model):
    texts = ["short", "a somewhat longer text about the capital of France and its river", "mid length text here"]
    batched = model.embed(texts, batch_size=3)
    for text, vec in zip(texts, batched):
        assert np.abs(model.embed([text], batch_size=1)[0] - vec).max() < 1e-5


def test_embed_format_and_pooling_span(model):
    ids, start = model.embed_tokens("hello world")  # the tokenizer adds BOS (and SentencePiece its dummy prefix)
    assert model.tokenizer.decode(ids[1:start]).lstrip() == "<|embed|>\n"
    assert ids[0] == model.tokenizer.bos_token_id
    ids_i, start_i = model.embed_tokens("hello world", instruction="Retrieve a passage")
    assert ids_i[0] == model.tokenizer.bos_token_id
    assert model.tokenizer.decode(ids_i[1:start_i]).lstrip() == "<|user|>\nRetrieve a passage\n<|embed|>\n"
    assert ids_i[start_i:] == ids[start:]
    # the instruction changes the vector (it is attended to) but is not pooled
    assert not np.allclose(model.embed("hello world"), model.embed("hello world", instruction="Retrieve a passage"))


def test_encode_kv_covers_exactly_the_tokens(model):
    enc = model.encode(["short", "a much longer sequence of several words here"], kv="bidirectional")
    for e in enc:
        cfg = model.hf.config
        assert e.kv.shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, len(e.token_ids),
                              cfg.hidden_size // cfg.num_attention_heads)


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(RagcacheError, match="no model directory"):
        GritModel.load(str(tmp_path / "nope"), device="cpu")


def test_unreachable_hub_names_model_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RagcacheError, match="give a local model directory") as refused:
        GritModel.load("nobody/no-such-model-ragcache", device="cpu")
    assert refused.value.param == "model"  # the CLI adds its --model flag


def test_fingerprint_tracks_weights_not_dtype(tmp_path, model_dir):
    a = GritModel.load(str(model_dir), device="cpu", dtype="float32")
    b = GritModel.load(str(model_dir), device="cpu", dtype="bfloat16")
    other = GritModel.load(str(build_model(tmp_path / "other", seed=1)), device="cpu", dtype="float32")
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()
