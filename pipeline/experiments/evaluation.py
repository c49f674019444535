"""The evaluation job: a saved model over a whole split on Ray, centre crop and §4.1's ten crops.

evaluate_split   a checkpoint's model over a split: read tasks decode (CPUs), actors score (GPUs with
                 --use-gpu), the driver adds up exact counts (train/metrics.py)
check_classes    the model and the data must number the same classes the same way
evaluate_model   jobs/evaluate.py: open the model and the data, evaluate, record in MLflow
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import cluster, data
from pipeline.data import sample, sources, storage
from pipeline.models import checkpoint
from pipeline.train.metrics import score_batch
from pipeline.transforms import stages

# Images per block handed from the read tasks to the scoring actors: 64 centre crops and 64 resized
# squares are ~22 MB at 227 / 256 px, well under Ray Data's block size.
EVAL_CHUNK = 64
TEN_CROP = "_10crop"  # suffix of the ten-crop metrics: val_top1_10crop, ...


def eval_views(batch: dict[str, Any], *, resize_size: int, crop_size: int) -> dict[str, Any]:
    """Rows {jpeg, key, label} -> the two views the job scores, for the images that decode:

        image   (N, C, C, 3)  the centre crop, made exactly as training validates (stages.center_crops)
        square  (N, S, S, 3)  shorter side resized to S, central square: ten_crop cuts its 10 patches

    and `failed` ({key: reason}) for the others. Each image is decoded twice, once per view, so that the
    centre view is training's own (decode.py fuses its resize and crop) at the cost of a second decode.
    """
    centre = stages.center_crops(batch, resize_size=resize_size, crop_size=crop_size, errors="collect")
    whole = stages.decode(batch, min_size=resize_size, errors="collect")
    if centre["failed"].keys() != whole["failed"].keys():  # one decoder: a file fails in both or neither
        raise AssertionError(f"the views decoded different images: {centre['failed']} vs {whole['failed']}")
    square = (
        stages.resize_center(whole, size=resize_size)["image"]
        if whole["image"]
        else np.empty((0, resize_size, resize_size, 3), np.uint8)
    )
    return {
        "image": centre["image"],
        "square": square,
        "label": np.asarray(centre["label"], np.int64),
        "failed": centre["failed"],
    }


def _read_eval_units(
    batch: dict[str, np.ndarray], *, source, split: str, resize_size: int, crop_size: int, report
) -> Iterator[dict[str, Any]]:
    """One Ray Data task: read units of the split, in file order, as blocks of EVAL_CHUNK images' views."""
    for unit in batch["id"]:
        rows = sources.read_unit(source, split, int(unit), seed=0, epoch=0, shuffle=False)
        for start in range(0, len(rows["label"]), EVAL_CHUNK):
            views = eval_views(
                {k: v[start : start + EVAL_CHUNK] for k, v in rows.items()},
                resize_size=resize_size,
                crop_size=crop_size,
            )
            failed = views.pop("failed")
            if failed:
                report.add.remote(failed)
            if len(views["label"]):
                yield views


class _Scorer:
    """A Ray Data actor holding the model: a block of views -> one row of sums per view."""

    def __init__(self, state_ref: list, crop_size: int, use_gpu: bool):
        import ray

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = checkpoint.build_model(ray.get(state_ref[0])).to(self.device)
        self.crop_size = crop_size

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        # Blocks arrive read-only from the object store; torch wants writable arrays, so these are copies.
        labels = torch.tensor(batch["label"], device=self.device)
        centre = score_batch(self.model, torch.tensor(batch["image"], device=self.device), labels)
        crops = stages.ten_crop({"image": batch["square"]}, size=self.crop_size)["image"]  # (N, 10, C, C, 3)
        ten = score_batch(self.model, torch.from_numpy(crops).to(self.device), labels)
        row: dict[str, list] = {}
        for suffix, sums in (("", centre), (TEN_CROP, ten)):
            row.update(
                {
                    f"loss{suffix}": [sums.loss],
                    f"correct1{suffix}": [sums.correct1],
                    f"correct5{suffix}": [sums.correct5],
                    f"images{suffix}": [sums.images],
                }
            )
        return row


def evaluate_split(
    state: dict[str, Any],
    source,
    *,
    split: str = "val",
    use_gpu: bool = False,
    actors: int = 0,
    batch_size: int = EVAL_CHUNK,
) -> dict[str, Any]:
    """A checkpoint's model over a whole split, on Ray: read tasks decode (CPU), actors score (GPU with
    use_gpu), and the driver adds up the counts, so the accuracies are exact over every image.

    Returns val_top1/top5/loss (centre crop), the same with _10crop (§4.1: four corners and the centre of
    the resized square, and their mirror images, softmax averaged), the image count and the images that
    could not be decoded ({key: reason}; left out of every number, never replaced).
    """
    import ray
    import ray.data

    cfg = state["config"]
    resize_size, crop_size = cfg["resize_size"], cfg["crop_size"]
    report = data.ReadReport.remote()
    units = sources.num_units(source, split)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu and not gpus:
        raise ValueError("--use-gpu was given but the Ray cluster has no GPU; leave it out to evaluate on CPUs")
    # On CPUs Ray Data fuses the read into the actors (same resources): each actor reads, decodes and
    # scores whole read units, so the actors are the parallelism (one per unit at most), and one CPU is
    # left for everything else. With GPUs the read runs as CPU tasks and the actors only score.
    actors = actors or (gpus if use_gpu else max(1, min(units, int(ray.cluster_resources().get("CPU", 1)) - 1)))
    read = partial(
        _read_eval_units, source=source, split=split, resize_size=resize_size, crop_size=crop_size, report=report
    )
    rows = (
        ray.data.range(units, override_num_blocks=units)
        .map_batches(read, batch_size=1, batch_format="numpy")
        # The weights go through the object store once (a list, so that Ray hands the actors the
        # reference and they fetch it themselves).
        .map_batches(
            _Scorer,
            fn_constructor_kwargs={"state_ref": [ray.put(state)], "crop_size": crop_size, "use_gpu": use_gpu},
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=1 if use_gpu else 0,
        )
        .take_all()
    )
    totals = {
        k: sum(int(r[k]) if k.startswith(("correct", "images")) else float(r[k]) for r in rows)
        for k in (rows[0] if rows else ())
    }
    failed = ray.get(report.get.remote())
    if not totals.get("images"):
        raise ValueError(f"no {split} images of {source.uri} could be evaluated ({len(failed)} failed to decode)")
    metrics = {}
    for suffix in ("", TEN_CROP):
        metrics.update(
            {
                f"val_top1{suffix}": 100.0 * totals[f"correct1{suffix}"] / totals[f"images{suffix}"],
                f"val_top5{suffix}": 100.0 * totals[f"correct5{suffix}"] / totals[f"images{suffix}"],
                f"val_loss{suffix}": totals[f"loss{suffix}"] / totals[f"images{suffix}"],
            }
        )
    return {
        "metrics": metrics,
        "images": totals["images"],
        "correct1": totals["correct1"],
        "correct1_10crop": totals["correct1" + TEN_CROP],
        "failed": failed,
    }


def check_classes(state: dict[str, Any], source) -> None:
    """The model and the data must number the same classes the same way, or every count is wrong."""
    if state["num_classes"] != source.num_classes:
        raise ValueError(
            f"the model has {state['num_classes']} classes but {source.uri} has {source.num_classes}: "
            f"evaluate it on the data it was trained for (or data with the same classes)"
        )
    if state["classes"] and source.wnids and list(state["classes"]) != list(source.wnids):
        first = next(i for i, (a, b) in enumerate(zip(state["classes"], source.wnids)) if a != b)
        raise ValueError(
            f"class {first} is {state['classes'][first]} for the model but {source.wnids[first]} in "
            f"{source.uri}: the label numbering differs, so the accuracies would be meaningless"
        )


def evaluate_model(
    reference: str, data_uri: str = "", *, use_gpu: bool = False, actors: int = 0, record: bool = True
) -> dict[str, Any]:
    """jobs/evaluate.py: the model `reference` names (checkpoint.open_model) on the val split of the data at
    `data_uri` (the generated sample when empty, as for training), recorded on its registered version and
    logged model unless record=False."""
    import mlflow

    from pipeline.tracking import registry, runs  # deferred: MLflow and Ray, so that --help answers fast

    # The places first, in seconds: a bucket or path that is not there, a store that does not answer.
    filesystem = None
    if storage.is_object_store(reference):
        storage.check_location(reference, "--model", must_exist=True)
        filesystem = storage.resolve(reference)[0]  # Ray's own resolution of gs:// knows no emulator
    storage.check_location(data_uri, "dataset path", must_exist=True)
    in_mlflow = reference.startswith(("models:/", "runs:/"))  # a checkpoint path needs no tracking store
    tracking_uri = runs.resolve_tracking_uri() if in_mlflow else ""
    if in_mlflow:
        mlflow.set_tracking_uri(tracking_uri)
    opened = checkpoint.open_model(reference, filesystem)
    source = sources.open_source(
        data_uri or str(sample.ensure_sample_imagenet()), num_classes=opened.state["num_classes"]
    )
    check_classes(opened.state, source)
    cluster.connect_ray()
    source = source.by_reference()  # a folder's listing into the object store, once, and out of this process
    pa.default_memory_pool().release_unused()  # the memory it was built in (3x the listing's), back to the system
    result = evaluate_split(opened.state, source, use_gpu=use_gpu, actors=actors)
    recorded = []
    if record and in_mlflow:
        recorded = registry.record_evaluation(
            opened,
            result["metrics"],
            data_uri=source.uri,
            data_fingerprint=source.fingerprint,
            tracking_uri=tracking_uri,
        )
    return {
        **result,
        "reference": reference,
        "data": source.uri,
        "data_fingerprint": source.fingerprint,
        "epoch": opened.state["epoch"],
        "recorded": recorded,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """jobs/evaluate.py's flags, checked; exits 2 with a usage message naming a bad one."""
    parser = argparse.ArgumentParser(
        description="Evaluate a trained model: top-1 / top-5 from the centre crop "
        "and from the paper's ten crops (§4.1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="models:/name@alias, models:/name/version, models:/<logged model id>, "
        "runs:/<run id>/<model name>, or a checkpoint directory / file",
    )
    parser.add_argument("--data", default="", help="dataset root, as for training; empty = the generated sample")
    parser.add_argument("--use-gpu", action="store_true", help="score on GPUs, one actor per GPU")
    parser.add_argument(
        "--actors",
        type=int,
        default=0,
        help="scoring actors holding the model; 0 = one per GPU with --use-gpu, else one per "
        "read unit (256 images) up to the cluster's CPUs less one",
    )
    parser.add_argument("--no-record", action="store_true", help="print the numbers only; write nothing to MLflow")
    args = parser.parse_args(argv)
    if args.actors < 0:
        parser.error(f"--actors must be >= 0, got {args.actors}")
    return args
