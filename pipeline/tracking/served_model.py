"""The file MLflow runs to build the logged classifier ("models from code", classifier.log_model).

The logged model holds this file, model.pt and the `pipeline` modules this file imports, transitively
(classifier.served_sources), and no pickled Python object: loading it runs this code and reads the weights
with torch.load(weights_only=True). What is imported here, at any depth, is what a logged model ships.
"""

import mlflow

from pipeline.tracking.classifier import ImageClassifier

mlflow.models.set_model(ImageClassifier())
