"""Issue 16's defects, each as a user met it: truncated files, paths spelt twice, single-file corpora,
nothing indexable, and what `info` and `ask` say."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import spans
from ragcache import RagCache, indexer
from ragcache.cli import app
from ragcache.store import FilePart
from ragcache.verify import verify

QUESTION = "What is the capital of France?"
runner = CliRunner()


def cli(*args):
    """The real command in a fresh interpreter: a crash (SIGBUS) shows as a negative return code."""
    return subprocess.run([sys.executable, "-m", "ragcache.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir, corpus_dir):
    path = tmp_path_factory.mktemp("built") / "idx"
    result = runner.invoke(app, ["index", str(corpus_dir), "-i", str(path), "-m", str(model_dir), "--chunk-tokens", "24"])
    assert result.exit_code == 0, result.output
    return path


# ---- 1. a truncated data.mdb ------------------------------------------------------------------------
@pytest.mark.parametrize("fraction, commands", [(1 / 3, ("info", "verify", "ask", "index")), (0.0001, ("info",))])
def test_a_truncated_data_file_is_a_one_line_error_never_a_bus_error(tmp_path, built, fraction, commands):
    cut = tmp_path / "cut"
    shutil.copytree(built, cut)
    data = cut / "data.mdb"
    os.truncate(data, int(data.stat().st_size * fraction))
    given = {"info": ["info"], "verify": ["verify"], "ask": ["ask", QUESTION], "index": ["index", built.parent]}
    for args in ([*given[c], "-i", cut] for c in commands):
        proc = cli(*args)
        assert proc.returncode == 1, (args, proc.returncode, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("loading ")]
        assert len(lines) == 1 and lines[0].startswith(f"error: the index file '{data}' is truncated"), proc.stderr
    assert data.stat().st_size == int((built / "data.mdb").stat().st_size * fraction)  # nothing written to it


def test_a_truncated_lock_file_or_vector_file_is_mended(tmp_path, built):
    cut = tmp_path / "cut"
    shutil.copytree(built, cut)
    os.truncate(cut / "lock.mdb", 100)
    os.truncate(cut / "vectors.faiss", 100)
    proc = cli("ask", QUESTION, "-i", cut, "--max-new-tokens", "2")
    assert proc.returncode == 0 and "rebuilt it from" in proc.stderr, proc.stderr
    assert cli("verify", "-i", cut).returncode == 0


# ---- 2. one file, however its path is spelt ---------------------------------------------------------
def test_the_same_files_by_another_path_are_unchanged(tmp_path, model_dir, corpus_dir, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(corpus_dir, tmp_path / "corpus")
    idx = tmp_path / "idx"
    monkeypatch.chdir(work)

    def index(path, *more):
        return json.loads(runner.invoke(app, ["index", str(path), "-i", str(idx), "--json", *more]).stdout)

    first = index("../corpus", "-m", str(model_dir))
    assert index(tmp_path / "corpus")["files_unchanged"] == first["files_indexed"] == 4
    (tmp_path / "link").symlink_to(tmp_path / "corpus")
    assert index(tmp_path / "link")["files_indexed"] == 0
    with RagCache.open(idx) as rc:
        assert sorted(rc.store.files()) == sorted(str((tmp_path / "corpus" / n).resolve()) for n in
                                                  ("facts.jsonl", "france.txt", "moon.json", "notes.md"))
        assert all(".." not in s.source for s in rc.ask(QUESTION, top_k=3, max_new_tokens=1).sources)


def test_verify_repair_mends_a_file_recorded_twice(tmp_path, model, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus], chunk_tokens=24)
        reference = spans(rc)
        real = str((corpus / "france.txt").resolve())
        spelt = str(corpus / ".." / "corpus" / "france.txt")  # as ragcache before 2026-11-23 stored it
        ids = rc.store.files()[real].chunks
        rows = [(rc.store.chunk(cid), np.frombuffer(rc.store.embeddings()[1][0].tobytes(), np.float32), b"x")
                for cid in ids]
        for row in rows:
            row[0].source = spelt
        rc.store.put_batch([FilePart(spelt, "h", rows, fresh=True, complete=True)])
        rc.store.rename_file(real, f"{corpus}/./france.txt")  # and the original under a third spelling
        problems = [p for p in verify(rc).problems if p.part == "file"]
        assert len(problems) == 2 and any("recorded twice" in p.what for p in problems)
        report = verify(rc, repair=True)
        assert report.ok
        assert verify(rc).ok and not verify(rc).problems
        assert spans(rc) == reference  # one record each, by its real path, with its chunks
        hits = [s.chunk_id for s in rc.ask(QUESTION, top_k=rc.store.count(), max_new_tokens=1).sources]
        assert len(hits) == len(set(hits)) == rc.store.count()


# ---- 3. a single-file corpus commits, shows progress and resumes in batches -------------------------
def _records(path: Path, n: int) -> Path:
    words = "Paris Berlin water moon spider capital France river museum tower".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"_id": f"r{i}", "title": words[i % 10], "text": f"Record {i} is about "
                                f"{words[i % 10]} and {words[(i * 7) % 10]}."}) + "\n")
    return path


def test_a_single_file_resumes_within_itself_and_equals_a_clean_build(tmp_path, model, monkeypatch):
    corpus = _records(tmp_path / "records.jsonl", 520)
    with RagCache.open(tmp_path / "clean", model=model) as rc:
        rc.index([corpus])
        clean, clean_vecs = spans(rc), rc.store.embeddings()[1]
    commits, kill_after = [], 7
    real_put = indexer.FilePart

    def counting(*args, **kwargs):
        commits.append(1)
        if len(commits) > kill_after:
            raise KeyboardInterrupt  # Ctrl-C after 7 committed batches
        return real_put(*args, **kwargs)

    with RagCache.open(tmp_path / "idx", model=model) as rc:
        monkeypatch.setattr(indexer, "FilePart", counting)
        with pytest.raises(KeyboardInterrupt):
            rc.index([corpus])
        monkeypatch.undo()
        record = rc.store.file(str(corpus.resolve()))
        assert not record.complete and len(record.chunks) == kill_after * indexer.BATCH_CHUNKS
        done = record.chunks
        progress = []
        monkeypatch.setattr(indexer, "_progress", _Recorder(progress))
        stats = rc.index([corpus])
        assert stats.chunks == 520 - len(done)  # only what was not committed
        assert len(progress) > 1 and sum(progress) == 520 - len(done)  # the bar moved batch by batch
        assert rc.store.file(str(corpus.resolve())).chunks[: len(done)] == done and spans(rc) == clean
        assert np.allclose(rc.store.embeddings()[1], clean_vecs, atol=1e-5)


class _Recorder:
    """Stands in for the progress bar: records each advance."""

    def __init__(self, seen: list):
        self.seen = seen

    def __call__(self, show, total):
        return self

    def __enter__(self):
        return lambda chunks, tokens: self.seen.append(chunks)

    def __exit__(self, *exc):
        return False


def test_a_changed_file_is_replaced_whole_after_a_cut_short_run(tmp_path, model, monkeypatch):
    corpus = _records(tmp_path / "records.jsonl", 100)
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        calls = []
        real_put = indexer.FilePart
        monkeypatch.setattr(indexer, "FilePart", lambda *a, **k: calls.append(1) or (
            (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) > 1 else real_put(*a, **k)))
        with pytest.raises(KeyboardInterrupt):
            rc.index([corpus])
        monkeypatch.undo()
        _records(corpus, 40)  # the file changed before the resume
        rc.index([corpus])
        assert [c[2] for c in spans(rc)[str(corpus.resolve())]] == [
            f"Record {i} is about" in t and t for i, t in enumerate(json.loads(line)["text"] for line in corpus.open())]


# ---- 4. nothing indexable ----------------------------------------------------------------------------
def test_nothing_indexable_exits_1_and_leaves_no_index(tmp_path, model_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_text("")
    (corpus / "blob.txt").write_bytes(b"\x00\x01binary")
    result = runner.invoke(app, ["index", str(corpus), "-i", str(tmp_path / "idx"), "-m", str(model_dir)])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "nothing could be indexed" in error[0] and "empty" in error[0] and "binary" in error[0]
    assert not (tmp_path / "idx").exists()


# ---- 6-8. what ask, info and index say ---------------------------------------------------------------
def test_sources_name_the_passage_and_show_an_excerpt(built):
    result = runner.invoke(app, ["ask", QUESTION, "-i", str(built), "-k", "3", "--max-new-tokens", "1"])
    lines = result.stdout.split("Sources:\n")[1].splitlines()
    assert len(lines) == 6 and all(line.startswith("  [") for line in lines[::2])
    assert all(", chars " in line for line in lines[::2]) and all(line.startswith('      "') for line in lines[1::2])


def test_info_shows_the_index_model_and_version(built, model_dir):
    out = runner.invoke(app, ["info", "-i", str(built)]).stdout
    assert f"model {Path(model_dir).resolve()}" in out and "GritLM" not in out
    assert "RAGCACHE_MODEL" in runner.invoke(app, ["info", "-i", str(built.parent / "none")]).stdout
    assert runner.invoke(app, ["--version"]).stdout.startswith("ragcache ")


def test_loading_is_said_and_a_model_not_trained_to_embed_is_warned_of(tmp_path, model_dir, corpus_dir):
    result = runner.invoke(app, ["index", str(corpus_dir), "-i", str(tmp_path / "idx"), "-m", str(model_dir)])
    assert result.exit_code == 0
    assert result.stderr.startswith("loading model ")
    assert result.stderr.count("was not trained to embed") == 1 and "--embedder" in result.stderr
