"""One reader per input format, chosen by Source.kind (timm's reader_factory, in this pipeline's terms).

    kind          file             a read unit of an epoch
    shards        shards.py        one Parquet row group of a prepared shard, its rows permuted
    huggingface   huggingface.py   one Parquet row group, its rows permuted
    webdataset    webdataset.py    one tar, through a 256-image shuffle buffer
    folder        folder.py        256 files of a permutation of all the split's files

    reader(source, split)   the Reader of a split: num_units(), read_unit(unit, seed=, epoch=, shuffle=),
                            index(piece, row) (base.py)
    detect(place)           the Reader class of the first format in READERS that claims the place
                            (else the folder's, whose open() names what is missing)

A format is a Reader subclass in a file of its own, named in READERS at the place open_source should
try it; its module is imported only when a source of that kind is opened or read.
"""

from __future__ import annotations

import importlib
from functools import cache

from pipeline.data.readers.base import Place, Reader, Source

# kind -> "module:class". Tried in this order: prepared shards are Parquet files too (their manifest
# tells them apart); a folder with class folders under train/ is told by one listing of train/, before
# the formats that must list everything under the root to find their files (1.3 million for ImageNet).
READERS = {
    "shards": "shards:ShardsReader",
    "folder": "folder:FolderReader",
    "huggingface": "huggingface:HuggingFaceReader",
    "webdataset": "webdataset:WebDatasetReader",
}
# What is left when no format claims a place: its open() says what is missing.
FALLBACK = "folder"


@cache
def reader_class(kind: str) -> type[Reader]:
    if kind not in READERS:
        raise ValueError(f"no reader for a source of kind {kind!r}; readers: {', '.join(READERS)}")
    module, name = READERS[kind].split(":")
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    assert cls.kind == kind, f"{READERS[kind]} reads kind {cls.kind!r}, registered as {kind!r}"
    return cls


def reader(source: Source, split: str) -> Reader:
    return reader_class(source.kind)(source, split)


def detect(place: Place) -> type[Reader]:
    for kind in READERS:
        cls = reader_class(kind)
        if cls.detect(place):
            return cls
    return reader_class(FALLBACK)
