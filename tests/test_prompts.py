"""Prompt formats: embeddings tokenised and pooled exactly as GritLM's reference, chat through the template."""

import numpy as np
import pytest
import torch
from conftest import MISTRAL_TOKENIZER
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragcache import RagcacheError, Templates
from ragcache.prompts import Doc, build_layout, chat_text

WORDS = ("the quick brown fox jumps over the lazy dog while Paris remains the capital of France and Berlin "
         "that of Germany").split()


def _text(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def reference_encode(model_dir, texts: list[str], instruction: str) -> np.ndarray:
    """GritLM.encode (ContextualAI/gritlm, gritlm/gritlm.py) as its code reads, on plain transformers.

    The instruction goes through `gritlm_instruction`: '<|user|>\\n' + instruction + '\\n<|embed|>\\n', or
    '<|embed|>\\n' without one. It tokenises `instruction + text` with add_special_tokens=True and
    right padding, runs the model with bidirectional attention over the real tokens, zeroes the
    attention mask over the first len(tokenizer(instruction)['input_ids']) positions, mean-pools over
    the rest and L2-normalises.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    prefix = f"<|user|>\n{instruction}\n<|embed|>\n" if instruction else "<|embed|>\n"
    batch = tokenizer([prefix + t for t in texts], padding=True, return_tensors="pt", add_special_tokens=True)
    real = batch["attention_mask"].bool()  # (b, t)
    mask = torch.zeros(real.shape[0], 1, real.shape[1], real.shape[1])
    mask.masked_fill_(~real[:, None, None, :], torch.finfo(torch.float32).min)  # every token sees every real one
    with torch.no_grad():
        hidden = hf.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    pooled_mask = batch["attention_mask"].clone()
    pooled_mask[:, : len(tokenizer(prefix, add_special_tokens=True)["input_ids"])] = 0
    weights = pooled_mask[..., None].float()
    vectors = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


@pytest.mark.parametrize("instruction", ["", "Retrieve the passage that answers the question"])
def test_embeddings_match_the_reference_encode(model, model_dir, instruction):
    texts = [_text(1), _text(5), _text(200)]
    reference = reference_encode(model_dir, texts, instruction)
    batched = model.embed(texts, instruction=instruction, batch_size=3)
    for i, text in enumerate(texts):
        alone_ref = reference_encode(model_dir, [text], instruction)[0]
        alone = model.embed([text], instruction=instruction, batch_size=1)[0]
        for ours, theirs in ((batched[i], reference[i]), (alone, alone_ref), (batched[i], alone_ref)):
            assert float(np.dot(ours, theirs)) >= 0.9999


def test_embedding_tokens_are_the_references(model):
    """Token for token: the tokenizer's own BOS, and SentencePiece's dummy prefix on the first piece."""
    tok = model.tokenizer
    for instruction in ("", "Find it"):
        prefix = f"<|user|>\n{instruction}\n<|embed|>\n" if instruction else "<|embed|>\n"
        ids, start = model.embed_tokens("Paris is lovely", instruction)
        assert ids == tok(prefix + "Paris is lovely", add_special_tokens=True)["input_ids"]
        assert start == len(tok(prefix, add_special_tokens=True)["input_ids"])


@pytest.mark.skipif(not MISTRAL_TOKENIZER.is_dir(), reason="../shared Mistral tokenizer is absent")
def test_mistral_embedding_prompt_begins_as_the_reference(model):
    ids, _ = model.embed_tokens("hello")
    assert model.tokenizer.convert_ids_to_tokens(ids)[:3] == ["<s>", "▁<", "|"]


GRIT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def test_generation_prompt_is_the_chat_templates_tokens(model):
    """With a chat template, mode 'none' holds exactly apply_chat_template's tokens, then the answer prefix."""
    tok = model.tokenizer
    question = "What is the capital of France?"
    plain = build_layout("none", "doc-first", question, [], [], tok, Templates(answer_prefix=""), "bidirectional")
    assert [t for s in plain for t in s.token_ids] == tok(f"<s><|user|>\n{question}\n<|assistant|>\n",
                                                          add_special_tokens=False)["input_ids"]
    try:
        tok.chat_template = GRIT_TEMPLATE.replace("'\\n' }}{% endfor", "'\\n\\n' }}{% endfor")  # visibly another
        layout = build_layout("none", "doc-first", question, [], [], tok, Templates(answer_prefix=""), "bidirectional")
        expected = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
        assert [t for s in layout for t in s.token_ids] == list(expected)
        assert chat_text(tok, [("user", question)]).startswith("<s><|user|>\n" + question + "\n\n")
    finally:
        tok.chat_template = None


def test_layouts_of_every_mode_hold_the_docs_tokens(model):
    docs = [Doc(7, "Paris is the capital", [1, 5, 6]), Doc(9, "Berlin", [1, 8])]
    for mode, cached in (("doc", True), ("rag", False)):
        layout = build_layout(mode, "doc-first", "q?", [1, 4], docs, model.tokenizer, Templates(), "causal")
        assert [(s.chunk_id, s.token_ids, s.cached) for s in layout if s.kind == "doc"] == \
            [(7, [1, 5, 6], cached), (9, [1, 8], cached)]


def test_templates_file_must_hold_known_strings(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"nope": "x"}')
    with pytest.raises(RagcacheError, match="keys among"):
        Templates.load(bad)
