"""Surviving a failure: a train worker process is killed mid-run; Ray Train restarts the worker group
from the last epoch's checkpoint, the run still finishes every epoch once, and MLflow records the
failure."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time

import mlflow

from pipeline import runner
from pipeline.config import PRESETS


def train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::RayTrainWorker" in line]


def first_epoch_recorded(tracking_uri: str) -> bool:
    """The controller has taken epoch 0's report (and so knows its checkpoint)."""
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("failures")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return any(client.get_metric_history(r.info.run_id, "val_top1") for r in runs)


def kill_a_worker_after_the_first_epoch(tracking_uri: str, killed: list[int], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if first_epoch_recorded(tracking_uri):
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.5)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_session, tiny_imagenet, in_tmp_dir):
    storage = in_tmp_dir / "ray_results"
    cfg = dataclasses.replace(
        PRESETS["sample"], data=str(tiny_imagenet), width=0.125, resize_size=80, crop_size=67, epochs=3,
        batch_size=8, max_failures=1, experiment="failures", registered_model="failures",
        storage_path=str(storage))
    killed: list[int] = []
    tracking_uri = f"sqlite:///{in_tmp_dir / 'mlflow.db'}"
    killer = threading.Thread(target=kill_a_worker_after_the_first_epoch, args=(tracking_uri, killed), daemon=True)
    killer.start()
    summary = runner.run(cfg)
    killer.join(timeout=5)

    assert killed, "no train worker was killed: the test did not exercise a failure"
    client = mlflow.MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1"))
    assert steps == [0, 1, 2]  # epoch 0 was not trained again after the restart
    assert "last_failure" in run.data.tags  # after_exception recorded what died
    failures = [a.path for a in client.list_artifacts(run.info.run_id, "failures")]
    assert failures
