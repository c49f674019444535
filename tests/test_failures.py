"""Surviving a failure: a train worker process is killed mid-run; Ray Train restarts the worker group
from the last epoch's checkpoint, the run still finishes every epoch once, and MLflow records the
failure."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlflow
import ray
import ray.train
from ray.util.state import list_actors

from pipeline.config import PRESETS
from pipeline.train import driver


def our_train_workers() -> list[int]:
    """The pids of this test's live train workers, from Ray's state API: the session Ray's actors of class
    RayTrainWorker in this driver's job. Never a scan of the machine's processes, which would find other
    jobs' workers too."""
    context = ray.get_runtime_context()
    actors = list_actors(
        address=context.gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", context.get_job_id())],
    )
    return [a.pid for a in actors]


# The Train controller runs ReportLog in another process, where tests/ is not importable: ship this
# module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ReportLog(ray.train.UserCallback):
    """Appends the epoch of every report the Train controller takes to a file: Ray Train runs its checkpoint
    manager before user callbacks, so a line here means that epoch's checkpoint is the one a restart uses."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(f"{int(metrics[0]['epoch'])} {time.time()}\n")

    def reports(self) -> list[tuple[int, float]]:
        """(epoch, when the controller took its report)"""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return [(int(epoch), float(at)) for epoch, at in (line.split() for line in lines)]

    def epochs(self) -> list[int]:
        return [epoch for epoch, _ in self.reports()]


def kill_a_worker_after_the_first_epoch(
    reports: ReportLog, killed: list[tuple[int, float]], timeout: float = 600
) -> None:
    """SIGKILL one of our train workers once the controller has taken epoch 0's report."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if reports.epochs():
            pids = our_train_workers()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append((pids[-1], time.time()))
                return
        time.sleep(0.2)


def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_session, tiny_imagenet, in_tmp_dir):
    storage = in_tmp_dir / "ray_results"
    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(tiny_imagenet),
        width=0.125,
        resize_size=80,
        crop_size=67,
        epochs=3,
        batch_size=8,
        max_failures=1,
        experiment="failures",
        registered_model="failures",
        storage_path=str(storage),
    )
    killed: list[tuple[int, float]] = []
    reports = ReportLog(in_tmp_dir / "reports.txt")
    killer = threading.Thread(target=kill_a_worker_after_the_first_epoch, args=(reports, killed), daemon=True)
    killer.start()
    summary = driver.run(cfg, callbacks=[reports])
    killer.join(timeout=5)

    assert killed, "no train worker was killed: the test did not exercise a failure"
    client = mlflow.MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert reports.epochs() == [0, 1, 2]  # resumed after epoch 0: from scratch it would be 0, 0, 1, 2
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1")) == [0, 1, 2]
    assert "last_failure" in run.data.tags  # after_exception recorded what died
    failures = [a.path for a in client.list_artifacts(run.info.run_id, "failures")]
    assert failures
    # What the failure cost (BENCHMARKS.md): the epoch the kill fell in, against an undisturbed one.
    at = [t for _, t in reports.reports()]
    print(
        f"\nkilled {killed[0][1] - at[0]:.1f} s after epoch 0's report; epoch 1 took {at[1] - at[0]:.1f} s with the "
        f"restart, epoch 2 {at[2] - at[1]:.1f} s; job {summary['seconds']:.0f} s"
    )
