"""A failure reads in one paragraph, and one that another try cannot mend ends the run at once.

A shard damaged after it was prepared (its page CRC no longer matches): reading it again cannot succeed,
so the run fails without spending --max-failures, and the job ends with what failed, the damaged file,
what was kept, how to continue and where the full tracebacks are; exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from test_run_status import TINY_FLAGS

from conftest import ROOT
from pipeline.data import prepare
from pipeline.train import failures


def damaged_shards(tiny_imagenet: Path, out: Path) -> Path:
    """Shards of the tiny data (prepared on the session's Ray), one train shard with a byte flipped inside
    its pages (same size)."""
    prepare.prepare(str(tiny_imagenet), str(out), target_mb=0.05, log=lambda m: None)
    shard = sorted((out / "train").glob("*.parquet"))[0]
    body = bytearray(shard.read_bytes())
    body[len(body) * 2 // 5] ^= 0xFF
    shard.write_bytes(bytes(body))
    return shard


@pytest.mark.timeout(600)
def test_a_damaged_shard_fails_the_run_once_in_one_paragraph(ray_session, tiny_imagenet, tmp_path):
    shard = damaged_shards(tiny_imagenet, tmp_path / "shards")
    started = time.time()
    job = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "train.py"),
            "--data",
            str(tmp_path / "shards"),
            *[f for f in TINY_FLAGS if f != "--max-failures" and f != "0"],
            "--max-failures",
            "2",
            "--epochs",
            "2",
            "--experiment",
            "damaged",
            "--storage-path",
            str(tmp_path / "ray_results"),
        ],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    seconds = time.time() - started
    output = job.stdout + job.stderr
    lines = output.splitlines()
    print(f"\nthe job failed in {seconds:.0f} s, {len(lines)} lines; its last lines:\n" + "\n".join(lines[-8:]))
    assert job.returncode == 1, output[-3000:]

    # One paragraph at the end: what failed, the root cause naming the file and row group, and what next.
    paragraph = job.stderr[job.stderr.rindex("error: training failed") :]
    assert "another try would meet the same error" in paragraph
    assert shard.name in paragraph and "row group" in paragraph, paragraph
    assert "kept:" in paragraph and "run:" in paragraph and "details:" in paragraph
    details = Path(paragraph.split("every worker's traceback in ")[1].split(" (and")[0])
    assert "row group" in details.read_text() and 'File "' in details.read_text()  # the tracebacks: in the file
    assert "Traceback (most recent call last)" not in output, "a traceback reached the console"
    assert len(lines) <= 150

    # No restart was spent on it: the worker group failed once.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("damaged").experiment_id])
    assert run.info.status == "FAILED" and "row group" in run.data.tags["error"]
    reports = [a.path for a in client.list_artifacts(run.info.run_id, "failures")]
    assert len([r for r in reports if not r.endswith("final.txt")]) == 1, reports


def test_root_causes_are_told_apart():
    from pipeline.data.storage import StoreUnavailable

    try:
        try:
            raise OSError("AWS Error NETWORK_CONNECTION curlCode: 7")
        except OSError as e:
            raise StoreUnavailable("s3://b/part-0.parquet: still failing after 8 attempts") from e
    except StoreUnavailable as e:
        unavailable = e
    assert failures.root_cause(RuntimeError("wrapped")) is not None
    assert failures.describe(unavailable).startswith("StoreUnavailable: s3://b/part-0.parquet")
    assert not failures.is_permanent(unavailable)  # storage may come back: restarts are worth it
    try:
        raise RuntimeError("the read task failed") from ValueError("x.parquet: row group 0 cannot be read")
    except RuntimeError as e:
        damaged = e
    assert failures.is_permanent(damaged) and failures.describe(damaged).startswith("ValueError: x.parquet")
    assert not failures.is_permanent(RuntimeError("gloo: connection closed by peer"))  # a peer that died


def test_the_private_hook_of_ray_train_is_where_failures_py_expects_it():
    """failures.Trainer replaces the failure policy Ray Train hands its controller: the keyword must still
    be there, and Ray's own policy still the one asked after a failure a restart can mend."""
    import inspect

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

    source = inspect.getsource(TorchTrainer.fit)
    assert "failure_policy=create_failure_policy(" in source and "_initialize_and_run_controller(" in source
    policy = failures.FailFastOnPermanent(DefaultFailurePolicy(ray.train.FailureConfig(max_failures=2)))
    assert policy.failure_config.max_failures == 2
