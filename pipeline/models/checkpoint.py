"""One checkpoint format, and the life of a model from a training epoch to the registry.

    save(directory, ...)        rank 0, every epoch: checkpoint.pt (the grouped network, optimiser, scheduler,
                                epoch, config, classes, metrics, per-class val counts), metrics.json (the
                                report, readable without the weights: --resume) and any pictures;
                                every --checkpoint-every-steps too, with where in the epoch it was taken
    load(path)                  -> that dict, by torch.load(weights_only=True): tensors and plain Python
                                only, so opening a checkpoint never runs code from it
    build_model(state)          -> the network it holds, in eval mode, on the CPU
    resume(state, model, ...)   a restart after a failure: weights, optimiser and scheduler back in place;
                                -> the Start (epoch, step, images already trained on) to go on from
    for_serving(state)          the same dict without the optimiser: what a logged model carries (model.pt)
    keep_policy(cfg)            Ray Train keeps the --keep-checkpoints best by val top-1, plus the latest
    should_log(...)             which epochs become MLflow logged models (--log-models)
    open_model(reference)       a checkpoint path or an MLflow model URI -> the state (the evaluation job)

The lifecycle: a worker saves every epoch -> Ray Train keeps the best K and the latest -> the tracking
callback turns the epochs --log-models selects into logged models (classifier.py) -> the job registers
the run's best one (registry.py) -> the evaluation job and the served model load it back through here.

The network is always stored as the single-device grouped state_dict (placement.grouped_state_dict), so
a checkpoint loads the same however training was placed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.models import placement
from pipeline.models.alexnet import build_from_config

if TYPE_CHECKING:
    import pyarrow.fs as pafs

CHECKPOINT_FILE = "checkpoint.pt"  # in a Ray Train checkpoint directory
MODEL_FILE = "model.pt"  # in a logged model: the checkpoint without the optimiser
TRAIN_BATCH_FILE = "train_batch.png"  # the first training batch as the model saw it (pictures.py)
METRICS_FILE = "metrics.json"  # the report the checkpoint was taken with
FORMAT = 1
LOG_MODELS = ("best", "all", "none")
# Ray Train ranks checkpoints by this reported metric (higher is better).
SCORE = "val_top1"
# A checkpoint inside an epoch has no val top-1: below every epoch's (0-100). Finite, because Ray Train's
# snapshot of its checkpoints, which a continued run reloads (--resume), writes -inf as null.
MID_EPOCH_SCORE = -1.0

_REQUIRED = ("format", "model", "epoch", "config", "num_classes")
_TRAINING_ONLY = ("optimizer", "scheduler")


@dataclass(frozen=True)
class Start:
    """Where a worker group begins: an epoch, the steps of it already taken, the indices of the images
    those steps trained on (sources.py), and their train sums (loss sum, top-1, top-5, images)."""

    epoch: int = 0
    step: int = 0
    consumed: Any = None  # int64 numpy array, or None at an epoch's start
    sums: tuple[float, int, int, int] | None = None


def save(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    epoch: int,
    config: dict[str, Any],
    num_classes: int,
    classes: list[str],
    words: list[str],
    metrics: dict[str, Any],
    val_per_class: dict[str, list[int]] | None = None,
    files: dict[str, bytes] | None = None,
    within_epoch: Start | None = None,
) -> Path:
    """Write checkpoint.pt (and `files`, e.g. a picture) into `directory`; returns the .pt path.

    within_epoch: for a checkpoint taken mid-epoch, how far into `epoch` it is (a restart goes on from
    there); None when `epoch` is complete. Everything in the file is a tensor or plain Python (dict,
    list, str, int, float, bool, None), so load() can use weights_only=True.
    """
    within = None
    if within_epoch is not None:
        assert within_epoch.sums is not None  # a checkpoint inside an epoch always carries its sums so far
        within = {
            "step": int(within_epoch.step),
            "sums": list(within_epoch.sums),
            "consumed": torch.as_tensor(within_epoch.consumed, dtype=torch.int64),
        }
    path = Path(directory) / CHECKPOINT_FILE
    torch.save(
        {
            "format": FORMAT,
            "model": placement.grouped_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": int(epoch),
            "within_epoch": within,  # None: the epoch is complete
            "config": dict(config),
            "num_classes": int(num_classes),
            "classes": list(classes),  # wnids in label order; empty when the data does not name them
            "words": list(words),  # a readable name per class, when known
            "metrics": saved_metrics(metrics),
            "val_per_class": val_per_class or {},  # {"correct": [...], "images": [...]}, top-1, one entry per class
        },
        path,
    )
    # The epoch's report beside the weights, readable without loading them: a run continued in a new job
    # (--resume) logs from here the epochs whose records its lost driver never delivered.
    reported = {"epoch": int(epoch), "within_epoch": within is not None, "metrics": saved_metrics(metrics)}
    (Path(directory) / METRICS_FILE).write_text(json.dumps(reported))
    for name, data in (files or {}).items():
        (Path(directory) / name).write_bytes(data)
    return path


def saved_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint or logged model's state: `path` is a Ray checkpoint directory, checkpoint.pt or model.pt."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / CHECKPOINT_FILE, path / MODEL_FILE]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: expected a Ray Train checkpoint directory holding "
            f"{CHECKPOINT_FILE}, or a {CHECKPOINT_FILE} / {MODEL_FILE} file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the class that weights_only refused
        raise ValueError(
            f"{str(path)!r} is not a checkpoint this project wrote (torch.load with weights_only=True "
            f"refused it: {type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    missing = [k for k in _REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}: it is not a checkpoint of format {FORMAT}")
    if state["format"] != FORMAT:
        raise ValueError(f"{str(path)!r} has checkpoint format {state['format']}; this code reads format {FORMAT}")
    return state


def build_model(state: dict[str, Any]) -> torch.nn.Module:
    """The network a checkpoint holds, with its weights, in eval mode, on the CPU."""
    model = build_from_config(state["config"], state["num_classes"])  # the run's ablation switches too
    model.load_state_dict(state["model"])
    return model.eval()


def resume(state: dict[str, Any], model: torch.nn.Module, optimizer, scheduler) -> Start:
    """Put a checkpoint's weights, optimiser and scheduler into a placed model; returns where to go on:
    the next epoch's start, or the middle of the checkpoint's epoch."""
    placement.load_grouped_state_dict(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    within = state.get("within_epoch")
    if within is None:
        return Start(state["epoch"] + 1)
    loss, top1, top5, images = within["sums"]
    return Start(state["epoch"], within["step"], within["consumed"].numpy(), (loss, int(top1), int(top5), int(images)))


def for_serving(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without what only training needs: half its size under SGD with momentum (one
    momentum buffer per weight)."""
    return {k: v for k, v in state.items() if k not in _TRAINING_ONLY}


def keep_policy(keep: int):
    """Ray Train keeps the `keep` checkpoints with the best val top-1 and, always, the latest (a restart
    resumes from it); keep=0 keeps every one."""
    import ray.train

    if keep == 0:
        return ray.train.CheckpointConfig()
    return ray.train.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max")


def should_log(policy: str, *, improved: bool, last_epoch: bool) -> bool:
    """--log-models: best logs each epoch whose val top-1 beats every earlier epoch's, and the last epoch
    (what the run ended with); all logs every epoch; none, none."""
    if policy not in LOG_MODELS:
        raise ValueError(f"--log-models must be one of {', '.join(LOG_MODELS)}, got {policy!r}")
    return policy == "all" or (policy == "best" and (improved or last_epoch))


@dataclass(frozen=True)
class OpenedModel:
    """A model to evaluate: its state, and where it is in MLflow (empty for a checkpoint path)."""

    state: dict[str, Any]
    reference: str
    model_id: str = ""  # the logged model
    registered_name: str = ""  # the registered model and version, when the reference names one
    version: str = ""


_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def open_model(reference: str, filesystem: pafs.FileSystem | None = None) -> OpenedModel:
    """A checkpoint path (directory or file, local, s3:// or gs://) or an MLflow model URI (models:/name@alias,
    models:/name/3, models:/<logged model id>, runs:/<run id>/<model name>) -> its state and identity.
    `filesystem`: the one a checkpoint on object storage is read through (storage.resolve's: its endpoint or
    emulator, its retries); without it Ray resolves the URI itself, as pyarrow does."""
    if not reference.startswith(("models:/", "runs:/")):
        return OpenedModel(_load_path(reference, filesystem), reference)

    import mlflow

    client = mlflow.MlflowClient()
    name = version = ""
    registered = _REGISTERED.match(reference)
    try:
        if registered and not registered["name"].startswith("m-"):
            name = registered["name"]
            mv = (
                client.get_model_version_by_alias(name, registered["alias"])
                if registered["alias"]
                else client.get_model_version(name, registered["version"])
            )
            version = mv.version
        model_id = mlflow.models.get_model_info(reference).model_id or ""
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(
            f"{reference!r} is not in the MLflow store at {mlflow.get_tracking_uri()} "
            f"({e.message.splitlines()[0]}); set MLFLOW_TRACKING_URI to the store that holds it"
        ) from None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=tmp))
        found = sorted(local.rglob(MODEL_FILE))
        if not found:
            raise ValueError(f"{reference!r} holds no {MODEL_FILE}: it was not logged by this project's training job")
        state = load(found[0])
    return OpenedModel(state, reference, model_id, name, version)


def _load_path(reference: str, filesystem: pafs.FileSystem | None) -> dict[str, Any]:
    if "://" not in reference:
        return load(reference)
    import ray.train

    if reference.endswith(".pt"):  # one file on object storage: fetch its directory
        reference = reference.rsplit("/", 1)[0]
    path = reference.split("://", 1)[1].rstrip("/") if filesystem is not None else reference
    with ray.train.Checkpoint(path, filesystem=filesystem).as_directory() as directory:
        return load(directory)
