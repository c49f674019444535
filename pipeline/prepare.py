"""ImageNet as users hold it -> Parquet shards + manifest, as one Ray Data job.

    input units (imagenet.discover_inputs: files, val-tar members, inner train tars)
      -> read_unit        one task per unit, in parallel; rows of raw bytes tagged with their shard
      -> clean_rows       RGB JPEG (CMYK, grayscale, PNG converted; optional resize to 256), or a reason
      -> groupby shard    every shard gathers its images from all units (so it mixes all classes)
      -> write_group      Parquet + sidecar per shard
    then the manifest, assembled from the sidecars, written last.

Re-running with the same options completes a partial output: shards whose sidecar and sha256
check out are kept, and only inputs that hash to missing shards are read again (an inner train
tar is streamed, so it is read again, but only its missing shards' images are converted).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from functools import partial
from typing import Any

import numpy as np

from pipeline import imagenet, shards, storage

# Bytes per image after resizing to shorter side 256 at quality 90, as a fraction of the original:
# 39 KB / 94 KB measured on photo-like 500x375 JPEGs (DESIGN.md). Only used to size the shards.
RESIZED_BYTES_RATIO = 0.42


def plan_shards(units: list[imagenet.InputUnit], *, target_bytes: int, resize: int | None) -> dict[str, int]:
    """Shards per split, from the input bytes: about target_bytes each."""
    ratio = RESIZED_BYTES_RATIO if resize else 1.0
    planned = {}
    for split in ("train", "val"):
        nbytes = sum(u.nbytes for u in units if u.split == split)
        if nbytes:
            planned[split] = max(1, round(nbytes * ratio / target_bytes))
    return planned


def train_classes(units: list[imagenet.InputUnit]) -> list[str]:
    wnids = {u.wnid for u in units if u.split == "train" and u.wnid}
    wnids |= {m.wnid for u in units if u.split == "train" for m in u.members if m.wnid}
    if not wnids:
        raise ValueError("no train images found: the class list (and so every label) comes from train")
    return sorted(wnids)


def _unit_needed(unit: imagenet.InputUnit, num_shards: int, done: set[int]) -> bool:
    """False when every image the unit names belongs to a complete shard (an inner tar names none)."""
    if unit.kind == "inner_tar":
        return len(done) < num_shards
    return any(shards.shard_of(imagenet.image_id_of(unit.split, m.name), num_shards) not in done
               for m in unit.members)


def read_unit(row: dict, *, num_shards: dict[str, int], done: dict[str, list[int]]) -> list[dict]:
    """One input unit -> its records that belong to shards still to be written."""
    unit = pickle.loads(row["unit"])
    n, complete = num_shards[unit.split], set(done[unit.split])
    out = []
    for record in imagenet.iter_records(unit):
        shard = shards.shard_of(record.image_id, n)
        if shard not in complete:
            out.append({"split": record.split, "shard": shard, "image_id": record.image_id, "key": record.key,
                        "wnid": record.wnid, "data": record.data})
    return out


def clean_rows(batch: dict[str, np.ndarray], *, classes: list[str], resize: int | None, quality: int) -> dict:
    """Raw bytes -> a clean RGB JPEG, or an error that names why; never a stand-in image."""
    class_set = set(classes)
    jpeg, width, height, note, error = [], [], [], [], []
    for data, key, wnid in zip(batch["data"], batch["key"], batch["wnid"]):
        result, reason = None, ""
        if not wnid:
            reason = "not an ImageNet image: outside any <wnid> folder or with an unexpected name"
        elif wnid not in class_set:
            reason = f"class {wnid} has no train images"
        else:
            try:
                result = imagenet.clean_image(bytes(data), key=str(key), resize_shorter=resize, quality=quality)
            except imagenet.BadImage as e:
                reason = e.reason
        jpeg.append(result.jpeg if result else b"")
        width.append(result.width if result else 0)
        height.append(result.height if result else 0)
        note.append(result.note if result else "")
        error.append(reason)
    out = {k: batch[k] for k in ("split", "shard", "image_id", "key", "wnid")}
    return {**out, "jpeg": np.array(jpeg, dtype=object), "width": np.array(width), "height": np.array(height),
            "note": np.array(note, dtype=object), "error": np.array(error, dtype=object)}


def write_group(batch: dict[str, np.ndarray], *, out: str, classes: list[str],
                options: dict[str, dict[str, Any]]) -> dict:
    """All the rows of one shard -> the shard file and its sidecar; returns the sidecar."""
    fs, root = storage.resolve(out)
    split, index = str(batch["split"][0]), int(batch["shard"][0])
    label = {wnid: i for i, wnid in enumerate(classes)}
    rows, bad, seen = [], [], set()
    for i in np.argsort(batch["image_id"], kind="stable"):
        image_id, key, wnid = str(batch["image_id"][i]), str(batch["key"][i]), str(batch["wnid"][i])
        if image_id in seen:
            bad.append({"image_id": image_id, "key": key, "reason": "duplicate image_id", "action": "skipped"})
            continue
        seen.add(image_id)
        if batch["error"][i]:
            bad.append({"image_id": image_id, "key": key, "reason": str(batch["error"][i]), "action": "skipped"})
            continue
        if batch["note"][i]:
            bad.append({"image_id": image_id, "key": key, "reason": str(batch["note"][i]), "action": "converted"})
        rows.append({"image_id": image_id, "key": key, "label": label[wnid], "wnid": wnid,
                     "jpeg": bytes(batch["jpeg"][i]), "width": int(batch["width"][i]),
                     "height": int(batch["height"][i])})
    sidecar = shards.write_shard(fs, root, split, index, rows, bad, options[split])
    return {"sidecar": [json.dumps(sidecar)]}


def prepare(root: str, out: str, *, resize: int | None = None, quality: int = 90, target_mb: float = 128,
            val_labels: str | None = None, devkit: str | None = None, files_per_unit: int = 256,
            lighting_sample: int | None = None, log=print) -> dict[str, Any]:
    """Convert ImageNet under `root` into shards under `out` (local or s3://); returns the manifest."""
    import ray.data

    started = time.time()
    units = imagenet.discover_inputs(root, val_labels=val_labels, devkit=devkit, files_per_unit=files_per_unit)
    classes = train_classes(units)
    num_shards = plan_shards(units, target_bytes=int(target_mb * 2**20), resize=resize)
    classes_sha = hashlib.sha256("\n".join(classes).encode()).hexdigest()
    options = {split: {"resize_shorter": resize, "quality": quality, "num_shards": n, "classes_sha256": classes_sha}
               for split, n in num_shards.items()}

    out_fs, out_root = storage.resolve(out)
    done = {split: shards.complete_shards(out_fs, out_root, split, options[split], n)
            for split, n in num_shards.items()}
    todo = [u for u in units if _unit_needed(u, num_shards[u.split], set(done[u.split]))]
    log(f"[prepare] {len(units)} input units, {len(classes)} classes; shards "
        + ", ".join(f"{s}: {len(done[s])}/{n} already complete" for s, n in num_shards.items())
        + f"; {len(todo)} units to read")

    written: dict[str, list[dict]] = {split: list(cars.values()) for split, cars in done.items()}
    if todo:
        ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(partial(read_unit, num_shards=num_shards,
                                 done={s: sorted(d) for s, d in done.items()}))
        ds = ds.map_batches(partial(clean_rows, classes=classes, resize=resize, quality=quality),
                            batch_size=32, batch_format="numpy")
        missing = sum(n - len(done[s]) for s, n in num_shards.items())
        # One hash partition per shard to write (Ray's default of 200 is all overhead on small sets).
        ds = ds.groupby(["split", "shard"], num_partitions=max(1, min(missing, 200))).map_groups(
            partial(write_group, out=out, classes=classes, options=options), batch_format="numpy")
        for row in ds.take_all():
            car = json.loads(row["sidecar"])
            written[car["split"]].append(car)

    for split, n in num_shards.items():  # a shard no image hashed to is still part of the set
        have = {c["index"] for c in written[split]}
        for index in sorted(set(range(n)) - have):
            written[split].append(shards.write_shard(out_fs, out_root, split, index, [], [], options[split]))

    manifest = shards.build_manifest(source=root, classes=classes, sidecars=written, options=options,
                                     val_labels=val_labels or devkit or "auto")
    if lighting_sample is not None:
        manifest["lighting"] = _lighting(out, manifest, lighting_sample)
    storage.write_bytes(out_fs, storage.join(out_root, shards.MANIFEST), shards.manifest_bytes(manifest))
    for split, info in manifest["splits"].items():
        log(f"[prepare] {split}: {info['inputs']} inputs = {info['images']} written + {info['skipped']} skipped "
            f"({info['converted']} converted) in {len(info['shards'])} shards")
    log(f"[prepare] manifest at {storage.join(out, shards.MANIFEST)} in {time.time() - started:.0f} s")
    return manifest


def _lighting(out: str, manifest: dict[str, Any], sample: int) -> dict[str, Any]:
    """§4.1's PCA over the written train shards (sample 0 = every image)."""
    import ray.data

    from pipeline import lighting

    fs, root = storage.resolve(out)
    paths = [storage.join(root, s["path"]) for s in manifest["splits"]["train"]["shards"] if s["rows"]]
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["jpeg"])
    total = manifest["splits"]["train"]["images"]
    result = lighting.compute_lighting(ds, sample=sample or None, total_images=total)
    return result.to_dict()

