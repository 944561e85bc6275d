"""Chunk caches as blobs in an S3-compatible object store, at a URL `s3://bucket/prefix`.

    ObjectStore.open(url) -> check() -> put_many / get_many / list_keys / delete_many / usage

Keys are relative names under the prefix, built by the caller (e.g. `{model}/{codec}/{content_hash}`).
The store is configured the standard AWS way, so one setup serves AWS S3, MinIO, Ceph or R2:
credentials, region and profile from the environment or ~/.aws, and the endpoint of a non-AWS store
from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3), which boto3 reads itself. With such an endpoint boto3
addresses buckets by path (http://host/bucket/key), which S3-compatible stores expect.

Every failure to talk to the store is a StoreUnavailable, one line saying what failed (endpoint
unreachable, credentials rejected, no such bucket, access denied), so that a question can fall back
to recomputing a chunk's cache. Timeouts and retries are small for the same reason: a dead endpoint
fails in seconds, not minutes.

Integrity: each PUT carries Content-MD5, which AWS S3 and every S3-compatible store check, rejecting
a body corrupted in transit (BadDigest). botocore's newer default, a CRC32 trailer on every request,
is turned off: MinIO, R2, B2 and others reject it. A GET is checked for length by botocore, and the
blobs carry their own checksum (kv.deserialize), which the caller tests.
"""

from __future__ import annotations

import base64
import hashlib
import re
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Self

from .errors import RagcacheError

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as EndpointUnreachable
except ImportError:  # the `s3` extra is optional: open() says how to install it
    boto3 = None

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 10.0  # per socket read, not per object: a large blob streams for longer
ATTEMPTS = 2  # in all, the first included: one retry for a dropped connection or a 5xx
THREADS = 8
DELETE_BATCH = 1000  # the most keys one DeleteObjects takes
LIST_PAGE = 1000  # keys a listing request returns: S3's most
SMOOTHING = 0.3  # weight of the newest latency measurement, as kvtiers.CostModel weighs its own

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rule for bucket names
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_NO_BUCKET = {"NoSuchBucket"}
_NO_OBJECT = {"NoSuchKey", "404", "NotFound"}


class StoreUnavailable(RagcacheError):
    """The object store could not be reached or refused the request: a question recomputes instead."""


@dataclass
class StoreStats:
    found: int = 0  # objects a get_many returned
    missing: int = 0  # objects it asked for that were not there
    bytes_read: int = 0
    read_seconds: float = 0.0  # wall time of get_many calls, parallel requests overlapping
    latency_s: float | None = None  # time to a GET's first byte, smoothed: the per-request cost
    written: int = 0  # objects put_many uploaded
    skipped: int = 0  # objects put_many found already there
    bytes_written: int = 0


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix is empty or ends with '/'."""
    scheme, sep, rest = url.partition("://")
    if scheme != "s3" or not sep:
        raise RagcacheError(f"'{url}' is not an object store URL: give s3://BUCKET/PREFIX", param="kv_store")
    if "?" in rest or "#" in rest or "@" in rest.partition("/")[0]:
        raise RagcacheError(f"'{url}': give s3://BUCKET/PREFIX only; credentials and endpoint come from "
                            "the AWS environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)", param="kv_store")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise RagcacheError(f"'{url}': '{bucket}' is not a bucket name (3-63 characters: a-z, 0-9, '.', '-')",
                            param="kv_store")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class ObjectStore:
    """Blobs under one bucket and prefix, read and written by a pool of threads sharing one client.

    `on_read(bytes, seconds)` is told, after each get_many, the bytes it returned and the call's wall
    time: the store's bandwidth as the cost model counts it. `stats.latency_s` tracks the time to a
    GET's first byte, so that a model can charge each request its round trip as well.
    """

    def __init__(self, url: str, client, threads: int, on_read: Callable[[int, float], None] | None):
        self.url, self.client, self.on_read = url, client, on_read
        self.bucket, self.prefix = parse_url(url)
        self.endpoint = client.meta.endpoint_url
        self.stats = StoreStats()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="objstore")

    @classmethod
    def open(cls, url: str, threads: int = THREADS,
             on_read: Callable[[int, float], None] | None = None) -> ObjectStore:
        """A store for `url`; nothing is sent until a call (check() tests the store at once)."""
        parse_url(url)  # a bad URL is reported as such, with or without boto3
        if boto3 is None:
            raise RagcacheError("an s3:// store needs boto3: pip install 'ragcache[s3]'", param="kv_store")
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
            retries={"total_max_attempts": ATTEMPTS, "mode": "standard"},
            max_pool_connections=threads,  # one connection per thread: none waits for a socket
            request_checksum_calculation="when_required", response_checksum_validation="when_required")
        try:
            client = boto3.session.Session().client("s3", config=config)  # a session per store: thread-safe
        except (BotoCoreError, ValueError) as e:  # a missing profile, an AWS_ENDPOINT_URL that is no URL
            raise RagcacheError(f"cannot configure the object store for '{url}': {_line(e)}", param="kv_store") from None
        return cls(url, client, threads, on_read)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self) -> None:
        """Raise StoreUnavailable unless the endpoint answers, takes the credentials and holds the bucket.

        A one-key listing under the prefix rather than HeadBucket: a HEAD's error has no body, so it
        cannot tell rejected credentials from a denied bucket; both need the same ListBucket right.
        Writing is not probed (it would leave an object behind): a denied PUT fails the first put_many.
        """
        self._call("list", self.client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    # ---- reads ---------------------------------------------------------------------------------
    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Each key's bytes, None where there is no such object; fetched in parallel."""
        if not keys:
            return {}
        t0 = time.perf_counter()
        got = self._parallel(self._get, keys)
        seconds = time.perf_counter() - t0
        blobs = {key: blob for key, (blob, _) in zip(keys, got)}
        nbytes = sum(len(b) for b in blobs.values() if b is not None)
        found = sum(b is not None for b in blobs.values())
        s = self.stats
        s.found, s.missing = s.found + found, s.missing + len(blobs) - found
        s.bytes_read, s.read_seconds = s.bytes_read + nbytes, s.read_seconds + seconds
        latency = statistics.median(first for _, first in got)  # the middle request: queueing spikes aside
        s.latency_s = latency if s.latency_s is None else (1 - SMOOTHING) * s.latency_s + SMOOTHING * latency
        if self.on_read is not None:
            self.on_read(nbytes, seconds)
        return blobs

    def _get(self, key: str) -> tuple[bytes | None, float]:
        """(the bytes or None, seconds to the first byte)."""
        t0 = time.perf_counter()
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as e:
            if _code(e) in _NO_OBJECT:
                return None, time.perf_counter() - t0
            raise self._unavailable(e, f"get '{key}'") from None
        except BotoCoreError as e:
            raise self._unavailable(e, f"get '{key}'") from None
        first = time.perf_counter() - t0
        return self._call(f"read '{key}'", response["Body"].read), first  # botocore checks the length

    def list_keys(self) -> Iterator[str]:
        """Every key under the prefix, relative to it, page by page (LIST_PAGE a request)."""
        for obj in self._objects():
            yield obj["Key"][len(self.prefix):]

    def usage(self) -> tuple[int, int]:
        """(objects, bytes) under the prefix: a full listing, so as slow as list_keys."""
        count = total = 0
        for obj in self._objects():
            count, total = count + 1, total + obj["Size"]
        return count, total

    def _objects(self) -> Iterator[dict]:
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": LIST_PAGE}))
        while (page := self._call("list", next, pages, None)) is not None:  # each page is a request
            yield from page.get("Contents", [])

    # ---- writes --------------------------------------------------------------------------------
    def put_many(self, items: dict[str, bytes]) -> int:
        """Upload each blob in parallel and return how many were written; the rest were already there.

        Keys are content-addressed, so an object already under a key holds the same bytes: a HEAD
        first (one round trip, no body) skips re-uploading a blob of megabytes when an index is
        rebuilt or resumed. Each PUT has completed, checked against its Content-MD5, on return.
        """
        written = self._parallel(lambda key: self._put(key, items[key]), list(items))
        self.stats.written += sum(written)
        self.stats.skipped += len(written) - sum(written)
        self.stats.bytes_written += sum(len(items[k]) for k, w in zip(items, written) if w)
        return sum(written)

    def _put(self, key: str, blob: bytes) -> bool:
        full = self.prefix + key
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full)
            if head["ContentLength"] == len(blob):
                return False
        except ClientError as e:
            if _code(e) not in _NO_OBJECT:
                raise self._unavailable(e, f"check '{key}'") from None
        except BotoCoreError as e:
            raise self._unavailable(e, f"check '{key}'") from None
        md5 = base64.b64encode(hashlib.md5(blob, usedforsecurity=False).digest()).decode()
        self._call(f"put '{key}'", self.client.put_object, Bucket=self.bucket, Key=full, Body=blob, ContentMD5=md5)
        return True

    def delete_many(self, keys: list[str]) -> None:
        """Delete `keys` (those absent too: S3 deletes are idempotent), a thousand a request."""
        for i in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self.prefix + k} for k in keys[i:i + DELETE_BATCH]]
            response = self._call("delete", self.client.delete_objects,
                                  Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):  # per key, in a 200 response: access denied, most often
                err, failed = response["Errors"][0], len(response["Errors"])
                raise StoreUnavailable(f"object store {self.url} at {self.endpoint}: cannot delete {failed} "
                                       f"objects, '{err['Key'][len(self.prefix):]}' the first: "
                                       f"{err.get('Code')}: {err.get('Message')}", param="kv_store")

    # ---- errors --------------------------------------------------------------------------------
    def _parallel(self, fn: Callable, keys: list[str]) -> list:
        """fn over keys in the pool, results in order; the first failure is raised, the rest cancelled."""
        futures = [self._pool.submit(fn, key) for key in keys]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _call(self, action: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError) as e:
            raise self._unavailable(e, action) from None

    def _unavailable(self, e: Exception, action: str) -> StoreUnavailable:
        """One line saying what failed, in the terms a user fixes it by."""
        where = f"{self.url} at {self.endpoint}"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            why = "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        elif isinstance(e, (EndpointUnreachable, HTTPClientError)):  # refused, timed out, connection dropped
            cause = e.kwargs.get("error")  # urllib3's reason, after the name of its connection object
            why = f"cannot reach the endpoint ({_line(cause).split('): ', 1)[-1] if cause else _line(e)})"
        elif isinstance(e, ClientError):
            code, status = _code(e), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = e.response.get("Error", {}).get("Message") or code
            if code in _CREDENTIALS:
                why = f"the credentials were rejected ({code}: {message})"
            elif code in _NO_BUCKET or (code == "404" and action == "list"):
                why = f"there is no bucket '{self.bucket}'"
            elif code in ("AccessDenied", "403") or status == 403:
                why = f"access denied ({message})"
            else:
                why = f"{code} (HTTP {status}): {message}"
        else:
            why = _line(e)
        return StoreUnavailable(f"object store {where}: cannot {action}: {why}", param="kv_store")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _line(e: Exception) -> str:
    return " ".join(str(e).split())
