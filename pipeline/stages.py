"""The data pipeline as a list of stages, each a pure function of a batch (and a random generator).

A batch is a dict of columns. Two families:

  on the CPU, in Ray Data (NumPy, uint8 pixels, so crops travel small through the object store)
    decode            jpeg (bytes)            -> image (list of HxWx3 uint8)
    resize_center     image (list)            -> image (N, S, S, 3)        §2: shorter side 256, central crop
    random_crop_flip  image (N, S, S, 3), rng -> image (N, C, C, 3)        §4.1: random crops + reflections
    center_crop       image (N, S, S, 3)      -> image (N, C, C, 3)        evaluation
    ten_crop          image (N, S, S, 3)      -> image (N, 10, C, C, 3)    §4.1: test-time 10 patches

  on the trainer's device, late (torch, float)
    to_float          (N, H, W, 3) uint8      -> (N, 3, H, W) float in [0, 1]
    pca_lighting      (N, 3, H, W), generator -> same                     §4.1: lighting noise
    normalize         (N, 3, H, W)            -> same                     subtract the mean, divide by std

Every function is vectorised over the batch except decode and resize (one image at a time is the
nature of JPEG); randomness comes only from the generator passed in.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image

Batch = dict[str, Any]

# fb.resnet.torch's ImageNet PCA (pixels scaled to [0, 1]); the eigenvectors are columns.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodeError(ValueError):
    """An image that cannot be decoded; names the file so it can be reported, never replaced."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"cannot decode {key!r}: {reason}")
        self.key = key
        self.reason = reason


def decode_one(data: bytes, *, key: str = "?", min_size: int | None = None) -> np.ndarray:
    """JPEG (incl. grayscale and CMYK) or PNG bytes -> (H, W, 3) uint8 RGB.

    min_size: let libjpeg decode at a reduced scale (1/2, 1/4, 1/8) as long as the shorter side
    stays >= min_size; it is the resize that follows anyway, done for free inside the decoder.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if min_size is not None and img.format == "JPEG":
            scale = min(img.size) / min_size
            img.draft(img.mode, (math.ceil(img.size[0] / scale), math.ceil(img.size[1] / scale)))
        img = img.convert("RGB")  # CMYK and grayscale ImageNet files become RGB here
    except Exception as e:  # PIL raises many types for bad bytes; all mean "not an image"
        raise DecodeError(key, f"{type(e).__name__}: {e}") from None
    return np.asarray(img)


def decode(batch: Batch, *, min_size: int | None = None, errors: str = "raise") -> Batch:
    """Reads `jpeg` (encoded bytes) and `key`; writes `image`, a list of (H, W, 3) uint8 arrays.

    errors="raise": the first undecodable image raises DecodeError naming it. errors="collect": the
    rows that do not decode are removed from every column and named in `failed` ({key: reason}).
    """
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    keys = batch.get("key", ["?"] * len(batch["jpeg"]))
    images, good, failed = [], [], {}
    for i, (data, key) in enumerate(zip(batch["jpeg"], keys)):
        try:
            images.append(decode_one(data, key=str(key), min_size=min_size))
            good.append(i)
        except DecodeError as e:
            if errors == "raise":
                raise
            failed[str(key)] = e.reason
    if failed:
        batch = {k: _take(v, good) for k, v in batch.items()}
    out = {**batch, "image": images}
    if errors == "collect":
        out["failed"] = failed
    return out


def _take(column: Any, rows: list[int]) -> Any:
    return column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows]


def resize_center(batch: Batch, *, size: int = 256) -> Batch:
    """§2: rescale each `image` so its shorter side is `size`, keep the central size x size patch.

    Writes `image` as one (N, size, size, 3) uint8 array.
    """
    out = np.empty((len(batch["image"]), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(batch["image"]):
        h, w = image.shape[:2]
        scale = size / min(h, w)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        resized = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        out[i] = np.asarray(resized)[top:top + size, left:left + size]
    return {**batch, "image": out}


def random_crop_flip(batch: Batch, rng: np.random.Generator, *, size: int = 224, flip_p: float = 0.5) -> Batch:
    """§4.1: a random size x size patch of each image, mirrored left-right with probability flip_p.

    Reads and writes `image` (N, S, S, 3) -> (N, size, size, 3); one gather does crop and flip.
    """
    images = batch["image"]
    n, h, w, _ = images.shape
    top = rng.integers(0, h - size + 1, n)
    left = rng.integers(0, w - size + 1, n)
    flip = rng.random(n) < flip_p
    steps = np.arange(size)
    rows = top[:, None] + steps                                         # (N, size)
    cols = np.where(flip[:, None], left[:, None] + size - 1 - steps, left[:, None] + steps)
    out = images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return {**batch, "image": out}


def center_crop(batch: Batch, *, size: int = 224) -> Batch:
    """The central size x size patch of each `image`."""
    images = batch["image"]
    h, w = images.shape[1:3]
    top, left = (h - size) // 2, (w - size) // 2
    return {**batch, "image": np.ascontiguousarray(images[:, top:top + size, left:left + size])}


def ten_crop(batch: Batch, *, size: int = 224) -> Batch:
    """§4.1 test time: the four corner patches, the centre patch, and their reflections.

    Reads `image` (N, S, S, 3); writes `image` (N, 10, size, size, 3).
    """
    images = batch["image"]
    h, w = images.shape[1:3]
    origins = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = [images[:, t:t + size, l:l + size] for t, l in origins]
    crops += [c[:, :, ::-1] for c in crops]
    return {**batch, "image": np.stack(crops, axis=1)}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1], on the images' device."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def pca_lighting(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    std: float = 0.1,
    eigval: tuple[float, ...] = IMAGENET_EIGVAL,
    eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC,
) -> torch.Tensor:
    """§4.1 lighting: add eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, std) per image.

    The eigen-decomposition is of the RGB covariance of the training set (pixels in [0, 1]).
    `generator` is a CPU generator: alpha is drawn there, so a seed gives the same noise on any device.
    """
    if std == 0:
        return images
    alpha = torch.randn(images.shape[0], 3, generator=generator) * std
    rgb = (alpha * torch.tensor(eigval)) @ torch.tensor(eigvec).T    # (N, 3): eigvec @ (alpha * eigval)
    return images + rgb.to(images.device, images.dtype)[:, :, None, None]


def normalize(
    images: torch.Tensor, *, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Subtract the per-channel mean and divide by the per-channel std; (N, 3, H, W)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean_t) / std_t
