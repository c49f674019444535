"""The file MLflow runs to build the logged classifier ("models from code", classifier.log_model).

The logged model holds this file, the package's source and model.pt, and no pickled Python object:
loading it runs this code and reads the weights with torch.load(weights_only=True).
"""

import mlflow

from pipeline.tracking.classifier import ImageClassifier

mlflow.models.set_model(ImageClassifier())
