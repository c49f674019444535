"""§4.1 PCA lighting statistics: the algebra, the per-batch moments against NumPy, the Ray pass."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.transforms import constants, device_stages, lighting, stages
from pipeline.transforms.lighting import Lighting


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def numpy_lighting(pixels: np.ndarray):
    """The reference: eigh of the covariance of (P, 3) values in [0, 1], descending."""
    cov = np.cov(pixels.T, bias=True)
    eigval, eigvec = np.linalg.eigh(cov)
    return eigval[::-1], eigvec[:, ::-1], pixels.mean(axis=0), np.sqrt(np.diag(cov))


def assert_same_components(L: Lighting, eigval, eigvec, *, rtol: float, atol: float):
    """Eigenvalues equal; eigenvectors equal up to sign (a sign is a convention, tested on its own)."""
    np.testing.assert_allclose(L.eigval, eigval, rtol=rtol)
    got = np.array(L.eigvec)
    signs = np.sign((got * eigvec).sum(axis=0))
    np.testing.assert_allclose(got, eigvec * signs, atol=atol)


def smooth_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Colour gradients plus noise, channels correlated like a photo's (a luminance-heavy spread)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        base = rng.uniform(40, 200, 3)
        light = rng.uniform(-60, 60) * (yy if rng.random() < 0.5 else xx)  # shared by R, G, B
        tint = rng.uniform(-20, 20, 3) * xx[..., None]
        img = base + light[..., None] + tint + rng.normal(0, 6, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


# --- lighting_from_moments: the algebra --------------------------------------------------------


def test_from_moments_recovers_a_known_covariance_from_gaussian_pixels():
    rng = np.random.default_rng(0)
    true_vec = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    true_val = np.array([0.05, 0.01, 0.002])  # distinct, like photos'
    cov = true_vec @ np.diag(true_val) @ true_vec.T
    mean = np.array([0.48, 0.45, 0.40])
    n = 400_000
    x = rng.multivariate_normal(mean, cov, size=n)  # not clipped: exact Gaussian
    L = lighting.lighting_from_moments(n, 7, x.sum(axis=0), x.T @ x, source="gaussian")

    # Exactly the sample covariance's decomposition (the formula), ...
    val, vec, sample_mean, sample_std = numpy_lighting(x)
    assert_same_components(L, val, vec, rtol=1e-9, atol=1e-7)
    np.testing.assert_allclose(L.mean, sample_mean, rtol=1e-12)
    np.testing.assert_allclose(L.std, sample_std, rtol=1e-9)
    # ... and so, within sampling error, the true one: eigenvalues to ~3 sqrt(2/n) = 0.7%, vector
    # angles to ~3 sqrt(l_i l_j / n) / (l_i - l_j) ~ 0.004.
    assert_same_components(L, true_val, true_vec, rtol=0.01, atol=0.01)
    np.testing.assert_allclose(L.mean, mean, atol=1e-3)

    vec = np.array(L.eigvec)
    np.testing.assert_allclose(vec.T @ vec, np.eye(3), atol=1e-12)  # orthonormal columns
    assert L.eigval[0] > L.eigval[1] > L.eigval[2] > 0
    assert sum(L.eigval) == pytest.approx(sum(s * s for s in L.std), rel=1e-9)  # trace
    assert (L.images, L.pixels, L.source) == (7, n, "gaussian")


def test_from_moments_of_the_imagenet_covariance_gives_back_its_constants_and_the_sign_rule():
    vec, val = np.array(constants.IMAGENET_EIGVEC), np.array(constants.IMAGENET_EIGVAL)
    mean = np.array(constants.IMAGENET_MEAN)
    cov = vec @ np.diag(val) @ vec.T
    L = lighting.lighting_from_moments(1, 1, mean, cov + np.outer(mean, mean), source="x")
    np.testing.assert_allclose(L.eigval, val, atol=1e-4)  # constants are rounded to 4 places
    # Largest-magnitude component negative: fb.resnet.torch's 1st and 3rd columns; its 2nd is flipped.
    np.testing.assert_allclose(L.eigvec, vec * [1, -1, 1], atol=1e-3)
    got = np.array(L.eigvec)
    assert all(got[np.argmax(np.abs(got[:, j])), j] < 0 for j in range(3))


def test_from_moments_refuses_no_pixels_and_wrong_shapes():
    with pytest.raises(ValueError, match="n=0"):
        lighting.lighting_from_moments(0, 0, np.zeros(3), np.zeros((3, 3)), source="x")
    with pytest.raises(ValueError, match=r"\(4,\)"):
        lighting.lighting_from_moments(1, 1, np.zeros(4), np.zeros((3, 3)), source="x")


# --- pixel_moments: one Ray Data map, against NumPy --------------------------------------------


def test_pixel_moments_on_png_equals_numpy_per_pixel_over_the_central_square():
    rng = np.random.default_rng(1)
    square = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    wide = rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)  # shorter side already 8: no resize
    batch = {"jpeg": np.array([encode(p, "PNG") for p in [*square, wide]], dtype=object)}
    row = lighting.pixel_moments(batch, size=8)

    # PNG is lossless, so the reference is the very pixels; the wide one counts its central 8x8 only,
    # every image weighs size^2 pixels as in training's resize_center.
    seen = np.concatenate([p.reshape(-1, 3) for p in [*square, wide[:, 4:12]]]) / 255.0
    assert row["n"].tolist() == [4 * 64] and row["images"].tolist() == [4]
    assert row["sum"].shape == (1, 3) and row["outer"].shape == (1, 3, 3)
    np.testing.assert_allclose(row["sum"][0], seen.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(row["outer"][0], seen.T @ seen, rtol=1e-12)


def test_pixel_moments_of_solid_colour_jpegs_give_the_covariance_of_the_colours():
    colours = np.array(
        [[200, 30, 30], [30, 180, 40], [20, 40, 220], [240, 240, 230], [90, 80, 60], [10, 10, 10]], dtype=np.uint8
    )
    shapes = [(64, 64), (40, 30), (30, 50), (17, 23), (64, 100), (16, 16)]  # decoded at 1/1 to 1/4
    jpegs = [encode(np.broadcast_to(c, (h, w, 3)).copy()) for c, (h, w) in zip(colours, shapes)]
    row = lighting.pixel_moments({"jpeg": np.array(jpegs, dtype=object)}, size=16)
    L = lighting.lighting_from_moments(
        int(row["n"][0]), int(row["images"][0]), row["sum"][0], row["outer"][0], source="solid"
    )

    # Each image is one colour, equally weighted: the pixel covariance is that of the six colours,
    # up to JPEG's rounding of a flat colour (a level or two).
    val, vec, mean, _ = numpy_lighting(colours / 255.0)
    np.testing.assert_allclose(L.mean, mean, atol=2 / 255)
    cov = np.array(L.eigvec) @ np.diag(L.eigval) @ np.array(L.eigvec).T
    np.testing.assert_allclose(cov, vec @ np.diag(val) @ vec.T, atol=2e-3)
    assert_same_components(L, val, vec, rtol=0.05, atol=0.02)


def test_pixel_moments_raises_on_an_undecodable_image_naming_it():
    batch = {"jpeg": np.array([b"not an image"], dtype=object), "key": np.array(["train/n1/bad.JPEG"])}
    with pytest.raises(stages.DecodeError, match="bad.JPEG"):
        lighting.pixel_moments(batch)


def test_64_px_keeps_the_colour_components_of_natural_photos():
    """The module docstring's measurement: 64 px against the 256 px training sees, on real photos."""
    import sklearn.datasets  # the test extra installs it for these two photos; a missing one fails here

    folder = Path(sklearn.datasets.__file__).parent / "images"
    for name in ("china.jpg", "flower.jpg"):
        batch = {"jpeg": np.array([(folder / name).read_bytes()], dtype=object)}
        at = {}
        for size in (256, 64):
            row = lighting.pixel_moments(batch, size=size)
            at[size] = lighting.lighting_from_moments(int(row["n"][0]), 1, row["sum"][0], row["outer"][0], source=name)
        v256, v64 = np.array(at[256].eigvec), np.array(at[64].eigvec)
        angles = np.degrees(np.arccos(np.clip(np.abs((v256 * v64).sum(axis=0)), 0, 1)))
        ratio = np.array(at[64].eigval) / np.array(at[256].eigval)
        assert angles[0] < 2 and angles.max() < 3, (name, angles)
        assert 0.92 < ratio[0] < 1.0, (name, ratio)  # measured 0.946 and 0.952
        assert (0.65 < ratio[1:]).all() and (ratio[1:] < 1.0).all(), (name, ratio)  # 0.73-0.85
        np.testing.assert_allclose(at[64].mean, at[256].mean, atol=0.01)


# --- compute_lighting: the Ray Data pass -------------------------------------------------------

SIZE = 24
IMAGES = smooth_images(40, SIZE, seed=5)
JPEGS = [encode(p) for p in IMAGES]


def decoded(jpegs: list[bytes]) -> np.ndarray:
    """Plain PIL decoding (no pipeline code): (P, 3) in [0, 1]. The JPEGs are already SIZE x SIZE."""
    return np.concatenate([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).reshape(-1, 3) for b in jpegs]) / 255.0


@pytest.fixture(scope="module")
def jpeg_ds(ray_session):
    return ray_session.data.from_items([{"jpeg": b, "key": f"img{i}"} for i, b in enumerate(JPEGS)])


def test_full_pass_equals_numpy_over_every_pixel(jpeg_ds):
    L = lighting.compute_lighting(jpeg_ds, size=SIZE)
    val, vec, mean, std = numpy_lighting(decoded(JPEGS))
    assert_same_components(L, val, vec, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(L.std, std, rtol=1e-6)
    assert (L.images, L.pixels) == (40, 40 * SIZE * SIZE)
    assert L.source == f"data: all 40 images at {SIZE} px"
    with pytest.raises(ValueError, match="total_images=41, but the dataset has 40"):
        lighting.compute_lighting(jpeg_ds, size=SIZE, total_images=41)


def test_sample_is_exactly_the_k_lowest_seeded_hashes_and_reproducible(jpeg_ds):
    L = lighting.compute_lighting(jpeg_ds, sample=10, size=SIZE, seed=0, total_images=40)
    # Exactly 10 images: those first in seed 0's order.
    chosen = sorted(range(40), key=lambda i: lighting.sample_order(JPEGS[i], 0))[:10]
    val, vec, mean, _ = numpy_lighting(decoded([JPEGS[i] for i in chosen]))
    assert_same_components(L, val, vec, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(L.mean, mean, rtol=1e-6)
    assert (L.images, L.pixels) == (10, 10 * SIZE * SIZE)
    assert L.source == f"data: 10 of 40 images at {SIZE} px (sample seed 0)"

    # The same seed, the same Lighting: counting the rows itself, or told a too-large total (which
    # lets too few images through the first pass and widens the net until 10 come).
    assert lighting.compute_lighting(jpeg_ds, sample=10, size=SIZE, seed=0) == L
    wide = lighting.compute_lighting(jpeg_ds, sample=10, size=SIZE, seed=0, total_images=400)
    assert dataclasses.replace(wide, source=L.source) == L  # its source repeats the 400 it was told

    other = lighting.compute_lighting(jpeg_ds, sample=10, size=SIZE, seed=1, total_images=40)
    assert other.images == 10 and other.eigval != L.eigval
    assert sorted(range(40), key=lambda i: lighting.sample_order(JPEGS[i], 1))[:10] != chosen


def test_a_sample_larger_than_the_data_is_all_of_it(jpeg_ds):
    L = lighting.compute_lighting(jpeg_ds, sample=100, size=SIZE, total_images=40)
    val, vec, _, _ = numpy_lighting(decoded(JPEGS))
    assert_same_components(L, val, vec, rtol=1e-6, atol=1e-6)
    assert L.images == 40 and L.source.startswith("data: 40 of 40 images")


def test_compute_refuses_bad_arguments(jpeg_ds):
    with pytest.raises(ValueError, match="sample must be a positive number of images or None for all, got 0"):
        lighting.compute_lighting(jpeg_ds, sample=0)
    with pytest.raises(ValueError, match="size must be a positive number of pixels, got 0"):
        lighting.compute_lighting(jpeg_ds, size=0)


# --- Lighting: a record, and what the train loop hands to pca_lighting -----------------


def test_lighting_round_trips_through_json_and_imagenet_is_the_stages_constants():
    L = lighting.lighting_from_moments(10, 1, np.full(3, 4.0), np.eye(3) * 2 + 1.5, source="data: test")
    back = Lighting.from_dict(json.loads(json.dumps(L.to_dict())))
    assert back == L and isinstance(back.eigvec[0], tuple)
    assert Lighting.from_dict(json.loads(json.dumps(lighting.IMAGENET.to_dict()))) == lighting.IMAGENET

    assert lighting.IMAGENET.eigval == constants.IMAGENET_EIGVAL
    assert lighting.IMAGENET.eigvec == constants.IMAGENET_EIGVEC
    assert (lighting.IMAGENET.mean, lighting.IMAGENET.std) == (constants.IMAGENET_MEAN, constants.IMAGENET_STD)
    assert (lighting.IMAGENET.images, lighting.IMAGENET.pixels, lighting.IMAGENET.source) == (
        0,
        0,
        "imagenet-constants",
    )

    with pytest.raises(ValueError, match="got \\['eigval'\\]"):
        Lighting.from_dict({"eigval": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"eigvec must have shape \(3, 3\), got \(3, 2\)"):
        Lighting.from_dict({**L.to_dict(), "eigvec": [[1, 0], [0, 1], [0, 0]]})


def test_a_lighting_from_data_drives_pca_lighting():
    pixels = np.concatenate([p.reshape(-1, 3) for p in IMAGES]) / 255.0
    L = lighting.lighting_from_moments(len(pixels), 40, pixels.sum(axis=0), pixels.T @ pixels, source="data")
    x = device_stages.to_float(torch.from_numpy(np.stack(IMAGES[:4])))  # (4, 3, 24, 24)
    out = device_stages.pca_lighting(x, torch.Generator().manual_seed(0), eigval=L.eigval, eigvec=L.eigvec)
    again = device_stages.pca_lighting(x, torch.Generator().manual_seed(0), eigval=L.eigval, eigvec=L.eigvec)
    assert out.shape == x.shape == (4, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.equal(out, again) and not torch.equal(out, x)
    # One shift per image, along the components: eigvec^T shift / eigval = alpha, std 0.1.
    shift = (out - x)[:, :, 0, 0].double().numpy()  # (4, 3)
    alpha = shift @ np.array(L.eigvec) / np.array(L.eigval)
    expected = (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 0.1).double().numpy()
    np.testing.assert_allclose(alpha, expected, rtol=1e-3, atol=1e-4)
