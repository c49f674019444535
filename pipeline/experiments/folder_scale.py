"""An ImageNet folder at ImageNet's size (issue 19): N tiny JPEGs in train/<wnid>/ and val/<wnid>/, then what
training from the folder costs the driver and the data path.

    python jobs/benchmark.py folder --images 1281000            # 1,000 classes of 1,281, 50 val images each

Every file is one of a few 64x48 JPEGs (~2 KB), so decoding is cheap and what grows with the number of files
shows: listing, the driver's memory, the per-sample cost of the plan. Measured, in a fresh local Ray of
`cores` CPUs, as the training driver does it (open_source, the listing put into the object store once):

    open           data.open_source on the folder: the listing, one class folder at a time
    first batch    from asking for the iterator to holding the first batch
    steady         img/s after it, over --measure-images images of epoch 0 (crops of 32 px)
    resumed        epoch 1 restarted with half of its images trained on already: img/s delivered
    driver peak    this process's ru_maxrss: ray.init, the listing and iterating, as a train driver
"""

from __future__ import annotations

import dataclasses
import io
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import DataContext

from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import plan

CLASSES = 1000
VAL_PER_CLASS = 50
RESIZE, CROP = 36, 32  # tiny crops: the per-sample cost, not the decode, is what is measured
BATCH = 256


def tiny_folder(root: Path, images: int, classes: int = CLASSES) -> Path:
    """`images` train files over `classes` class folders, and val files at ImageNet's ratio (VAL_PER_CLASS for
    1,281 train images a class); kept under `root` (a .complete marker) and reused."""
    from PIL import Image  # deferred: only to make the folder, once

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        encoded = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(encoded, "JPEG", quality=85)
        blobs.append(encoded.getvalue())
    per_class = -(-images // classes)
    val_per_class = max(1, min(VAL_PER_CLASS, per_class // 25))  # ImageNet's 50 of ~1,281
    written = 0
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, count in (("train", min(per_class, images - written)), ("val", val_per_class)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(max(count, 0)):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(blobs[(c + i) % len(blobs)])
        written += min(per_class, images - written)
    (root / ".complete").write_text(f"{images}\n")
    return root


def measure(uri: str, cores: int, measure_images: int) -> dict[str, Any]:
    def peak_mb() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    def first_and_steady(dataset, limit: int) -> tuple[float, float]:
        started = time.perf_counter()
        first_at, first_n, n = 0.0, 0, 0
        for batch in dataset.iter_batches(batch_size=BATCH, batch_format="numpy"):
            if not first_at:
                first_at, first_n = time.perf_counter(), len(batch["label"])
            n += len(batch["label"])
            if n >= limit:
                break
        return round(first_at - started, 2), round((n - first_n) / (time.perf_counter() - first_at))

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        DataContext.get_current().enable_progress_bars = False
        report: dict[str, Any] = {"ray_init_peak_mb": peak_mb()}
        cfg = dataclasses.replace(PRESETS["paper"], resize_size=RESIZE, crop_size=CROP, seed=0)
        opened = time.perf_counter()
        source = data.open_source(uri)
        report["open_s"] = round(time.perf_counter() - opened, 1)
        source = source.by_reference()  # as driver.run does
        pa.default_memory_pool().release_unused()
        report["images"] = source.images
        report["first_batch_s"], report["steady_img_s"] = first_and_steady(
            data.train_dataset(source, cfg), measure_images
        )
        report["ms_per_image_per_core"] = round(1000 * cores / report["steady_img_s"], 3)
        half = np.arange(source.images["train"] // 2, dtype=np.int64)  # half the epoch's images, trained on
        resumed = plan.start_at(data.train_dataset(source, cfg), 1, half)
        report["resumed_first_batch_s"], report["resumed_img_s"] = first_and_steady(resumed, measure_images // 2)
        report["driver_peak_mb"] = peak_mb()
        return report
    finally:
        ray.shutdown()


def run_folder(images: int, work: Path, cores: int | None = None, measure_images: int = 300_000) -> dict[str, Any]:
    cores = cores or os.cpu_count() or 1
    made = time.perf_counter()
    root = tiny_folder(work / f"folder-{images}", images)
    return {
        "images_asked": images,
        "made_s": round(time.perf_counter() - made, 1),
        "cores": cores,
        **measure(str(root), cores, measure_images),
    }
