"""Training data from object storage and the community formats, through a real S3 endpoint (moto's
server mode): s3:// shards, Hugging Face Parquet, WebDataset tars, the per-run decode report, and
the clear errors a user meets first."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import boto3
import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, S3_SECRET, make_bucket, upload_folder
from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import prepare, sources
from pipeline.train import driver

TINY = dataclasses.replace(
    PRESETS["sample"],
    width=0.125,
    resize_size=80,
    crop_size=67,
    epochs=1,
    batch_size=8,
    max_failures=0,
    experiment="sources",
    registered_model="sources",
)


def labelled_images(root: Path) -> dict[str, list[tuple[str, bytes, int]]]:
    """split -> [(key, jpeg bytes, sorted-wnid label)] from an ImageNet-layout folder."""
    wnids = sorted(p.name for p in (root / "train").iterdir())
    return {
        split: [(p.stem, p.read_bytes(), wnids.index(p.parent.name)) for p in sorted((root / split).glob("*/*.JPEG"))]
        for split in ("train", "val")
    }


def write_huggingface(images, out: Path, corrupt: str | None = None) -> None:
    """imagenet-1k's Parquet layout: data/{train,validation}-*.parquet with image{bytes, path}, label."""
    for split, name in (("train", "train"), ("val", "validation")):
        rows = [
            {
                "image": {"bytes": b"not a jpeg at all" if key == corrupt else jpeg, "path": f"{key}.JPEG"},
                "label": label,
            }
            for key, jpeg, label in images[split]
        ]
        (out / "data").mkdir(parents=True, exist_ok=True)
        schema = pa.schema(
            [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "data" / f"{name}-00000-of-00001.parquet")


def write_webdataset(images, out: Path) -> None:
    """WebDataset shards: <key>.jpg + <key>.cls members, two tars per split."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for part in range(2):
            with tarfile.open(out / f"imagenet-{split}-{part:06d}.tar", "w") as tar:
                for key, jpeg, label in images[split][part::2]:
                    for suffix, payload in (("jpg", jpeg), ("cls", str(label).encode())):
                        info = tarfile.TarInfo(f"{key}.{suffix}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def bucket(s3_server):
    return make_bucket("datasets")


def test_train_an_epoch_from_s3_shards(ray_session, bucket, tiny_imagenet, in_tmp_dir):
    prepare.prepare(str(tiny_imagenet), f"{bucket}/tiny-shards", log=lambda m: None)
    cfg = dataclasses.replace(TINY, data=f"{bucket}/tiny-shards", storage_path=str(in_tmp_dir / "ray_results"))
    summary = driver.run(cfg)

    client = mlflow.MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["data_kind"] == "shards" and params["data_resolved"] == f"{bucket}/tiny-shards"
    source = data.open_source(f"{bucket}/tiny-shards")
    assert params["data_fingerprint"] == source.fingerprint  # the manifest's sha256: the run's lineage
    assert params["lighting_source"] == "imagenet-constants"
    assert params["val_images"] == "24" and len(client.get_metric_history(run.info.run_id, "val_top1")) == 1
    everything = " ".join([*params.values(), *run.data.tags.values()])
    assert S3_SECRET not in everything and os.environ["AWS_ACCESS_KEY_ID"] not in everything


def test_huggingface_parquet_from_s3_reports_an_undecodable_image(ray_session, bucket, tiny_imagenet, in_tmp_dir):
    images = labelled_images(tiny_imagenet)
    broken = images["train"][5][0]
    write_huggingface(images, in_tmp_dir / "hf", corrupt=broken)
    upload_folder(in_tmp_dir / "hf", f"{bucket}/hf")

    source = data.open_source(f"{bucket}/hf")
    assert (source.kind, source.num_classes, source.images) == ("huggingface", 3, {"train": 72, "val": 24})
    cfg = dataclasses.replace(TINY, data=f"{bucket}/hf", storage_path=str(in_tmp_dir / "ray_results"))
    summary = driver.run(cfg)

    assert summary["decode_failures"] == 1
    client = mlflow.MlflowClient(summary["tracking_uri"])
    report = mlflow.artifacts.load_dict(f"runs:/{summary['run_id']}/decode_failures.json")
    assert list(report) == [f"{broken}.JPEG"] and report[f"{broken}.JPEG"].startswith("not an image: 17 bytes")
    assert client.get_metric_history(summary["run_id"], "decode_failures")[-1].value == 1
    # Nothing stood in for it: the listing has 72 train images, and the epoch trained on full global
    # batches of 8 from the 71 that decode: 64. A stand-in for the broken one would have made 72 (9 batches).
    assert client.get_run(summary["run_id"]).data.params["train_images"] == "72"  # the listing
    assert [m.value for m in client.get_metric_history(summary["run_id"], "train_images")] == [64]


def test_webdataset_tars_read_without_conversion(ray_session, tiny_imagenet, tmp_path):
    images = labelled_images(tiny_imagenet)
    write_webdataset(images, tmp_path / "wds")
    source = data.open_source(str(tmp_path / "wds"), num_classes=3)
    assert source.kind == "webdataset" and len(source.files["train"]) == 2
    rows = data.val_dataset(source, TINY).take_all()
    assert len(rows) == 24 and rows[0]["image"].shape == (67, 67, 3)
    assert sorted(r["label"] for r in rows) == sorted(label for _, _, label in images["val"])
    with pytest.raises(Exception, match="outside the 2 classes"):
        data.train_dataset(data.open_source(str(tmp_path / "wds"), num_classes=2), TINY).take_all()


def test_clear_errors_for_bucket_shard_and_manifest(ray_session, bucket, tiny_imagenet):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/x"):
        data.open_source("s3://no-such-bucket/x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.open_source(f"{bucket}/nothing-here")

    prepare.prepare(str(tiny_imagenet), f"{bucket}/damaged", target_mb=0.05, log=lambda m: None)
    source = data.open_source(f"{bucket}/damaged")
    with pytest.raises(ValueError, match="has sha256 .* not the 0000"):
        data.open_source(f"{bucket}/damaged", manifest_sha256="0000")
    assert data.open_source(f"{bucket}/damaged", manifest_sha256=source.fingerprint).fingerprint == source.fingerprint

    s3 = boto3.client("s3")
    first_shard = source.files["train"][0].removeprefix("datasets/")
    body = s3.get_object(Bucket="datasets", Key=first_shard)["Body"].read()
    s3.put_object(Bucket="datasets", Key=first_shard, Body=body + b"extra")
    with pytest.raises(ValueError, match="does not match the manifest"):
        data.open_source(f"{bucket}/damaged")
    s3.delete_object(Bucket="datasets", Key=first_shard)
    started = time.time()
    with pytest.raises(FileNotFoundError, match=f"shard {first_shard.removeprefix('damaged/')} .* is missing"):
        data.open_source(f"{bucket}/damaged")
    assert time.time() - started < 10


def test_missing_credentials_fail_fast_naming_the_fix(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": s3_server,
        }
    )
    started = time.time()
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--data", "s3://datasets/tiny-shards"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no AWS credentials found" in result.stderr
    assert time.time() - started < 30


@pytest.mark.parametrize("layout", ["huggingface", "webdataset"])
def test_an_epoch_reads_every_image_once_in_an_order_of_seed_and_epoch(layout, tiny_imagenet, tmp_path):
    """The README's promise for the community formats, read unit by unit as the plan's tasks do: the
    same (seed, epoch) the same order, another epoch or seed another, each image exactly once with its
    label and bytes, and its index the same in every epoch (resume leaves out indices)."""
    images = labelled_images(tiny_imagenet)
    {"huggingface": write_huggingface, "webdataset": write_webdataset}[layout](images, tmp_path / layout)
    source = data.open_source(str(tmp_path / layout), num_classes=3)
    assert source.kind == layout
    expected = {key: (label, jpeg) for key, jpeg, label in images["train"]}

    def epoch(seed: int, epoch: int, shuffle: bool = True) -> list[tuple[str, int, int]]:
        """(key, label, index) of every image, in the order the units hand them on."""
        read = []
        for unit in range(sources.num_units(source, "train")):
            rows = sources.read_unit(source, "train", unit, seed=seed, epoch=epoch, shuffle=shuffle)
            for key, jpeg, label, index in zip(rows["key"], rows["jpeg"], rows["label"], rows["index"]):
                key = key.removesuffix(".JPEG")  # Hugging Face keys are the image's path
                assert expected[key] == (label, jpeg), f"{key} came with another label or other bytes"
                read.append((key, int(label), int(index)))
        return read

    first = epoch(seed=0, epoch=0)
    assert sorted(key for key, _, _ in first) == sorted(expected)  # every image, once
    assert len({index for _, _, index in first}) == len(expected)  # indices name one image each
    assert epoch(seed=0, epoch=0) == first  # the same order again
    in_file_order = epoch(seed=0, epoch=0, shuffle=False)
    for other in (epoch(seed=0, epoch=1), epoch(seed=1, epoch=0), in_file_order):
        assert sorted(other) == sorted(first)  # the same images with the same labels and indices
        assert [key for key, _, _ in other] != [key for key, _, _ in first]  # in another order
