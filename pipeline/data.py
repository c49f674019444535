"""Where the images come from, and the Ray Data plans that feed them to the trainers.

Sources (open_source finds which one a URI holds, local or s3://):

    shards        manifest.json + train/*.parquet, val/*.parquet (jobs/prepare_imagenet.py)
    huggingface   imagenet-1k's Parquet layout: image.bytes + label, files named train-* / validation-*
    webdataset    tar shards of <key>.jpg + <key>.cls, files named *train* / *val*
    folder        ImageNet layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG

Every source reads into the same rows {jpeg, key, label}; then

    train:  decode -> resize_center(256) -> random_crop_flip(224)     [CPU tasks, uint8 crops travel]
    val:    decode -> resize_center(256) -> center_crop(224)
            -> {image (N, 224, 224, 3) uint8, label int64} -> Ray Train workers

Lighting and normalisation are float math and happen on the trainer's device (train.py). The class
index is the position of the wnid in sorted order, the standard ImageNet index. An image that fails
to decode is left out of its batch and named in the run's DecodeFailures report; it is never
replaced by another image.
"""

from __future__ import annotations

import hashlib
import posixpath
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
from ray.data.context import DataContext

from pipeline import shards, stages, storage

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
IMAGENET_CLASSES = 1000
# Images per map task: large enough to amortise task overhead, small enough to stream.
MAP_BATCH_SIZE = 64


@dataclass(frozen=True)
class Source:
    """A dataset on some filesystem, split into train and val, ready to be read by Ray Data."""

    uri: str
    kind: str                                     # shards | huggingface | webdataset | folder
    filesystem: pafs.FileSystem
    files: dict[str, tuple[str, ...]]             # split -> image files, or shard files
    num_classes: int
    wnids: tuple[str, ...] = ()                   # sorted, when the source names its classes
    images: dict[str, int | None] = field(default_factory=dict)   # split -> count, when known
    fingerprint: str = ""                         # manifest sha256, or a hash of the listing
    lighting: dict | None = None                  # §4.1 PCA computed from this data, if any
    ignored: tuple[str, ...] = ()                 # files found but not read, reported by name

    def class_index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}


def open_source(uri: str, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
    """Find what `uri` holds; clear errors, within seconds, for a missing path, shard or class."""
    fs, root = _open_root(uri)
    if fs.get_file_info(storage.join(root, shards.MANIFEST)).type == pafs.FileType.File:
        return _open_shards(uri, fs, root, manifest_sha256)
    if manifest_sha256:
        raise ValueError(f"--manifest-sha256 was given but {uri!r} has no {shards.MANIFEST}")
    found = _files_under(fs, root)
    if any(f.path.endswith(".parquet") for f in found):
        return _open_huggingface(uri, fs, root, found, num_classes)
    if any(f.path.endswith(".tar") for f in found):
        return _open_webdataset(uri, fs, root, found, num_classes)
    return _open_image_folder(uri, fs, root, found)


def scan_image_folder(uri: str) -> Source:
    """An ImageNet-layout folder: <root>/{train,val}/<wnid>/<image>."""
    fs, root = _open_root(uri)
    return _open_image_folder(uri, fs, root, _files_under(fs, root))


def _open_root(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, root = storage.resolve(uri)
    try:
        info = fs.get_file_info(root)
    except OSError as e:  # e.g. a bucket that does not exist, or credentials it refuses
        raise FileNotFoundError(f"dataset path {uri!r} cannot be read: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"dataset path {uri!r} does not exist")
    if info.type != pafs.FileType.Directory:
        raise NotADirectoryError(f"dataset path {uri!r} is not a folder")
    return fs, root


def _files_under(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    return [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]


def _open_image_folder(uri: str, fs: pafs.FileSystem, root: str, found: list[pafs.FileInfo]) -> Source:
    files: dict[str, tuple[str, ...]] = {}
    ignored: list[str] = []
    wnids_by_split: dict[str, set[str]] = {}
    for split in SPLITS:
        split_dir = storage.join(root, split)
        if fs.get_file_info(split_dir).type != pafs.FileType.Directory:
            raise FileNotFoundError(
                f"dataset path {uri!r} has no {split}/ folder; expected {split}/<wnid>/<image>.JPEG, "
                f"prepared shards (manifest.json), WebDataset tars or Hugging Face Parquet files")
        in_split = sorted((f for f in found if f.path.startswith(split_dir + "/")), key=lambda f: f.path)
        images = [f.path for f in in_split if f.path.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += [f.path for f in in_split if not f.path.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise FileNotFoundError(f"dataset path {uri!r} has no images under {split}/<wnid>/")
        misplaced = [p for p in images if posixpath.dirname(posixpath.dirname(p)) != split_dir]
        if misplaced:
            raise ValueError(f"dataset path {uri!r}: {len(misplaced)} images are not in {split}/<wnid>/, "
                             f"e.g. {misplaced[0]!r}")
        files[split] = tuple(images)
        wnids_by_split[split] = {wnid_of(p) for p in images}

    unknown = wnids_by_split["val"] - wnids_by_split["train"]
    if unknown:
        raise ValueError(f"dataset path {uri!r}: val/ has classes that train/ lacks: {sorted(unknown)[:5]}")
    wnids = tuple(sorted(wnids_by_split["train"]))
    return Source(uri, "folder", fs, files, len(wnids), wnids, {s: len(files[s]) for s in SPLITS},
                  _listing_hash(found, root), None, tuple(ignored))


def _open_shards(uri: str, fs, root: str, manifest_sha256: str) -> Source:
    manifest, sha = shards.read_manifest(fs, root)
    if manifest_sha256 and manifest_sha256 != sha:
        raise ValueError(f"{uri}/{shards.MANIFEST} has sha256 {sha}, not the {manifest_sha256} asked for "
                         f"(--manifest-sha256): the data changed since that run")
    files = {}
    for split in SPLITS:
        if split not in manifest["splits"]:
            raise FileNotFoundError(f"{uri}/{shards.MANIFEST} lists no {split} split")
        listed = [s for s in manifest["splits"][split]["shards"] if s["rows"]]
        paths = [storage.join(root, s["path"]) for s in listed]
        infos = fs.get_file_info(paths)
        for shard, info in zip(listed, infos):
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(f"shard {shard['path']} listed in {uri}/{shards.MANIFEST} is missing")
            if info.size != shard["bytes"]:
                raise ValueError(f"shard {shard['path']} is {info.size} bytes but {uri}/{shards.MANIFEST} says "
                                 f"{shard['bytes']}: it does not match the manifest")
        files[split] = tuple(paths)
    classes = tuple(manifest["classes"])
    return Source(uri, "shards", fs, files, len(classes), classes,
                  {s: manifest["splits"][s]["images"] for s in SPLITS}, sha, manifest.get("lighting"))


def _split_of(path: str) -> str | None:
    name = path.lower()
    if "train" in name:
        return "train"
    if "val" in name:  # "val", "validation"
        return "val"
    return None


def _by_split(uri: str, found, extension: str, layout: str) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    ignored = []
    for f in sorted(found, key=lambda f: f.path):
        split = _split_of(f.path) if f.path.endswith(extension) else None
        (files[split] if split else ignored).append(f.path)
    for split in SPLITS:
        if not files[split]:
            raise FileNotFoundError(f"dataset path {uri!r} looks like {layout} but has no {split} files "
                                    f"(*{extension} with {split!r} in the name)")
    return {s: tuple(v) for s, v in files.items()}, ignored


def _listing_hash(found: list[pafs.FileInfo], root: str) -> str:
    """sha256 over every file's path (relative to the root, so a copy elsewhere matches) and size."""
    lines = sorted(f"{f.path.removeprefix(root)}\t{f.size}\n" for f in found)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _open_huggingface(uri: str, fs, root: str, found, num_classes: int) -> Source:
    files, ignored = _by_split(uri, found, ".parquet", "Hugging Face Parquet (image.bytes + label)")
    images: dict[str, int | None] = {}
    max_label = -1
    for split in SPLITS:
        images[split] = 0
        for path in files[split]:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                if "image" not in schema.names or "label" not in schema.names:
                    raise ValueError(f"{path} has columns {schema.names}; Hugging Face imagenet-1k Parquet has "
                                     f"'image' (struct with 'bytes') and 'label'")
                images[split] += meta.num_rows
                # Parquet counts leaf columns: image.bytes and image.path come before label.
                column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "label")
                for g in range(meta.num_row_groups):  # the label range from the footer, not the data
                    stats = meta.row_group(g).column(column).statistics
                    if stats is not None and stats.has_min_max:
                        max_label = max(max_label, int(stats.max))
    return Source(uri, "huggingface", fs, files, num_classes or max(max_label + 1, 1), (), images,
                  _listing_hash(found, root), None, tuple(ignored))


def _open_webdataset(uri: str, fs, root: str, found, num_classes: int) -> Source:
    files, ignored = _by_split(uri, found, ".tar", "WebDataset (<key>.jpg + <key>.cls)")
    # A tar shard has no footer to read the labels from; ImageNet-1k's 1000 unless told otherwise.
    return Source(uri, "webdataset", fs, files, num_classes or IMAGENET_CLASSES, (), {s: None for s in SPLITS},
                  _listing_hash(found, root), None, tuple(ignored))


def wnid_of(path: str) -> str:
    return posixpath.basename(posixpath.dirname(path))


# --- reading: every source -> rows {jpeg, key, label} -------------------------------------------


def _from_folder(batch: dict, *, class_index: dict[str, int]) -> dict:
    keys = [str(p) for p in batch["path"]]
    return {"jpeg": batch["bytes"], "key": keys,
            "label": np.array([class_index[wnid_of(k)] for k in keys], dtype=np.int64)}


def _from_shards(batch: dict) -> dict:
    return {"jpeg": batch["jpeg"], "key": batch["image_id"], "label": batch["label"].astype(np.int64)}


def _from_huggingface(batch: dict) -> dict:
    images = batch["image"]
    return {"jpeg": [image["bytes"] for image in images],
            "key": [image.get("path") or "" for image in images],
            "label": np.asarray(batch["label"], dtype=np.int64)}


def _from_webdataset(batch: dict) -> dict:
    jpeg = batch["jpg"] if "jpg" in batch else batch["jpeg"]
    labels = [int(c.decode() if isinstance(c, bytes) else c) for c in batch["cls"]]
    return {"jpeg": jpeg, "key": [str(k) for k in batch["__key__"]], "label": np.array(labels, dtype=np.int64)}


def read_split(source: Source, split: str, cfg, *, shuffle: bool) -> ray.data.Dataset:
    """The split's rows {jpeg, key, label}; the file order is shuffled per epoch when asked."""
    files = list(source.files[split])
    kwargs: dict[str, Any] = {"filesystem": source.filesystem, "override_num_blocks": read_blocks(source, split, cfg)}
    if shuffle:
        kwargs["shuffle"] = ray.data.FileShuffleConfig(seed=cfg.seed)
    if source.kind == "folder":
        ds = ray.data.read_binary_files(files, include_paths=True, **kwargs)
        return ds.map_batches(partial(_from_folder, class_index=source.class_index()), batch_format="numpy")
    if source.kind == "shards":
        ds = ray.data.read_parquet(files, **kwargs).select_columns(["image_id", "jpeg", "label"])
        return ds.map_batches(_from_shards, batch_format="numpy")
    if source.kind == "huggingface":
        ds = ray.data.read_parquet(files, **kwargs).select_columns(["image", "label"])
        return ds.map_batches(_from_huggingface, batch_format="numpy")
    if source.kind == "webdataset":
        ds = ray.data.read_webdataset(files, decoder=None, **kwargs)
        return ds.map_batches(_from_webdataset, batch_format="numpy")
    raise ValueError(f"unknown source kind {source.kind!r}")


def read_blocks(source: Source, split: str, cfg) -> int | None:
    """Read tasks for a split. Ray sizes them to the cluster by default; a deterministic run fixes
    them to the data, so batches are the same on any cluster shape."""
    if not cfg.deterministic:
        return None
    if source.kind == "folder":
        return max(1, -(-len(source.files[split]) // MAP_BATCH_SIZE))
    return len(source.files[split])


# --- decode failures: named, never silently dropped ---------------------------------------------


@ray.remote(num_cpus=0)
class DecodeFailures:
    """The run's report of images that could not be decoded: key -> reason."""

    def __init__(self):
        self.failures: dict[str, str] = {}

    def add(self, failures: dict[str, str]) -> None:
        self.failures.update(failures)

    def get(self) -> dict[str, str]:
        return dict(self.failures)


def _decode(batch: dict, *, min_size: int, report) -> dict:
    """Decode what decodes; report the rest by key and leave them out of the batch. Without a
    report to name them in, the first undecodable image stops the job (DecodeError names it)."""
    if report is None:
        return stages.decode(batch, min_size=min_size)
    batch = stages.decode(batch, min_size=min_size, errors="collect")
    if batch["failed"]:
        report.add.remote(batch["failed"])
    return batch


# --- the plans ------------------------------------------------------------------------------------


def batch_rng(seed: int, keys) -> np.random.Generator:
    """A generator for one batch: a function of the seed, the epoch and the images in the batch.

    The epoch is Ray Data's execution index of the dataset (each epoch re-executes it), so the
    crops differ from epoch to epoch yet the same run draws the same crops for the same images.
    """
    epoch = DataContext.get_current()._execution_idx
    return np.random.default_rng([seed, epoch, zlib.crc32("\n".join(map(str, keys)).encode())])


def _check_labels(labels: np.ndarray, keys, num_classes: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"image {keys[bad[0]]!r} has label {labels[bad[0]]}, outside the {num_classes} classes "
                         f"(--num-classes)")


def preprocess_train(batch: dict, *, seed: int, resize_size: int, crop_size: int, flip_p: float,
                     num_classes: int, report=None) -> dict:
    _check_labels(batch["label"], batch["key"], num_classes)
    batch = _decode(batch, min_size=resize_size, report=report)
    batch = stages.resize_center(batch, size=resize_size)
    batch = stages.random_crop_flip(batch, batch_rng(seed, batch["key"]), size=crop_size, flip_p=flip_p)
    return {"image": batch["image"], "label": batch["label"]}


def preprocess_eval(batch: dict, *, resize_size: int, crop_size: int, num_classes: int, report=None) -> dict:
    _check_labels(batch["label"], batch["key"], num_classes)
    batch = _decode(batch, min_size=resize_size, report=report)
    batch = stages.resize_center(batch, size=resize_size)
    batch = stages.center_crop(batch, size=crop_size)
    return {"image": batch["image"], "label": batch["label"]}


def train_dataset(source: Source, cfg, report=None) -> ray.data.Dataset:
    """The training plan; files are shuffled anew (and reproducibly) every epoch."""
    fn = partial(preprocess_train, seed=cfg.seed, resize_size=cfg.resize_size, crop_size=cfg.crop_size,
                 flip_p=cfg.flip_p, num_classes=source.num_classes, report=report)
    return read_split(source, "train", cfg, shuffle=True).map_batches(
        fn, batch_size=MAP_BATCH_SIZE, batch_format="numpy")


def val_dataset(source: Source, cfg, report=None) -> ray.data.Dataset:
    """The validation plan: central crops, no randomness."""
    fn = partial(preprocess_eval, resize_size=cfg.resize_size, crop_size=cfg.crop_size,
                 num_classes=source.num_classes, report=report)
    return read_split(source, "val", cfg, shuffle=False).map_batches(
        fn, batch_size=MAP_BATCH_SIZE, batch_format="numpy")


def execution_options(cfg):
    """Ray Data options for the train workers' shards: Train's defaults, plus a fixed order when asked."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = cfg.deterministic
    return options


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
