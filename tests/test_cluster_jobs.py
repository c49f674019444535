"""The job on a cluster, as a user runs it there: `ray job submit` to a head started with `ray start --head`
(token authentication on), whose autoscaler (Ray's fake multi-node provider: real raylets on this machine)
starts a "GPU" node type and a CPU-only node type from zero when the job asks for them and removes them
when they have been idle.

One submitted run shows, read from the cluster itself (the dashboard's state API) and from MLflow:
  - autoscaling: no worker node before, the nodes the job needs while it runs, none again after;
  - the CPU/GPU split: every Ray Data decode task ran on a CPU-only node, every train worker on a GPU node
    (--data-resource / --train-resource; the GPU node type offers a custom resource `train`, a stand-in for
    GPUs, which these machines do not have), and the loss curve is the single-node run's (--deterministic);
  - `ray job submit`: status SUCCEEDED, the run FINISHED and its model registered on the mlflow server,
    the code shipped by cluster/runtime_env.yaml without the clone's virtualenv, data or stores.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import uuid
from pathlib import Path

import mlflow
import pytest
import tomllib
import yaml
from ray_head import ray_head

from conftest import ROOT
from pipeline import cluster
from pipeline.config import parse_args
from pipeline.data import plan
from pipeline.train import driver

RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"

# The fake cloud: a "GPU" node type (2 CPUs and 2 of `train`: both train workers fit on one) and a
# CPU-only node type (`data`: Ray Data's decode tasks go there), both from 0 nodes.
NODE_TYPES = {
    "gpu": {
        "resources": {"CPU": 2, "train": 2, "object_store_memory": 200_000_000},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
    "cpu": {
        "resources": {"CPU": 2, "data": 1, "object_store_memory": 200_000_000},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 1,
    },
}
IDLE_TIMEOUT_S = 8.0  # a node idle this long is removed (cluster/aws.yaml: 10 minutes)

JOB_FLAGS = [
    "--width",
    "0.125",
    "--resize-size",
    "80",
    "--crop-size",
    "67",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--max-failures",
    "0",
    "--deterministic",
]


def test_runtime_env_installs_pyprojects_dependencies_except_ray():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert env["pip"] == [d for d in dependencies if not d.startswith("ray")]
    assert env["working_dir"] == "."


def node_type(node: dict) -> str:
    resources = node.get("resources_total") or {}
    return "gpu" if "train" in resources else "cpu" if "data" in resources else "head"


class NodeTimeline(threading.Thread):
    """Polls the cluster's nodes every half second: (seconds, alive nodes per type), and each node's type."""

    def __init__(self, head):
        super().__init__(daemon=True)
        self.head, self.samples, self.types, self.errors = head, [], {}, []
        self.done = threading.Event()
        self.started = time.time()

    def run(self):
        while not self.done.is_set():
            try:
                nodes = self.head.nodes()
            except OSError as e:  # a slow answer is a gap in the timeline, not a failure
                self.errors.append(repr(e))
            else:
                alive = {"gpu": 0, "cpu": 0}
                for node in nodes:
                    kind = self.types.setdefault(node["node_id"], node_type(node))
                    if node["state"] == "ALIVE" and kind in alive:
                        alive[kind] += 1
                self.samples.append((round(time.time() - self.started, 1), alive))
            self.done.wait(0.5)

    def alive(self) -> dict[str, int]:
        return self.samples[-1][1] if self.samples else {}


def shippable_clone(dest: Path) -> Path:
    """The project as a user's clone holds it, with what must never be uploaded beside it: a virtualenv,
    a git directory, data, local MLflow and Ray stores."""
    for name in ("pipeline", "jobs", "cluster"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for junk in (
        ".venv/lib/big.so",
        ".git/objects/pack.pack",
        "data/train/n0/a.JPEG",
        "mlruns/0/meta.yaml",
        "ray_results/x/checkpoint.pt",
        "mlflow.db",
        "shards/part-0.parquet",
    ):
        (dest / junk).parent.mkdir(parents=True, exist_ok=True)
        (dest / junk).write_bytes(b"must not be uploaded")
    return dest


def test_a_submitted_job_scales_gpu_and_cpu_nodes_from_zero_splits_the_work_and_registers_its_model(
    ray_session, mlflow_server, tiny_imagenet, tmp_path
):
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    clone = shippable_clone(tmp_path / "clone")
    # The job's runtime env: this project's file as a user passes it, less `pip` (this machine has every
    # package; installing them is Ray's part), plus what the job needs to reach here.
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    env.pop("pip")
    env["env_vars"] = {
        "MLFLOW_TRACKING_URI": mlflow_server,
        # also forwarded by the driver's own ray.init: Ray refuses a key named twice
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }
    args = [
        "--data",
        str(tiny_imagenet),
        *JOB_FLAGS,
        "--experiment",
        name,
        "--registered-model",
        name,
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--train-resource",
        "train",
        "--data-resource",
        "data",
    ]

    with ray_head(num_cpus=1, worker_node_types=NODE_TYPES, idle_timeout_s=IDLE_TIMEOUT_S) as head:
        with pytest.raises(urllib.error.HTTPError) as refused:
            head.get("/api/jobs/", token=False)  # the job API answers no one without the token
        assert refused.value.code in (401, 403)
        # Ray's own processes on the nodes look for "the" Ray of this machine when they use the state API
        # (Train's PlacementGroupCleaner does); this machine runs several, a cluster's machines one.
        env["env_vars"]["RAY_ADDRESS"] = head.gcs_address
        (clone / "job_env.yaml").write_text(yaml.safe_dump(env))
        timeline = NodeTimeline(head)
        timeline.start()
        try:
            submitted = time.time()
            job = subprocess.run(
                [
                    str(Path(sys.executable).parent / "ray"),
                    "job",
                    "submit",
                    "--address",
                    head.dashboard,
                    "--submission-id",
                    name,
                    "--runtime-env",
                    "job_env.yaml",
                    "--",
                    "python",
                    "jobs/train.py",
                    *args,
                ],
                cwd=clone,
                env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token},
                capture_output=True,
                text=True,
                timeout=420,
            )
            job_seconds = time.time() - submitted
            (tmp_path / "job.log").write_text(job.stdout + job.stderr)
            info = head.get(f"/api/jobs/{name}")
            assert info["status"] == "SUCCEEDED", job.stdout[-4000:] + job.stderr[-2000:]
            # Scaled down: both nodes removed once idle.
            deadline = time.time() + IDLE_TIMEOUT_S + 60
            while time.time() < deadline and (not timeline.samples or any(timeline.alive().values())):
                time.sleep(0.5)
            scaled_down = time.time() - submitted - job_seconds
        finally:
            timeline.done.set()
            timeline.join()

        # Where the work ran, from the cluster's state API.
        tasks = head.get("/api/v0/tasks?limit=10000&detail=1")["data"]["result"]["result"]
        actors = head.get("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
        # What the job's upload held: the working_dir Ray unpacked for it.
        (package,) = {
            p.resolve() for p in head.log.parent.glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()
        }
        shipped = {p.relative_to(package).parts[0] for p in package.rglob("*")}

    counts = [alive for _, alive in timeline.samples]
    assert counts[0] == {"gpu": 0, "cpu": 0}, timeline.samples[:5]  # zero nodes when the job was submitted
    assert max(c["gpu"] for c in counts) >= 1 and max(c["cpu"] for c in counts) >= 1, timeline.samples
    assert counts[-1] == {"gpu": 0, "cpu": 0}, timeline.samples[-5:]  # and zero again after
    print(
        f"\nnodes (s, alive): {compress(timeline.samples)}; job {job_seconds:.0f} s, "
        f"scale-down {scaled_down:.0f} s after it"
    )

    decode = [t for t in tasks if "MapBatches" in t["name"] and t["state"] == "FINISHED"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert decode and len(workers) == 2
    assert {timeline.types[t["node_id"]] for t in decode} == {"cpu"}, {t["name"] for t in decode}
    assert {timeline.types[a["node_id"]] for a in workers} == {"gpu"}

    # The code went up without the clone's virtualenv, git directory, data and local stores.
    assert {"pipeline", "jobs", "pyproject.toml"} <= shipped
    assert not shipped & {".venv", ".git", "data", "mlruns", "ray_results", "mlflow.db", "shards"}, shipped

    client = mlflow.MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED"
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, (run.data.tags.get("registration"), tmp_path / "job.log")
    version = versions[0]
    assert version.run_id == run.info.run_id
    cluster_loss = [
        m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)
    ]

    # The same flags on one node (this session's Ray), no resources asked: the same loss curve.
    single = dataclasses.replace(
        parse_args(args[:-4]),
        experiment=f"{name}-single",
        registered_model=f"{name}-single",
        storage_path=str(tmp_path / "single"),
    )
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        summary = driver.run(single)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    single_loss = [
        m.value for m in sorted(client.get_metric_history(summary["run_id"], "train_loss"), key=lambda m: m.step)
    ]
    assert len(cluster_loss) == 2
    assert cluster_loss == pytest.approx(single_loss, rel=1e-5)


def compress(samples):
    """The timeline's changes only: [(s, {gpu, cpu}), ...]."""
    out = []
    for t, alive in samples:
        if not out or out[-1][1] != alive:
            out.append((t, alive))
    return out


def test_train_and_data_resources_reach_ray():
    cfg = parse_args(["--train-resource", "train", "--data-resource", "data"])
    # No CPU free yet (an autoscaling cluster at zero nodes): the workers wait for their nodes, no refusal.
    assert cluster.worker_resources(cfg, free_cpus=0.0) == {"CPU": 1.0, "train": 1.0}
    assert cluster.worker_resources(dataclasses.replace(cfg, use_gpu=True, placement="grouped"), free_cpus=0.0) == {
        "CPU": 1.0,
        "GPU": 2.0,
        "train": 1.0,
    }
    assert plan.placement_args(cfg) == {"resources": {"data": plan.DATA_RESOURCE_SHARE}}
    assert plan.placement_args(parse_args([])) == {}


def test_the_cluster_configs_offer_the_resources_the_flags_name():
    """What the submitted job above relies on, in the configs users launch: `train` only on the GPU node
    types, `data` only on the CPU-only ones, and neither on the head."""
    aws = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())["available_node_types"]
    assert "train" in aws["gpu_worker"]["resources"] and "data" not in aws["gpu_worker"]["resources"]
    assert "data" in aws["cpu_worker"]["resources"] and "train" not in aws["cpu_worker"]["resources"]
    assert not {"train", "data"} & set(aws["head"]["resources"])
    kuberay = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    groups = {
        g["groupName"]: yaml.safe_load(json_string(g["rayStartParams"].get("resources", '"{}"')))
        for g in kuberay["workerGroupSpecs"]
    }
    assert set(groups["gpu"]) == {"train"} and set(groups["cpu"]) == {"data"}
    assert "resources" not in kuberay["headGroupSpec"].get("rayStartParams", {})


def json_string(value: str) -> str:
    """KubeRay's rayStartParams resources value: a JSON object inside a quoted string ('"{\\"data\\": 1}"')."""
    import json

    return json.loads(value)
