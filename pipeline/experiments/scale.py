"""Scale by simulation (issue 19): N tiny images written straight into prepared shards, then what the
data path costs at that N on this machine.

    python jobs/benchmark.py scale --images 1281167                    # ImageNet-1k's train split
    python jobs/benchmark.py scale --images 14200000 --json            # ImageNet-21k's size

The shards are those of prepare_imagenet.py --resize 256 in every way the driver and the tasks see
(shards.py's writer, sidecars and manifest; 1,000 classes; its 128 MiB shards' row count at the
~48 KB a 256-px image takes), except that every image is one of a few 64x48 JPEGs (~1.1 KB, each
copy told apart by a comment): the files, row groups, manifest and indices are ImageNet's, the bytes
~1/40. Tiny images and 32-px crops make the per-sample cost (Ray Data, batching, the index
bookkeeping) the bulk of the time instead of the JPEG decode, so what grows with N shows.

Measured, in a fresh local Ray of `cores` CPUs:

    open           data.open_source on the shards (manifest, every shard's size checked)
    first batch    from asking for the iterator to holding the first batch (Ray Data's cold start)
    steady         img/s after the first batch, over --measure-images images of epoch 0
    driver peak    the RSS of this process (the one iterating, as a train worker does), sampled,
                   and its ru_maxrss (the kernel's high-water mark, which no sampling misses)
    task peak      the largest RSS of any Ray worker process (`ray::...`) at any sample
                   (both, also per phase: RSS includes the object store pages a process wrote or
                   read blocks in, which Ray Data's buffer bounds, not N)
    resume         epoch 1 restarted as after a checkpoint half way through it: the indices of the
                   epoch's first half of read units (what the workers had consumed) given to
                   plan.start_at, then --resume-images images read (or the rest of the epoch); and,
                   outside Ray, what one read unit of that epoch costs with the skip list and without

Each read is cut off after --limit-s seconds and reports what it delivered by then: a resumed
epoch's first batch waits for the tasks of every skipped read unit, and until each of them stopped
sorting the skip list again (commit 344b44d) it did not come within 600 s at 1.28 M images.

The synthesised set is kept under --work and reused while its manifest is there (the manifest is
written last, as prepare_imagenet.py does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import resource
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.data import DataContext

from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import plan, readers, shards, sources, storage
from pipeline.data.readers.base import SPLITS, in_sorted, permutation
from pipeline.experiments.benchmark import BATCH, Result, _describe, _machine

CLASSES = 1000
TINY_W, TINY_H, QUALITY = 64, 48, 75
DISTINCT_JPEGS = 16  # encoded once per process, reused row after row
# prepare_imagenet.py's default --shard-mb over a 256-px ImageNet image's ~48 KB: the rows of one of its
# shards, so the number of files and row groups (what the driver lists and the tasks index) is ImageNet's.
SHARD_ROWS = 128 * 2**20 // 48_000
RESIZE, CROP = 36, 32  # the setup: small crops, so the per-sample cost shows
SEED = 0
SAMPLE_EVERY_S = 0.25


# --- synthesis ------------------------------------------------------------------------------------


def val_images(train: int) -> int:
    """ImageNet-1k's proportion (50,000 val to 1.28 M train), at most 50,000 and at least a row group."""
    return max(shards.ROW_GROUP_SIZE, min(50_000, train // 25))


def class_wnids() -> list[str]:
    return [f"n{c:08d}" for c in range(CLASSES)]  # sorted, so a label is its wnid's place, as in ImageNet


@lru_cache(maxsize=1)
def tiny_jpegs() -> tuple[bytes, ...]:
    """DISTINCT_JPEGS valid 64x48 RGB JPEGs (4:2:0, ~1.1 KB, most of it the header's tables), each a
    different smooth pattern with a little noise."""
    import simplejpeg

    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[0:TINY_H, 0:TINY_W]
    out = []
    for k in range(DISTINCT_JPEGS):
        base = 128 + 100 * np.stack([np.sin(x / 7 + k), np.cos(y / 5 + 2 * k), np.sin((x + y) / 9 + 3 * k)], -1)
        pixels = np.clip(base + rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
        out.append(simplejpeg.encode_jpeg(pixels, quality=QUALITY, colorspace="RGB", colorsubsampling="420"))
    return tuple(out)


def unique_jpeg(jpeg: bytes, name: str) -> bytes:
    """`jpeg` with a comment segment (COM, which decoders skip) naming the image after its SOI marker.

    Without it Parquet would store the few distinct JPEGs once per row group (its dictionary encoding)
    and read a fraction of the bytes a real shard holds."""
    text = name.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def _write_shard(root: str, split: str, index: int, start: int, rows: int, options: dict[str, Any]) -> dict:
    """Shard `index` of `split`: images start .. start + rows - 1 of the split, through the prepare job's
    own ShardWriter (so layout, checksums and sidecar are the format's); returns the sidecar."""
    wnids, jpegs = class_wnids(), tiny_jpegs()
    labels = np.random.default_rng([SEED, SPLITS.index(split), index]).integers(0, CLASSES, rows).tolist()
    writer = shards.ShardWriter(split, index)
    for i, label in enumerate(labels, start):
        name = f"synthetic_{i:09d}"  # zero-padded: increasing image_ids, as the writer requires
        writer.add(
            {
                "image_id": f"{split}/{name}",
                "key": f"{name}.JPEG",
                "label": label,
                "wnid": wnids[label],
                "jpeg": unique_jpeg(jpegs[i % DISTINCT_JPEGS], name),
                "width": TINY_W,
                "height": TINY_H,
            }
        )
    return writer.finish(*storage.resolve(root), [], options)


def synthesize(root: Path, images: int, cores: int, log: Callable[[str], None] = print) -> float | None:
    """`images` train images (and val_images(images) val) as prepared shards at `root`, in `cores`
    processes; seconds taken, or None when a complete set of that size is already there."""
    fs, out = storage.resolve(str(root))
    if (root / shards.MANIFEST).exists():
        manifest, _ = shards.read_manifest(fs, out)
        if manifest["splits"]["train"]["images"] == images:
            return None
        raise ValueError(
            f"{root} holds a synthesised set of {manifest['splits']['train']['images']} images, not {images}"
        )
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    classes = class_wnids()
    counts = {"train": images, "val": val_images(images)}
    num_shards = {split: -(-n // SHARD_ROWS) for split, n in counts.items()}
    # The options prepare.prepare records (a re-run compares them), and what made these images instead.
    classes_sha = hashlib.sha256("\n".join(classes).encode()).hexdigest()
    options = {
        split: {
            "resize_shorter": None,
            "quality": QUALITY,
            "num_shards": n,
            "classes_sha256": classes_sha,
            "synthetic": f"{DISTINCT_JPEGS} distinct {TINY_W}x{TINY_H} JPEGs (jobs/benchmark.py scale)",
        }
        for split, n in num_shards.items()
    }
    work = [
        (
            str(root),
            split,
            index,
            index * SHARD_ROWS,
            min(SHARD_ROWS, counts[split] - index * SHARD_ROWS),
            options[split],
        )
        for split in SPLITS
        for index in range(num_shards[split])
    ]
    sidecars: dict[str, list[dict]] = {split: [] for split in SPLITS}
    # spawn: fresh processes, not forks of a driver that may hold threads (pyarrow's, a sampler's)
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done, car in enumerate(pool.map(_write_shard, *zip(*work), chunksize=4), 1):
            sidecars[car["split"]].append(car)
            if done % max(1, len(work) // 10) == 0 or done == len(work):
                rate = sum(c["rows"] for cars in sidecars.values() for c in cars) / (time.perf_counter() - started)
                log(f"[scale] synthesised {done}/{len(work)} shards, {rate:,.0f} img/s")
    manifest = shards.build_manifest(
        source=f"synthetic:{images}", classes=classes, sidecars=sidecars, options=options, val_labels=None
    )
    storage.write_bytes(fs, storage.join(out, shards.MANIFEST), shards.manifest_bytes(manifest))  # last: complete
    return time.perf_counter() - started


# --- measuring ------------------------------------------------------------------------------------


class PeakMemory:
    """Peak RSS of this process and of every Ray worker process under it (its local Ray's raylet starts
    them; they are titled `ray::IDLE`, `ray::ReadRange->MapBatches(...)`, ...), sampled on a thread.

    RSS counts the object store pages a worker has mapped and touched, so the workers' figures include
    the blocks and the resume's skip list they read from shared memory."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S):
        import psutil

        self._me, self._every = psutil.Process(), every_s
        self.driver = 0
        self.tasks: dict[int, tuple[int, str]] = {}  # pid -> (peak RSS, title at that peak)
        self.tasks_total = 0  # the most the workers held together at one sample
        self.phase = "open"  # set by the measurement as it goes
        self.by_phase: dict[str, list[int]] = {}  # phase -> [driver peak, largest worker peak]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self.sample()  # the phase before the first, however short
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._every):
                return

    def sample(self) -> None:
        import psutil

        driver = self._me.memory_info().rss
        self.driver = max(self.driver, driver)
        total = largest = 0
        for process in self._me.children(recursive=True):
            try:
                title = " ".join(process.cmdline())
                if not title.startswith("ray::"):
                    continue
                rss = process.memory_info().rss
            except psutil.Error:  # ended between the listing and the look
                continue
            total += rss
            largest = max(largest, rss)
            if rss > self.tasks.get(process.pid, (0, ""))[0]:
                self.tasks[process.pid] = (rss, title[:80].strip())
        self.tasks_total = max(self.tasks_total, total)
        peaks = self.by_phase.setdefault(self.phase, [0, 0])
        peaks[:] = max(peaks[0], driver), max(peaks[1], largest)

    def task_peak(self) -> tuple[int, str]:
        return max(self.tasks.values(), default=(0, "no Ray worker seen"))


class Reading:
    """One timed read of a dataset, as a GPU trainer receives it (uint8 torch batches), on a thread of its
    own so that a read that stalls is cut off at its time limit and still reports what it got."""

    def __init__(self, dataset, images: int, started: float, keep_indices: bool = False):
        self.dataset, self.images, self.started = dataset, images, started
        self.n, self.first_n = 0, 0
        self.first_at: float | None = None
        self.end = started
        self.indices: list[np.ndarray] | None = [] if keep_indices else None
        self.error: BaseException | None = None

    def run(self, limit_s: float) -> bool:
        """Read until `images` or the dataset's end; False if `limit_s` passed first (the read goes on
        until Ray shuts down)."""
        thread = threading.Thread(target=self._read, name="scale-read", daemon=True)
        thread.start()
        thread.join(limit_s)
        self.end = time.perf_counter()
        if self.error is not None:
            raise self.error
        return not thread.is_alive()

    def _read(self) -> None:

        batches = iter(self.dataset.iter_torch_batches(batch_size=BATCH))
        try:
            for batch in batches:
                if self.indices is not None:
                    self.indices.append(batch["index"].numpy())
                self.n += len(batch["image"])
                if self.first_at is None:
                    self.first_at, self.first_n = time.perf_counter(), self.n
                if self.n >= self.images:
                    break
        except BaseException as e:  # handed to run(), in the measuring thread
            self.error = e
        finally:
            close = getattr(batches, "close", None)
            if close:  # stops Ray Data's execution now, not when the iterator is collected
                close()

    def result(self):
        """A benchmark.Result: first batch, then steady img/s after it (None: no batch came)."""

        if self.first_at is None:
            return Result("", self.n, self.end - self.started)
        after = self.end - self.first_at
        steady = (self.n - self.first_n) / after if after > 0 else float("nan")
        return Result("", self.n, self.end - self.started, self.first_at - self.started, steady)


def first_half(source, epoch: int, seed: int) -> np.ndarray:
    """The indices of the train images in the first half of `epoch`'s read units: what a checkpoint half
    way through the epoch records (the read units go out in order; Reader.index numbers their rows)."""

    manifest, _ = shards.read_manifest(*storage.resolve(source.uri))
    rows = [  # per row group, in the order ShardsReader lists them
        min(shards.ROW_GROUP_SIZE, s["rows"] - g * shards.ROW_GROUP_SIZE)
        for s in manifest["splits"]["train"]["shards"]
        if s["rows"]
        for g in range(-(-s["rows"] // shards.ROW_GROUP_SIZE))
    ]
    reader = readers.reader(source, "train")
    if len(rows) != reader.num_units():
        raise ValueError(f"{source.uri}: the manifest lists {len(rows)} row groups, the reader {reader.num_units()}")
    order = permutation(len(rows), seed, epoch, True)
    pieces = order[: len(order) // 2]
    return np.concatenate([reader.index(int(p), np.arange(rows[p], dtype=np.int64)) for p in pieces])


def skip_costs(source, consumed: np.ndarray, epoch: int, seed: int) -> dict[str, float]:
    """Seconds one read unit of the resumed epoch costs on one core, outside Ray: a unit the skip list
    covers, and the first unit it does not, read with the skip list and without; and the membership test
    plan._read_units makes on each kept unit (in_sorted: its indices in the skip list). They say where a
    resumed epoch's time goes as the skip list grows with N."""

    skip = np.unique(consumed)  # as plan.start_at hands it to the tasks
    units = sources.num_units(source, "train")

    def timed(unit: int, skip_list: np.ndarray | None) -> tuple[dict, float]:
        started = time.perf_counter()
        rows = sources.read_unit(source, "train", unit, seed=seed, epoch=epoch, shuffle=True, skip=skip_list)
        return rows, time.perf_counter() - started

    costs: dict[str, float] = {}
    # Unit 0 of the epoch is in the first half (skipped), units // 2 the first of the second half (kept);
    # the kept one is read without the skip list first, so that the file's first open is not charged to it.
    kept, costs["kept unit, no skip list"] = timed(units // 2, None)
    _, costs["kept unit, with the skip list"] = timed(units // 2, skip)
    _, costs["skipped unit, with the skip list"] = timed(0, skip)
    started = time.perf_counter()
    in_sorted(kept["index"], skip)
    costs["in_sorted(kept unit, skip list)"] = time.perf_counter() - started
    return costs


def delivered_twice_or_skipped(delivered: np.ndarray, consumed: np.ndarray) -> tuple[int, int]:
    """(images delivered that the skip list holds, images delivered more than once): both must be 0."""
    ordered = np.sort(delivered)
    return int(in_sorted(delivered, np.unique(consumed)).sum()), int((ordered[1:] == ordered[:-1]).sum())


def measure(
    uri: str, cores: int, measure_images: int, resume_images: int, limit_s: float, log: Callable[[str], None]
) -> dict:
    """Open, epoch 0 and a resumed epoch 1 of the shards at `uri`, in a fresh local Ray; figures as a dict.
    Each read stops at `limit_s` seconds, reporting what it got by then."""

    torch.set_num_threads(1)  # benchmark.py's reason: the data workers hold every core
    cfg = dataclasses.replace(PRESETS["paper"], resize_size=RESIZE, crop_size=CROP, seed=SEED)
    ray.init(
        address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False
    )  # its own Ray, never one found on the machine
    try:
        DataContext.get_current().enable_progress_bars = False
        with PeakMemory() as memory:
            started = time.perf_counter()
            source = data.open_source(uri)
            open_s = time.perf_counter() - started
            log(f"[scale] open_source: {open_s:.2f} s")

            memory.phase = "epoch 0"
            epoch0 = Reading(data.train_dataset(source, cfg), measure_images, time.perf_counter())
            epoch0_done = epoch0.run(limit_s)
            steady = epoch0.result()
            log(f"[scale] epoch 0: {_describe(steady)}" + ("" if epoch0_done else f" (cut off at {limit_s:.0f} s)"))

            memory.phase = "resume"
            consumed = first_half(source, 1, cfg.seed)
            started = time.perf_counter()  # the restart: plan, skip list into the object store, first batch
            resume = Reading(plan.start_at(data.train_dataset(source, cfg), 1, consumed), resume_images, started, True)
            resume_done = resume.run(limit_s)
            resumed = resume.result()
            log(
                f"[scale] epoch 1 resumed with {len(consumed):,} images skipped: {_describe(resumed)}"
                + ("" if resume_done else f" (cut off at {limit_s:.0f} s; its threads may print errors as Ray stops)")
            )
        driver_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    finally:
        ray.shutdown()
    costs = skip_costs(source, consumed, 1, cfg.seed)
    log("[scale] one read unit of the resumed epoch: " + ", ".join(f"{k} {v:.3f} s" for k, v in costs.items()))
    skipped_delivered, repeated = delivered_twice_or_skipped(
        np.concatenate(resume.indices or [np.empty(0, np.int64)]), consumed
    )
    task_rss, task_title = memory.task_peak()
    left = source.images["train"] - len(consumed)
    # The first half of the epoch's units go out first: their reads alone, at the skipped unit's cost on every
    # core, are what the resumed first batch cannot beat; the rest of its wait is Ray's, per task.
    units = sources.num_units(source, "train")
    skipped_reads = units // 2 * costs["skipped unit, with the skip list"] / cores
    return {
        "open_s": open_s,
        "first_batch_s": steady.first_batch_s,
        "steady_img_s": steady.steady_img_s,
        "measured_images": steady.images,
        "cut_off": not epoch0_done,
        "driver_peak_mb": memory.driver / 2**20,
        "driver_maxrss_mb": driver_maxrss / 2**20,
        "task_peak_mb": task_rss / 2**20,
        "task_peak_process": task_title,
        "tasks_total_peak_mb": memory.tasks_total / 2**20,
        "ray_workers_seen": len(memory.tasks),
        "peaks_by_phase_mb": {
            phase: {"driver": driver / 2**20, "task": task / 2**20} for phase, (driver, task) in memory.by_phase.items()
        },
        "resume": {
            "skipped": len(consumed),
            "left": left,
            "images": resumed.images,
            "complete": resumed.images == left,
            "cut_off": not resume_done,
            "first_batch_s": resumed.first_batch_s,
            "img_s": resumed.img_s,
            "steady_img_s": resumed.steady_img_s,
            "skipped_delivered": skipped_delivered,  # must be 0
            "repeated": repeated,  # must be 0
            "unit_costs_s": costs,
            "skipped_reads_s": skipped_reads,
        },
    }


def run_scale(
    *,
    images: int,
    measure_images: int,
    resume_images: int,
    limit_s: float,
    cores: int,
    work: Path,
    delete: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Synthesise (or reuse) `images` tiny images as shards under `work`, measure; the report as a dict."""

    root = work / f"shards-{images}"
    log(f"[scale] {images:,} train images as shards in {root} ({cores} cores)")
    synthesis_s = synthesize(root, images, cores, log)
    log(
        f"[scale] synthesised in {synthesis_s:.0f} s" if synthesis_s is not None else "[scale] reusing the shards there"
    )
    manifest, _ = shards.read_manifest(*storage.resolve(str(root)))
    train = manifest["splits"]["train"]
    try:
        figures = measure(str(root), cores, measure_images, resume_images, limit_s, log)
    finally:
        if delete:
            shutil.rmtree(root)
    return {
        "command": f"python jobs/benchmark.py scale --images {images} --measure-images {measure_images} "
        f"--resume-images {resume_images} --limit-s {limit_s:g} --cores {cores}",
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(cores),
        "images": train["images"],
        "val_images": manifest["splits"]["val"]["images"],
        "shards": len(train["shards"]) + len(manifest["splits"]["val"]["shards"]),
        "row_groups": sum(-(-s["rows"] // shards.ROW_GROUP_SIZE) for s in train["shards"]),
        "train_gb": train["bytes"] / 1e9,
        "bytes_per_image": train["bytes"] / train["images"],
        "synthesis_s": synthesis_s,
        "crop": [RESIZE, CROP],
        **figures,
    }


def table(report: dict) -> str:
    r, resume = report, report["resume"]

    def seconds(value: float | None) -> str:
        return "none in the time limit" if value is None else f"{value:.2f} s"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    def by_phase(who: str) -> str:
        return ", ".join(f"{phase} {peaks[who]:,.0f}" for phase, peaks in r["peaks_by_phase_mb"].items())

    costs = resume["unit_costs_s"]
    rows = [
        ("train images", f"{r['images']:,} ({r['row_groups']:,} row groups, {r['train_gb']:.2f} GB)"),
        ("open_source", seconds(r["open_s"])),
        ("first batch", seconds(r["first_batch_s"])),
        ("steady", f"{rate(r['steady_img_s'])} img/s over {r['measured_images']:,} images"),
        (
            "driver peak RSS",
            f"{r['driver_peak_mb']:,.0f} MB ({by_phase('driver')}; ru_maxrss {r['driver_maxrss_mb']:,.0f} MB)",
        ),
        (
            "task peak RSS",
            f"{r['task_peak_mb']:,.0f} MB, one process ({by_phase('task')}; "
            f"{r['tasks_total_peak_mb']:,.0f} MB all workers together)",
        ),
        (
            "resume: first batch",
            f"{seconds(resume['first_batch_s'])} ({resume['skipped']:,} images skipped; "
            f"their reads alone {resume['skipped_reads_s']:,.1f} s)",
        ),
        (
            "resume: delivered",
            f"{resume['images']:,} of {resume['left']:,} left, {rate(resume['img_s'])} img/s "
            f"({rate(resume['steady_img_s'])} after the first batch)" + (", cut off" if resume["cut_off"] else ""),
        ),
        (
            "resume: one unit",
            ", ".join(f"{name} {value:.3f} s" for name, value in costs.items()),
        ),
    ]
    return "\n".join(f"{name:22s} {value}" for name, value in rows)
