"""AlexNet on ImageNet with Ray Data, Ray Train and MLflow: the importable library behind jobs/."""
