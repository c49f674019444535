"""The cluster and deployment files are not launched from here (no cloud), so check what can be:
Ray's own schema for the cluster launcher config, the KubeRay manifests' shape, and that every
command line they hold parses with this project's flags."""

import json
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def test_aws_config_passes_rays_cluster_schema():
    """The template and the file cluster/render.py makes of it both pass; the rendered one is what `ray up`
    reads (tests below: every placeholder is filled from Terraform's outputs)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))
    rendered = yaml.safe_load(renderer().render((CLUSTER / "aws.yaml").read_text(), fake_outputs()))
    validate_config(prepare_config(rendered))
    gpu = rendered["available_node_types"]["gpu_worker"]
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

    # Values that must be Terraform's, on every node type: the AMI, the subnet, the group that opens only SSH
    # from the operator, and the profiles, each the output that names the resource made for it.
    outputs = terraform_outputs()
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert node["ImageId"] == "${gpu_ami_id}", name
        assert node["SubnetIds"] == "${ray_subnet_ids}", name  # a list output: the whole value, not a string in it
        assert node["SecurityGroupIds"] == ["${security_group_id}"], name
        profile = "head_instance_profile" if name == config["head_node_type"] else "worker_instance_profile"
        assert node["IamInstanceProfile"] == {"Name": f"${{{profile}}}"}, name
    assert "security_group" not in config["provider"]  # every type names its group: Ray would ignore it
    assert outputs["gpu_ami_id"] == "data.aws_ami.gpu.id"
    assert outputs["ray_subnet_ids"] == "local.ray_subnet_ids"
    assert outputs["security_group_id"] == "aws_security_group.ray.id"
    assert terraform_names("aws_security_group") >= {"alexnet-ray"}
    assert outputs["head_instance_profile"] == "aws_iam_instance_profile.ray_head.name"
    assert outputs["worker_instance_profile"] == "aws_iam_instance_profile.ray_worker.name"
    assert terraform_names("aws_iam_instance_profile") == {"alexnet-ray-head", "alexnet-ray-worker"}


# --- Terraform's outputs into the templates ---------------------------------------------------------------------
# cluster/aws.yaml and infra/mlflow/k8s.yaml name every value Terraform makes as "${output}"; cluster/render.py
# fills them from `terraform output -json`. Checked here: each such name is an output, the rendered files hold
# no placeholder and pass Ray's schema, Ray's own AWS bootstrap (against moto's EC2) keeps the pinned subnet,
# security group and AMI and makes no group of its own, and the renderer refuses to write half a file.
MLFLOW_K8S = INFRA / "mlflow" / "k8s.yaml"
OPERATOR_VALUES = {"image_tag"}  # the one value not Terraform's: the tag pushed to ECR (README step 3)


def renderer():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", CLUSTER / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def terraform_outputs() -> dict[str, str]:
    """Each `output "name"` in infra/terraform/outputs.tf and the expression of its value."""
    import re

    text = (INFRA / "terraform" / "outputs.tf").read_text()
    blocks = re.findall(r'^output "(\w+)" \{\n(.*?)^\}', text, re.M | re.S)
    return {name: re.search(r"^\s*value\s*=\s*(.+?)\s*(?:#.*)?$", body, re.M).group(1) for name, body in blocks}


def fake_outputs(**overrides) -> dict:
    """What `terraform output -json` gives, as values, with one made-up value for every output."""
    account, region = "123456789012", "us-west-2"
    registry = f"{account}.dkr.ecr.{region}.amazonaws.com"
    values = {
        "region": region,
        "bucket": "my-alexnet-bucket",
        "gpu_ami_id": "ami-0123456789abcdef0",
        "gpu_ami_name": "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20261009",
        "ray_subnet_ids": ["subnet-0123456789abcdef0"],
        "security_group_id": "sg-0123456789abcdef0",
        "head_instance_profile": "alexnet-ray-head",
        "worker_instance_profile": "alexnet-ray-worker",
        "ecr_registry": registry,
        "ecr_repository_url": f"{registry}/alexnet-ray",
        "mlflow_repository_url": f"{registry}/alexnet-mlflow",
        "vpc_cidr": "172.31.0.0/16",
        "mlflow_hostname": "mlflow.ml.example.com",
        "mlflow_certificate_arn": f"arn:aws:acm:{region}:{account}:certificate/0d5bc3e1-5f0e-4b8a-9d1c-2f6c1e0a7b42",
        "kuberay_role_arn": f"arn:aws:iam::{account}:role/alexnet-kuberay",
        "mlflow_role_arn": f"arn:aws:iam::{account}:role/alexnet-mlflow",
        "db_endpoint": f"alexnet-mlflow.c0ffee.{region}.rds.amazonaws.com:5432",
        "db_password_secret_arn": f"arn:aws:secretsmanager:{region}:{account}:secret:rds!db-0123",
    }
    assert set(values) == set(terraform_outputs())  # a new output gets a made-up value here too
    return {**values, "image_tag": "3f2c1ab", **overrides}


def template_placeholders(path: Path) -> set[str]:
    return set().union(*(renderer().placeholders(d) for d in yaml.safe_load_all(path.read_text())))


def test_every_value_the_templates_take_from_terraform_is_an_output():
    outputs = set(terraform_outputs())
    aws, k8s = template_placeholders(CLUSTER / "aws.yaml"), template_placeholders(MLFLOW_K8S)
    assert aws - OPERATOR_VALUES <= outputs and k8s <= outputs, (aws - OPERATOR_VALUES - outputs, k8s - outputs)
    assert {"gpu_ami_id", "ray_subnet_ids", "security_group_id", "ecr_registry", "ecr_repository_url"} <= aws
    assert {"mlflow_role_arn", "vpc_cidr", "mlflow_hostname", "mlflow_certificate_arn", "bucket"} <= k8s
    # and no hand-edited stand-in is left beside them, in what the files say (comments aside)
    for path in (CLUSTER / "aws.yaml", MLFLOW_K8S):
        loaded = json.dumps(list(yaml.safe_load_all(path.read_text())))
        for stand_in in ("OWNER", "ACCOUNT_ID", "BUCKET", "CERTIFICATE_ID", "example.internal", "latest_dlami"):
            assert stand_in not in loaded, (path.name, stand_in)
        assert "10.0.0.0/16" not in loaded and "us-west-2" not in loaded, path.name  # the VPC's and region's own


def test_rendered_files_hold_terraforms_values_and_no_placeholder():
    import ipaddress

    values = fake_outputs()
    aws = yaml.safe_load(renderer().render((CLUSTER / "aws.yaml").read_text(), values))
    assert "${" not in json.dumps(aws)
    assert aws["provider"]["region"] == values["region"]
    assert aws["docker"]["image"] == f"{values['ecr_repository_url']}:{values['image_tag']}"
    for name, node_type in aws["available_node_types"].items():
        node = node_type["node_config"]
        assert node["SubnetIds"] == values["ray_subnet_ids"], name
        assert node["SecurityGroupIds"] == [values["security_group_id"]], name
        assert node["ImageId"] == values["gpu_ami_id"], name
        # Ray runs a node type's own initialization_commands instead of the top-level ones: each logs in to
        # ECR (with the node's role, in its region) before Docker pulls the image
        login = node_type.get("initialization_commands", aws["initialization_commands"])[0]
        assert login == (
            f'aws ecr get-login-password --region "{values["region"]}" | '
            f'docker login --username AWS --password-stdin "{values["ecr_registry"]}"'
        ), name
    assert values["ecr_repository_url"].startswith(values["ecr_registry"] + "/")

    docs = {d["kind"]: d for d in yaml.safe_load_all(renderer().render(MLFLOW_K8S.read_text(), values))}
    assert "${" not in json.dumps(docs)
    ingress, policy = docs["Ingress"], docs["NetworkPolicy"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["alb.ingress.kubernetes.io/certificate-arn"] == values["mlflow_certificate_arn"]
    (rule,) = ingress["spec"]["rules"]
    env = {e["name"]: e["value"] for e in docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert rule["host"] == env["MLFLOW_ALLOWED_HOSTS"].split(",")[0] == values["mlflow_hostname"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{values['bucket']}/mlflow-artifacts"
    cidr = policy["spec"]["ingress"][0]["from"][1]["ipBlock"]["cidr"]
    assert cidr == annotations["alb.ingress.kubernetes.io/inbound-cidrs"] == values["vpc_cidr"]
    ipaddress.ip_network(cidr)
    account = docs["ServiceAccount"]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert account == values["mlflow_role_arn"]


def test_render_refuses_a_missing_or_null_value_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    render = renderer()
    with pytest.raises(ValueError, match="no value for image_tag, security_group_id"):
        render.render((CLUSTER / "aws.yaml").read_text(), fake_outputs(security_group_id=None) | {"image_tag": None})
    with pytest.raises(ValueError, match="cannot stand inside"):  # a list spliced into a string
        render.render("image: ${ray_subnet_ids}:x\n", fake_outputs())

    # The command line, as README runs it: `terraform output -json` on stdin. IRSA off: mlflow_role_arn is
    # null, so k8s.yaml is refused and nothing is written; with --set the same file renders.
    outputs = {k: {"sensitive": False, "type": "string", "value": v} for k, v in fake_outputs().items()}
    outputs["mlflow_role_arn"]["value"] = None
    target = tmp_path / "k8s.yaml"
    run = [sys.executable, str(CLUSTER / "render.py"), str(MLFLOW_K8S), "-o", str(target)]
    refused = subprocess.run(run, input=json.dumps(outputs), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "no value for mlflow_role_arn" in refused.stderr and not target.exists()
    role = "arn:aws:iam::123456789012:role/alexnet-mlflow"
    done = subprocess.run([*run, "--set", f"mlflow_role_arn={role}"], input=json.dumps(outputs), text=True, timeout=60)
    assert done.returncode == 0 and f"eks.amazonaws.com/role-arn: {role}" in target.read_text()


def test_rays_own_aws_bootstrap_keeps_the_pinned_subnet_group_and_ami(tmp_path, monkeypatch):
    """Ray 2.60's `ray up` bootstrap (ray.autoscaler._private.aws.config.bootstrap_aws), run against moto's EC2:
    with the rendered file it makes no security group and launches into exactly the subnet, group, AMI and
    profiles Terraform gave. The same file without SecurityGroupIds shows what was at stake: Ray makes a group
    of its own, open to SSH from anywhere."""
    import boto3
    from moto import mock_aws
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    monkeypatch.setenv("HOME", str(tmp_path))  # Ray writes the cluster's SSH key under ~/.ssh
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-west-2")
        vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
        subnet = sorted(s["SubnetId"] for s in subnets)[0]  # main.tf's choice: one subnet
        group = ec2.create_security_group(GroupName="alexnet-ray", Description="network.tf", VpcId=vpc)["GroupId"]
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        values = fake_outputs(ray_subnet_ids=[subnet], security_group_id=group, gpu_ami_id=ami)
        config = prepare_config(yaml.safe_load(renderer().render((CLUSTER / "aws.yaml").read_text(), values)))

        def groups():
            return {g["GroupName"]: g for g in ec2.describe_security_groups()["SecurityGroups"]}

        before = groups()
        launched = bootstrap_aws(config)
        assert groups().keys() == before.keys()
        for name, node_type in launched["available_node_types"].items():
            node = node_type["node_config"]
            assert (node["SubnetIds"], node["SecurityGroupIds"], node["ImageId"]) == ([subnet], [group], ami), name

        for node_type in config["available_node_types"].values():
            del node_type["node_config"]["SecurityGroupIds"]
        bootstrap_aws(config)
        (made,) = groups().keys() - before.keys()
        ssh = [r for r in groups()[made]["IpPermissions"] if r.get("FromPort") == 22]
        assert ssh and ssh[0]["IpRanges"] == [{"CidrIp": "0.0.0.0/0"}]


def test_the_nodes_get_a_driver_for_the_images_cuda_and_the_subnet_offers_the_gpu():
    """The GPU node type refuses a driver below what the image's torch needs (CUDA minor-version
    compatibility: 12.x needs >= 525, 13.x >= 580; this venv's torch is the one the image's pip resolves
    from pyproject), and the AMI is AWS's GPU DLAMI by name, never Ray's `latest_dlami` (Ubuntu 18.04, CUDA 11.2)."""
    import re

    import torch

    floor = {"12": 525, "13": 580}[torch.version.cuda.split(".")[0]]
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = config["available_node_types"]
    check = next(c for c in types["gpu_worker"]["initialization_commands"] if "driver_version" in c)
    assert int(re.search(r"-ge (\d+)", check).group(1)) >= floor

    main = (INFRA / "terraform" / "main.tf").read_text()
    ami = re.search(r'data "aws_ami" "gpu" \{(.*?)\n\}', main, re.S).group(1)
    assert 'owners      = ["amazon"]' in ami and "most_recent = true" in ami
    assert '"Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"' in ami and '"x86_64"' in ami
    # The subnet Terraform picks is in an AZ that offers the GPU node type's instance type.
    gpu_type = re.search(r'gpu_instance_type = "([\w.]+)"', main).group(1)
    assert gpu_type == types["gpu_worker"]["node_config"]["InstanceType"]


# vCPUs of the instance types cluster/aws.yaml uses, from EC2's instance-type tables: what the quotas count.
EC2_VCPUS = {"m6i.2xlarge": 8, "g5.12xlarge": 48, "c6i.8xlarge": 32}


def aws_walkthrough_commands() -> list[str]:
    """The command lines of README's AWS walkthrough (its indented blocks), continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From nothing to a registered model on AWS") : text.index("### How the cloud files")]
    commands, current = [], ""
    for line in section.splitlines():
        if not line.startswith("    ") and not current:
            continue
        current += " " + line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            commands.append(" ".join(current.split()))
            current = ""
    return commands


def test_aws_walkthrough_talks_to_the_cluster_with_its_token_and_asks_for_the_quotas_it_needs():
    import re

    commands = aws_walkthrough_commands()
    jobs = [c for c in commands if re.search(r"\bray job ", c)]
    assert {c.split()[3] for c in jobs} >= {"submit", "logs", "status"}
    for command in jobs:  # without the token the job API answers 401; without the address it finds no cluster
        assert command.startswith("RAY_AUTH_MODE=token ray job ") and "--address http://127.0.0.1:8265" in command
    statuses = [c for c in commands if "ray status" in c]
    assert statuses and all("RAY_AUTH_MODE=token ray status" in c for c in statuses)

    # The templates are rendered with Terraform's outputs and only the values of the operator's own.
    renders = [c for c in commands if "cluster/render.py" in c]
    assert {"cluster/aws.yaml", "infra/mlflow/k8s.yaml"} <= {w for c in renders for w in c.split()}
    piped = "terraform -chdir=infra/terraform output -json | python cluster/render.py"
    assert all(c.startswith(piped) for c in renders), renders
    given = {m for c in renders for m in re.findall(r"--set (\w+)=", c)}
    assert given == OPERATOR_VALUES

    # Quotas: enough vCPUs for the node types at their maximum (G and VT: one GPU node at least).
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = config["available_node_types"]
    asked = {
        re.search(r"--quota-code (\S+)", c).group(1): float(re.search(r"--desired-value (\S+)", c).group(1))
        for c in commands
        if "request-service-quota-increase" in c
    }
    gpu = EC2_VCPUS[types["gpu_worker"]["node_config"]["InstanceType"]]
    standard = sum(
        EC2_VCPUS[t["node_config"]["InstanceType"]] * (1 if n == config["head_node_type"] else t["max_workers"])
        for n, t in types.items()
        if n != "gpu_worker"
    )
    assert asked["L-DB2E81BA"] >= gpu and asked["L-1216C47A"] >= standard, (asked, gpu, standard)


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
    # the same image, from each cloud's own registry (AWS: Terraform's ECR repository, an immutable tag)
    assert docker.pop("image").rsplit("/", 1)[1].split(":")[0] == "alexnet-ray"
    assert aws_docker.pop("image") == "${ecr_repository_url}:${image_tag}"
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
