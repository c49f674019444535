"""A small, learnable stand-in for ImageNet, generated in its folder layout.

    root/train/<wnid>/<wnid>_<n>.JPEG
    root/val/<wnid>/ILSVRC2012_val_<8-digit index>.JPEG      index runs 00000001.. over the split

Ten classes, each recognisable by shape or texture rather than colour (colours are random per
image, foreground and background always contrasting):

    0 filled circle   1 square              2 triangle (apex up)   3 horizontal stripes
    4 vertical stripes 5 diagonal stripes   6 checkerboard          7 ring
    8 plus             9 scattered dots

Every pattern is its own class under a horizontal flip (§4.1 reflections), and the shapes sit in
the central square of the image, so the resize + central crop + random 87% crop of the sample
preset keeps most of each shape. Like the real set, sizes and aspect ratios vary, and each split
holds some grayscale ("L") and CMYK JPEGs that the decoder must turn into RGB.

generate_photo_imagenet writes a second kind of stand-in, for measuring rather than learning:
photo-like JPEGs (1/f noise like natural images, a few hard-edged objects, sensor grain) that
compress like photographs, about 90-100 KB at 500x375 and quality 90, where flat colours would be
a few KB and decode several times faster than real data.

NumPy and PIL only: the job imports this before Ray or MLflow start.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Real ILSVRC-2012 wnids (tench, goldfish, great white shark, tiger shark, hammerhead, electric
# ray, stingray, cock, hen, ostrich), sorted, as the class index order of the real set is.
SAMPLE_WNIDS: tuple[str, ...] = (
    "n01440764",
    "n01443537",
    "n01484850",
    "n01491361",
    "n01494475",
    "n01496331",
    "n01498041",
    "n01514668",
    "n01514859",
    "n01518878",
)
PATTERNS = ("circle", "square", "triangle", "hstripes", "vstripes", "dstripes", "checker", "ring", "plus", "dots")
# Bumped when the drawing changes, so a cached sample drawn by older code is regenerated.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
# About 1 image in 100 of each odd mode per split, and at least one of each.
ODD_MODE_FRACTION = 0.01
_SPLIT_IDS = {"train": 0, "val": 1}


def generate_sample_imagenet(
    root: str | os.PathLike,
    *,
    num_classes: int = 10,
    train_per_class: int = 260,
    val_per_class: int = 50,
    seed: int = 0,
) -> Path:
    """Write the sample into `root` (created if needed) and return it as a Path.

    Deterministic: the same arguments give byte-identical files. Each image draws from its own
    generator seeded by (seed, split, class, n), so changing the counts leaves the other images as
    they were.
    """
    if not 1 <= num_classes <= len(SAMPLE_WNIDS):
        raise ValueError(f"num_classes must be 1..{len(SAMPLE_WNIDS)}, got {num_classes}")
    for name, per_class in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        # Two images per split at least: one grayscale and one CMYK are always written.
        if per_class < 1 or num_classes * per_class < 2:
            raise ValueError(
                f"{name} must be >= 1 and give a split of >= 2 images, got {per_class} with num_classes={num_classes}"
            )

    root = Path(root)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        total = num_classes * per_class
        split_rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
        n_odd = max(1, round(total * ODD_MODE_FRACTION))
        odd = split_rng.choice(total, 2 * n_odd, replace=False)
        modes = {int(i): "L" for i in odd[:n_odd]} | {int(i): "CMYK" for i in odd[n_odd:]}

        for label, wnid in enumerate(SAMPLE_WNIDS[:num_classes]):
            class_dir = root / split / wnid
            class_dir.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                index = label * per_class + n  # position in the split, class-major
                name = f"{wnid}_{n + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{index + 1:08d}.JPEG"
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], label, n])
                image = Image.fromarray(draw_image(label, rng))
                mode = modes.get(index, "RGB")
                if mode != "RGB":
                    image = image.convert(mode)
                image.save(class_dir / name, "JPEG", quality=JPEG_QUALITY)
    return root


def draw_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 picture of class `label`'s pattern, its size, colours and place from rng."""
    short = int(rng.integers(80, 181))
    long = min(220, round(short * rng.uniform(1.0, 1.6)))
    h, w = (short, long) if rng.random() < 0.5 else (long, short)

    # Inside the central short x short square, which the resize + centre crop keeps: the centre
    # within +-10% of it and a radius of 18-35% (diameter 36-70%) keep the shape inside 45% of it.
    cy = h / 2 + rng.uniform(-0.1, 0.1) * short
    cx = w / 2 + rng.uniform(-0.1, 0.1) * short
    r = rng.uniform(0.18, 0.35) * short
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    mask = np.broadcast_to(_pattern_mask(PATTERNS[label], yy - cy, xx - cx, r, short, rng), (h, w))

    # Every channel of one colour low and of the other high: the pattern keeps its contrast in any
    # hue and after conversion to grayscale.
    dark, light = rng.uniform(0, 100, 3), rng.uniform(155, 255, 3)
    fg, bg = (dark, light) if rng.random() < 0.5 else (light, dark)
    image = np.where(mask[..., None], fg, bg).astype(np.float32)

    # A gentle linear gradient in a random direction and pixel noise, so no pixel value is a tell.
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx - w / 2) + np.sin(angle) * (yy - h / 2)) / short  # about -0.7..0.7
    image += (ramp * rng.uniform(0, 40))[..., None]
    image += rng.normal(0, rng.uniform(2, 10), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _pattern_mask(
    pattern: str, dy: np.ndarray, dx: np.ndarray, r: float, short: int, rng: np.random.Generator
) -> np.ndarray:
    """Boolean (H, W) foreground of a pattern; dy, dx are (H, 1), (1, W) offsets from the centre.

    Shapes use the centre and radius r; textures fill the whole image (any crop keeps them) with a
    period of 1/8 to 1/4 of the shorter side (at least 8 px once the sample preset scales 80 px up).
    """
    period = short / rng.uniform(4, 8)
    phase = rng.uniform(0, period)
    if pattern == "circle":
        return dx**2 + dy**2 < r**2
    if pattern == "square":
        half = 0.85 * r  # about the area of the circle
        return (np.abs(dx) < half) & (np.abs(dy) < half)
    if pattern == "triangle":
        # Apex at (0, -r), base from (-1.1 r, r) to (1.1 r, r): symmetric about the vertical axis.
        return (np.abs(dy) < r) & (np.abs(dx) < 0.55 * (dy + r))
    if pattern == "ring":
        inner = r * rng.uniform(0.5, 0.7)  # a hole wide enough to tell from a disc at 64 px
        d2 = dx**2 + dy**2
        return (d2 < r**2) & (d2 > inner**2)
    if pattern == "plus":
        arm = r * rng.uniform(0.18, 0.28)  # thin enough to tell from a square at 64 px
        return ((np.abs(dx) < arm) & (np.abs(dy) < r)) | ((np.abs(dy) < arm) & (np.abs(dx) < r))
    if pattern == "hstripes":
        return (dy + phase) % period < period / 2  # (H, 1): the caller broadcasts
    if pattern == "vstripes":
        return (dx + phase) % period < period / 2
    if pattern == "dstripes":
        # Either diagonal: a flip turns one into the other, so the class holds both.
        sign = 1 if rng.random() < 0.5 else -1
        return ((dx + sign * dy) / np.sqrt(2) + phase) % period < period / 2
    if pattern == "checker":
        return ((dx + phase) // (period / 2) + (dy + phase) // (period / 2)) % 2 == 0
    if pattern == "dots":
        # Dots of radius 1/20-1/12 of the shorter side at random places over the whole image.
        h, w = dy.shape[0], dx.shape[1]
        dot_r = short * rng.uniform(1 / 20, 1 / 12)
        mask = np.zeros((h, w), dtype=bool)
        for y, x in zip(rng.uniform(-h / 2, h / 2, 24), rng.uniform(-w / 2, w / 2, 24)):
            mask |= (dx - x) ** 2 + (dy - y) ** 2 < dot_r**2
        return mask
    raise AssertionError(f"no drawing for pattern {pattern!r}")


def default_sample_dir() -> Path:
    """$ALEXNET_SAMPLE_DIR if set, else ~/.cache/alexnet-ray/sample-v1."""
    env = os.environ.get("ALEXNET_SAMPLE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "alexnet-ray" / "sample-v1"


def ensure_sample_imagenet(root: str | os.PathLike | None = None, **kwargs) -> Path:
    """The sample at `root` (default_sample_dir() if None), generated once and then reused.

    kwargs are generate_sample_imagenet's. root/.complete holds the parameters as JSON; it is
    there only when the dataset is whole, because generation happens in a temporary sibling that
    is renamed into place in one step. Concurrent callers therefore see either nothing or a whole
    dataset; whoever loses the rename uses the winner's copy.
    """
    root = Path(root) if root is not None else default_sample_dir()
    bound = inspect.signature(generate_sample_imagenet).bind(root, **kwargs)  # TypeError on a wrong name
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k != "root"}
    params["generator_version"] = GENERATOR_VERSION
    if _complete_params(root) == params:
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        generate_sample_imagenet(tmp, **bound.kwargs)
        (tmp / ".complete").write_text(json.dumps(params, sort_keys=True) + "\n")
        if _complete_params(root) == params:  # another process finished while we generated
            return root
        _discard_stale(root)
        try:
            os.rename(tmp, root)  # atomic; replaces an empty directory, fails on a non-empty one
        except OSError:
            if _complete_params(root) == params:  # another process finished first: use theirs
                return root
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _complete_params(root: Path) -> dict | None:
    try:
        return json.loads((root / ".complete").read_text())
    except (OSError, ValueError):
        return None


def _discard_stale(root: Path) -> None:
    """Remove a sample generated with other parameters; refuse to touch a folder that is not one."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    if _complete_params(root) is None:
        raise FileExistsError(
            f"{str(root)!r} exists and is not a generated sample (no .complete); choose another folder or remove it"
        )
    # Renamed aside first, so no reader finds a half-deleted dataset under the real name.
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
    try:
        os.rename(root, trash / root.name)
    except FileNotFoundError:
        pass  # another process moved it already
    shutil.rmtree(trash, ignore_errors=True)


# --- photo-like images, for benchmarks --------------------------------------------------------------


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """An (H, W, 3) uint8 image with the statistics that make photos cost what they cost to decode:
    a 1/f luminance field (natural images' power spectrum), smoother colour, hard-edged shapes in
    front, and grain."""

    def noise(beta: float) -> np.ndarray:  # unit-variance noise with a 1/f^beta amplitude spectrum
        fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
        f = np.hypot(fx, fy)
        f[0, 0] = 1.0
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**beta
        spectrum[0, 0] = 0.0
        x = np.fft.irfft2(spectrum, s=(height, width))
        return (x / x.std()).astype(np.float32)

    luminance = noise(1.0) * 38 + rng.uniform(90, 160)
    chroma = np.stack([noise(1.6), noise(1.6)], axis=-1) * 18
    image = luminance[..., None] + chroma @ np.array([[1.0, -0.3, -0.7], [-0.4, -0.3, 1.0]], np.float32)
    picture = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = (x0, y0, x0 + rng.uniform(20, width / 2), y0 + rng.uniform(20, height / 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    out = np.asarray(picture, np.float32) + noise(0.5)[..., None] * 5 + rng.normal(0, 3, (height, width, 3))
    return out.clip(0, 255).astype(np.uint8)


def generate_photo_imagenet(
    root: str | os.PathLike,
    *,
    images: int = 1500,
    num_classes: int = 10,
    val_fraction: float = 0.1,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    processes: int | None = None,
) -> Path:
    """`images` photo-like JPEGs of `size` (width, height) in ImageNet layout under root, split
    train / val by val_fraction across num_classes; deterministic, and skips files already there
    (so a large set can be generated in several goes). Uses `processes` CPU cores (default all)."""
    root = Path(root)
    n_val = max(num_classes, round(images * val_fraction))
    jobs = []
    for i in range(images):
        split, n = ("val", i - (images - n_val)) if i >= images - n_val else ("train", i)
        wnid = SAMPLE_WNIDS[i % num_classes] if num_classes <= len(SAMPLE_WNIDS) else f"n{i % num_classes:08d}"
        name = f"{wnid}_{n + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{n + 1:08d}.JPEG"
        path = root / split / wnid / name
        if not path.exists():
            jobs.append((str(path), seed, i, size, quality))
    for split in ("train", "val"):
        for c in range(num_classes):
            wnid = SAMPLE_WNIDS[c] if num_classes <= len(SAMPLE_WNIDS) else f"n{c:08d}"
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
    if jobs:
        with ProcessPoolExecutor(processes or os.cpu_count()) as pool:
            list(pool.map(_write_photo, jobs, chunksize=16))
    return root


def _write_photo(job: tuple) -> None:
    path, seed, index, (width, height), quality = job
    image = Image.fromarray(photo_like(np.random.default_rng([seed, index]), width, height))
    tmp = f"{path}.tmp"
    image.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)  # a killed run leaves no half-written JPEG under the real name
