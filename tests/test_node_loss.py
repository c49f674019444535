"""A lost node, not just a lost process: on an autoscaling cluster (tests/ray_head.py's head, the fake cloud
of tests/fake_cloud.py) the train workers run on a node the autoscaler added for them (the node type offers
`train`, the head does not); mid-epoch every process of that node is SIGKILLed at once, as a machine that
vanishes. The autoscaler notices the node stopped answering, replaces it, Ray Train restarts the worker
group there from the last --checkpoint-every-steps checkpoint its controller had taken, and the run
finishes with every image trained on exactly once per epoch (the run's --sample-log, audited as
tests/test_resume.py does). It prints what the loss cost: the steps taken again, and the seconds from the
kill to the node's death in the GCS, a new node, the new workers, and their first step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import mlflow
import psutil
import pytest
from ray_head import RAY, ray_head
from test_resume import IMAGES, STEPS, effective_steps, steps_logged
from test_run_status import TINY_FLAGS

from conftest import ROOT

# One node type, from 0 nodes: 2 CPUs and 2 of `train`, both train workers on one node; the head has
# CPUs for Ray Data but no `train`.
NODE_TYPES = {
    "train": {
        "resources": {"CPU": 2, "train": 2, "object_store_memory": 200_000_000},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}
# The autoscaler replaces a node that has sent no heartbeat for this long (Ray's default: 30 s; the GCS
# itself declares a raylet dead after 5 failed health checks 3 s apart).
HEARTBEAT_TIMEOUT_S = 10
KILL_IN_EPOCH = 1  # once the Train controller has taken a checkpoint from inside this epoch


def train_workers(head) -> list[dict]:
    """The cluster's RayTrainWorker actors, dead ones included (node_id, pid, state)."""
    actors = head.get("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
    return [a for a in actors if a["class_name"] == "RayTrainWorker"]


def registered_step(results: Path) -> tuple[int, int] | None:
    """(epoch, step) of the latest checkpoint the Train controller has taken (what a restart resumes from):
    a checkpoint a worker has reported but the controller has not polled yet is lost with the node."""
    for snapshot in results.glob("*/checkpoint_manager_snapshot.json"):
        try:
            metrics = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]
        except (OSError, ValueError, KeyError, TypeError):  # being written, or none yet
            return None
        return int(metrics["epoch"]), int(metrics.get("step", 0))
    return None


def raylet_of(pid: int) -> psutil.Process:
    """The raylet a worker process runs under: the fake cloud's nodes are raylets on this machine."""
    for parent in psutil.Process(pid).parents():
        if parent.name() == "raylet":
            return parent
    raise LookupError(f"no raylet above process {pid}")


class NodeKiller(threading.Thread):
    """Finds the train workers' node once they run; SIGKILLs all of its processes (the raylet and every
    process under it: workers, agents) once the Train controller has taken a checkpoint from inside epoch
    KILL_IN_EPOCH; then notes when the GCS saw the node dead, when a new `train` node joined, when the next
    attempt's workers started and when they took their first step."""

    def __init__(self, head, samples: Path, results: Path, timeout: float):
        super().__init__(daemon=True)
        self.head, self.samples, self.results = head, samples, results
        self.deadline = time.time() + timeout
        self.node_id = None
        self.killed: list[int] = []
        self.registered: tuple[int, int] | None = None  # the checkpoint a restart resumes from, at the kill
        self.times: dict[str, float] = {}
        self.error: BaseException | None = None

    def run(self):
        try:
            self._run()
        except BaseException as e:  # reported by the test
            self.error = e

    def _run(self):
        raylet = None
        while time.time() < self.deadline:
            if raylet is None and steps_logged(self.samples):  # the workers run: find their node now, kill fast later
                alive = [a for a in train_workers(self.head) if a["state"] == "ALIVE"]
                if alive:
                    raylet, self.node_id = raylet_of(alive[0]["pid"]), alive[0]["node_id"]
                    assert {a["node_id"] for a in alive} == {self.node_id}, alive
            registered = registered_step(self.results)
            if raylet is not None and registered and registered[0] == KILL_IN_EPOCH and registered[1] > 0:
                # Frozen first, the raylet before what it started, then killed: no process of the node sees
                # another die (the raylet exits on its own, and tells the GCS, when an agent of it dies).
                raylet.send_signal(signal.SIGSTOP)
                processes = [raylet, *raylet.children(recursive=True)]
                for sig in (signal.SIGSTOP, signal.SIGKILL):
                    for process in processes:
                        try:
                            process.send_signal(sig)
                        except psutil.NoSuchProcess:
                            pass
                self.times["killed"] = time.time()
                self.killed, self.registered = [p.pid for p in processes], registered
                break
            time.sleep(0.1)
        else:
            return
        before = set(self.samples.glob("rank0-*.jsonl"))
        while time.time() < self.deadline and "resumed" not in self.times:
            try:
                nodes = self.head.nodes()
            except OSError:
                nodes = []
            for node in nodes:
                if node["node_id"] == self.node_id and node["state"] == "DEAD":
                    self.times.setdefault("dead", time.time())
                if node["node_id"] != self.node_id and "train" in node["resources_total"] and node["state"] == "ALIVE":
                    self.times.setdefault("new_node", time.time())
            for path in set(self.samples.glob("rank0-*.jsonl")) - before:
                self.times.setdefault("restarted", time.time())
                if len(path.read_text().splitlines()) > 1:  # its start line, and a step
                    self.times.setdefault("resumed", time.time())
            time.sleep(0.5)


@pytest.mark.slow  # a Ray head with an autoscaler, and a job
@pytest.mark.timeout(600)
def test_a_node_lost_mid_epoch_is_replaced_and_the_epoch_resumes_with_exactly_the_images_left(tiny_imagenet, tmp_path):
    name = f"node-loss-{uuid.uuid4().hex[:8]}"
    samples = tmp_path / "samples"
    args = [
        "--data",
        str(tiny_imagenet),
        *TINY_FLAGS,  # its --max-failures 0 is overridden below: the last flag wins
        "--epochs",
        "2",
        "--workers",
        "2",
        "--checkpoint-every-steps",
        "2",
        "--max-failures",
        "1",
        "--sample-log",
        str(samples),
        "--train-resource",
        "train",
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--experiment",
        name,
        "--registered-model",
        name,
    ]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    heartbeat = {"AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)}
    with ray_head(num_cpus=2, worker_node_types=NODE_TYPES, env=heartbeat) as head:
        # RAY_ADDRESS for Ray's own processes on the nodes (Train's PlacementGroupCleaner), as in
        # tests/test_cluster_jobs.py: this machine runs several Rays.
        env = {"env_vars": {"MLFLOW_TRACKING_URI": tracking, "RAY_ADDRESS": head.gcs_address}}
        killer = NodeKiller(head, samples, tmp_path / "ray_results", timeout=480)
        killer.start()
        submitted = time.time()
        job = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                head.dashboard,
                "--submission-id",
                name,
                "--runtime-env-json",
                json.dumps(env),
                "--",
                # the job's cwd: MLflow's ./mlruns beside its database, not in the checkout
                "sh",
                "-c",
                f"cd {tmp_path} && {sys.executable} {ROOT / 'jobs' / 'train.py'} {' '.join(args)}",
            ],
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token},
            capture_output=True,
            text=True,
            timeout=480,
        )
        job_seconds = time.time() - submitted
        (tmp_path / "job.log").write_text(job.stdout + job.stderr)
        killer.join(timeout=30)
        status = head.get(f"/api/jobs/{name}")["status"]
        workers = train_workers(head)
        nodes = {n["node_id"]: n for n in head.nodes()}

    assert killer.error is None, killer.error
    assert killer.killed, "no node was killed: the test did not exercise a failure"
    assert status == "SUCCEEDED", job.stdout[-4000:] + job.stderr[-2000:]
    # The node is gone for good; the workers of the next attempt ran on a new one.
    assert nodes[killer.node_id]["state"] == "DEAD"
    assert {w["node_id"] for w in workers} - {killer.node_id}, workers

    # Two attempts: the second resumed inside epoch 1, from the checkpoint the controller had taken.
    attempts = sorted(samples.glob("rank0-*.jsonl"), key=lambda p: int(p.name.split("-")[1]))
    starts = [tuple(json.loads(p.read_text().splitlines()[0])["start"]) for p in attempts]
    assert len(starts) == 2 and starts[0] == (0, 0), starts
    assert starts[1][0] == KILL_IN_EPOCH and starts[1] >= killer.registered and starts[1][1] > 0, (starts, killer)
    steps = effective_steps(samples)
    for epoch in range(2):
        per_rank = [steps[rank][epoch] for rank in (0, 1)]
        assert [len(s) for s in per_rank] == [STEPS, STEPS], (epoch, [len(s) for s in per_rank])
        images = Counter(i for s in per_rank for ids in s for i in ids)
        assert sorted(images) == list(range(IMAGES)) and set(images.values()) == {1}, epoch  # no gap, no repeat

    client = mlflow.MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED"
    for metric, expected in (("train_images", IMAGES), ("train_steps", STEPS)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        assert history == [(e, expected) for e in range(2)], (metric, history)

    # What losing the node cost: the steps taken again, and the time until training went on.
    last = max(r["step"] for r in steps_logged_in(attempts[0]) if r["epoch"] == KILL_IN_EPOCH)
    t = {k: round(v - killer.times["killed"]) for k, v in killer.times.items()}
    print(
        f"\nnode killed ({len(killer.killed)} processes) after step {last} of epoch {KILL_IN_EPOCH}, resumed at "
        f"step {starts[1][1]}: {last + 1 - starts[1][1]} steps taken again; seconds after the kill: node dead in "
        f"the GCS {t.get('dead')}, a new node alive {t.get('new_node')}, workers started {t.get('restarted')}, "
        f"training again {t.get('resumed')}; job {job_seconds:.0f} s"
    )


def steps_logged_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]
