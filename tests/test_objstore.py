"""The object store against a real S3 server on loopback (moto's), spoken to over HTTP as to any endpoint."""

import socket
import time
import uuid

import pytest

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from ragcache import objstore
from ragcache.errors import RagcacheError
from ragcache.objstore import ObjectStore, StoreUnavailable


@pytest.fixture
def endpoint(s3_env):
    """Every test here runs against the loopback server, with the AWS settings of conftest's s3_env."""
    return s3_env


@pytest.fixture(autouse=True)
def aws_env(s3_env):
    return s3_env


@pytest.fixture
def bucket(s3_bucket):
    return s3_bucket


@pytest.fixture
def store(bucket):
    with ObjectStore.open(f"s3://{bucket}/cache/") as s:
        yield s


def test_many_blobs_round_trip_in_parallel_and_a_missing_key_is_none(store, endpoint):
    assert store.endpoint == endpoint  # AWS_ENDPOINT_URL, read by boto3 itself
    store.check()
    blobs = {f"model/1/{i:04x}": bytes([i]) * (1000 + i) for i in range(40)}
    assert store.put_many(blobs) == 40
    got = store.get_many([*blobs, "model/1/absent"])
    assert {k: v for k, v in got.items() if k in blobs} == blobs and got["model/1/absent"] is None
    assert store.stats.found == 40 and store.stats.missing == 1
    assert store.stats.bytes_read == sum(map(len, blobs.values())) and store.stats.latency_s > 0


def test_keys_live_under_the_prefix_and_existing_objects_are_not_uploaded_again(store, bucket):
    assert store.put_many({"a/1": b"x" * 10, "a/2": b"y" * 20}) == 2
    assert store.put_many({"a/1": b"x" * 10, "a/3": b"z"}) == 1  # a/1 is there already
    raw = boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in raw) == ["cache/a/1", "cache/a/2", "cache/a/3"]
    assert store.stats.skipped == 1 and store.stats.written == 3


def test_list_usage_and_delete_in_batches(store, monkeypatch):
    monkeypatch.setattr(objstore, "LIST_PAGE", 10)  # listing pages through three requests
    monkeypatch.setattr(objstore, "DELETE_BATCH", 10)  # and so does deleting
    blobs = {f"k{i:03d}": b"b" * i for i in range(25)}
    store.put_many(blobs)
    store.put_many({"../outside": b"not under the prefix"})  # a key is a name, not a path
    assert sorted(store.list_keys()) == sorted([*blobs, "../outside"])
    assert store.usage() == (26, sum(range(25)) + len(b"not under the prefix"))
    store.delete_many([*blobs, "never-written"])
    assert list(store.list_keys()) == ["../outside"]


def test_on_read_learns_bytes_and_seconds_per_call(bucket):
    calls = []
    with ObjectStore.open(f"s3://{bucket}", on_read=lambda n, s: calls.append((n, s))) as s:
        s.put_many({"x": b"1" * 100, "y": b"2" * 50})
        s.get_many(["x", "y", "z"])
        s.get_many([])
    assert len(calls) == 1 and calls[0][0] == 150 and calls[0][1] > 0


@pytest.mark.parametrize("url", ["http://bucket/x", "bucket/prefix", "s3:/bucket", "s3://", "s3://B_d/x",
                                 "s3://ab", "s3://key:secret@bucket/x", "s3://bucket/x?region=eu"])
def test_a_bad_url_is_a_one_line_error_naming_the_parameter(url):
    with pytest.raises(RagcacheError) as e:
        ObjectStore.open(url)
    assert "\n" not in str(e.value) and e.value.param == "kv_store" and not isinstance(e.value, StoreUnavailable)


def test_url_forms():
    assert objstore.parse_url("s3://my.bucket") == ("my.bucket", "")
    assert objstore.parse_url("s3://my-bucket/") == ("my-bucket", "")
    assert objstore.parse_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b/")
    assert objstore.parse_url("s3://my-bucket//a/b") == ("my-bucket", "a/b/")


def test_a_missing_bucket_is_a_one_line_error():
    with ObjectStore.open("s3://no-such-bucket-here/x") as s:
        for call in (s.check, lambda: s.get_many(["k"]), lambda: s.put_many({"k": b"1"})):
            with pytest.raises(StoreUnavailable, match="no bucket 'no-such-bucket-here'") as e:
                call()
            assert "\n" not in str(e.value) and e.value.param == "kv_store"


def test_a_stopped_server_is_unavailable_within_seconds(monkeypatch, bucket):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")  # moto's buckets are the process's: `bucket` is there
    with ObjectStore.open(f"s3://{bucket}/p") as s:
        s.put_many({"k": b"v"})
        assert s.get_many(["k"]) == {"k": b"v"}
        server.stop()
        server._server.server_close()  # stop() leaves the socket listening: close it, as a dead process would
        for call in (s.check, lambda: s.get_many(["k"]), lambda: s.put_many({"j": b"v"}), lambda: list(s.list_keys())):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="cannot reach the endpoint.*refused") as e:
                call()
            assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)


def test_an_endpoint_that_never_answers_times_out(monkeypatch):
    """A socket that accepts connections and never replies: a hung server, bounded by the read timeout."""
    monkeypatch.setattr(objstore, "READ_TIMEOUT_S", 0.3)  # 10 s in use: two attempts would take 20
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)  # the kernel completes the handshakes; nothing ever reads
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hung.getsockname()[1]}")
        with ObjectStore.open("s3://some-bucket") as s:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="cannot reach the endpoint.*timed out"):
                s.check()
            assert time.monotonic() - t0 < 3


def test_no_credentials_at_all(monkeypatch, bucket):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no second's wait for an instance's credentials
    with ObjectStore.open(f"s3://{bucket}") as s, pytest.raises(StoreUnavailable, match="no AWS credentials"):
        s.check()


def test_a_bad_endpoint_setting_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "not a url")
    with pytest.raises(RagcacheError, match="cannot configure the object store.*Invalid endpoint") as e:
        ObjectStore.open("s3://some-bucket")
    assert e.value.param == "kv_store"


@pytest.fixture
def iam_user():
    """A function that makes an IAM user and key (optionally allowed S3), then checking turned on.

    moto lets every request through unless told to check signatures and policies; the threaded
    server runs in this process, so the switch is moto's own enable_iam_authentication (moto 5.1.18).
    """
    try:
        from moto.core import enable_iam_authentication
    except ImportError:
        pytest.skip("checking credentials needs moto>=5.1.18")

    iam = boto3.client("iam")

    def make(allow_s3: bool) -> tuple[str, str]:
        name = f"u-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        if allow_s3:
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=(
                '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    return make, enable_iam_authentication


def test_credentials_are_told_apart_when_the_server_checks_them(monkeypatch, bucket, iam_user):
    make, enable_iam_authentication = iam_user
    allowed, denied = make(allow_s3=True), make(allow_s3=False)
    cases = [(allowed, None), ((allowed[0], "wrong-secret"), "credentials were rejected.*SignatureDoesNotMatch"),
             (("AKIANOTAREALKEY00000", "x"), "credentials were rejected.*InvalidAccessKeyId"),
             (denied, "access denied")]
    with enable_iam_authentication():
        for (key_id, secret), error in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            with ObjectStore.open(f"s3://{bucket}/p") as s:
                if error is None:
                    s.check()
                    s.put_many({"k": b"v"})
                    assert s.get_many(["k"]) == {"k": b"v"}
                    continue
                for call in (s.check, lambda: s.get_many(["k"])):
                    with pytest.raises(StoreUnavailable, match=error) as e:
                        call()
                    assert "\n" not in str(e.value)
