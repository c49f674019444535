# What the AWS cluster and the team MLflow server need, least privilege and no secret in any file:
#   s3.tf       the bucket (shards, Ray Train's checkpoints, MLflow's artifacts) and its KMS key
#   iam.tf      the head's and workers' instance profiles (cluster/aws.yaml), the IRSA roles of the
#               KubeRay pods and the MLflow server (cluster/kuberay, infra/mlflow/k8s.yaml)
#   network.tf  the cluster's security group (SSH from the operator's address only, nothing else inbound)
#               and, given a public hosted zone, the MLflow server's TLS certificate
#   ecr.tf      the registries of the Ray image and the MLflow server's image
#   rds.tf      PostgreSQL for MLflow; its master password is made and kept by RDS in Secrets Manager
#   main.tf     (here) the one VPC everything lives in, the Ray nodes' subnets and their GPU AMI
#   outputs.tf  every value cluster/aws.yaml and infra/mlflow/k8s.yaml take: cluster/render.py writes them in
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
  description = "The one VPC of everything: the Ray nodes, the database, and the EKS cluster of the MLflow server (made elsewhere, in this VPC); empty: the region's default VPC"
}

variable "ray_subnet_ids" {
  type        = list(string)
  default     = []
  description = "Subnets of vpc_id the Ray nodes launch in (cluster/aws.yaml's SubnetIds): public ones (`ray up` reaches the head over SSH at its public address), best a single one, so the cluster sits in one AZ; empty: the default VPC's default subnet in the first AZ that offers the GPU instance type"
}

variable "db_subnet_ids" {
  type        = list(string)
  default     = []
  description = "Subnets of vpc_id in two AZs for the MLflow database (it gets no public address either way); empty: no database is made"
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

variable "mlflow_hostname" {
  type        = string
  default     = ""
  description = "The MLflow server's name, e.g. mlflow.ml.example.com: a name in a public DNS zone (an ACM certificate cannot be had for a .internal name), resolving to the internal load balancer's private addresses"
}

variable "mlflow_zone_id" {
  type        = string
  default     = ""
  description = "The Route 53 public hosted zone of mlflow_hostname: with both set, Terraform requests and validates its ACM certificate (network.tf); empty: bring a certificate of your own (README)"
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

# --- the Ray nodes' subnets: one AZ that offers the GPU instance type -----------------------------------------

locals {
  gpu_instance_type = "g5.12xlarge" # cluster/aws.yaml's gpu_worker (tests/test_cluster_configs.py keeps them equal)
}

data "aws_ec2_instance_type_offerings" "gpu" {
  location_type = "availability-zone"
  filter {
    name   = "instance-type"
    values = [local.gpu_instance_type]
  }
}

data "aws_subnets" "default_for_gpu_az" {
  filter {
    name   = "vpc-id"
    values = [data.aws_vpc.selected.id]
  }
  filter {
    name   = "default-for-az"
    values = ["true"]
  }
  filter {
    name   = "availability-zone"
    values = data.aws_ec2_instance_type_offerings.gpu.locations
  }
}

locals {
  # One subnet, so one AZ: Ray Data ships the decoded batches from the nodes that decode them (the CPU nodes,
  # with --data-resource data) to the GPU nodes, up to ~18 TB of uint8 crops in a 90-epoch run, and traffic
  # between AZs is billed by the GB; within an AZ it is free. Ray tries further subnets only when a launch
  # fails (capacity), so a second one is a fallback.
  ray_subnet_ids = length(var.ray_subnet_ids) > 0 ? var.ray_subnet_ids : slice(
    sort(data.aws_subnets.default_for_gpu_az.ids), 0, min(1, length(data.aws_subnets.default_for_gpu_az.ids))
  )
}

data "aws_subnet" "ray" {
  for_each = toset(local.ray_subnet_ids)
  id       = each.value
  lifecycle {
    postcondition {
      condition     = self.vpc_id == data.aws_vpc.selected.id
      error_message = "Each of ray_subnet_ids must be in vpc_id's VPC, where the security group is."
    }
    postcondition {
      condition     = contains(data.aws_ec2_instance_type_offerings.gpu.locations, self.availability_zone)
      error_message = "Each of ray_subnet_ids must be in an availability zone that offers the GPU instance type: every node type may launch in any of them."
    }
    postcondition {
      condition     = self.map_public_ip_on_launch
      error_message = "Ray's launcher uses only subnets that give instances a public address (cluster/aws.yaml sets no use_internal_ips): pick public subnets."
    }
  }
}

# --- the nodes' AMI ---------------------------------------------------------------------------------------------
# AWS's Deep Learning Base AMI with the open-source NVIDIA kernel driver, Docker and the NVIDIA Container
# Toolkit, and the AWS CLI (the nodes log in to ECR with it): the newest release at apply time, pinned by
# id in the rendered cluster config, so a cluster keeps its AMI until the next apply and render. Ray's own
# default (`latest_dlami`) is the Ubuntu 18.04 DLAMI V71 with CUDA 11.2, whose driver cannot run CUDA 13.
# The driver and CUDA of this family, as documented and unverified here: README, step 1, "The GPU nodes' AMI
# and driver".
data "aws_ami" "gpu" {
  most_recent = true
  owners      = ["amazon"]
  filter {
    name   = "name"
    values = ["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"]
  }
  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
  filter {
    name   = "state"
    values = ["available"]
  }
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
