"""A tracking server that is not there, or goes away mid-run.

- Down at start: the job says so in one line and exits 2, before Ray starts (before: ~4.5 minutes of
  MLflow's retries, then five chained tracebacks).
- Down mid-run: training goes on; the Recorder keeps the records and delivers them when the server is
  back, so every epoch's metrics arrive (a real `mlflow server` stopped and restarted on its port and store).
- Never back: what waits is bounded and named; the oldest logged models are dropped first.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from conftest import ROOT, free_port, start_mlflow_server, stop_mlflow_server
from pipeline.config import PRESETS
from pipeline.tracking import recording, runs
from pipeline.train import driver


@pytest.mark.slow  # a job in a subprocess
def test_a_tracking_server_that_is_not_there_is_named_at_once_before_ray_starts(tiny_imagenet, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(tiny_imagenet)],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": nowhere},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the MLflow tracking server {nowhere} does not answer (Connection refused): start it, "
        f"point MLFLOW_TRACKING_URI at one that runs, or unset MLFLOW_TRACKING_URI to record into "
        f"./mlflow.db"
    ]
    assert "Traceback" not in result.stderr
    assert "Started a local Ray" not in result.stderr and "[data]" not in result.stdout  # nothing else began


def test_records_wait_for_a_server_that_is_down_bounded_and_named(ray_session):
    """The Recorder on its own, against a port where nothing listens."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    recorder = recording.Recorder.remote(tracking_uri=nowhere, run_id="0" * 32, data_uri="d", data_fingerprint="f")
    assert recording.MAX_PENDING_MODELS == 2
    for epoch in range(3):
        metrics = {**{k: 1.0 for k in recording.CURVES}, "epoch": epoch, "val_top1": 10.0 * epoch}
        recorder.epoch.remote(
            metrics,
            state={},
            train_batch_png=None,
            log_model=True,
            improved=False,
            checkpoint_path=f"ckpt{epoch}",
            reported_ms=0,
        )
    recorder.failure.remote("worker 1: ActorDiedError")
    account = ray_session.get(recorder.flush.remote(2 * recording.RETRY_S))

    pending = account["pending"]
    models = [name for name in pending if name.startswith("logged model")]
    assert len(models) == 2 and "logged model epoch-002 (val top-1 20.00%)" in models  # the newest waits
    dropped = [name for name in account["undelivered"] if name.startswith("logged model")]
    assert len(dropped) == 1 and "dropped while the tracking server was down" in dropped[0]
    assert [n for n in pending if n.startswith("metrics")] == [
        "metrics of epoch 0",
        "metrics of epoch 1",
        "metrics of epoch 2",
    ]
    assert pending.count("pictures/curves.png") == 1  # only its newest version waits
    assert any(n.startswith("failure report") for n in pending)
    assert account["retries"] >= 2  # it kept trying
    # The end of a job whose server never came back: what waits and what was dropped, named.
    with pytest.raises(
        runs.RecordsNotDelivered,
        match=r"did not take 8 records within 1 s of the end of "
        r"training: .* under /ckpt hold",
    ):
        runs.wait_for_records(recorder, nowhere, 1.0, checkpoints="/ckpt")


def _first_epoch_in(client, experiment: str) -> bool:
    found = client.get_experiment_by_name(experiment)
    found_runs = client.search_runs([found.experiment_id]) if found else []
    return any(client.get_metric_history(r.info.run_id, "val_top1") for r in found_runs)


def restart_server_mid_run(
    root: Path,
    port: int,
    server: list,
    experiment: str,
    storage: Path,
    events: dict[str, float],
    down_after_report_s: float = 8.0,
) -> None:
    """Stop the server once epoch 0 is in it; keep it down until epoch 1 has been reported (its checkpoint is
    on disk) and the Recorder has had time to try; then start it again on the same port and store."""
    client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
    deadline = time.time() + 300
    while not _first_epoch_in(client, experiment):
        if time.time() > deadline:
            return
        time.sleep(0.5)
    stop_mlflow_server(server[0])
    events["stopped"] = time.time()
    while len([p for p in storage.rglob("checkpoint_*") if p.is_dir()]) < 2 and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(down_after_report_s)
    server[0] = start_mlflow_server(root, port)
    events["back"] = time.time()


def test_training_goes_on_while_the_tracking_server_restarts(ray_session, tiny_imagenet, tmp_path, monkeypatch):
    root, port = tmp_path / "mlflow", free_port()
    server = [start_mlflow_server(root, port)]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"restart-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "ray_results"
    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(tiny_imagenet),
        width=0.125,
        resize_size=80,
        crop_size=67,
        epochs=3,
        batch_size=8,
        max_failures=0,
        experiment=name,
        registered_model=name,
        storage_path=str(storage),
    )
    events: dict[str, float] = {}
    restarter = threading.Thread(
        target=restart_server_mid_run, args=(root, port, server, name, storage, events), daemon=True
    )
    restarter.start()
    try:
        summary = driver.run(cfg)
        restarter.join(timeout=60)
        assert "back" in events, "the server was never stopped and restarted: the test exercised nothing"
        client = mlflow.MlflowClient(uri)
        run = client.get_run(summary["run_id"])
        assert run.info.status == "FINISHED"
        for key in ("val_top1", "train_loss", "images_per_s"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [0, 1, 2], key
        assert int(run.data.tags["tracking_retries"]) > 0  # a delivery did meet the outage
        assert "undelivered" not in run.data.tags
        assert summary["registration"].version == "1"  # the best model still reached the registry
        print(
            f"\nserver down {events['back'] - events['stopped']:.1f} s (its restart included); Recorder retries "
            f"{run.data.tags['tracking_retries']}, longest wait of a record {run.data.tags['tracking_outage_s']} s, "
            f"job {summary['seconds']:.0f} s"
        )
    finally:
        stop_mlflow_server(server[0])


def test_a_driver_waiting_for_its_records_is_not_taken_for_lost(ray_session):
    """flush() holds the Recorder's main thread for as long as the server is down (up to 300 s at the end of a
    job). The driver's pings, queued behind it, once made the Recorder count the driver lost after one
    heartbeat, close the run as FAILED and end itself under the waiting driver (a CI run of
    test_continue_run). The pings have a thread of their own: they are answered while flush() waits."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    recorder = recording.Recorder.remote(
        tracking_uri=nowhere, run_id="0" * 32, data_uri="d", data_fingerprint="f", watch_driver=True, heartbeat_s=30.0
    )
    try:
        recorder.failure.remote("worker 0: something to deliver")  # the server is down: it waits
        waiting = recorder.flush.remote(10.0)
        time.sleep(1.0)  # flush() has the main thread now
        started = time.monotonic()
        ray_session.get(recorder.alive.remote(), timeout=5)
        assert time.monotonic() - started < 5
        assert ray_session.get(waiting, timeout=60)["pending"]
    finally:
        ray_session.kill(recorder)
