# Who may do what, and nothing more:
#   ray nodes (head, workers, KubeRay pods)  read ImageNet's archives and the shards (write the shards only while
#                                            shards_writable), read and
#                                            write Ray Train's checkpoints; nothing of MLflow's prefix
#   the head, in addition                    launch, tag, stop and terminate this cluster's worker nodes, and
#                                            hand them the worker profile: the autoscaler's needs
#   the MLflow server                        read and write its artifact prefix; nothing else
# `ray up` would otherwise make a head role with AmazonEC2FullAccess and AmazonS3FullAccess.

locals {
  bucket_arn = aws_s3_bucket.data.arn
}

data "aws_iam_policy_document" "ray_data" {
  statement {
    sid       = "ListTheTwoPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.raw_prefix}/*", local.raw_prefix, "${local.shards_prefix}/*", local.shards_prefix, "${local.results_prefix}/*", local.results_prefix]
    }
  }
  statement {
    sid       = "ReadImageNetAndShards"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/${local.raw_prefix}/*", "${local.bucket_arn}/${local.shards_prefix}/*"]
  }
  dynamic "statement" {
    for_each = var.shards_writable ? [1] : []
    content {
      sid       = "WriteShardsWhilePreparing"
      actions   = ["s3:PutObject", "s3:AbortMultipartUpload"]
      resources = ["${local.bucket_arn}/${local.shards_prefix}/*"]
    }
  }
  statement {
    # Ray Train writes each checkpoint and deletes those --keep-checkpoints drops.
    sid       = "Checkpoints"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.bucket_arn}/${local.results_prefix}/*"]
  }
  statement {
    sid       = "TheBucketsKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }
}

resource "aws_iam_policy" "ray_data" {
  name   = "alexnet-ray-data"
  policy = data.aws_iam_policy_document.ray_data.json
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

resource "aws_iam_instance_profile" "ray_worker" {
  name = "alexnet-ray-worker"
  role = aws_iam_role.ray_worker.name
}

# --- head (cluster/aws.yaml: head): the data, plus the autoscaler -------------------------------------------

data "aws_iam_policy_document" "ray_autoscaler" {
  statement {
    # Describe calls cannot be limited to resources (AWS's authorization reference); they only read.
    sid       = "SeeNodes"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"]
    resources = ["*"]
  }
  statement {
    # RunInstances touches images, subnets, volumes, interfaces and security groups as well as the instance:
    # limited to this region and to the instance types cluster/aws.yaml configures.
    sid       = "LaunchConfiguredWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:aws:ec2:${var.region}:*:*/*", "arn:aws:ec2:${var.region}::image/*"]
    condition {
      test     = "StringEqualsIfExists"
      variable = "ec2:InstanceType"
      values   = var.worker_instance_types
    }
  }
  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:aws:ec2:${var.region}:${data.aws_caller_identity.current.account_id}:*/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }
  statement {
    sid       = "ManageThisClustersNodes"
    actions   = ["ec2:CreateTags", "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"]
    resources = ["arn:aws:ec2:${var.region}:${data.aws_caller_identity.current.account_id}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.cluster_name]
    }
  }
  statement {
    sid       = "GiveWorkersTheirProfile"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.ray_worker.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

variable "worker_instance_types" {
  type    = list(string)
  default = ["g5.12xlarge", "c6i.8xlarge"] # cluster/aws.yaml's gpu_worker and cpu_worker
}

resource "aws_iam_policy" "ray_autoscaler" {
  name   = "alexnet-ray-autoscaler"
  policy = data.aws_iam_policy_document.ray_autoscaler.json
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

data "aws_iam_policy_document" "mlflow_artifacts" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.artifacts_prefix}/*", local.artifacts_prefix]
    }
  }
  statement {
    # Deleting a run or a model version in MLflow deletes its artifacts.
    sid       = "Artifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.bucket_arn}/${local.artifacts_prefix}/*"]
  }
  statement {
    sid       = "TheBucketsKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }
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
  policy = data.aws_iam_policy_document.mlflow_artifacts.json
}
