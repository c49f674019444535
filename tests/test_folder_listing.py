"""A folder's listing does not weigh on the driver nor ride in every task (issue 19, item 1): it is
listed one class folder at a time, held as one Arrow table per split, and handed to the Ray Data
tasks by reference. The images, their order and so their crops are what they were: the sorted
listing, permuted per (seed, epoch)."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline.data import imagenet, sources
from pipeline.data.readers import base
from pipeline.data.readers.folder import image_keys, image_paths


def test_a_folder_is_opened_without_listing_everything_under_it(tiny_imagenet, monkeypatch):
    """Place.files lists every file under the root (the Parquet and tar formats look for theirs so); a
    folder of 1.3 M images must never be listed that way, and its classes are listed one by one."""

    def everything(place):
        raise AssertionError(f"listed everything under {place.uri}")

    monkeypatch.setattr(base.Place, "files", property(everything))
    source = sources.open_source(str(tiny_imagenet))
    assert source.kind == "folder" and source.images == {"train": 72, "val": 24}

    fs, root = pafs.LocalFileSystem(), str(tiny_imagenet)
    chunks = list(imagenet.folder_chunks(fs, root, "train", labels=lambda: ({}, "")))
    assert [len(c.names) for c in chunks] == [24, 24, 24, 0]  # one listing per class, then the (no) loose files
    assert [set(c.wnids.to_pylist()) for c in chunks[:3]] == [{w} for w in source.wnids]


def test_the_listing_is_columnar_and_keeps_the_order_of_the_sorted_files(tiny_imagenet):
    source = sources.open_source(str(tiny_imagenet))
    listing = source.listings["train"]
    assert isinstance(listing, pa.Table) and listing.column_names == ["name", "label"]
    assert source.files == {}  # no tuple of paths beside it
    paths = image_paths(source, "train")
    assert paths == sorted(str(p) for p in (tiny_imagenet / "train").rglob("*.JPEG"))
    wnid_of = [p.split("/")[-2] for p in paths]
    assert [source.wnids[label] for label in listing["label"].to_pylist()] == wnid_of

    # Unit k of an epoch: files [256k, 256(k+1)) of the epoch's permutation of that sorted listing.
    order = base.permutation(len(paths), 7, 3, True)
    rows = sources.read_unit(source, "train", 0, seed=7, epoch=3, shuffle=True)
    assert rows["index"].tolist() == order[: base.UNIT_IMAGES].tolist()
    assert rows["key"] == [imagenet.image_id_of("train", paths[i].split("/train/")[1]) for i in order]
    assert rows["label"].tolist() == [source.wnids.index(wnid_of[i]) for i in order]
    with open(paths[order[0]], "rb") as f:
        assert rows["jpeg"][0] == f.read()
    assert image_keys(source, "train") == [imagenet.image_id_of("train", p.split("/train/")[1]) for p in paths]


@pytest.mark.slow  # Ray's object store
def test_read_tasks_get_the_listing_by_reference(ray_session, tiny_imagenet):
    """What every task unpickles is the same few hundred bytes for 72 images as for 7,200: the listing
    is in the object store once, and a task fetches it (once per process) by its reference."""
    import dataclasses

    source = sources.open_source(str(tiny_imagenet))
    bigger = dataclasses.replace(
        source, listings={**source.listings, "train": pa.concat_tables([source.listings["train"]] * 100)}
    )
    inline = [len(pickle.dumps(s)) for s in (source, bigger)]
    shipped = [len(pickle.dumps(s.by_reference("train"))) for s in (source, bigger)]
    assert inline[1] > inline[0] + 100_000  # held inline, the listing grows with the images
    assert abs(shipped[1] - shipped[0]) < 100 and max(shipped) < 4_000, shipped
    assert set(bigger.by_reference("train").listings) == {"train"}  # the other split stays behind

    @ray_session.remote
    def unit_in_a_task(shared, unit):
        return sources.read_unit(shared, "train", unit, seed=7, epoch=3, shuffle=True)["key"]

    shared = bigger.by_reference("train")
    here = [sources.read_unit(bigger, "train", u, seed=7, epoch=3, shuffle=True)["key"] for u in (0, 5)]
    assert ray_session.get([unit_in_a_task.remote(shared, u) for u in (0, 5)]) == here
