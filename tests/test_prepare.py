"""The prepare job on every input layout, locally and on a real S3 endpoint: shards, manifest, the
bad-file report, resizing, a re-run that completes a half-written output, and training's reader
seeing the same images and pixels in a folder and in its shards."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import imagenet_fixtures as fx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_bucket
from pipeline.data import imagenet, prepare, shards, sources, storage
from pipeline.transforms import decode


def prepare_quietly(*args, **kwargs):
    return prepare.prepare(*args, log=lambda message: None, **kwargs)


def shard_rows(out: str, manifest: dict, split: str) -> list[dict]:
    fs, root = storage.resolve(out)
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        with fs.open_input_file(storage.join(root, shard["path"])) as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def check_against(expected: fx.Expected, manifest: dict, out: str) -> None:
    """Every good image written once with its sorted-wnid label; every bad one reported; sums add up."""
    classes = manifest["classes"]
    assert classes == sorted(fx.WNIDS)
    written = {}
    for split in ("train", "val"):
        for row in shard_rows(out, manifest, split):
            assert row["image_id"] not in written
            written[row["image_id"]] = row
            assert row["label"] == classes.index(row["wnid"])
            image = Image.open(io.BytesIO(row["jpeg"]))
            assert image.format == "JPEG" and image.mode == "RGB"
            if row["image_id"] in expected.coloured:  # the pixels followed the label
                colour = np.asarray(image).reshape(-1, 3).mean(axis=0)
                assert np.abs(colour - expected.class_colours[row["wnid"]]).max() < 12
    good = {i: w for i, w in expected.labels.items() if i not in expected.bad}
    assert {i: r["wnid"] for i, r in written.items()} == good
    report = {b["image_id"]: b for b in manifest["bad_files"]}
    assert {i for i, b in report.items() if b["action"] == "skipped"} == set(expected.bad)
    assert {i for i, b in report.items() if b["action"] == "converted"} == set(expected.convertible)
    assert all(b["reason"] for b in report.values())
    for split, info in manifest["splits"].items():
        in_split = [i for i in expected.labels if i.startswith(f"{split}/")]
        assert info["inputs"] == len(in_split) == info["images"] + info["skipped"]
        assert sum(info["per_class"].values()) == info["images"]
        assert sum(s["rows"] for s in info["shards"]) == info["images"]


@pytest.mark.parametrize("layout", ["extracted", "flat_val_loc", "flat_val_ground_truth", "archives"])
def test_prepare_every_layout(ray_session, tmp_path, layout):
    source = tmp_path / "imagenet"
    if layout == "extracted":
        expected = fx.write_extracted(source)
    elif layout == "archives":
        expected = fx.write_archives(source, labels="devkit_tarball")
    else:
        labels = layout.removeprefix("flat_val_")
        expected = fx.write_extracted(source, val=False) | fx.write_flat_val(source, labels=labels)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))

    out = str(tmp_path / "shards")
    manifest = prepare_quietly(str(source), out, target_mb=0.001)
    check_against(expected, manifest, out)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the tiny target size made several
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before  # nothing extracted
    on_disk, sha = shards.read_manifest(*storage.resolve(out))
    assert on_disk == json.loads(shards.manifest_bytes(manifest)) and len(sha) == 64


def test_shards_mix_the_classes(ray_session, tmp_path):
    source = tmp_path / "imagenet"
    fx.write_extracted(source, train_per_class=12, bad=False)
    out = str(tmp_path / "shards")
    manifest = prepare_quietly(str(source), out, target_mb=0.002)
    for shard in manifest["splits"]["train"]["shards"]:
        if shard["rows"] >= 6:
            fs, root = storage.resolve(out)
            with fs.open_input_file(storage.join(root, shard["path"])) as f:
                assert len(set(pq.read_table(f, columns=["label"]).column("label").to_pylist())) > 1


def test_resize_stores_the_shorter_side_at_the_size_asked(ray_session, tmp_path):
    source = tmp_path / "imagenet"
    fx.write_extracted(source, bad=False)
    out = str(tmp_path / "shards")
    manifest = prepare_quietly(str(source), out, resize=24, quality=80)  # the fixtures' shorter sides are 30..70
    for row in shard_rows(out, manifest, "train"):
        w, h = Image.open(io.BytesIO(row["jpeg"])).size
        assert min(w, h) == 24 and (row["width"], row["height"]) != (w, h)
        assert abs(w / h - row["width"] / row["height"]) < 0.1  # aspect kept
    assert manifest["options"]["train"]["resize_shorter"] == 24


def test_rerun_completes_a_half_written_output(ray_session, tmp_path, monkeypatch):
    source = tmp_path / "imagenet"
    fx.write_extracted(source, train_per_class=8)
    monkeypatch.chdir(tmp_path)  # relative paths: the manifest still records where the images came from
    out = tmp_path / "shards"
    first = prepare_quietly("imagenet", "shards", target_mb=0.002)
    assert first["source"] == str(source.resolve())
    parts = sorted((out / "train").glob("part-*.parquet"))
    assert len(parts) >= 4
    # A crash half-way: one shard never written, one written without its sidecar, one shard's bytes
    # damaged after its sidecar.
    lost, orphan, damaged = parts[:3]
    lost.unlink()
    lost.with_suffix(".json").unlink()
    orphan.with_suffix(".json").unlink()
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    (out / shards.MANIFEST).unlink()
    untouched = {p: p.stat().st_mtime_ns for p in parts[3:]}

    second = prepare_quietly("imagenet", "shards", target_mb=0.002)
    assert second == first  # the same set, byte for byte (the sha256s are in the manifest)
    assert {p: p.stat().st_mtime_ns for p in parts[3:]} == untouched  # complete shards were kept
    assert lost.exists() and orphan.with_suffix(".json").exists()


@pytest.mark.parametrize(
    "output,where",
    [
        (".", "is the input"),
        ("shards", "is inside the input"),
        ("..", "holds the input"),
        ("../link/shards", "is inside the input"),
    ],
)
def test_the_output_is_refused_where_it_overlaps_the_input(tmp_path, output, where):
    source = tmp_path / "imagenet"
    fx.write_extracted(source, bad=False)
    (tmp_path / "link").symlink_to(source)  # the same folder by another name
    before = sorted(tmp_path.rglob("*"))
    out = str(source / output)
    with pytest.raises(
        ValueError,
        match=f"the output {re.escape(repr(out))} .* {where} '{source}' .*Choose an output outside the input",
    ):
        prepare_quietly(str(source), out)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_the_output_may_sit_beside_the_input_under_a_longer_name(s3_server):
    # "imagenet-shards" starts like "imagenet" but is not inside it.
    assert prepare.absolute_apart("s3://raw/imagenet", "s3://raw/imagenet-shards/") == (
        "s3://raw/imagenet",
        "s3://raw/imagenet-shards",
    )
    with pytest.raises(ValueError, match="is inside the input"):
        prepare.absolute_apart("s3://raw/imagenet/", "s3://raw/imagenet/shards")


def test_files_it_did_not_write_are_reported_and_never_overwritten(tmp_path):
    source = tmp_path / "imagenet"
    fx.write_extracted(source, bad=False)
    out = tmp_path / "shards"
    planted = {
        "train/part-00000.json": (b'{"hello": "world"}', "not an alexnet-ray/imagenet-shards sidecar: no 'bytes'"),
        "train/part-00001.parquet": (
            b"the user's own data",
            "not an alexnet-ray/imagenet-shards shard, and no sidecar",
        ),
        "val/part-00000.json": (b"\x00\xff binary", "not JSON"),
        "manifest.json": (b'{"format": "someone-else"}', "not an alexnet-ray/imagenet-shards manifest"),
    }
    for name, (content, _) in planted.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)

    with pytest.raises(FileExistsError, match="already holds 4 files that this job did not write") as info:
        prepare_quietly(str(source), str(out), target_mb=0.002)
    for name, (content, reason) in planted.items():
        assert f"{name} ({reason}" in str(info.value)
        assert (out / name).read_bytes() == content
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(planted)


def test_prepare_from_and_to_s3(ray_session, s3_server, tmp_path):
    from conftest import upload_folder

    source = tmp_path / "imagenet"
    expected = fx.write_archives(source, labels="loc")
    make_bucket("raw")
    upload_folder(source, "s3://raw/imagenet")
    make_bucket("prepared")
    manifest = prepare_quietly("s3://raw/imagenet", "s3://prepared/shards")
    check_against(expected, manifest, "s3://prepared/shards")
    assert manifest["source"] == "s3://raw/imagenet"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(manifest)


def test_prepare_job_lighting_and_clear_errors(ray_session, tmp_path):
    source = tmp_path / "imagenet"
    fx.write_extracted(source, bad=False)
    manifest = prepare_quietly(str(source), str(tmp_path / "shards"), lighting_sample=0)
    lighting = manifest["lighting"]
    assert len(lighting["eigval"]) == 3 and lighting["eigval"][0] >= lighting["eigval"][1] >= lighting["eigval"][2]
    assert "data" in lighting["source"]

    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_quietly(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    only_val = tmp_path / "only_val"
    fx.write_extracted(only_val, train=False)
    with pytest.raises(ValueError, match="no train images"):
        prepare_quietly(str(only_val), str(tmp_path / "out"))


def read_as_training_does(uri: str) -> tuple[sources.Source, dict[str, dict[str, tuple[int, bytes]]]]:
    """The source, and split -> {key: (label, encoded bytes)} of every row its read tasks yield."""
    source = sources.open_source(uri)
    rows: dict[str, dict[str, tuple[int, bytes]]] = {}
    for split in ("train", "val"):
        rows[split] = {}
        for k in range(sources.num_units(source, split)):
            batch = sources.read_unit(source, split, k, seed=0, epoch=0, shuffle=False)
            for key, label, jpeg in zip(batch["key"], batch["label"], batch["jpeg"]):
                assert key not in rows[split], f"{key} read twice"
                rows[split][key] = (int(label), bytes(jpeg))
    return source, rows


def write_image_folder(root: Path) -> None:
    """An ImageFolder dataset, not ImageNet: class names for folders, the same file names in each."""
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog", "bird")):
            colour = fx.PALETTE[c]
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.jpg").write_bytes(fx.image_bytes(colour, (48, 40)))
            (root / split / name / "1.jpg").write_bytes(fx.image_bytes(colour, (40, 52), "L"))
            (root / split / name / "2.png").write_bytes(fx.image_bytes(colour, (44, 36), fmt="PNG"))


@pytest.mark.parametrize("dataset", ["imagenet", "image_folder"])
def test_a_folder_and_its_shards_give_training_the_same_images(ray_session, tmp_path, dataset):
    folder = tmp_path / "folder"
    if dataset == "imagenet":  # the odd and bad files of the real set, and strays that are no image
        fx.write_extracted(folder)
        (folder / "train" / "README.txt").write_text("class folders below\n")
        (folder / "train" / fx.WNIDS[0] / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (folder / "val" / fx.WNIDS[1] / "notes.txt").write_text("not an image\n")
    else:
        write_image_folder(folder)
    manifest = prepare_quietly(str(folder), str(tmp_path / "shards"), target_mb=0.002)
    folder_source, from_folder = read_as_training_does(str(folder))
    _, from_shards = read_as_training_does(str(tmp_path / "shards"))
    report = {b["image_id"]: b for b in manifest["bad_files"]}

    # What training from the folder ignores (no class, no image name) the job skipped without reading.
    base = storage.resolve(str(folder))[1]
    ignored = {
        imagenet.image_id_of(p.split("/")[0], p)
        for p in (os.path.relpath(path, base) for path in folder_source.ignored)
    }
    unread = {i for i, b in report.items() if i not in from_folder[i.split("/")[0]]}
    assert (
        ignored
        == unread
        == (
            {"train/README.txt", f"train/{fx.WNIDS[0]}/.DS_Store", f"val/{fx.WNIDS[1]}/notes.txt"}
            if dataset == "imagenet"
            else set()
        )
    )
    assert all(report[i]["action"] == "skipped" for i in unread)

    for split in ("train", "val"):
        decoded = {}
        for key, (label, data) in from_folder[split].items():
            try:
                decoded[key] = (label, data, decode.decode_image(data, key=key))
            except decode.DecodeError as e:  # training would drop it; the job skipped it, for the same reason
                assert (report[key]["action"], report[key]["reason"]) == ("skipped", e.reason)
        assert from_shards[split].keys() == decoded.keys()
        assert len(decoded) == manifest["splits"][split]["images"]
        for key, (label, data, pixels) in decoded.items():
            shard_label, jpeg = from_shards[split][key]
            assert shard_label == label, key
            if key in report:  # converted (CMYK, PNG, grayscale): one JPEG re-encode away
                assert report[key]["action"] == "converted"
                got = decode.decode_image(jpeg).astype(int)
                assert got.shape == pixels.shape and np.abs(got - pixels).mean() < 2, key
            else:  # kept byte for byte, so training decodes the same pixels
                assert jpeg == data and np.array_equal(decode.decode_image(jpeg), pixels)
    if dataset == "image_folder":  # 0.jpg in every class: every one kept, under its path
        assert sorted(from_shards["train"]) == [
            f"train/{c}/{n}" for c in ("bird", "cat", "dog") for n in ("0.jpg", "1.jpg", "2.png")
        ]
        assert manifest["classes"] == ["bird", "cat", "dog"]
