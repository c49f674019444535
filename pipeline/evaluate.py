"""Top-1 / top-5 from summed counts, exact across any number of workers.

Each worker returns sums (loss, correct@1, correct@5, images); the sums are all-reduced and only
then divided, so the result is the accuracy over the whole validation set, not a mean of means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import device_stages


@dataclass
class EvalSums:
    loss: float = 0.0
    correct1: int = 0
    correct5: int = 0
    images: int = 0

    def add(self, other: "EvalSums") -> "EvalSums":
        return EvalSums(self.loss + other.loss, self.correct1 + other.correct1,
                        self.correct5 + other.correct5, self.images + other.images)

    def all_reduce(self) -> "EvalSums":
        """The sums over every worker of the process group (a no-op without one)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        t = torch.tensor([self.loss, self.correct1, self.correct5, self.images], dtype=torch.float64)
        dist.all_reduce(t)  # float64 counts are exact far beyond ImageNet's 50,000 images
        return EvalSums(t[0].item(), int(t[1].item()), int(t[2].item()), int(t[3].item()))

    def metrics(self, prefix: str = "val") -> dict[str, float]:
        if self.images == 0:
            raise ValueError(f"no {prefix} images were evaluated")
        return {
            f"{prefix}_loss": self.loss / self.images,
            f"{prefix}_top1": 100.0 * self.correct1 / self.images,   # percent, like torchvision's acc@1
            f"{prefix}_top5": 100.0 * self.correct5 / self.images,
        }


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many labels are among the k highest scores (k is capped at the number of classes)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


def score_batch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> EvalSums:
    """Sums for one batch. images: (N, H, W, 3) uint8, or (N, 10, H, W, 3) for ten-crop.

    Ten-crop (§4.1 test time) averages the softmax over the ten patches; the loss is then the
    negative log of that averaged probability.
    """
    crops = images.shape[1] if images.dim() == 5 else 1
    flat = images.reshape(-1, *images.shape[-3:])
    logits = model(device_stages.normalize(device_stages.to_float(flat)))
    probs = logits.float().softmax(dim=1).reshape(len(labels), crops, -1).mean(dim=1)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum")
    return EvalSums(loss.item(), topk_correct(probs, labels, 1), topk_correct(probs, labels, 5), len(labels))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu") -> EvalSums:
    """This worker's sums over `batches` of {"image", "label"}; call .all_reduce() for the total."""
    was_training = model.training
    model.eval()
    sums = EvalSums()
    for batch in batches:
        sums = sums.add(score_batch(model, batch["image"].to(device), batch["label"].to(device)))
    model.train(was_training)
    return sums
