"""ImageNet's folder layout: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG or a flat val with its labels,
listed by imagenet.folder_members, the prepare job's own reading (so both take the same files).

Unit k of an epoch is files [256k, 256(k+1)) of a permutation of all the split's files: a full
shuffle. An image's index is its file's place in the sorted listing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from pipeline.data import imagenet, storage
from pipeline.data.devkit import find_class_words
from pipeline.data.readers.base import SPLITS, UNIT_IMAGES, Place, Reader, Rows, Source, permutation

# Object storage answers each GET after tens of milliseconds: a folder task fetches in parallel.
FETCH_THREADS = 16


class FolderReader(Reader):
    kind = "folder"

    @classmethod
    def detect(cls, place: Place) -> bool:
        return True  # what is left when no other format claims the place; open says what is missing

    @classmethod
    def open(cls, place: Place, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
        uri, fs, root = place.uri, place.filesystem, place.root
        labels_of_val = imagenet.val_labels_finder(imagenet.as_uri(uri, root))
        members: dict[str, list[imagenet.Member]] = {}
        ignored: list[str] = []
        for split in SPLITS:
            if fs.get_file_info(storage.join(root, split)).type != pafs.FileType.Directory:
                raise FileNotFoundError(
                    f"dataset path {uri!r} has no {split}/ folder; expected {split}/<wnid>/<image>.JPEG, "
                    f"prepared shards (manifest.json), WebDataset tars or Hugging Face Parquet files"
                )
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
            uri,
            cls.kind,
            fs,
            files={s: tuple(storage.join(root, m.name) for m in members[s]) for s in SPLITS},
            num_classes=len(wnids),
            wnids=wnids,
            images={s: len(members[s]) for s in SPLITS},
            fingerprint=place.listing_hash(),
            ignored=tuple(ignored),
            labels={s: tuple(index[m.wnid] for m in members[s]) for s in SPLITS},
            keys={s: tuple(imagenet.image_id_of(s, m.name) for m in members[s]) for s in SPLITS},
            words=class_words(uri, wnids),
        )

    def num_units(self) -> int:
        return -(-len(self.source.files[self.split]) // UNIT_IMAGES)

    def read_unit(self, unit: int, *, seed: int, epoch: int, shuffle: bool, skip: np.ndarray | None = None) -> Rows:
        files = permutation(len(self.source.files[self.split]), seed, epoch, shuffle)
        rows = files[unit * UNIT_IMAGES : (unit + 1) * UNIT_IMAGES]
        source, split = self.source, self.split
        fetched = rows if skip is None else rows[~np.isin(self.index(rows, 0), skip)]  # a resumed epoch's rest
        paths = [source.files[split][i] for i in fetched]
        fs = source.filesystem
        if isinstance(fs, pafs.LocalFileSystem):
            data = [storage.read_bytes(fs, p) for p in paths]
        else:
            with ThreadPoolExecutor(FETCH_THREADS) as pool:
                data = list(pool.map(lambda p: storage.read_bytes(fs, p), paths))
        if len(fetched) < len(rows):  # the rows left out keep their place, with no bytes
            by_row = dict(zip(fetched.tolist(), data))
            data = [by_row.get(i, b"") for i in rows.tolist()]
        return {
            "jpeg": data,
            "key": [source.keys[split][i] for i in rows],
            "label": np.array([source.labels[split][i] for i in rows], dtype=np.int64),
            "index": self.index(rows, 0),
        }

    def index(self, piece: Any, row: Any) -> Any:
        """A piece is one file, one image (row 0): the index is the file's place in the listing."""
        return np.asarray(piece, dtype=np.int64) + row


def class_words(uri: str, wnids) -> tuple[str, ...]:
    """The words of each class when the folder holds the devkit or Kaggle's LOC_synset_mapping.txt."""
    words, _ = find_class_words(uri)
    return tuple(words.get(wnid, "") for wnid in wnids) if words else ()
