"""Corpus -> documents: which files are read, and how each becomes documents."""

import pytest
from typer.testing import CliRunner

from ragcache import RagcacheError, corpus
from ragcache.cli import app


def test_discover_keeps_supported_files_and_says_why_others_are_skipped(corpus_dir):
    found = corpus.discover([corpus_dir])
    assert sorted(p.name for p in found.files) == ["facts.jsonl", "france.txt", "moon.json", "notes.md"]
    assert [(p.name, why) for p, why in found.skipped] == [("image.png", "unsupported file type '.png'")]


def test_a_missing_root_is_an_error_naming_it(tmp_path):
    with pytest.raises(RagcacheError, match="no such file or folder") as refused:
        corpus.roots([tmp_path / "nope"])
    assert refused.value.param == "corpus"


def test_each_format_becomes_documents(tmp_path, corpus_dir):
    docs = {}
    for path in corpus.discover([corpus_dir]).files:
        parsed, warnings = corpus.parse(path, path.read_bytes())
        assert warnings == []
        docs[path.name] = [(d.doc_id, d.title) for d in parsed]
    assert docs == {"facts.jsonl": [("w1", "Water"), ("s1", "Spiders")], "france.txt": [("france", "")],
                    "moon.json": [("m1", "Moon")], "notes.md": [("notes", "Germany")]}


def test_binary_and_non_utf8_files_are_refused(tmp_path):
    with pytest.raises(RagcacheError, match="binary"):
        corpus.parse(tmp_path / "a.txt", b"ab\x00cd")
    with pytest.raises(RagcacheError, match="not UTF-8"):
        corpus.parse(tmp_path / "a.txt", b"caf\xe9")


def test_index_scans_the_corpus_once(tmp_path, model_dir, corpus_dir, monkeypatch):
    calls = []
    real = corpus.discover
    monkeypatch.setattr(corpus, "discover", lambda paths: calls.append(paths) or real(paths))
    result = CliRunner().invoke(app, ["index", str(corpus_dir), "-i", str(tmp_path / "idx"), "-m", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
