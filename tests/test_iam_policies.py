"""The IAM policies Terraform grants: the JSON documents in infra/terraform/policies/, which iam.tf fills in with
templatefile(). Rendered here as templatefile() does (and checked against terraform itself, where it is installed),
scanned by checkov (which cannot see through a templatefile() in iam.tf), and the Ray nodes' data policy run
against with moto enforcing IAM: the prepare job, a training epoch with its checkpoints in the bucket and an
evaluation all succeed under it, and what it must not allow is refused.

moto's IAM enforcement (its server, after INITIAL_NO_AUTH_ACTION_COUNT requests; here the three that make an
administrator, so every later request is checked, the administrator's too) checks: the request's SigV4 signature
and access key, the inline and attached policies of the key's IAM user, each statement's Action and Resource with
IAM's wildcards, and Deny over Allow. Where it differs from AWS, serve_moto_as_aws() mends it, from the S3 API
reference and IAM's policy evaluation rules:
  * moto asks a policy for the S3 operation's name (s3:HeadBucket, s3:ListObjectsV2, s3:HeadObject), which no
    policy can grant; AWS asks for the IAM action (s3:ListBucket, s3:GetObject: S3_ACTIONS);
  * moto gives an S3 request no condition keys and evaluates StringEquals alone, so the old s3:prefix condition
    was ignored and the old policy passed for any request. Here a listing's prefix parameter is s3:prefix,
    StringLike and StringEquals (and ...IfExists) are evaluated, a condition on a key the request lacks fails,
    and a statement whose condition fails does not apply (moto made it a Deny). Any other operator fails the
    request rather than passing it;
  * moto answers a missing key with 404 to anyone allowed s3:GetObject; S3 answers 404 only to a caller that may
    s3:ListBucket the bucket, 403 to any other;
  * moto asks an IAM policy for "s3:DeleteObjects" on the bucket; AWS asks for s3:DeleteObject on each key. Here
    one refused key refuses them all (moto then answers each key Access Denied), where AWS refuses that key alone.
Not checked: KMS (the key statements are never consulted: moto's bucket has no SSE-KMS configuration here), the
bucket's own policy (TLS only: the test speaks plain HTTP to moto), condition keys other than s3:prefix, instance
profiles and IRSA (an IAM user with the same policy stands in for a node's role), Ray Train dropping a checkpoint
itself (a one-epoch run drops none: the test deletes one as it would, through pyarrow), CopyObject's read of its
source, and the ECR, EC2 and MLflow documents, which are checked statically only (rendered, matched to iam.tf and
cluster/aws.yaml, scanned by checkov).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, wait_for_http

TERRAFORM = ROOT / "infra" / "terraform"
POLICIES = TERRAFORM / "policies"
PLACEHOLDER = re.compile(r"\$\{(\w+)\}")  # templatefile()'s interpolation, the only template syntax these use


def prefixes() -> dict[str, str]:
    """The bucket's prefixes, as main.tf's locals name them (raw_prefix = "ilsvrc2012", ...)."""
    text = (TERRAFORM / "main.tf").read_text()
    found = dict(
        re.findall(r'^\s*(raw_prefix|shards_prefix|results_prefix|artifacts_prefix)\s*=\s*"([^"]+)"', text, re.M)
    )
    assert len(found) == 4, found
    return found


def render(name: str, values: dict[str, str]) -> dict:
    """policies/<name> as templatefile(path, values) makes it: each ${name} replaced by its value as it is (no
    escaping), an error for a name without a value. Refuses the template syntax this does not implement."""
    text = (POLICIES / name).read_text()
    assert "%{" not in text and "$${" not in text, f"{name}: template directives or escapes, not rendered here"
    missing = set(PLACEHOLDER.findall(text)) - values.keys()
    if missing:
        raise KeyError(f"{name} uses {sorted(missing)}, which are not given")
    return json.loads(PLACEHOLDER.sub(lambda m: values[m.group(1)], text))


def ray_data_policy(values: dict[str, str], *, shards_writable: bool) -> dict:
    """iam.tf's aws_iam_policy_document.ray_data: ray-data.json, and ray-data-write-shards.json merged in while
    shards_writable (source_policy_documents appends the statements)."""
    statements = render("ray-data.json", values)["Statement"]
    if shards_writable:
        statements += render("ray-data-write-shards.json", values)["Statement"]
    return {"Version": "2012-10-17", "Statement": statements}


def iam_tf_templates() -> dict[str, set[str]]:
    """Each policies/ document iam.tf reads with templatefile(), and the names it gives it (a local's map or an
    inline one)."""
    text = (TERRAFORM / "iam.tf").read_text()
    calls = re.findall(r'templatefile\("\$\{path\.module\}/policies/([\w.-]+)",\s*(local\.\w+|\{.*?\})\)', text, re.S)
    given: dict[str, set[str]] = {}
    for name, values in calls:
        if values.startswith("local."):
            block = re.search(rf"^\s*{values.removeprefix('local.')}\s*=\s*\{{(.*?)\n\s*\}}", text, re.M | re.S)
            assert block, values
            values = block.group(1)
        given.setdefault(name, set()).update(re.findall(r"(\w+)\s*=", values))
    return given


# Stand-ins for what Terraform knows: the bucket and key ARNs (moto's account), the other documents' names.
BUCKET = "alexnet-iam-test"
VALUES = {
    "bucket_arn": f"arn:aws:s3:::{BUCKET}",
    "kms_key_arn": "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000",
    **prefixes(),
    "repository_arn": "arn:aws:ecr:us-west-2:123456789012:repository/alexnet-ray",
    "region": "us-west-2",
    "account_id": "123456789012",
    "cluster_name": "alexnet",
    "worker_role_arn": "arn:aws:iam::123456789012:role/alexnet-ray-worker",
}


# --- the documents, as Terraform reads them ------------------------------------------------------------------


def test_every_document_is_read_by_iam_tf_with_every_name_it_uses():
    given = iam_tf_templates()
    assert set(given) == {p.name for p in POLICIES.glob("*.json")}  # no document left behind, none missing
    for name, names in given.items():
        document = render(name, VALUES)  # plain JSON once filled in
        used = set(PLACEHOLDER.findall((POLICIES / name).read_text()))
        assert used <= names, f"iam.tf gives {name} {sorted(names)}, it uses {sorted(used)}"
        sids = [s["Sid"] for s in document["Statement"]]
        assert len(sids) == len(set(sids)) and document["Version"] == "2012-10-17", name
    # merged into one policy while shards_writable: the Sids must differ across the two (Terraform refuses)
    merged = [s["Sid"] for s in ray_data_policy(VALUES, shards_writable=True)["Statement"]]
    assert len(merged) == len(set(merged))


def test_the_autoscaler_may_launch_exactly_the_worker_types_of_the_cluster_config():
    import yaml

    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    workers = {
        t["node_config"]["InstanceType"]
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    (launch,) = [s for s in render("ray-autoscaler.json", VALUES)["Statement"] if s["Sid"] == "LaunchConfiguredWorkers"]
    assert set(launch["Condition"]["StringEqualsIfExists"]["ec2:InstanceType"]) == workers


def test_the_nodes_pull_from_the_one_repository_and_the_pods_do_not():
    pull = render("ecr-pull.json", VALUES)["Statement"]
    assert {s["Sid"]: s["Resource"] for s in pull} == {
        "PullTheRayImage": VALUES["repository_arn"],
        "SignInToTheRegistry": "*",  # GetAuthorizationToken has no resource-level permissions
    }
    assert {a for s in pull for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])} == {
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
        "ecr:GetAuthorizationToken",
    }
    iam = (TERRAFORM / "iam.tf").read_text()
    attached = re.findall(
        r"role\s*=\s*aws_iam_role\.(\w+)(?:\[0\])?\.\w+\s*\n\s*policy_arn\s*=\s*aws_iam_policy\.ecr_pull", iam
    )
    assert sorted(attached) == ["ray_head", "ray_worker"]


def test_destroy_leaves_the_bucket_its_key_policy_and_public_access_block():
    """s3.tf: prevent_destroy on the four whose loss loses or exposes the data (a destroy plan that would delete
    one fails before it changes anything)."""
    text = (TERRAFORM / "s3.tf").read_text()
    protected = set(
        re.findall(r'^resource "(\w+)" "(\w+)" \{(?:(?!^\}).)*?prevent_destroy\s*=\s*true', text, re.M | re.S)
    )
    assert protected == {
        ("aws_s3_bucket", "data"),
        ("aws_kms_key", "data"),
        ("aws_s3_bucket_policy", "data"),
        ("aws_s3_bucket_public_access_block", "data"),
    }


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")
def test_terraform_renders_the_documents_as_this_test_does(tmp_path):
    """templatefile() itself, in a configuration of its own that needs no provider (so no download)."""
    (tmp_path / "main.tf").write_text(
        'variable "dir" { type = string }\nvariable "vars" { type = map(string) }\n'
        'output "rendered" {\n'
        '  value = { for f in fileset(var.dir, "*.json") :\n'
        '    f => jsondecode(templatefile("${var.dir}/${f}", var.vars)) }\n'
        "}\n"
    )
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 120}
    init = subprocess.run(["terraform", "init", "-input=false"], **run)
    assert init.returncode == 0, init.stdout + init.stderr
    applied = subprocess.run(
        [
            "terraform",
            "apply",
            "-auto-approve",
            "-input=false",
            f"-var=dir={POLICIES}",
            f"-var=vars={json.dumps(VALUES)}",
        ],
        **run,
    )
    assert applied.returncode == 0, applied.stdout + applied.stderr
    output = subprocess.run(["terraform", "output", "-json", "rendered"], **run)
    rendered = json.loads(output.stdout)
    assert rendered == {p.name: render(p.name, VALUES) for p in POLICIES.glob("*.json")}


@pytest.mark.slow  # checkov in a subprocess
def test_checkov_finds_nothing_in_the_rendered_documents(tmp_path):
    """checkov's IAM checks on the documents as AWS receives them, each the policy of an aws_iam_policy (a heredoc,
    which checkov parses): the templatefile() calls in iam.tf are opaque to it. A planted document that reads and
    writes every bucket proves the checks look."""
    from test_cluster_configs import checkov_binary

    documents = {p.stem: render(p.name, VALUES) for p in POLICIES.glob("*.json") if not p.stem.startswith("ray-data")}
    documents["ray-data"] = ray_data_policy(VALUES, shards_writable=True)
    documents["planted"] = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "*"}],
    }
    (tmp_path / "policies.tf").write_text(
        "".join(
            f'resource "aws_iam_policy" "{stem.replace("-", "_")}" {{\n  name   = "{stem}"\n'
            f"  policy = <<-EOT\n{json.dumps(document, indent=2)}\n  EOT\n}}\n"
            for stem, document in sorted(documents.items())
        )
    )
    result = subprocess.run(
        [checkov_binary(), "-d", str(tmp_path), "--framework", "terraform", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert report["summary"]["resource_count"] == len(documents), result.stderr[-2000:]
    failed = {(c["resource"], c["check_id"]) for c in report["results"]["failed_checks"]}
    planted = "aws_iam_policy.planted"
    assert failed == {(planted, "CKV_AWS_288"), (planted, "CKV_AWS_290"), (planted, "CKV_AWS_355")}, failed


# --- the Ray nodes' data policy against moto's IAM enforcement -----------------------------------------------

# The S3 operations whose IAM action is not their own name (S3 API reference, each operation's "Permissions").
S3_ACTIONS = {
    "HeadBucket": "ListBucket",
    "ListObjects": "ListBucket",
    "ListObjectsV2": "ListBucket",
    "ListObjectVersions": "ListBucketVersions",
    "HeadObject": "GetObject",
    "CreateMultipartUpload": "PutObject",
    "UploadPart": "PutObject",
    "CompleteMultipartUpload": "PutObject",
    "ListParts": "ListMultipartUploadParts",
    "ListMultipartUploads": "ListBucketMultipartUploads",
}


def iam_like(pattern: str, value: str) -> bool:
    """IAM's StringLike: * any run of characters, ? any one, everything else itself."""
    regex = ".*".join(".".join(re.escape(part) for part in chunk.split("?")) for chunk in pattern.split("*"))
    return re.fullmatch(regex, value) is not None


CONDITION_OPERATORS = {"StringEquals": lambda pattern, value: pattern == value, "StringLike": iam_like}


def conditions_hold(conditions: dict, context: dict[str, str]) -> bool:
    """IAM's evaluation of a statement's Condition block against the request's keys: every operator and key must
    hold; a key the request lacks fails, unless the operator ends in IfExists. An operator not known here raises
    (the request fails) rather than passing."""
    for operator, tests in conditions.items():
        base = operator.removesuffix("IfExists")
        if base not in CONDITION_OPERATORS:
            raise NotImplementedError(f"condition operator {operator}: not evaluated by tests/test_iam_policies.py")
        for key, expected in tests.items():
            if key not in context:
                if base == operator:
                    return False
                continue
            patterns = [expected] if isinstance(expected, str) else expected
            if not any(CONDITION_OPERATORS[base](p, context[key]) for p in patterns):
                return False
    return True


def serve_moto_as_aws(port: int) -> None:
    """moto's server on 127.0.0.1:`port`, its S3 authorization mended where it differs from AWS (module
    docstring). Runs in a process of its own (INITIAL_NO_AUTH_ACTION_COUNT, read when moto starts, is global)."""
    import html
    from urllib.parse import parse_qs, urlparse

    from moto import server, settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.iam import access_control as iam
    from moto.s3 import exceptions, responses

    moto_statement = iam.IAMPolicyStatement.is_action_permitted

    def statement(self, action, resource="*", principal=None, incoming_condition_values=None):
        result = moto_statement(self, action, resource, principal, None)  # action, resource, effect: moto's
        if result != iam.PermissionResult.NEUTRAL and not conditions_hold(
            self._statement.get("Condition") or {}, incoming_condition_values or {}
        ):
            return iam.PermissionResult.NEUTRAL  # a statement whose condition fails does not apply
        return result

    def check_s3_action(self, resource: str) -> None:  # moto's IAMRequestBase.check_action_permitted, mended
        operation = self._action.removeprefix("s3:")
        if operation == "DeleteObjects":  # no action of its own: s3:DeleteObject on each key it names
            body = self._body.decode() if isinstance(self._body, bytes) else self._body
            for key in re.findall(r"<Key>(.*?)</Key>", body, re.S):  # one refused: all (AWS: that one)
                check(self, "s3:DeleteObject", f"{resource}/{html.unescape(key)}", {})
            return
        action = "s3:" + S3_ACTIONS.get(operation, operation)
        query = parse_qs(urlparse(self._path).query, keep_blank_values=True)
        listed = {"s3:prefix": query["prefix"][0]} if action == "s3:ListBucket" and "prefix" in query else {}
        check(self, action, resource, listed)

    def check(self, action: str, resource: str, context: dict[str, str]) -> None:
        permitted = False
        for policy in self._access_key.collect_policies():
            result = iam.IAMPolicy(policy).is_action_permitted(action, resource, incoming_condition_values=context)
            if result == iam.PermissionResult.DENIED:
                self._raise_access_denied()
            permitted = permitted or result == iam.PermissionResult.PERMITTED
        if not permitted:
            self._raise_access_denied()

    def may_list(response, request, full_url: str) -> bool:
        """Whether the caller may s3:ListBucket the bucket (True while moto enforces nothing yet)."""
        if ActionAuthenticatorMixin.request_count < settings.INITIAL_NO_AUTH_ACTION_COUNT:
            return True
        bucket = response.parse_bucket_name_from_url(request, full_url)
        try:
            response.backend.get_bucket(bucket)
        except exceptions.MissingBucket:
            return True  # moto's NoSuchBucket stands
        listing = iam.S3IAMRequest(
            account_id=response.current_account,
            method="GET",
            path=f"/{bucket}",
            data={"BucketName": bucket},
            body=b"",
            headers=response.headers,
            action="ListBucket",
        )
        try:
            listing.check_action_permitted(f"arn:aws:s3:::{bucket}")
        except exceptions.S3AccessDeniedError:
            return False
        return True

    moto_key_response = responses.S3Response._key_response

    def key_response(self, request, full_url):  # a missing key: 404 only to a caller that may list the bucket
        try:
            response = moto_key_response(self, request, full_url)
        except exceptions.MissingKey:
            if request.method == "GET" and not may_list(self, request, full_url):
                raise exceptions.S3AccessDeniedError() from None
            raise
        if request.method == "HEAD" and response[0] == 404 and not may_list(self, request, full_url):
            raise exceptions.S3AccessDeniedError()
        return response

    iam.IAMPolicyStatement.is_action_permitted = statement
    iam.S3IAMRequest.check_action_permitted = check_s3_action
    responses.S3Response._key_response = key_response
    server.main(["-H", "127.0.0.1", "-p", str(port)])


# Requests moto lets through before it enforces IAM: the three that make the administrator below.
SETUP_ACTIONS = 3
ALLOW_EVERYTHING = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@pytest.fixture(scope="module")
def moto_as_aws(tmp_path_factory):
    """(endpoint, the administrator's keys): a moto server enforcing IAM (serve_moto_as_aws), in a process of its
    own, with an IAM user allowed everything, made with its first SETUP_ACTIONS requests."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto-iam") / "moto.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-c", f"import test_iam_policies as t; t.serve_moto_as_aws({port})"],
        cwd=Path(__file__).parent,
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS), "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for_http(f"{endpoint}/moto-api/", process, timeout=60)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", **keys(("setup", "setup")))
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(ALLOW_EVERYTHING))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        yield endpoint, (key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def keys(pair: tuple[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": pair[0], "aws_secret_access_key": pair[1]}


def client(service: str, endpoint: str, pair: tuple[str, str]):
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1", **keys(pair))


def make_user(iam, name: str, policy: dict) -> tuple[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="policy", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def refused(call, *args, **kwargs) -> str:
    """The error code of a boto3 call, call(*args, **kwargs), that must fail (the HTTP status where a HEAD has none)."""
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as error:
        call(*args, **kwargs)
    return error.value.response["Error"]["Code"] or str(error.value.response["ResponseMetadata"]["HTTPStatusCode"])


# The policy with the ListBucket statement iam.tf had before issue 20 (ListBucket only under an s3:prefix
# condition) in place of FindTheBucket.
def old_policy(values: dict[str, str]) -> dict:
    listed = [values["raw_prefix"], values["shards_prefix"], values["results_prefix"]]
    old = {
        "Sid": "ListTheTwoPrefixes",
        "Effect": "Allow",
        "Action": "s3:ListBucket",
        "Resource": values["bucket_arn"],
        "Condition": {"StringLike": {"s3:prefix": [v for p in listed for v in (f"{p}/*", p)]}},
    }
    policy = ray_data_policy(values, shards_writable=False)
    return {**policy, "Statement": [old, *(s for s in policy["Statement"] if s["Sid"] != "FindTheBucket")]}


def as_user(monkeypatch, endpoint: str, pair: tuple[str, str]) -> None:
    """This process's AWS environment: the user's keys at `endpoint`, and nothing else to find credentials in."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in job_env(endpoint, pair).items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)


def job_env(endpoint: str, pair: tuple[str, str]) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": pair[0],
        "AWS_SECRET_ACCESS_KEY": pair[1],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
        "AWS_CONFIG_FILE": "/nonexistent/config",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def run_job(script: str, *args: str, endpoint: str, pair: tuple[str, str], cwd: Path) -> str:
    """`python jobs/<script> args` as the user `pair`, on a private Ray of its own: Ray's worker processes take
    their credentials from the environment of the Ray that starts them, so the session's Ray (the shared moto
    server's keys) cannot run them as this user. Returns its stdout; fails the test unless it exits 0."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
    }
    env.update(job_env(endpoint, pair), MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", PYTHONPATH=str(ROOT))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"{script}: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, f"{script} under the policy failed:\n{(done.stdout + done.stderr)[-5000:]}"
    return done.stdout


@pytest.mark.slow  # three jobs, each in a subprocess with a private Ray
@pytest.mark.timeout(1500)
def test_the_nodes_data_policy_is_enough_for_the_pipeline_and_allows_no_more(
    moto_as_aws, tiny_imagenet, tmp_path, monkeypatch
):
    import pyarrow.fs as pafs

    from pipeline.data import storage

    endpoint, admin = moto_as_aws
    s3_admin, iam_admin = client("s3", endpoint, admin), client("iam", endpoint, admin)
    p = prefixes()
    raw, shards, results = (f"s3://{BUCKET}/{p[k]}" for k in ("raw_prefix", "shards_prefix", "results_prefix"))
    s3_admin.create_bucket(Bucket=BUCKET)
    s3_admin.put_object(Bucket=BUCKET, Key=f"{p['artifacts_prefix']}/1/model.pt", Body=b"MLflow's alone")
    as_user(monkeypatch, endpoint, admin)
    for path in sorted(f for f in tiny_imagenet.rglob("*") if f.is_file()):  # ImageNet as uploaded by hand
        # With the admin's client: boto3's default session (conftest.upload_folder) keeps the credentials it
        # first found in this process, the suite's moto keys when an earlier test made it.
        s3_admin.upload_file(str(path), BUCKET, f"{p['raw_prefix']}/{path.relative_to(tiny_imagenet).as_posix()}")
    node = make_user(iam_admin, "ray-node", ray_data_policy(VALUES, shards_writable=True))

    # Enough: the prepare job, while shards_writable.
    run_job("prepare_imagenet.py", raw, shards, endpoint=endpoint, pair=node, cwd=tmp_path)

    # `terraform apply -var shards_writable=false`: the same user, the policy without the shards' write.
    read_only = ray_data_policy(VALUES, shards_writable=False)
    iam_admin.put_user_policy(UserName="ray-node", PolicyName="policy", PolicyDocument=json.dumps(read_only))

    # No more: every refusal below is the policy's, since the administrator may do each of them.
    s3 = client("s3", endpoint, node)
    denied = {
        "write the shards": lambda c: c.put_object(Bucket=BUCKET, Key=f"{p['shards_prefix']}/extra", Body=b""),
        "delete a shard's manifest": lambda c: c.delete_object(
            Bucket=BUCKET, Key=f"{p['shards_prefix']}/manifest.json"
        ),
        "write ImageNet": lambda c: c.put_object(Bucket=BUCKET, Key=f"{p['raw_prefix']}/extra", Body=b""),
        "write outside the prefixes": lambda c: c.put_object(Bucket=BUCKET, Key="elsewhere/x", Body=b""),
        "read MLflow's artifacts": lambda c: c.get_object(Bucket=BUCKET, Key=f"{p['artifacts_prefix']}/1/model.pt"),
        "write MLflow's artifacts": lambda c: c.put_object(Bucket=BUCKET, Key=f"{p['artifacts_prefix']}/2", Body=b""),
        "change the bucket's policy": lambda c: c.delete_bucket_policy(Bucket=BUCKET),
    }
    assert {what: refused(call, s3) for what, call in denied.items()} == dict.fromkeys(denied, "AccessDenied")
    # (s3:ListBucket has no prefix condition, so the user can list MLflow's keys' names: not asserted otherwise.)
    s3.head_bucket(Bucket=BUCKET)  # HeadBucket, which pyarrow asks before it makes a directory
    s3.get_bucket_location(Bucket=BUCKET)
    assert refused(s3.head_object, Bucket=BUCKET, Key=f"{p['shards_prefix']}/no-such-shard") == "404"
    as_user(monkeypatch, endpoint, node)
    storage.check_location(shards, "the shards", must_exist=True)  # the jobs' first request: HeadBucket
    fs, root = storage.resolve(shards)
    with pytest.raises(FileNotFoundError):  # "no such shard", not "access denied"
        fs.open_input_file(f"{root}/train-99999.parquet")

    # With the ListBucket of before issue 20, all three fail (with moto mended: unmended, it ignored the condition).
    old = make_user(iam_admin, "ray-node-before", old_policy(VALUES))
    as_user(monkeypatch, endpoint, old)
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.check_location(shards, "the shards")
    fs, root = storage.resolve(shards)
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        fs.open_input_file(f"{root}/train-99999.parquet")
    with pytest.raises(OSError, match="existence of bucket .* ACCESS_DENIED during HeadBucket"):
        fs, path = pafs.FileSystem.from_uri(f"{results}/before")  # as Ray Train makes its storage directory
        fs.create_dir(path, recursive=True)  # (apache/arrow#49949)

    # Enough: a training epoch from the shards with Ray Train's checkpoints in the bucket, and an evaluation of the
    # checkpoint it wrote, both with the read-only policy.
    storage_path = f"{results}/iam-test"
    tiny = ["--width", "0.125", "--resize-size", "80", "--crop-size", "67", "--batch-size", "8", "--max-failures", "0"]
    run_job(
        "train.py", "--data", shards, "--storage-path", storage_path, "--epochs", "1", *tiny,
        "--experiment", "iam", "--registered-model", "iam", endpoint=endpoint, pair=node, cwd=tmp_path,
    )  # fmt: skip
    written = [o["Key"] for o in s3_admin.list_objects_v2(Bucket=BUCKET, Prefix=f"{p['results_prefix']}/")["Contents"]]
    checkpoints = sorted({k.rsplit("/", 1)[0] for k in written if re.search(r"/checkpoint_[^/]+/", k)})
    assert checkpoints, written
    out = run_job(
        "evaluate.py", "--model", f"s3://{BUCKET}/{checkpoints[-1]}", "--data", shards, "--no-record",
        endpoint=endpoint, pair=node, cwd=tmp_path,
    )  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1])["images"] == 24  # 3 classes x 8 val images

    # Dropping a checkpoint as Ray Train does (--keep-checkpoints): pyarrow's delete_dir, a DeleteObjects request.
    as_user(monkeypatch, endpoint, node)
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{checkpoints[-1]}")
    fs.delete_dir(path)
    assert not s3_admin.list_objects_v2(Bucket=BUCKET, Prefix=f"{checkpoints[-1]}/").get("Contents")
    fs, path = pafs.FileSystem.from_uri(shards)
    with pytest.raises(OSError, match="(?s)when deleting objects .*part-00000.parquet': Access Denied"):
        fs.delete_dir(f"{path}/train")  # but not the shards
    for call in denied.values():  # the refusals were the policy's: the administrator may do each
        call(s3_admin)
