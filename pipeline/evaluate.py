"""Top-1 / top-5 from summed counts, exact across any number of workers, and the evaluation job's plan.

Each worker returns sums (loss, correct@1, correct@5, images); the sums are all-reduced and only
then divided, so the result is the accuracy over the whole validation set, not a mean of means.

    batch_counts         one batch, one crop or §4.1's ten (softmax averaged), counted on the device without
                         the host waiting for it (index_add_, not bincount or a boolean mask)
    evaluate             a training worker's validation pass, read from the device once
    evaluate_split       jobs/evaluate.py: a saved model over a whole split on Ray Data, centre crop and
                         ten crops; read tasks decode on CPUs, actors hold the model (GPUs with --use-gpu)
    evaluate_model       the job itself: open the model and the data, evaluate, record in MLflow
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import device_stages, sources, stages


@dataclass
class EvalSums:
    loss: float = 0.0
    correct1: int = 0
    correct5: int = 0
    images: int = 0
    # Per class (index = label): images seen and top-1 hits; empty until a batch has been scored.
    class_images: tuple[int, ...] = ()
    class_correct1: tuple[int, ...] = ()

    def add(self, other: "EvalSums") -> "EvalSums":
        return EvalSums(self.loss + other.loss, self.correct1 + other.correct1,
                        self.correct5 + other.correct5, self.images + other.images,
                        _add(self.class_images, other.class_images), _add(self.class_correct1, other.class_correct1))

    def all_reduce(self, classes: int = 0, device: torch.device | str = "cpu") -> "EvalSums":
        """The sums over every worker of the process group (a no-op without one).

        classes: the per-class counts to keep (0 drops them). Every worker must send a tensor of the
        same length, and a worker whose shard was empty has seen no class at all.
        device: this worker's device, where the process group's backend reduces (NCCL serves CUDA
        tensors only, gloo CPU ones). The result is read back once.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if classes and len(self.class_images) not in (0, classes):
            raise ValueError(f"per-class counts for {len(self.class_images)} classes, reduced as {classes}")
        images, correct = ((list(v) or [0] * classes) if classes else [] for v in
                           (self.class_images, self.class_correct1))
        t = torch.tensor([self.loss, self.correct1, self.correct5, self.images, *images, *correct], dtype=torch.float64)
        t = device_stages.to_device(t, device)
        dist.all_reduce(t)  # float64 counts are exact far beyond ImageNet's 50,000 images
        loss, *rest = t.tolist()
        counts = [int(v) for v in rest]
        return EvalSums(loss, counts[0], counts[1], counts[2], tuple(counts[3:3 + classes]),
                        tuple(counts[3 + classes:]))

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        if self.images == 0:
            raise ValueError(f"no {prefix} images were evaluated")
        return {
            f"{prefix}_loss": self.loss / self.images,
            f"{prefix}_top1": 100.0 * self.correct1 / self.images,   # percent, like torchvision's acc@1
            f"{prefix}_top5": 100.0 * self.correct5 / self.images,
        }

    def per_class(self) -> dict[str, list[int]]:
        """Top-1 hits and images per class, for the per-class picture (pictures.py)."""
        return {"correct": list(self.class_correct1), "images": list(self.class_images)}


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a or not b:
        return a or b
    return tuple(x + y for x, y in zip(a, b, strict=True))


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many labels are among the k highest scores (k capped at the number of classes), as a
    tensor on the scores' device: counting it does not wait for the device."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def batch_counts(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One batch's sums as one float64 tensor on the device, so that a pass adds them up without
    waiting for the device: [loss, correct@1, correct@5, images, per-class images..., per-class top-1...].

    images: (N, H, W, 3) uint8, or (N, 10, H, W, 3) for ten-crop. Ten-crop (§4.1 test time) averages
    the softmax over the ten patches; the loss is then the negative log of that averaged probability.
    """
    crops = images.shape[1] if images.dim() == 5 else 1
    flat = images.reshape(-1, *images.shape[-3:])
    with torch.autocast(flat.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logits = model(device_stages.normalize(device_stages.to_float(flat)))
    probs = logits.float().softmax(dim=1).reshape(len(labels), crops, -1).mean(dim=1)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
    classes = probs.shape[1]
    hits = probs.topk(1, dim=1).indices[:, 0] == labels  # the rule topk_hits counts by, ties included
    ones = torch.ones(len(labels), dtype=torch.float64, device=labels.device)
    head = torch.stack([loss.double(), topk_hits(probs, labels, 1).double(), topk_hits(probs, labels, 5).double(),
                        ones.sum()])
    return torch.cat([head, _by_class(labels, ones, classes), _by_class(labels, hits.double(), classes)])


def _by_class(labels: torch.Tensor, weights: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes,) float64: the weights (1 an image, 1 a hit) added up by label, on the labels' device.

    index_add_ onto zeros instead of torch.bincount (which on CUDA reads the largest label back to size
    its output) or labels[hits] (a boolean mask: the host waits to learn how many): nothing here waits
    for the device. Sums of whole numbers in float64 are exact in any order of addition.
    """
    return torch.zeros(classes, dtype=torch.float64, device=labels.device).index_add_(0, labels, weights)


def sums_of(counts: torch.Tensor) -> EvalSums:
    """batch_counts (or their sum) -> EvalSums; reads the device once."""
    values = counts.tolist()
    classes = (len(values) - 4) // 2
    ints = [int(v) for v in values[1:]]
    return EvalSums(values[0], ints[0], ints[1], ints[2], tuple(ints[3:3 + classes]), tuple(ints[3 + classes:]))


def score_batch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """Sums for one batch (see batch_counts)."""
    return sums_of(batch_counts(model, images, labels))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu",
             autocast_dtype: torch.dtype | None = None) -> EvalSums:
    """This worker's sums over `batches` of {"image", "label"}; call .all_reduce() for the total.

    The counts add up on the device and are read once, at the end: no step waits for the device.
    """
    was_training = model.training
    model.eval()
    total = None
    for batch in batches:
        counts = batch_counts(model, batch["image"].to(device, non_blocking=True),
                              batch["label"].to(device, non_blocking=True), autocast_dtype)
        total = counts if total is None else total + counts
    model.train(was_training)
    return sums_of(total) if total is not None else EvalSums()


# --- the evaluation job: a model over a whole split, centre crop and §4.1's ten crops, on Ray ------------

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
    square = (stages.resize_center(whole, size=resize_size)["image"] if whole["image"]
              else np.empty((0, resize_size, resize_size, 3), np.uint8))
    return {"image": centre["image"], "square": square, "label": np.asarray(centre["label"], np.int64),
            "failed": centre["failed"]}


def _read_eval_units(batch: dict[str, np.ndarray], *, source, split: str, resize_size: int, crop_size: int,
                     report) -> Iterator[dict[str, Any]]:
    """One Ray Data task: read units of the split, in file order, as blocks of EVAL_CHUNK images' views."""
    for unit in batch["id"]:
        rows = sources.read_unit(source, split, int(unit), seed=0, epoch=0, shuffle=False)
        for start in range(0, len(rows["label"]), EVAL_CHUNK):
            views = eval_views({k: v[start:start + EVAL_CHUNK] for k, v in rows.items()},
                               resize_size=resize_size, crop_size=crop_size)
            failed = views.pop("failed")
            if failed:
                report.add.remote(failed)
            if len(views["label"]):
                yield views


class _Scorer:
    """A Ray Data actor holding the model: a block of views -> one row of sums per view."""

    def __init__(self, state_ref: list, crop_size: int, use_gpu: bool):
        import ray

        from pipeline import checkpoint

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
            row.update({f"loss{suffix}": [sums.loss], f"correct1{suffix}": [sums.correct1],
                        f"correct5{suffix}": [sums.correct5], f"images{suffix}": [sums.images]})
        return row


def evaluate_split(state: dict[str, Any], source, *, split: str = "val", use_gpu: bool = False, actors: int = 0,
                   batch_size: int = EVAL_CHUNK) -> dict[str, Any]:
    """A checkpoint's model over a whole split, on Ray: read tasks decode (CPU), actors score (GPU with
    use_gpu), and the driver adds up the counts, so the accuracies are exact over every image.

    Returns val_top1/top5/loss (centre crop), the same with _10crop (§4.1: four corners and the centre of
    the resized square, and their mirror images, softmax averaged), the image count and the images that
    could not be decoded ({key: reason}; left out of every number, never replaced).
    """
    import ray
    import ray.data

    from pipeline.data import DecodeFailures

    cfg = state["config"]
    resize_size, crop_size = cfg["resize_size"], cfg["crop_size"]
    report = DecodeFailures.remote()
    units = sources.num_units(source, split)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu and not gpus:
        raise ValueError("--use-gpu was given but the Ray cluster has no GPU; leave it out to evaluate on CPUs")
    # On CPUs Ray Data fuses the read into the actors (same resources): each actor reads, decodes and
    # scores whole read units, so the actors are the parallelism (one per unit at most), and one CPU is
    # left for everything else. With GPUs the read runs as CPU tasks and the actors only score.
    actors = actors or (gpus if use_gpu else max(1, min(units, int(ray.cluster_resources().get("CPU", 1)) - 1)))
    read = partial(_read_eval_units, source=source, split=split, resize_size=resize_size, crop_size=crop_size,
                   report=report)
    rows = (ray.data.range(units, override_num_blocks=units)
            .map_batches(read, batch_size=1, batch_format="numpy")
            # The weights go through the object store once (a list, so that Ray hands the actors the
            # reference and they fetch it themselves).
            .map_batches(_Scorer, fn_constructor_kwargs={"state_ref": [ray.put(state)], "crop_size": crop_size,
                                                         "use_gpu": use_gpu},
                         batch_size=batch_size, batch_format="numpy", concurrency=actors,
                         num_gpus=1 if use_gpu else 0)
            .take_all())
    totals = {k: sum(int(r[k]) if k.startswith(("correct", "images")) else float(r[k]) for r in rows)
              for k in (rows[0] if rows else ())}
    failed = ray.get(report.get.remote())
    if not totals.get("images"):
        raise ValueError(f"no {split} images of {source.uri} could be evaluated ({len(failed)} failed to decode)")
    metrics = {}
    for suffix in ("", TEN_CROP):
        metrics.update({f"val_top1{suffix}": 100.0 * totals[f"correct1{suffix}"] / totals[f"images{suffix}"],
                        f"val_top5{suffix}": 100.0 * totals[f"correct5{suffix}"] / totals[f"images{suffix}"],
                        f"val_loss{suffix}": totals[f"loss{suffix}"] / totals[f"images{suffix}"]})
    return {"metrics": metrics, "images": totals["images"], "correct1": totals["correct1"],
            "correct1_10crop": totals["correct1" + TEN_CROP], "failed": failed}


def check_classes(state: dict[str, Any], source) -> None:
    """The model and the data must number the same classes the same way, or every count is wrong."""
    if state["num_classes"] != source.num_classes:
        raise ValueError(f"the model has {state['num_classes']} classes but {source.uri} has {source.num_classes}: "
                         f"evaluate it on the data it was trained for (or data with the same classes)")
    if state["classes"] and source.wnids and list(state["classes"]) != list(source.wnids):
        first = next(i for i, (a, b) in enumerate(zip(state["classes"], source.wnids)) if a != b)
        raise ValueError(f"class {first} is {state['classes'][first]} for the model but {source.wnids[first]} in "
                         f"{source.uri}: the label numbering differs, so the accuracies would be meaningless")


def evaluate_model(reference: str, data_uri: str = "", *, use_gpu: bool = False, actors: int = 0,
                   record: bool = True) -> dict[str, Any]:
    """jobs/evaluate.py: the model `reference` names (checkpoint.open_model) on the val split of the data at
    `data_uri` (the generated sample when empty, as for training), recorded on its registered version and
    logged model unless record=False."""
    import mlflow

    from pipeline import checkpoint, registry, runner, sample, tracking

    in_mlflow = reference.startswith(("models:/", "runs:/"))  # a checkpoint path needs no tracking store
    tracking_uri = tracking.resolve_tracking_uri() if in_mlflow else ""
    if in_mlflow:
        mlflow.set_tracking_uri(tracking_uri)
    opened = checkpoint.open_model(reference)
    source = sources.open_source(data_uri or str(sample.ensure_sample_imagenet()),
                                 num_classes=opened.state["num_classes"])
    check_classes(opened.state, source)
    runner.connect_ray()
    result = evaluate_split(opened.state, source, use_gpu=use_gpu, actors=actors)
    recorded = []
    if record and in_mlflow:
        recorded = registry.record_evaluation(opened, result["metrics"], data_uri=source.uri,
                                              data_fingerprint=source.fingerprint, tracking_uri=tracking_uri)
    return {**result, "reference": reference, "data": source.uri, "data_fingerprint": source.fingerprint,
            "epoch": opened.state["epoch"], "recorded": recorded}
