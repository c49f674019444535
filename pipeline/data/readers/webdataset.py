"""WebDataset tars: <key>.jpg (or .jpeg) + <key>.cls members, files named *train* and *val*.

A unit is one tar, read as a stream through a seeded 256-image shuffle buffer (WebDataset's own
shuffle); the epoch permutes the tars. An image's index is its tar's place in the listing times
2**20 plus its place in the tar. A tar has no footer to count its images or classes from: ImageNet-1k's
1000 classes unless --num-classes says otherwise.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow.fs as pafs

from pipeline.data.readers.base import SPLITS, PieceReader, Place, Rows, Source

IMAGENET_CLASSES = 1000
SHUFFLE_BUFFER = 256


class WebDatasetReader(PieceReader):
    kind = "webdataset"

    @classmethod
    def detect(cls, place: Place) -> bool:
        return any(f.path.endswith(".tar") for f in place.files)

    @classmethod
    def open(cls, place: Place, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
        files, ignored = place.files_by_split(".tar", "WebDataset (<key>.jpg + <key>.cls)")
        return Source(
            place.uri,
            cls.kind,
            place.filesystem,
            files,
            num_classes or IMAGENET_CLASSES,
            (),
            {s: None for s in SPLITS},
            place.listing_hash(),
            None,
            tuple(ignored),
        )

    def num_units(self) -> int:
        return len(self.source.files[self.split])

    def read_piece(self, piece: int, rng: np.random.Generator | None, skip: np.ndarray | None = None) -> Rows:
        path = self.source.files[self.split][piece]
        samples: Iterable = (
            (self.index(piece, row), *sample) for row, sample in enumerate(tar_samples(self.source.filesystem, path))
        )
        if rng is not None:
            samples = shuffle_buffer(samples, SHUFFLE_BUFFER, rng)
        indices, jpeg, keys, labels = [], [], [], []
        for index, key, image, label in samples:
            indices.append(index)
            jpeg.append(image)
            keys.append(key)
            labels.append(label)
        return {
            "jpeg": jpeg,
            "key": keys,
            "label": np.array(labels, dtype=np.int64),
            "index": np.array(indices, dtype=np.int64),
        }


def tar_samples(fs: pafs.FileSystem, path: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) per sample of a WebDataset tar: members <key>.jpg|jpeg and <key>.cls."""
    pending: dict[str, dict[str, bytes]] = {}
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=io.BufferedReader(f, 8 << 20), mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = posixpath.basename(info.name).partition(".")
            key = posixpath.join(posixpath.dirname(info.name), key)
            parts = pending.setdefault(key, {})
            member = tar.extractfile(info)
            assert member is not None  # None only for what is not a file
            parts[suffix.lower()] = member.read()
            image = parts.get("jpg", parts.get("jpeg"))
            if image is not None and "cls" in parts:
                del pending[key]
                yield key, image, int(parts["cls"].decode())
    if pending:
        key = next(iter(pending))
        raise ValueError(
            f"{path}: sample {key!r} has {sorted(pending[key])}, not both an image (.jpg) and a "
            f"label (.cls); {len(pending)} samples are incomplete"
        )


def shuffle_buffer(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
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
