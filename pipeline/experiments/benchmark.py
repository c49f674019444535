"""The data path side by side with what a user would pick instead, on the same files and cores.

    python jobs/benchmark.py data                       # generates 1,500 photo-like JPEGs (cached)
    python jobs/benchmark.py data --data /data/imagenet --images 5000 --json

Every path ends in the same thing: a batch of 64 normalised float images (64, 3, 224, 224), each a
random 224 crop of the central 256 square of an image, mirrored half the time, with PCA lighting.

    decode PIL / simplejpeg   bare decode of the original files, one core, no resize: the ceiling
    stages, one core          stages.random_crops + device_stages.to_model_input in one process, no Ray
    reference                 torchvision: ImageFolder + DataLoader(num_workers=cores), Resize(256),
                              CenterCrop(256), RandomCrop(224), RandomHorizontalFlip, ToTensor,
                              lighting, Normalize (references/classification, plus fb.resnet's Lighting)
    folder                    data.train_dataset(data.open_source(folder)) -> iter_torch_batches
    shards                    the same from prepare_imagenet.py's shards of the original JPEGs
    shards-256                ... of shards prepared with --resize 256: the deployment path
    shards-256, uint8         the same, stopping at the uint8 batches a GPU trainer receives (it does the
                              float math on the GPU): what the CPUs deliver to an accelerator
    s3 shards-256             ... from s3:// through a local S3 endpoint (moto's server, in this process)

Each Ray path starts its own local Ray with `cores` CPUs, so each first batch is a cold start, as
a user's first epoch is. "first batch" is the time from asking for the iterator to holding the
first batch; "steady" counts the images after the first batch over the time after it, across all
epochs. Ratios are to the reference's steady rate in the same run: absolute figures move with
the machine and its neighbours, ratios in one run are what count.

The consuming process runs torch with one thread on every path: the data workers already hold
every core, and a second intra-op thread for the float math only contends with them (measured on
2 cores: 1,539 img/s with one thread, 1,275 with two, from 256-px shards).
"""

from __future__ import annotations

import dataclasses
import io
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import prepare
from pipeline.data.sample import generate_photo_imagenet
from pipeline.transforms import constants, device_stages, stages
from pipeline.transforms.decode import decode_image

BATCH = 64
RESIZE, CROP = 256, 224


@dataclass
class Result:
    path: str
    images: int
    seconds: float
    first_batch_s: float | None = None
    steady_img_s: float | None = None
    note: str = ""

    @property
    def img_s(self) -> float:
        return self.images / self.seconds


def time_batches(batches: Callable[[], Iterable[torch.Tensor]], epochs: int) -> tuple[int, float, float, float]:
    """Iterate `epochs` passes; (images, seconds, first batch seconds, steady img/s after it)."""
    start = time.perf_counter()
    first_at, first_n, n = None, 0, 0
    for _ in range(epochs):
        for x in batches():
            n += len(x)
            if first_at is None:
                first_at, first_n = time.perf_counter(), len(x)
    end = time.perf_counter()
    steady = (n - first_n) / (end - first_at) if first_at and end > first_at else float("nan")
    return n, end - start, first_at - start, steady


# --- the paths ------------------------------------------------------------------------------------


def bare_decode(files: list[Path], decoder: str) -> Result:
    """One core, whole images, no resize; the best of three passes (a single short pass varies by
    up to 2x on a shared VM)."""
    from PIL import Image

    data = [f.read_bytes() for f in files]
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        for d in data:
            if decoder == "PIL":
                np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
            else:
                decode_image(d)
        passes.append(time.perf_counter() - start)
    return Result(f"decode {decoder}, one core", len(data), min(passes))


def stages_one_core(files: list[Path], seed: int = 0) -> Result:
    """The project's stages on one core in one process, best of three passes: what the Ray plan
    parallelises."""
    data = [f.read_bytes() for f in files]
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(data), BATCH):
            batch = stages.random_crops({"jpeg": data[i : i + BATCH]}, rng, resize_size=RESIZE, crop_size=CROP)
            device_stages.to_model_input(torch.from_numpy(batch["image"]), generator)
        passes.append(time.perf_counter() - start)
    return Result("stages, one core, no Ray", len(data), min(passes))


class Lighting:
    """fb.resnet.torch's per-image PCA lighting, as torchvision users copy it into their transforms."""

    def __init__(self, std: float = 0.1):
        self.std = std
        self.eigval = torch.tensor(constants.IMAGENET_EIGVAL)
        self.eigvec = torch.tensor(constants.IMAGENET_EIGVEC)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return img + (self.eigvec @ (alpha * self.eigval))[:, None, None]


def reference(train_dir: Path, cores: int, epochs: int) -> Result:
    """torchvision's ImageFolder + DataLoader, the loader users would keep if this project did not exist."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    transform = T.Compose(
        [
            T.Resize(RESIZE),
            T.CenterCrop(RESIZE),
            T.RandomCrop(CROP),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            Lighting(0.1),
            T.Normalize(constants.IMAGENET_MEAN, constants.IMAGENET_STD),
        ]
    )
    loader = DataLoader(ImageFolder(str(train_dir), transform), batch_size=BATCH, shuffle=True, num_workers=cores)
    n, seconds, first, steady = time_batches(lambda: (images for images, _ in loader), epochs)
    return Result(f"reference: torchvision DataLoader({cores} workers)", n, seconds, first, steady)


def ray_plan(
    name: str, uri: str, cores: int, epochs: int, env: dict[str, str] | None = None, float_math: bool = True
) -> Result:
    """data.train_dataset over `uri`, iterated as the train loop does, in a fresh local Ray; with
    float_math=False the batches stay uint8, as a GPU trainer receives them."""
    import ray
    from ray.data import DataContext

    cfg = dataclasses.replace(PRESETS["paper"], resize_size=RESIZE, crop_size=CROP, seed=0)
    os.environ.update(env or {})
    ray.init(
        address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False
    )  # its own Ray, never one found on the machine
    try:
        DataContext.get_current().enable_progress_bars = False
        opened = time.perf_counter()
        source = data.open_source(uri)
        dataset = data.train_dataset(source, cfg)
        opened = time.perf_counter() - opened
        generator = torch.Generator().manual_seed(0)

        def batches() -> Iterator[torch.Tensor]:
            for batch in dataset.iter_torch_batches(batch_size=BATCH):
                yield device_stages.to_model_input(batch["image"], generator) if float_math else batch["image"]

        n, seconds, first, steady = time_batches(batches, epochs)
    finally:
        ray.shutdown()
    return Result(name, n, seconds, first, steady, note=f"open_source + plan {opened:.1f} s")


# --- files: the originals, and shards prepared from them -------------------------------------------


def photo_files(work: Path, images: int) -> Path:
    root = work / f"photos-{images}"
    if not (root / ".complete").exists():
        generate_photo_imagenet(root, images=images)
        (root / ".complete").write_text(f"{images}\n")
    return root


def prepared(folder: Path, out: Path, resize: int | None, cores: int) -> float:
    """Shards of `folder` under `out` (prepare_imagenet.py, resumed if already there); seconds taken."""
    import ray

    ray.init(
        address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False
    )  # its own Ray, never one found on the machine
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        prepare.prepare(str(folder), str(out), resize=resize, log=lambda message: None)
        return time.perf_counter() - start
    finally:
        ray.shutdown()


def s3_copy(folder: Path) -> tuple[str, dict[str, str], Callable[[], None]]:
    """A local S3 endpoint (moto's server) holding `folder`: (uri, environment for it, stop)."""
    import logging
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "benchmark",
        "AWS_SECRET_ACCESS_KEY": "benchmark",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket="benchmark")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), "benchmark", f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return f"s3://benchmark/{folder.name}", env, server.stop


# --- the run --------------------------------------------------------------------------------------


def run_data(
    *,
    data_dir: str | None,
    images: int,
    epochs: int,
    cores: int,
    work: Path,
    paths: tuple[str, ...],
    log: Callable[[str], None] = print,
) -> dict:
    """Every path on the same files and cores; the results and the machine, as a dict."""
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # see the module docstring
    folder = Path(data_dir) if data_dir else photo_files(work, images)
    train_files = sorted((folder / "train").rglob("*.JPEG")) + sorted((folder / "train").rglob("*.jpg"))
    if not train_files:
        raise FileNotFoundError(f"no train/<class>/*.JPEG files under {folder}")
    sizes = [f.stat().st_size for f in train_files[:500]]
    log(
        f"[benchmark] {len(train_files)} train JPEGs in {folder} (mean {statistics.mean(sizes) / 1e3:.0f} KB), "
        f"{cores} cores, {epochs} epochs per path"
    )

    results: list[Result] = []

    def add(result: Result) -> None:
        results.append(result)
        log(f"[benchmark] {result.path}: {_describe(result)}")

    sample = train_files[:500]
    if "decode" in paths:
        add(bare_decode(sample, "PIL"))
        add(bare_decode(sample, "simplejpeg"))
        add(stages_one_core(sample))
    if "reference" in paths:
        add(reference(folder / "train", cores, epochs))
    if "folder" in paths:
        add(ray_plan("folder (Ray Data)", str(folder), cores, epochs))
    prepare_seconds = {}
    for resize, name in ((None, "shards"), (RESIZE, "shards-256")):
        if name in paths or (resize and ({"s3", "uint8"} & set(paths))):
            out = work / f"{folder.name}-{name}"
            prepare_seconds[name] = prepared(folder, out, resize, cores)
            if name in paths:
                add(ray_plan(f"{name} (Ray Data)", str(out), cores, epochs))
            if name == "shards-256" and "uint8" in paths:
                add(ray_plan(f"{name}, uint8 for a GPU (Ray Data)", str(out), cores, epochs, float_math=False))
    if "s3" in paths:
        uri, env, stop = s3_copy(work / f"{folder.name}-shards-256")
        try:
            add(ray_plan("s3 shards-256 (Ray Data, moto)", uri, cores, epochs, env))
        finally:
            stop()

    ref = next((r for r in results if r.path.startswith("reference")), None)
    pil = next((r for r in results if r.path.startswith("decode PIL")), None)
    rows = []
    for r in results:
        rate = r.steady_img_s or r.img_s
        rows.append(
            {
                **dataclasses.asdict(r),
                "img_s": r.img_s,
                "vs_reference": rate / (ref.steady_img_s or ref.img_s) if ref else None,
                "vs_pil_decode_x_cores": rate / (pil.img_s * cores) if pil else None,
            }
        )
    return {
        "command": "python jobs/benchmark.py data",
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(cores),
        "files": {"folder": str(folder), "train_images": len(train_files), "mean_kb": statistics.mean(sizes) / 1e3},
        "epochs": epochs,
        "prepare_seconds": prepare_seconds,
        "results": rows,
    }


def table(report: dict) -> str:
    lines = [
        f"{'path':44s} {'img/s':>7s} {'steady':>7s} {'first batch':>12s} {'vs reference':>13s} {'vs PIL x cores':>15s}"
    ]
    for r in report["results"]:
        first = f"{r['first_batch_s']:.2f} s" if r["first_batch_s"] is not None else "-"
        steady = f"{r['steady_img_s']:.0f}" if r["steady_img_s"] is not None else "-"
        ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] is not None else "-"
        share = f"{100 * r['vs_pil_decode_x_cores']:.0f}%" if r["vs_pil_decode_x_cores"] is not None else "-"
        lines.append(f"{r['path']:44s} {r['img_s']:7.0f} {steady:>7s} {first:>12s} {ratio:>13s} {share:>15s}")
    return "\n".join(lines)


def _describe(r: Result) -> str:
    text = f"{r.images} images in {r.seconds:.1f} s = {r.img_s:.0f} img/s"
    if r.first_batch_s is not None:
        text += f"; first batch after {r.first_batch_s:.2f} s, then {r.steady_img_s:.0f} img/s"
    return text + (f" ({r.note})" if r.note else "")


def _machine(cores: int) -> dict:
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model or platform.processor(),
        "cores_used": cores,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
