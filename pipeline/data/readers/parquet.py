"""What prepared shards and Hugging Face Parquet share: a piece is one Parquet row group (256 images
in a shard), read whole, its rows permuted per epoch."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import storage
from pipeline.data.readers.base import PIECE_BITS, PieceReader, Rows, fetched, in_sorted

_GROUP_SPAN = 1 << PIECE_BITS  # the indices of one piece: [piece << PIECE_BITS, (piece + 1) << PIECE_BITS)


class RowGroupReader(PieceReader):
    """A PieceReader over Source.row_groups; a format names its columns and turns them into rows."""

    columns: ClassVar[list[str]]

    def rows(self, table: pa.Table, path: str, group: int) -> dict[str, Any]:
        """The format's columns -> {jpeg, key, label}."""
        raise NotImplementedError

    def __init__(self, source, split: str):
        super().__init__(source, split)
        self.row_groups = fetched(source.row_groups[split])  # (path, group) per piece; by reference in a task

    def num_units(self) -> int:
        return len(self.row_groups)

    def read_piece(self, piece: int, rng: np.random.Generator | None, skip: np.ndarray | None = None) -> Rows:
        path, group = self.row_groups[piece]
        if skip is not None and self.all_skipped(piece, path, group, skip):
            # A resumed epoch's group trained on already: its footer read, not its images (MBs).
            return {"jpeg": [], "key": [], "label": np.empty(0, np.int64), "index": np.empty(0, np.int64)}
        batch = self.rows(read_row_group(self.source.filesystem, path, group, self.columns), path, group)
        batch["index"] = self.index(piece, np.arange(len(batch["label"]), dtype=np.int64))
        if rng is not None:
            perm = rng.permutation(len(batch["label"]))
            batch = {
                "jpeg": [batch["jpeg"][i] for i in perm],
                "key": [batch["key"][i] for i in perm],
                "label": batch["label"][perm],
                "index": batch["index"][perm],
            }
        return batch

    def all_skipped(self, piece: int, path: str, group: int, skip: np.ndarray) -> bool:
        """Whether `skip` holds every row of the group; only the file's footer is read to count them."""
        first = int(self.index(piece, 0))
        inside = np.searchsorted(skip, first + _GROUP_SPAN) - np.searchsorted(skip, first)
        if inside == 0:
            return False
        with self.source.filesystem.open_input_file(path) as f:
            rows = pq.ParquetFile(f).metadata.row_group(group).num_rows
        return inside >= rows and bool(in_sorted(self.index(piece, np.arange(rows)), skip).all())


def read_row_group(fs: pafs.FileSystem, path: str, group: int, columns: list[str]) -> pa.Table:
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
        raise ValueError(
            f"{path}: row group {group} cannot be read ({e}). The file is damaged or was replaced "
            f"after it was listed; for prepared shards, re-run jobs/prepare_imagenet.py to rewrite "
            f"it"
        ) from None
