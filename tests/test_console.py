"""A healthy job's console is quiet (issue 18, item 6): off a terminal, the job's own lines, an epoch line
each epoch, and not Ray's chatter. Before, half of a default run's ~80 lines were Ray Train's (every report's
whole metrics dict, every checkpoint) and Ray Data's (every dataset's execution plan, every epoch); --verbose
brings them back."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from test_run_status import TINY_FLAGS

from conftest import ROOT

MAX_LINES = 40
CHATTER = (
    "Reporting training result",
    "TrainingReport(",
    "Checkpoint successfully created",
    "Starting execution of Dataset",
    "Execution plan of Dataset",
    "execution finished in",
)


def job_output(tiny_imagenet, tmp_path, name: str, *flags: str) -> str:
    """What `python jobs/train.py` prints to a pipe (not a terminal), stdout and stderr together."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray, as `make train` starts
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train.py"),
            "--data",
            str(tiny_imagenet),
            *TINY_FLAGS,
            "--storage-path",
            str(tmp_path / name),
            "--experiment",
            name,
            "--registered-model",
            name,
            *flags,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return done.stdout


# As a default run printed them with Ray 2.60 (worker prefixes aside), and lines that must stay.
RAY_CHATTER = [
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 0, 'train_loss': 2.2388911783})",
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/x/checkpoint_2026-12-05_16-38-49)",
    "Requesting resources: {'CPU': 1.0} * 2",
    "Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1.0}] * 2",
    "Started training worker group of size 2: ",
    "- (ip=192.0.2.2, pid=8940) world_rank=0, local_rank=0, node_rank=0",
    "Setting up process group for: env:// [rank=0, world_size=2]",
    "[2026-12-05 16:38:37,617 E 8298 8699] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'b359dab11c304fe15a2d306401000000' has constructor arguments in the object store and max_restarts > 0. If the",
    "Starting execution of Dataset train_0359VheX8VNJPpspmWZNxB_0. Full logs are in /tmp/ray/session_x/logs/ray-data",
    "Execution plan of Dataset train_0359VheX8VNJPpspmWZNxB_0: InputDataBuffer[Input] -> TaskPoolMapOperator[...]",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "✔️  Dataset train_0359VheX8VNJPpspmWZNxB_1 execution finished in 5.00 seconds",
    "",
]
KEPT = [
    "epoch 1/5  loss 2.239  val top-1 46.2%  top-5 94.2%  lr 0.005  244 img/s  waiting for data 54%",
    "epoch 2/5  1,024/2,600 images  loss 1.300  431 img/s  waiting for data 8%",
    "[FailurePolicy] RETRY",
    "Error count: 1 (max allowed: 2)",
    '{"__magic_token__": "__ray_tqdm_magic_token__", "x": 8, "desc": "epoch 1/5"}',
]
# A traceback from a worker: its frames go (the job's closing paragraph names the file that holds them all),
# the error itself stays.
TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "/work/main/pipeline/data/readers/parquet.py", line 57, in read_row_group',
    "    raise ValueError(",
    "    ^^^^^^^^^^^^^^^^^",
    "During handling of the above exception, another exception occurred:",
]
ERROR = "ValueError: /data/train/part-00000.parquet: row group 0 cannot be read (CRC checksum verification failed)"


def test_the_console_drops_rays_healthy_chatter_and_keeps_the_rest():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from pipeline import cluster

    printed: list[str] = []
    saved = dispatcher.handlers
    dispatcher.handlers = [("ray_print_logs", lambda data: printed.extend(data["lines"]))]
    try:
        cluster.quiet_console(verbose=False)
        cluster.quiet_console(verbose=False)  # wraps once
        dispatcher.emit({"pid": 1, "lines": RAY_CHATTER + KEPT + TRACEBACK + [ERROR]})
        dispatcher.emit({"pid": 1, "lines": RAY_CHATTER})  # nothing left: nothing printed
    finally:
        dispatcher.handlers = saved
    assert printed == [*KEPT, ERROR]


@pytest.mark.slow  # jobs in subprocesses
def test_a_healthy_job_prints_its_epochs_and_not_rays_chatter_unless_verbose(tiny_imagenet, tmp_path):
    quiet = job_output(tiny_imagenet, tmp_path, "quiet", "--epochs", "2")
    lines = quiet.splitlines()
    print(f"\n{len(lines)} lines off a terminal, 2 epochs:\n{quiet}")
    assert len(lines) <= MAX_LINES, quiet
    for epoch in (1, 2):
        assert len([line for line in lines if re.search(rf"\bepoch {epoch}/2  loss ", line)]) == 1, quiet
    said = [phrase for phrase in CHATTER if phrase in quiet]
    assert not said, quiet
    assert "final val top-1" in quiet

    verbose = job_output(tiny_imagenet, tmp_path, "verbose", "--epochs", "1", "--verbose")
    assert "Reporting training result 1: TrainingReport(" in verbose, verbose
    assert "Execution plan of Dataset" in verbose, verbose
    assert re.search(r"\bepoch 1/1  loss ", verbose), verbose
