# The registries the nodes pull from, in this account: the Ray image (infra/Dockerfile; cluster/aws.yaml's
# docker.image) and the MLflow server's (infra/mlflow/Dockerfile; infra/mlflow/k8s.yaml). A private
# registry elsewhere (GHCR is private by default) would need a login with a stored secret on every node;
# ECR takes the nodes' own instance role (iam.tf gives both node roles pull rights on alexnet-ray) and the
# EKS nodes' role (EKS's node role carries AmazonEC2ContainerRegistryReadOnly).
#
# Tags are immutable: every node runs `docker pull` when it starts (pull_before_run), so with a movable tag
# such as `latest` a worker the autoscaler adds after a push would run other code than the head. Push each
# build under its own tag (README: the commit) and name that tag when rendering cluster/aws.yaml.
resource "aws_ecr_repository" "ray" {
  name                 = "alexnet-ray"
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true # ECR's basic scan of the OS packages; findings in the console and `aws ecr describe-image-scan-findings`
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.data.arn # ECR decrypts on pull through its own grant: pullers need no key rights
  }
}

resource "aws_ecr_repository" "mlflow" {
  name                 = "alexnet-mlflow"
  image_tag_mutability = "IMMUTABLE"
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.data.arn
  }
}

# A Ray GPU image is several GB and every build is a new tag: keep the newest 10 of each repository.
resource "aws_ecr_lifecycle_policy" "keep_recent" {
  for_each   = { ray = aws_ecr_repository.ray.name, mlflow = aws_ecr_repository.mlflow.name }
  repository = each.value
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 10 newest images"
      selection    = { tagStatus = "any", countType = "imageCountMoreThan", countNumber = 10 }
      action       = { type = "expire" }
    }]
  })
}
