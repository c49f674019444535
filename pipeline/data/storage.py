"""URIs -> pyarrow filesystems, so one code path reads a local folder and object storage alike.

    resolve("/data/imagenet")          -> (LocalFileSystem, "/data/imagenet")
    resolve("s3://bucket/imagenet")    -> (S3 through RetryingStore, "bucket/imagenet")
    resolve("gs://bucket/imagenet")    -> (Google Cloud Storage through RetryingStore, "bucket/imagenet")

S3-compatible stores (MinIO, Ceph, moto) are reached through the standard AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), or an explicit endpoint; credentials come from the standard AWS chain, checked
once on the driver. GCS: Application Default Credentials as pyarrow finds them; an emulator
(fake-gcs-server) through the standard STORAGE_EMULATOR_HOST, anonymously. Credentials never travel in
a URI, a log line or an MLflow param. A job's buckets are asked for once before it starts
(check_location): a missing bucket, or a store that does not answer, is named in seconds.

Object storage fails in passing: it throttles (503 SlowDown, 429), drops connections, and cuts responses
short. Every read is one ranged GET (RetryingStore), retried with backoff when it fails that way and
counted (retries()), so a run reports what the store cost it; listings, metadata and writes ride on
the client library's own per-request retries. Anything else (a missing object, access denied) raises
at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data import regions

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
# google-cloud-cpp (pyarrow's GCS client) retries by time alone (retry_time_limit), with its own backoff
# (about a second first): the seconds that stand for SDK_ATTEMPTS, one attempt and CHECK_ATTEMPTS. One
# attempt is 1 ms: over before a failed request returns, so the library never sends it again itself.
GCS_RETRY_S = {SDK_ATTEMPTS: 15.0, 1: 0.001, CHECK_ATTEMPTS: 1.0}
SCHEMES = ("s3", "gs")
STORE_NAMES = {"s3": "AWS S3", "gs": "Google Cloud Storage"}
CREDENTIALS = {
    "s3": "the AWS environment variables, a profile or an instance role",
    "gs": "Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default "
    "login`, or the instance's service account)",
}

# Transient failures, by the words of pyarrow's OSError messages: the AWS SDK's error names (the list
# Ray Data retries, DataContext.retried_io_errors, plus timeouts and 5xx) and google-cloud-cpp's Status
# codes and HTTP status; seen through tests/fault_proxy.py in front of moto's server and fake-gcs-server:
#   503 SlowDown            "AWS Error SERVICE_UNAVAILABLE during GetObject operation"
#                           "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation" (no body)
#                           "google::cloud::Status(UNAVAILABLE: ... error_info={reason=backendError, ...
#                           http_status_code=503}})"
#   reset, cut-off body     "AWS Error NETWORK_CONNECTION ... curlCode: 18, Transferred a partial file"
#                           "google::cloud::Status(UNAVAILABLE: ... CURL error [18]=Transferred a partial file"
_TRANSIENT = {
    "throttled": re.compile(
        r"AWS Error (SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTLING)|HTTP status (503|429)|http_status_code=(429|503)\b|"
        r"Status\(RESOURCE_EXHAUSTED"
    ),
    "connection": re.compile(
        r"AWS Error (NETWORK_CONNECTION|REQUEST_TIMEOUT)|curlCode|CURL error \[\d+\]|Status\(DEADLINE_EXCEEDED"
    ),
    "server error": re.compile(
        r"AWS Error INTERNAL_FAILURE|HTTP status 5\d\d|http_status_code=5\d\d|Status\(UNAVAILABLE"
    ),
}
# google-cloud-cpp's words for a request it could not sign: no credentials to be found (the SDK's requests,
# listings first, retried the token already), and for a read whose 1-ms retry budget ran out before it was
# sent at all (this thread was descheduled in between): the store saw nothing, so it is sent again, uncounted.
_NO_TOKEN = "Could not create a OAuth2 access token"
_UNSENT = "Status(DEADLINE_EXCEEDED: Retry policy exhausted before first request attempt"
UNSENT_ATTEMPTS = 5

_retries: Counter = Counter()
_retries_lock = threading.Lock()


def resolve(uri: str, *, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it; ValueError for a scheme we do not read. `endpoint`: S3's only."""
    expected = "a local path, s3://bucket/prefix or gs://bucket/prefix"
    if not uri:
        raise ValueError(f"expected {expected}, got an empty string")
    scheme = scheme_of(uri)
    if scheme in SCHEMES:
        bucket_and_key = uri.removeprefix(f"{scheme}://").rstrip("/")
        if "@" in bucket_and_key.split("/", 1)[0]:
            raise ValueError(
                f"credentials do not belong in a {scheme}:// URI (they would end up in logs); use "
                + CREDENTIALS[scheme]
            )
        if not bucket_and_key:
            raise ValueError(f"expected {scheme}://bucket/prefix, got {uri!r}")
        fs = s3_filesystem(endpoint, bucket_and_key.split("/")[0]) if scheme == "s3" else gcs_filesystem()
        return fs, bucket_and_key
    if "://" in uri and scheme != "file":
        raise ValueError(f"expected {expected}, got {uri!r}")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def scheme_of(uri: str) -> str:  # "s3", "gs", "file", ...; "" for a plain path
    return uri.split("://", 1)[0] if "://" in uri else ""


def is_object_store(uri: str) -> bool:
    return scheme_of(uri) in SCHEMES


def as_uri(root: str, path: str) -> str:
    """A path that resolve(root) gave, back as a URI that resolves again (a Ray task resolves it anew)."""
    return f"{scheme_of(root)}://{path}" if is_object_store(root) else path


def s3_filesystem(endpoint: str | None = None, bucket: str | None = None) -> pafs.FileSystem:
    """s3:// through RetryingStore, its requests signed for `bucket`'s region (regions.py)."""
    import boto3

    if boto3.Session().get_credentials() is None:
        raise PermissionError(
            "no AWS credentials found for s3://: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run where an instance role provides them"
        )
    endpoint = regions.s3_endpoint(endpoint)
    kwargs: dict = {"region": regions.region_for(bucket, endpoint)}  # the bucket's own, not a configured one
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "http" if endpoint.startswith("http://") else "https"
    # pyarrow reads the same standard chain itself, so no key is copied into the filesystem object.
    return pafs.PyFileSystem(RetryingStore("s3", kwargs))


def gcs_filesystem() -> pafs.FileSystem:
    """gs:// through RetryingStore: Application Default Credentials as pyarrow finds them (nothing copied into
    the filesystem object), or the emulator at STORAGE_EMULATOR_HOST, which takes no credentials."""
    kwargs: dict = {}
    if emulator := os.environ.get("STORAGE_EMULATOR_HOST"):  # http://host:port, or host:port
        scheme, _, host = emulator.rpartition("://")
        kwargs = {"endpoint_override": host.rstrip("/"), "scheme": scheme or "http", "anonymous": True}
    return pafs.PyFileSystem(RetryingStore("gs", kwargs))


def train_filesystem(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """Ray Train's RunConfig(storage_filesystem=..., storage_path=...) for --storage-path `uri`. gs:// gets
    this module's filesystem: Ray's own resolution of a gs:// URI (pyarrow's) knows no emulator, and without
    Application Default Credentials waits minutes on the metadata server. s3:// where Ray's would sign for
    another region than the bucket's: pyarrow asks AWS for a bucket's region, but at AWS_ENDPOINT_URL takes the
    configured one. Otherwise (and local paths) Ray resolves the URI itself: (None, uri)."""
    if scheme_of(uri) == "gs":
        return resolve(uri)
    if scheme_of(uri) == "s3" and regions.s3_endpoint():
        fs, path = resolve(uri)
        if fs.handler.options["region"] != pafs.FileSystem.from_uri(uri)[0].region:
            return fs, path
    return None, uri


def check_location(uri: str, what: str, *, endpoint: str | None = None, must_exist: bool = False) -> None:
    """Before any work, on the driver: an object-store URI's bucket is asked for once, with CHECK_ATTEMPTS attempts,
    so that a bucket that does not exist fails here, named, and a store that does not answer at the endpoint or
    refuses the credentials fails in seconds (pyarrow's OSError, which errors.describe words), not minutes later
    inside a Ray task. must_exist: the path itself must be there too (an input), local or in a bucket. `what`
    names the URI in the message ("ImageNet root", "--storage-path"). An empty URI (the generated sample) passes."""
    if not uri:
        return
    fs, path = resolve(uri, endpoint=endpoint)
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RetryingStore):
        store = fs.handler
        fs = store.native(CHECK_ATTEMPTS)
        bucket = path.split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            if store.scheme == "s3" and (note := regions.refused_note(bucket, endpoint, store.options["region"])):
                raise OSError(f"{e} ({note})") from e
            # GCS answers a bucket's metadata only to storage.buckets.get, which roles that read and write its
            # objects (Storage Object Admin) lack: such a bucket is known to be there only by using it.
            if store.scheme != "gs" or "PERMISSION_DENIED" not in str(e):
                raise
            missing = False
        if missing:
            raise FileNotFoundError(
                f"{what} {uri}: bucket {bucket!r} does not exist at {store.endpoint}: create it, or correct the name"
            )
    if must_exist and fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {uri!r} does not exist")


def join(base: str, *parts: str) -> str:
    """Join path segments with '/', the separator of every pyarrow filesystem."""
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(fs: pafs.FileSystem, path: str, chunk: int = 8 << 20) -> bytes:
    """A whole file, in chunks: a GCS object streams from one GET, its size never asked for."""
    with fs.open_input_stream(path) as f:
        return b"".join(iter(lambda: f.read(chunk), b""))


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
    if isinstance(error, StreamNotStarted):
        return "connection"
    if not isinstance(error, OSError) or isinstance(error, FileNotFoundError):
        return None
    message = str(error)
    if _NO_TOKEN in message:
        return None
    return next((cause for cause, pattern in _TRANSIENT.items() if pattern.search(message)), None)


class ShortRead(OSError):
    """A read that returned fewer bytes than the object holds at that range."""


class StreamNotStarted(OSError):
    """A GCS object whose download did not start. pyarrow's GCS file starts one on first use and reports its
    failure only as a closed file, without the reason: counted as a connection failure."""


class StoreUnavailable(OSError):
    """A request that kept failing transiently through every attempt."""


def retrying(what: str, request):
    """request(), repeated after a transient failure (transient_cause) with exponential backoff and
    full jitter, each retry counted; the last failure is raised naming `what` and the attempts."""
    attempts = READ_ATTEMPTS
    for attempt in range(attempts):
        try:
            return _sent(request)
        except OSError as e:
            cause = transient_cause(e)
            if cause is None:
                raise
            if attempt == attempts - 1:
                raise StoreUnavailable(
                    f"{what}: still failing after {attempts} attempts ({cause}; last error: "
                    f"{_brief(e)}). The store is throttling or unreachable: retry later, or spread "
                    f"the load"
                ) from e
            with _retries_lock:
                _retries[cause] += 1
            time.sleep(random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)))


def _sent(request):
    for _ in range(UNSENT_ATTEMPTS - 1):
        try:
            return request()
        except OSError as e:
            if _UNSENT not in str(e):
                raise
    return request()


def _brief(error: BaseException) -> str:
    """An error's message on one line, without google-cloud-cpp's error_info={...} appendix."""
    return " ".join(re.split(r"\serror_info=", str(error), maxsplit=1)[0].split())


def _named(uri: str, request, why: str = "does not exist (no such object, or no such bucket)"):
    """request(); a FileNotFoundError that does not name the object (GCS's do not) is raised again naming it."""
    try:
        return request()
    except FileNotFoundError as e:
        if uri.split("://", 1)[-1] in str(e):
            raise
        raise FileNotFoundError(f"{uri} {why}: {_brief(e)}") from e


class RetryingStore(pafs.FileSystemHandler):
    """s3:// or gs:// as a pyarrow filesystem (pafs.PyFileSystem(RetryingStore(scheme, options))) whose reads
    survive transient failures and are counted.

    Files open on a filesystem without the library's retries (native(1)), so that every failure comes back
    here: each read is one ranged GET, retried (retrying) and checked to be as long as asked. Everything else
    (listing, file info, writes) goes to one with the library's retries (native(SDK_ATTEMPTS)): a listing of
    ImageNet is ~1,300 requests, and only a per-request retry gets through it at any fault rate.

    GCS: a whole object read from its start (open_input_stream: a JPEG, a sidecar, a shard's sha256, a tar)
    is one GET from there (_RetryingStream), not the metadata request and extra download a random-access file
    of pyarrow's GCS costs (it starts a download of the whole object on first use, holding the GIL).
    """

    def __init__(self, scheme: str, options: dict):
        self.scheme, self.options = scheme, options
        # Built here, not pickled: S3FileSystem's pickle drops retry_strategy, so a Ray task would
        # get the SDK's default of 3 attempts on both.
        self.sdk = self.native(SDK_ATTEMPTS)
        self.reads = self.native(1)

    def native(self, attempts: int) -> pafs.FileSystem:
        """The store's own pyarrow filesystem, retrying each request itself up to `attempts` times."""
        if self.scheme == "s3":
            return pafs.S3FileSystem(**self.options, retry_strategy=pafs.AwsStandardS3RetryStrategy(attempts))
        return pafs.GcsFileSystem(**self.options, retry_time_limit=timedelta(seconds=GCS_RETRY_S[attempts]))

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages: the endpoint or emulator, else the store's name."""
        override = self.options.get("endpoint_override")
        if not override:
            return STORE_NAMES[self.scheme]
        return override if "://" in override else f"{self.options.get('scheme', 'https')}://{override}"

    def __reduce__(self):
        return RetryingStore, (self.scheme, self.options)

    def get_type_name(self) -> str:
        return f"{self.scheme}-retrying"

    def normalize_path(self, path):
        return self.sdk.normalize_path(path)

    def get_file_info(self, paths):
        return self.sdk.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.sdk.get_file_info(selector)

    def open_input_file(self, path):
        uri = f"{self.scheme}://{path}"
        raw = retrying(uri, lambda: _named(uri, lambda: self._open_file(path)))  # a HEAD: the size
        return pa.PythonFile(_RetryingFile(raw, uri), mode="r")

    def _open_file(self, path: str) -> pa.NativeFile:
        raw = self.reads.open_input_file(path)
        if self.scheme == "gs" and raw.closed:  # its download starts here: see StreamNotStarted
            raise StreamNotStarted(f"gs://{path}: the download did not start")
        return raw

    def open_input_stream(self, path):
        if self.scheme != "gs":
            return self.open_input_file(path)
        uri = f"gs://{path}"
        return pa.PythonFile(
            _RetryingStream(
                lambda: _named(uri, lambda: self.reads.open_input_stream(path)),
                uri,
                lambda: self.sdk.get_file_info(path).size,
            ),
            mode="r",
        )

    def open_output_stream(self, path, metadata):
        why = "cannot be written: its bucket does not exist"
        return _named(f"{self.scheme}://{path}", lambda: self.sdk.open_output_stream(path, metadata=metadata), why)

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
    """An object opened on object storage as a Python file (pa.PythonFile wraps it): each read one ranged GET,
    retried and length-checked. pyarrow reads Parquet footers and row groups through it too."""

    def __init__(self, raw: pa.NativeFile, uri: str):
        self._raw, self._uri = raw, uri
        self._size = raw.size()
        self._pos = 0
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        if n <= 0:
            return b""
        pos = self._pos
        data = retrying(f"{self._uri} bytes {pos}..{pos + n}", lambda: self._read_exactly(n, pos))
        self._pos += n
        return data

    def _read_exactly(self, n: int, pos: int) -> bytes:
        data = self._raw.read_at(n, pos)
        if len(data) != n:
            raise ShortRead(f"{self._uri}: {len(data)} of {n} bytes at offset {pos}")
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


class _RetryingStream(_RetryingFile):
    """A GCS object read from its start, as one GET (google-cloud-cpp checks its length and checksum). A read
    that fails transiently, at the start or midway, asks for the object again and skips what was read. Its
    size (only a read of everything at once, or a seek from the end, asks) is a metadata request."""

    def __init__(self, open_stream, uri: str, size):
        self._open, self._uri, self._size_of = open_stream, uri, size
        self._raw: pa.NativeFile | None = retrying(uri, open_stream)
        self._at = self._pos = 0  # where the download is, and where the next read starts
        self.closed = False

    def size(self) -> int:
        if not hasattr(self, "_size"):
            self._size = self._size_of()
        return self._size

    def read(self, n: int = -1) -> bytes:
        n = self.size() - self._pos if n is None or n < 0 else n
        pos = self._pos
        data = retrying(f"{self._uri} bytes {pos}..{pos + n}", lambda: self._read_from(n, pos))
        self._pos = self._at = pos + len(data)
        return data

    def _read_from(self, n: int, pos: int) -> bytes:
        if self._raw is None or self._at != pos:  # after a failure, or a seek: a new download, read up to pos
            self._drop()
            self._raw, self._at = self._open(), 0
            while self._at < pos and (block := self._raw.read(min(pos - self._at, 8 << 20))):
                self._at += len(block)
            if self._at < pos:
                raise ShortRead(f"{self._uri}: ended at {self._at} bytes, before offset {pos}")
        try:
            return self._raw.read(n)
        except OSError:
            self._drop()
            raise

    def seek(self, offset: int, whence: int = 0) -> int:  # pa.PythonFile finds the size by seek(0, 2)
        self._pos = offset + (self._pos if whence == 1 else self.size() if whence == 2 else 0)
        return self._pos

    def _drop(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(OSError):  # a download that failed may fail to close too
                raw.close()

    def close(self) -> None:
        self._drop()
        self.closed = True
