# The Ray cluster's security group. Every node type in cluster/aws.yaml names it (SecurityGroupIds, from
# `terraform output security_group_id`), and `ray up` then uses it as it is instead of making one that opens
# SSH to 0.0.0.0/0. The dashboard and job API (8265), the client port (10001) and GCS (6379) are not open
# to anyone outside the group: the head binds the dashboard to 127.0.0.1 as well, and the operator reaches
# it through an SSH tunnel (`ray dashboard` with the rendered cluster config).
resource "aws_security_group" "ray" {
  #checkov:skip=CKV2_AWS_5:`ray up` attaches it to the nodes it launches (cluster/aws.yaml names it), outside Terraform
  name        = "alexnet-ray"
  description = "alexnet Ray cluster: SSH from the operator, everything between the cluster's nodes"
  vpc_id      = data.aws_vpc.selected.id
}

resource "aws_vpc_security_group_ingress_rule" "ssh_from_operator" {
  security_group_id = aws_security_group.ray.id
  description       = "SSH from the operator: ray up, ray dashboard (tunnel), ray attach"
  cidr_ipv4         = var.ssh_cidr
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
}

resource "aws_vpc_security_group_ingress_rule" "intra_cluster" {
  security_group_id            = aws_security_group.ray.id
  description                  = "Ray between its own nodes: GCS, raylets, object transfers, NCCL"
  referenced_security_group_id = aws_security_group.ray.id
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "intra_cluster" {
  security_group_id            = aws_security_group.ray.id
  description                  = "Ray between its own nodes"
  referenced_security_group_id = aws_security_group.ray.id
  ip_protocol                  = "-1"
}

resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.ray.id
  description       = "HTTPS out: S3, ECR, pip for runtime environments, the MLflow load balancer"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# --- the MLflow server's name and certificate --------------------------------------------------------------------
# infra/mlflow/k8s.yaml's Ingress makes an internal ALB that terminates TLS with this certificate. ACM issues
# public certificates only for names in public DNS, validated there: hence a name in a public hosted zone
# (mlflow_hostname in mlflow_zone_id), whose record then points at the internal ALB (README). With a private
# CA instead, leave mlflow_zone_id empty and pass the certificate's ARN when rendering k8s.yaml.
locals {
  mlflow_certificate = var.mlflow_hostname != "" && var.mlflow_zone_id != ""
}

resource "aws_acm_certificate" "mlflow" {
  count             = local.mlflow_certificate ? 1 : 0
  domain_name       = var.mlflow_hostname
  validation_method = "DNS"
  options {
    certificate_transparency_logging_preference = "ENABLED"
  }
  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_route53_record" "mlflow_validation" {
  for_each = local.mlflow_certificate ? {
    for o in aws_acm_certificate.mlflow[0].domain_validation_options : o.domain_name => o
  } : {}
  zone_id = var.mlflow_zone_id
  name    = each.value.resource_record_name
  type    = each.value.resource_record_type
  records = [each.value.resource_record_value]
  ttl     = 300
}

resource "aws_acm_certificate_validation" "mlflow" {
  count                   = local.mlflow_certificate ? 1 : 0
  certificate_arn         = aws_acm_certificate.mlflow[0].arn
  validation_record_fqdns = [for r in aws_route53_record.mlflow_validation : r.fqdn]
}
