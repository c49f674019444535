"""URIs -> pyarrow filesystems, so one code path reads a local folder and object storage alike.

    resolve("/data/imagenet")          -> (LocalFileSystem, "/data/imagenet")
    resolve("s3://bucket/imagenet")    -> (S3FileSystem, "bucket/imagenet")

S3-compatible stores (MinIO, Ceph, moto) are reached through the standard AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), or an explicit endpoint. Credentials come from the standard AWS chain
(environment, profile files, instance role); they are checked once on the driver, so a machine
without any fails in a second with a clear message instead of timing out deep inside a read, and
they never travel in a URI, a log line or an MLflow param. A job's buckets are asked for once before it
starts (check_location): a missing bucket, or a store that does not answer, is named in seconds.

Object storage fails in passing: it throttles (503 SlowDown), drops connections, and cuts responses
short. Every read from s3:// is one ranged GET (RetryingS3), retried with backoff when it fails that
way and counted (retries()), so a run reports what the store cost it; listings, metadata and writes
ride on the AWS SDK's own per-request retries. Anything else (a missing object, access denied)
raises at once.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

# Attempts per read, with exponential backoff and full jitter between them (a uniform wait up to
# 0.1, 0.2, 0.4, ... s, at most BACKOFF_CAP_S): at worst ~13 s of waiting before a read gives up,
# the span of a typical throttling episode. Listings and writes: the AWS SDK's standard strategy
# with SDK_ATTEMPTS attempts (its backoff is the same scheme).
READ_ATTEMPTS = 8
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 10.0
SDK_ATTEMPTS = 8
# The one request check_location makes before a job starts: enough to ride out a blip, few enough that an
# endpoint where nothing listens is answered in about a second.
CHECK_ATTEMPTS = 3

# Transient failures, by the AWS SDK's error names in pyarrow's OSError messages (the list Ray Data
# retries, DataContext.retried_io_errors, plus timeouts and 5xx): seen through tests/fault_proxy.py as
#   503 SlowDown            "AWS Error SERVICE_UNAVAILABLE during GetObject operation"
#                           "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation" (no body)
#   reset, cut-off body     "AWS Error NETWORK_CONNECTION ... curlCode: 18, Transferred a partial file"
_TRANSIENT = {
    "throttled": re.compile(r"AWS Error (SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTLING)|HTTP status (503|429)"),
    "connection": re.compile(r"AWS Error (NETWORK_CONNECTION|REQUEST_TIMEOUT)|curlCode"),
    "server error": re.compile(r"AWS Error INTERNAL_FAILURE|HTTP status 5\d\d"),
}

_retries: Counter = Counter()
_retries_lock = threading.Lock()


def resolve(uri: str, *, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; ValueError for a scheme we do not read."""
    if not uri:
        raise ValueError("expected s3://bucket/prefix or a local path, got an empty string")
    if uri.startswith("s3://"):
        bucket_and_key = uri.removeprefix("s3://").rstrip("/")
        if "@" in bucket_and_key.split("/", 1)[0]:
            raise ValueError(
                "credentials do not belong in an s3:// URI (they would end up in logs); "
                "use the AWS environment variables, a profile or an instance role"
            )
        if not bucket_and_key:
            raise ValueError(f"expected s3://bucket/prefix, got {uri!r}")
        return s3_filesystem(endpoint), bucket_and_key
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"expected s3://bucket/prefix or a local path, got {uri!r}")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def s3_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint: str | None = None) -> pafs.FileSystem:
    import boto3

    session = boto3.Session()
    if session.get_credentials() is None:
        raise PermissionError(
            "no AWS credentials found for s3://: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run where an instance role provides them"
        )
    endpoint = s3_endpoint(endpoint)
    kwargs: dict = {"region": session.region_name or "us-east-1"}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
    # pyarrow reads the same standard chain itself, so no key is copied into the filesystem object.
    return pafs.PyFileSystem(RetryingS3(kwargs))


def check_location(uri: str, what: str, *, endpoint: str | None = None, must_exist: bool = False) -> None:
    """Before any work, on the driver: an s3:// URI's bucket is asked for once, with CHECK_ATTEMPTS attempts, so
    that a bucket that does not exist fails here, named, and a store that does not answer at the endpoint or
    refuses the credentials fails in seconds (pyarrow's OSError, which errors.describe words), not minutes later
    inside a Ray task. must_exist: the path itself must be there too (an input), local or s3://. `what` names
    the URI in the message ("ImageNet root", "--storage-path"). An empty URI (the generated sample) passes."""
    if not uri:
        return
    fs, path = resolve(uri, endpoint=endpoint)
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RetryingS3):
        fs = pafs.S3FileSystem(**fs.handler.options, retry_strategy=pafs.AwsStandardS3RetryStrategy(CHECK_ATTEMPTS))
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(
                f"{what} {uri}: bucket {bucket!r} does not exist at {s3_endpoint(endpoint) or 'AWS S3'}: "
                f"create it, or correct the name"
            )
    if must_exist and fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {uri!r} does not exist")


def join(base: str, *parts: str) -> str:
    """Join path segments with '/', the separator of every pyarrow filesystem."""
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole object. On object storage a PUT is atomic; locally we rename into place."""
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def sha256_of(fs: pafs.FileSystem, path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- object storage that survives throttling, dropped connections and short reads --------------


def retries() -> dict[str, int]:
    """Reads retried in this process so far, by cause: "throttled", "connection", "short read",
    "server error". A Ray task reports what its reads cost as the difference before and after."""
    with _retries_lock:
        return dict(_retries)


def transient_cause(error: BaseException) -> str | None:
    """Why a failed request may succeed if repeated ("throttled", "connection", ...); None if it will not."""
    if isinstance(error, ShortRead):
        return "short read"
    if not isinstance(error, OSError) or isinstance(error, FileNotFoundError):
        return None
    message = str(error)
    return next((cause for cause, pattern in _TRANSIENT.items() if pattern.search(message)), None)


class ShortRead(OSError):
    """A read that returned fewer bytes than the object holds at that range."""


class StoreUnavailable(OSError):
    """A request that kept failing transiently through every attempt."""


def retrying(what: str, request):
    """request(), repeated after a transient failure (transient_cause) with exponential backoff and
    full jitter, each retry counted; the last failure is raised naming `what` and the attempts."""
    attempts = READ_ATTEMPTS
    for attempt in range(attempts):
        try:
            return request()
        except OSError as e:
            cause = transient_cause(e)
            if cause is None:
                raise
            if attempt == attempts - 1:
                raise StoreUnavailable(
                    f"{what}: still failing after {attempts} attempts ({cause}; last error: "
                    f"{e}). The store is throttling or unreachable: retry later, or spread "
                    f"the load"
                ) from e
            with _retries_lock:
                _retries[cause] += 1
            time.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)))


class RetryingS3(pafs.FileSystemHandler):
    """s3:// as a pyarrow filesystem (pafs.PyFileSystem(RetryingS3(options))) whose reads survive
    transient failures and are counted.

    Files open on an S3FileSystem without SDK retries, so that every failure comes back here: each
    read is one ranged GET, retried (retrying) and checked to be as long as asked. Everything else
    (listing, file info, writes) goes to an S3FileSystem with the SDK's standard retries: a listing
    of ImageNet is ~1,300 requests, and only a per-request retry gets through it at any fault rate.
    """

    def __init__(self, options: dict):
        self.options = options
        # Built here, not pickled: S3FileSystem's pickle drops retry_strategy, so a Ray task would
        # get the SDK's default of 3 attempts on both.
        self.sdk = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(SDK_ATTEMPTS))
        self.reads = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(1))

    def __reduce__(self):
        return RetryingS3, (self.options,)

    def get_type_name(self) -> str:
        return "s3-retrying"

    def normalize_path(self, path):
        return self.sdk.normalize_path(path)

    def get_file_info(self, paths):
        return self.sdk.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.sdk.get_file_info(selector)

    def open_input_file(self, path):
        raw = retrying(f"s3://{path}", lambda: self.reads.open_input_file(path))  # a HEAD: the size
        return pa.PythonFile(_RetryingFile(raw, path), mode="r")

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.sdk.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.sdk.open_append_stream(path, metadata=metadata)

    def create_dir(self, path, recursive):
        self.sdk.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.sdk.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.sdk.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.sdk.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path):
        self.sdk.delete_file(path)

    def move(self, src, dest):
        self.sdk.move(src, dest)

    def copy_file(self, src, dest):
        self.sdk.copy_file(src, dest)


class _RetryingFile:
    """An object opened on S3 as a Python file (pa.PythonFile wraps it): each read one ranged GET,
    retried and length-checked. pyarrow reads Parquet footers and row groups through it too."""

    def __init__(self, raw: pa.NativeFile, path: str):
        self._raw, self._path = raw, path
        self._size = raw.size()
        self._pos = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        pos = self._pos
        data = retrying(f"s3://{self._path} bytes {pos}..{pos + n}", lambda: self._read_exactly(n, pos))
        self._pos += n
        return data

    def _read_exactly(self, n: int, pos: int) -> bytes:
        data = self._raw.read_at(n, pos)
        if len(data) != n:
            raise ShortRead(f"s3://{self._path}: {len(data)} of {n} bytes at offset {pos}")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = (offset, self._pos + offset, self._size + offset)[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self._raw.close()
        self.closed = True
