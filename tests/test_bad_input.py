"""Bad input, case by case: a one-line error and exit 1, or a skip with a count and a reason; never a
traceback, and nothing already stored is lost. (Missing paths, an index path that is a file, empty
questions, top-k of 0 or below and unknown modes are in test_cli.py; Ctrl-C is in test_reliability.py.)
"""

import json
import os
import pathlib
import shutil

import lmdb
import pytest
from conftest import build_model
from typer.testing import CliRunner

from ragcache import indexer
from ragcache.cli import app

runner = CliRunner()
QUESTION = "What is the capital of France?"


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception  # no traceback
    return result


def fails(*args, message: str) -> str:
    """The command exits 1 with exactly one line, `error: ...`, that holds `message` (beside notes and warnings)."""
    result = run(*args)
    lines = [line for line in result.output.strip().splitlines() if not line.startswith(("loading ", "warning: "))]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def index(tmp_path_factory, model_dir, corpus_dir):
    path = tmp_path_factory.mktemp("bad-input") / "idx"
    assert run("index", corpus_dir, "-i", path, "-m", model_dir, "--chunk-tokens", "24").exit_code == 0
    return path


def _chunks(index) -> int:
    return json.loads(run("info", "-i", index, "--json").stdout)["index_info"]["chunks"]


# ---- paths ---------------------------------------------------------------------------------------------
def test_empty_folder(tmp_path, index, model_dir):
    (tmp_path / "empty").mkdir()
    fails("index", tmp_path / "empty", "-i", tmp_path / "new", "-m", model_dir, message="nothing to index")
    assert not (tmp_path / "new").exists()  # no index was created
    n = _chunks(index)
    result = run("index", tmp_path / "empty", "-i", index)  # into an index: nothing to do, nothing lost
    assert result.exit_code == 0 and "indexed 0 files" in result.output and _chunks(index) == n


def test_index_path_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    for command in (["ask", QUESTION], ["verify"], ["info"]):
        fails(*command, "-i", tmp_path / "afile", message="is a file, not a folder")


def test_unreadable_file_is_skipped_with_its_reason(tmp_path, model_dir, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_text("Paris is the capital of France.")
    secret = corpus / "secret.txt"
    secret.write_text("You may not read this.")
    secret.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the read fail as it would for anyone else
        read = pathlib.Path.read_bytes
        monkeypatch.setattr(pathlib.Path, "read_bytes", lambda p: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")) if p.name == "secret.txt" else read(p))
    result = run("index", corpus, "-i", tmp_path / "idx", "-m", model_dir, "--verbose")
    assert result.exit_code == 0 and "indexed 1 files" in result.output and "1 skipped" in result.output
    assert f"skipped {secret}: Permission denied" in result.output


def test_symlink_loops_broken_links_and_pipes_are_skipped(tmp_path, model_dir):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "ok.txt").write_text("Paris is the capital of France.")
    (corpus / "sub" / "up").symlink_to("..")  # a folder loop
    (corpus / "a.txt").symlink_to("b.txt")  # a file loop
    (corpus / "b.txt").symlink_to("a.txt")
    (corpus / "gone.txt").symlink_to("nowhere.txt")
    os.mkfifo(corpus / "pipe.txt")  # reading it would wait forever
    result = run("index", corpus, "-i", tmp_path / "idx", "-m", model_dir, "--verbose")
    assert result.exit_code == 0 and "indexed 1 files" in result.output and "4 skipped" in result.output
    for name, why in (("a.txt", "a loop of symbolic links"), ("b.txt", "a loop of symbolic links"),
                      ("gone.txt", "a broken symbolic link"), ("pipe.txt", "not a regular file")):
        assert f"skipped {corpus / name}: {why}" in result.output
    (tmp_path / "self").symlink_to("self")
    fails("index", tmp_path / "self", "-i", tmp_path / "idx", message="a loop of them")


# ---- files and records ---------------------------------------------------------------------------------
def test_bad_files_and_records_are_skipped_and_counted(tmp_path, model_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("Paris is the capital of France.")
    (corpus / "latin1.txt").write_bytes("Café au lait".encode("latin-1"))
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (corpus / "empty.txt").write_text("")
    with open(corpus / "huge.txt", "wb") as f:  # 50 MB on one line
        f.write(b"word " * (10 * 2**20))
    (corpus / "lines.jsonl").write_text('{"text": "Berlin is the capital of Germany."}\n{not json\n'
                                        '{"title": "no text here"}\n{"text": "Water boils at 100 degrees."}\n')
    (corpus / "records.json").write_text('[{"title": "untitled"}, {"text": "The moon orbits the earth."}]')
    idx = tmp_path / "idx"
    result = run("index", corpus, "-i", idx, "-m", model_dir, "--verbose")
    assert result.exit_code == 0, result.output
    assert "indexed 3 files" in result.output and "4 skipped" in result.output  # empty.txt: skipped, empty
    for line in (f"skipped {corpus / 'latin1.txt'}: not UTF-8 (byte 3)",
                 f"skipped {corpus / 'image.txt'}: binary content",
                 f"skipped {corpus / 'empty.txt'}: empty",
                 f"skipped {corpus / 'huge.txt'}: 50.0 MB, over the 20 MB limit (--max-file-mb raises it)",
                 f"warning: {corpus / 'lines.jsonl'}:2: not valid JSON, line skipped",
                 f"warning: {corpus / 'lines.jsonl'}:3: record has no 'text' string, skipped",
                 f"warning: {corpus / 'records.json'}[0]: record has no 'text' string, skipped"):
        assert line in result.output.splitlines(), line
    info = json.loads(run("info", "-i", idx, "--json").stdout)["index_info"]
    assert (info["chunks"], info["files"]) == (4, 3)  # good, two JSONL records, one JSON record
    fails("index", corpus, "-i", idx, "--max-file-mb", "0", message="--max-file-mb must be more than 0")


# ---- questions and options -----------------------------------------------------------------------------
def test_question_longer_than_the_context(index):
    fails("ask", "word " * 5000, "-i", index, message="more than the model's context of 4096")


def test_top_k_larger_than_the_corpus_takes_every_chunk(index):
    result = run("ask", QUESTION, "-i", index, "-k", "1000", "--json", "--max-new-tokens", "1")
    assert result.exit_code == 0 and len(json.loads(result.stdout)["sources"]) == _chunks(index)


# ---- the index itself ----------------------------------------------------------------------------------
def test_index_built_by_another_model(tmp_path, index, corpus_dir):
    other = build_model(tmp_path / "other", seed=7)
    n = _chunks(index)
    for command in (["ask", QUESTION], ["index", corpus_dir], ["verify"]):
        fails(*command, "-i", index, "-m", other, message="its caches are only valid for the model that made them")
    assert _chunks(index) == n


def test_index_from_a_newer_ragcache(tmp_path, index, corpus_dir):
    newer = tmp_path / "newer"
    shutil.copytree(index, newer)
    env = lmdb.open(str(newer), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        meta = json.loads(txn.get(b"index"))
        txn.put(b"index", json.dumps(meta | {"format_version": 99}).encode())
    env.close()
    for command in (["ask", QUESTION], ["index", corpus_dir], ["verify", "--repair"]):
        fails(*command, "-i", newer, message="has format version 99, newer than this ragcache (3); upgrade ragcache")


class _FullDisk:
    """An LMDB environment on a disk that fills up after `room` write transactions: the next commit fails."""

    def __init__(self, env, room: int):
        self.env, self.room = env, room

    def __getattr__(self, name):
        return getattr(self.env, name)

    def begin(self, write: bool = False, **kwargs):
        txn = self.env.begin(write=write, **kwargs)
        if write:
            self.room -= 1
            if self.room < 0:
                return _FailingCommit(txn)
        return txn


class _FailingCommit:
    def __init__(self, txn):
        self.txn = txn

    def __enter__(self):
        return self.txn

    def __exit__(self, kind, *rest):
        self.txn.abort()
        if kind is None:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")


def test_disk_full_during_indexing(tmp_path, model_dir, corpus_dir, monkeypatch):
    idx = tmp_path / "idx"
    real_open = lmdb.open
    with monkeypatch.context() as m:
        m.setattr(indexer, "BATCH_CHUNKS", 1)  # a commit a chunk: facts.jsonl's two, then france.txt's one
        m.setattr(lmdb, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), room=5))  # meta, codec, 2 files
        fails("index", corpus_dir, "-i", idx, "-m", model_dir,
              message=f"cannot write to the index '{idx}': the disk is full; everything committed before is kept")
    result = run("verify", "-i", idx)  # the two files written before are whole; FAISS was never saved
    assert result.exit_code == 1 and result.stdout.splitlines()[-1].endswith("from 2 files: 1 problem")
    assert "index: faiss: missing" in result.output
    with monkeypatch.context() as m:  # the disk fills up as the vector index is saved
        m.setattr("faiss.write_index", lambda *a: (_ for _ in ()).throw(RuntimeError("write error: No space left")))
        result = run("index", corpus_dir, "-i", idx)
    assert result.exit_code == 1 and result.stdout == ""
    assert [line for line in result.stderr.splitlines() if not line.startswith("loading ")] == [  # what was rebuilt, then why it could not be saved
        "warning: the vector index was missing (an interrupted run?); rebuilt it from 3 stored embeddings",
        f"error: cannot save the vector index '{idx / 'vectors.faiss'}' (write error: No space left); the stored "
        "chunks are safe and it is rebuilt from them when the index is next opened"]
    result = run("index", corpus_dir, "-i", idx, "--json")
    stats = json.loads(result.stdout)
    assert result.exit_code == 0 and (stats["files_unchanged"], stats["files_indexed"]) == (4, 0)
    assert run("verify", "-i", idx).exit_code == 0
