"""Top-1 / top-5 from summed counts, exact across any number of workers.

Each worker returns sums (loss, correct@1, correct@5, images); the sums are all-reduced and only
then divided, so the result is the accuracy over the whole validation set, not a mean of means.

    batch_counts         one batch, one crop or §4.1's ten (softmax averaged), counted on the device without
                         the host waiting for it (index_add_, not bincount or a boolean mask)
    validate             a training worker's validation pass, read from the device once
    EvalSums             the sums, all-reduced across workers, and the metrics they give

The evaluation job (a saved model over a whole split, ten crops) is experiments/evaluation.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.transforms import device_stages


@dataclass
class EvalSums:
    loss: float = 0.0
    correct1: int = 0
    correct5: int = 0
    images: int = 0
    # Per class (index = label): images seen and top-1 hits; empty until a batch has been scored.
    class_images: tuple[int, ...] = ()
    class_correct1: tuple[int, ...] = ()

    def add(self, other: EvalSums) -> EvalSums:
        return EvalSums(
            self.loss + other.loss,
            self.correct1 + other.correct1,
            self.correct5 + other.correct5,
            self.images + other.images,
            _add(self.class_images, other.class_images),
            _add(self.class_correct1, other.class_correct1),
        )

    def all_reduce(self, classes: int = 0, device: torch.device | str = "cpu") -> EvalSums:
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
        images, correct = (
            (list(v) or [0] * classes) if classes else [] for v in (self.class_images, self.class_correct1)
        )
        t = torch.tensor([self.loss, self.correct1, self.correct5, self.images, *images, *correct], dtype=torch.float64)
        t = device_stages.to_device(t, device)
        dist.all_reduce(t)  # float64 counts are exact far beyond ImageNet's 50,000 images
        loss, *rest = t.tolist()
        counts = [int(v) for v in rest]
        return EvalSums(
            loss, counts[0], counts[1], counts[2], tuple(counts[3 : 3 + classes]), tuple(counts[3 + classes :])
        )

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        if self.images == 0:
            raise ValueError(f"no {prefix} images were evaluated")
        return {
            f"{prefix}_loss": self.loss / self.images,
            f"{prefix}_top1": 100.0 * self.correct1 / self.images,  # percent, like torchvision's acc@1
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


def batch_counts(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
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
    head = torch.stack(
        [loss.double(), topk_hits(probs, labels, 1).double(), topk_hits(probs, labels, 5).double(), ones.sum()]
    )
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
    return EvalSums(values[0], ints[0], ints[1], ints[2], tuple(ints[3 : 3 + classes]), tuple(ints[3 + classes :]))


def score_batch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """Sums for one batch (see batch_counts)."""
    return sums_of(batch_counts(model, images, labels))


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> EvalSums:
    """This worker's sums over `batches` of {"image", "label"}; call .all_reduce() for the total.

    The counts add up on the device and are read once, at the end: no step waits for the device.
    """
    was_training = model.training
    model.eval()
    total = None
    for batch in batches:
        counts = batch_counts(
            model,
            batch["image"].to(device, non_blocking=True),
            batch["label"].to(device, non_blocking=True),
            autocast_dtype,
        )
        total = counts if total is None else total + counts
    model.train(was_training)
    return sums_of(total) if total is not None else EvalSums()
