"""ImageNet's folder layout: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG or a flat val with its labels,
listed by imagenet.folder_chunks, the prepare job's own reading (so both take the same files).

The listing is columnar: per split one Arrow table of (name, label), ~50 bytes an image and no Python
object per image, built one class folder at a time. The Ray Data tasks get it by reference
(Source.by_reference): put into the object store once, fetched once per process without a copy.

Unit k of an epoch is files [256k, 256(k+1)) of a permutation of all the split's files: a full
shuffle. An image's index is its file's place in the listing.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.data import imagenet, storage
from pipeline.data.devkit import find_class_words
from pipeline.data.readers.base import (
    SPLITS,
    UNIT_IMAGES,
    Place,
    Reader,
    Rows,
    Source,
    fetched,
    in_sorted,
    permutation,
)

# Object storage answers each GET after tens of milliseconds: a folder task fetches in parallel.
FETCH_THREADS = 16


class FolderReader(Reader):
    kind = "folder"

    @classmethod
    def detect(cls, place: Place) -> bool:
        """train/ holds class folders; one listing of train/ alone, never of everything under the root."""
        train = storage.join(place.root, "train")
        try:
            entries = place.filesystem.get_file_info(pafs.FileSelector(train))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return any(e.type == pafs.FileType.Directory for e in entries)

    @classmethod
    def open(cls, place: Place, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
        uri, fs, root = place.uri, place.filesystem, place.root
        labels_of_val = imagenet.val_labels_finder(imagenet.as_uri(uri, root))
        fingerprint = hashlib.sha256()
        listed: dict[str, tuple[pa.Array, pa.Array]] = {}  # split -> the images' names and wnids
        ignored: list[str] = []
        for split in SPLITS:
            if fs.get_file_info(storage.join(root, split)).type != pafs.FileType.Directory:
                raise FileNotFoundError(
                    f"dataset path {uri!r} has no {split}/ folder; expected {split}/<wnid>/<image>.JPEG, "
                    f"prepared shards (manifest.json), WebDataset tars or Hugging Face Parquet files"
                )
            names, wnids = [], []
            for chunk in imagenet.folder_chunks(fs, root, split, labels_of_val):
                # Every file under the split, ignored ones too, with what it is taken for: a copy of the
                # folder elsewhere has the same fingerprint, a file changed or relabelled another.
                _hash_strings(fingerprint, chunk.names)
                _hash_strings(fingerprint, chunk.wnids)
                fingerprint.update(chunk.sizes.to_numpy().tobytes())
                taken = chunk.images()  # the prepare job's rule, too (imagenet.skip_reason)
                ignored += [storage.join(root, name) for name in chunk.names.filter(pc.invert(taken)).to_pylist()]
                names.append(chunk.names.filter(taken))
                wnids.append(chunk.wnids.filter(taken))
            listed[split] = pa.concat_arrays(names), pa.concat_arrays(wnids)
            del names, wnids  # each chunk's copy: the split's arrays are one piece of memory each now
            if not len(listed[split][0]):
                raise FileNotFoundError(f"dataset path {uri!r} has no images under {split}/<wnid>/")

        classes = pc.unique(listed["train"][1])
        unknown = set(pc.unique(listed["val"][1]).to_pylist()) - set(classes.to_pylist())
        if unknown:
            raise ValueError(f"dataset path {uri!r}: val/ has classes that train/ lacks: {sorted(unknown)[:5]}")
        classes = pc.array_take(classes, pc.sort_indices(classes))
        listings = {
            s: pa.table(
                # each image's path under the root, and its class: its wnid's place among the sorted wnids
                {"name": listed[s][0], "label": pc.index_in(listed[s][1], value_set=classes)},
                metadata={"root": root},
            )
            for s in SPLITS
        }
        wnid_tuple = tuple(classes.to_pylist())
        # What building the listing took (~3x the listing: chunks, their concatenation) Arrow's allocator would
        # keep for later; handed back, the job's later peaks (the listing's put, iterating) do not stack on it.
        pa.default_memory_pool().release_unused()
        return Source(
            uri,
            cls.kind,
            fs,
            files={},  # the listing is the files
            num_classes=len(wnid_tuple),
            wnids=wnid_tuple,
            images={s: listings[s].num_rows for s in SPLITS},
            fingerprint=fingerprint.hexdigest(),
            ignored=tuple(ignored),
            listings=listings,
            words=class_words(uri, wnid_tuple),
        )

    def __init__(self, source: Source, split: str):
        super().__init__(source, split)
        self.listing = listing_table(source.listings[split])

    def num_units(self) -> int:
        return -(-self.listing.num_rows // UNIT_IMAGES)

    def read_unit(self, unit: int, *, seed: int, epoch: int, shuffle: bool, skip: np.ndarray | None = None) -> Rows:
        rows = permutation(self.listing.num_rows, seed, epoch, shuffle)[unit * UNIT_IMAGES : (unit + 1) * UNIT_IMAGES]
        fetched = rows if skip is None else rows[~in_sorted(self.index(rows, 0), skip)]  # a resumed epoch's rest
        fs, root = self.source.filesystem, self.listing.schema.metadata[b"root"].decode()  # where names start
        paths = [storage.join(root, name) for name in self.listing["name"].take(fetched).to_pylist()]
        if isinstance(fs, pafs.LocalFileSystem):
            data = [storage.read_bytes(fs, p) for p in paths]
        else:
            with ThreadPoolExecutor(FETCH_THREADS) as pool:
                data = list(pool.map(lambda p: storage.read_bytes(fs, p), paths))
        if len(fetched) < len(rows):  # the rows left out keep their place, with no bytes
            by_row = dict(zip(fetched.tolist(), data))
            data = [by_row.get(i, b"") for i in rows.tolist()]
        picked = self.listing.take(rows)
        return {
            "jpeg": data,
            "key": [imagenet.image_id_of(self.split, name) for name in picked["name"].to_pylist()],
            "label": picked["label"].to_numpy().astype(np.int64),
            "index": self.index(rows, 0),
        }

    def index(self, piece: Any, row: Any) -> Any:
        """A piece is one file, one image (row 0): the index is the file's place in the listing."""
        return np.asarray(piece, dtype=np.int64) + row


def _hash_strings(hasher, strings: pa.Array) -> None:
    """Feed a string array's offsets and characters to `hasher`: exactly the bytes in use, not the
    buffers, whose spare capacity is not ours to read."""
    _, offsets_buffer, characters = strings.buffers()  # validity (none here), int32 offsets, UTF-8
    offsets = np.frombuffer(offsets_buffer, np.int32)[strings.offset : strings.offset + len(strings) + 1]
    hasher.update((offsets - offsets[0]).tobytes())
    hasher.update(memoryview(characters or b"")[offsets[0] : offsets[-1]])


def listing_table(listing) -> pa.Table:
    """A split's listing: the table itself, or fetched from Ray's object store (Source.by_reference)."""
    return fetched(listing)


def image_keys(source: Source, split: str) -> list[str]:
    """Every image's key (image_id), in listing order: for reports and tests, not for the read path."""
    names = listing_table(source.listings[split])["name"].to_pylist()
    return [imagenet.image_id_of(split, name) for name in names]


def image_paths(source: Source, split: str) -> list[str]:
    """Every image's path in the source's filesystem, in listing order (as image_keys)."""
    listing = listing_table(source.listings[split])
    root = listing.schema.metadata[b"root"].decode()
    return [storage.join(root, name) for name in listing["name"].to_pylist()]


def class_words(uri: str, wnids) -> tuple[str, ...]:
    """The words of each class when the folder holds the devkit or Kaggle's LOC_synset_mapping.txt."""
    words, _ = find_class_words(uri)
    return tuple(words.get(wnid, "") for wnid in wnids) if words else ()
