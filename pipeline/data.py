"""Ray Data plans for training and validation, built from the stages.

    train:  read_binary_files (files shuffled per epoch)
              -> decode -> resize_center(256) -> random_crop_flip(224)      [CPU tasks, uint8]
              -> {image (N, 224, 224, 3) uint8, label int64}  -> Ray Train workers
    val:    read_binary_files -> decode -> resize_center(256) -> center_crop(224) -> same columns

Lighting and normalisation are float math and happen on the trainer's device (train.py).
The class index of an image is the position of its wnid in sorted order, the standard
ImageNet index.
"""

from __future__ import annotations

import posixpath
import zlib
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow.fs as pafs
import ray.data
import ray.train
from ray.data.context import DataContext

from pipeline import stages, storage

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ImageFolder:
    """An ImageNet-layout dataset: <root>/{train,val}/<wnid>/<image>."""

    uri: str
    filesystem: pafs.FileSystem
    wnids: tuple[str, ...]                        # sorted; class index = position
    files: dict[str, tuple[str, ...]]             # split -> image paths inside `filesystem`
    ignored: tuple[str, ...] = ()                 # files that are not images, reported by name

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def class_index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}


def scan_image_folder(uri: str, *, endpoint: str | None = None) -> ImageFolder:
    """List an ImageNet-layout folder; clear errors for a missing path, split or class."""
    fs, root = storage.resolve(uri, endpoint=endpoint)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"dataset path {uri!r} does not exist")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"dataset path {uri!r} is not a folder")

    files: dict[str, list[str]] = {}
    ignored: list[str] = []
    wnids_by_split: dict[str, set[str]] = {}
    for split in SPLITS:
        split_dir = storage.join(root, split)
        if fs.get_file_info(split_dir).type != pafs.FileType.Directory:
            raise FileNotFoundError(
                f"dataset path {uri!r} has no {split}/ folder; expected {split}/<wnid>/<image>.JPEG")
        found = fs.get_file_info(pafs.FileSelector(split_dir, recursive=True))
        paths = sorted(f.path for f in found if f.type == pafs.FileType.File)
        images = [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += [p for p in paths if not p.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise FileNotFoundError(f"dataset path {uri!r} has no images under {split}/<wnid>/")
        misplaced = [p for p in images if posixpath.dirname(posixpath.dirname(p)) != split_dir]
        if misplaced:
            raise ValueError(f"dataset path {uri!r}: {len(misplaced)} images are not in {split}/<wnid>/, "
                             f"e.g. {misplaced[0]!r}")
        files[split] = images
        wnids_by_split[split] = {wnid_of(p) for p in images}

    unknown = wnids_by_split["val"] - wnids_by_split["train"]
    if unknown:
        raise ValueError(f"dataset path {uri!r}: val/ has classes that train/ lacks: {sorted(unknown)[:5]}")
    return ImageFolder(uri, fs, tuple(sorted(wnids_by_split["train"])),
                       {k: tuple(v) for k, v in files.items()}, tuple(ignored))


def wnid_of(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))


def batch_rng(seed: int, keys) -> np.random.Generator:
    """A generator for one batch: a function of the seed, the epoch and the images in the batch.

    The epoch is Ray Data's execution index of the dataset (each epoch re-executes it), so the
    crops differ from epoch to epoch yet the same run draws the same crops for the same images.
    """
    epoch = DataContext.get_current()._execution_idx
    return np.random.default_rng([seed, epoch, zlib.crc32("\n".join(map(str, keys)).encode())])


def _labelled(batch: dict, class_index: dict[str, int]) -> dict:
    """read_binary_files' {bytes, path} -> {jpeg, key, label}."""
    keys = [str(p) for p in batch["path"]]
    return {
        "jpeg": batch["bytes"],
        "key": keys,
        "label": np.array([class_index[wnid_of(k)] for k in keys], dtype=np.int64),
    }


def preprocess_train(batch: dict, *, class_index: dict[str, int], seed: int,
                     resize_size: int, crop_size: int, flip_p: float) -> dict:
    batch = _labelled(batch, class_index)
    batch = stages.decode(batch, min_size=resize_size)
    batch = stages.resize_center(batch, size=resize_size)
    batch = stages.random_crop_flip(batch, batch_rng(seed, batch["key"]), size=crop_size, flip_p=flip_p)
    return {"image": batch["image"], "label": batch["label"]}


def preprocess_eval(batch: dict, *, class_index: dict[str, int], resize_size: int, crop_size: int) -> dict:
    batch = _labelled(batch, class_index)
    batch = stages.decode(batch, min_size=resize_size)
    batch = stages.resize_center(batch, size=resize_size)
    batch = stages.center_crop(batch, size=crop_size)
    return {"image": batch["image"], "label": batch["label"]}


# Images per map task: large enough to amortise task overhead, small enough to stream.
MAP_BATCH_SIZE = 64


def read_blocks(num_files: int, cfg) -> int | None:
    """Read tasks for a split. Ray sizes them to the cluster by default; a deterministic run fixes
    them to the data (one per MAP_BATCH_SIZE files), so batches are the same on any cluster shape."""
    return max(1, -(-num_files // MAP_BATCH_SIZE)) if cfg.deterministic else None


def execution_options(cfg):
    """Ray Data options for the train workers' shards: Train's defaults, plus a fixed order when asked."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.deterministic
    return options


def train_dataset(folder: ImageFolder, cfg):
    """The training plan; files are shuffled anew (and reproducibly) every epoch."""
    ds = ray.data.read_binary_files(
        list(folder.files["train"]), filesystem=folder.filesystem, include_paths=True,
        shuffle=ray.data.FileShuffleConfig(seed=cfg.seed),
        override_num_blocks=read_blocks(len(folder.files["train"]), cfg),
    )
    fn = partial(preprocess_train, class_index=folder.class_index(), seed=cfg.seed,
                 resize_size=cfg.resize_size, crop_size=cfg.crop_size, flip_p=cfg.flip_p)
    return ds.map_batches(fn, batch_size=MAP_BATCH_SIZE, batch_format="numpy")


def val_dataset(folder: ImageFolder, cfg):
    """The validation plan: central crops, no randomness."""
    ds = ray.data.read_binary_files(list(folder.files["val"]), filesystem=folder.filesystem, include_paths=True,
                                    override_num_blocks=read_blocks(len(folder.files["val"]), cfg))
    fn = partial(preprocess_eval, class_index=folder.class_index(),
                 resize_size=cfg.resize_size, crop_size=cfg.crop_size)
    return ds.map_batches(fn, batch_size=MAP_BATCH_SIZE, batch_format="numpy")


class TrainValDataConfig(ray.train.DataConfig):
    """Splits "train" equally (DDP needs the same number of steps on every worker) and "val"
    unequally, so that no validation image is dropped and top-1/top-5 are over all of them."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        others = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self._resolve_execution_options("val")
            for i, split in enumerate(val.streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output
