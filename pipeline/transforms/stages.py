"""The CPU stages of the data pipeline: pure functions of a batch (and a random generator).

A batch is a dict of columns. These run in Ray Data's CPU tasks, on NumPy, and keep pixels uint8
so crops travel small through the object store; the float math (lighting, normalisation) happens
later, on the trainer's device (device_stages.py). No torch here: the tasks that run these import
nothing heavier than NumPy, simplejpeg, OpenCV and PIL.

    crop_params     n, rng                      -> top, left, flip (N,)         §4.1: where each crop is, which mirrored
    random_crops    jpeg (bytes), key, rng      -> image (N, C, C, 3)           §2 + §4.1 in one pass per image
    center_crops    jpeg (bytes), key           -> image (N, C, C, 3)           evaluation: the central C x C patch
    decode          jpeg (bytes), key           -> image (list of HxWx3)        whole images
    resize_center   image (list)                -> image (N, S, S, 3)           §2: shorter side S, central square
    ten_crop        image (N, S, S, 3)          -> image (N, 10, C, C, 3)       §4.1: test-time 10 patches

random_crops is the paper's train view, "rescale the shorter side to 256, keep the central 256x256,
take a random 224x224 patch and maybe its mirror image", computed the cheap way round: libjpeg
decodes at 1/2, 1/4 or 1/8 scale when that still leaves the shorter side >= 256, and only the
region of the image that becomes the patch is resized (decode.crop_box / decode.resized_crop). On
the prepared 256-px shards the region is already 224x224 and is sliced, not resampled. The
unfused chain decode -> resize_center -> crop gives the same view within resampling differences;
tests/test_stages.py holds the two side by side.

Decode is per image (the nature of JPEG); everything else is vectorised over the batch, and
randomness comes only from the generator passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.transforms.decode import MAX_PIXELS, DecodeError, crop_box, decode_image, resized_crop

Batch = dict[str, Any]


__all__ = ["DecodeError", "crop_params", "random_crops", "center_crops", "decode", "resize_center", "ten_crop"]


def crop_params(
    n: int, rng: np.random.Generator, *, resize_size: int, crop_size: int, flip_p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """§4.1: for n images, the top-left corner of each crop_size patch, uniform over every position
    inside the central resize_size square, and whether it is mirrored (probability flip_p)."""
    top = rng.integers(0, resize_size - crop_size + 1, n)
    left = rng.integers(0, resize_size - crop_size + 1, n)
    flip = rng.random(n) < flip_p
    return top, left, flip


def random_crops(
    batch: Batch,
    rng: np.random.Generator,
    *,
    resize_size: int = 256,
    crop_size: int = 224,
    flip_p: float = 0.5,
    errors: str = "raise",
    max_pixels: int = MAX_PIXELS,
    keep: np.ndarray | None = None,
) -> Batch:
    """§2 + §4.1, the training view: reads `jpeg` and `key`, writes `image` (N, crop_size, crop_size, 3)
    uint8; a random patch of each image's central square, mirrored with probability flip_p.

    errors: see decode. keep: a mask of the rows to decode; the others are left out (a resumed epoch
    skips what was trained on). The crop draws happen first, for every row: a failed or skipped image
    does not shift the other images' crops.
    """
    top, left, flip = crop_params(len(batch["jpeg"]), rng, resize_size=resize_size, crop_size=crop_size, flip_p=flip_p)
    if keep is not None:
        rows = np.flatnonzero(keep).tolist()
        batch = {k: _take(v, rows) for k, v in batch.items()}
        top, left, flip = top[rows], left[rows], flip[rows]
    return _decode_crops(
        batch, top, left, flip, resize_size=resize_size, crop_size=crop_size, errors=errors, max_pixels=max_pixels
    )


def center_crops(
    batch: Batch, *, resize_size: int = 256, crop_size: int = 224, errors: str = "raise", max_pixels: int = MAX_PIXELS
) -> Batch:
    """The evaluation view: the central crop_size patch of each image's central resize_size square."""
    n = len(batch["jpeg"])
    offset = np.full(n, (resize_size - crop_size) // 2)
    return _decode_crops(
        batch,
        offset,
        offset,
        np.zeros(n, bool),
        resize_size=resize_size,
        crop_size=crop_size,
        errors=errors,
        max_pixels=max_pixels,
    )


def _decode_crops(
    batch: Batch,
    top: np.ndarray,
    left: np.ndarray,
    flip: np.ndarray,
    *,
    resize_size: int,
    crop_size: int,
    errors: str,
    max_pixels: int,
) -> Batch:
    _check_errors(errors)
    keys = _keys(batch)
    out = np.empty((len(keys), crop_size, crop_size, 3), np.uint8)
    good: list[int] = []
    failed: dict[str, str] = {}
    for i, (data, key) in enumerate(zip(batch["jpeg"], keys)):
        try:
            image = decode_image(data, key=key, min_size=resize_size, max_pixels=max_pixels)
        except DecodeError as e:
            if errors == "raise":
                raise
            failed[key] = e.reason
            continue
        box = crop_box(
            *image.shape[:2], resize_size=resize_size, top=int(top[i]), left=int(left[i]), crop_size=crop_size
        )
        resized_crop(image, box, crop_size, bool(flip[i]), out=out[len(good)])
        good.append(i)
    return _with_images(batch, out[: len(good)], good, failed, errors)


def decode(batch: Batch, *, min_size: int | None = None, errors: str = "raise", max_pixels: int = MAX_PIXELS) -> Batch:
    """Reads `jpeg` (encoded bytes) and `key`; writes `image`, a list of (H, W, 3) uint8 arrays.

    errors="raise": the first undecodable image raises DecodeError naming it. errors="collect": the
    rows that do not decode are removed from every column and named in `failed` ({key: reason}).
    """
    _check_errors(errors)
    keys = _keys(batch)
    images, good, failed = [], [], {}
    for i, (data, key) in enumerate(zip(batch["jpeg"], keys)):
        try:
            images.append(decode_image(data, key=key, min_size=min_size, max_pixels=max_pixels))
            good.append(i)
        except DecodeError as e:
            if errors == "raise":
                raise
            failed[key] = e.reason
    return _with_images(batch, images, good, failed, errors)


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")


def _keys(batch: Batch) -> list[str]:
    return [str(k) for k in batch["key"]] if "key" in batch else ["?"] * len(batch["jpeg"])


def _with_images(batch: Batch, images: Any, good: list[int], failed: dict[str, str], errors: str) -> Batch:
    """The batch with `image` added and the failed rows taken out of every other column."""
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
        box = crop_box(*image.shape[:2], resize_size=size, top=0, left=0, crop_size=size)
        resized_crop(image, box, size, False, out=out[i])
    return {**batch, "image": out}


def ten_crop(batch: Batch, *, size: int = 224) -> Batch:
    """§4.1 test time: the four corner patches, the centre patch, and their reflections.

    Reads `image` (N, S, S, 3); writes `image` (N, 10, size, size, 3).
    """
    images = batch["image"]
    h, w = images.shape[1:3]
    origins = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
    crops = [images[:, t : t + size, l : l + size] for t, l in origins]
    crops += [c[:, :, ::-1] for c in crops]
    return {**batch, "image": np.stack(crops, axis=1)}
