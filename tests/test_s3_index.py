"""An index whose chunk caches live in an S3-compatible object store (moto's server on loopback, over HTTP)."""

import json
import random
import shutil
import signal

import pytest
from conftest import Served, spans
from typer.testing import CliRunner

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

import boto3  # noqa: E402

from ragcache import RagCache, RagcacheError  # noqa: E402
from ragcache import kvremote  # noqa: E402
from ragcache.diskcache import SUFFIX  # noqa: E402
from ragcache.cli import app  # noqa: E402
from ragcache.verify import verify  # noqa: E402

QUESTION = "What is the capital of France?"


def _objects(bucket: str, prefix: str = "kv/") -> dict[str, int]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: o["Size"] for o in listing}


def _ask(rc, **kw):
    return rc.ask(QUESTION, mode="doc", top_k=3, max_new_tokens=6, ignore_eos=True, **kw)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGCACHE_HOME", str(tmp_path / "home"))  # the local disk cache lives under it
    return tmp_path / "home"


@pytest.fixture
def s3_index(tmp_path, model, corpus_dir, s3_bucket, home):
    url = f"s3://{s3_bucket}/kv"
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24, kv_store=url)
    return tmp_path / "idx", url


def test_index_and_ask_through_the_store_equal_a_local_index(tmp_path, model, corpus_dir, s3_index, s3_bucket):
    path, url = s3_index
    with RagCache.open(tmp_path / "local", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24)
        local = _ask(rc)
    with RagCache.open(path, model=model) as rc:
        assert rc.meta.kv_store == url
        with rc.store.snapshot() as txn:  # LMDB holds references; the blobs are objects
            keys = [kvremote.referenced_key(v) for _, v in txn.cursor(db=rc.store.db["kv"])]
        assert all(keys) and set(keys) == set(_objects(s3_bucket)) and len(keys) == rc.store.count()
        first, again = _ask(rc), _ask(rc)
    assert first.token_ids == local.token_ids and (first.first_logits - local.first_logits).abs().max() < 1e-5
    assert set(first.kv_served_by.values()) == {"object-store"}
    assert set(again.kv_served_by.values()) == {"disk"}  # the local disk cache served the second ask
    assert again.kv_tiers["disk"]["hits"] == 3 and again.token_ids == first.token_ids


def test_identical_chunks_in_two_indexes_are_one_object(tmp_path, model, corpus_dir, s3_index, s3_bucket):
    path, url = s3_index
    before = _objects(s3_bucket)
    with RagCache.open(tmp_path / "second", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24, kv_store=url)
        assert rc.stored.objects.stats.skipped == len(before) and rc.stored.objects.stats.written == 0
    assert _objects(s3_bucket) == before


def test_a_deleted_object_is_recomputed_and_verify_reports_and_repairs_it(model, s3_index, s3_bucket, capsys):
    path, url = s3_index
    with RagCache.open(path, model=model) as rc:
        rc.use_tiers(0, 0, local_gb=0)
        rc.cost.recompute_is_faster = lambda *a: False  # a tiny model recomputes faster than moto serves
        before = _ask(rc)
        gone = before.sources[0].chunk_id
        with rc.store.kv_views([gone]) as (record,):
            key = kvremote.referenced_key(record)
        boto3.client("s3").delete_object(Bucket=s3_bucket, Key=f"kv/{key}")
        capsys.readouterr()
        after = _ask(rc)
        assert after.kv_served_by[gone] == "recomputed" and after.token_ids == before.token_ids
        assert f"chunk {gone} is missing" in capsys.readouterr().err
        report = verify(rc)
        assert [(p.chunk_id, p.part) for p in report.problems] == [(gone, "kv")]
        assert "missing from" in report.problems[0].what
        assert verify(rc, repair=True).ok and verify(rc).ok and key in _objects(s3_bucket)


def test_an_unreachable_store_at_question_time_recomputes_with_one_warning(tmp_path, model, corpus_dir, home,
                                                                           monkeypatch, capsys):
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket="ours")
    with RagCache.open(tmp_path / "idx", model=model) as rc:
        rc.index([corpus_dir], chunk_tokens=24, kv_store="s3://ours/kv")
        rc.use_tiers(0, 0, local_gb=0)
        rc.cost.recompute_is_faster = lambda *a: False
        before = _ask(rc)
        server.stop()
        server._server.server_close()  # as a dead server: nothing listens
        capsys.readouterr()
        after = _ask(rc)
        err = capsys.readouterr().err
        assert after.token_ids == before.token_ids and set(after.kv_served_by.values()) == {"recomputed"}
        assert err.count("warning:") == 1 and "cannot reach the endpoint" in err and "recomputing 3" in err


def test_index_time_faults_are_one_line_and_write_nothing(tmp_path, model_dir, corpus_dir, s3_env, s3_bucket,
                                                          monkeypatch):
    runner = CliRunner()
    idx = tmp_path / "idx"
    base = ["index", str(corpus_dir), "-i", str(idx), "-m", str(model_dir), "--chunk-tokens", "24"]
    result = runner.invoke(app, base + ["--kv-store", "s3://no-such-bucket-here/kv"])
    assert result.exit_code == 1 and "there is no bucket 'no-such-bucket-here'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not idx.exists()
    result = runner.invoke(app, base + ["--kv-store", "ftp://x/y"])
    assert result.exit_code == 1 and "s3://" in result.output and "Traceback" not in result.output
    with monkeypatch.context() as m:  # no credentials anywhere: one line, nothing written
        m.delenv("AWS_ACCESS_KEY_ID")
        m.delenv("AWS_SECRET_ACCESS_KEY")
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")
        result = runner.invoke(app, base + ["--kv-store", f"s3://{s3_bucket}/kv"])
    assert result.exit_code == 1 and "no AWS credentials" in result.output and not idx.exists()
    assert len(result.output.strip().splitlines()) == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    result = runner.invoke(app, base + ["--kv-store", f"s3://{s3_bucket}/kv"])
    assert result.exit_code == 1 and "cannot reach the endpoint" in result.output and not idx.exists()


def test_gc_lists_and_removes_only_what_no_index_references(tmp_path, model, s3_index, s3_bucket):
    path, url = s3_index
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="kv/stray/object", Body=b"left by a killed run")
    held = set(_objects(s3_bucket)) - {"stray/object"}
    runner = CliRunner()
    listed = runner.invoke(app, ["gc", url, "-i", str(path), "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == {"referenced": len(held), "orphans": ["stray/object"], "deleted": False}
    assert "stray/object" in _objects(s3_bucket)  # listed, not deleted without --yes
    done = runner.invoke(app, ["gc", url, "-i", str(path), "--yes"])
    assert done.exit_code == 0 and "deleted 1 objects" in done.stdout
    assert set(_objects(s3_bucket)) == held
    with RagCache.open(path, model=model) as rc:
        assert verify(rc).ok


def test_two_replicas_sharing_the_store_answer_alike(tmp_path, model, s3_index, home):
    path, _ = s3_index
    shutil.copytree(path, tmp_path / "replica-a")
    shutil.copytree(path, tmp_path / "replica-b")
    answers = []
    for name, local_gb in (("replica-a", 1.0), ("replica-b", 0.0)):
        with RagCache.open(tmp_path / name, model=model) as rc:
            rc.use_tiers(0, 0, local_gb=local_gb)
            answers.append([_ask(rc).token_ids for _ in range(2)] + [rc.ask(q, top_k=2, max_new_tokens=4).token_ids
                                                                    for q in ("Who wrote the book?", "Where is Berlin?")])
    assert answers[0] == answers[1]


def test_two_serve_processes_sharing_the_store_answer_alike(tmp_path, s3_index, s3_bucket):
    """Two `ragcache serve` processes, each on its own copy of the index folder and its own local disk
    cache, read the one store and answer every question identically."""
    path, _ = s3_index
    servers = []
    for name in ("replica-a", "replica-b"):
        shutil.copytree(path, tmp_path / name)
        servers.append(Served(tmp_path / name, {"RAGCACHE_HOME": str(tmp_path / f"home-{name}")}))
    try:
        for server in servers:
            server.wait_ready()
        answers = []
        for server in servers:
            replies, model = [], server.request("/v1/models")[1]["data"][0]["id"]
            for question in (QUESTION, "Who wrote the book?", "Where is Berlin?", QUESTION):
                status, reply = server.request("/v1/chat/completions", {
                    "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 6,
                    "temperature": 0, "ignore_eos": True, "rag": {"mode": "doc", "top_k": 3}})
                assert status == 200, reply
                replies.append((reply["choices"][0]["message"]["content"], [s["chunk_id"] for s in reply["sources"]]))
            answers.append(replies)
    finally:
        for server in servers:
            server.stop()
    assert answers[0] == answers[1]
    for name in ("replica-a", "replica-b"):  # each filled its own disk cache from the shared store
        assert any((tmp_path / f"home-{name}" / "kv-cache").glob("*" + SUFFIX)), name


def test_sigkill_during_an_s3_backed_index_then_resume(tmp_path, many, model, model_dir, s3_bucket, home, capsys):
    from test_reliability import Forks, _check_invariants
    corpus, reference, _ = many
    idx, url = tmp_path / "idx", f"s3://{s3_bucket}/kv"
    forks = Forks(tmp_path)  # started now: the children inherit the loopback endpoint and credentials
    try:
        rng, kills = random.Random(5), 0
        for _ in range(12):
            size = (idx / "data.mdb").stat().st_size if (idx / "data.mdb").exists() else 0
            # LMDB holds only references here, so the moment is one of time: after it grows past its size now
            run = forks.run("index", corpus, "-i", idx, "-m", model_dir, "--chunk-tokens", "24", "--kv-store", url,
                            sig=signal.SIGKILL, ready=idx / "data.mdb", size=size + 1, delay=rng.uniform(0.05, 0.4))
            _check_invariants(idx, model, reference, capsys)  # verify included: every reference has its object
            kills += run["signalled"]
            if not run["signalled"] or kills >= 3:
                break
    finally:
        forks.proc.stdin.close()
        forks.proc.wait(timeout=30)
    assert kills >= 1
    with RagCache.open(idx, model=model) as rc:
        rc.index([corpus], chunk_tokens=24)
        assert spans(rc) == reference and verify(rc).ok
        with rc.store.snapshot() as txn:
            keys = {kvremote.referenced_key(v) for _, v in txn.cursor(db=rc.store.db["kv"])}
    assert keys <= set(_objects(s3_bucket))


def test_a_store_is_fixed_per_index(tmp_path, model, corpus_dir, s3_index):
    path, url = s3_index
    with RagCache.open(path, model=model) as rc:
        with pytest.raises(RagcacheError, match="kv-store") as e:
            rc.index([corpus_dir], kv_store=url + "2")
        assert e.value.param == "kv_store"
