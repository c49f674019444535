# PostgreSQL for the team MLflow server (runs, registry, users). Made only when db_subnet_ids is given.
# RDS makes the master password and keeps it in Secrets Manager (manage_master_user_password): it is in no
# file and not in Terraform's state. The README's "A team MLflow server" reads it from there into the
# server's Kubernetes Secret.
locals {
  db = length(var.db_subnet_ids) > 0
}

# The subnets given must be in the one VPC (vpc_id) the database's security group is made in: RDS would
# otherwise refuse the instance at create time, after the rest was made. The instance gets no public address
# (publicly_accessible = false), so the default VPC's subnets serve as well as private ones.
data "aws_subnet" "db" {
  for_each = toset(var.db_subnet_ids)
  id       = each.value
  lifecycle {
    postcondition {
      condition     = self.vpc_id == data.aws_vpc.selected.id
      error_message = "Each of db_subnet_ids must be in vpc_id's VPC (the default VPC when vpc_id is empty)."
    }
  }
}

resource "aws_db_subnet_group" "mlflow" {
  count      = local.db ? 1 : 0
  name       = "alexnet-mlflow"
  subnet_ids = var.db_subnet_ids
  lifecycle {
    precondition {
      condition     = length(distinct([for s in data.aws_subnet.db : s.availability_zone])) >= 2
      error_message = "db_subnet_ids must span at least two availability zones (RDS Multi-AZ)."
    }
  }
}

resource "aws_security_group" "mlflow_db" {
  count       = local.db ? 1 : 0
  name        = "alexnet-mlflow-db"
  description = "PostgreSQL of the MLflow server: 5432 from its clients only"
  vpc_id      = data.aws_vpc.selected.id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_db" {
  count             = local.db ? 1 : 0
  security_group_id = aws_security_group.mlflow_db[0].id
  description       = "PostgreSQL from the MLflow server"
  cidr_ipv4         = var.db_client_cidr != "" ? var.db_client_cidr : data.aws_vpc.selected.cidr_block
  ip_protocol       = "tcp"
  from_port         = 5432
  to_port           = 5432
}

resource "aws_iam_role" "rds_monitoring" {
  count = local.db ? 1 : 0
  name  = "alexnet-mlflow-rds-monitoring"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "monitoring.rds.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  count      = local.db ? 1 : 0
  role       = aws_iam_role.rds_monitoring[0].name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "mlflow" {
  #checkov:skip=CKV2_AWS_30:Query logging of every statement would log MLflow's parameters and tags; connections and errors are exported (enabled_cloudwatch_logs_exports)
  count                               = local.db ? 1 : 0
  identifier                          = "alexnet-mlflow"
  engine                              = "postgres"
  engine_version                      = "16"
  instance_class                      = "db.t4g.medium" # a team's runs and registry: a few GB, light load
  allocated_storage                   = 20
  max_allocated_storage               = 200
  db_name                             = "mlflow"
  username                            = "mlflow"
  manage_master_user_password         = true
  master_user_secret_kms_key_id       = aws_kms_key.data.arn
  db_subnet_group_name                = aws_db_subnet_group.mlflow[0].name
  vpc_security_group_ids              = [aws_security_group.mlflow_db[0].id]
  publicly_accessible                 = false
  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.data.arn
  multi_az                            = true
  backup_retention_period             = 14
  copy_tags_to_snapshot               = true
  deletion_protection                 = true
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "alexnet-mlflow-final"
  auto_minor_version_upgrade          = true
  iam_database_authentication_enabled = true
  performance_insights_enabled        = true
  performance_insights_kms_key_id     = aws_kms_key.data.arn
  monitoring_interval                 = 60
  monitoring_role_arn                 = aws_iam_role.rds_monitoring[0].arn
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]
  lifecycle {
    # The team's runs, registry and users. `terraform destroy` stops here; deleting it on purpose takes an
    # edit (README, "Tear down").
    prevent_destroy = true
  }
}
