"""The team MLflow server as infra/ deploys it, really started: infra/mlflow/entrypoint.sh (the image's
entry point) runs `mlflow server` with its basic-auth app on a real PostgreSQL (pgserver, a self-contained
server the test starts) and proxied artifacts in a bucket on the local S3 endpoint. A training run on the
session Ray signs in as a user of its own, as a cluster would, and registers its model there."""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import mlflow
import pytest
from mlflow.server import get_app_client

from tests.conftest import ROOT, TINY_RUN, free_port, make_bucket, stop_mlflow_server

BUCKET = "team-mlflow"


def wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the MLflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    import pgserver  # the [test] extra installs it: a missing one fails here, it is not skipped

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    server.psql("CREATE DATABASE mlflow;")
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def team_server(s3_server, postgres, tmp_path_factory):
    """(url, admin password): infra/mlflow/entrypoint.sh with the environment a deployment gives it."""
    make_bucket(BUCKET)
    port = free_port()
    admin_password = secrets.token_urlsafe(16)
    root = tmp_path_factory.mktemp("team-mlflow")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's `mlflow`
        "MLFLOW_BACKEND_STORE_URI": postgres.get_uri("mlflow"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow-artifacts",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = root / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            ["sh", str(ROOT / "infra" / "mlflow" / "entrypoint.sh")],
            env=env,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, log)
        yield url, admin_password
    finally:
        stop_mlflow_server(process)


def get(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def signed_in(env: dict[str, str]):
    """Set MLflow's credential variables for a block, and put back what was there."""

    class Block:
        def __enter__(self):
            self.saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)

        def __exit__(self, *exc):
            for key, value in self.saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return Block()


def test_training_registers_into_the_team_server(ray_session, team_server, postgres, tiny_imagenet, tmp_path_factory):
    from pipeline.config import PRESETS
    from pipeline.train import driver

    url, admin_password = team_server
    # As the README has an operator do: the admin makes a user for the cluster's jobs.
    cluster_password = secrets.token_urlsafe(16)
    with signed_in({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password}):
        get_app_client("basic-auth", tracking_uri=url).create_user("ray-cluster", cluster_password)

    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(tiny_imagenet),
        storage_path=str(tmp_path_factory.mktemp("team_results")),
        **{**TINY_RUN, "epochs": 1, "experiment": "team", "registered_model": "alexnet-team"},
    )
    with signed_in(
        {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": "ray-cluster",
            "MLFLOW_TRACKING_PASSWORD": cluster_password,
        }
    ):
        summary = driver.run(cfg)
        client = mlflow.MlflowClient(url)
        version = client.get_model_version("alexnet-team", summary["registration"].version)
        model = client.get_logged_model(version.tags["logged_model_id"])
        run = client.get_run(summary["run_id"])

    assert version.status == "READY" and run.info.status == "FINISHED"
    # The registry lives in PostgreSQL, not in a file beside the server.
    import psycopg

    with psycopg.connect(postgres.get_uri("mlflow")) as db:
        assert db.execute("SELECT name FROM registered_models").fetchall() == [("alexnet-team",)]

    # The model's files went through the server into the bucket, under the deployment's prefix.
    assert model.artifact_location.startswith("mlflow-artifacts:/"), model.artifact_location
    prefix = "mlflow-artifacts/" + model.artifact_location.removeprefix("mlflow-artifacts:/").strip("/") + "/"
    keys = {
        o["Key"].removeprefix(prefix)
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for o in page.get("Contents", [])
    }
    assert "MLmodel" in keys and any(k.startswith("data/") or k.endswith((".pt", ".pth")) for k in keys), keys

    # Authentication is on everywhere: the registry API and the proxied artifacts refuse a request without
    # credentials, and with a wrong password; the cluster's user is let in.
    api = f"{url}/api/2.0/mlflow/registered-models/get?name=alexnet-team"
    artifact = (
        f"{url}/api/2.0/mlflow-artifacts/artifacts/"
        f"{model.artifact_location.removeprefix('mlflow-artifacts:/').strip('/')}/MLmodel"
    )
    assert get(api) == 401 and get(artifact) == 401
    assert get(api, "ray-cluster", "wrong-password") == 401
    assert get(api, "ray-cluster", cluster_password) == 200
    assert get(artifact, "ray-cluster", cluster_password) == 200
