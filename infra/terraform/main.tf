# What the AWS cluster and the team MLflow server need, least privilege and no secret in any file:
#   s3.tf       the bucket (shards, Ray Train's checkpoints, MLflow's artifacts) and its KMS key
#   iam.tf      the head's and workers' instance profiles (cluster/aws.yaml), the IRSA roles of the
#               KubeRay pods and the MLflow server (cluster/kuberay, infra/mlflow/k8s.yaml)
#   network.tf  the cluster's security group: SSH from the operator's address only, nothing else inbound
#   rds.tf      PostgreSQL for MLflow; its master password is made and kept by RDS in Secrets Manager
#
#   cd infra/terraform && terraform init && terraform apply -var bucket_name=... -var ssh_cidr=$(curl -s https://checkip.amazonaws.com)/32
# State holds no password (manage_master_user_password); keep it in a private, encrypted backend anyway.
terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = { source = "hashicorp/aws", version = "~> 5.60" }
  }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = { project = "alexnet-ray" }
  }
}

variable "region" {
  type    = string
  default = "us-west-2" # cluster/aws.yaml's region
}

variable "bucket_name" {
  type        = string
  description = "Globally unique name of the bucket that holds shards, checkpoints and MLflow artifacts"
}

variable "cluster_name" {
  type    = string
  default = "alexnet" # cluster/aws.yaml's cluster_name: the head may only stop and terminate nodes tagged with it
}

variable "ssh_cidr" {
  type        = string
  description = "The operator's address (x.x.x.x/32): the only source allowed to SSH to the head, which `ray up`, `ray dashboard` and `ray attach` use"
  validation {
    condition     = can(cidrhost(var.ssh_cidr, 0)) && var.ssh_cidr != "0.0.0.0/0"
    error_message = "ssh_cidr must be a CIDR block narrower than the whole internet, e.g. 203.0.113.7/32."
  }
}

variable "vpc_id" {
  type        = string
  default     = ""
  description = "The VPC of the Ray nodes and the database; empty: the region's default VPC, where `ray up` launches"
}

variable "db_subnet_ids" {
  type        = list(string)
  default     = []
  description = "Private subnets (two AZs) for the MLflow database; empty: no database is made"
}

variable "db_client_cidr" {
  type        = string
  default     = ""
  description = "Who may reach PostgreSQL on 5432: the EKS pod network or the MLflow VM; empty: the VPC's CIDR"
}

variable "eks_oidc_provider_arn" {
  type        = string
  default     = ""
  description = "The EKS cluster's IAM OIDC provider, for IRSA (KubeRay pods, MLflow server); empty: no IRSA roles"
}

variable "eks_oidc_issuer" {
  type        = string
  default     = ""
  description = "Its issuer without https://, e.g. oidc.eks.us-west-2.amazonaws.com/id/EXAMPLE"
}

data "aws_caller_identity" "current" {}

data "aws_vpc" "selected" {
  default = var.vpc_id == "" ? true : null
  id      = var.vpc_id == "" ? null : var.vpc_id
}

locals {
  # Prefixes of the bucket, each with its readers and writers (iam.tf).
  raw_prefix       = "ilsvrc2012"       # ImageNet as downloaded (uploaded by hand), read by the prepare job
  shards_prefix    = "imagenet-shards"  # written once by jobs/prepare_imagenet.py, read by every node
  results_prefix   = "ray-results"      # Ray Train's checkpoints (--storage-path), written by the workers
  artifacts_prefix = "mlflow-artifacts" # the MLflow server's alone (proxied artifacts)
  irsa             = var.eks_oidc_provider_arn != "" && var.eks_oidc_issuer != ""
}

variable "shards_writable" {
  type        = bool
  default     = true
  description = "Whether the Ray nodes may write the shards: true while jobs/prepare_imagenet.py runs on the cluster, then apply again with false so that training can only read them"
}
