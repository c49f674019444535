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


# --- Google Cloud: cluster/gcp.yaml ---------------------------------------------------------------------------
# Ray's schema leaves node_config free (Ray passes it to Compute Engine's instances.insert as it is), so the GCE
# side is checked here against what GCE's REST reference and machine-type tables say.

# Machine types the file uses: (vCPUs, GPUs, the GPUs' accelerator type), from GCE's machine-type tables.
GCE_MACHINE_TYPES = {
    "n2-standard-8": (8, 0, None),
    "c2d-highcpu-32": (32, 0, None),
    "a2-highgpu-4g": (48, 4, "nvidia-tesla-a100"),
}
# Fields of GCE's Instance resource (REST v1) a launcher config has reason to set, and sourceInstanceTemplate,
# which Ray takes out and sends as a query parameter: a misspelt field is caught here, not by GCE at launch.
GCE_INSTANCE_FIELDS = {
    "machineType", "disks", "networkInterfaces", "serviceAccounts", "scheduling", "guestAccelerators",
    "metadata", "labels", "tags", "minCpuPlatform", "shieldedInstanceConfig", "confidentialInstanceConfig",
    "advancedMachineFeatures", "reservationAffinity", "resourcePolicies", "networkPerformanceConfig",
    "description", "deletionProtection", "canIpForward", "sourceInstanceTemplate",
}  # fmt: skip
GCE_SCHEDULING_FIELDS = {
    "onHostMaintenance", "automaticRestart", "preemptible", "provisioningModel", "instanceTerminationAction",
    "nodeAffinities", "maxRunDuration", "onInstanceStopAction",
}  # fmt: skip


def gcp_config() -> dict:
    return yaml.safe_load((CLUSTER / "gcp.yaml").read_text())


def rays_gcp_service_account() -> tuple[str, list[str]]:
    """The account Ray 2.60's `ray up` makes for the head and the roles it binds to it, read from Ray's own
    source (ray/autoscaler/_private/gcp/config.py, which cannot be imported without Google's API client)."""
    import ast

    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "_private" / "gcp" / "config.py"
    names: dict = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in {"RAY", "VERSION", "DEFAULT_SERVICE_ACCOUNT_ID", "DEFAULT_SERVICE_ACCOUNT_ROLES"}:
                names[name] = eval(compile(ast.Expression(node.value), str(path), "eval"), {}, dict(names))
    return names["DEFAULT_SERVICE_ACCOUNT_ID"], names["DEFAULT_SERVICE_ACCOUNT_ROLES"]


def test_gcp_config_passes_rays_cluster_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = gcp_config()
    assert config["provider"]["type"] == "gcp"
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    assert set(types) == set(yaml.safe_load((CLUSTER / "aws.yaml").read_text())["available_node_types"])
    for name, node_type in types.items():
        if name != config["head_node_type"]:
            assert node_type["min_workers"] == 0 and node_type["max_workers"] > 0, name  # all from zero


def test_gcp_node_configs_are_what_compute_engine_takes():
    import json
    import re

    config = gcp_config()
    provider = config["provider"]
    zone, region, project = provider["availability_zone"], provider["region"], provider["project_id"]
    assert zone.startswith(region + "-")
    for name, node_type in config["available_node_types"].items():
        node, resources = node_type["node_config"], node_type["resources"]
        assert set(node) <= GCE_INSTANCE_FIELDS, (name, set(node) - GCE_INSTANCE_FIELDS)
        # Ray's GCP provider takes a node_config with acceleratorType/acceleratorConfig for a TPU VM
        assert "acceleratorType" not in node and "acceleratorConfig" not in node

        # What Ray plans with is what the machine has: Ray fills resources in from the instance type on AWS only.
        cpus, gpus, accelerator = GCE_MACHINE_TYPES[node["machineType"]]
        assert resources["CPU"] == cpus and resources.get("GPU", 0) == gpus, name
        attached = node.get("guestAccelerators", [])
        assert sum(a["acceleratorCount"] for a in attached) == gpus, name
        assert {a["acceleratorType"] for a in attached} == ({accelerator} if gpus else set()), name
        if gpus:  # GCE refuses GPUs with live migration; scheduling is an object (not the list of Ray's old examples)
            assert isinstance(node["scheduling"], dict) and node["scheduling"]["onHostMaintenance"] == "TERMINATE"
        assert set(node.get("scheduling", {})) <= GCE_SCHEDULING_FIELDS

        # Everything in the provider's zone and region, on the locked-down network, behind its firewall tag
        (boot,) = [d for d in node["disks"] if d.get("boot")]
        assert boot["initializeParams"]["diskType"].startswith(f"zones/{zone}/diskTypes/")
        assert boot["initializeParams"]["sourceImage"].startswith("projects/deeplearning-platform-release/")
        (interface,) = node["networkInterfaces"]  # in every node type: Ray then picks no subnet itself
        assert interface["subnetwork"] == f"regions/{region}/subnetworks/alexnet-ray"
        assert node["tags"]["items"] == ["alexnet-ray"]

    # The project is named once: the service accounts' and the containers' project is provider.project_id.
    text = (CLUSTER / "gcp.yaml").read_text()
    assert set(re.findall(r"@([\w-]+)\.iam\.gserviceaccount\.com", text)) == {project}
    assert set(re.findall(r"GOOGLE_CLOUD_PROJECT=(\S+?)\"", text)) == {project}
    assert "AWS_" not in json.dumps(config)  # no AWS region or endpoint carried over


def gcp_header_commands() -> list[list[str]]:
    """The command lines gcp.yaml's header comment shows (`ray ...`, `RAY_AUTH_MODE=token ray ...`, `gcloud ...`),
    continuation lines joined, split as a shell would."""
    commands, current = [], None
    for line in (CLUSTER / "gcp.yaml").read_text().splitlines():
        text = line.removeprefix("#").strip()
        if current is None and not (
            line.startswith("#   ") and text.split(" ")[0] in {"ray", "RAY_AUTH_MODE=token", "gcloud"}
        ):
            continue
        current = (current or "") + " " + text.removesuffix("\\")
        if not text.endswith("\\"):
            commands.append(shlex.split(current.split(" # ")[0]))
            current = None
    return commands


def test_gcp_nodes_run_as_service_accounts_with_the_least_they_need():
    config = gcp_config()
    project = config["provider"]["project_id"]
    account_id, roles = rays_gcp_service_account()
    accounts = {name: t["node_config"]["serviceAccounts"] for name, t in config["available_node_types"].items()}
    assert all(len(a) == 1 for a in accounts.values())  # GCE takes one service account a VM
    head = accounts.pop(config["head_node_type"])[0]
    # The head is Ray's own autoscaler account (Ray binds its roles in `ray up`; the file's comment names them)
    assert head["email"] == f"{account_id}@{project}.iam.gserviceaccount.com"
    assert head["scopes"] == ["https://www.googleapis.com/auth/cloud-platform"]
    text = (CLUSTER / "gcp.yaml").read_text()
    assert all(role in text for role in roles), roles
    # the workers: the bucket-only account, and a token good for Cloud Storage alone
    for name, (account,) in accounts.items():
        assert account["email"] == f"alexnet-ray-worker@{project}.iam.gserviceaccount.com", name
        assert account["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"], name
    binding = next(
        c for c in gcp_header_commands() if c[:4] == ["gcloud", "storage", "buckets", "add-iam-policy-binding"]
    )
    assert binding[4] == "gs://BUCKET"  # the bucket alone, not the project
    bucket = next(c for c in gcp_header_commands() if c[:4] == ["gcloud", "storage", "buckets", "create"])
    assert bucket[4] == binding[4] and {"--uniform-bucket-level-access", "--public-access-prevention"} <= set(bucket)
    assert binding[binding.index("--role") + 1] == "roles/storage.objectAdmin"
    assert (
        binding[binding.index("--member") + 1] == f"serviceAccount:alexnet-ray-worker@{project}.iam.gserviceaccount.com"
    )


def test_gcp_cluster_is_closed_runs_as_aws_does_and_offers_what_its_commands_use():
    config, aws = gcp_config(), yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in next(c for c in commands if "ray start" in c)
    # the same image, token, MLflow sign-in and Ray start as on AWS; only the project's env is added
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "file_mounts", "setup_commands"):
        assert config[key] == aws[key], key
    docker, aws_docker = dict(config["docker"]), dict(aws["docker"])
    assert docker.pop("run_options") == [
        *aws_docker.pop("run_options"),
        f"--env GOOGLE_CLOUD_PROJECT={config['provider']['project_id']}",
    ]
    assert docker == aws_docker

    # The network the nodes name is the one the header makes, whose firewall admits SSH from one address and
    # the cluster's own nodes, nothing from 0.0.0.0/0 (the default network's SSH rule).
    commands = gcp_header_commands()

    def made(*verb: str) -> dict[str, list[str]]:
        return {c[len(verb) + 1]: c for c in commands if tuple(c[: len(verb) + 1]) == ("gcloud", *verb)}

    (subnet,) = made("compute", "networks", "subnets", "create").items()
    assert subnet[0] == "alexnet-ray" and subnet[1][subnet[1].index("--region") + 1] == config["provider"]["region"]
    rules = made("compute", "firewall-rules", "create")
    assert set(rules) == {"alexnet-ray-ssh", "alexnet-ray-internal"}
    for rule in rules.values():
        assert rule[rule.index("--network") + 1] == "alexnet-ray" and "0.0.0.0/0" not in rule
        assert rule[rule.index("--target-tags") + 1] == "alexnet-ray"  # the tag every node carries (test above)
    ssh, internal = rules["alexnet-ray-ssh"], rules["alexnet-ray-internal"]
    assert ssh[ssh.index("--allow") + 1] == "tcp:22"
    assert " ".join(ssh[ssh.index("--source-ranges") + 1 :]).endswith(")/32")  # the operator's one address
    assert internal[internal.index("--source-tags") + 1] == "alexnet-ray" and "--source-ranges" not in internal

    # `train` only on the GPU nodes, `data` only on the CPU-only ones, neither on the head
    types = config["available_node_types"]
    offering = {r: {n for n, t in types.items() if r in t["resources"]} for r in ("train", "data", "GPU")}
    assert offering == {"train": {"gpu_worker"}, "data": {"cpu_worker"}, "GPU": {"gpu_worker"}}

    # The job the header shows parses with this project's flags and asks for what the node types offer.
    argv = next(c for c in commands if c[:4] == ["RAY_AUTH_MODE=token", "ray", "job", "submit"])
    cfg = parse_args(argv[argv.index("jobs/train.py") + 1 :])
    assert cfg.data.startswith("gs://") and cfg.storage_path.startswith("gs://")
    assert cfg.use_gpu and cfg.placement == "grouped" and cfg.data_resource in offering
    gpus_per_node = types["gpu_worker"]["resources"]["GPU"]
    assert cfg.workers * 2 <= gpus_per_node  # grouped: 2 GPUs a worker; the run fits one node, as README advises


@pytest.mark.slow  # checkov in a subprocess
def test_checkov_reads_the_gcp_config_for_secrets_and_has_no_checks_for_rays_yaml(tmp_path):
    """checkov has no framework for Ray's cluster YAML (no IaC report about it at all, as for aws.yaml): what it
    does with the file is its secret scan. A service-account key planted in a copy proves that scan reads it;
    the file as it is has nothing."""
    import json
    import subprocess

    (tmp_path / "cluster").mkdir()
    (tmp_path / "planted").mkdir()
    text = (CLUSTER / "gcp.yaml").read_text()
    (tmp_path / "cluster" / "gcp.yaml").write_text(text)
    # A made-up key in the shape of a service account's JSON key file, put together here so that this source
    # file holds no PEM block for other scanners to report.
    pem = "-----{} PRIVATE KEY-----"
    body = (
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKjMzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDuic"
        "tGeurT8jNbvJZHtCSuYEvuNMoSfm76oqFvAp8Gy0iz5sxjZmSnXyCdPEovGhLa0VzMaQ8s+CLOyS56YyCFGeJZ"
    )
    private_key = f"{pem.format('BEGIN')}\\n{body}\\n{pem.format('END')}\\n"
    key = f'{{"type": "service_account", "private_key": "{private_key}"}}'
    planted = text.replace("file_mounts:\n", f"file_mounts:\n  ~/key.json: {key}\n", 1)
    assert yaml.safe_load(planted)["file_mounts"]["~/key.json"]["type"] == "service_account"
    (tmp_path / "planted" / "gcp.yaml").write_text(planted)

    result = subprocess.run(
        [checkov_binary(), "-d", str(tmp_path), "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    # every framework looked; only the secret scan had anything to report on
    assert [r.get("check_type") for r in reports] == ["secrets"], result.stderr[-2000:]
    failed = [(c["check_id"], c["file_path"]) for c in reports[0]["results"]["failed_checks"]]
    assert failed == [("CKV_SECRET_13", "/planted/gcp.yaml")]  # a private key: in the planted copy only
    assert reports[0]["summary"]["parsing_errors"] == 0
