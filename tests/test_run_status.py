"""A run's status is never wrong, and its log can be read: `python jobs/train.py` interrupted by Ctrl-C
(SIGINT) or SIGTERM ends KILLED and registers nothing; a crash ends FAILED with the error; a job whose
output goes to a file writes lines, not progress-bar redraws, and ends saying where the model went.

The jobs run as real processes; they join this session's Ray instance (RAY_ADDRESS, as a user points a
job at a cluster) and record to the session's mlflow server."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import mlflow
import pytest
import ray
import ray.train

from conftest import ROOT, ray_address
from pipeline.config import PRESETS
from pipeline.train import driver, worker

TINY_FLAGS = [
    "--width",
    "0.125",
    "--resize-size",
    "80",
    "--crop-size",
    "67",
    "--batch-size",
    "8",
    "--max-failures",
    "0",
]


def start_job(args: list[str], *, server: str, cwd, log) -> subprocess.Popen:
    """`python jobs/train.py args` on the session's Ray."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "train.py"), *args],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_TRACKING_URI": server, "RAY_ADDRESS": ray_address()},
    )


def the_run(server: str, experiment: str, timeout: float = 300):
    """The experiment's run once it has recorded its first epoch."""
    client = mlflow.MlflowClient(server)
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = client.get_experiment_by_name(experiment)
        for run in client.search_runs([found.experiment_id]) if found else []:
            if client.get_metric_history(run.info.run_id, "val_top1"):
                return run
        time.sleep(0.5)
    raise TimeoutError(f"no run of experiment {experiment!r} recorded an epoch within {timeout} s")


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_job_ends_killed_and_registers_nothing(
    ray_session, mlflow_server, tiny_imagenet, tmp_path, signum, code
):
    name = f"interrupted-{uuid.uuid4().hex[:8]}"
    with open(tmp_path / "job.log", "w") as log:
        job = start_job(
            [
                "--data",
                str(tiny_imagenet),
                *TINY_FLAGS,
                "--epochs",
                "50",
                "--experiment",
                name,
                "--registered-model",
                name,
                "--storage-path",
                str(tmp_path / "ray_results"),
            ],
            server=mlflow_server,
            cwd=tmp_path,
            log=log,
        )
        try:
            run = the_run(mlflow_server, name)  # an epoch is in: the old callback had registered a champion by now
            job.send_signal(signum)
            assert job.wait(timeout=120) == code
        finally:
            job.kill()
    client = mlflow.MlflowClient(mlflow_server)
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["stopped_by"] == signal.Signals(signum).name
    assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert "marked KILLED; nothing registered" in (tmp_path / "job.log").read_text()


def test_a_crash_ends_failed_with_the_error(ray_session, mlflow_server, tiny_imagenet, tmp_path, monkeypatch):
    data = tmp_path / "unreadable-val"
    shutil.copytree(tiny_imagenet, data)
    for path in (data / "val").glob("*/*.JPEG"):
        path.write_bytes(b"truncated")  # every val image fails to decode: validation has nothing to score
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"crash-{uuid.uuid4().hex[:8]}"
    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(data),
        width=0.125,
        resize_size=80,
        crop_size=67,
        epochs=1,
        batch_size=8,
        max_failures=0,
        experiment=name,
        registered_model=name,
        storage_path=str(tmp_path / "ray_results"),
    )
    with pytest.raises(Exception, match="no val images were evaluated"):
        driver.run(cfg)
    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FAILED"
    assert "no val images were evaluated" in run.data.tags["error"]
    assert mlflow.active_run() is None  # the driver let go of the run


# The Train controller runs DataRemover in another process, where tests/ is not importable: ship this
# module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class DataRemover(ray.train.UserCallback):
    """Deletes the run's data folder once the Train controller has taken the first epoch's report (after the
    MLflow callback, which comes first, has handed that epoch's logged model on): the disk gone mid-run."""

    def __init__(self, data: str):
        self.data = data

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if "step" not in metrics[0] and os.path.isdir(self.data):
            shutil.rmtree(self.data)


def test_a_run_crashing_after_it_logged_a_model_registers_nothing(
    ray_session, mlflow_server, tiny_imagenet, tmp_path, monkeypatch
):
    data = tmp_path / "vanishing"
    shutil.copytree(tiny_imagenet, data)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    name = f"vanished-{uuid.uuid4().hex[:8]}"
    # 4 epochs: the workers may have read the next epoch's images before the controller takes a report.
    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(data),
        width=0.125,
        resize_size=80,
        crop_size=67,
        epochs=4,
        batch_size=16,
        max_failures=0,
        experiment=name,
        registered_model=name,
        storage_path=str(tmp_path / "ray_results"),
    )
    with pytest.raises(driver.TrainingFailed):
        driver.run(cfg, callbacks=[DataRemover(str(data))])
    assert not data.exists()
    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("TrainingFailed: training failed")
    assert "No such file" in run.data.tags["error"] or "FileNotFoundError" in run.data.tags["error"]
    # Epoch 0 was recorded and its model logged (under --log-models best it improves on nothing): there was
    # a model to register, and the failed run registered none.
    epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1"))
    assert epochs and epochs[0] == 0 and epochs[-1] < 3
    logged = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert 0 in {int(m.tags["epoch"]) for m in logged}
    assert not client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert not client.search_model_versions(f"name = '{name}'")
    assert "registered" not in run.data.tags


def test_a_job_off_a_terminal_writes_a_short_log_ending_with_the_model(
    ray_session, mlflow_server, tiny_imagenet, tmp_path
):
    name = f"logs-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "job.log"
    with open(path, "w") as log:
        job = start_job(
            [
                "--data",
                str(tiny_imagenet),
                *TINY_FLAGS,
                "--epochs",
                "2",
                "--experiment",
                name,
                "--registered-model",
                name,
                "--storage-path",
                str(tmp_path / "ray_results"),
            ],
            server=mlflow_server,
            cwd=tmp_path,
            log=log,
        )
        assert job.wait(timeout=600) == 0, path.read_text()[-3000:]
    text = path.read_text()
    assert len(text.encode()) < 50_000
    assert "\r" not in text and "row/s]" not in text  # no progress-bar redraws
    assert "epoch 1/2" in text and "epoch 2/2" in text  # one line per epoch
    last = text.rstrip().splitlines()[-5:]
    assert last[0].startswith("MLflow run ") and last[1].startswith(f"registry: {name} version 1")
    assert f"models:/{name}@champion" in last[2] and "mlflow models serve" in last[3]


def test_progress_lines_come_every_interval(caplog):
    lines = worker.ProgressLines(interval=0.0, epoch=1, epochs=5, workers=2, total_images=2600)
    with caplog.at_level(logging.INFO, logger=worker.log.name):
        lines(lambda: worker.EvalSums(loss=64.0, correct1=10, correct5=30, images=32), data_seconds=0.5, seconds=2.0)
    assert caplog.messages == ["epoch 2/5  64/2,600 images  loss 2.000  32 img/s  waiting for data 25%"]
    quiet = worker.ProgressLines(interval=3600.0, epoch=1, epochs=5, workers=2, total_images=None)
    read = []
    with caplog.at_level(logging.INFO, logger=worker.log.name):
        quiet(lambda: read.append(1) or worker.EvalSums(loss=1.0, images=1), data_seconds=0.0, seconds=1.0)
    assert len(caplog.messages) == 1  # not yet an interval since the last line...
    assert read == []  # ... so the sums were not even read from the device
