"""Each stage against what it promises: shapes, every parameter's effect, determinism, references."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import stages


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode != img.mode:
        img = img.convert(mode)
    img.save(buf, format=fmt, quality=95)
    return buf.getvalue()


def index_images(n: int, size: int) -> np.ndarray:
    """Images whose pixels encode (image, row, column), so any crop or flip can be read back."""
    img = np.zeros((n, size, size, 3), dtype=np.uint8)
    img[..., 0] = np.arange(n)[:, None, None]
    img[..., 1] = np.arange(size)[None, :, None]
    img[..., 2] = np.arange(size)[None, None, :]
    return img


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 120, dtype=np.uint8)
    img = np.stack([np.tile(gradient, (90, 1)), np.tile(gradient[::-1], (90, 1)),
                    rng.integers(0, 255, (90, 120), dtype=np.uint8)], axis=-1)
    return img  # (90, 120, 3)


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG")])
def test_decode_gives_rgb_uint8_for_every_kind(photo, mode, fmt):
    out = stages.decode({"jpeg": [jpeg_bytes(photo, mode, fmt)], "key": ["x"]})["image"][0]
    assert out.shape == (90, 120, 3) and out.dtype == np.uint8
    if mode == "L":
        assert np.array_equal(out[..., 0], out[..., 1])  # grey stays grey, in three channels


def test_decode_min_size_decodes_smaller_but_not_below_the_target(photo):
    big = np.asarray(Image.fromarray(photo).resize((960, 720)))
    full = stages.decode_one(jpeg_bytes(big))
    drafted = stages.decode_one(jpeg_bytes(big), min_size=256)
    assert full.shape == (720, 960, 3)
    assert min(drafted.shape[:2]) >= 256 and drafted.shape[0] < 720  # 1/2 scale: (360, 480)


def test_decode_failure_names_the_file_and_never_substitutes():
    with pytest.raises(stages.DecodeError, match="broken.JPEG"):
        stages.decode({"jpeg": [b"not a jpeg"], "key": ["train/n1/broken.JPEG"]})
    truncated = jpeg_bytes(np.zeros((64, 64, 3), np.uint8))[:40]
    with pytest.raises(stages.DecodeError):
        stages.decode_one(truncated, key="t")


def test_resize_center_scales_the_shorter_side_and_keeps_the_centre():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # a white central third
    out = stages.resize_center({"image": [wide]}, size=50)["image"]
    assert out.shape == (1, 50, 50, 3)
    assert out[0, :, 2:-2].min() >= 250  # the centre 50x50 of the 150x50 rescale is the white band
    tall = stages.resize_center({"image": [np.zeros((300, 100, 3), np.uint8)]}, size=64)["image"]
    assert tall.shape == (1, 64, 64, 3)


def test_random_crop_flip_p0_is_a_plain_crop_and_p1_flips_all():
    images = index_images(16, 10)
    rng = np.random.default_rng(1)
    plain = stages.random_crop_flip({"image": images}, rng, size=6, flip_p=0.0)["image"]
    for i, crop in enumerate(plain):
        top, left = crop[0, 0, 1], crop[0, 0, 2]
        assert np.array_equal(crop, images[i, top:top + 6, left:left + 6])
    flipped = stages.random_crop_flip({"image": images}, np.random.default_rng(1), size=6, flip_p=1.0)["image"]
    for i, crop in enumerate(flipped):
        top, left = crop[0, -1, 1], crop[0, -1, 2]
        assert np.array_equal(crop, images[i, top:top + 6, left:left + 6][:, ::-1])


def test_random_crop_flip_uses_all_offsets_and_about_half_flips():
    images = index_images(2000, 8)
    out = stages.random_crop_flip({"image": images}, np.random.default_rng(2), size=5, flip_p=0.5)["image"]
    tops = out[:, 0, 0, 1]
    flips = out[:, 0, 0, 2] > out[:, 0, -1, 2]
    assert set(tops.tolist()) == {0, 1, 2, 3}
    assert 0.45 < flips.mean() < 0.55


def test_random_crop_flip_same_seed_same_batch_other_seed_other_batch():
    images = index_images(32, 12)
    a = stages.random_crop_flip({"image": images}, np.random.default_rng(7), size=8)["image"]
    b = stages.random_crop_flip({"image": images}, np.random.default_rng(7), size=8)["image"]
    c = stages.random_crop_flip({"image": images}, np.random.default_rng(8), size=8)["image"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_center_and_ten_crop():
    images = index_images(3, 10)
    centre = stages.center_crop({"image": images}, size=6)["image"]
    assert np.array_equal(centre, images[:, 2:8, 2:8])
    ten = stages.ten_crop({"image": images}, size=6)["image"]
    assert ten.shape == (3, 10, 6, 6, 3)
    corners = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
    for j, (t, l) in enumerate(corners):
        assert np.array_equal(ten[:, j], images[:, t:t + 6, l:l + 6])
        assert np.array_equal(ten[:, j + 5], images[:, t:t + 6, l:l + 6][:, :, ::-1])


def numpy_lighting(images: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """fb.resnet.torch's Lighting, one image at a time: rgb = eigvec @ (alpha * eigval)."""
    eigval, eigvec = np.array(stages.IMAGENET_EIGVAL), np.array(stages.IMAGENET_EIGVEC)
    out = images.copy()
    for i in range(len(images)):
        rgb = eigvec @ (alpha[i] * eigval)
        out[i] += rgb[:, None, None]
    return out


def test_pca_lighting_matches_numpy_reference():
    x = torch.rand(5, 3, 4, 4)
    out = stages.pca_lighting(x, torch.Generator().manual_seed(3), std=0.1)
    alpha = (torch.randn(5, 3, generator=torch.Generator().manual_seed(3)) * 0.1).numpy()
    np.testing.assert_allclose(out.numpy(), numpy_lighting(x.numpy(), alpha), rtol=1e-5, atol=1e-6)
    # One colour shift per image, the same at every pixel.
    shift = (out - x).reshape(5, 3, -1)
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6)


def test_pca_lighting_std_scales_the_noise_and_zero_disables_it():
    x = torch.rand(400, 3, 2, 2)
    small = (stages.pca_lighting(x, torch.Generator().manual_seed(0), std=0.1) - x).std()
    large = (stages.pca_lighting(x, torch.Generator().manual_seed(0), std=0.2) - x).std()
    assert large / small == pytest.approx(2.0, rel=1e-4)
    assert torch.equal(stages.pca_lighting(x, torch.Generator(), std=0.0), x)


def test_to_float_and_normalize():
    images = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x = stages.to_float(images)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32 and x.max() == 1.0
    y = stages.normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_decode_collect_removes_bad_rows_from_every_column_and_names_them(photo):
    good = jpeg_bytes(photo)
    batch = {"jpeg": [good, b"garbage", good], "key": np.array(["a", "b", "c"]), "label": np.array([0, 1, 2])}
    out = stages.decode(batch, errors="collect")
    assert out["failed"].keys() == {"b"} and "cannot identify" in out["failed"]["b"]
    assert list(out["key"]) == ["a", "c"] and list(out["label"]) == [0, 2] and len(out["image"]) == 2
    clean = stages.decode({"jpeg": [good], "key": ["a"]}, errors="collect")
    assert clean["failed"] == {} and len(clean["image"]) == 1
