"""Reading s3:// through a store that throttles, drops connections and cuts responses short
(tests/fault_proxy.py in front of moto's server): the same rows, batches and shards as without
faults, the retries counted; and what is not transient (a missing object, a damaged shard, a store
that never recovers) fails at once, naming the object."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import boto3
import numpy as np
import pytest
import ray
from fault_proxy import FaultProxy

from conftest import make_bucket, upload_folder
from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import imagenet, prepare, shards, sources, storage
from pipeline.data.readers.folder import image_keys

# ~5% of requests throttled, ~1% of responses dropped mid-body, ~2% cut short: a bad hour on a busy bucket.
RATES = {"slow_down": 0.05, "reset": 0.01, "truncate": 0.02}
CFG = dataclasses.replace(PRESETS["sample"], resize_size=80, crop_size=67, seed=3, deterministic=True)


@pytest.fixture(scope="module")
def uris(ray_session, s3_server, tiny_imagenet):
    """The tiny data set on S3 as a folder and as prepared shards (several, one row group each)."""
    bucket = make_bucket("faults")
    upload_folder(tiny_imagenet, f"{bucket}/folder")
    prepare.prepare(str(tiny_imagenet), f"{bucket}/shards", target_mb=0.05, log=lambda m: None)
    return {"folder": f"{bucket}/folder", "shards": f"{bucket}/shards"}


@pytest.fixture
def faulty(s3_server, monkeypatch):
    """A fault proxy; s3:// opened after this goes through it (the endpoint travels with the
    filesystem into Ray tasks)."""
    with FaultProxy(s3_server, seed=0, **RATES) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


def read_everything(uri: str) -> list[tuple[str, int, bytes]]:
    """(key, label, bytes) of every row of every read unit of both splits, in a shuffled epoch's order."""
    source = sources.open_source(uri)
    rows = []
    for split in sources.SPLITS:
        for unit in range(sources.num_units(source, split)):
            batch = sources.read_unit(source, split, unit, seed=3, epoch=1, shuffle=True)
            rows += [
                (key, int(label), bytes(jpeg)) for key, label, jpeg in zip(batch["key"], batch["label"], batch["jpeg"])
            ]
    return rows


def retried_since(before: dict[str, int]) -> Counter:
    return Counter(storage.retries()) - Counter(before)


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_reads_through_faults_give_the_same_rows_and_count_the_retries(uris, layout, s3_server, monkeypatch):
    started = time.perf_counter()
    clean = read_everything(uris[layout])
    clean_s = time.perf_counter() - started
    assert len(clean) == 96

    # Twice, so that the small shard set meets every kind of fault.
    before = storage.retries()
    with FaultProxy(s3_server, seed=0, **RATES) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        started = time.perf_counter()
        assert read_everything(uris[layout]) == clean
        assert read_everything(uris[layout]) == clean
        faulty_s = (time.perf_counter() - started) / 2
    retried = retried_since(before)
    print(
        f"\n[faults] {layout}: {clean_s:.2f} s clean, {faulty_s:.2f} s through faults (per pass); "
        f"proxy {dict(proxy.faults)}; retried {dict(retried)}"
    )
    assert proxy.faults["slow_down"] > 0 and proxy.faults["reset"] + proxy.faults["truncate"] > 0
    # Every fault on a read came back here and was retried; listings ride on the SDK's own retries, uncounted.
    assert retried["throttled"] > 0 and retried["connection"] > 0
    assert sum(retried.values()) <= proxy.faults["slow_down"] + proxy.faults["reset"] + proxy.faults["truncate"]


def test_a_ray_task_retries_and_counts_with_the_filesystem_it_was_sent(uris, faulty):
    # S3FileSystem's pickle drops its retry strategy: the handler must rebuild its own in the task,
    # or the SDK would absorb the faults there and nothing would be counted.
    @ray.remote
    def read_in_a_task(source: sources.Source, split: str) -> tuple[list, dict[str, int]]:
        """What a Ray Data task does (data._read_units): read units, and take the retries they cost."""
        before = storage.retries()
        keys = [
            sources.read_unit(source, split, k, seed=0, epoch=0, shuffle=False)["key"]
            for k in range(sources.num_units(source, split))
        ]
        return keys, dict(Counter(storage.retries()) - Counter(before))

    source = sources.open_source(uris["folder"])
    keys, retried = ray.get(read_in_a_task.remote(source, "train"))
    assert sorted(k for unit in keys for k in unit) == sorted(image_keys(source, "train"))
    assert sum(retried.values()) > 0


def epoch_of_batches(source: sources.Source, report=None) -> list[tuple[list, list, np.ndarray]]:
    dataset = data.train_dataset(source, CFG, report, keys=True)
    dataset.context.execution_options = data.execution_options(CFG)  # preserve_order, as --deterministic
    return [
        (b["key"].tolist(), b["label"].tolist(), b["image"])
        for b in dataset.iter_batches(batch_size=16, batch_format="numpy")
    ]


def test_a_deterministic_training_epoch_through_faults_gives_the_same_batches(uris, s3_server, monkeypatch):
    epoch_of_batches(sources.open_source(uris["shards"]))  # Ray Data's first execution is slower: not timed
    started = time.perf_counter()
    clean = epoch_of_batches(sources.open_source(uris["shards"]))
    clean_s = time.perf_counter() - started
    with FaultProxy(s3_server, seed=0, **RATES) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        source = sources.open_source(uris["shards"])
        requests = proxy.faults["requests"]
        report = data.ReadReport.remote()
        started = time.perf_counter()
        through_faults = epoch_of_batches(source, report)
        faulty_s = time.perf_counter() - started
    print(
        f"\n[faults] training epoch from shards: {clean_s:.2f} s clean, {faulty_s:.2f} s through faults; "
        f"proxy {dict(proxy.faults)}"
    )
    assert proxy.faults["requests"] > requests  # the Ray Data tasks read through the proxy
    assert len(through_faults) == len(clean) == 72 // 16 + 1
    for (keys, labels, images), (keys_f, labels_f, images_f) in zip(clean, through_faults):
        assert keys == keys_f and labels == labels_f and np.array_equal(images, images_f)
    # The tasks' retries reach the run's report (sent as the tasks end: give the actor a moment).
    deadline = time.time() + 10
    while not ray.get(report.retries.remote()) and time.time() < deadline:
        time.sleep(0.2)
    assert sum(ray.get(report.retries.remote()).values()) > 0


def test_the_prepare_job_reads_and_writes_the_same_shards_through_faults(uris, faulty, monkeypatch, s3_server):
    """One shard task's work (prepare.write_shard) in this process, through faults and without."""

    def write_all(out: str) -> list[dict]:
        units = imagenet.discover_inputs(uris["folder"])
        classes = prepare.train_classes(units)
        work = prepare.assign_shards(units, {"train": 2, "val": 1}, {"train": [0, 1], "val": [0]})
        return [
            prepare.write_shard(unit, index, out=out, classes=classes, resize=None, quality=90, options={})
            for (_, index), unit in sorted(work.items())
        ]

    before, started = storage.retries(), time.perf_counter()
    through_faults = write_all("s3://faults/shards-faulty")
    fs, root = storage.resolve("s3://faults/shards-faulty")
    done, foreign = shards.complete_shards(fs, root, "train", {}, 2)  # sidecars and sha256 read back
    faulty_s, retried = time.perf_counter() - started, retried_since(before)
    assert sorted(done) == [0, 1] and not foreign
    faults = faulty.faults["slow_down"] + faulty.faults["reset"] + faulty.faults["truncate"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    started = time.perf_counter()
    assert write_all("s3://faults/shards-clean") == through_faults  # rows, bytes, sha256, bad-file report
    print(
        f"\n[faults] prepare, 3 shards: {time.perf_counter() - started:.2f} s clean (without the read-back), "
        f"{faulty_s:.2f} s through faults; proxy {dict(faulty.faults)}; retried {dict(retried)}"
    )
    assert faults > 0 and sum(retried.values()) > 0


def test_what_is_not_transient_fails_at_once_naming_the_object(uris, s3_server, monkeypatch):
    source = sources.open_source(uris["shards"])
    path, _ = source.row_groups["train"][0]
    before = storage.retries()
    with pytest.raises(FileNotFoundError, match="faults/shards/train/nothing.parquet"):
        sources._parquet_group(source.filesystem, path.replace(path.rsplit("/", 1)[1], "nothing.parquet"), 0, ["key"])
    assert not retried_since(before)

    # A shard damaged after its manifest, at the same size (so open_source's size check passes): one
    # bit of one image, which Parquet alone would hand on as different JPEG bytes.
    key = path.removeprefix("faults/")
    s3 = boto3.client("s3")
    original = s3.get_object(Bucket="faults", Key=key)["Body"].read()
    body = bytearray(original)
    jpeg = sources.read_unit(source, "train", 0, seed=0, epoch=0, shuffle=False)["jpeg"][0]
    body[body.index(jpeg) + len(jpeg) // 2] ^= 0x01
    s3.put_object(Bucket="faults", Key=key, Body=bytes(body))
    try:
        damaged = sources.open_source(uris["shards"])
        with pytest.raises(ValueError, match=f"{key}: row group 0 cannot be read .*CRC.*re-run jobs/prepare_imagenet"):
            sources.read_unit(damaged, "train", 0, seed=0, epoch=0, shuffle=False)
    finally:
        s3.put_object(Bucket="faults", Key=key, Body=original)


def test_a_store_that_never_recovers_gives_up_naming_the_object(uris, s3_server, monkeypatch):
    monkeypatch.setattr(storage, "READ_ATTEMPTS", 3)
    source = sources.open_source(uris["folder"])
    with FaultProxy(s3_server, truncate=1.0) as proxy:  # every response body cut short
        source = dataclasses.replace(source, filesystem=storage.resolve(uris["folder"], endpoint=proxy.url)[0])
        started = time.perf_counter()
        with pytest.raises(
            storage.StoreUnavailable,
            match=r"s3://faults/folder/train/.* still failing after 3 "
            r"attempts \(connection",
        ):
            sources.read_unit(source, "train", 0, seed=0, epoch=0, shuffle=False)
        assert time.perf_counter() - started < 10
