"""The Ray Train worker loop: train_one_epoch / validate / report, every epoch (§5).

Each worker holds one replica (DDP: gloo on CPU, NCCL on GPU) and receives its share of the
global batch: `--batch-size 128 --workers 2` is 64 images per worker per step, and gradients are
averaged across workers, so the optimiser sees the paper's 128-image batch whatever the worker
count. Workers compute and report; they never talk to MLflow (tracking.py does, on the driver
side).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.models import checkpoint
from pipeline.models.alexnet import build_from_config
from pipeline.models.placement import place_model
from pipeline.tracking import pictures
from pipeline.train.metrics import EvalSums, validate, topk_hits
from pipeline.transforms import device_stages, stages

# Images of the first training batch kept for the run's picture of what the model sees.
PICTURE_IMAGES = 32
log = logging.getLogger(__name__)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # §5: SGD, momentum 0.9, weight decay 5e-4 on every weight (the paper's update rule has no
    # exceptions for biases).
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    if cfg.schedule == "plateau":
        # §5: "divide the learning rate by 10 when the validation error rate stopped improving".
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.lr_gamma, patience=cfg.plateau_patience)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)


def step_scheduler(scheduler, val_top1: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_top1)
    else:
        scheduler.step()


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """Dropout and lighting noise per (run, worker, epoch, step): an epoch resumed mid-way redraws what
    the uninterrupted run drew."""
    return int(np.random.SeedSequence([seed, rank, epoch, step]).generate_state(1, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Precision:
    """How a step computes: the autocast dtype (None: fp32), channels-last memory, fp16's gradient scaler."""
    dtype: torch.dtype | None
    channels_last: bool
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


def resolve_precision(cfg: Config, device: torch.device) -> Precision:
    """--precision and --channels-last for this worker's device; auto is bf16 + channels-last on GPUs
    that support bf16 (Ampere and later), fp32 on the CPU and on older GPUs."""
    cuda = device.type == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and cuda and not bf16_ok:
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32")
    dtype = {"auto": torch.bfloat16 if bf16_ok else None, "fp32": None, "bf16": torch.bfloat16,
             "fp16": torch.float16}[cfg.precision]
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Precision(dtype, channels_last, scaler)


@dataclass
class EpochStats:
    sums: EvalSums                        # this worker's loss and top-1/top-5 counts
    seconds: float                        # wall time of the training pass
    data_seconds: float                   # of which blocked waiting for the next batch
    first_step_seconds: float             # the first step alone with time_first_step (compiling), else 0
    first_inputs: torch.Tensor | None     # the first images exactly as the model received them, if kept
    steps: int = 0                        # steps taken


def train_one_epoch(model, optimizer, batches: Iterable[dict], device, cfg: Config,
                    generator: torch.Generator, lighting: dict[str, Any], *, precision: Precision | None = None,
                    keep_inputs: int = 0, time_first_step: bool = False,
                    progress: Callable[[Callable[[], EvalSums], float, float], None] | None = None,
                    seeds: Callable[[int], int] | None = None, first_step: int = 0, checkpoint_every: int = 0,
                    on_checkpoint: Callable[[int, Callable[[], EvalSums], list[np.ndarray]], None] | None = None,
                    on_batch: Callable[[int, dict], None] | None = None) -> EpochStats:
    """One pass over this worker's shard.

    No step waits for the device: the loss and top-1/top-5 counts add up in a tensor on the device and
    are read once, at the end (and when a progress line or a checkpoint is due). keep_inputs: keep that
    many of the first batch's model inputs (after crop, flip, lighting and normalisation) for the run's
    picture. time_first_step: wait for the first step to finish, to time it alone (with --compile, mostly
    compiling). progress(read_sums, data_seconds, seconds) is called after every step; read_sums() syncs.
    Nothing else reads the device: jobs/gpu_check.py runs the steps under set_sync_debug_mode("error").

    Resuming mid-epoch: steps are numbered from first_step; seeds(step) reseeds dropout and lighting
    (torch's global RNG and `generator`) before each step. Every checkpoint_every steps, when another
    batch follows, on_checkpoint(steps done, read_sums, indices of the images trained on) is called
    (batches carry their images' indices, sources.py). on_batch(step, batch) sees each batch first.
    """
    precision = precision or Precision(None, False)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, correct@1, correct@5
    images = 0                                                     # counted on the host: batch sizes are known
    consumed: list[np.ndarray] = []
    kept = None
    start = time.perf_counter()
    data_seconds = first_step_seconds = 0.0
    iterator = iter(batches)
    for step in itertools.count(first_step):
        waited = time.perf_counter()
        batch = next(iterator, None)  # the time spent here is time the model waits for data
        data_seconds += time.perf_counter() - waited
        if batch is None:
            break
        if checkpoint_every and on_checkpoint is not None and step > first_step and step % checkpoint_every == 0:
            # Taken before this batch is trained on, so never at an epoch's end: its own checkpoint follows.
            on_checkpoint(step, lambda: _sums(totals, images), consumed)
        if on_batch is not None:
            on_batch(step, batch)
        if "index" in batch:
            consumed.append(host_indices(batch))
        if seeds is not None:
            seed = seeds(step)
            torch.manual_seed(seed)
            generator.manual_seed(seed)
        step_start = time.perf_counter()
        images_in = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        x = device_stages.to_model_input(images_in, generator, lighting_std=cfg.lighting_std,
                                         eigval=lighting["eigval"], eigvec=lighting["eigvec"])
        x = x.contiguous(memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
        if keep_inputs and kept is None:
            kept = x[:keep_inputs].detach().float().cpu()
        with precision.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler is not None:  # fp16: scale the loss so small gradients do not flush to zero
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            totals += torch.stack([loss.detach().double() * len(labels), topk_hits(logits, labels, 1).double(),
                                   topk_hits(logits, labels, 5).double()])
        images += len(labels)
        if time_first_step and images == len(labels):
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # once: the first step's own time (compiling, autotuning)
            first_step_seconds = time.perf_counter() - step_start
        if progress is not None:
            progress(lambda: _sums(totals, images), data_seconds, time.perf_counter() - start)
    return EpochStats(_sums(totals, images), time.perf_counter() - start, data_seconds, first_step_seconds, kept,
                      steps=step - first_step)


def host_indices(batch: dict) -> np.ndarray:
    """The batch's image indices, which the loop keeps on the host (resume points, --sample-log). A copy
    back from a GPU would make every step wait for the device, so one there is a bug upstream."""
    index = batch["index"]
    if index.device.type != "cpu":
        raise RuntimeError(f"the batch's index column is on {index.device}, expected the CPU: the loop reads it on "
                           f"the host every step (input_batches asks Ray Data for CPU batches)")
    return index.numpy()


def _sums(totals: torch.Tensor, images: int) -> EvalSums:
    loss, correct1, correct5 = totals.tolist()  # the one read of the device
    return EvalSums(loss, int(correct1), int(correct5), images)


class ProgressLines:
    """A line every `interval` seconds during an epoch, for logs read off a terminal (CI, `ray job logs`,
    a file), where Ray Data's progress bars are off. Counts are this worker's times the worker count:
    every worker takes the same number of steps. The sums are read only when a line is due."""

    def __init__(self, *, interval: float, epoch: int, epochs: int, workers: int, total_images: int | None):
        self.interval, self.epoch, self.epochs = interval, epoch, epochs
        self.workers, self.total = workers, total_images
        self.last = time.perf_counter()

    def __call__(self, read_sums: Callable[[], EvalSums], data_seconds: float, seconds: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        sums = read_sums()
        images = sums.images * self.workers
        of = f"/{self.total:,}" if self.total else ""
        log.info(f"epoch {self.epoch + 1}/{self.epochs}  {images:,}{of} images  loss {sums.loss / sums.images:.3f}  "
                 f"{images / seconds:.0f} img/s  waiting for data {100 * data_seconds / seconds:.0f}%")


def prepare_device(device: torch.device) -> None:
    """Make `device` this process's CUDA device and let cuDNN pick its fastest algorithms, as
    jobs/benchmark.py gpu measures the step. all_gather_object over NCCL (mid-epoch checkpoints) sends
    from torch.cuda.current_device(): every worker must name its own GPU there, not cuda:0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # a run has two batch shapes (and a last val batch): tuned once each


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def place_and_wrap(model: torch.nn.Module, cfg: Config, devices: list[torch.device], *,
                   channels_last: bool = False) -> torch.nn.Module:
    """Place the model (one device, or the paper's two towers on two), in channels_last memory if asked,
    and wrap it in DDP.

    A two-device module is wrapped with device_ids=None: DDP then leaves placement to the module and
    all-reduces each tower's gradients from wherever they live.
    """
    from torch.nn.parallel import DistributedDataParallel

    model = place_model(model, cfg.placement, devices)
    if channels_last:  # after placing: the grouped placement builds new modules, in the default format
        model = model.to(memory_format=torch.channels_last)
    if not torch.distributed.is_initialized():
        return model
    single_gpu = cfg.placement == "data" and devices[0].type == "cuda"
    return DistributedDataParallel(model, device_ids=[devices[0]] if single_gpu else None)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = Config(**loop_config["config"])
    num_classes = loop_config["num_classes"]
    context = ray.train.get_context()
    rank, workers = context.get_world_rank(), context.get_world_size()
    devices = ray.train.torch.get_devices() if cfg.use_gpu else [torch.device("cpu")]
    device = devices[0]  # where batches go in and logits come out, for either placement
    prepare_device(device)

    torch.manual_seed(cfg.seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
    precision = resolve_precision(cfg, device)
    model = build_from_config(cfg.to_dict(), num_classes)  # with its ablation switches, as checkpoints rebuild it
    model = place_and_wrap(model, cfg, devices, channels_last=precision.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    forward = torch.compile(model) if cfg.compile else model  # the same parameters; checkpoints save `model`

    start = checkpoint.Start()
    restored = ray.train.get_checkpoint()
    if restored:  # a restart after a failure: go on from the last checkpoint, at an epoch's end or inside one
        with restored.as_directory() as directory:
            start = checkpoint.resume(checkpoint.load(directory), model, optimizer, scheduler)
        if rank == 0:
            log.info(f"resuming at epoch {start.epoch + 1}" + (f", step {start.step}" if start.step else ""))
    if rank == 0 and loop_config.get("resume_point") is not None:
        # Before any worker asks for its shard: Ray Train builds the splits then, starting where we start.
        ray.get(loop_config["resume_point"].set.remote(start.epoch, start.consumed))

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    samples = SampleLog(cfg.sample_log, rank, start) if cfg.sample_log else None

    def report(metrics: dict[str, Any], **saved) -> None:
        """Every worker reports (Ray Train waits for all); only rank 0 writes the checkpoint."""
        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if rank == 0:
                checkpoint.save(directory, model=model, optimizer=optimizer, scheduler=scheduler,
                                config=cfg.to_dict(), num_classes=num_classes, classes=loop_config["classes"],
                                words=loop_config["words"], metrics=metrics, **saved)
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=reported)

    def save_mid_epoch(epoch: int, resumed: checkpoint.Start, before: EvalSums, step: int,
                       read_sums: Callable[[], EvalSums], consumed: list[np.ndarray]) -> None:
        """A checkpoint inside the epoch: where it is, and the images every worker has trained on."""
        sums = read_sums().all_reduce(device=device).add(before)
        everyone = _all_gather(np.concatenate(consumed) if consumed else np.empty(0, np.int64))
        if resumed.consumed is not None:
            everyone.append(resumed.consumed)
        within = checkpoint.Start(epoch, step, np.concatenate(everyone),
                                  (sums.loss, sums.correct1, sums.correct5, sums.images))
        if rank == 0:
            log.info(f"epoch {epoch + 1}/{cfg.epochs}  checkpoint at step {step}  {sums.images:,} images")
        # Ranked below every epoch's checkpoint by --keep-checkpoints; Ray Train keeps the latest anyway.
        report({"epoch": epoch, "step": step, "train_images": sums.images, checkpoint.SCORE: float("-inf")},
               epoch=epoch, within_epoch=within)

    for epoch in range(start.epoch, cfg.epochs):
        resumed = start if epoch == start.epoch else checkpoint.Start(epoch)
        before = EvalSums(*resumed.sums) if resumed.sums else EvalSums()   # the steps before a restart
        generator = torch.Generator()
        lr = optimizer.param_groups[0]["lr"]
        progress = None
        if rank == 0 and loop_config["progress_interval_s"]:
            progress = ProgressLines(interval=loop_config["progress_interval_s"], epoch=epoch, epochs=cfg.epochs,
                                     workers=workers, total_images=loop_config["train_images"])
        first = rank == 0 and epoch == start.epoch and not restored
        # Everything random in a step is drawn from (seed, epoch, rank, step): a resumed step draws the same.
        crop_rngs = lambda i: np.random.default_rng([cfg.seed, epoch, rank, resumed.step + i, 2])  # noqa: E731
        batches = input_batches(train_shard, cfg, device, drop_last=True, report=loop_config.get("decode_failures"),
                                crop_rngs=crop_rngs if cfg.augment == "on" else None)
        stats = train_one_epoch(forward, optimizer, batches, device, cfg, generator, loop_config["lighting"],
                                precision=precision, keep_inputs=PICTURE_IMAGES if first else 0,
                                time_first_step=cfg.compile and epoch == start.epoch, progress=progress,
                                seeds=lambda step: step_seed(cfg.seed, rank, epoch, step),
                                first_step=resumed.step, checkpoint_every=cfg.checkpoint_every_steps,
                                on_checkpoint=functools.partial(save_mid_epoch, epoch, resumed, before),
                                on_batch=functools.partial(samples.write, epoch) if samples else None)
        this_attempt = stats.sums.all_reduce(device=device)
        train_sums = this_attempt.add(before)
        # The slowest worker sets the pace of a synchronous step: report the largest wait.
        # On the worker's device: NCCL, the process group of GPU workers, reduces CUDA tensors only.
        waits = torch.full((1,), stats.data_seconds / max(stats.seconds, 1e-9), dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(waits, op=torch.distributed.ReduceOp.MAX)

        val_batches = input_batches(val_shard, cfg, device, drop_last=False, report=loop_config.get("decode_failures"))
        val_sums = validate(unwrap(model), val_batches, device, precision.dtype).all_reduce(classes=num_classes,
                                                                                           device=device)
        metrics = {
            "epoch": epoch,
            **train_sums.metrics("train"),
            **val_sums.metrics("val"),
            "lr": lr,
            "images_per_s": this_attempt.images / stats.seconds,
            "data_wait_fraction": waits.item(),
            "train_images": train_sums.images,
            "train_steps": resumed.step + stats.steps,
            "val_images": val_sums.images,
            "epoch_seconds": stats.seconds,
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        if cfg.compile and epoch == start.epoch:
            metrics["compile_seconds"] = stats.first_step_seconds  # the first step compiles the model
        step_scheduler(scheduler, metrics["val_top1"])

        if rank == 0:
            log.info(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  "
                     f"val top-1 {metrics['val_top1']:.1f}%  top-5 {metrics['val_top5']:.1f}%  "
                     f"lr {lr:g}  {metrics['images_per_s']:.0f} img/s  "
                     f"waiting for data {100 * metrics['data_wait_fraction']:.0f}%"
                     + (f"  (compiled in {stats.first_step_seconds:.0f} s)" if "compile_seconds" in metrics else ""))
        files = {}
        if stats.first_inputs is not None:
            files[checkpoint.TRAIN_BATCH_FILE] = pictures.model_inputs_png(stats.first_inputs)
        report(metrics, epoch=epoch, val_per_class=val_sums.per_class(), files=files)


def _all_gather(array: np.ndarray) -> list[np.ndarray]:
    """Every worker's array (just this one without a process group)."""
    if not torch.distributed.is_initialized():
        return [array]
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, array)
    return everyone


class SampleLog:
    """--sample-log DIR: the indices of the images each training step took, one JSON line per step, in
    a file per worker and attempt (a restart starts a new one, whose first line says where it resumed).
    An audit of what the run trained on: tests/test_resume.py checks a resumed epoch with it."""

    def __init__(self, folder: str, rank: int, start: checkpoint.Start):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"rank{rank}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.jsonl")
        self._write({"start": [start.epoch, start.step]})

    def write(self, epoch: int, step: int, batch: dict) -> None:
        self._write({"epoch": epoch, "step": step, "index": batch["index"].tolist()})

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# Batches Ray Data prepares ahead of the step (the next one is ready when the step ends).
PREFETCH_BATCHES = 2


def input_batches(shard, cfg: Config, device: torch.device, *, drop_last: bool, report=None,
                  crop_rngs: Callable[[int], np.random.Generator] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of {image (N, C, C, 3) uint8, label, index} (index stays on the CPU).

    --decode-on cpu: Ray Data's crops, copied from pinned memory without blocking. --decode-on gpu:
    Ray Data hands on the JPEG bytes, decoded and cropped here (device_stages.decode_on_device and
    crops_on_device): random crops and flips from crop_rngs(i) for the i-th batch when given
    (training), else the centre.
    """
    gpu = device.type == "cuda"
    if cfg.decode_on == "cpu":
        # device="cpu", not Ray's default "auto": in a Ray Train worker "auto" is the worker's GPU and
        # would move `index` there too, which the loop reads on the host. Pinned, the loop's
        # non_blocking copies of image and label overlap the step before.
        yield from shard.iter_torch_batches(batch_size=cfg.worker_batch_size, drop_last=drop_last,
                                            prefetch_batches=PREFETCH_BATCHES, pin_memory=gpu, device="cpu")
        return
    for i, batch in enumerate(shard.iter_batches(batch_size=cfg.worker_batch_size, drop_last=drop_last,
                                                 prefetch_batches=PREFETCH_BATCHES, batch_format="numpy")):
        images, rows, failed = device_stages.decode_on_device(list(batch["jpeg"]), [str(k) for k in batch["key"]],
                                                              device)
        if failed and report is not None:
            report.add.remote(failed)
        if not images:
            raise ValueError(f"no image of a batch of {len(batch['jpeg'])} decoded: {failed}")
        n = len(images)
        if crop_rngs is not None:
            top, left, flip = stages.crop_params(n, crop_rngs(i), resize_size=cfg.resize_size, crop_size=cfg.crop_size,
                                                 flip_p=cfg.flip_p)
        else:
            top = left = np.full(n, (cfg.resize_size - cfg.crop_size) // 2)
            flip = np.zeros(n, bool)
        crops = device_stages.crops_on_device(images, top, left, flip, resize_size=cfg.resize_size,
                                              crop_size=cfg.crop_size)
        yield {"image": crops, "label": device_stages.to_device(torch.as_tensor(batch["label"][rows]), device),
               "index": torch.as_tensor(batch["index"][rows])}
