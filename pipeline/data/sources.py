"""Where the images come from: what a URI holds, and how it is read in independent pieces.

open_source(uri) finds which layout a local folder or s3:// prefix holds:

    shards        manifest.json + train/*.parquet, val/*.parquet (jobs/prepare_imagenet.py)
    huggingface   imagenet-1k's Parquet layout: image.bytes + label, files named train-* / validation-*
    webdataset    tar shards of <key>.jpg + <key>.cls, files named *train* / *val*
    folder        ImageNet layout: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG or a flat val with its
                  labels, read by imagenet.folder_members, the prepare job's own reading

A split is read in `num_units` independent read units (a Ray Data task reads a few, data.py).
Unit k of an epoch is:

    folder        files [256k, 256(k+1)) of a permutation of all the split's files   a full shuffle
    shards, hf    one Parquet row group (256 images in a shard), its rows permuted
    webdataset    one tar, through a 256-image shuffle buffer

The permutations are drawn from (seed, epoch): every epoch a fresh order of samples, the same for
the same seed, and every image exactly once per epoch. (A shard mixes all classes, because the
prepare job assigns images to shards by a hash of their id.) Every reader yields the same rows:
{jpeg: encoded bytes, key: a name for reports, label: int64, index: int64}. `index` names an image
within its split whatever the epoch's order (a file's place in the listing, or a shard's / tar's place
times 2**20 plus the row's place in it): a checkpoint taken mid-epoch records the indices the workers
consumed, and the resumed epoch reads past exactly those (data.py).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import imagenet, shards, storage

SPLITS = ("train", "val")
IMAGENET_CLASSES = 1000
# Images per read unit of a folder, as in a shard's row group (shards.ROW_GROUP_SIZE): 0.1-0.3 s of
# decoding on one core, so the first batch comes soon after the first unit starts.
UNIT_IMAGES = shards.ROW_GROUP_SIZE
WEBDATASET_SHUFFLE_BUFFER = 256
# index = piece << PIECE_BITS | row, for Parquet row groups and tars (a million images a piece at most).
PIECE_BITS = 20
# Object storage answers each GET after tens of milliseconds: a folder task fetches in parallel.
FETCH_THREADS = 16


@dataclass(frozen=True)
class Source:
    """A dataset on some filesystem, split into train and val, and the pieces each split is read in."""

    uri: str
    kind: str                                     # shards | huggingface | webdataset | folder
    filesystem: pafs.FileSystem
    files: dict[str, tuple[str, ...]]             # split -> image files, or shard / tar files
    num_classes: int
    wnids: tuple[str, ...] = ()                   # sorted, when the source names its classes
    images: dict[str, int | None] = field(default_factory=dict)   # split -> count, when known
    fingerprint: str = ""                         # manifest sha256, or a hash of the listing
    lighting: dict | None = None                  # §4.1 PCA computed from this data, if any
    ignored: tuple[str, ...] = ()                 # files found but not read, reported by name
    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)           # folder: per file
    keys: dict[str, tuple[str, ...]] = field(default_factory=dict)             # folder: per file
    row_groups: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # Parquet: (file, group)

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
    labels_of_val = imagenet.val_labels_finder(imagenet.as_uri(uri, root))
    members: dict[str, list[imagenet.Member]] = {}
    ignored: list[str] = []
    for split in SPLITS:
        if fs.get_file_info(storage.join(root, split)).type != pafs.FileType.Directory:
            raise FileNotFoundError(
                f"dataset path {uri!r} has no {split}/ folder; expected {split}/<wnid>/<image>.JPEG, "
                f"prepared shards (manifest.json), WebDataset tars or Hugging Face Parquet files")
        listed = imagenet.folder_members(fs, root, split, labels_of_val)
        images = [m for m in listed if not imagenet.skip_reason(m)]  # the prepare job's rule, too
        ignored += [storage.join(root, m.name) for m in listed if imagenet.skip_reason(m)]
        if not images:
            raise FileNotFoundError(f"dataset path {uri!r} has no images under {split}/<wnid>/")
        members[split] = images

    wnids = tuple(sorted({m.wnid for m in members["train"]}))
    unknown = {m.wnid for m in members["val"]} - set(wnids)
    if unknown:
        raise ValueError(f"dataset path {uri!r}: val/ has classes that train/ lacks: {sorted(unknown)[:5]}")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    return Source(
        uri, "folder", fs,
        files={s: tuple(storage.join(root, m.name) for m in members[s]) for s in SPLITS},
        num_classes=len(wnids), wnids=wnids, images={s: len(members[s]) for s in SPLITS},
        fingerprint=_listing_hash(found, root), ignored=tuple(ignored),
        labels={s: tuple(index[m.wnid] for m in members[s]) for s in SPLITS},
        keys={s: tuple(imagenet.image_id_of(s, m.name) for m in members[s]) for s in SPLITS},
    )


def _open_shards(uri: str, fs, root: str, manifest_sha256: str) -> Source:
    manifest, sha = shards.read_manifest(fs, root)
    if manifest_sha256 and manifest_sha256 != sha:
        raise ValueError(f"{uri}/{shards.MANIFEST} has sha256 {sha}, not the {manifest_sha256} asked for "
                         f"(--manifest-sha256): the data changed since that run")
    files, groups = {}, {}
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
        # The shard format writes row groups of ROW_GROUP_SIZE: the manifest's row counts give them
        # without reading a footer (a thousand GETs on object storage).
        groups[split] = tuple((path, g) for path, s in zip(paths, listed)
                              for g in range(-(-s["rows"] // shards.ROW_GROUP_SIZE)))
    classes = tuple(manifest["classes"])
    return Source(uri, "shards", fs, files, len(classes), classes,
                  {s: manifest["splits"][s]["images"] for s in SPLITS}, sha, manifest.get("lighting"),
                  row_groups=groups)


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
    groups: dict[str, list[tuple[str, int]]] = {}
    max_label = -1
    for split in SPLITS:
        images[split], groups[split] = 0, []
        for path in files[split]:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
            if "image" not in schema.names or "label" not in schema.names:
                raise ValueError(f"{path} has columns {schema.names}; Hugging Face imagenet-1k Parquet has "
                                 f"'image' (struct with 'bytes') and 'label'")
            images[split] += meta.num_rows
            groups[split] += [(path, g) for g in range(meta.num_row_groups)]
            # Parquet counts leaf columns: image.bytes and image.path come before label.
            column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "label")
            for g in range(meta.num_row_groups):  # the label range from the footer, not the data
                stats = meta.row_group(g).column(column).statistics
                if stats is not None and stats.has_min_max:
                    max_label = max(max_label, int(stats.max))
    return Source(uri, "huggingface", fs, files, num_classes or max(max_label + 1, 1), (), images,
                  _listing_hash(found, root), None, tuple(ignored),
                  row_groups={s: tuple(g) for s, g in groups.items()})


def _open_webdataset(uri: str, fs, root: str, found, num_classes: int) -> Source:
    files, ignored = _by_split(uri, found, ".tar", "WebDataset (<key>.jpg + <key>.cls)")
    # A tar shard has no footer to read the labels from; ImageNet-1k's 1000 unless told otherwise.
    return Source(uri, "webdataset", fs, files, num_classes or IMAGENET_CLASSES, (), {s: None for s in SPLITS},
                  _listing_hash(found, root), None, tuple(ignored))


# --- reading: unit k of an epoch -> rows {jpeg, key, label} -----------------------------------------


def num_units(source: Source, split: str) -> int:
    """How many independent read units one epoch of the split is cut into."""
    if source.kind == "folder":
        return -(-len(source.files[split]) // UNIT_IMAGES)
    if source.kind in ("shards", "huggingface"):
        return len(source.row_groups[split])
    return len(source.files[split])


def read_unit(source: Source, split: str, unit: int, *, seed: int, epoch: int, shuffle: bool) -> dict[str, Any]:
    """The rows of read unit `unit` of `epoch` (see the module docstring); shuffle=False reads in file order."""
    order = _permutation(num_units(source, split), seed, epoch, shuffle)
    rng = np.random.default_rng([seed, epoch, SPLITS.index(split), unit]) if shuffle else None
    if source.kind == "folder":
        files = _permutation(len(source.files[split]), seed, epoch, shuffle)
        return _read_folder(source, split, files[unit * UNIT_IMAGES:(unit + 1) * UNIT_IMAGES])
    if source.kind == "webdataset":
        return _read_webdataset(source, source.files[split][order[unit]], rng, piece=int(order[unit]))
    path, group = source.row_groups[split][order[unit]]
    batch = _read_row_group(source, path, group)
    batch["index"] = (int(order[unit]) << PIECE_BITS) + np.arange(len(batch["label"]), dtype=np.int64)
    if rng is not None:
        perm = rng.permutation(len(batch["label"]))
        batch = {"jpeg": [batch["jpeg"][i] for i in perm], "key": [batch["key"][i] for i in perm],
                 "label": batch["label"][perm], "index": batch["index"][perm]}
    return batch


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """A fixed function of (n, seed, epoch); cached, as every unit of an epoch asks for the same one."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def _read_folder(source: Source, split: str, rows: np.ndarray) -> dict[str, Any]:
    paths = [source.files[split][i] for i in rows]
    fs = source.filesystem
    if isinstance(fs, pafs.LocalFileSystem):
        data = [storage.read_bytes(fs, p) for p in paths]
    else:
        with ThreadPoolExecutor(FETCH_THREADS) as pool:
            data = list(pool.map(lambda p: storage.read_bytes(fs, p), paths))
    return {"jpeg": data, "key": [source.keys[split][i] for i in rows],
            "label": np.array([source.labels[split][i] for i in rows], dtype=np.int64),
            "index": np.asarray(rows, dtype=np.int64)}


def _read_row_group(source: Source, path: str, group: int) -> dict[str, Any]:
    if source.kind == "shards":
        table = _parquet_group(source.filesystem, path, group, ["image_id", "jpeg", "label"])
        return {"jpeg": table.column("jpeg").to_pylist(), "key": table.column("image_id").to_pylist(),
                "label": table.column("label").to_numpy().astype(np.int64)}
    table = _parquet_group(source.filesystem, path, group, ["image", "label"])
    images = table.column("image").to_pylist()
    name = posixpath.basename(path)
    return {"jpeg": [image["bytes"] for image in images],
            "key": [image.get("path") or f"{name}#{group}.{i}" for i, image in enumerate(images)],
            "label": table.column("label").to_numpy().astype(np.int64)}


def _parquet_group(fs: pafs.FileSystem, path: str, group: int, columns: list[str]) -> pa.Table:
    """Row group `group` of a Parquet file; a damaged file is a ValueError naming it.

    The prepared shards carry a CRC per page (shards.py): a shard damaged after the manifest was
    written fails here instead of handing training other bytes. Storage that stays unreachable
    (storage.StoreUnavailable) and a file that vanished raise as they are.
    """
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f, page_checksum_verification=True).read_row_group(group, columns=columns)
    except (FileNotFoundError, storage.StoreUnavailable):
        raise
    except (pa.ArrowInvalid, OSError) as e:  # bad magic, thrift, CRC mismatch, a cut-off file
        raise ValueError(f"{path}: row group {group} cannot be read ({e}). The file is damaged or was replaced "
                         f"after it was listed; for prepared shards, re-run jobs/prepare_imagenet.py to rewrite "
                         f"it") from None


def _read_webdataset(source: Source, path: str, rng: np.random.Generator | None, *, piece: int) -> dict[str, Any]:
    samples = (((piece << PIECE_BITS) + row, *sample) for row, sample in enumerate(_tar_samples(source.filesystem,
                                                                                                 path)))
    if rng is not None:
        samples = _shuffle_buffer(samples, WEBDATASET_SHUFFLE_BUFFER, rng)
    indices, jpeg, keys, labels = [], [], [], []
    for index, key, image, label in samples:
        indices.append(index)
        jpeg.append(image)
        keys.append(key)
        labels.append(label)
    return {"jpeg": jpeg, "key": keys, "label": np.array(labels, dtype=np.int64),
            "index": np.array(indices, dtype=np.int64)}


def _tar_samples(fs: pafs.FileSystem, path: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) per sample of a WebDataset tar: members <key>.jpg|jpeg and <key>.cls."""
    pending: dict[str, dict[str, bytes]] = {}
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=io.BufferedReader(f, 8 << 20), mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = posixpath.basename(info.name).partition(".")
            key = posixpath.join(posixpath.dirname(info.name), key)
            parts = pending.setdefault(key, {})
            parts[suffix.lower()] = tar.extractfile(info).read()
            image = parts.get("jpg", parts.get("jpeg"))
            if image is not None and "cls" in parts:
                del pending[key]
                yield key, image, int(parts["cls"].decode())
    if pending:
        key = next(iter(pending))
        raise ValueError(f"{path}: sample {key!r} has {sorted(pending[key])}, not both an image (.jpg) and a "
                         f"label (.cls); {len(pending)} samples are incomplete")


def _shuffle_buffer(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Each item out in a random order from a buffer of `size`: WebDataset's own shuffle, seeded."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer
