"""One GPU, measured in one go: the training step per precision and layout, the paper's two towers,
and the data side (CPU cores per GPU, and decoding on the GPU).

    python jobs/benchmark.py gpu --json                  # on a GPU machine: about 3-6 minutes
    python jobs/benchmark.py gpu --device cpu --width 0.125 --image-size 67 --batch-sizes 8 \\
        --steps 2 --warmup 1 --images 16 --variants fp32,bf16   # the CPU smoke test (tests run it)

Plain PyTorch over the project's modules, no Ray or MLflow (a lent GPU machine has neither). It
measures, on one device:

    step        paper AlexNet (227 input, 1000 classes) forward + backward + SGD, images/s, at each
                batch size, for each variant: fp32, bf16 (autocast), bf16 + channels_last,
                bf16 + channels_last + torch.compile (its compile time reported on its own)
    towers      the grouped model on one device vs the paper's two towers (both on this GPU
                when there is one; their gain needs two)
    data        the CPU path (decode straight to the crop + float math) in images/s per core, and
                the device path (decode_on_device, nvJPEG on CUDA, + crops + float math) in
                images/s, over photo-like 500x375 JPEGs; then how many CPU cores would feed the
                fastest measured step

A step is timed from a synchronised start to a synchronised end over --steps steps after --warmup
(cuDNN autotuning, the allocator, compilation); the median per step is reported. The batch is
made once on the device: the step is timed apart from the input pipeline, which `data` measures.

The step timing needs torch alone (jobs/gpu_check.py uses it); the data rates import the decoder,
so a machine without this project's dependencies needs simplejpeg and opencv-python-headless
wheels installed first (BENCHMARKS.md says how to carry them to a lent GPU machine).
"""

from __future__ import annotations

import io
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.sample import photo_like
from pipeline.models.alexnet import AlexNet
from pipeline.models.placement import place_model

NUM_CLASSES = 1000
VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")


@dataclass(frozen=True)
class StepTiming:
    variant: str
    placement: str
    batch_size: int
    images_per_s: float
    step_ms: float
    compile_s: float | None = None


def synchronize(*devices: torch.device) -> None:
    """Wait for queued kernels on every device: CUDA launches return before the work is done."""
    for device in dict.fromkeys(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def time_step(
    variant: str,
    devices: list[torch.device],
    *,
    placement: str = "data",
    batch_size: int,
    width: float = 1.0,
    image_size: int = 227,
    steps: int = 20,
    warmup: int = 5,
) -> StepTiming:
    """Median images/s of one SGD step (§5's optimiser) of `variant` (see VARIANTS); placement "grouped"
    puts the two towers on devices[0] and devices[1]."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    device = devices[0]
    bf16, channels_last, compiled = "bf16" in variant, "channels_last" in variant, "compile" in variant
    torch.manual_seed(0)
    model = place_model(AlexNet(num_classes=NUM_CLASSES, width=width, image_size=image_size), placement, devices)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)

    def step(opt=opt, forward=forward) -> None:  # bound now: all four are deleted below
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()

    compile_s = None
    if compiled:  # the first call compiles: timed on its own, as a user's first epoch would feel it
        torch.compiler.reset()  # a cold compile, not a recompile from an earlier batch size's cache
        synchronize(*devices)
        start = time.perf_counter()
        step()
        synchronize(*devices)
        compile_s = time.perf_counter() - start
    times = []
    for i in range(warmup + steps):
        synchronize(*devices)
        start = time.perf_counter()
        step()
        synchronize(*devices)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    del step, model, opt, forward  # the model's memory back before the next variant's
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = statistics.median(times)
    return StepTiming(variant, placement, batch_size, batch_size / seconds, seconds * 1e3, compile_s)


def photo_jpegs(n: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(photo_like(np.random.default_rng([7, i]), *size)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def cpu_data_rate(jpegs: list[bytes], batch_size: int = 64) -> float:
    """Images/s on one core: stages.random_crops (decode straight to a 224 crop) + to_model_input."""
    from pipeline.transforms import device_stages, stages  # deferred: simplejpeg, absent on a bare GPU machine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for i in range(0, len(jpegs), batch_size):
            batch = stages.random_crops({"jpeg": jpegs[i : i + batch_size]}, rng)
            device_stages.to_model_input(torch.from_numpy(batch["image"]), generator)
        return len(jpegs) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def device_data_rate(jpegs: list[bytes], device: torch.device, batch_size: int, repeats: int = 3) -> float:
    """Images/s of decode_on_device + crops_on_device + to_model_input over batches of batch_size."""
    from pipeline.transforms import device_stages, stages  # deferred: simplejpeg, absent on a bare GPU machine

    keys = [str(i) for i in range(len(jpegs))]
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def one_pass() -> None:
        for i in range(0, len(jpegs), batch_size):
            images, rows, _ = device_stages.decode_on_device(
                jpegs[i : i + batch_size], keys[i : i + batch_size], device
            )
            top, left, flip = stages.crop_params(len(images), rng, resize_size=256, crop_size=224, flip_p=0.5)
            device_stages.to_model_input(device_stages.crops_on_device(images, top, left, flip), generator)
        synchronize(device)

    one_pass()  # warm-up: nvJPEG handles, allocator
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return repeats * len(jpegs) / (time.perf_counter() - start)


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def run_gpu(
    *,
    device: str = "auto",
    batch_sizes: tuple[int, ...] = (128, 256),
    variants: tuple[str, ...] = VARIANTS,
    width: float = 1.0,
    image_size: int = 227,
    steps: int = 20,
    warmup: int = 5,
    images: int = 256,
    log=print,
) -> dict:
    """Everything the module docstring lists, as a dict (and a line per measurement through log)."""
    dev = pick_device(device)
    log(f"[gpu] {dev} ({device_name(dev)}), torch {torch.__version__}")
    torch.backends.cudnn.benchmark = True  # as training runs
    steps_out = []
    for batch_size in batch_sizes:
        for variant in variants:
            t = time_step(
                variant, [dev], batch_size=batch_size, width=width, image_size=image_size, steps=steps, warmup=warmup
            )
            steps_out.append(t)
            log(
                f"[gpu] step {variant:28s} batch {batch_size:4d}: {t.images_per_s:9.1f} img/s ({t.step_ms:.1f} ms)"
                + (f", compiled in {t.compile_s:.1f} s" if t.compile_s is not None else "")
            )
    towers = [
        time_step(
            "fp32",
            [dev, dev],
            placement=p,
            batch_size=batch_sizes[0],
            width=width,
            image_size=image_size,
            steps=steps,
            warmup=warmup,
        )
        for p in ("data", "grouped")
    ]
    log(
        f"[gpu] towers fp32 batch {batch_sizes[0]}: one device {towers[0].images_per_s:.1f} img/s, "
        f"two towers {towers[1].images_per_s:.1f} img/s ({towers[1].images_per_s / towers[0].images_per_s:.3f}x)"
    )

    report = {
        "device": str(dev),
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "width": width,
        "image_size": image_size,
        "steps": steps,
        "warmup": warmup,
        "step": [t.__dict__ for t in steps_out],
        "towers": [t.__dict__ for t in towers],
    }
    try:  # the step numbers above stand even where the decoder is missing (a bare GPU machine)
        from pipeline.transforms import decode  # noqa: F401  deferred: simplejpeg, absent on a bare GPU machine
    except ImportError as e:
        log(
            f"[gpu] data: skipped, the decoder's dependencies are missing ({e}); BENCHMARKS.md says which wheels "
            f"to carry"
        )
        report["data"] = {"skipped": str(e)}
        return report
    jpegs = photo_jpegs(images)
    cpu_rate = cpu_data_rate(jpegs)
    device_rate = device_data_rate(jpegs, dev, batch_size=batch_sizes[-1])
    fastest = max(steps_out, key=lambda t: t.images_per_s)
    log(
        f"[gpu] data: CPU path {cpu_rate:.0f} img/s per core; device path {device_rate:.0f} img/s; feeding "
        f"the fastest step ({fastest.variant}, batch {fastest.batch_size}, {fastest.images_per_s:.0f} img/s) "
        f"takes {fastest.images_per_s / cpu_rate:.1f} CPU cores"
    )
    report["data"] = {
        "images": images,
        "jpeg_size": [500, 375],
        "cpu_images_per_s_per_core": cpu_rate,
        "device_images_per_s": device_rate,
        "device_batch_size": batch_sizes[-1],
        "cpu_cores_to_feed_fastest_step": fastest.images_per_s / cpu_rate,
    }
    return report
