"""The Ray Train worker loop: train_one_epoch / evaluate / report, every epoch (§5).

Each worker holds one replica (DDP: gloo on CPU, NCCL on GPU) and receives its share of the
global batch: `--batch-size 128 --workers 2` is 64 images per worker per step, and gradients are
averaged across workers, so the optimiser sees the paper's 128-image batch whatever the worker
count. Workers compute and report; they never talk to MLflow (tracking.py does, on the driver
side).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from pipeline import checkpoint, device_stages, pictures
from pipeline.config import Config
from pipeline.evaluate import EvalSums, evaluate, topk_correct
from pipeline.model import build_model
from pipeline.placement import place_model

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


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Dropout and lighting noise per (run, worker, epoch): a resumed epoch redraws the same."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % 2**63


@dataclass
class EpochStats:
    sums: EvalSums                        # this worker's loss and top-1/top-5 counts
    seconds: float                        # wall time of the training pass
    data_seconds: float                   # of which blocked waiting for the next batch
    first_inputs: torch.Tensor | None     # the first images exactly as the model received them, if kept


def train_one_epoch(model, optimizer, batches: Iterable[dict], device, cfg: Config,
                    generator: torch.Generator, lighting: dict[str, Any], *, keep_inputs: int = 0,
                    progress: Callable[[EvalSums, float, float], None] | None = None) -> EpochStats:
    """One pass over this worker's shard.

    keep_inputs: keep that many of the first batch's model inputs (after crop, flip, lighting and
    normalisation) for the run's picture. progress(sums, data_seconds, seconds) is called after every step.
    """
    model.train()
    sums = EvalSums()
    kept = None
    start = time.perf_counter()
    data_seconds = 0.0
    iterator = iter(batches)
    while True:
        waited = time.perf_counter()
        batch = next(iterator, None)  # the time spent here is time the model waits for data
        data_seconds += time.perf_counter() - waited
        if batch is None:
            break
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        x = device_stages.to_model_input(images, generator, lighting_std=cfg.lighting_std,
                                         eigval=lighting["eigval"], eigvec=lighting["eigvec"])
        if keep_inputs and kept is None:
            kept = x[:keep_inputs].detach().cpu()
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sums = sums.add(EvalSums(loss.item() * len(labels), topk_correct(logits, labels, 1),
                                     topk_correct(logits, labels, 5), len(labels)))
        if progress is not None:
            progress(sums, data_seconds, time.perf_counter() - start)
    return EpochStats(sums, time.perf_counter() - start, data_seconds, kept)


class ProgressLines:
    """A line every `interval` seconds during an epoch, for logs read off a terminal (CI, `ray job logs`,
    a file), where Ray Data's progress bars are off. Counts are this worker's times the worker count:
    every worker takes the same number of steps."""

    def __init__(self, *, interval: float, epoch: int, epochs: int, workers: int, total_images: int | None):
        self.interval, self.epoch, self.epochs = interval, epoch, epochs
        self.workers, self.total = workers, total_images
        self.last = time.perf_counter()

    def __call__(self, sums: EvalSums, data_seconds: float, seconds: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.interval:
            return
        self.last = now
        images = sums.images * self.workers
        of = f"/{self.total:,}" if self.total else ""
        log.info(f"epoch {self.epoch + 1}/{self.epochs}  {images:,}{of} images  loss {sums.loss / sums.images:.3f}  "
                 f"{images / seconds:.0f} img/s  waiting for data {100 * data_seconds / seconds:.0f}%")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def place_and_wrap(model: torch.nn.Module, cfg: Config, devices: list[torch.device]) -> torch.nn.Module:
    """Place the model (one device, or the paper's two towers on two) and wrap it in DDP.

    A two-device module is wrapped with device_ids=None: DDP then leaves placement to the module and
    all-reduces each tower's gradients from wherever they live.
    """
    from torch.nn.parallel import DistributedDataParallel

    model = place_model(model, cfg.placement, devices)
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

    torch.manual_seed(cfg.seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, num_classes=num_classes, width=cfg.width,
                        image_size=cfg.crop_size, dropout=cfg.dropout, init=cfg.init)
    model = place_and_wrap(model, cfg, devices)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)

    start_epoch = 0
    restored = ray.train.get_checkpoint()
    if restored:  # a restart after a failure: continue from the last reported epoch
        with restored.as_directory() as directory:
            start_epoch = checkpoint.resume(checkpoint.load(directory), model, optimizer, scheduler)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch))
        lr = optimizer.param_groups[0]["lr"]
        progress = None
        if rank == 0 and loop_config["progress_interval_s"]:
            progress = ProgressLines(interval=loop_config["progress_interval_s"], epoch=epoch, epochs=cfg.epochs,
                                     workers=workers, total_images=loop_config["train_images"])
        first = rank == 0 and epoch == start_epoch and not restored
        batches = train_shard.iter_torch_batches(batch_size=cfg.worker_batch_size, drop_last=True)
        stats = train_one_epoch(model, optimizer, batches, device, cfg, generator, loop_config["lighting"],
                                keep_inputs=PICTURE_IMAGES if first else 0, progress=progress)
        train_sums = stats.sums.all_reduce()
        # The slowest worker sets the pace of a synchronous step: report the largest wait.
        waits = torch.tensor([stats.data_seconds / max(stats.seconds, 1e-9)], dtype=torch.float64)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(waits, op=torch.distributed.ReduceOp.MAX)

        val_batches = val_shard.iter_torch_batches(batch_size=cfg.worker_batch_size)
        val_sums = evaluate(unwrap(model), val_batches, device).all_reduce(classes=num_classes)
        metrics = {
            "epoch": epoch,
            **train_sums.metrics("train"),
            **val_sums.metrics("val"),
            "lr": lr,
            "images_per_s": train_sums.images / stats.seconds,
            "data_wait_fraction": waits.item(),
            "train_images": train_sums.images,
            "val_images": val_sums.images,
            "epoch_seconds": stats.seconds,
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        step_scheduler(scheduler, metrics["val_top1"])

        if rank == 0:
            log.info(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  "
                     f"val top-1 {metrics['val_top1']:.1f}%  top-5 {metrics['val_top5']:.1f}%  "
                     f"lr {lr:g}  {metrics['images_per_s']:.0f} img/s  "
                     f"waiting for data {100 * metrics['data_wait_fraction']:.0f}%")
        # Every worker reports (Ray Train waits for all); only rank 0 writes the checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if rank == 0:
                files = {}
                if stats.first_inputs is not None:
                    files[checkpoint.TRAIN_BATCH_FILE] = pictures.model_inputs_png(stats.first_inputs)
                checkpoint.save(directory, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                                config=cfg.to_dict(), num_classes=num_classes, classes=loop_config["classes"],
                                words=loop_config["words"], metrics=metrics, val_per_class=val_sums.per_class(),
                                files=files)
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=reported)
