"""Prepared shards (jobs/prepare_imagenet.py): manifest.json + train/*.parquet, val/*.parquet.

A unit is one row group (256 images), its rows permuted per epoch; a shard mixes all classes, because
the prepare job assigns images to shards by a hash of their id. An image's index is its row group's
place in the manifest's listing times 2**20 plus its row in the group.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data import shards, storage
from pipeline.data.readers.base import SPLITS, Place, Source
from pipeline.data.readers.parquet import RowGroupReader


class ShardsReader(RowGroupReader):
    kind = "shards"
    has_manifest = True
    columns = ["image_id", "jpeg", "label"]

    @classmethod
    def detect(cls, place: Place) -> bool:
        return place.is_file(shards.MANIFEST)  # without listing the bucket

    @classmethod
    def open(cls, place: Place, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
        uri, fs, root = place.uri, place.filesystem, place.root
        manifest, sha = shards.read_manifest(fs, root)
        if manifest_sha256 and manifest_sha256 != sha:
            raise ValueError(
                f"{uri}/{shards.MANIFEST} has sha256 {sha}, not the {manifest_sha256} asked for "
                f"(--manifest-sha256): the data changed since that run"
            )
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
                    raise ValueError(
                        f"shard {shard['path']} is {info.size} bytes but {uri}/{shards.MANIFEST} "
                        f"says {shard['bytes']}: it does not match the manifest"
                    )
            files[split] = tuple(paths)
            # The shard format writes row groups of ROW_GROUP_SIZE: the manifest's row counts give them
            # without reading a footer (a thousand GETs on object storage).
            groups[split] = tuple(
                (path, g) for path, s in zip(paths, listed) for g in range(-(-s["rows"] // shards.ROW_GROUP_SIZE))
            )
        classes = tuple(manifest["classes"])
        return Source(
            uri,
            cls.kind,
            fs,
            files,
            len(classes),
            classes,
            {s: manifest["splits"][s]["images"] for s in SPLITS},
            sha,
            manifest.get("lighting"),
            row_groups=groups,
            words=tuple(manifest.get("words", ())),
        )

    def rows(self, table: pa.Table, path: str, group: int) -> dict[str, Any]:
        return {
            "jpeg": table.column("jpeg").to_pylist(),
            "key": table.column("image_id").to_pylist(),
            "label": table.column("label").to_numpy().astype(np.int64),
        }
