"""The run's pictures: valid PNGs that show what they claim (the model's inputs de-normalised exactly,
conv1 kernels in tower order, classes ranked)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.tracking import pictures
from pipeline.transforms import device_stages


def opened(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def test_model_inputs_are_shown_as_the_pixels_they_came_from():
    # Pixel values that encode (image, row, column): any mix-up of images, axes or channels shows.
    n, size = 3, 9
    idx = np.arange(n * size * size * 3).reshape(n, size, size, 3)
    images = (idx * 7 % 256).astype(np.uint8)
    x = device_stages.to_model_input(torch.from_numpy(images), torch.Generator(), lighting_std=0.0)
    grid = opened(pictures.model_inputs_png(x, columns=2))
    gap = 2
    for i in range(n):
        r, c = divmod(i, 2)
        tile = grid[gap + r * (size + gap) : gap + r * (size + gap) + size, gap + c * (size + gap) :][:, :size]
        assert np.abs(tile.astype(int) - images[i]).max() <= 1, i  # float round trip: within one level
    assert grid.shape == (2 * (size + gap) + gap, 2 * (size + gap) + gap, 3)


def test_lighting_stays_in_the_picture():
    images = np.full((1, 4, 4, 3), 100, np.uint8)
    g = torch.Generator().manual_seed(0)
    lit = opened(pictures.model_inputs_png(device_stages.to_model_input(torch.from_numpy(images), g, lighting_std=1.0)))
    assert not (lit[2:6, 2:6] == 100).all()  # the model saw the lighting shift; so does the picture


def test_conv1_kernels_tower_0_above_tower_1():
    w = np.zeros((4, 3, 2, 2), np.float32)
    w[:2, 0] = 1.0  # tower 0's kernels: red
    w[2:, 2] = 1.0  # tower 1's kernels: blue
    image = opened(pictures.conv1_png(w, scale=1))
    red, blue = (image == [255, 0, 0]).all(axis=-1), (image == [0, 0, 255]).all(axis=-1)
    rows_red, rows_blue = np.flatnonzero(red.any(axis=1)), np.flatnonzero(blue.any(axis=1))
    assert red.sum() == blue.sum() == 2 * 4  # each kernel a 2x2 tile
    assert rows_red.max() < rows_blue.min()


def test_classes_ranked_best_and_worst_named():
    table = pictures.class_accuracy([9, 1, 5, 0], [10, 10, 10, 0], ["tench", "goldfish", "shark", "empty"], named=1)
    assert [r["name"] for r in table["best"]] == ["tench"] and [r["name"] for r in table["worst"]] == ["goldfish"]
    assert table["classes"][3]["top1"] is None  # no val images: no accuracy, not 0%
    assert opened(pictures.per_class_png(table)).shape[1] == 1000


def test_curves_are_a_png():
    history = [
        {
            "epoch": e,
            "train_loss": 2 - e,
            "val_loss": 2.1 - e,
            "train_top1": 30 * e,
            "val_top1": 25 * e,
            "val_top5": 60 + 10 * e,
        }
        for e in range(3)
    ]
    assert opened(pictures.curves_png(history)).shape == (400, 1000, 3)
