"""A resumed epoch reads only what it trains on: the images a checkpoint says were trained on already are
neither fetched nor decoded (issue 19, item 3). The readers are counted, not replaced: storage.read_bytes
for a folder's files, read_row_group for a shard's groups."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import prepare, sources, storage
from pipeline.data.readers import parquet


def read_all(source, skip=None) -> dict[int, bytes]:
    """index -> bytes of every row epoch 3 hands on, unit by unit, with `skip` left out as plan.py does."""
    rows = {}
    for unit in range(sources.num_units(source, "train")):
        got = sources.read_unit(source, "train", unit, seed=7, epoch=3, shuffle=True, skip=skip)
        for index, jpeg in zip(got["index"].tolist(), got["jpeg"]):
            if skip is None or index not in set(skip.tolist()):
                rows[index] = jpeg
    return rows


def test_a_folder_fetches_only_the_files_a_resumed_epoch_trains_on(tiny_imagenet, monkeypatch):
    source = sources.open_source(str(tiny_imagenet))
    everything = read_all(source)
    skip = np.array(sorted(everything)[::2], dtype=np.int64)  # half the epoch trained on before the restart
    fetched = []
    read_bytes = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda fs, path: fetched.append(path) or read_bytes(fs, path))
    rest = read_all(source, skip)
    assert rest == {i: b for i, b in everything.items() if i not in set(skip.tolist())}  # the same bytes
    assert len(fetched) == len(everything) - len(skip)


@pytest.mark.slow  # prepares shards (a Ray Data job)
def test_a_shard_group_trained_on_already_is_not_read(ray_session, tiny_imagenet, tmp_path, monkeypatch):
    prepare.prepare(str(tiny_imagenet), str(tmp_path / "shards"), target_mb=0.05, log=lambda m: None)
    source = sources.open_source(str(tmp_path / "shards"))
    everything = read_all(source)
    first_unit = sources.read_unit(source, "train", 0, seed=7, epoch=3, shuffle=True)["index"]
    skip = np.sort(np.concatenate([first_unit, sorted(everything)[-1:]]))  # one whole group, one row of another
    groups = []
    read_row_group = parquet.read_row_group
    monkeypatch.setattr(parquet, "read_row_group", lambda *a, **k: groups.append(a[1:3]) or read_row_group(*a, **k))
    rest = read_all(source, skip)
    assert rest == {i: b for i, b in everything.items() if i not in set(skip.tolist())}
    assert len(groups) == sources.num_units(source, "train") - 1  # every group but the one trained on


def test_in_sorted_is_isin_for_a_sorted_skip_list():
    """The skip list is sorted and unique (plan.start_at): a binary search per image replaces np.isin, which
    sorted the whole list again for every unit (the time of a resumed epoch grew with the list)."""
    from pipeline.data.readers.base import in_sorted

    rng = np.random.default_rng(0)
    skip = np.unique(rng.integers(0, 5_000, 2_000))
    for values in (rng.integers(-10, 5_010, 300), np.array([], dtype=np.int64), skip[:5], np.array([5_000, -1])):
        assert np.array_equal(in_sorted(values, skip), np.isin(values, skip))
    assert not in_sorted(np.arange(3), np.array([], dtype=np.int64)).any()
