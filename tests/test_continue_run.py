"""A run outlives its driver: the driver is SIGKILLed inside an epoch, the run says so in MLflow, and
`jobs/train.py --resume` continues it in a new job, in the same MLflow run, from the last step checkpoint,
with every image once per epoch (the --sample-log audit) and each epoch's metrics recorded once.

On the session's Ray (a cluster the job joins) the Recorder, a detached actor, outlives the driver and
closes the run itself; with a private Ray (which dies with its driver) on s3:// storage, the heartbeat
tells the next job, which marks the run and continues it from the bucket in a fresh Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import mlflow
import pytest
from test_resume import IMAGES, STEPS, effective_steps, steps_logged
from test_run_status import TINY_FLAGS

from conftest import ROOT, make_bucket, ray_address

HEARTBEAT_S = 2.0  # the tests' heartbeat (lifeline.py): a lost driver is noticed in seconds, not minutes


def job(args: list[str], *, cwd: Path, env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "train.py"), *args],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ALEXNET_HEARTBEAT_S": str(HEARTBEAT_S), **env},
    )


def run_flags(data: Path, name: str, samples: Path, storage: str, epochs: int) -> list[str]:
    """The tiny run, with step checkpoints and the audit of what every step took."""
    return [
        *("--data", str(data), *TINY_FLAGS, "--epochs", str(epochs), "--checkpoint-every-steps", "2"),
        *("--sample-log", str(samples), "--storage-path", storage, "--experiment", name, "--registered-model", name),
    ]


def start_and_kill(flags: list[str], tmp_path: Path, env: dict[str, str], *, epoch: int, step: int) -> None:
    with open(tmp_path / "first.log", "w") as log:
        first = job(flags, cwd=tmp_path, env=env, log=log)
        try:
            kill_inside_epoch(first, Path(flags[flags.index("--sample-log") + 1]), epoch=epoch, step=step)
        finally:
            first.kill()


def kill_inside_epoch(process: subprocess.Popen, samples: Path, epoch: int, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("epoch") == epoch and r.get("step", -1) >= step for r in steps_logged(samples)):
            process.send_signal(signal.SIGKILL)  # the driver alone: nothing of it can close the run
            process.wait(timeout=30)
            return
        assert process.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    raise TimeoutError(f"the job did not reach step {step} of epoch {epoch}")


def wait_for_status(client, run_id: str, statuses: set[str], timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.get_run(run_id)
        if run.info.status in statuses:
            return run
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} is still {client.get_run(run_id).info.status} after {timeout} s")


def check_every_image_once(samples: Path, epochs: int) -> None:
    steps = effective_steps(samples)
    for epoch in range(epochs):
        per_rank = [steps[rank][epoch] for rank in (0, 1)]
        assert [len(s) for s in per_rank] == [STEPS, STEPS], (epoch, [len(s) for s in per_rank])
        images = Counter(i for s in per_rank for ids in s for i in ids)
        assert sorted(images) == list(range(IMAGES)) and set(images.values()) == {1}, epoch


def check_epochs_recorded_once(client, run_id: str, epochs: int) -> None:
    for name, expected in (("train_images", IMAGES), ("train_steps", STEPS)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert history == [(e, expected) for e in range(epochs)], (name, history)
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_top1")) == list(range(epochs))


@pytest.mark.timeout(900)
def test_a_killed_driver_is_reported_and_the_run_continues_with_resume(ray_session, tiny_imagenet, tmp_path):
    name = f"continued-{uuid.uuid4().hex[:8]}"
    samples = tmp_path / "samples"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_ADDRESS": ray_address()}
    start_and_kill(run_flags(tiny_imagenet, name, samples, tmp_path / "ray_results", 3), tmp_path, env, epoch=1, step=5)
    killed_at = time.time()

    # The detached Recorder outlives the driver on a cluster: it delivers epoch 1's records and closes the run.
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    run_id = run.info.run_id
    lost = wait_for_status(client, run_id, {"FAILED"}, timeout=60)
    noticed = time.time() - killed_at
    assert f"--resume {run_id}" in lost.data.tags["error"] and "driver lost at" in lost.data.tags["error"]
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [0]

    listed = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "runs.py"), "--experiment", name],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"continue it: python jobs/train.py --resume {run_id}" in listed.stdout, listed.stdout + listed.stderr

    # A flag that would change what the run computes is refused at once, naming it.
    refused = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--resume", run_id, "--width", "0.25", "--seed", "3"],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--width 0.125 in the run, 0.25 now" in refused.stderr and "--seed 0 in the run, 3 now" in refused.stderr

    # The other flags are the run's: --resume latest alone continues it (the experiment names where to look).
    started = time.time()
    with open(tmp_path / "second.log", "w") as log:
        second = job(
            ["--resume", "latest", "--experiment", name, "--sample-log", str(samples), "--workers", "2"],
            cwd=tmp_path,
            env=env,
            log=log,
        )
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    output = (tmp_path / "second.log").read_text()
    assert f"[resume] run {run_id}" in output

    check_every_image_once(samples, 3)
    ended = client.get_run(run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags["resumes"] == "1"
    assert "error" not in ended.data.tags
    check_epochs_recorded_once(client, run_id, 3)
    assert client.search_model_versions(f"run_id = '{run_id}'"), "the continued run registered nothing"

    # What the loss cost (BENCHMARKS.md, "Faults").
    attempts = sorted(samples.glob("rank0-*.jsonl"), key=lambda p: int(p.name.split("-")[1]))
    resumed_at = json.loads(attempts[-1].read_text().splitlines()[0])["start"]
    first_attempt = [json.loads(line) for line in attempts[0].read_text().splitlines()[1:]]
    killed_after = max(r["step"] for r in first_attempt if r["epoch"] == resumed_at[0])
    print(
        f"\nrun marked FAILED {noticed:.0f} s after the driver's SIGKILL; continued at epoch {resumed_at[0] + 1} "
        f"step {resumed_at[1]} (killed after step {killed_after}); the continuing job took "
        f"{time.time() - started:.0f} s"
    )


@pytest.mark.timeout(900)
def test_a_run_on_s3_storage_continues_in_a_fresh_ray_after_its_private_ray_died(s3_server, tiny_imagenet, tmp_path):
    name = f"continued-s3-{uuid.uuid4().hex[:8]}"
    bucket = make_bucket(f"ckpt-{uuid.uuid4().hex[:8]}")
    samples = tmp_path / "samples"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "AWS_ENDPOINT_URL": s3_server}
    start_and_kill(run_flags(tiny_imagenet, name, samples, f"{bucket}/ray_results", 2), tmp_path, env, epoch=1, step=3)

    # Its private Ray died with it, Recorder included: the run stays RUNNING until its heartbeat is stale.
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    run_id = run.info.run_id
    time.sleep(4 * HEARTBEAT_S + 1)
    before = client.get_run(run_id)
    with open(tmp_path / "second.log", "w") as log:
        second = job(["--resume", "latest", "--experiment", name], cwd=tmp_path, env=env, log=log)
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    output = (tmp_path / "second.log").read_text()
    if before.info.status == "RUNNING":  # the Recorder died with the private Ray first: the heartbeat told
        assert f"run {run_id}: its driver is gone (no heartbeat); marked FAILED" in output
    else:  # the Recorder outlived its driver the few seconds it takes to notice, and closed the run itself
        assert before.info.status == "FAILED" and "driver lost at" in before.data.tags["error"], before.data.tags
    check_every_image_once(samples, 2)
    ended = client.get_run(run_id)
    assert ended.info.status == "FINISHED"
    check_epochs_recorded_once(client, run_id, 2)


def test_a_running_run_whose_heartbeat_stopped_is_marked_failed_with_how_to_continue(tmp_path):
    from pipeline.tracking import lifeline

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    experiment = client.create_experiment("lost")
    stale, fresh, old = (client.create_run(experiment).info.run_id for _ in range(3))
    client.set_tag(stale, lifeline.HEARTBEAT_TAG, str(int(time.time() - lifeline.LOST_AFTER_S - 5)))
    client.set_tag(fresh, lifeline.HEARTBEAT_TAG, str(int(time.time())))
    # `old` has no heartbeat (a run of code before it): nothing says its driver is gone
    assert lifeline.mark_lost_runs(tracking, "lost") == [stale]
    lost = client.get_run(stale)
    assert lost.info.status == "FAILED" and f"continue it with --resume {stale}" in lost.data.tags["error"]
    assert {client.get_run(r).info.status for r in (fresh, old)} == {"RUNNING"}
    assert lifeline.mark_lost_runs(f"sqlite:///{tmp_path / 'none.db'}", "lost") == []
    assert not (tmp_path / "none.db").exists()  # asking created no store
