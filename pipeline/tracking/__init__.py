"""MLflow: the run, its records, the registry and the model it serves.

    runs            the MLflow run of a training run, the Recorder that delivers every epoch, the callback
    registry        registering the best model, lineage, the champion rule
    classifier      the registered image classifier (JPEG bytes -> top-5), logged from code
    served_model    the file MLflow runs to build that classifier
    pictures        the run's pictures: inputs, curves, per-class accuracy, conv1 filters
"""
