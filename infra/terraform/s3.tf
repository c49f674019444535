# `terraform destroy` must not take the data's protection apart. The bucket itself refuses while it holds objects,
# but its policy (TLS only) and its public-access block would go, and its KMS key would be scheduled for deletion,
# and with it every shard, checkpoint and model encrypted under it: unreadable. So these four carry prevent_destroy:
# a destroy (or an apply that would replace one of them) stops at its plan and changes nothing at all. To really
# delete them, on purpose: empty the bucket (every version), remove the four lifecycle blocks below in a change of
# its own, then destroy.

resource "aws_kms_key" "data" {
  description         = "alexnet-ray: the bucket's objects and the MLflow database"
  enable_key_rotation = true
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      # The account administers the key; who may use it is said in the roles' policies (iam.tf).
      Sid       = "AccountAdministers"
      Effect    = "Allow"
      Principal = { AWS = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
  lifecycle {
    prevent_destroy = true # see the top of this file
  }
}

resource "aws_s3_bucket" "data" {
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles the cost of 150 GB of shards that jobs/prepare_imagenet.py rebuilds from the ImageNet archives; the models worth keeping are in the registry
  #checkov:skip=CKV2_AWS_62:No consumer of object events exists; notifications would go nowhere
  #checkov:skip=CKV_AWS_18:Server access logs need a second bucket per deployment; CloudTrail data events (an account-wide setting) are the audit trail this project recommends
  bucket = var.bucket_name
  lifecycle {
    prevent_destroy = true # see the top of this file
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
  lifecycle {
    prevent_destroy = true # see the top of this file
  }
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    object_ownership = "BucketOwnerEnforced" # no ACLs: access is the policies' alone
  }
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled" # an overwritten checkpoint or model can be recovered
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    bucket_key_enabled = true # one KMS call per object per session, not per request: shards are read often
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    id     = "tidy"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "TLSOnly"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
  lifecycle {
    prevent_destroy = true # see the top of this file
  }
}
