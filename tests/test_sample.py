"""The generated sample: ImageNet layout, decodable odd files, determinism, and the cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sample import SAMPLE_WNIDS, ensure_sample_imagenet, generate_sample_imagenet

SMALL = dict(num_classes=3, train_per_class=6, val_per_class=3)


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate_sample_imagenet(tmp_path_factory.mktemp("sample") / "small", **SMALL, seed=0)


def test_wnids_are_ten_sorted_imagenet_ids():
    assert len(SAMPLE_WNIDS) == 10
    assert list(SAMPLE_WNIDS) == sorted(SAMPLE_WNIDS)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in SAMPLE_WNIDS)


def test_layout_and_counts(small):
    assert sorted(p.name for p in small.iterdir()) == ["train", "val"]
    for split, per_class in (("train", 6), ("val", 3)):
        assert sorted(p.name for p in (small / split).iterdir()) == list(SAMPLE_WNIDS[:3])
        for wnid in SAMPLE_WNIDS[:3]:
            assert len(list((small / split / wnid).iterdir())) == per_class
    assert sorted(p.name for p in (small / "train" / SAMPLE_WNIDS[1]).iterdir()) == sorted(
        f"{SAMPLE_WNIDS[1]}_{n}.JPEG" for n in range(1, 7)
    )
    # Val names run over the whole split, as in ILSVRC2012_val_00000001 .. 00050000.
    val_names = sorted(p.name for p in (small / "val").rglob("*.JPEG"))
    assert val_names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 10)]


def test_every_file_decodes_as_jpeg_and_sizes_vary(small):
    sizes = set()
    for path in files_of(small):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            image.load()
            sizes.add(image.size)
            assert 80 <= min(image.size) and max(image.size) <= 220
    assert len(sizes) > len(files_of(small)) // 2
    assert len({w / h > 1 for w, h in sizes}) == 2  # landscape and portrait both


def test_each_split_has_grayscale_and_cmyk_jpegs(small):
    for split in ("train", "val"):
        modes = [Image.open(p).mode for p in (small / split).rglob("*.JPEG")]
        assert modes.count("L") >= 1
        assert modes.count("CMYK") >= 1
        assert modes.count("RGB") == len(modes) - modes.count("L") - modes.count("CMYK")


def test_odd_files_still_show_a_pattern(small):
    for path in files_of(small):
        with Image.open(path) as image:
            if image.mode != "RGB":
                gray = image.convert("L")
                lo, hi = gray.getextrema()
                assert hi - lo > 80, (path, image.mode, lo, hi)  # foreground vs background, not flat


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path, small):
    again = generate_sample_imagenet(tmp_path / "again", **SMALL, seed=0)
    other = generate_sample_imagenet(tmp_path / "other", **SMALL, seed=1)
    names = [p.relative_to(small) for p in files_of(small)]
    assert [p.relative_to(again) for p in files_of(again)] == names
    assert all((small / n).read_bytes() == (again / n).read_bytes() for n in names)
    assert [p.relative_to(other) for p in files_of(other)] == names
    assert all((small / n).read_bytes() != (other / n).read_bytes() for n in names)


def test_more_than_ten_classes_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        generate_sample_imagenet(tmp_path / "x", num_classes=11)
    with pytest.raises(ValueError, match="num_classes"):
        ensure_sample_imagenet(tmp_path / "y", num_classes=11)


def test_ensure_generates_once_then_reuses(tmp_path):
    root = tmp_path / "cached"
    assert ensure_sample_imagenet(root, **SMALL) == root
    assert json.loads((root / ".complete").read_text())["num_classes"] == 3
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    assert ensure_sample_imagenet(root, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == ["cached"]  # no temporary left behind


def test_ensure_regenerates_when_parameters_change(tmp_path):
    root = tmp_path / "cached"
    ensure_sample_imagenet(root, **SMALL)
    ensure_sample_imagenet(root, **{**SMALL, "num_classes": 2})
    assert sorted(p.name for p in (root / "train").iterdir()) == list(SAMPLE_WNIDS[:2])
    assert json.loads((root / ".complete").read_text())["num_classes"] == 2
    before = (root / "train" / SAMPLE_WNIDS[0] / f"{SAMPLE_WNIDS[0]}_1.JPEG").read_bytes()
    ensure_sample_imagenet(root, **{**SMALL, "num_classes": 2, "seed": 5})
    assert (root / "train" / SAMPLE_WNIDS[0] / f"{SAMPLE_WNIDS[0]}_1.JPEG").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["cached"]


def test_ensure_defaults_to_the_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_SAMPLE_DIR", str(tmp_path / "env"))
    assert ensure_sample_imagenet(**SMALL) == tmp_path / "env"
    assert (tmp_path / "env" / ".complete").exists()


def test_ensure_refuses_a_folder_that_is_not_a_sample(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a generated sample"):
        ensure_sample_imagenet(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ensure_rejects_an_unknown_parameter(tmp_path):
    with pytest.raises(TypeError):
        ensure_sample_imagenet(tmp_path / "x", classes=3)


def test_concurrent_callers_all_get_the_whole_dataset(tmp_path):
    root, results, errors = tmp_path / "shared", [], []

    def call():
        try:
            results.append(ensure_sample_imagenet(root, **SMALL))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [root] * 3
    assert len(files_of(root)) == 3 * (6 + 3)
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]
