"""Damage, crashes and concurrency: the index explains itself and loses nothing."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import damage_kv, spans
from starlette.testclient import TestClient

from ragcache import RagCache, RagcacheError
from ragcache import store as storelib
from ragcache.server import create_app
from ragcache.store import unkey
from ragcache.vectors import Vectors
from ragcache.verify import verify

QUESTION = "What is the capital of France?"
ROOT = Path(__file__).resolve().parents[1]


class Forks:
    """Client of tests/forkserver.py: real CLI runs in forked children, signalled at chosen moments."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, *args, batch_chunks: int | None = None) -> int:
        return self._ask(start=[str(a) for a in args], out=str(self.tmp / "out"), err=str(self.tmp / "err"),
                         batch_chunks=batch_chunks)["pid"]

    def finish(self, pid: int, sig: int | None = None, ready: Path | None = None, size: int = 1,
               delay: float = 0.0) -> dict:
        reply = self._ask(pid=pid, signal=sig, ready=str(ready) if ready else None, size=size, delay=delay)
        return reply | {"out": (self.tmp / "out").read_text(), "err": (self.tmp / "err").read_text()}

    def run(self, *args, sig: int | None = None, ready: Path | None = None, size: int = 1, delay: float = 0.0) -> dict:
        return self.finish(self.start(*args), sig, ready, size, delay)


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    forks = Forks(tmp_path_factory.mktemp("forks"))
    yield forks
    forks.proc.stdin.close()
    forks.proc.wait(timeout=30)


def _check_invariants(path: Path, model, reference: dict, capsys) -> int:
    """Everything a killed run must leave: returns how many files the index holds complete."""
    capsys.readouterr()
    with RagCache.open(path, model=model) as rc:
        store = rc.store
        with store.snapshot() as txn:
            ids = {name: {unkey(k) for k, _ in txn.cursor(db=store.db[name])} for name in ("chunks", "emb", "kv")}
        assert ids["chunks"] == ids["emb"] == ids["kv"]  # a chunk's text, embedding and KV: all or none
        files = store.files()
        listed = [cid for rec in files.values() for cid in rec.chunks]
        assert sorted(listed) == sorted(ids["chunks"])  # every chunk in exactly one file; every listed one there
        stored = spans(rc)
        for source, chunks in stored.items():  # whole chunks, each file a prefix of itself, complete when marked
            assert chunks == reference[source][: len(chunks)]
            assert (chunks == reference[source]) or not files[source].complete

        stale = Vectors.load(path / "vectors.faiss", store.version()) is None
        assert len(rc.vectors()) == len(ids["chunks"])  # FAISS agrees, or is rebuilt from LMDB...
        assert ("rebuilt it from" in capsys.readouterr().err) == (stale and bool(listed))  # ...saying so
        if rc.meta is not None:
            assert verify(rc).ok, verify(rc).problems  # every blob's header and checksum; FAISS saved again
        if listed:
            assert rc.ask(QUESTION, top_k=2, max_new_tokens=2).sources
        else:
            with pytest.raises(RagcacheError, match="holds no documents|is empty"):
                rc.ask(QUESTION, top_k=2, max_new_tokens=2)
        return sum(rec.complete for rec in files.values())


def test_sigkill_at_random_moments_loses_nothing_and_resumes(tmp_path, forks, many, model, model_dir, capsys):
    """`index` killed at random moments, over and over: each time the index is whole, and a resume completes it.

    A moment is a random point of the run's progress, not of the clock, which a busy machine stretches
    tenfold: the kill comes when LMDB's file has grown to a random size between what it holds and what
    the whole corpus takes (often in the middle of a commit, between its pages and its meta page),
    plus up to 20 ms.
    """
    corpus, reference, full_size = many
    idx = tmp_path / "idx"
    rng = random.Random(11)
    kills, partial, held = 0, 0, 0
    for _ in range(40):
        size = (idx / "data.mdb").stat().st_size if (idx / "data.mdb").exists() else 0
        target = size + int(rng.uniform(0, 1) * full_size * (1 - held / len(reference)))
        run = forks.run("index", corpus, "-i", idx, "-m", model_dir, "--chunk-tokens", "24", sig=signal.SIGKILL,
                        ready=idx / "data.mdb", size=max(target, 1), delay=rng.uniform(0, 0.02))
        held = _check_invariants(idx, model, reference, capsys)
        if run["signalled"]:
            kills += 1
            partial += 0 < held < len(reference)
            if kills >= 10:
                break
        else:  # it finished before the kill: begin again on a fresh index
            assert run["code"] == 0 and held == len(reference), run
            shutil.rmtree(idx)
            held = 0
    assert kills >= 10 and partial >= 3, (kills, partial)

    with RagCache.open(idx, model=model) as rc:
        before = {source: rec.chunks for source, rec in rc.store.files().items()}
        complete = sum(rec.complete for rec in rc.store.files().values())
        stats = rc.index([corpus], chunk_tokens=24)
        assert (stats.files_unchanged, stats.files_indexed) == (complete, len(reference) - complete)
        after = rc.store.files()
        assert all(after[source].chunks[: len(ids)] == ids for source, ids in before.items())  # nothing redone
        assert spans(rc) == reference  # nothing missing, nothing twice
        assert rc.store.count() == sum(map(len, reference.values()))


def test_ctrl_c_during_index_and_ask(tmp_path, forks, many, model, model_dir, capsys):
    corpus, reference, full_size = many
    idx = tmp_path / "idx"
    run = forks.run("index", corpus, "-i", idx, "-m", model_dir, "--chunk-tokens", "24", sig=signal.SIGINT,
                    ready=idx / "data.mdb", size=full_size // 2)  # half way
    assert run["signalled"] and run["code"] == 130, run
    assert run["err"].strip().splitlines()[-1] == "interrupted"
    held = _check_invariants(idx, model, reference, capsys)
    assert 0 < held < len(reference)

    # a long answer, interrupted once it streams
    run = forks.run("ask", QUESTION, "-i", idx, "-k", "1", "--max-new-tokens", "3000", sig=signal.SIGINT,
                    ready=forks.tmp / "out", delay=0.05)
    assert run["signalled"] and run["code"] == 130, run
    assert run["err"].strip().splitlines()[-1] == "interrupted" and run["out"]
    assert _check_invariants(idx, model, reference, capsys) == held


def test_readers_keep_answering_while_index_writes(tmp_path, forks, many, model, model_dir, corpus_dir, monkeypatch):
    """ask and serve answer from consistent snapshots while another process indexes, even as it grows the map;
    a second writer is refused at once, naming the first."""
    corpus, reference, _ = many
    idx = tmp_path / "idx"
    monkeypatch.setattr(storelib, "_MAP_SIZE", 1 << 20)  # this process maps 1 MiB; the writer's data outgrows it
    with RagCache.open(idx, model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        first = rc.store.count()
        client = TestClient(create_app(rc))
        # commits of 4 chunks: with the default 64 the writer's 120 chunks land in two commits, and a reader
        # iteration slowed by the writer could see none between them
        pid = forks.start("index", corpus, "-i", idx, "--chunk-tokens", "24", batch_chunks=4)
        counts, refused = [], False
        deadline = time.monotonic() + 120
        while rc.store.count() < first + sum(map(len, reference.values())):
            assert time.monotonic() < deadline
            if not refused and rc.store.count() > first:  # the writer has committed, so it holds the lock
                with pytest.raises(RagcacheError, match=f"being written by process {pid}"):
                    rc.index([corpus_dir])
                refused = True
            assert len(rc.ask(QUESTION, top_k=3, max_new_tokens=2).sources) == 3
            chat = {"model": model.name, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2,
                    "rag": {"top_k": 2}}
            reply = client.post("/v1/chat/completions", json=chat)
            assert reply.status_code == 200 and len(reply.json()["sources"]) == 2
            counts.append(rc.store.count())
        assert forks.finish(pid)["code"] == 0
        assert counts == sorted(counts) and any(first < c < counts[-1] for c in counts), counts
        assert rc.store.env.info()["map_size"] > 1 << 20  # adopted the writer's larger map
        assert verify(rc).ok


def test_second_index_is_refused_at_once_naming_the_writer(tmp_path, forks, model, model_dir, corpus_dir):
    idx = tmp_path / "idx"
    with RagCache.open(idx, model=model) as rc:
        rc.index([corpus_dir])
        rc.store.lock_for_writing()  # as an `index` run holds it
        run = forks.run("index", corpus_dir, "-i", idx)
        assert run["code"] == 1
        assert run["err"].strip() == (f"error: the index '{idx}' is being written by process {os.getpid()}; "
                                      "wait for it to finish")
        run = forks.run("verify", "-i", idx, "--repair")
        assert run["code"] == 1 and f"process {os.getpid()}" in run["err"]
        assert forks.run("verify", "-i", idx)["code"] == 0  # checking alone needs no lock
        rc.store.unlock()


@pytest.mark.parametrize("how", ["flip", "truncate", "header"])
def test_damaged_cache_is_recomputed_from_text_with_a_warning(tmp_path, model, corpus_dir, capsys, how):
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        before = rc.ask(QUESTION, mode="doc-query", top_k=2, max_new_tokens=6, ignore_eos=True)
        damage_kv(rc, before.sources[0].chunk_id, how)
        capsys.readouterr()
        after = rc.ask(QUESTION, mode="doc-query", top_k=2, max_new_tokens=6, ignore_eos=True)
    assert after.token_ids == before.token_ids
    assert (after.first_logits - before.first_logits).abs().max().item() < 1e-4
    err = capsys.readouterr().err
    assert err.count("damaged") == 1 and f"chunk {before.sources[0].chunk_id}" in err