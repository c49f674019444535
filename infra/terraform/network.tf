# The Ray cluster's security group. cluster/aws.yaml names it (provider.security_group.GroupName), and
# `ray up` then uses it as it is instead of making one that opens SSH to 0.0.0.0/0. The dashboard and job
# API (8265), the client port (10001) and GCS (6379) are not open to anyone outside the group: the head
# binds the dashboard to 127.0.0.1 as well, and the operator reaches it through an SSH tunnel
# (`ray dashboard cluster/aws.yaml`).
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
  description       = "HTTPS out: S3, the container registry, pip for runtime environments, the MLflow load balancer"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}
