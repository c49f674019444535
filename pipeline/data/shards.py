"""The prepared shard format: Parquet files of JPEG bytes, and the manifest that vouches for them.

    <out>/manifest.json                   written last: its presence means the set is complete
    <out>/train/part-00000.parquet        image_id, key, label, wnid, jpeg, width, height
    <out>/train/part-00000.json           the shard's sidecar: rows, bytes, sha256, class counts,
                                          bad files, and the options it was written with
    <out>/val/...

An image's shard is a hash of its image_id, so every shard mixes all classes (training reads
whole shards in shuffled order and must not see one class at a time) and a re-run knows, before
reading any input, which images belong to shards that are already complete.

Every file says it is ours (the format name in the Parquet schema's metadata, the sidecar and the
manifest), so a re-run rewrites only its own files and reports anything else found at their names;
and every Parquet page carries a CRC, so a shard damaged after its manifest fails when it is read,
naming it, instead of handing training different bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import storage

FORMAT = "alexnet-ray/imagenet-shards"
VERSION = 1
MANIFEST = "manifest.json"
# Images per Parquet row group: the unit a training task reads (sources.py), ~10-30 MB of JPEG.
ROW_GROUP_SIZE = 256
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # imagenet.image_id_of: "train/n01440764_10026", unique, stable
        ("key", pa.string()),  # the original file name
        ("label", pa.int32()),  # position of the wnid in sorted order, the standard ImageNet index
        ("wnid", pa.string()),
        ("jpeg", pa.binary()),  # an RGB JPEG: as it came, or converted / resized by the prepare job
        ("width", pa.int32()),  # of the original image
        ("height", pa.int32()),
    ],
    metadata={"format": FORMAT},
)


def shard_of(image_id: str, num_shards: int) -> int:
    """A stable hash (not Python's salted hash()) of the image_id, modulo the shard count."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big") % num_shards


def shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}"


class ShardWriter:
    """One shard, written as its rows arrive (in image_id order): every ROW_GROUP_SIZE rows become a
    Parquet row group at once, so memory holds the file so far and one group, not every row twice."""

    def __init__(self, split: str, index: int):
        self.split, self.index = split, index
        self._sink = pa.BufferOutputStream()
        # JPEG bytes do not compress; the other columns are tiny.
        self._writer = pq.ParquetWriter(self._sink, SCHEMA, compression="none", write_page_checksum=True)
        self._group: list[dict[str, Any]] = []
        self._last_id: str | None = None
        self.rows = 0
        self.per_class: Counter = Counter()

    def add(self, row: dict[str, Any]) -> None:
        if self._last_id is not None and row["image_id"] <= self._last_id:
            raise ValueError(
                f"shard rows must come in increasing image_id order: {row['image_id']!r} after {self._last_id!r}"
            )
        self._last_id = row["image_id"]
        self._group.append(row)
        self.rows += 1
        self.per_class[row["wnid"]] += 1
        if len(self._group) == ROW_GROUP_SIZE:
            self._flush()

    def _flush(self) -> None:
        if self._group:
            group = pa.table({name: [r[name] for r in self._group] for name in SCHEMA.names}, schema=SCHEMA)
            self._writer.write_table(group, row_group_size=ROW_GROUP_SIZE)
            self._group = []

    def finish(
        self, fs: pafs.FileSystem, root: str, bad: list[dict[str, str]], options: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the shard, then its sidecar (last: it marks the shard complete); returns the sidecar."""
        self._flush()
        self._writer.close()
        data = self._sink.getvalue()  # an Arrow buffer: bytes-like, not copied again
        name = shard_name(self.split, self.index)
        storage.write_bytes(fs, storage.join(root, f"{name}.parquet"), data)
        sidecar = {
            "format": FORMAT,
            "path": f"{name}.parquet",
            "split": self.split,
            "index": self.index,
            "rows": self.rows,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "per_class": dict(sorted(self.per_class.items())),
            "converted": sum(1 for b in bad if b["action"] == "converted"),
            "bad_files": sorted(bad, key=lambda b: b["image_id"]),
            "options": options,
        }
        storage.write_bytes(fs, storage.join(root, f"{name}.json"), json.dumps(sidecar, indent=1).encode())
        return sidecar


def complete_shards(
    fs: pafs.FileSystem, root: str, split: str, options: dict[str, Any], num_shards: int
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Sidecars of shards that a previous run finished with the same options, verified by sha256;
    and the files at this split's shard names that this job did not write, each with why (to be
    reported, never overwritten).

    A shard of ours whose file is missing, differs from its sidecar's hash, or was written with
    other options is not complete and will be written again.
    """
    done, foreign = {}, []
    for index in range(num_shards):
        name = shard_name(split, index)
        sidecar_path, shard_path = storage.join(root, f"{name}.json"), storage.join(root, f"{name}.parquet")
        sidecar_info, shard_info = fs.get_file_info([sidecar_path, shard_path])
        if sidecar_info.type == pafs.FileType.File:
            sidecar, problem = _read_sidecar(fs, sidecar_path, name)
            if problem:
                foreign.append(f"{name}.json ({problem})")
            elif (
                sidecar["options"] == options
                and shard_info.type == pafs.FileType.File
                and storage.sha256_of(fs, shard_path) == sidecar["sha256"]
            ):
                done[index] = sidecar
        elif shard_info.type == pafs.FileType.File and not _is_our_shard(fs, shard_path):
            # No sidecar: ours if a run stopped between the two writes, which its footer tells.
            foreign.append(f"{name}.parquet (not an {FORMAT} shard, and no sidecar)")
    return done, foreign


def _read_sidecar(fs: pafs.FileSystem, path: str, name: str) -> tuple[dict[str, Any], str]:
    """The sidecar at `path`, and "" if it is one this format wrote for shard `name`, else what it is."""
    try:
        sidecar = json.loads(storage.read_bytes(fs, path))
    except ValueError:  # not UTF-8, or not JSON
        return {}, "not JSON"
    if not isinstance(sidecar, dict):
        return {}, f"JSON {type(sidecar).__name__}, not an {FORMAT} sidecar"
    # Sidecars from before the format field was added match on their fields alone.
    if sidecar.get("format", FORMAT) != FORMAT:
        return {}, f"format {sidecar['format']!r}, not {FORMAT!r}"
    missing = sorted({"path", "split", "index", "rows", "bytes", "sha256", "options"} - sidecar.keys())
    if missing:
        return {}, f"not an {FORMAT} sidecar: no {', '.join(map(repr, missing))}"
    if sidecar["path"] != f"{name}.parquet":
        return {}, f"describes {sidecar['path']!r}, not {name}.parquet"
    return sidecar, ""


def _is_our_shard(fs: pafs.FileSystem, path: str) -> bool:
    try:
        with fs.open_input_file(path) as f:
            metadata = pq.read_schema(f).metadata or {}
    except pa.ArrowInvalid:  # not Parquet at all
        return False
    return metadata.get(b"format") == FORMAT.encode()


def foreign_manifest(fs: pafs.FileSystem, root: str) -> str:
    """What the file at <root>/manifest.json is, if it is not a manifest of this format; "" otherwise."""
    path = storage.join(root, MANIFEST)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return ""
    _, problem = _parse_manifest(storage.read_bytes(fs, path))
    return f"{MANIFEST} ({problem})" if problem else ""


def build_manifest(
    *,
    source: str,
    classes: list[str],
    sidecars: dict[str, list[dict[str, Any]]],
    options: dict[str, Any],
    val_labels: str | None,
) -> dict[str, Any]:
    """The manifest from every shard's sidecar. Counts add up: inputs = images written + skipped."""
    splits = {}
    bad_files = []
    for split, cars in sidecars.items():
        cars = sorted(cars, key=lambda c: c["index"])
        per_class: Counter = Counter()
        for car in cars:
            per_class.update(car["per_class"])
            bad_files += [{**b, "split": split} for b in car["bad_files"]]
        images = sum(c["rows"] for c in cars)
        skipped = sum(1 for c in cars for b in c["bad_files"] if b["action"] == "skipped")
        splits[split] = {
            "inputs": images + skipped,
            "images": images,
            "skipped": skipped,
            "converted": sum(c["converted"] for c in cars),
            "bytes": sum(c["bytes"] for c in cars),
            "per_class": dict(sorted(per_class.items())),
            "shards": [{k: c[k] for k in ("path", "rows", "bytes", "sha256")} for c in cars],
        }
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "val_labels": val_labels,
        "classes": classes,
        "splits": splits,
        "bad_files": bad_files,
        "options": options,
        "lighting": None,
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


def read_manifest(fs: pafs.FileSystem, root: str) -> tuple[dict[str, Any], str]:
    """The manifest and the sha256 of its bytes (the data's lineage in MLflow)."""
    path = storage.join(root, MANIFEST)
    data = storage.read_bytes(fs, path)
    manifest, problem = _parse_manifest(data)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return manifest, hashlib.sha256(data).hexdigest()


def _parse_manifest(data: bytes) -> tuple[dict[str, Any], str]:
    """The manifest in `data`, and "" if it is one of this format, else what it is instead."""
    try:
        manifest = json.loads(data)
    except ValueError:  # not UTF-8, or not JSON
        return {}, f"not JSON, so not an {FORMAT} manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return {}, f"not an {FORMAT} manifest"
    return manifest, ""
