"""What every reader shares: the Source it reads, the place a format is found in, and the interface
a format implements (the extension point: a new format is a subclass in a file of its own).

    Source        a dataset on some filesystem, its splits and the pieces each is read in (pickles to
                  every Ray Data task; a folder's listing and the row groups go by reference, by_reference)
    Place         a folder or s3:// / gs:// prefix being opened: its filesystem, and its files, listed once
    Reader        one format's reading of one split: num_units, read_unit, index (the index scheme)
    PieceReader   a Reader whose units are its pieces (Parquet row groups, tars), permuted per epoch

Every reader yields the same rows: {jpeg: encoded bytes, key: a name for reports, label: int64,
index: int64}. `index` names an image within its split whatever the epoch's order, so a checkpoint
taken mid-epoch can record the images the workers consumed and the resumed epoch reads past exactly
those (plan.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, ClassVar

import numpy as np
import pyarrow.fs as pafs

from pipeline.data import shards, storage

SPLITS = ("train", "val")
# Images per read unit of a folder, as in a shard's row group (shards.ROW_GROUP_SIZE): 0.1-0.3 s of
# decoding on one core, so the first batch comes soon after the first unit starts.
UNIT_IMAGES = shards.ROW_GROUP_SIZE
# index = piece << PIECE_BITS | row, for Parquet row groups and tars (a million images a piece at most).
PIECE_BITS = 20

# {jpeg: list[bytes], key: list[str], label: (N,) int64, index: (N,) int64}
Rows = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """A dataset on some filesystem, split into train and val, and the pieces each split is read in."""

    uri: str
    kind: str  # a reader's kind: shards | huggingface | webdataset | folder
    filesystem: pafs.FileSystem
    files: dict[str, tuple[str, ...]]  # split -> image files, or shard / tar files
    num_classes: int
    wnids: tuple[str, ...] = ()  # sorted, when the source names its classes
    images: dict[str, int | None] = field(default_factory=dict)  # split -> count, when known
    fingerprint: str = ""  # manifest sha256, or a hash of the listing
    lighting: dict | None = None  # §4.1 PCA computed from this data, if any
    ignored: tuple[str, ...] = ()  # files found but not read, reported by name
    # folder: split -> its listing, columnar (a pyarrow Table: name, label), or an ObjectRef to it (by_reference)
    listings: dict[str, Any] = field(default_factory=dict)
    row_groups: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # Parquet: (file, group)
    words: tuple[str, ...] = ()  # a readable name per class, in wnids' order, when the data carries them

    def class_index(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    def by_reference(self, split: str | None = None) -> Source:
        """This Source as Ray tasks take it: what it holds per image or per piece (a folder's listing, the
        Parquet formats' row groups: 55,866 of them at ImageNet-21k's size) put into Ray's object store
        once, and only ObjectRefs in the Source every task unpickles (the readers fetch them once per
        process, without a copy). With `split`, the other splits' are left out. The driver calls it once
        after connecting to Ray; the plans call it per split."""
        import ray

        def shared(per_split: dict[str, Any]) -> dict[str, Any]:
            kept = {s: v for s, v in per_split.items() if split is None or s == split}
            return {s: v if isinstance(v, ray.ObjectRef) else ray.put(v) for s, v in kept.items()}

        return dataclasses.replace(self, listings=shared(self.listings), row_groups=shared(self.row_groups))


def fetched(value: Any) -> Any:
    """A Source's per-split value as a reader uses it: itself, or fetched from Ray's object store once per
    process (by_reference)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not isinstance(value, ray.ObjectRef):
        return value
    return _fetch(value)


@lru_cache(maxsize=8)
def _fetch(ref: Any) -> Any:
    import ray

    return ray.get(ref)  # zero-copy for Arrow and NumPy buffers: they stay in the object store's shared memory


class Place:
    """A folder or s3:// / gs:// prefix that open_source is finding the format of; checked to exist."""

    def __init__(self, uri: str):
        fs, root = storage.resolve(uri)
        try:
            info = fs.get_file_info(root)
        except OSError as e:  # e.g. a bucket that does not exist, or credentials it refuses
            raise FileNotFoundError(f"dataset path {uri!r} cannot be read: {e}") from None
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"dataset path {uri!r} does not exist")
        if info.type != pafs.FileType.Directory:
            raise NotADirectoryError(f"dataset path {uri!r} is not a folder")
        self.uri, self.filesystem, self.root = uri, fs, root

    def is_file(self, relative: str) -> bool:
        return self.filesystem.get_file_info(storage.join(self.root, relative)).type == pafs.FileType.File

    @cached_property
    def files(self) -> list[pafs.FileInfo]:
        """Every file under the root, listed when a format first asks (prepared shards never do)."""
        listing = self.filesystem.get_file_info(pafs.FileSelector(self.root, recursive=True))
        return [f for f in listing if f.type == pafs.FileType.File]

    def listing_hash(self) -> str:
        """sha256 over every file's path (relative to the root, so a copy elsewhere matches) and size."""
        lines = sorted(f"{f.path.removeprefix(self.root)}\t{f.size}\n" for f in self.files)
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def files_by_split(self, extension: str, layout: str) -> tuple[dict[str, tuple[str, ...]], list[str]]:
        """The files ending in `extension` per split, by "train" / "val" in their path; the others, ignored."""
        files: dict[str, list[str]] = {s: [] for s in SPLITS}
        ignored: list[str] = []
        for f in sorted(self.files, key=lambda f: f.path):
            split = _split_of(f.path) if f.path.endswith(extension) else None
            (files[split] if split else ignored).append(f.path)
        for split in SPLITS:
            if not files[split]:
                raise FileNotFoundError(
                    f"dataset path {self.uri!r} looks like {layout} but has no {split} files "
                    f"(*{extension} with {split!r} in the name)"
                )
        return {s: tuple(v) for s, v in files.items()}, ignored


def _split_of(path: str) -> str | None:
    name = path.lower()
    if "train" in name:
        return "train"
    if "val" in name:  # "val", "validation"
        return "val"
    return None


class Reader:
    """One format: how a Place holding it is opened into a Source, and how a split of that Source is
    read in independent units. Subclass it in a file of its own and name it in readers.READERS.

    Unit k of an epoch, and everything in it, is a function of (seed, epoch, k): every epoch a fresh
    order, the same for the same seed, and every image exactly once per epoch. shuffle=False reads
    in listing order (validation).
    """

    kind: ClassVar[str]  # Source.kind, and the registry's key
    has_manifest: ClassVar[bool] = False  # whether opening can check a manifest's sha256 (--manifest-sha256)

    @classmethod
    def detect(cls, place: Place) -> bool:
        """Whether `place` holds this format (open_source asks the formats in readers.READERS order)."""
        raise NotImplementedError

    @classmethod
    def open(cls, place: Place, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
        """The Source at `place`; clear errors, within seconds, for a missing split, file or class.
        num_classes: for formats that cannot list their classes; manifest_sha256: see has_manifest."""
        raise NotImplementedError

    def __init__(self, source: Source, split: str):
        self.source, self.split = source, split

    def num_units(self) -> int:
        """How many independent read units one epoch of the split is cut into."""
        raise NotImplementedError

    def read_unit(self, unit: int, *, seed: int, epoch: int, shuffle: bool, skip: np.ndarray | None = None) -> Rows:
        """The rows of read unit `unit` of `epoch`. skip: sorted indices a resumed epoch leaves out; a reader
        need not fetch their images (it may hand their rows on with empty bytes, or none of a unit's rows
        when it skips them all; the caller leaves them out either way)."""
        raise NotImplementedError

    def index(self, piece: Any, row: Any) -> Any:
        """The index scheme: the number of row `row` of piece `piece` (its place in the split's listing),
        the same in every epoch. Resume leaves out the indices a checkpoint says were trained on."""
        return (piece << PIECE_BITS) + row

    def unit_rng(self, unit: int, seed: int, epoch: int) -> np.random.Generator:
        """The randomness of one unit's order within it: its own stream, so units read in any order agree."""
        return np.random.default_rng([seed, epoch, SPLITS.index(self.split), unit])


class PieceReader(Reader):
    """A format whose pieces (Parquet row groups, tars) are its read units: the epoch permutes the
    pieces and read_piece orders the rows within one."""

    def num_units(self) -> int:
        raise NotImplementedError

    def read_piece(self, piece: int, rng: np.random.Generator | None, skip: np.ndarray | None = None) -> Rows:
        """Every row of piece `piece` with its index; in an order drawn from rng, or as stored if None. skip:
        as read_unit's (a format that cannot tell what a piece holds before reading it reads it whole)."""
        raise NotImplementedError

    def read_unit(self, unit: int, *, seed: int, epoch: int, shuffle: bool, skip: np.ndarray | None = None) -> Rows:
        piece = int(permutation(self.num_units(), seed, epoch, shuffle)[unit])
        return self.read_piece(piece, self.unit_rng(unit, seed, epoch) if shuffle else None, skip)


def in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """np.isin(values, sorted_values) for a sorted, unique second array (a resumed epoch's skip list): a binary
    search per value, where np.isin sorts both arrays together every call (a unit of 256 images against
    ImageNet-21k's 7 M skipped indices: ~0.5 s, for every unit of the epoch)."""
    values = np.asarray(values)
    if not len(sorted_values):
        return np.zeros(values.shape, dtype=bool)
    at = np.searchsorted(sorted_values, values)
    return sorted_values[np.minimum(at, len(sorted_values) - 1)] == values


@lru_cache(maxsize=4)
def permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """A fixed function of (n, seed, epoch); cached, as every unit of an epoch asks for the same one."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)
