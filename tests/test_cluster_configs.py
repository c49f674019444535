"""The cluster and deployment files are not launched from here (no cloud), so check what can be:
Ray's own schema for the cluster launcher config, the KubeRay manifests' shape, and that every
command line they hold parses with this project's flags."""

import shlex
from pathlib import Path

import ray
import yaml

from pipeline.config import parse_args

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def test_aws_config_passes_rays_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] > 0  # GPUs autoscale from zero


def test_kuberay_manifests_match_this_ray_and_its_flags():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == ray.__version__
        assert spec["enableInTreeAutoscaling"] is True
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        assert gpu["minReplicas"] == 0
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/train.py"]
    cfg = parse_args(entrypoint[2:])
    assert cfg.placement == "grouped" and cfg.use_gpu
    limits = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert limits["limits"]["nvidia.com/gpu"] == "2"  # --placement grouped takes 2 GPUs per worker
