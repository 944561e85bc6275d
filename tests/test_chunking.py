import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ragcache.chunking import chunk_spans

WORDS = st.sampled_from(["Paris", "is", "the", "capital", "of", "France.", "It", "lies", "on", "Seine!",
                         "supercalifragilisticexpialidocious", "é", "naïve", "1889?", "\n\n", "\n", "  "])


def _count(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _check(text, tok, limit):
    spans = chunk_spans(text, tok, limit)
    # nothing lost, nothing repeated: the spans tile the text up to whitespace between them
    cursor = 0
    for start, end in spans:
        assert start >= cursor and text[cursor:start].strip() == ""
        assert text[start:end] == text[start:end].strip() and end > start
        assert _count(tok, text[start:end]) <= limit
        cursor = end
    assert text[cursor:].strip() == ""
    return spans


@settings(max_examples=40, deadline=None)
@given(words=st.lists(WORDS, min_size=0, max_size=200), limit=st.integers(8, 40))
def test_chunker_never_loses_text_and_respects_the_limit(model, words, limit):
    _check(" ".join(words), model.tokenizer, limit)


def test_chunks_end_at_words_and_prefer_paragraphs(model):
    para = "Paris is the capital of France. It lies on the Seine river in the north."
    text = "\n\n".join([para] * 6)
    spans = _check(text, model.tokenizer, 40)
    assert len(spans) > 1
    for start, end in spans:
        chunk = text[start:end]
        assert end == len(text) or not text[end].isalnum()  # never inside a word
        assert re.fullmatch(r"(.|\n)*[.]", chunk)  # ends at a sentence or paragraph end here


def test_one_word_longer_than_the_limit_is_cut(model):
    text = "x" * 500
    spans = _check(text, model.tokenizer, 8)
    assert "".join(text[s:e] for s, e in spans) == text
