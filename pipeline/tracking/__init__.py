"""MLflow: the run, its records, the registry and the model it serves.

runs            the MLflow run of a training run: start, finish, the Train callback, closing one that failed
recording       the Recorder: the run's one writer while it trains, through a server that comes and goes
registry        registering the best model, lineage, the champion rule
classifier      the registered image classifier (JPEG bytes -> top-5), logged from code
served_model    the file MLflow runs to build that classifier
pictures        the run's pictures: inputs, curves, per-class accuracy, conv1 filters
"""
