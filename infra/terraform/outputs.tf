# Every value cluster/aws.yaml and infra/mlflow/k8s.yaml take from Terraform. Those files name them as
# ${output_name}; cluster/render.py fills them in from `terraform output -json` and refuses to write a file
# with a name left unfilled (tests/test_cluster_configs.py checks that each such name is an output here).
output "region" {
  value = var.region # cluster/aws.yaml's provider.region and ECR login; k8s.yaml's AWS_REGION
}

output "bucket" {
  value = aws_s3_bucket.data.bucket # k8s.yaml's artifact destination; the jobs' s3:// paths
}

output "gpu_ami_id" {
  value = data.aws_ami.gpu.id # cluster/aws.yaml, every node type's ImageId
}

output "gpu_ami_name" {
  value = data.aws_ami.gpu.name # which release of the DLAMI that is (its date is in the name)
}

output "ray_subnet_ids" {
  value = local.ray_subnet_ids # cluster/aws.yaml, every node type's SubnetIds
  precondition {
    condition     = length(local.ray_subnet_ids) > 0
    error_message = "No subnet for the Ray nodes: outside the default VPC, or where no default subnet's AZ offers the GPU instance type, give ray_subnet_ids."
  }
}

output "security_group_id" {
  value = aws_security_group.ray.id # cluster/aws.yaml, every node type's SecurityGroupIds
}

output "head_instance_profile" {
  value = aws_iam_instance_profile.ray_head.name # cluster/aws.yaml, head.node_config.IamInstanceProfile
}

output "worker_instance_profile" {
  value = aws_iam_instance_profile.ray_worker.name # cluster/aws.yaml, the workers' IamInstanceProfile
}

output "ecr_registry" {
  value = split("/", aws_ecr_repository.ray.repository_url)[0] # cluster/aws.yaml's `docker login` on each node
}

output "ecr_repository_url" {
  value = aws_ecr_repository.ray.repository_url # cluster/aws.yaml's docker.image, with the tag pushed
}

output "mlflow_repository_url" {
  value = aws_ecr_repository.mlflow.repository_url # infra/mlflow/k8s.yaml's image
}

output "vpc_cidr" {
  value = data.aws_vpc.selected.cidr_block # k8s.yaml's NetworkPolicy and the ALB's inbound CIDR
}

output "mlflow_hostname" {
  value = var.mlflow_hostname != "" ? var.mlflow_hostname : null # k8s.yaml's Ingress host; the jobs' MLFLOW_TRACKING_URI
}

output "mlflow_certificate_arn" {
  # k8s.yaml's Ingress certificate; null without mlflow_zone_id (then pass your own to cluster/render.py)
  value = local.mlflow_certificate ? aws_acm_certificate_validation.mlflow[0].certificate_arn : null
}

output "kuberay_role_arn" {
  value = local.irsa ? aws_iam_role.kuberay[0].arn : null # cluster/kuberay/security.yaml's ServiceAccount
}

output "mlflow_role_arn" {
  value = local.irsa ? aws_iam_role.mlflow[0].arn : null # k8s.yaml's ServiceAccount
}

output "db_endpoint" {
  value = local.db ? aws_db_instance.mlflow[0].endpoint : null
}

output "db_password_secret_arn" {
  # The secret's ARN, not the password: `aws secretsmanager get-secret-value --secret-id ...` reads it.
  value = local.db ? aws_db_instance.mlflow[0].master_user_secret[0].secret_arn : null
}
