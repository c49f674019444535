"""Bad input gets one line from every job: `error: <what is wrong and what to do>` on stderr, exit 2, no traceback
(issue 18, item 7). The jobs run as real subprocesses against moto's S3 server and fail before any training;
pipeline/errors.py's unwrapping and wording are checked first, on constructed exceptions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray.exceptions
from botocore.exceptions import ClientError, EndpointConnectionError
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from conftest import ROOT, free_port
from pipeline import errors
from pipeline.data import storage

# pyarrow's words, as seen from moto's server (NO_SUCH_BUCKET, ACCESS_DENIED) and a port nobody listens on.
NO_BUCKET = (
    "When initiating multiple part upload for key 'x/train/part-00000.parquet' in bucket 'nb': AWS Error "
    "NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified bucket does not exist (Request ID: 9F)"
)
DENIED = "When getting information for bucket 'good': AWS Error ACCESS_DENIED during HeadBucket operation: No response"
# S3's answer to a request signed for another region (Arrow's s3_internal.h adds the regions it read).
WRONG_REGION = (
    "When getting information for bucket 'eu': AWS Error UNKNOWN (HTTP status 301) during HeadBucket operation: No "
    "response body. Looks like the configured region is 'us-east-1' while the bucket is located in 'eu-west-1'."
)
UNREACHABLE = (
    "When getting information for key 'x' in bucket 'good': AWS Error NETWORK_CONNECTION during HeadObject "
    "operation: curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1 port 9 after 0 "
    "ms: Could not connect to server"
)


def in_ray_task(cause: Exception) -> Exception:
    """What ray.get raises for a task that raised `cause`: a RayTaskError that is also a `type(cause)`."""
    remote = f'Traceback (most recent call last):\n  File "prepare.py", line 1, in write_shard\n{cause!r}'
    return ray.exceptions.RayTaskError("write_shard", remote, cause).as_instanceof_cause()


def test_root_cause_goes_through_ray_task_errors_and_both_python_links():
    inner = OSError(NO_BUCKET)
    wrapped = in_ray_task(inner)
    assert isinstance(wrapped, OSError) and errors.root_cause(wrapped) is inner
    try:
        try:
            raise wrapped
        except OSError as e:
            raise RuntimeError("the shards could not be written") from e
    except RuntimeError as e:
        assert errors.root_cause(e) is inner
    try:
        try:
            raise KeyError("cache")
        except KeyError:
            raise TypeError("a bug in the handler") from None
    except TypeError as e:
        assert errors.root_cause(e) is e  # `from None`: nothing behind it
    try:
        try:
            raise KeyError("cache")
        except KeyError:
            raise TypeError("a bug in the handler")  # noqa: B904 - the implicit link is the point
    except TypeError as e:
        assert isinstance(errors.root_cause(e), KeyError)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (in_ray_task(OSError(NO_BUCKET)), "bucket 'nb' does not exist at "),
        (OSError(DENIED), "refused access to bucket 'good' (ACCESS_DENIED): check the credentials (AWS_ACCESS_KEY_ID"),
        (OSError(UNREACHABLE), "object storage does not answer at 127.0.0.1:9 (Could not connect to server)"),
        (OSError(WRONG_REGION), "bucket 'eu' is in eu-west-1, not in us-east-1 (HTTP 301): set AWS_REGION"),
        (in_ray_task(ValueError("shard x: row group 0 cannot be read")), "shard x: row group 0 cannot be read"),
        (FileNotFoundError("dataset path '/d' does not exist"), "dataset path '/d' does not exist"),
        (
            ClientError({"Error": {"Code": "NoSuchBucket", "BucketName": "nb"}}, "ListObjectsV2"),
            "bucket 'nb' does not exist",
        ),
        (ClientError({"Error": {"Code": "InvalidAccessKeyId"}}, "PutObject"), "(InvalidAccessKeyId): check the"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9/nb"), "does not answer at http://127.0.0.1:9/nb"),
        (
            MlflowException("Run with id=abc not found", error_code=RESOURCE_DOES_NOT_EXIST),
            "Run with id=abc not found in the MLflow store at ",
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_bad_input_becomes_one_line_naming_it(error, expected):
    line = errors.describe(error)
    assert line is not None and expected in line and "\n" not in line and "Traceback" not in line, line


def test_the_library_s_own_words_win_over_the_raw_error_they_wrap(monkeypatch):
    monkeypatch.setattr(storage, "READ_ATTEMPTS", 2)
    monkeypatch.setattr(storage, "BACKOFF_BASE_S", 0.0)

    def unreachable():
        raise OSError(UNREACHABLE)

    with pytest.raises(storage.StoreUnavailable) as raised:
        storage.retrying("s3://b/k", unreachable)  # raises StoreUnavailable from the OSError
    line = errors.describe(in_ray_task(raised.value))
    assert line is not None and line.startswith("s3://b/k: still failing after 2 attempts"), line


def test_bugs_are_not_described():
    assert errors.describe(KeyError("epoch")) is None
    assert errors.describe(in_ray_task(TypeError("unsupported operand"))) is None
    assert errors.describe(OSError("AWS Error NETWORK_CONNECTION: curlCode: 18, Transferred a partial file")) is None
    try:
        try:
            raise FileNotFoundError("cache.json")
        except FileNotFoundError:
            raise TypeError("a bug in the handler")  # noqa: B904
    except TypeError as e:
        assert errors.describe(e) is None  # the FileNotFoundError it was handling is not the news


def test_run_job_answers_bad_input_in_one_line_and_lets_bugs_through(capsys, monkeypatch):
    bad = in_ray_task(OSError(NO_BUCKET))
    # run_job ends the process's Ray before its last line: here that would be the session's (conftest.py)
    monkeypatch.setitem(sys.modules, "ray", None)

    def main(argv):
        if argv == ["bad"]:
            raise bad
        if argv == ["bug"]:
            raise ZeroDivisionError
        return 0

    assert errors.run_job(main, ["fine"]) == 0
    assert errors.run_job(main, ["bad"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {errors.describe(OSError(NO_BUCKET))}"]
    with pytest.raises(ZeroDivisionError):
        errors.run_job(main, ["bug"])


def test_errors_imports_nothing_heavy():
    heavy = ("ray", "torch", "mlflow", "pyarrow", "boto3", "botocore", "numpy")
    code = f"import sys, pipeline.errors; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


# --- the jobs, as a user runs them ---------------------------------------------------------------------------


@pytest.fixture
def job(s3_server, tmp_path):
    """Runs `jobs/<name>` from a fresh folder (no MLflow store but one it makes there) with moto's endpoint and
    credentials in the environment (s3_server), so that no s3:// request can leave the machine; returns
    (exit code, stderr lines)."""

    def run(name: str, *args: str, env: dict[str, str | None] | None = None) -> tuple[int, list[str]]:
        merged = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        for key, value in (env or {}).items():  # None: not set at all
            merged.pop(key, None)
            if value is not None:
                merged[key] = value
        done = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / name), *args],
            cwd=tmp_path,
            env={**merged, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stderr.strip().splitlines()

    return run


def assert_one_line(result: tuple[int, list[str]], *names: str) -> str:
    code, lines = result
    text = "\n".join(lines)
    assert code == 2, text[-3000:]
    assert lines and lines[-1].startswith("error: "), text[-3000:]
    assert "Traceback (most recent call last)" not in text, text[-3000:]
    assert len(lines) <= 5, text  # the error, and what MLflow says when it makes a new store
    for name in names:
        assert name in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A folder that exists: every case fails on something else before anything reads it."""
    return tmp_path_factory.mktemp("exists")


def on_s3(job_name: str, uri: str, data_dir: Path) -> tuple[str, ...]:
    """A command line of `job_name` that reads (or, for the prepare job, writes) `uri` first."""
    return {
        "prepare_imagenet.py": (str(data_dir), uri),
        "evaluate.py": ("--model", "unused", "--data", uri),  # the data is checked before the model
        "ablate.py": ("--data", uri, "--ablate", "lrn=off"),
    }[job_name]


S3_JOBS = ("prepare_imagenet.py", "evaluate.py", "ablate.py")


@pytest.mark.parametrize("name", S3_JOBS)
def test_a_missing_bucket(job, name, data_dir):
    assert_one_line(job(name, *on_s3(name, "s3://no-such-bucket/x", data_dir)), "bucket 'no-such-bucket'")


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("prepare_imagenet.py", ("s3://no-such-bucket/imagenet", "out")),  # the input
        ("evaluate.py", ("--model", "s3://no-such-bucket/checkpoint")),
        ("ablate.py", ("--storage-path", "s3://no-such-bucket/ckpt", "--ablate", "lrn=off")),
    ],
    ids=["input", "model", "storage-path"],
)
def test_a_missing_bucket_in_any_other_place(job, name, args):
    assert_one_line(job(name, *args), "bucket 'no-such-bucket'", "s3://no-such-bucket/")


@pytest.mark.parametrize("name", S3_JOBS)
def test_an_endpoint_where_nothing_listens(job, name, data_dir):
    port = free_port()
    if name == "ablate.py":  # the training flag, which wins over AWS_ENDPOINT_URL
        result = job(name, *on_s3(name, "s3://endpoint/x", data_dir), "--s3-endpoint", f"http://127.0.0.1:{port}")
    else:
        result = job(
            name, *on_s3(name, "s3://endpoint/x", data_dir), env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        )
    assert_one_line(result, f"127.0.0.1:{port}", "does not answer", "AWS_ENDPOINT_URL")


@pytest.mark.parametrize("name", S3_JOBS)
def test_credentials_the_store_refuses(job, strict_s3, name, data_dir):
    result = job(name, *on_s3(name, "s3://some-bucket/x", data_dir), env={"AWS_ENDPOINT_URL": strict_s3})
    assert_one_line(result, "refused access to bucket 'some-bucket'", "AWS_ACCESS_KEY_ID")


NO_CREDENTIALS = {
    **dict.fromkeys(
        (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
        )
    ),
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance role to ask either
}


@pytest.mark.parametrize("name", S3_JOBS)
def test_no_credentials_at_all(job, name, data_dir):
    assert_one_line(job(name, *on_s3(name, "s3://some-bucket/x", data_dir), env=NO_CREDENTIALS), "AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize(
    "reference",
    ["models:/no-such-model@champion", "runs:/0123456789abcdef0123456789abcdef/model"],
    ids=["registered", "run"],
)
def test_a_model_mlflow_does_not_hold(job, reference):
    line = assert_one_line(job("evaluate.py", "--model", reference), reference, "MLFLOW_TRACKING_URI")
    assert "not found" in line


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("prepare_imagenet.py", ("/nonexistent/imagenet", "out")),
        ("evaluate.py", ("--model", "/nonexistent/checkpoint")),
        ("evaluate.py", ("--model", "unused", "--data", "/nonexistent/imagenet")),
        ("ablate.py", ("--data", "/nonexistent/imagenet", "--ablate", "lrn=off")),
        ("benchmark.py", ("data", "--data", "/nonexistent/imagenet", "--work", "bench")),
    ],
    ids=["prepare", "evaluate-model", "evaluate-data", "ablate", "benchmark"],
)
def test_a_missing_local_path(job, name, args):
    assert_one_line(job(name, *args), "/nonexistent/")
