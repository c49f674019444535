"""The Ray Data plans that feed the trainers: one fused task per piece of the data.

    open_source(uri)             what the URI holds (sources.py)
    train_dataset(source, cfg)   per epoch: read units -> random_crops -> {image (N, C, C, 3) uint8, label}
    val_dataset(source, cfg)     read units (in order) -> center_crops -> {image, label}
    with --decode-on gpu         read units -> {jpeg, key, label}: the trainer decodes on its GPU (train/batches.py)

Each Ray Data task reads a few read units of the split (sources.read_unit: 256 files, or a Parquet
row group, or a tar), decodes every image straight to its crop (stages.random_crops) and hands on
each unit's uint8 crops as a block: read, decode, resize and crop fused in one task, no full-size
image in the object store, and no torch in the process. Lighting and normalisation are float math
on the trainer's device (device_stages.py).

The epoch a task belongs to is the training run's epoch: TrainValDataConfig starts the splits it
builds (at the start, and again after Ray Train restarts the workers from a checkpoint) at the epoch
the workers resume from, and each pass over the dataset is the next epoch. So the order of samples and
the crops are functions of (seed, epoch): different every epoch, the same in every run with that seed,
and the same again after a restart. A checkpoint taken mid-epoch records the indices of the images
the workers had trained on (sources.py); the resumed epoch leaves exactly those out, with every other
image's crop unchanged. An image that fails to decode is left out of its batch and named in the run's
ReadReport report; it is never replaced by another image.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
from ray.data.context import DataContext

from pipeline.data import sources, storage
from pipeline.data.readers.base import in_sorted
from pipeline.data.sources import SPLITS, Source, open_source, scan_image_folder  # noqa: F401  (public entry points)
from pipeline.transforms import stages

# Read units per Ray task, at most. One unit (256 images) decodes in 0.1-0.3 s, and between such short
# tasks Ray leaves a core idle: 1.0-1.4 of 2 cores were busy. Measured on 2 cores over 19,800
# original JPEGs, img/s with units per task 1 / 2 / 4 / 8 / 16: 985 / 1,151 / 1,171-1,227 /
# 1,308-1,314 / 1,271-1,273 (BENCHMARKS.md). Small data sets get fewer per task, so that every
# CPU still has two tasks and an epoch does not end on one long task.
UNITS_PER_TASK = 8
TASKS_PER_CPU = 2
# And no more tasks than this per CPU: the driver plans every task before the first batch (~1.6 ms each:
# ImageNet-21k's 55,866 units in 6,984 tasks took 11 s), and a resumed epoch runs the tasks of the units it
# skips too (70 s of them at that size). A task streams each unit out as its own block, so a longer task
# does not hold the first batch back.
MAX_TASKS_PER_CPU = 32


@ray.remote(num_cpus=0)
class ReadReport:
    """The run's report of what reading the data met: images that could not be decoded (key -> reason),
    and the reads from object storage that had to be retried (cause -> count, storage.retries)."""

    def __init__(self):
        self.failures: dict[str, str] = {}
        self.retried: Counter = Counter()

    def add(self, failures: dict[str, str]) -> None:
        self.failures.update(failures)

    def get(self) -> dict[str, str]:
        return dict(self.failures)

    def add_retries(self, retried: dict[str, int]) -> None:
        self.retried.update(retried)

    def retries(self) -> dict[str, int]:
        return dict(self.retried)


@ray.remote(num_cpus=0)
class ResumePoint:
    """Where the workers start: an epoch, and the indices of its training images already trained on
    (None: from the epoch's start). Rank 0 sets it from the checkpoint before it asks for its dataset
    shard; TrainValDataConfig reads it when Ray Train builds the shards."""

    def __init__(self):
        self.point: tuple[int, np.ndarray | None] = (0, None)

    def set(self, epoch: int, consumed: np.ndarray | None) -> None:
        self.point = (epoch, consumed)

    def get(self) -> tuple[int, np.ndarray | None]:
        return self.point


# Set in a dataset's DataContext, which Ray Data hands to every task of the dataset.
EPOCH_BASE = "alexnet.epoch_base"  # the epoch = this + the dataset's execution index
SKIP = "alexnet.skip"  # (epoch, ObjectRef of the sorted indices to leave out of it)


def start_at(dataset: ray.data.Dataset, epoch: int, consumed: np.ndarray | None = None) -> ray.data.Dataset:
    """Make the next pass over `dataset` epoch `epoch`, leaving out the images `consumed` names.

    Ray Data counts the passes over a dataset (DataContext._execution_idx, private, but the only
    per-pass value it hands to tasks; its own FileShuffleConfig reseeds from it); tests/test_data.py
    checks that passes are epochs and that a resumed epoch leaves out exactly what it is told to.
    """
    context = dataset.context
    context.set_config(EPOCH_BASE, epoch - context._execution_idx)
    skip = None if consumed is None or not len(consumed) else (epoch, ray.put(np.unique(consumed)))
    context.set_config(SKIP, skip)
    return dataset


def current_epoch() -> int:
    """The epoch a Ray Data task belongs to (start_at)."""
    context = DataContext.get_current()
    return context._execution_idx + context.get_config(EPOCH_BASE, 0)


def _skipped(epoch: int) -> np.ndarray | None:
    skip = DataContext.get_current().get_config(SKIP)
    return ray.get(skip[1]) if skip is not None and skip[0] == epoch else None


def _check_labels(labels: np.ndarray, keys, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(
            f"image {keys[bad[0]]!r} has label {labels[bad[0]]}, outside the {num_classes} classes (--num-classes)"
        )


def _read_units(
    batch: dict[str, np.ndarray],
    *,
    source: Source,
    split: str,
    seed: int,
    resize_size: int,
    crop_size: int,
    flip_p: float,
    report,
    keys: bool,
    decode: bool = True,
    augment: bool = True,
) -> Iterator[dict[str, Any]]:
    """One Ray Data task: the read units named by batch["id"], each read, decoded, cropped and handed
    on as its own block (with decode=False, for --decode-on gpu, the bytes are handed on instead).
    Training crops are random crops and flips (§4.1), or with augment=False (--augment off) the
    central crops validation takes; the order of the samples is shuffled either way."""
    epoch = current_epoch()
    train = split == "train"
    skipped = _skipped(epoch) if train else None
    errors = "raise" if report is None else "collect"
    retried_before = Counter(storage.retries())
    for unit in batch["id"]:
        rows = sources.read_unit(source, split, int(unit), seed=seed, epoch=epoch, shuffle=train, skip=skipped)
        if not len(rows["label"]):  # every image of the unit trained on before the restart: nothing fetched
            continue
        _check_labels(rows["label"], rows["key"], source.num_classes)
        keep = None if skipped is None else ~in_sorted(rows["index"], skipped)
        if not decode:
            rows = _kept(rows, keep)
            yield {
                "jpeg": np.array(rows["jpeg"], dtype=object),
                "key": np.array(rows["key"], dtype=object),
                "label": rows["label"],
                "index": rows["index"],
            }
            continue
        if train and augment:
            rng = np.random.default_rng([seed, epoch, int(unit), 1])
            out = stages.random_crops(
                rows, rng, resize_size=resize_size, crop_size=crop_size, flip_p=flip_p, errors=errors, keep=keep
            )
        else:
            out = stages.center_crops(_kept(rows, keep), resize_size=resize_size, crop_size=crop_size, errors=errors)
        if out.get("failed"):
            report.add.remote(out["failed"])
        columns = {"image": out["image"], "label": out["label"], "index": out["index"]}
        if keys:
            columns["key"] = np.array(out["key"], dtype=object)
        yield columns
    retried = Counter(storage.retries()) - retried_before
    if retried and report is not None:
        report.add_retries.remote(dict(retried))


def _kept(rows: dict[str, Any], keep: np.ndarray | None) -> dict[str, Any]:
    if keep is None:
        return rows
    kept = np.flatnonzero(keep)
    return {k: v[kept] if isinstance(v, np.ndarray) else [v[i] for i in kept] for k, v in rows.items()}


# Each decode task takes this much of --data-resource: a node that offers 1 runs up to 1,000 of them at
# once, so its CPUs, not the marker, bound how many run there.
DATA_RESOURCE_SHARE = 0.001


def placement_args(cfg) -> dict[str, Any]:
    """Ray remote args that keep the decode tasks on the nodes offering --data-resource (the CPU-only
    nodes of a cluster that also has GPU nodes). With it set Ray cannot fuse the range of unit numbers
    into the decode task, so the tiny tasks that list the numbers may run elsewhere; every read of an
    image is in the decode task."""
    return {"resources": {cfg.data_resource: DATA_RESOURCE_SHARE}} if cfg.data_resource else {}


def num_tasks(units: int, cpus: int) -> int:
    """Ray tasks for `units` read units on a cluster of `cpus`: up to UNITS_PER_TASK units each, but
    TASKS_PER_CPU tasks per CPU when there are enough units, and at most MAX_TASKS_PER_CPU."""
    return min(units, max(min(-(-units // UNITS_PER_TASK), MAX_TASKS_PER_CPU * cpus), TASKS_PER_CPU * cpus))


def _plan(source: Source, split: str, cfg, report, keys: bool) -> ray.data.Dataset:
    source = source.by_reference(split)  # a listing, row groups: in the object store once, not in every task
    units = sources.num_units(source, split)
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    tasks = num_tasks(units, cpus)
    decode = cfg.decode_on == "cpu"
    fn = partial(
        _read_units,
        source=source,
        split=split,
        seed=cfg.seed,
        resize_size=cfg.resize_size,
        crop_size=cfg.crop_size,
        flip_p=cfg.flip_p,
        report=report,
        keys=keys,
        decode=decode,
        augment=cfg.augment == "on",
    )
    # One row per read unit, a few rows per Ray task; Ray fuses the range and the map.
    dataset = ray.data.range(units, override_num_blocks=tasks).map_batches(
        fn, batch_size=None, batch_format="numpy", **placement_args(cfg)
    )
    # A block closes when it outgrows this: just under one unit's crops, so every unit leaves its
    # task as soon as it is decoded and the first batch waits for one unit, not for a whole task.
    # Undecoded (--decode-on gpu), a unit is its JPEG bytes: 40 KB an image at the least (256-px shards).
    unit_bytes = sources.UNIT_IMAGES * (cfg.crop_size**2 * 3 if decode else 40_000)
    dataset.context.target_max_block_size = int(0.9 * unit_bytes)
    return dataset


def train_dataset(source: Source, cfg, report=None, *, keys: bool = False) -> ray.data.Dataset:
    """The training plan: a fresh, seeded order of samples and crops every epoch.

    report: a ReadReport actor to name undecodable images in (else the first one raises).
    keys: also hand on each image's key (tests and benchmarks; torch batches take numbers only).
    """
    return _plan(source, "train", cfg, report, keys)


def val_dataset(source: Source, cfg, report=None, *, keys: bool = False) -> ray.data.Dataset:
    """The validation plan: central crops, in file order, no randomness."""
    return _plan(source, "val", cfg, report, keys)


def execution_options(cfg):
    """Ray Data options for the train workers' shards: Train's defaults, plus a fixed order when asked."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.deterministic
    return options


class TrainValDataConfig(ray.train.DataConfig):
    """Splits "train" equally (DDP needs the same number of steps on every worker) and "val"
    unequally, so that no validation image is dropped and top-1/top-5 are over all of them.

    resume_point: a ResumePoint actor; "train" starts where it says (Ray Train calls configure again
    for the new workers after a restart).
    """

    def __init__(self, *args, resume_point=None, execution_options=None, **kwargs):
        super().__init__(*args, execution_options=execution_options, **kwargs)
        self.resume_point = resume_point
        # What "val" runs with: DataConfig resolves a dataset's options only in a private method.
        if isinstance(execution_options, dict):
            execution_options = execution_options.get("val")
        self.val_options = execution_options or ray.train.DataConfig.default_ingest_options()

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if "train" in datasets and self.resume_point is not None:
            start_at(datasets["train"], *ray.get(self.resume_point.get.remote()))
        others = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = copy.deepcopy(self.val_options)
            for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output
