"""The first GPU hour's check: what the CPU cannot show about the CUDA paths, in one call.

    python jobs/gpu_check.py --out $OUT/gpu_check.json      # a lent GPU machine: ~3 minutes (BENCHMARKS.md)
    python jobs/gpu_check.py --device cpu --quick           # the same code on the CPU (tests run it)

Plain PyTorch over the project's own modules: the lent machine has no Ray and no MLflow, so the worker
loop's functions run here as a Ray Train worker runs them, with Ray Data's shard played by RayLikeShard.
Each section runs even when one before it failed; the last line printed is one JSON document (also
written to --out), and the exit code is 1 when any section failed.

    towers   TwoTowerAlexNet == the grouped AlexNet on the devices (outputs and gradients, strict fp32)
    loop     one-process process group (NCCL on CUDA, gloo on the CPU): the worker's TrainLoop, its reports
             kept here instead of Ray Train's: input_batches over a shard that moves batches as Ray 2.60
             does, train_one_epoch with a mid-epoch checkpoint (the sums' all_reduce, all_gather_object of
             the indices), evaluate, the epoch's all_reduces; --decode-on gpu too on CUDA
    steps    TrainLoop.train_one_epoch's img/s per precision and memory layout, both placements, on batches as Ray
             delivers them (pinned uint8 crops); the measured steps run under
             torch.cuda.set_sync_debug_mode("error"), so a step that waits for the device fails the section
    decode   decode_on_device (nvJPEG on CUDA) + crops_on_device against the CPU decoder on the same JPEGs,
             and the stream-reuse check of pytorch/vision#9606 (device_stages.stream_reuse_check)

fp16 is timed without the sync check: GradScaler.step reads its inf check on the host every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import PRESETS, Config
from pipeline.data.sample import photo_like
from pipeline.models.alexnet import AlexNet, build_from_config
from pipeline.models.placement import TwoTowerAlexNet, merge_towers
from pipeline.train import batches, recipe, worker
from pipeline.transforms import device_stages, stages
from pipeline.transforms.lighting import IMAGENET as IMAGENET_LIGHTING

# Largest difference relative to the reference's scale, two towers vs the grouped model, in strict fp32.
# The CPU computes both in the same order up to the split: ~1e-7 measured. cuDNN may pick different
# algorithms for a grouped convolution and for its two halves (Winograd and FFT ones round differently
# from direct ones), so on CUDA the two agree only to the algorithms' own error; a wrong channel order
# or a missed exchange is off by O(1). The first device run records the real figure.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-3}


@dataclasses.dataclass(frozen=True)
class Size:
    """How big the check runs: the paper's network on a GPU, a small one on the CPU."""

    width: float = 1.0
    image_size: int = 227
    resize_size: int = 256
    batch_size: int = 128
    classes: int = 1000
    steps: int = 30  # measured steps per variant
    warmup: int = 5  # steps before them (cuDNN autotuning, the allocator, compiling)
    jpegs: int = 256

    @classmethod
    def quick(cls) -> Size:
        return cls(width=0.125, image_size=67, resize_size=76, batch_size=8, classes=10, steps=2, warmup=1, jpegs=24)


class RayLikeShard:
    """Ray Data's DataIterator as the worker loop uses it, over rows in memory.

    iter_torch_batches moves batches as Ray 2.60 does (ray/data/iterator.py): device="auto" is the
    worker's GPU inside a Ray Train worker, and then every column goes there, `index` included; pinned
    CPU tensors with pin_memory. iter_batches hands on NumPy columns (--decode-on gpu)."""

    def __init__(self, rows: dict[str, Any], worker_device: torch.device):
        self.rows, self.worker_device = rows, worker_device

    def iter_batches(
        self, *, batch_size: int, drop_last: bool = False, prefetch_batches: int = 0, batch_format: str = "numpy"
    ) -> Iterator[dict[str, Any]]:
        n = len(self.rows["label"])
        for start in range(0, n, batch_size):
            if drop_last and start + batch_size > n:
                return
            yield {k: v[start : start + batch_size] for k, v in self.rows.items()}

    def iter_torch_batches(
        self,
        *,
        batch_size: int,
        drop_last: bool = False,
        prefetch_batches: int = 0,
        pin_memory: bool = False,
        device: str = "auto",
    ) -> Iterator[dict[str, torch.Tensor]]:
        target = self.worker_device if device == "auto" else torch.device(device)
        for batch in self.iter_batches(batch_size=batch_size, drop_last=drop_last):
            tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
            if pin_memory:
                tensors = {k: v.pin_memory() for k, v in tensors.items()}
            yield {k: v.to(target) for k, v in tensors.items()}


# The columns Ray Data hands a worker: crops decoded on CPUs, or (--decode-on gpu) the files' bytes.
CROP_COLUMNS, BYTES_COLUMNS = ("image", "label", "index"), ("jpeg", "key", "label", "index")


def photo_rows(size: Size, *, seed: int = 0) -> dict[str, Any]:
    """Photo-like 500x375 JPEGs, slightly blurred (two decoders and two resizers then differ by rounding,
    not by aliasing of the grain), with their random crops, labels and indices."""
    import io

    import cv2
    from PIL import Image

    jpegs = []
    for i in range(size.jpegs):
        buf = io.BytesIO()
        Image.fromarray(cv2.GaussianBlur(photo_like(np.random.default_rng([7, i])), (0, 0), 1.0)).save(
            buf, "JPEG", quality=90
        )
        jpegs.append(buf.getvalue())
    rng = np.random.default_rng(seed)
    crops = stages.random_crops({"jpeg": jpegs}, rng, resize_size=size.resize_size, crop_size=size.image_size)
    n = len(jpegs)
    return {
        "image": crops["image"],
        "jpeg": np.array(jpegs, dtype=object),
        "key": np.array([f"{i}.jpg" for i in range(n)]),
        "label": rng.integers(0, size.classes, n),
        "index": np.arange(n, dtype=np.int64),
    }


def shard(rows: dict[str, Any], columns: tuple[str, ...], device: torch.device) -> RayLikeShard:
    return RayLikeShard({k: rows[k] for k in columns}, device)


def config_for(size: Size, device: torch.device, **changes: Any) -> Config:
    return dataclasses.replace(
        PRESETS["sample"],
        width=size.width,
        crop_size=size.image_size,
        resize_size=size.resize_size,
        batch_size=size.batch_size,
        workers=1,
        dropout=0.5,
        init="kaiming",
        use_gpu=device.type == "cuda",
        **changes,
    )


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A one-process group of the backend Ray Train would start: NCCL with GPUs, gloo without."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def sync_checked(batches, device: torch.device) -> Iterator[dict]:
    """The batches, with every step between the first and the last under set_sync_debug_mode("error"): a
    hidden wait for the device raises. Reset before the epoch's one read of its sums."""
    if device.type != "cuda":
        yield from batches
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield from batches
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_towers(devices: list[torch.device], size: Size) -> dict[str, Any]:
    """Outputs and gradients, two towers vs the grouped model on devices[0], strict fp32, deterministic
    algorithms; dropout 0 so that train mode is deterministic, kaiming init so no gradient is near zero."""
    torch.manual_seed(0)
    grouped = AlexNet(
        num_classes=size.classes, width=size.width, image_size=size.image_size, dropout=0.0, init="kaiming"
    )
    two = TwoTowerAlexNet.from_grouped(grouped, devices)
    grouped = grouped.to(devices[0])
    x = torch.randn(size.batch_size, 3, size.image_size, size.image_size, device=devices[0])
    y = torch.randint(0, size.classes, (size.batch_size,), device=devices[0])
    with strict_fp32():
        with torch.no_grad():
            outputs = rel_diff(two.eval()(x), grouped.eval()(x))
        F.cross_entropy(grouped.train()(x), y).backward()
        F.cross_entropy(two.train()(x), y).backward()
    got = merge_towers([{name: p.grad for name, p in tower.named_parameters()} for tower in two.towers])
    grads = max(rel_diff(got[name], p.grad) for name, p in grouped.named_parameters() if p.grad is not None)
    assert len(got) == sum(p.grad is not None for p in grouped.parameters())  # every parameter has one
    tolerance = TOLERANCE[devices[0].type]
    return {
        "output_rel_diff": outputs,
        "grad_rel_diff": grads,
        "tolerance": tolerance,
        "ok": outputs < tolerance and grads < tolerance,
    }


@contextlib.contextmanager
def strict_fp32():
    """TF32 off and deterministic cuDNN algorithms: TF32's ~1e-3 rounding would hide the comparison.
    torch >= 2.9's fp32_precision API (mixing it with allow_tf32 is an error)."""
    conv, matmul, cudnn = torch.backends.cudnn.conv, torch.backends.cuda.matmul, torch.backends.cudnn
    saved = conv.fp32_precision, matmul.fp32_precision, cudnn.deterministic, cudnn.benchmark
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision, cudnn.deterministic, cudnn.benchmark = saved


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale (per element would blow up near zero)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


class KeptReports(worker.TrainLoop):
    """The worker's loop as a Ray Train worker runs it, but what it reports is kept here (no Ray)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reports: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def report(self, metrics: dict[str, Any], **saved: Any) -> None:
        self.reports.append((metrics, saved))


def check_loop(device: torch.device, size: Size, rows: dict[str, Any]) -> dict[str, Any]:
    """The worker loop's own methods, as train_loop_per_worker runs them, under a process group."""
    cfg = config_for(size, device, checkpoint_every_steps=2)
    settings = worker.LoopSettings(cfg, size.classes, IMAGENET_LIGHTING)
    out: dict[str, Any] = {}
    with process_group(device):
        worker.prepare_device(device)
        precision = recipe.resolve_precision(cfg, device)
        model = worker.place_and_wrap(
            build_from_config(cfg.to_dict(), size.classes), cfg, [device], channels_last=precision.channels_last
        )
        loop = KeptReports(settings, model, device=device, precision=precision)
        crops = shard(rows, CROP_COLUMNS, device)
        lr = loop.optimizer.param_groups[0]["lr"]
        stats = loop.train_one_epoch(0, loop.train_batches(crops, 0))  # its checkpoint: all_reduce, all_gather_object
        val = loop.evaluate(batches.input_batches(crops, cfg, device, drop_last=False))
        metrics = loop.epoch_metrics(0, stats, val, lr=lr)  # the sums' and the data wait's all_reduce
        out.update(
            train_images=metrics["train_images"],
            train_loss=metrics["train_loss"],
            checkpoint_images=[len(saved["within_epoch"].consumed) for _, saved in loop.reports],
            val_images=val.images,
            val_class_images=sum(val.class_images),
            data_wait=metrics["data_wait_fraction"],
            backend=dist.get_backend(),
        )
        if device.type == "cuda":  # --decode-on gpu: Ray Data hands on bytes, the loop decodes with nvJPEG
            gpu_loop = KeptReports(
                dataclasses.replace(settings, config=dataclasses.replace(cfg, decode_on="gpu")),
                model,
                device=device,
                precision=precision,
            )
            decoded = gpu_loop.train_one_epoch(0, gpu_loop.train_batches(shard(rows, BYTES_COLUMNS, device), 0))
            out["decode_on_gpu_train_images"] = decoded.sums.all_reduce(device=device).images
    whole = len(rows["label"]) // size.batch_size * size.batch_size
    out["ok"] = bool(
        out["train_images"] == whole
        and out["val_images"] == len(rows["label"])
        and out["val_class_images"] == len(rows["label"])
        and bool(np.isfinite(out["train_loss"]))
        and out.get("decode_on_gpu_train_images", whole) == whole
    )
    return out


def time_steps(
    device: torch.device,
    size: Size,
    rows: dict[str, Any],
    *,
    placement: str,
    precision: str,
    channels_last: str,
    compile: bool = False,
) -> dict[str, Any]:
    """Images/s of TrainLoop.train_one_epoch over `size.steps` batches as Ray delivers them, after the warm-up."""
    cfg = config_for(
        size, device, precision=precision, channels_last=channels_last, placement=placement, compile=compile
    )
    worker.prepare_device(device)
    resolved = recipe.resolve_precision(cfg, device)
    torch.manual_seed(0)
    model = worker.place_and_wrap(
        build_from_config(cfg.to_dict(), size.classes), cfg, [device], channels_last=resolved.channels_last
    )
    loop = worker.TrainLoop(
        worker.LoopSettings(cfg, size.classes, IMAGENET_LIGHTING), model, device=device, precision=resolved
    )  # compiles the model with compile=True
    batch = next(
        shard(rows, CROP_COLUMNS, device).iter_torch_batches(
            batch_size=size.batch_size, drop_last=True, pin_memory=device.type == "cuda", device="cpu"
        )
    )
    start = time.perf_counter()
    warm = loop.train_one_epoch(0, [batch] * size.warmup, time_first_step=True)
    warmup_s = time.perf_counter() - start
    checked = resolved.scaler is None  # fp16's scaler reads the host every step, by design
    measured = sync_checked([batch] * size.steps, device) if checked else [batch] * size.steps
    stats = loop.train_one_epoch(0, measured, time_first_step=False)  # no synchronize among the measured steps
    return {
        "placement": placement,
        "precision": precision,
        "channels_last": resolved.channels_last,
        "compile": compile,
        "batch_size": size.batch_size,
        "images_per_s": stats.sums.images / stats.seconds,
        "first_step_s": warm.first_step_seconds,
        "warmup_s": warmup_s,
        "sync_checked": checked and device.type == "cuda",
        "loss": stats.sums.loss / stats.sums.images,
    }


def check_decode(
    device: torch.device, rows: dict[str, Any], *, resize_size: int = 256, crop_size: int = 224
) -> dict[str, Any]:
    """decode_on_device + crops_on_device against the CPU path's random crops of the same files, the same
    draws (tests/test_device_stages.py does the same with torchvision's CPU decoder)."""
    jpegs, keys = list(rows["jpeg"]), list(rows["key"])
    images, decoded_rows, failed = device_stages.decode_on_device(jpegs, keys, device)
    n = len(images)
    top, left, flip = stages.crop_params(
        n, np.random.default_rng(9), resize_size=resize_size, crop_size=crop_size, flip_p=0.5
    )
    on_device = device_stages.crops_on_device(images, top, left, flip, resize_size=resize_size, crop_size=crop_size)
    cpu = stages.random_crops(
        {"jpeg": [jpegs[i] for i in decoded_rows]},
        np.random.default_rng(9),
        resize_size=resize_size,
        crop_size=crop_size,
    )["image"]
    diff = np.abs(on_device.cpu().numpy().astype(np.int16) - cpu.astype(np.int16))
    reuse = device_stages.stream_reuse_check(device)
    # Two IDCTs and two resizers: a level or two apart on average, never a different picture.
    ok = bool(not failed and n == len(jpegs) and diff.mean() < 2.0 and reuse["corrupted"] == 0)
    return {
        "images": n,
        "failed": failed,
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": int(diff.max()),
        "stream_reuse": reuse,
        "ok": ok,
    }


def pick_devices(choice: str) -> list[torch.device]:
    """One device per tower: cuda:0 and cuda:1 with two GPUs, cuda:0 twice with one, else the CPU."""
    if choice == "auto" and torch.cuda.is_available():
        return [torch.device("cuda", 0), torch.device("cuda", 1 if torch.cuda.device_count() >= 2 else 0)]
    return [torch.device("cpu"), torch.device("cpu")]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def run(*, device: str = "auto", size: Size | None = None, compile: bool = True, log=print) -> dict[str, Any]:
    """Every section of the module docstring; a section that raises is reported with its error."""
    devices = pick_devices(device)
    dev = devices[0]
    size = size or (Size() if dev.type == "cuda" else Size.quick())
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "devices": [str(d) for d in devices],
        "device_names": [device_name(d) for d in devices],
        "size": dataclasses.asdict(size),
    }
    log(f"[check] torch {torch.__version__} on {', '.join(report['device_names'])}")

    def section(name: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - the other sections still run; the error is in the report
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
        log(f"[check] {name}: {'ok' if report[name].get('ok') else 'FAILED'} {_brief(report[name])}")

    section("towers", lambda: check_towers(devices, size))
    rows = photo_rows(size)
    section("loop", lambda: check_loop(dev, size, rows))

    def steps() -> dict[str, Any]:
        variants = [
            ("data", "fp32", "off"),
            ("data", "bf16", "off"),
            ("data", "bf16", "on"),
            ("data", "fp16", "on"),
            ("grouped", "bf16", "on"),
        ]
        timings = [time_steps(dev, size, rows, placement=p, precision=pr, channels_last=cl) for p, pr, cl in variants]
        if compile:
            timings.append(
                time_steps(dev, size, rows, placement="data", precision="bf16", channels_last="on", compile=True)
            )
        for t in timings:
            log(
                f"[check]   {t['placement']:>7} {t['precision']} channels_last={t['channels_last']!s:5} "
                f"compile={t['compile']!s:5} {t['images_per_s']:9.1f} img/s"
            )
        return {"variants": timings, "ok": all(bool(np.isfinite(t["loss"])) for t in timings)}

    section("steps", steps)
    section("decode", lambda: check_decode(dev, rows))
    report["ok"] = all(report[name]["ok"] for name in ("towers", "loop", "steps", "decode"))
    return report


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return result["error"].splitlines()[0]
    return ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result.items()
        if isinstance(v, (int, float, str)) and k not in ("ok", "seconds")
    )
