"""Indexing on a local Ray cluster (ray.init(num_cpus=2)): the same index as a local run, and resumable."""

import json
import threading
import time

import numpy as np
import pytest
from conftest import SQUAD, spans
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from ragcache import RagCache, RagcacheError  # noqa: E402
from ragcache.cli import app  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Who ruled the duchy?", "Where is Berlin?"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def squad_corpus(tmp_path_factory, corpus_dir):
    """Paragraphs of ../shared's SQuAD sample, a file per article (the small corpus when it is absent)."""
    if not SQUAD.exists():
        return corpus_dir
    root = tmp_path_factory.mktemp("squad-files")
    for i, article in enumerate(json.loads(SQUAD.read_text())["data"]):
        lines = [json.dumps({"_id": f"a{i}p{j}", "title": article["title"], "text": p["context"]})
                 for j, p in enumerate(article["paragraphs"][:6])]
        (root / f"article{i}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _embeddings(rc) -> dict[tuple, np.ndarray]:
    ids, vecs = rc.store.embeddings()
    return {(c.source, c.start, c.end): v for c, v in zip(map(rc.store.chunk, ids.tolist()), vecs)}


def test_a_ray_index_equals_a_local_one(tmp_path, cluster, model, model_dir, squad_corpus):
    """`ragcache index --ray local --workers 2`, as a user runs it, against a local run of the same corpus."""
    with RagCache.open(tmp_path / "local", model=model) as local:
        local.index([squad_corpus], chunk_tokens=96)
        want_spans, want_vecs = spans(local), _embeddings(local)
        want = [local.ask(q, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True) for q in QUESTIONS]
    runner, idx = CliRunner(), str(tmp_path / "ray")
    result = runner.invoke(app, ["index", str(squad_corpus), "-i", idx, "-m", str(model_dir), "--chunk-tokens", "96",
                                 "--ray", "local", "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["chunks"] == sum(map(len, want_spans.values())) and stats["files_indexed"] == len(want_spans)
    with RagCache.open(idx, model=model) as rc:
        assert spans(rc) == want_spans  # the same chunks, file by file
        got_vecs = _embeddings(rc)
        assert got_vecs.keys() == want_vecs.keys()
        assert max(float(np.abs(got_vecs[k] - want_vecs[k]).max()) for k in want_vecs) < 1e-5
        for q, w in zip(QUESTIONS, want):
            a = rc.ask(q, mode="doc", top_k=2, max_new_tokens=6, ignore_eos=True)
            assert [(s.source, s.start) for s in a.sources] == [(s.source, s.start) for s in w.sources]
            assert a.token_ids == w.token_ids
        again = rc.index([squad_corpus], chunk_tokens=96, ray="local")
        assert again.files_unchanged == len(want_spans) and again.chunks == 0
    bad = runner.invoke(app, ["index", str(squad_corpus), "-i", idx, "--workers", "0", "--ray", "local"])
    assert bad.exit_code == 1 and "--workers must be at least 1" in bad.output


def test_a_killed_worker_stops_the_run_in_one_line_and_a_rerun_resumes(tmp_path, cluster, model, many):
    corpus, reference, _ = many
    idx = tmp_path / "idx"
    failure: list = []
    killed: list = []

    def index() -> None:
        with RagCache.open(idx, model=model) as rc:
            try:
                rc.index([corpus], chunk_tokens=24, ray="local", workers=1)
            except RagcacheError as e:
                failure.append(e)

    def kill_twice() -> None:  # Ray restarts a dead actor once and runs its call again: the second death stops the run
        for _ in range(2):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and thread.is_alive():
                names = [a for a in ray.util.list_named_actors() if a.startswith("ragcache-encoder-")]
                if names:
                    try:
                        ray.kill(ray.get_actor(names[0]), no_restart=False)
                        killed.append(names[0])
                        time.sleep(1.0)
                        break
                    except ValueError:
                        pass
                time.sleep(0.05)

    thread = threading.Thread(target=index)
    thread.start()
    kill_twice()
    thread.join(timeout=300)
    assert killed
    if failure:
        assert "run the same command again to resume" in str(failure[0])
    with RagCache.open(idx, model=model) as rc:
        rc.index([corpus], chunk_tokens=24, ray="local", workers=1)
        assert spans(rc) == reference  # nothing missing, nothing twice
        assert rc.store.count() == sum(map(len, reference.values()))


def test_tasks_are_small_enough_to_stream_and_hold_every_file_once():
    from ragcache.corpus import Document
    from ragcache.distributed import FILES_PER_TASK, FileWork, _tasks
    works = [FileWork(f"f{i}", "h", [Document(str(i), "", "x" * (100 + i))], 0) for i in range(40)]
    tasks = _tasks(works, actors=2)
    assert sorted(w.source for t in tasks for w in t) == sorted(w.source for w in works)
    assert len(tasks) >= 8 and all(len(t) <= FILES_PER_TASK for t in tasks)  # about 4 an actor
    assert tasks[0][0].source == "f39"  # the largest first
    assert [[w.source for w in t] for t in _tasks(works[:1], actors=4)] == [["f0"]]
