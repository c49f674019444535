"""Where the images come from: what a URI holds, and how it is read in independent pieces.

    open_source(uri)                      the Source a local folder or s3:// prefix holds
    num_units(source, split)              how many read units an epoch of the split is cut into
    read_unit(source, split, unit, ...)   the rows of one unit of one epoch
    Source, SPLITS                        (readers/base.py)

open_source finds which layout the URI holds, asking each format's reader in turn (readers/):

    shards        manifest.json + train/*.parquet, val/*.parquet (jobs/prepare_imagenet.py)
    huggingface   imagenet-1k's Parquet layout: image.bytes + label, files named train-* / validation-*
    webdataset    tar shards of <key>.jpg + <key>.cls, files named *train* / *val*
    folder        ImageNet layout: train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG or a flat val with its
                  labels, read by imagenet.folder_members, the prepare job's own reading

A split is read in `num_units` independent read units (a Ray Data task reads a few, plan.py).
Unit k of an epoch is:

    folder        files [256k, 256(k+1)) of a permutation of all the split's files   a full shuffle
    shards, hf    one Parquet row group (256 images in a shard), its rows permuted
    webdataset    one tar, through a 256-image shuffle buffer

The permutations are drawn from (seed, epoch): every epoch a fresh order of samples, the same for
the same seed, and every image exactly once per epoch. (A shard mixes all classes, because the
prepare job assigns images to shards by a hash of their id.) Every reader yields the same rows:
{jpeg: encoded bytes, key: a name for reports, label: int64, index: int64}. `index` names an image
within its split whatever the epoch's order (a file's place in the listing, or a shard's / tar's place
times 2**20 plus the row's place in it: Reader.index): a checkpoint taken mid-epoch records the indices
the workers consumed, and the resumed epoch reads past exactly those (plan.py).
"""

from __future__ import annotations

import numpy as np

from pipeline.data import readers, shards
from pipeline.data.readers.base import SPLITS, UNIT_IMAGES, Place, Rows, Source
from pipeline.data.readers.parquet import read_row_group as _parquet_group  # noqa: F401  (test_storage_faults)

__all__ = ["SPLITS", "UNIT_IMAGES", "Source", "open_source", "scan_image_folder", "num_units", "read_unit"]


def open_source(uri: str, *, num_classes: int = 0, manifest_sha256: str = "") -> Source:
    """Find what `uri` holds; clear errors, within seconds, for a missing path, shard or class.

    num_classes: for formats that do not name their classes (WebDataset; Hugging Face's footers say).
    manifest_sha256: the prepared shards' manifest must have this sha256 (--manifest-sha256).
    """
    place = Place(uri)
    reader = readers.detect(place)
    if manifest_sha256 and not reader.has_manifest:
        raise ValueError(f"--manifest-sha256 was given but {uri!r} has no {shards.MANIFEST}")
    return reader.open(place, num_classes=num_classes, manifest_sha256=manifest_sha256)


def scan_image_folder(uri: str) -> Source:
    """An ImageNet-layout folder: <root>/{train,val}/<wnid>/<image>."""
    return readers.reader_class("folder").open(Place(uri))


def num_units(source: Source, split: str) -> int:
    """How many independent read units one epoch of the split is cut into."""
    return readers.reader(source, split).num_units()


def read_unit(
    source: Source, split: str, unit: int, *, seed: int, epoch: int, shuffle: bool, skip: np.ndarray | None = None
) -> Rows:
    """The rows of read unit `unit` of `epoch` (see the module docstring); shuffle=False reads in file order.
    skip: sorted indices a resumed epoch leaves out, whose images need not be fetched (Reader.read_unit)."""
    return readers.reader(source, split).read_unit(unit, seed=seed, epoch=epoch, shuffle=shuffle, skip=skip)
