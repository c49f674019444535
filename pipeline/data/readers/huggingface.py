"""Hugging Face imagenet-1k's Parquet layout: image {bytes, path} + label, files named train-* and
validation-* (any folder under the root).

A unit is one row group, its rows permuted per epoch; an image's index is its row group's place in
the listing times 2**20 plus its row in the group. The classes are numbered by the label column;
their count comes from the footers' statistics unless --num-classes says.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.readers.base import SPLITS, Place, Source
from pipeline.data.readers.parquet import RowGroupReader


class HuggingFaceReader(RowGroupReader):
    kind = "huggingface"
    columns = ["image", "label"]

    @classmethod
    def detect(cls, place: Place) -> bool:
        return any(f.path.endswith(".parquet") for f in place.files)

    @classmethod
    def open(cls, place: Place, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
        fs = place.filesystem
        files, ignored = place.files_by_split(".parquet", "Hugging Face Parquet (image.bytes + label)")
        images: dict[str, int | None] = {}
        groups: dict[str, list[tuple[str, int]]] = {}
        max_label = -1
        for split in SPLITS:
            count, groups[split] = 0, []
            for path in files[split]:
                with fs.open_input_file(path) as f:
                    meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
                if "image" not in schema.names or "label" not in schema.names:
                    raise ValueError(
                        f"{path} has columns {schema.names}; Hugging Face imagenet-1k Parquet has "
                        f"'image' (struct with 'bytes') and 'label'"
                    )
                count += meta.num_rows
                groups[split] += [(path, g) for g in range(meta.num_row_groups)]
                # Parquet counts leaf columns: image.bytes and image.path come before label.
                column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == "label")
                for g in range(meta.num_row_groups):  # the label range from the footer, not the data
                    stats = meta.row_group(g).column(column).statistics
                    if stats is not None and stats.has_min_max:
                        max_label = max(max_label, int(stats.max))
            images[split] = count
        return Source(
            place.uri,
            cls.kind,
            fs,
            files,
            num_classes or max(max_label + 1, 1),
            (),
            images,
            place.listing_hash(),
            None,
            tuple(ignored),
            row_groups={s: tuple(g) for s, g in groups.items()},
        )

    def rows(self, table: pa.Table, path: str, group: int) -> dict[str, Any]:
        images = table.column("image").to_pylist()
        name = posixpath.basename(path)
        return {
            "jpeg": [image["bytes"] for image in images],
            "key": [image.get("path") or f"{name}#{group}.{i}" for i, image in enumerate(images)],
            "label": table.column("label").to_numpy().astype(np.int64),
        }
