"""The data: where the images are, how they are read, and the Ray Data plans that feed the trainers.

    open_source(uri)             what a URI holds: an ImageNet folder, prepared shards, Hugging Face
                                 Parquet or WebDataset tars, local or s3:// (sources.py)
    train_dataset(source, cfg)   the Ray Data plan of an epoch's training crops (plan.py)
    val_dataset(source, cfg)     the same for validation, centre crops in order
    ReadReport                   the run's actor naming undecodable images and retried reads

    storage      local paths and s3://: one filesystem, retries counted by cause
    imagenet     the ILSVRC-2012 layouts (archives, folders) and the one way to list them
    devkit       the ILSVRC devkit and val label files
    clean        what prepare does to each image: a plain RGB JPEG, or a named reason
    shards       Parquet shards and their manifest
    prepare      ImageNet (any layout) -> shards, on Ray
    sample       the generated sample data set, in ImageNet layout
    sources      the read units of an epoch; readers/ holds one reader per format
    plan         the Ray Data plans

The plans import Ray; open_source and everything else do not (a GPU check machine has no Ray), so the
plan's names are loaded when first asked for.
"""

from pipeline.data.sources import SPLITS, Source, open_source, scan_image_folder

__all__ = [
    "SPLITS",
    "Source",
    "open_source",
    "scan_image_folder",
    "train_dataset",
    "val_dataset",
    "ReadReport",
    "ResumePoint",
    "TrainValDataConfig",
    "execution_options",
]
_PLAN = ("train_dataset", "val_dataset", "ReadReport", "ResumePoint", "TrainValDataConfig", "execution_options")


def __getattr__(name: str):
    if name in _PLAN:
        from pipeline.data import plan  # deferred: Ray, which a GPU check machine does not have

        return getattr(plan, name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
