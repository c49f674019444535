"""Workers no node can hold are refused at once, not waited for: `--use-gpu` on a machine without GPUs, `--placement
grouped --use-gpu` where no node has 2 GPUs, a --train-resource no node offers. Before, Ray Train waited for them
forever ("No available node types can fulfill resource request" every 30 s), and Ctrl-C did not end the wait.

On this session's Ray (one node, 4 CPUs, no GPU, no autoscaler) and as `python jobs/train.py` on its private local
Ray. The other side, a cluster whose autoscaler starts the nodes, is tests/test_cluster_jobs.py's job: it asks for
`--train-resource train` while the fake cloud has no node offering it yet, and must wait, not fail."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline import cluster
from pipeline.config import parse_args

NO_AUTOSCALER = "and the cluster has no autoscaler to add one: "


def refusal(ray, argv: list[str]) -> str:
    """check_placeable's ValueError for these flags on the session's Ray."""
    cfg = parse_args(argv)
    resources = cluster.worker_resources(cfg, ray.available_resources().get("CPU", 0.0), ray.cluster_resources()["CPU"])
    with pytest.raises(ValueError) as refused:
        cluster.check_placeable(cfg, resources)
    return str(refused.value)


def test_the_session_ray_has_no_autoscaler(ray_session):
    """Guards has_autoscaler's reading of the monitor's report (a private Ray format): a local Ray's monitor runs
    the read-only provider. Were the format to change, has_autoscaler would answer True (it never refuses what it
    cannot read) and this would fail."""
    started = time.monotonic()
    assert cluster.has_autoscaler() is False
    assert not cluster.on_private_ray()  # the session's Ray is joined here, not started by connect_ray
    print(f"\nhas_autoscaler answered in {time.monotonic() - started:.1f} s")


def test_gpus_on_a_cluster_without_gpus_are_refused_with_what_is_missing(ray_session):
    assert refusal(ray_session, ["--use-gpu"]) == (
        "--use-gpu asks for 2 train workers x {GPU: 1, CPU: 1}; no node of this Ray cluster has 1 GPU (the largest "
        "has 0), " + NO_AUTOSCALER + "drop --use-gpu or point --address at a cluster with GPU nodes"
    )
    assert refusal(ray_session, ["--use-gpu", "--placement", "grouped"]).startswith(
        "--use-gpu --placement grouped asks for 2 train workers x {GPU: 2, CPU: 1}; no node of this Ray cluster has "
        "2 GPUs (the largest has 0), " + NO_AUTOSCALER + "drop --use-gpu"
    )


def test_a_train_resource_no_node_offers_is_refused(ray_session):
    message = refusal(ray_session, ["--train-resource", "tpu-v9"])
    assert message == (
        "--train-resource tpu-v9 asks for 2 train workers x {tpu-v9: 1, CPU: 1}; no node of this Ray cluster has 1 "
        "of the resource `tpu-v9` (the largest has 0), " + NO_AUTOSCALER + "drop --train-resource tpu-v9 or point "
        "--address at a cluster with nodes that offer `tpu-v9`"
    )


def test_more_workers_than_the_nodes_hold_together_are_refused(ray_session):
    # Each 1-CPU worker fits the node, but STRICT_SPREAD wants a node per worker, and there is one.
    message = refusal(ray_session, ["--worker-strategy", "STRICT_SPREAD", "--cpus-per-worker", "1"])
    assert "STRICT_SPREAD puts each on a node of its own, and 1 node can hold one, " + NO_AUTOSCALER in message
    assert message.endswith(
        "use at most --workers 1, use --worker-strategy PACK, or point --address at a bigger cluster"
    )


def test_a_request_that_fits_passes(ray_session, capsys):
    for argv in (
        [],
        ["--cpus-per-worker", "1"],
        ["--worker-strategy", "STRICT_PACK", "--cpus-per-worker", "1"],
        ["--workers", "1", "--batch-size", "8", "--worker-strategy", "STRICT_SPREAD"],
    ):
        cfg = parse_args(argv)
        resources = cluster.worker_resources(
            cfg, ray_session.available_resources()["CPU"], ray_session.cluster_resources()["CPU"]
        )
        cluster.check_placeable(cfg, resources)
    assert "[ray]" not in capsys.readouterr().out  # nothing to wait for


def node(**resources: float) -> dict:
    """A live node as ray.nodes() lists it."""
    return {"Alive": True, "Resources": {"CPU": 8.0, "memory": 1e10, **resources}}


def test_each_worker_must_fit_on_one_node_not_in_the_cluster_totals():
    grouped = parse_args(["--use-gpu", "--placement", "grouped"])
    two_single_gpu_nodes = [node(GPU=1.0), node(GPU=1.0), {"Alive": False, "Resources": {"GPU": 8.0}}]
    asks, remedies = cluster.unplaceable(grouped, {"CPU": 1.0, "GPU": 2.0}, two_single_gpu_nodes)
    assert asks.endswith("no node of this Ray cluster has 2 GPUs (the largest has 1)")  # the dead node does not count
    assert remedies == "drop --use-gpu, use --placement data, or point --address at a cluster with GPU nodes"
    data = dataclasses.replace(grouped, placement="data")
    assert cluster.unplaceable(data, {"CPU": 1.0, "GPU": 1.0}, two_single_gpu_nodes) is None
    # One worker per node fits, but not both workers: two 1-GPU workers on one 1-GPU node.
    asks, remedies = cluster.unplaceable(data, {"CPU": 1.0, "GPU": 1.0}, [node(GPU=1.0)])
    assert asks.endswith("all the nodes of this Ray cluster together hold 1 of them")
    assert remedies == "use at most --workers 1 or point --address at a bigger cluster"
    # Every resource is somewhere, but not on one node.
    asks, _ = cluster.unplaceable(
        parse_args(["--use-gpu", "--train-resource", "train"]),
        {"CPU": 1.0, "GPU": 1.0, "train": 1.0},
        [node(GPU=1.0), node(train=2.0)],
    )
    assert asks.endswith("no single node of this Ray cluster has all of {GPU: 1, train: 1, CPU: 1}")


def ray_processes_with(marker: str) -> list[int]:
    """Live processes that carry `marker` in their environment: the job and every Ray process it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow  # a job in a subprocess
def test_the_job_with_use_gpu_on_a_machine_without_gpus_ends_at_once_with_the_error(tiny_imagenet, tmp_path):
    marker = f"GPU_REQUEST_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", key: value}
    env.pop("RAY_ADDRESS", None)  # its own private local Ray, as `python jobs/train.py` on a laptop
    started = time.monotonic()
    try:
        job = subprocess.run(
            [
                sys.executable,
                str(ROOT / "jobs" / "train.py"),
                "--use-gpu",
                "--epochs",
                "1",
                "--data",
                str(tiny_imagenet),
                "--batch-size",
                "8",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            cwd=tmp_path,
            env=env,
        )
    finally:
        seconds = time.monotonic() - started
        deadline = time.monotonic() + 20  # the Ray processes the job started go with it, not after a minute
        while (left := ray_processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            os.kill(pid, 9)
    print(f"\nthe job ended in {seconds:.1f} s with {job.returncode}")
    assert job.returncode == 2, job.stdout[-2000:] + job.stderr[-3000:]
    assert (
        "error: --use-gpu asks for 2 train workers x {GPU: 1, CPU: 1}; no node of this Ray cluster has 1 GPU "
        "(the largest has 0), and this job's private local Ray (no --address, no RAY_ADDRESS) is this machine "
        "alone, with no autoscaler to add one: drop --use-gpu or point --address at a cluster with GPU "
        "nodes"
    ) in job.stderr
    assert "Started a local Ray" in job.stderr
    assert "[mlflow] run" not in job.stdout  # refused before a run was opened
    assert seconds < 60
    assert not left, f"Ray processes of the job left running: {left}"
