"""The Ray Data plans on a real local Ray: what reaches the workers, and clear errors at the door."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline import data
from pipeline.config import PRESETS

CFG = dataclasses.replace(PRESETS["sample"], resize_size=80, crop_size=67, seed=3)


def test_scan_lists_splits_and_sorted_class_index(tiny_imagenet):
    folder = data.scan_image_folder(str(tiny_imagenet))
    assert folder.wnids == tuple(sorted(folder.wnids)) and folder.num_classes == 3
    assert len(folder.files["train"]) == 72 and len(folder.files["val"]) == 24
    assert folder.class_index()[folder.wnids[2]] == 2


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("empty", "has no train/ folder"),
    ("no_val", "has no val/ folder"),
    ("no_images", "has no images under train/"),
    ("flat", "not in train/<wnid>/"),
    ("val_only_class", "val/ has classes that train/ lacks"),
])
def test_scan_refuses_bad_layouts_naming_the_path(tmp_path, layout, message):
    root = tmp_path / "imagenet"
    jpeg = b"\xff\xd8 not decoded at scan time"
    if layout == "file":
        root.write_bytes(b"")
    elif layout != "missing":
        root.mkdir()
    if layout in ("no_val", "no_images", "flat", "val_only_class"):
        (root / "train" / "n1").mkdir(parents=True)
    if layout in ("no_images", "flat", "val_only_class"):
        (root / "val" / "n1").mkdir(parents=True)
    if layout == "no_val":
        (root / "train" / "n1" / "a.JPEG").write_bytes(jpeg)
    if layout == "flat":
        (root / "train" / "a.JPEG").write_bytes(jpeg)
        (root / "val" / "n1" / "b.JPEG").write_bytes(jpeg)
    if layout == "val_only_class":
        (root / "train" / "n1" / "a.JPEG").write_bytes(jpeg)
        (root / "val" / "n2").mkdir()
        (root / "val" / "n2" / "b.JPEG").write_bytes(jpeg)
    with pytest.raises((FileNotFoundError, NotADirectoryError, ValueError), match=message) as info:
        data.scan_image_folder(str(root))
    assert "imagenet" in str(info.value)


def test_scan_reports_non_image_files_instead_of_dropping_them_silently(tiny_imagenet, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_imagenet, root)
    wnid = sorted(p.name for p in (root / "train").iterdir())[0]
    (root / "train" / wnid / "notes.txt").write_text("hello")
    folder = data.scan_image_folder(str(root))
    assert [p.rsplit("/", 1)[-1] for p in folder.ignored] == ["notes.txt"]


def test_scan_rejects_unknown_schemes():
    with pytest.raises(ValueError, match="expected s3://bucket/prefix or a local path, got 'gopher://x'"):
        data.scan_image_folder("gopher://x")


def test_train_plan_yields_uint8_crops_and_labels(ray_session, tiny_imagenet):
    folder = data.scan_image_folder(str(tiny_imagenet))
    rows = data.train_dataset(folder, CFG).take_all()
    assert len(rows) == 72
    images = np.stack([r["image"] for r in rows])
    assert images.shape == (72, 67, 67, 3) and images.dtype == np.uint8
    assert sorted(np.bincount([r["label"] for r in rows]).tolist()) == [24, 24, 24]


def test_val_plan_is_central_crops_matching_the_stages(ray_session, tiny_imagenet):
    from pipeline import stages

    folder = data.scan_image_folder(str(tiny_imagenet))
    path = folder.files["val"][0]
    batch = data.val_dataset(folder, CFG).take_batch(len(folder.files["val"]), batch_format="numpy")
    with open(path, "rb") as f:
        expected = stages.decode({"jpeg": [f.read()], "key": [path]}, min_size=80)
    expected = stages.center_crop(stages.resize_center(expected, size=80), size=67)["image"][0]
    assert any(np.array_equal(image, expected) for image in batch["image"])
    assert set(batch["label"].tolist()) == {0, 1, 2}
