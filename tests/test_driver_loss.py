"""A private local Ray ends with its driver, however the driver ends (issue 18, item 2).

Before, `kill -9` of `python jobs/train.py` during an epoch left two processes of its private Ray (the
dashboard agent and the runtime-env agent, ~250 MB) running for ever. pipeline/reaper.py, which
cluster.connect_ray starts beside a private Ray, now ends every one of them within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_run_status import TINY_FLAGS

from conftest import ROOT

pytestmark = pytest.mark.slow  # a job in a subprocess

ENDED_WITHIN_S = 30.0


def alive(process: psutil.Process) -> bool:
    try:  # a process killed after its parent died may stay a zombie here: PID 1 of a container need not reap it
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(' '.join(process.cmdline()).split())[:160]}"  # titles come padded
    except psutil.Error:
        return str(process.pid)


def test_a_driver_killed_during_an_epoch_leaves_no_process_of_its_private_ray(tiny_imagenet, tmp_path):
    # No RAY_ADDRESS: the job starts a private Ray of its own (the session's, or another job's, is not its).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        "--data",
        str(tiny_imagenet),
        *TINY_FLAGS,
        "--workers",
        "1",
        "--epochs",
        "20",
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--experiment",
        "driver-loss",
        "--registered-model",
        "driver-loss",
    ]
    log = tmp_path / "job.log"
    recorded: list[psutil.Process] = []
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 600
            while "epoch 1/20" not in log.read_text():  # rank 0's line: epoch 2 has begun
                assert job.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            driver = psutil.Process(job.pid)
            recorded = driver.children(recursive=True)
            assert any("raylet" in describe(p) for p in recorded), [describe(p) for p in recorded]
            os.kill(job.pid, signal.SIGKILL)  # the driver alone: its children are left to themselves
            job.wait()
            killed = time.time()
            while any(alive(p) for p in recorded) and time.time() - killed < ENDED_WITHIN_S:
                time.sleep(0.5)
            left = [describe(p) for p in recorded if alive(p)]
            assert not left, f"{len(left)} of the {len(recorded)} processes alive {ENDED_WITHIN_S:.0f} s after: {left}"
            print(f"\nall {len(recorded)} processes of the killed driver's Ray ended in {time.time() - killed:.1f} s")
        finally:
            job.kill()
            job.wait()
            for p in recorded:  # whatever this test leaves would run for ever
                if alive(p):
                    p.kill()
