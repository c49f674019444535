"""The Ray Data plans on a real local Ray: what reaches the workers, and clear errors at the door."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import plan
from pipeline.data.readers.folder import image_paths

CFG = dataclasses.replace(PRESETS["sample"], resize_size=80, crop_size=67, seed=3)


def test_scan_lists_splits_and_sorted_class_index(tiny_imagenet):
    folder = data.scan_image_folder(str(tiny_imagenet))
    assert folder.wnids == tuple(sorted(folder.wnids)) and folder.num_classes == 3
    assert len(image_paths(folder, "train")) == 72 and len(image_paths(folder, "val")) == 24
    assert folder.images == {"train": 72, "val": 24} and folder.files == {}  # the listing is columnar
    assert folder.class_index()[folder.wnids[2]] == 2


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing", "does not exist"),
        ("file", "is not a folder"),
        ("empty", "has no train/ folder"),
        ("no_val", "has no val/ folder"),
        ("no_images", "has no images under train/"),
        ("flat", "holds files but no class folders"),
        ("val_only_class", "val/ has classes that train/ lacks"),
    ],
)
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
    with pytest.raises(
        ValueError, match="expected a local path, s3://bucket/prefix or gs://bucket/prefix, got .gopher://x."
    ):
        data.scan_image_folder("gopher://x")


def test_train_plan_yields_uint8_crops_and_labels(ray_session, tiny_imagenet):
    folder = data.scan_image_folder(str(tiny_imagenet))
    rows = data.train_dataset(folder, CFG).take_all()
    assert len(rows) == 72
    images = np.stack([r["image"] for r in rows])
    assert images.shape == (72, 67, 67, 3) and images.dtype == np.uint8
    assert sorted(np.bincount([r["label"] for r in rows]).tolist()) == [24, 24, 24]


def test_val_plan_is_central_crops_matching_the_stages(ray_session, tiny_imagenet):
    from pipeline.transforms import stages

    folder = data.scan_image_folder(str(tiny_imagenet))
    path = image_paths(folder, "val")[0]
    batch = data.val_dataset(folder, CFG).take_batch(folder.images["val"], batch_format="numpy")
    with open(path, "rb") as f:
        expected = stages.center_crops({"jpeg": [f.read()], "key": [path]}, resize_size=80, crop_size=67)["image"][0]
    assert any(np.array_equal(image, expected) for image in batch["image"])
    assert set(batch["label"].tolist()) == {0, 1, 2}


def epochs_of(dataset, n: int = 2, batch_size: int = 8) -> list[list[list[str]]]:
    """n passes over a dataset (each an execution, as Ray Train's epochs are): the keys, batch by batch."""
    return [
        [list(b["key"]) for b in dataset.iter_batches(batch_size=batch_size, batch_format="numpy")] for _ in range(n)
    ]


def check_fresh_orders(first_run, second_run, total: int) -> None:
    for epoch in first_run:  # every image exactly once per epoch
        keys = [k for batch in epoch for k in batch]
        assert len(keys) == total and len(set(keys)) == total
    # A fresh order, and fresh batch companions, every epoch...
    assert [k for b in first_run[0] for k in b] != [k for b in first_run[1] for k in b]
    assert {frozenset(b) for b in first_run[0]} != {frozenset(b) for b in first_run[1]}
    # ... and the same ones in another run with the same seed (deterministic: order preserved).
    assert first_run == second_run


def test_every_epoch_a_fresh_order_of_samples_reproducible_by_seed_from_a_folder(ray_session, tiny_imagenet):
    folder = data.scan_image_folder(str(tiny_imagenet))
    cfg = dataclasses.replace(CFG, deterministic=True)
    dataset = lambda: data.train_dataset(folder, cfg, keys=True)  # noqa: E731
    with _preserve_order():
        check_fresh_orders(epochs_of(dataset()), epochs_of(dataset()), 72)
    other_seed = data.train_dataset(folder, dataclasses.replace(cfg, seed=4), keys=True)
    with _preserve_order():
        assert epochs_of(other_seed, 1) != epochs_of(dataset(), 1)


def test_a_resumed_epoch_is_that_epoch_without_the_images_already_trained_on(ray_session, tiny_imagenet):
    """plan.start_at: the next pass is epoch 2 itself (order and crops), not the first epoch again, as a
    restarted worker group gets; with indices to skip, exactly those images are left out and every
    other image keeps its crop."""
    folder = data.scan_image_folder(str(tiny_imagenet))
    cfg = dataclasses.replace(CFG, deterministic=True)

    def rows_of_pass(dataset) -> dict[str, tuple]:  # one execution of the dataset: one epoch
        return {
            k: (int(i), image)
            for batch in dataset.iter_batches(batch_size=8, batch_format="numpy")
            for k, i, image in zip(batch["key"], batch["index"], batch["image"])
        }

    with _preserve_order():
        dataset = data.train_dataset(folder, cfg, keys=True)
        passes = [rows_of_pass(dataset) for _ in range(3)]  # epochs 0, 1, 2
        at_two = rows_of_pass(plan.start_at(data.train_dataset(folder, cfg, keys=True), 2))
        consumed = np.array(sorted(i for i, _ in list(passes[2].values())[:30]))
        resumed_plan = plan.start_at(data.train_dataset(folder, cfg, keys=True), 2, consumed)
        resumed = rows_of_pass(resumed_plan)
        after = rows_of_pass(resumed_plan)  # the pass after: epoch 3
    assert list(at_two) == list(passes[2]) and list(at_two) != list(passes[0])  # the same order...
    assert all(np.array_equal(at_two[k][1], passes[2][k][1]) for k in at_two)  # ... and crops
    assert len(resumed) == 72 - 30 and not {i for i, _ in resumed.values()} & set(consumed.tolist())
    assert list(resumed) == [k for k in passes[2] if passes[2][k][0] not in consumed]
    assert all(np.array_equal(resumed[k][1], passes[2][k][1]) for k in resumed)
    assert len(after) == 72 and list(after) not in (list(passes[2]), list(passes[0]))  # skips only epoch 2
    assert sorted(i for i, _ in passes[0].values()) == list(range(72))  # a folder's index: its file


def test_a_resumed_epoch_with_centre_crops_leaves_out_what_was_trained_on(ray_session, tiny_imagenet):
    """--augment off trains on centre crops, in a fresh order every epoch: the skip applies there too."""
    folder = data.scan_image_folder(str(tiny_imagenet))
    cfg = dataclasses.replace(CFG, augment="off")
    consumed = np.arange(0, 72, 3)
    dataset = plan.start_at(data.train_dataset(folder, cfg, keys=True), 1, consumed)
    indices = [int(i) for b in dataset.iter_batches(batch_size=8, batch_format="numpy") for i in b["index"]]
    assert sorted(indices) == sorted(set(range(72)) - set(consumed.tolist()))


def test_every_epoch_a_fresh_order_of_samples_from_shards(ray_session, tiny_imagenet, tmp_path):
    """Shards are read a row group at a time: the rows inside it are permuted anew every epoch."""
    from pipeline.data import prepare

    prepare.prepare(str(tiny_imagenet), str(tmp_path / "shards"), log=lambda m: None)
    source = data.open_source(str(tmp_path / "shards"))
    with _preserve_order():
        runs = [epochs_of(data.train_dataset(source, CFG, keys=True)) for _ in range(2)]
    check_fresh_orders(*runs, 72)


def test_each_read_unit_leaves_its_task_as_its_own_block(ray_session, tiny_imagenet):
    """Units share a Ray task, but the first batch must not wait for all of them: the plan's block
    size (Dataset.context, a DeveloperAPI) makes every unit a block of its own."""
    import dataclasses as dc

    from pipeline.data import sources

    folder = data.scan_image_folder(str(tiny_imagenet))
    many = dc.replace(
        folder, listings={**folder.listings, "train": pa.concat_tables([folder.listings["train"]] * 8)}
    )  # 576 images: 3 units
    assert sources.num_units(many, "train") == 3
    tasks_per_cpu, plan.TASKS_PER_CPU = plan.TASKS_PER_CPU, 0  # so all three share one task (num_tasks)
    try:
        dataset = data.train_dataset(many, CFG)
    finally:
        plan.TASKS_PER_CPU = tasks_per_cpu
    blocks = [len(b["label"]) for b in dataset.iter_batches(batch_size=None)]
    assert sum(blocks) == 576 and max(blocks) <= sources.UNIT_IMAGES


def test_tasks_take_up_to_eight_units_leave_every_cpu_two_and_stay_few():
    assert plan.num_tasks(5000, 32) == 625  # ImageNet's 1.28 M images on a 32-CPU node
    assert plan.num_tasks(5000, 16) == 512  # on 16 CPUs: at most 32 tasks per CPU, ~10 units each
    assert plan.num_tasks(55_866, 2) == 64  # ImageNet-21k on 2 CPUs: 64 tasks to plan, not 6,984
    assert plan.num_tasks(78, 2) == 10  # the benchmark's 19,800 images on 2 CPUs
    assert plan.num_tasks(11, 4) == 8  # the sample's 2,600 on 4 logical CPUs: 1-2 units each
    assert plan.num_tasks(3, 8) == 3  # never more tasks than units


def test_webdataset_shuffle_buffer_gives_every_item_once_in_a_seeded_order():
    from pipeline.data.readers.webdataset import shuffle_buffer as _shuffle_buffer

    items = list(range(1000))
    a = list(_shuffle_buffer(iter(items), 64, np.random.default_rng(0)))
    assert sorted(a) == items and a != items
    assert a == list(_shuffle_buffer(iter(items), 64, np.random.default_rng(0)))
    assert a != list(_shuffle_buffer(iter(items), 64, np.random.default_rng(1)))


class _preserve_order:
    """Ray Data keeps task outputs in order only when asked (as --deterministic asks Ray Train)."""

    def __enter__(self):
        from ray.data import DataContext

        self.options = DataContext.get_current().execution_options
        self.before = self.options.preserve_order
        self.options.preserve_order = True

    def __exit__(self, *exc):
        self.options.preserve_order = self.before


def test_decode_on_gpu_hands_on_bytes_and_the_trainer_makes_the_same_view(ray_session, tiny_imagenet):
    """--decode-on gpu: Ray Data reads bytes; worker.input_batches decodes and crops them on the
    trainer's device (the CPU here: the same calls run nvJPEG on CUDA). The centre crops match the
    CPU path's image for image; the training crops keep every image and label once."""
    from types import SimpleNamespace

    import torch

    from pipeline.train import worker

    folder = data.scan_image_folder(str(tiny_imagenet))
    gpu_cfg = SimpleNamespace(**{**CFG.to_dict(), "decode_on": "gpu"}, worker_batch_size=8)  # Config needs a GPU
    raw = data.val_dataset(folder, gpu_cfg).take_batch(4, batch_format="numpy")
    assert set(raw) == {"jpeg", "key", "label", "index"} and isinstance(raw["jpeg"][0], bytes)

    with _preserve_order():  # both in file order, to compare image for image
        on_device = list(
            worker.input_batches(
                data.val_dataset(folder, gpu_cfg).iterator(), gpu_cfg, torch.device("cpu"), drop_last=False
            )
        )
        cpu = data.val_dataset(folder, CFG).take_batch(24, batch_format="numpy")
    images = torch.cat([b["image"] for b in on_device]).numpy()
    assert images.shape == cpu["image"].shape and np.array_equal(
        torch.cat([b["label"] for b in on_device]), cpu["label"]
    )
    assert np.abs(images.astype(int) - cpu["image"].astype(int)).mean() < 1.5

    crops = list(
        worker.input_batches(
            data.train_dataset(folder, gpu_cfg).iterator(),
            gpu_cfg,
            torch.device("cpu"),
            drop_last=False,
            crop_rngs=lambda i: np.random.default_rng([0, i]),
        )
    )
    labels = torch.cat([b["label"] for b in crops]).tolist()
    assert sum(len(b["image"]) for b in crops) == 72 and sorted(np.bincount(labels).tolist()) == [24, 24, 24]
    assert all(b["image"].shape[1:] == (67, 67, 3) for b in crops)
