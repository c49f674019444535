"""Run by test_multinode.py in a process of its own: a two-node Ray cluster on this one machine.

Trains the same tiny deterministic run twice, once with the two workers forced onto different
nodes (STRICT_SPREAD) and once onto one node (STRICT_PACK), and prints one JSON line: each run's
per-epoch train loss and val top-1, and the node of every train worker.
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipeline.config import PRESETS  # noqa: E402
from pipeline.data.sample import generate_sample_imagenet  # noqa: E402
from pipeline.train import driver  # noqa: E402


class WorkerNodes(ray.train.UserCallback):
    """Writes the node each worker reported from (it runs on the Train controller, not here)."""

    def __init__(self, path: Path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        self.path.write_text(json.dumps([m["node_id"] for m in metrics]))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="multinode-"))
    data = generate_sample_imagenet(work / "data", num_classes=3, train_per_class=16, val_per_class=4, seed=2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()

    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    base = dataclasses.replace(
        PRESETS["sample"],
        data=str(data),
        width=0.125,
        resize_size=80,
        crop_size=67,
        epochs=2,
        batch_size=8,
        workers=2,
        deterministic=True,
        max_failures=0,
        experiment="multinode",
        registered_model="multinode",
        storage_path=str(work / "ray_results"),
    )
    import os

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    out = {}
    for strategy in ("STRICT_SPREAD", "STRICT_PACK"):
        nodes = work / f"{strategy}-nodes.json"
        summary = driver.run(dataclasses.replace(base, worker_strategy=strategy), callbacks=[WorkerNodes(nodes)])
        client = mlflow.MlflowClient(tracking_uri)
        history = {
            key: [m.value for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.step)]
            for key in ("train_loss", "val_top1")
        }
        out[strategy] = {**history, "nodes": json.loads(nodes.read_text())}
    print("RESULT " + json.dumps(out), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
