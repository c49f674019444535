"""s3:// requests are signed for the bucket's own region (pipeline/data/regions.py), whatever region is configured:
a bucket in us-west-2 on the suite's moto server, as resolve() gives it to the data readers and prepare, as a Ray
task resolves it, and as Ray Train gets --storage-path; a bucket in us-east-1 keeps us-east-1; a store that refuses
to name the region (HTTP 403) leaves the configured one, then us-east-1, and the check says so. moto does not refuse
a request signed for another region as S3 does, so the tests read the region each filesystem signs for."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest

from conftest import make_bucket
from pipeline.data import prepare, regions, sources, storage

CONFIGURED = [None, "us-east-1", "eu-central-1"]  # None: no region anywhere (environment or profile)


def signed_for(filesystem: pafs.FileSystem) -> str:
    """The region a filesystem from storage.resolve signs for: both of its RetryingStore's S3FileSystems'."""
    store = filesystem.handler
    assert isinstance(store, storage.RetryingStore) and store.scheme == "s3"
    assert store.sdk.region == store.reads.region == store.options["region"]
    return store.sdk.region


def ray_train_region(uri: str) -> str:
    """The region Ray Train signs checkpoints for with --storage-path `uri`: the driver's RunConfig from
    storage.train_filesystem, resolved by Ray Train's own get_fs_and_path."""
    from ray.train.v2._internal.execution.storage import get_fs_and_path

    filesystem, path = storage.train_filesystem(uri)
    resolved, _ = get_fs_and_path(path, filesystem)
    return signed_for(resolved) if filesystem is not None else resolved.region


@pytest.fixture(scope="module")
def west(s3_server) -> str:
    name = f"west-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    return name


@pytest.fixture(scope="module")
def east(s3_server) -> str:
    return make_bucket(f"east-{uuid.uuid4().hex[:8]}").removeprefix("s3://")


def configure(monkeypatch, tmp_path: Path, region: str | None) -> str | None:
    """This driver process configured with `region` (None: none at all, environment or profile); each bucket
    asked for its region anew."""
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-profile"))
    if region is None:
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    else:
        monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    monkeypatch.setattr(regions, "_known", {})
    assert regions.configured_region() == region
    return region


@pytest.fixture(params=CONFIGURED, ids=lambda region: f"configured-{region}")
def configured(request, monkeypatch, tmp_path):
    return configure(monkeypatch, tmp_path, request.param)


def test_resolve_signs_for_the_buckets_own_region(west, east, configured):
    for uri in (f"s3://{west}", f"s3://{west}/imagenet-shards/train"):
        assert signed_for(storage.resolve(uri)[0]) == "us-west-2"
    assert signed_for(storage.resolve(f"s3://{east}/x")[0]) == "us-east-1"
    storage.check_location(f"s3://{west}/x", "--data")  # the job's first request, signed so too


def test_ray_train_keeps_checkpoints_in_the_buckets_region(west, east, configured):
    assert ray_train_region(f"s3://{west}/ray_results") == "us-west-2"
    assert ray_train_region(f"s3://{east}/ray_results") == "us-east-1"
    # Where Ray's own resolution already signs for the bucket's region, the URI is left to it, as before.
    if configured in (None, "us-east-1"):
        assert storage.train_filesystem(f"s3://{east}/ray_results") == (None, f"s3://{east}/ray_results")


def test_ray_train_writes_its_checkpoints_to_a_us_west_2_bucket(ray_session, west, monkeypatch, tmp_path):
    """What the driver does with --storage-path s3://<a us-west-2 bucket>/... and no region configured: Ray Train
    through this project's filesystem, its checkpoints where a resumed run looks for them."""
    configure(monkeypatch, tmp_path, None)
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train import resume

    def report_two_checkpoints(config):  # here, not at the top: Ray's workers cannot import this test module
        for epoch in range(2):
            with tempfile.TemporaryDirectory() as directory:
                Path(directory, "epoch.txt").write_text(str(epoch))
                ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(directory))

    storage_path = f"s3://{west}/ray_results"
    filesystem, path = storage.train_filesystem(storage_path)
    assert filesystem is not None and signed_for(filesystem) == "us-west-2"
    result = TorchTrainer(
        report_two_checkpoints,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="run", storage_path=path, storage_filesystem=filesystem),
    ).fit()
    with result.checkpoint.as_directory() as directory:
        assert Path(directory, "epoch.txt").read_text() == "1"
    assert result.checkpoint.path.startswith(f"{west}/ray_results/run/checkpoint_")
    assert len(resume.checkpoint_folders(storage_path, "run")[1]) == 2


def test_prepare_and_read_shards_in_us_west_2_with_no_region_configured(
    ray_session, west, tiny_imagenet, monkeypatch, tmp_path
):
    """The end-to-end path: the prepare job (its shard tasks run in Ray's workers, configured with us-east-1 as
    the suite starts them) writes to the us-west-2 bucket, and the shards open from there, with no region in
    this process's environment."""
    import ray

    configure(monkeypatch, tmp_path, None)
    uri = f"s3://{west}/shards"
    prepare.prepare(str(tiny_imagenet), uri, log=lambda m: None)
    source = sources.open_source(uri)
    assert (source.kind, source.num_classes, source.images) == ("shards", 3, {"train": 72, "val": 24})
    assert signed_for(source.filesystem) == "us-west-2"
    listed = boto3.client("s3", region_name="us-west-2").list_objects_v2(Bucket=west, Prefix="shards/")
    assert {"shards/manifest.json"} <= {item["Key"] for item in listed["Contents"]}

    @ray.remote
    def region_in_a_task(uri: str) -> tuple[str | None, str]:  # as prepare's shard tasks resolve their output
        from pipeline.data import storage

        return os.environ.get("AWS_DEFAULT_REGION"), storage.resolve(uri)[0].handler.sdk.region

    assert ray.get(region_in_a_task.remote(uri)) == ("us-east-1", "us-west-2")


def test_a_region_the_store_will_not_name_falls_back_and_the_check_says_so(s3_server, strict_s3, configured):
    uri = "s3://some-bucket/x"
    assert signed_for(storage.resolve(uri, endpoint=strict_s3)[0]) == (configured or "us-east-1")
    with pytest.raises(OSError) as refused:
        storage.check_location(uri, "--data", endpoint=strict_s3)
    assert "'some-bucket''s region could not be asked (HTTP 403): requests were signed for " in str(refused.value)
    assert f"signed for {configured or 'us-east-1'}, the configured region" in str(refused.value)
