# Who may do what, and nothing more:
#   ray nodes (head, workers, KubeRay pods)  read ImageNet's archives and the shards (write the shards only while
#                                            shards_writable), read and write Ray Train's checkpoints; nothing
#                                            of MLflow's prefix but its keys' names
#   the head and workers, in addition        pull the image from this project's ECR repository (ecr.tf), alone
#   the head, in addition                    launch, tag, stop and terminate this cluster's worker nodes, and
#                                            hand them the worker profile: the autoscaler's needs
#   the MLflow server                        read and write its artifact prefix; nothing else
# `ray up` would otherwise make a head role with AmazonEC2FullAccess and AmazonS3FullAccess.
#
# The permission policies are the JSON documents in policies/, filled in by templatefile(): one source, which
# tests/test_iam_policies.py renders the same way, runs the pipeline under (moto enforcing IAM) and scans with
# checkov (which cannot see through a templatefile() here). Why each grant is there:
#   ray-data.json
#     FindTheBucket          s3:ListBucket on the bucket, with no s3:prefix condition. HeadBucket needs it, and
#                            pyarrow asks HeadBucket of every s3:// filesystem it opens and before every directory it
#                            makes (Ray Train's storage directory, apache/arrow#49949); a HeadBucket carries no
#                            prefix, so a prefix condition refused it. Without ListBucket S3 also answers a missing
#                            key with 403, not 404: "no such shard" would read "access denied". It shows the names,
#                            not the contents, of every key (MLflow's too); a Null-condition exception for HeadBucket
#                            would let a listing without a prefix through just the same, so it would narrow nothing.
#                            s3:GetBucketLocation: the jobs ask a bucket's region.
#     ReadImageNetAndShards  read ilsvrc2012/ (ImageNet as uploaded) and imagenet-shards/
#     AskForThePrefixesThemselves  pyarrow asks for a directory as an object first (HeadObject on "ilsvrc2012",
#                            then a listing): refused, that HeadObject is an error, not "not a file". Nothing is
#                            stored under these three names.
#     Checkpoints            Ray Train writes each checkpoint and deletes those --keep-checkpoints drops
#     TheBucketsKey          the bucket's objects are encrypted with it (s3.tf)
#   ray-data-write-shards.json  PutObject on imagenet-shards/, merged into the same policy while shards_writable
#   ecr-pull.json          pull from one repository; ecr:GetAuthorizationToken has no resource to name (AWS's
#                          authorization reference): it signs in, and what may be pulled is said per repository
#   ray-autoscaler.json    what Ray's autoscaler does on the head (below)
#   mlflow-artifacts.json  the MLflow server: its artifact prefix, listed only under that prefix (boto3 lists with a
#                          Prefix and never asks HeadBucket)

locals {
  # What the bucket documents name. templatefile() fails on a name a document uses and this does not give.
  bucket_policy_vars = {
    bucket_arn       = aws_s3_bucket.data.arn
    kms_key_arn      = aws_kms_key.data.arn
    raw_prefix       = local.raw_prefix
    shards_prefix    = local.shards_prefix
    results_prefix   = local.results_prefix
    artifacts_prefix = local.artifacts_prefix
  }
}

data "aws_iam_policy_document" "ray_data" {
  # Two plain JSON documents, the second merged in only while jobs/prepare_imagenet.py may write the shards.
  source_policy_documents = concat(
    [templatefile("${path.module}/policies/ray-data.json", local.bucket_policy_vars)],
    var.shards_writable ? [templatefile("${path.module}/policies/ray-data-write-shards.json", local.bucket_policy_vars)] : [],
  )
}

resource "aws_iam_policy" "ray_data" {
  name   = "alexnet-ray-data"
  policy = data.aws_iam_policy_document.ray_data.json
}

# Both node roles pull the image every Ray node runs (cluster/aws.yaml's docker.image) from ecr.tf's repository.
# Not the KubeRay pods' IRSA role: on EKS the kubelet pulls with the node's role.
resource "aws_iam_policy" "ecr_pull" {
  name   = "alexnet-ray-ecr-pull"
  policy = templatefile("${path.module}/policies/ecr-pull.json", { repository_arn = aws_ecr_repository.ray.arn })
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# --- workers (cluster/aws.yaml: gpu_worker, cpu_worker) ------------------------------------------------------

resource "aws_iam_role" "ray_worker" {
  name               = "alexnet-ray-worker"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "ray_worker_data" {
  role       = aws_iam_role.ray_worker.name
  policy_arn = aws_iam_policy.ray_data.arn
}

resource "aws_iam_role_policy_attachment" "ray_worker_ecr" {
  role       = aws_iam_role.ray_worker.name
  policy_arn = aws_iam_policy.ecr_pull.arn
}

resource "aws_iam_instance_profile" "ray_worker" {
  name = "alexnet-ray-worker"
  role = aws_iam_role.ray_worker.name
}

# --- head (cluster/aws.yaml: head): the data, plus the autoscaler -------------------------------------------

# ray-autoscaler.json: Describe calls cannot be limited to resources (AWS's authorization reference); they only
# read. RunInstances touches images, subnets, volumes, interfaces and security groups as well as the instance:
# limited to this region and to the worker instance types of cluster/aws.yaml (gpu_worker, cpu_worker; written
# in the document, tests/test_iam_policies.py holds them equal). Tags only at launch, and start, stop and
# terminate only instances tagged with this cluster's name; pass the worker role, to EC2 only.
resource "aws_iam_policy" "ray_autoscaler" {
  name = "alexnet-ray-autoscaler"
  policy = templatefile("${path.module}/policies/ray-autoscaler.json", {
    region          = var.region
    account_id      = data.aws_caller_identity.current.account_id
    cluster_name    = var.cluster_name
    worker_role_arn = aws_iam_role.ray_worker.arn
  })
}

resource "aws_iam_role" "ray_head" {
  name               = "alexnet-ray-head"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "ray_head_data" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ray_data.arn
}

resource "aws_iam_role_policy_attachment" "ray_head_autoscaler" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ray_autoscaler.arn
}

resource "aws_iam_role_policy_attachment" "ray_head_ecr" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ecr_pull.arn
}

resource "aws_iam_instance_profile" "ray_head" {
  name = "alexnet-ray-head"
  role = aws_iam_role.ray_head.name
}

# --- IRSA: the KubeRay pods' and the MLflow server's service accounts -----------------------------------------

# The service account each IRSA role trusts (cluster/kuberay/security.yaml, infra/mlflow/k8s.yaml).
locals {
  irsa_subjects = {
    ray    = "system:serviceaccount:ray:alexnet-ray"
    mlflow = "system:serviceaccount:mlflow:mlflow"
  }
}

data "aws_iam_policy_document" "irsa" {
  for_each = { for name, subject in local.irsa_subjects : name => subject if local.irsa }
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.eks_oidc_issuer}:sub"
      values   = [each.value]
    }
    condition {
      test     = "StringEquals"
      variable = "${var.eks_oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "kuberay" {
  count              = local.irsa ? 1 : 0
  name               = "alexnet-kuberay"
  assume_role_policy = data.aws_iam_policy_document.irsa["ray"].json
}

resource "aws_iam_role_policy_attachment" "kuberay_data" {
  count      = local.irsa ? 1 : 0
  role       = aws_iam_role.kuberay[0].name
  policy_arn = aws_iam_policy.ray_data.arn
}

resource "aws_iam_role" "mlflow" {
  count              = local.irsa ? 1 : 0
  name               = "alexnet-mlflow"
  assume_role_policy = data.aws_iam_policy_document.irsa["mlflow"].json
}

resource "aws_iam_role_policy" "mlflow_artifacts" {
  count  = local.irsa ? 1 : 0
  name   = "mlflow-artifacts"
  role   = aws_iam_role.mlflow[0].id
  policy = templatefile("${path.module}/policies/mlflow-artifacts.json", local.bucket_policy_vars)
}
