# What cluster/aws.yaml, cluster/kuberay and infra/mlflow/k8s.yaml refer to.
output "bucket" {
  value = aws_s3_bucket.data.bucket
}

output "head_instance_profile" {
  value = aws_iam_instance_profile.ray_head.name # cluster/aws.yaml, head.node_config.IamInstanceProfile
}

output "worker_instance_profile" {
  value = aws_iam_instance_profile.ray_worker.name # cluster/aws.yaml, the workers' IamInstanceProfile
}

output "security_group_name" {
  value = aws_security_group.ray.name # cluster/aws.yaml, provider.security_group.GroupName
}

output "kuberay_role_arn" {
  value = local.irsa ? aws_iam_role.kuberay[0].arn : null # cluster/kuberay/serviceaccount.yaml
}

output "mlflow_role_arn" {
  value = local.irsa ? aws_iam_role.mlflow[0].arn : null # infra/mlflow/k8s.yaml's ServiceAccount
}

output "vpc_cidr" {
  value = data.aws_vpc.selected.cidr_block # infra/mlflow/k8s.yaml's NetworkPolicy
}

output "db_endpoint" {
  value = local.db ? aws_db_instance.mlflow[0].endpoint : null
}

output "db_password_secret_arn" {
  # The secret's ARN, not the password: `aws secretsmanager get-secret-value --secret-id ...` reads it.
  value = local.db ? aws_db_instance.mlflow[0].master_user_secret[0].secret_arn : null
}
