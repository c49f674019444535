"""The cluster and deployment files are not launched from here (no cloud), so check what can be:
Ray's own schema for the cluster launcher config, the KubeRay manifests' shape, and that every
command line they hold parses with this project's flags."""

import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


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


# --- KubeRay's own schema ------------------------------------------------------------------------------------
# The CRDs of KubeRay v1.7.0 (ray-project/kuberay, tag v1.7.0, commit 59d663aeec13760646da3db9c1cf8cfe883e30b7,
# ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml), vendored verbatim, gzipped
# (tests/kuberay_crds/README.md has their sha256).
CRDS = Path(__file__).resolve().parent / "kuberay_crds"


def kuberay_schema(plural: str) -> dict:
    """The CRD's v1 openAPIV3Schema, made strict as `kubectl apply --validate=strict` (the API server's
    strict field validation) is: a field the schema does not name is an error, not silently pruned."""
    import gzip

    crd = yaml.load(gzip.open(CRDS / f"ray.io_{plural}.yaml.gz"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]

    def strict(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    return strict(version["schema"]["openAPIV3Schema"])


def crd_errors(manifest: dict, plural: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(kuberay_schema(plural))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_kuberay_manifests_pass_kuberays_crd_schema():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert crd_errors(cluster, "rayclusters") == []
    assert crd_errors(job, "rayjobs") == []

    # and the schema is a real check: a misspelt field, a value outside an enum and a wrong type are refused
    typo = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    typo["spec"]["enableInTreeAutoscalling"] = typo["spec"].pop("enableInTreeAutoscaling")
    typo["spec"]["authOptions"]["mode"] = "tokens"
    typo["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    errors = "\n".join(crd_errors(typo, "rayclusters"))
    assert "'enableInTreeAutoscalling' was unexpected" in errors
    assert "spec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']" in errors
    assert "spec.workerGroupSpecs.0.maxReplicas: 'four' is not of type 'integer'" in errors


# --- locked down ---------------------------------------------------------------------------------------------
INFRA = ROOT / "infra"


def terraform_names(kind: str) -> set[str]:
    """The `name = "..."` of every Terraform resource of one kind under infra/terraform."""
    import re

    text = "\n".join(p.read_text() for p in sorted((INFRA / "terraform").glob("*.tf")))
    blocks = re.findall(rf'resource "{kind}" "\w+" \{{(.*?)\n\}}', text, re.S)
    return {m for block in blocks for m in re.findall(r'^\s*name\s*=\s*"([^"]+)"', block, re.M)}


def test_aws_cluster_is_closed_and_reads_s3_through_its_instance_profiles():
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start  # every node speaks only to holders of the token
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token itself is not in git

    # Names that must be Terraform's: the group that opens only SSH from the operator, and the profiles.
    assert config["provider"]["security_group"]["GroupName"] in terraform_names("aws_security_group")
    profiles = {
        name: t["node_config"]["IamInstanceProfile"]["Name"] for name, t in config["available_node_types"].items()
    }
    assert set(profiles.values()) <= terraform_names("aws_iam_instance_profile")
    assert profiles[config["head_node_type"]] == "alexnet-ray-head"
    assert {p for n, p in profiles.items() if n != config["head_node_type"]} == {"alexnet-ray-worker"}


def test_kuberay_pods_run_with_token_auth_and_the_irsa_service_account():
    import re

    security = list(yaml.safe_load_all((CLUSTER / "kuberay" / "security.yaml").read_text()))
    (account,) = [d for d in security if d["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/alexnet-kuberay")
    iam = (INFRA / "terraform" / "iam.tf").read_text()
    subject = f"system:serviceaccount:{account['metadata']['namespace']}:{account['metadata']['name']}"
    assert re.search(r'name\s*=\s*"alexnet-kuberay"', iam) and f'"{subject}"' in iam  # the role trusts this account

    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for manifest, spec in ((cluster, cluster["spec"]), (job, job["spec"]["rayClusterSpec"])):
        assert manifest["metadata"]["namespace"] == account["metadata"]["namespace"]
        assert spec["authOptions"]["mode"] == "token"
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def checkov_binary() -> str:
    """checkov pins versions of boto3, packaging and others below this project's, so it lives in a venv of its
    own: `make .venv-checkov`, or $CHECKOV pointing at one."""
    import os
    import shutil

    for candidate in (
        os.environ.get("CHECKOV"),
        str(ROOT / ".venv-checkov" / "bin" / "checkov"),
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("checkov is not installed: `make .venv-checkov` (or set CHECKOV to its path)")


@pytest.mark.slow  # a job in a subprocess
def test_checkov_finds_nothing_in_cluster_and_infra_and_every_skip_says_why(tmp_path):
    """Static IaC scan (checkov: Terraform, Kubernetes, Dockerfiles, secrets in any file) of cluster/ and
    infra/: no failed check; each suppressed check carries its reason inline. A planted AWS key beside them
    proves the secret scan looks."""
    import json
    import shutil
    import subprocess

    shutil.copytree(CLUSTER, tmp_path / "cluster")
    shutil.copytree(INFRA, tmp_path / "infra")
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "credentials").write_text(  # AWS's documented example key, not a real one
        "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\n"
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
    )
    result = subprocess.run(
        [
            checkov_binary(),
            "-d",
            str(tmp_path),
            "--framework",
            "terraform",
            "kubernetes",
            "dockerfile",
            "secrets",
            "--enable-secret-scan-all-files",
            "--skip-download",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reports = json.loads(result.stdout)
    by_kind = {r["check_type"]: r for r in reports}
    assert {"terraform", "kubernetes", "dockerfile", "secrets"} <= by_kind.keys(), result.stderr[-2000:]
    assert by_kind["terraform"]["summary"]["resource_count"] >= 30  # it read every .tf file

    failed = [(c["check_id"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert {path for _, path in failed} == {"/planted/credentials"}, failed
    assert [r["summary"]["parsing_errors"] for r in reports] == [0] * len(reports)
    skipped = [c for r in reports for c in r["results"].get("skipped_checks", [])]
    unexplained = [
        (c["check_id"], c["file_path"]) for c in skipped if len(c["check_result"].get("suppress_comment", "")) < 20
    ]
    assert skipped and not unexplained, unexplained
