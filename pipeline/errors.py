"""Bad input answered in one line a user can act on; anything else keeps its traceback, since it is a bug.

    root_cause(error)      the innermost exception behind `error`: through Ray's task wrapper (RayTaskError.cause)
                           and Python's chain (__cause__, and __context__ unless suppressed)
    describe(error)        "<what is wrong and what to do>" for the known kinds of bad input, else None
    run_job(main, argv)    a job's entry point: main(argv)'s exit status, or `error: <describe>` on stderr and 2

The known kinds: the library's own refusals (FileNotFoundError, ValueError, ... with the message it wrote;
storage.StoreUnavailable), and what object storage and MLflow say when the input is wrong, however deep in a
Ray task it surfaced: a bucket that does not exist, credentials the store refuses, an endpoint nothing answers
at (pyarrow's "AWS Error ..." and GCS's "google::cloud::Status(...)" OSErrors, botocore's exceptions), a model or
run MLflow does not hold.

Nothing heavy is imported here: Ray's, botocore's and MLflow's exceptions are recognised by name, so the jobs
can answer --help and bad flags without loading them.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

# The library's own refusals: their messages already say what is wrong (the jobs caught these before).
BAD_INPUT = (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError, ConnectionError)

# pyarrow's S3 errors read "When <doing> ... in bucket 'b': AWS Error <NAME> during <Operation> operation: ...".
_BUCKET = re.compile(r"bucket '([^']+)'")
_NO_BUCKET = re.compile(r"AWS Error NO_SUCH_BUCKET")
_REFUSED = re.compile(
    r"AWS Error (ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|EXPIRED_TOKEN|"
    r"INVALID_CLIENT_TOKEN_ID|UNRECOGNIZED_CLIENT)|HTTP status 403"
)
# curl: 6 the host name does not resolve, 7 nothing accepts the connection, 28 it timed out.
# S3's 301 for a request signed for another region than the bucket's; pyarrow adds both regions when it knows them.
_WRONG_REGION = re.compile(r"HTTP status 301")
_REGIONS = re.compile(r"configured region is '([^']*)' while the bucket is located in '([^']*)'")
_UNREACHABLE = re.compile(r"AWS Error NETWORK_CONNECTION.*curlCode: (6|7|28), ([^;]*)")
_CURL_HOST = re.compile(r"(?:Failed to connect to (\S+) port (\d+)|Could not resolve host: (\S+))")
# pyarrow's GCS errors are google-cloud-cpp's Status: "google::cloud::Status(<CODE>: <what>, with a last message of
# <the store's words> error_info={reason=..., metadata={..., http_status_code=404}})" (the words come from GCS; an
# emulator's differ: fake-gcs-server says "Not Found" for a bucket and an object alike).
_GCS = "google::cloud::Status("
_GCS_NO_BUCKET = re.compile(r"The specified bucket does not exist")
_GCS_NO_TOKEN = re.compile(
    r"Could not create a OAuth2 access token.*?(?:underlying error message was: (.*?))?\s*error_info"
)
_GCS_REFUSED = re.compile(r"Status\((PERMISSION_DENIED|UNAUTHENTICATED)")
_GCS_UNREACHABLE = re.compile(r"CURL error \[(6|7|28)\]=(.*?)\s*(error_info|$)")
_ERROR_INFO = re.compile(r"\s*error_info=\{[^{}]*(\{[^{}]*\})?[^{}]*\}")
_REFUSED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidClientTokenId",
    "403",
}


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception behind `error`, through RayTaskError.cause, __cause__ and __context__."""
    *_, innermost = _chain(error, implicit=True)
    return innermost


def describe(error: BaseException) -> str | None:
    """One line saying what is wrong and what to do, for bad input; None for anything else (a bug).

    The outermost exception that is recognised speaks, past Ray's wrappers and explicit causes (`raise ... from`):
    a message the library wrote wins over the raw error it wraps. An exception raised while handling another is
    not looked past: its own failure is the news (often a bug in the handler)."""
    for e in _chain(error, implicit=False):
        if not _is_ray_wrapper(e) and (line := _known(e)):
            return line
    return None


def run_job(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit status; for bad input (describe), `error: <line>` on stderr and 2. Anything else
    propagates with its traceback."""
    try:
        return main(argv)
    except Exception as e:
        line = describe(e)
        if line is None:
            raise
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # Ray's buffered log lines come out now, so that the job's last line is this one
        print(f"error: {line}", file=sys.stderr, flush=True)
        return 2


# --- the known cases -------------------------------------------------------------------------------------------


def chain(error: BaseException) -> list[BaseException]:
    """`error` and everything behind it, outermost first (what root_cause walks)."""
    return list(_chain(error, implicit=True))


def _chain(error: BaseException, *, implicit: bool) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        # Ray's task errors keep the remote one in `cause`; Ray Train keeps a worker's in `_base_exc`.
        cause = getattr(current, "cause", None) if _is_ray_wrapper(current) else getattr(current, "_base_exc", None)
        if not isinstance(cause, BaseException):
            cause = current.__cause__
        if cause is None and implicit and not current.__suppress_context__:
            cause = current.__context__
        current = cause


def _is_ray_wrapper(error: BaseException) -> bool:
    """A RayTaskError (also an instance of its cause's class, and its str the remote traceback)."""
    exceptions = sys.modules.get("ray.exceptions")
    if exceptions is not None:
        return isinstance(error, exceptions.RayTaskError)
    return type(error).__name__.startswith("RayTaskError")


def _known(error: BaseException) -> str | None:
    if type(error).__name__ == "StoreUnavailable":  # storage.py's own words (an OSError, retried to the end)
        return _one_line(str(error))
    if isinstance(error, OSError) or _GCS in str(error):  # GCS's credential errors are pyarrow.ArrowException
        if line := _storage_error(str(error)):
            return line
    if type(error).__module__.startswith("botocore"):
        if line := _botocore_error(error):
            return line
    if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":  # mlflow.exceptions.MlflowException
        mlflow = sys.modules.get("mlflow")
        where = f" at {mlflow.get_tracking_uri()}" if mlflow is not None else ""
        message = getattr(error, "message", str(error))
        return _one_line(
            f"{message} in the MLflow store{where}: correct the name or id, or set MLFLOW_TRACKING_URI to the "
            f"store that holds it"
        )
    if isinstance(error, BAD_INPUT):
        return _one_line(str(error)) or type(error).__name__
    return None


def _storage_error(message: str) -> str | None:
    """pyarrow's words for a missing bucket, refused credentials or an endpoint that does not answer."""
    if _GCS in message:
        return _gcs_error(message)
    found = _BUCKET.search(message)
    bucket = f"bucket {found[1]!r}" if found else "the bucket"
    if _NO_BUCKET.search(message):
        return _no_such_bucket(bucket)
    if refused := _REFUSED.search(message):
        return _refused(bucket, refused[1] or "HTTP 403")
    if _WRONG_REGION.search(message):
        regions = _REGIONS.search(message)
        where = f"in {regions[2]}, not in {regions[1]}" if regions else "in another region than the one signed for"
        return (
            f"{bucket} is {where} (HTTP 301): set AWS_REGION to the bucket's region, or let the job ask the "
            f"bucket for it (its credentials need s3:ListBucket there)"
        )
    if unreachable := _UNREACHABLE.search(message):
        host = _CURL_HOST.search(message)
        where = (f"{host[1]}:{host[2]}" if host[1] else host[3]) if host else _endpoint()
        return _unreachable(where, unreachable[2].strip())
    return None


def _gcs_error(message: str) -> str | None:
    if _GCS_NO_BUCKET.search(message):
        return _no_such_bucket("the bucket", "gs")
    if no_token := _GCS_NO_TOKEN.search(message):
        return (
            f"no Google Cloud credentials could be used ({no_token[1] or 'no access token'}): run `gcloud auth "
            f"application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or run "
            f"where the instance's service account provides them (an emulator: set STORAGE_EMULATOR_HOST)"
        )
    if refused := _GCS_REFUSED.search(message):
        return _refused("the bucket", refused[1], "gs")
    if unreachable := _GCS_UNREACHABLE.search(message):
        return _unreachable(_endpoint("gs"), unreachable[2].strip(), "gs")
    return None


def _botocore_error(error: BaseException) -> str | None:
    name = type(error).__name__
    if name == "NoCredentialsError":
        return (
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where "
            "an instance role provides them"
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError"):
        return _unreachable(str(getattr(error, "kwargs", {}).get("endpoint_url") or _endpoint()), name)
    detail = (getattr(error, "response", None) or {}).get("Error", {})
    bucket = f"bucket {detail['BucketName']!r}" if detail.get("BucketName") else "the bucket"
    if detail.get("Code") == "NoSuchBucket":
        return _no_such_bucket(bucket)
    if detail.get("Code") in _REFUSED_CODES:
        return _refused(bucket, detail["Code"])
    return None


# What to check, per store: the endpoint's setting and the credentials'.
_ENDPOINT_SETTING = {"s3": "AWS_ENDPOINT_URL, or --s3-endpoint", "gs": "STORAGE_EMULATOR_HOST, for an emulator"}
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
    "gs": "Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, or the instance's service account",
}


def _no_such_bucket(bucket: str, store: str = "s3") -> str:
    return f"{bucket} does not exist at {_endpoint(store)}: create it, or correct the name in the {store}:// URI"


def _refused(bucket: str, why: str, store: str = "s3") -> str:
    return (
        f"object storage at {_endpoint(store)} refused access to {bucket} ({why}): check the credentials "
        f"({_CREDENTIALS[store]}) and that they may list, read and write it"
    )


def _unreachable(where: str, why: str, store: str = "s3") -> str:
    return (
        f"object storage does not answer at {where} ({why}): check the endpoint ({_ENDPOINT_SETTING[store]}) "
        f"and that the store is running"
    )


def _endpoint(store: str = "s3") -> str:
    """Where s3:// or gs:// requests go, as storage.py reads it from the environment."""
    if store == "gs":
        return os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _one_line(text: str) -> str:
    text = _ERROR_INFO.sub("", text.split("Traceback (most recent call last)")[0])  # GCS's appendix, unread
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
