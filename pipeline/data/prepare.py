"""ImageNet as users hold it -> Parquet shards + manifest, as Ray tasks with no shuffle.

    discover      imagenet.discover_inputs, on the driver: folder listings, the archives' headers, val labels
    index         one task per <wnid>.tar inside ILSVRC2012_img_train.tar, in parallel: its files' byte
                  ranges (imagenet.index_inner_tar reads only the headers); only when a train shard is due
    assign        shard = shards.shard_of(image_id), on the driver, before anything is read: every shard
                  mixes all classes, and a re-run knows which files its missing shards need
    write_shard   one task per missing shard, in parallel: reads exactly its files (16 reads in flight),
                  cleans each (clean.clean_image: RGB JPEG, optionally resized to 256, or a reason),
                  writes the Parquet file, then its sidecar
    manifest      assembled from the sidecars, written last

An image's bytes go from storage to the task that writes its shard and nowhere else: no object store
shuffle and no spilling, whatever the data set's size. A running task holds its shard's file as it
grows and one row group (0.45 GB of worker memory at the default 128 MB, BENCHMARKS.md); the driver
holds the list of files, ~230 bytes each. Re-running with the same options completes a partial
output: shards whose sidecar and sha256 check out are kept, and only the files of the others are read.

Files that are not images by the rule training from a folder applies (imagenet.skip_reason: no
class, or not an image name) are reported as skipped without being read, so training from the
folder and from its shards sees the same images.

The output must lie apart from the input (neither inside the other), and the job never overwrites
a file it did not write: anything at the names it writes that is not its own (no sidecar of this
format, a Parquet file without its signature, a foreign manifest.json) stops it before any work,
named. The manifest records the input as an absolute URI.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import posixpath
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline import cluster
from pipeline.data import imagenet, shards, storage
from pipeline.data.clean import BadImage, clean_image
from pipeline.data.devkit import find_class_words
from pipeline.transforms import lighting

# Bytes per image after resizing to shorter side 256 at quality 90, as a fraction of the original:
# 39 KB / 94 KB measured on photo-like 500x375 JPEGs (DESIGN.md). Only used to size the shards.
RESIZED_BYTES_RATIO = 0.42


def plan_shards(units: list[imagenet.InputUnit], *, target_bytes: int, resize: int | None) -> dict[str, int]:
    """Shards per split, from the input bytes: about target_bytes each."""
    ratio = RESIZED_BYTES_RATIO if resize else 1.0
    planned = {}
    for split in ("train", "val"):
        if any(u.split == split for u in units):
            nbytes = sum(u.nbytes for u in units if u.split == split)
            planned[split] = max(1, round(nbytes * ratio / target_bytes))
    return planned


def train_classes(units: list[imagenet.InputUnit]) -> list[str]:
    """The wnids of train's class folders or <wnid>.tar files: the class index of every split."""
    wnids = {m.wnid for u in units if u.split == "train" for m in u.members if m.wnid}
    if not wnids:
        raise ValueError("no train images found: the class list (and so every label) comes from train")
    return sorted(wnids)


def assign_shards(
    units: list[imagenet.InputUnit], num_shards: dict[str, int], todo: dict[str, list[int]]
) -> dict[tuple[str, int], imagenet.InputUnit]:
    """(split, shard) -> a unit of exactly the files of that shard, in image_id order (the order of
    the rows in the shard), for every shard in todo; a shard no file hashed to gets an empty unit
    (it is written empty, still part of the set)."""
    sources: dict[str, Any] = {}
    for unit in units:
        if unit.kind == "inner_tar":
            raise ValueError("index inner tars (imagenet.index_inner_tar) before assigning their files to shards")
        # A split has one layout, so one way to read it: a folder, or an archive (inner tars and strays alike).
        first = sources.setdefault(unit.split, unit)
        if (first.kind, first.uri) != (unit.kind, unit.uri):
            raise ValueError(
                f"{unit.split} files come from both {first.uri} ({first.kind}) and {unit.uri} "
                f"({unit.kind}); expected one layout per split"
            )
    parts: dict[tuple[str, int], list[tuple[str, imagenet.Member]]] = {
        (split, index): [] for split, indices in todo.items() for index in indices
    }
    for unit in units:
        for m in unit.members:
            image_id = imagenet.image_id_of(unit.split, m.name)
            key = (unit.split, shards.shard_of(image_id, num_shards[unit.split]))
            if key in parts:
                parts[key].append((image_id, m))
    work = {}
    for (split, index), members in parts.items():
        members.sort(key=lambda pair: pair[0])
        work[split, index] = dataclasses.replace(
            sources[split],
            members=tuple(m for _, m in members),
            nbytes=sum(m.size for _, m in members),
            count=len(members),
        )
    return work


def write_shard(
    unit: imagenet.InputUnit,
    index: int,
    *,
    out: str,
    classes: list[str],
    resize: int | None,
    quality: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Shard `index` of unit.split from exactly the files of `unit` (in image_id order): each read,
    cleaned and added to the shard, which is written with its sidecar; returns the sidecar.

    Memory: the shard file as it grows, one row group, and imagenet.FETCH_THREADS files in flight.
    """
    label = {wnid: i for i, wnid in enumerate(classes)}
    bad, to_read = [], []
    for m in unit.members:
        reason = imagenet.skip_reason(m) or (f"class {m.wnid} has no train images" if m.wnid not in label else "")
        if reason:  # never read: training from the folder would not read it either
            bad.append(
                {
                    "image_id": imagenet.image_id_of(unit.split, m.name),
                    "key": posixpath.basename(m.name),
                    "reason": reason,
                    "action": "skipped",
                }
            )
        else:
            to_read.append(m)

    writer = shards.ShardWriter(unit.split, index)
    for record in imagenet.iter_records(dataclasses.replace(unit, members=tuple(to_read))):
        try:
            clean = clean_image(record.data, key=record.key, resize_shorter=resize, quality=quality)
        except BadImage as e:
            bad.append({"image_id": record.image_id, "key": record.key, "reason": e.reason, "action": "skipped"})
            continue
        if clean.note:
            bad.append({"image_id": record.image_id, "key": record.key, "reason": clean.note, "action": "converted"})
        writer.add(
            {
                "image_id": record.image_id,
                "key": record.key,
                "label": label[record.wnid],
                "wnid": record.wnid,
                "jpeg": clean.jpeg,
                "width": clean.width,
                "height": clean.height,
            }
        )
    return writer.finish(*storage.resolve(out), bad, options)


def prepare(
    root: str,
    out: str,
    *,
    resize: int | None = None,
    quality: int = 90,
    target_mb: float = 128,
    val_labels: str | None = None,
    devkit: str | None = None,
    lighting_sample: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Convert ImageNet under `root` into shards under `out` (local, s3:// or gs://); returns the manifest."""
    import ray

    started = time.time()
    # Absolute from here on: a Ray task resolves a relative path against its own working directory.
    source, out = absolute_apart(root, out)
    units = imagenet.discover_inputs(root, val_labels=val_labels, devkit=devkit)
    classes = train_classes(units)
    num_shards = plan_shards(units, target_bytes=int(target_mb * 2**20), resize=resize)
    classes_sha = hashlib.sha256("\n".join(classes).encode()).hexdigest()
    options = {
        split: {"resize_shorter": resize, "quality": quality, "num_shards": n, "classes_sha256": classes_sha}
        for split, n in num_shards.items()
    }

    out_fs, out_root = storage.resolve(out)
    found = {
        split: shards.complete_shards(out_fs, out_root, split, options[split], n) for split, n in num_shards.items()
    }
    not_a_manifest = shards.foreign_manifest(out_fs, out_root)
    foreign = [name for _, names in found.values() for name in names] + ([not_a_manifest] if not_a_manifest else [])
    if foreign:
        raise FileExistsError(
            f"{out} already holds {len(foreign)} files that this job did not write, at names it would write: "
            f"{'; '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}. It never overwrites them: move them "
            f"away, or choose another output"
        )
    done = {split: cars for split, (cars, _) in found.items()}
    todo = {split: sorted(set(range(n)) - set(done[split])) for split, n in num_shards.items()}
    inner_tars = sum(u.kind == "inner_tar" for u in units)
    log(
        f"[prepare] {sum(u.count or 0 for u in units):,} files"
        + (f" and {inner_tars} inner tars to index" if inner_tars else "")
        + f", {len(classes)} classes; shards "
        + ", ".join(f"{s}: {len(done[s])}/{n} already complete" for s, n in num_shards.items())
    )

    units = _index_inner_tars(units, todo, log)
    work = assign_shards(units, num_shards, todo)
    written: dict[str, list[dict]] = {split: list(cars.values()) for split, cars in done.items()}
    task = ray.remote(_write_shard_counting_retries)
    pending = [
        task.remote(unit, index, out=out, classes=classes, resize=resize, quality=quality, options=options[split])
        for (split, index), unit in work.items()
    ]
    images, writing, retried = 0, time.time(), Counter[str]()
    while pending:  # sidecars as shards finish, for progress; a failed task raises here
        [ready], pending = ray.wait(pending, num_returns=1)
        car, task_retried = ray.get(ready)
        retried.update(task_retried)
        written[car["split"]].append(car)
        images += car["rows"] + sum(b["action"] == "skipped" for b in car["bad_files"])
        log(
            f"[prepare] {car['path']}: {car['rows']} images; {len(work) - len(pending)}/{len(work)} shards, "
            f"{images / (time.time() - writing):.0f} inputs/s"
        )

    manifest = shards.build_manifest(
        source=source, classes=classes, sidecars=written, options=options, val_labels=val_labels or devkit or "auto"
    )
    words, words_from = find_class_words(source, devkit)
    if words:  # the served model answers "tench, Tinca tinca", not n01440764
        manifest["words"] = [words.get(wnid, "") for wnid in classes]
        log(f"[prepare] class words from {words_from}")
    if lighting_sample is not None:
        manifest["lighting"] = _lighting(out, manifest, lighting_sample)
    storage.write_bytes(out_fs, storage.join(out_root, shards.MANIFEST), shards.manifest_bytes(manifest))
    for split, info in manifest["splits"].items():
        log(
            f"[prepare] {split}: {info['inputs']} inputs = {info['images']} written + {info['skipped']} skipped "
            f"({info['converted']} converted) in {len(info['shards'])} shards"
        )
    if retried:  # not in the manifest: the same data gives the same manifest, whatever the store did
        log(
            "[prepare] reads retried after transient storage errors: "
            + ", ".join(f"{cause} {n}" for cause, n in sorted(retried.items()))
        )
    log(f"[prepare] manifest at {storage.join(out, shards.MANIFEST)} in {time.time() - started:.0f} s")
    return manifest


def _write_shard_counting_retries(*args, **kwargs) -> tuple[dict[str, Any], dict[str, int]]:
    """write_shard as a Ray task: the sidecar, and the reads its process retried meanwhile (storage.retries)."""
    before = storage.retries()
    car = write_shard(*args, **kwargs)
    return car, dict(Counter(storage.retries()) - Counter(before))


def absolute_apart(root: str, out: str) -> tuple[str, str]:
    """The input and the output as absolute URIs; ValueError for an output that is, or is inside,
    the input (a later run would read the shards as images), or that holds the input (the job would
    write among its own input)."""
    (_, in_path), (_, out_path) = storage.resolve(root), storage.resolve(out)
    source, output = storage.as_uri(root, in_path), storage.as_uri(out, out_path)
    if storage.scheme_of(source) == storage.scheme_of(output):  # one store (a bucket on another holds neither)

        def within(path: str, folder: str) -> bool:
            return path == folder or path.startswith(folder.rstrip("/") + "/")

        if within(output, source) or within(source, output):
            where = (
                "is the input"
                if output == source
                else "is inside the input"
                if within(output, source)
                else "holds the input"
            )
            raise ValueError(
                f"the output {out!r} ({output}) {where} {root!r} ({source}): the shards would be "
                f"written among the images they are made from. Choose an output outside the input "
                f"and the input outside the output"
            )
    return source, output


def _index_inner_tars(units: list[imagenet.InputUnit], todo: dict[str, list[int]], log) -> list[imagenet.InputUnit]:
    """Inner tars -> their files, one Ray task each, if a train shard is still to be written (else
    nothing needs their files and they are dropped)."""
    import ray

    inner = [u for u in units if u.kind == "inner_tar"]
    units = [u for u in units if u.kind != "inner_tar"]
    if not inner or not todo.get("train"):
        return units
    started = time.time()
    index = ray.remote(imagenet.index_inner_tar)
    units += ray.get([index.remote(u) for u in inner])
    # Each inner tar checked its own names; two inner tars may still hold one name.
    imagenet.check_unique_ids("train", [m for u in units if u.split == "train" for m in u.members])
    log(f"[prepare] indexed {len(inner)} inner tars in {time.time() - started:.0f} s")
    return units


def _lighting(out: str, manifest: dict[str, Any], sample: int) -> dict[str, Any]:
    """§4.1's PCA over the written train shards (sample 0 = every image)."""
    import ray.data

    fs, root = storage.resolve(out)
    paths = [storage.join(root, s["path"]) for s in manifest["splits"]["train"]["shards"] if s["rows"]]
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["jpeg"])
    total = manifest["splits"]["train"]["images"]
    result = lighting.compute_lighting(ds, sample=sample or None, total_images=total)
    return result.to_dict()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """jobs/prepare_imagenet.py's flags, checked; exits 2 with a usage message naming a bad one."""
    parser = argparse.ArgumentParser(
        description="ImageNet (as downloaded or extracted) -> Parquet shards + manifest.json, locally, on s3:// or gs://.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("source", help="ImageNet root: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument("output", help="where the shards go: a local folder, s3://bucket/prefix or gs://bucket/prefix")
    parser.add_argument(
        "--resize",
        type=int,
        default=None,
        help="store images with the shorter side resized to this (the paper's 256), re-encoded",
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--shard-mb", type=float, default=128, help="target shard size in MB")
    parser.add_argument(
        "--val-labels",
        default=None,
        help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt (default: found in source)",
    )
    parser.add_argument(
        "--devkit", default=None, help="ILSVRC2012_devkit_t12 folder, .tar.gz or meta.mat (default: found in source)"
    )
    parser.add_argument(
        "--lighting-sample",
        type=int,
        default=None,
        help="compute §4.1's PCA lighting from this many train images (0 = all) into the manifest",
    )
    args = parser.parse_args(argv)
    if args.resize is not None and args.resize < 1:
        parser.error(f"--resize must be at least 1, got {args.resize}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb must be positive, got {args.shard_mb}")
    return args


def prepare_on_ray(root: str, out: str, **options: Any) -> dict[str, Any]:
    """jobs/prepare_imagenet.py: prepare() on the job's Ray (cluster.connect_ray: RAY_ADDRESS, else a private
    local one), the two paths checked first (apart, the input there, both buckets answering), so that a wrong
    input or output is answered before Ray starts."""
    absolute_apart(root, out)
    storage.check_location(root, "ImageNet root", must_exist=True)
    storage.check_location(out, "output")
    cluster.connect_ray()
    return prepare(root, out, **options)
