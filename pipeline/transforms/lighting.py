"""§4.1 PCA lighting: the eigen-decomposition of the RGB covariance of the training set.

"We perform PCA on the set of RGB pixel values throughout the ImageNet training set. To each
training image, we add multiples of the found principal components, with magnitudes proportional
to the corresponding eigenvalues times a random variable drawn from a Gaussian with mean zero and
standard deviation 0.1."

device_stages.pca_lighting does the adding; this module finds the components, once, in one Ray Data pass:

    jpeg -> center_crops(size, size) -> per-batch sums of x and x x^T         [CPU tasks]
         -> summed on the driver -> covariance -> eigh -> Lighting            [a few floats]

Pixels are scaled to [0, 1] before the sums because that is the scale device_stages.pca_lighting adds its
shift to (after to_float, before normalize); an eigenvalue found on 0..255 pixels would be 255^2
times too large there. A covariance is a sum of moments, so the pass is one map and one tiny
reduction, whatever the number of images.

Each image is reduced to the central size x size square that training crops from (§2), at
size=64 instead of 256. Every image then weighs the same (size^2 pixels), as in training, and the
decoder does most of the shrinking for free (decode.decode_image's DCT scaling: libjpeg decodes an
ImageNet JPEG at 1/4 scale when the shorter side only has to reach 64). Averaging neighbouring
pixels keeps the direction of the colour components and most of their size. Measured with this
module on the two natural photos shipped with scikit-learn (china.jpg, flower.jpg, 640x427),
64 px against the 256 px that training sees:
    first eigenvector:  0.4 (china) and 1.3 (flower) degrees apart; its eigenvalue 5% smaller
    second and third:   15-27% smaller eigenvalues, < 2 degrees apart (fine detail carries more of them)
The first component holds 88-97% of the variance there, and the other two move a pixel by ~0.002
(alpha std 0.1 times eigenvalue ~0.02), so the lighting noise barely changes; pass size=256 for the
training-view statistics at several times the decode cost. tests/test_lighting.py measures it again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from pipeline.transforms import constants, stages

if TYPE_CHECKING:
    import ray.data

# Images per map task: ~7 MB of JPEG at ImageNet's ~110 KB average; sums, so any size is correct.
BATCH_SIZE = 64
# A sample over-draws by this many standard deviations of the binomial count, so that one pass
# almost always (P(short) ~ 3e-7) yields enough images; a short draw is redone with a wider net.
OVERDRAW_SIGMAS = 5.0


@dataclass(frozen=True)
class Lighting:
    """The §4.1 PCA of RGB pixel values in [0, 1]: what device_stages.pca_lighting takes, and where it came from."""

    eigval: tuple[float, ...]  # 3, descending; variances along eigvec's columns
    eigvec: tuple[tuple[float, ...], ...]  # 3x3 rows; COLUMNS are the eigenvectors
    mean: tuple[float, ...]  # 3: per-channel pixel mean, [0, 1]
    std: tuple[float, ...]  # 3: per-channel pixel std, [0, 1]
    images: int  # images the statistics were computed on
    pixels: int  # pixels summed over (images x size^2)
    source: str  # "imagenet-constants" or "data: ..."

    def __post_init__(self):
        for name, want in (("eigval", (3,)), ("eigvec", (3, 3)), ("mean", (3,)), ("std", (3,))):
            got = np.shape(getattr(self, name))
            if got != want:
                raise ValueError(f"Lighting.{name} must have shape {want}, got {got}")

    def to_dict(self) -> dict:
        """Plain lists, ints and a string: json.dumps and mlflow.log_dict take it as it is."""
        return {
            "eigval": list(self.eigval),
            "eigvec": [list(row) for row in self.eigvec],
            "mean": list(self.mean),
            "std": list(self.std),
            "images": self.images,
            "pixels": self.pixels,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Lighting:
        fields = {"eigval", "eigvec", "mean", "std", "images", "pixels", "source"}
        if set(d) != fields:
            raise ValueError(f"a Lighting dict has the keys {sorted(fields)}, got {sorted(d)}")
        return cls(
            eigval=_floats(d["eigval"]),
            eigvec=tuple(_floats(row) for row in d["eigvec"]),
            mean=_floats(d["mean"]),
            std=_floats(d["std"]),
            images=int(d["images"]),
            pixels=int(d["pixels"]),
            source=str(d["source"]),
        )


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)  # three, one per RGB channel: __post_init__ checks


# fb.resnet.torch's constants, "computed from a random subset of ImageNet training images", and
# torchvision's normalisation mean/std. They do not come from one computation: the eigenvalues sum
# to 0.241 (the total pixel variance), the squared stds to 0.153; a Lighting from data agrees with
# itself (sum(eigval) == sum(std^2)).
IMAGENET = Lighting(
    eigval=constants.IMAGENET_EIGVAL,
    eigvec=constants.IMAGENET_EIGVEC,
    mean=constants.IMAGENET_MEAN,
    std=constants.IMAGENET_STD,
    images=0,
    pixels=0,
    source="imagenet-constants",
)


def _image_moments(batch: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image: sum of x (N, 3) and of x x^T (N, 3, 3) over its size x size pixels, x in [0, 1]."""
    keys = [str(k) for k in batch.get("key", batch.get("path", ["?"] * len(batch["jpeg"])))]
    images = stages.center_crops({"jpeg": batch["jpeg"], "key": keys}, resize_size=size, crop_size=size)["image"]
    x = images.reshape(len(images), -1, 3).astype(np.float64)  # (N, P, 3), 0..255
    # Integer-valued float64 sums are exact (P * 255^2 << 2^53); scale to [0, 1] once at the end.
    total = x.sum(axis=1) / 255.0  # (N, 3)
    outer = (x.transpose(0, 2, 1) @ x) / 255.0**2  # (N, 3, 3)
    return total, outer


def pixel_moments(batch: dict, *, size: int = 64) -> dict:
    """§4.1 PCA lighting, the map: moments of the RGB values of a batch of images, as ONE row.

    Reads `jpeg` (encoded bytes; `key` or `path`, if present, names a file that fails to decode);
    writes {n: [pixels], images: [count], sum: [(3,)], outer: [(3, 3)]}, float64, pixels x in [0, 1]
    of the central size x size square of each image (resize_center). Undecodable images raise
    stages.DecodeError: the caller's data is already clean.
    """
    total, outer = _image_moments(batch, size)
    count = len(total)
    return {
        "n": np.array([count * size * size], dtype=np.int64),
        "images": np.array([count], dtype=np.int64),
        "sum": total.sum(axis=0)[None],  # (1, 3)
        "outer": outer.sum(axis=0)[None],  # (1, 3, 3)
    }


def sample_order(data: bytes, seed: int) -> int:
    """An image's place in the seed's random order: a keyed 64-bit hash of its bytes.

    A function of the image alone (not of blocks, batches or order), so a sample is the same
    however Ray splits the data; distinct images get independent uniform places, so the `sample`
    lowest are a uniform random sample without replacement. Byte-identical duplicates share a
    place, and are interchangeable.
    """
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big")


def _sampled_image_moments(batch: dict, *, size: int, seed: int, below: int) -> dict:
    """Per-image moments rows, only for the images whose sample_order is below `below` (of 2^64)."""
    order = np.array([sample_order(bytes(data), seed) for data in batch["jpeg"]], dtype=np.uint64)
    keep = np.flatnonzero(order < np.uint64(below)) if below < 2**64 else np.arange(len(order))
    kept = {"jpeg": [batch["jpeg"][i] for i in keep]}
    if "key" in batch or "path" in batch:
        keys = batch["key"] if "key" in batch else batch["path"]
        kept["key"] = [keys[i] for i in keep]
    total, outer = _image_moments(kept, size)
    return {"order": order[keep], "sum": total.reshape(-1, 3), "outer": outer.reshape(-1, 3, 3)}


def lighting_from_moments(n: int, images: int, total: np.ndarray, outer: np.ndarray, *, source: str) -> Lighting:
    """§4.1: the principal components of RGB values from their moments over n pixels.

    total: sum of x (3,); outer: sum of x x^T (3, 3); x in [0, 1]. Eigenvalues come out descending;
    each eigenvector's sign is fixed so its largest-magnitude component is negative, which matches
    fb.resnet.torch's first and third columns (its second has the other sign; alpha ~ N(0, s) is
    symmetric, so a sign never changes the augmentation, only makes the numbers reproducible).
    """
    total = np.asarray(total, dtype=np.float64)
    outer = np.asarray(outer, dtype=np.float64).reshape(-1)
    if n <= 0:
        raise ValueError(f"need at least one pixel, got n={n}")
    if total.shape != (3,) or outer.shape != (9,):
        raise ValueError(f"expected total (3,) and outer (3, 3), got {total.shape} and {outer.shape}")
    mean = total / n
    cov = outer.reshape(3, 3) / n - np.outer(mean, mean)
    cov = (cov + cov.T) / 2  # exact symmetry for eigh
    eigval, eigvec = np.linalg.eigh(cov)  # ascending; columns are eigenvectors
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    largest = eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(3)]
    eigvec = eigvec * -np.sign(largest)
    return Lighting(
        eigval=_floats(eigval),
        eigvec=tuple(_floats(row) for row in eigvec),
        mean=_floats(mean),
        std=_floats(np.sqrt(np.clip(np.diag(cov), 0.0, None))),
        images=int(images),
        pixels=int(n),
        source=source,
    )


def compute_lighting(
    ds: ray.data.Dataset, *, sample: int | None = None, size: int = 64, seed: int = 0, total_images: int | None = None
) -> Lighting:
    """§4.1: the PCA of RGB values over the images in `ds` (a `jpeg` column), all or a sample.

    sample=None: one pass over every image. sample=k: EXACTLY k images (all of them if ds has
    fewer), a uniform random sample without replacement chosen by `seed`: the k images with the
    lowest sample_order(bytes, seed). One pass hashes every image's bytes (cheap next to reading
    them) and decodes only those below a threshold set to let through k + 5 sqrt(k) images in
    expectation; the driver keeps the k lowest of those. If fewer came through (P ~ 3e-7, or a
    total_images that was too large), the pass is redone with a wider threshold; the answer is the
    same k images either way. The same seed gives the same images on any cluster; a different seed,
    another sample. (ds.random_sample would be cheaper to write but draws each row independently,
    so it returns only about k images.)

    total_images: the number of rows in ds, for the threshold and the `source` text; without it the
    sample path calls ds.count(), which may have to read the data. A sample trusts it (a wrong one
    costs passes, not correctness, and is repeated in `source`); a pass that sees every image counts
    for itself and refuses a total_images that disagrees.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if sample is not None and sample < 1:
        raise ValueError(f"sample must be a positive number of images or None for all, got {sample}")

    if sample is None:
        n, images, total, outer = 0, 0, np.zeros(3), np.zeros((3, 3))
        moments = ds.map_batches(partial(pixel_moments, size=size), batch_size=BATCH_SIZE, batch_format="numpy")
        for rows in moments.iter_batches(batch_size=None, batch_format="numpy"):
            n += int(rows["n"].sum())
            images += int(rows["images"].sum())
            total += rows["sum"].reshape(-1, 3).sum(axis=0)
            outer += rows["outer"].reshape(-1, 3, 3).sum(axis=0)
        if images == 0:
            raise ValueError("the dataset has no images")
        if total_images is not None and total_images != images:
            raise ValueError(f"total_images={total_images}, but the dataset has {images} images")
        return lighting_from_moments(n, images, total, outer, source=f"data: all {images} images at {size} px")

    rows_in_ds = ds.count() if total_images is None else total_images
    if rows_in_ds < 1:
        raise ValueError(f"the dataset has no images (total_images={total_images})")
    expected = sample + OVERDRAW_SIGMAS * math.sqrt(sample) + 5  # images let through, on average
    while True:
        fraction = min(1.0, expected / rows_in_ds)
        below = 2**64 if fraction >= 1.0 else int(fraction * 2**64)
        fn = partial(_sampled_image_moments, size=size, seed=seed, below=below)
        rows = ds.map_batches(fn, batch_size=BATCH_SIZE, batch_format="numpy").take_all()
        if len(rows) >= sample or below == 2**64:
            break
        expected *= 2
    if below == 2**64:  # every image came through: a true count
        if not rows:
            raise ValueError("the dataset has no images")
        if total_images is not None and total_images != len(rows):
            raise ValueError(f"total_images={total_images}, but the dataset has {len(rows)} images")
        rows_in_ds = len(rows)
    # The k lowest places. A tie is two byte-identical images (or a 2^-64 hash collision), whose
    # moments are the same, so which of them is kept does not change the sums.
    rows = sorted(rows, key=lambda r: int(r["order"]))[:sample]
    total = np.sum([r["sum"] for r in rows], axis=0)
    outer = np.sum([r["outer"] for r in rows], axis=0)
    source = f"data: {len(rows)} of {rows_in_ds} images at {size} px (sample seed {seed})"
    return lighting_from_moments(len(rows) * size * size, len(rows), total, outer, source=source)
