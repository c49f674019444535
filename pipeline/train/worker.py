"""The Ray Train worker loop: train_one_epoch / evaluate / report, every epoch (§5).

Each worker holds one replica (DDP: gloo on CPU, NCCL on GPU) and receives its share of the
global batch: `--batch-size 128 --workers 2` is 64 images per worker per step, and gradients are
averaged across workers, so the optimiser sees the paper's 128-image batch whatever the worker
count. Workers compute and report; they never talk to MLflow (tracking does, on the driver side).

    LoopSettings                  what the driver hands every worker: the config, the classes, lighting, actors
    train_loop_per_worker(config) what Ray Train runs in each worker: TrainLoop.in_this_worker(settings).run()
    TrainLoop                     one replica and the state its epochs need (model, optimiser, scheduler,
                                  precision, device, resume point, sample log), in the order it runs:
        run(train, val)           main: every epoch from the resume point
        train_one_epoch(epoch, b) one pass over the shard; step(x, labels) is one SGD step
        save_mid_epoch(...)       every --checkpoint-every-steps: where the epoch is, the images it took
        evaluate(batches)         val top-1/top-5, summed over the workers
        epoch_metrics(...)        the dict every epoch reports
        report(metrics, ...)      ray.train.report, with rank 0's checkpoint
    prepare_device, place_and_wrap (and recipe.py: make_optimizer, resolve_precision, step_seed, ...)
                                  the pieces it is built from, for tests and the device check

Everything here but train_loop_per_worker, TrainLoop.in_this_worker and TrainLoop.report runs without
Ray: tests and jobs/gpu_check.py build a TrainLoop over plain batches.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.models import checkpoint
from pipeline.models.alexnet import build_from_config
from pipeline.models.placement import place_model
from pipeline.tracking import pictures
from pipeline.train.batches import PREFETCH_BATCHES, host_indices, input_batches  # noqa: F401 (the loop's input)
from pipeline.train.metrics import EvalSums, topk_hits, validate
from pipeline.train.recipe import (
    Precision,
    make_optimizer,
    make_scheduler,
    resolve_precision,
    step_scheduler,
    step_seed,
)
from pipeline.transforms import device_stages
from pipeline.transforms.lighting import Lighting

# Images of the first training batch kept for the run's picture of what the model sees.
PICTURE_IMAGES = 32
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """What the driver hands every worker; Ray pickles it to them (the two actor handles included)."""

    config: Config
    num_classes: int
    lighting: Lighting  # §4.1's PCA of the training set's pixels
    classes: tuple[str, ...] = ()  # wnids in label order, into every checkpoint
    words: tuple[str, ...] = ()  # a readable name per class, when known
    train_images: int | None = None  # for progress lines' "n/total"; None when unknown
    progress_interval_s: float = 0.0  # 0: no progress lines (a terminal has Ray Data's bars)
    read_report: Any = None  # data.ReadReport actor: files --decode-on gpu could not decode
    resume_point: Any = None  # data.ResumePoint actor: where Ray Data's splits begin


def prepare_device(device: torch.device) -> None:
    """Make `device` this process's CUDA device and let cuDNN pick its fastest algorithms, as
    jobs/benchmark.py gpu measures the step. all_gather_object over NCCL (mid-epoch checkpoints) sends
    from torch.cuda.current_device(): every worker must name its own GPU there, not cuda:0."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # a run has two batch shapes (and a last val batch): tuned once each


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def place_and_wrap(
    model: torch.nn.Module, cfg: Config, devices: list[torch.device], *, channels_last: bool = False
) -> torch.nn.Module:
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


@dataclass
class EpochStats:
    sums: EvalSums  # this worker's loss and top-1/top-5 counts
    seconds: float  # wall time of the training pass
    data_seconds: float  # of which blocked waiting for the next batch
    first_step_seconds: float  # the first step alone when timed (--compile: compiling), else 0
    first_inputs: torch.Tensor | None  # the first images exactly as the model received them, if kept
    steps: int = 0  # steps taken


class RunningSums:
    """An epoch's loss and top-1/top-5 counts so far, added up on the device so that no step waits for it;
    read() is the one read of the device (at the end, and when a progress line or a checkpoint is due)."""

    def __init__(self, device: torch.device):
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct@1, correct@5
        self.images = 0  # on the host: batch sizes are known

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.no_grad():
            self.totals += torch.stack(
                [
                    loss.detach().double() * len(labels),
                    topk_hits(logits, labels, 1).double(),
                    topk_hits(logits, labels, 5).double(),
                ]
            )
        self.images += len(labels)

    def read(self) -> EvalSums:
        loss, correct1, correct5 = self.totals.tolist()
        return EvalSums(loss, int(correct1), int(correct5), self.images)


class TrainLoop:
    """One worker's replica and everything its epochs need, in the shape of torchvision's reference
    trainer: run() is its main, train_one_epoch() and evaluate() its two passes.

    model: placed and wrapped (place_and_wrap); what checkpoints save. The loop builds the optimiser and
    the schedule for it, and compiles it with --compile (the same parameters). start: where this attempt
    begins (resume() sets it from a checkpoint). Every random draw of a step comes from (seed, rank,
    epoch, step) (step_seed, crop_rng): a step taken again after a restart draws what it drew before.
    """

    def __init__(
        self,
        settings: LoopSettings,
        model: torch.nn.Module,
        *,
        device: torch.device,
        precision: Precision | None = None,
        rank: int = 0,
        workers: int = 1,
        node_id: str = "",
    ):
        self.settings, self.cfg = settings, settings.config
        self.model = model
        self.forward = torch.compile(model) if self.cfg.compile else model
        self.optimizer = make_optimizer(model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.device = device  # where batches go in and logits come out, for either placement
        self.precision = precision or resolve_precision(self.cfg, device)
        self.rank, self.workers, self.node_id = rank, workers, node_id
        self.start = checkpoint.Start()
        self.generator = torch.Generator()  # lighting noise, reseeded every step
        self.samples: SampleLog | None = None  # --sample-log, opened by run()

    @classmethod
    def in_this_worker(cls, settings: LoopSettings) -> TrainLoop:
        """The loop of the Ray Train worker this runs in: its rank, its devices, and the run's last
        checkpoint when this is a restart after a failure."""
        import ray  # deferred: Ray is this method's alone (the device check runs the loop without Ray)
        import ray.train
        import ray.train.torch

        cfg = settings.config
        context = ray.train.get_context()
        devices = ray.train.torch.get_devices() if cfg.use_gpu else [torch.device("cpu")]
        prepare_device(devices[0])
        torch.manual_seed(cfg.seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
        precision = resolve_precision(cfg, devices[0])
        model = build_from_config(cfg.to_dict(), settings.num_classes)  # its ablation switches, as checkpoints do
        model = place_and_wrap(model, cfg, devices, channels_last=precision.channels_last)
        loop = cls(
            settings,
            model,
            device=devices[0],
            precision=precision,
            rank=context.get_world_rank(),
            workers=context.get_world_size(),
            node_id=ray.get_runtime_context().get_node_id(),
        )
        restored = ray.train.get_checkpoint()
        if restored:  # a restart after a failure: go on from the last checkpoint, at an epoch's end or inside one
            with restored.as_directory() as directory:
                loop.resume(checkpoint.load(directory))
        if loop.rank == 0 and settings.resume_point is not None:
            # Before any worker asks for its shard: Ray Train builds the splits then, starting where we start.
            ray.get(settings.resume_point.set.remote(loop.start.epoch, loop.start.consumed))
        return loop

    def resume(self, state: dict[str, Any]) -> None:
        """A checkpoint's weights, optimiser and schedule; the next epoch starts where it was taken."""
        self.start = checkpoint.resume(state, self.model, self.optimizer, self.scheduler)
        if self.rank == 0:
            at_step = f", step {self.start.step}" if self.start.step else ""
            log.info(f"resuming at epoch {self.start.epoch + 1}{at_step}")

    def start_of(self, epoch: int) -> checkpoint.Start:
        """Where `epoch` starts: the resume point inside it, or its first step."""
        return self.start if epoch == self.start.epoch else checkpoint.Start(epoch)

    def run(self, train_shard, val_shard) -> None:
        """Every epoch from the resume point: train, evaluate, step the schedule, report with a checkpoint."""
        if self.cfg.sample_log:
            self.samples = SampleLog(self.cfg.sample_log, self.rank, self.start)
        for epoch in range(self.start.epoch, self.cfg.epochs):
            lr = self.optimizer.param_groups[0]["lr"]
            first = self.rank == 0 and epoch == 0 and self.start.step == 0  # the run's first epoch, not restarted
            stats = self.train_one_epoch(
                epoch, self.train_batches(train_shard, epoch), keep_inputs=PICTURE_IMAGES if first else 0
            )
            val_sums = self.evaluate(
                input_batches(val_shard, self.cfg, self.device, drop_last=False, report=self.settings.read_report)
            )
            metrics = self.epoch_metrics(epoch, stats, val_sums, lr=lr)
            step_scheduler(self.scheduler, metrics["val_top1"])
            if self.rank == 0:
                log.info(epoch_line(metrics, self.cfg.epochs))
            files = {}
            if stats.first_inputs is not None:
                files[checkpoint.TRAIN_BATCH_FILE] = pictures.model_inputs_png(stats.first_inputs)
            self.report(metrics, epoch=epoch, val_per_class=val_sums.per_class(), files=files)

    def train_batches(self, shard, epoch: int) -> Iterable[dict]:
        """`epoch`'s training batches from the resume point; with --decode-on gpu, the i-th is cropped with
        crop_rng(epoch, its step)."""
        first = self.start_of(epoch).step
        crop_rngs = (lambda i: self.crop_rng(epoch, first + i)) if self.cfg.augment == "on" else None
        return input_batches(
            shard, self.cfg, self.device, drop_last=True, report=self.settings.read_report, crop_rngs=crop_rngs
        )

    def crop_rng(self, epoch: int, step: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, epoch, self.rank, step, 2])

    def train_one_epoch(
        self, epoch: int, batches: Iterable[dict], *, keep_inputs: int = 0, time_first_step: bool | None = None
    ) -> EpochStats:
        """One pass over this worker's shard, from the resume point when it lies inside `epoch`.

        No step waits for the device: the sums add up there and are read at the end (and when a progress
        line or a checkpoint is due); jobs/gpu_check.py runs the steps under set_sync_debug_mode("error").
        Every --checkpoint-every-steps steps, when another batch follows, save_mid_epoch() is called
        before that batch (batches carry their images' indices, sources.py). keep_inputs: keep that many
        of the first batch's model inputs for the run's picture. time_first_step: wait for the first step,
        to time it alone; by default with --compile in the attempt's first epoch (it compiles).
        """
        first_step = self.start_of(epoch).step
        if time_first_step is None:
            time_first_step = self.cfg.compile and epoch == self.start.epoch
        every = self.cfg.checkpoint_every_steps
        progress = None
        if self.rank == 0:
            progress = ProgressLines(
                interval=self.settings.progress_interval_s,
                epoch=epoch,
                epochs=self.cfg.epochs,
                workers=self.workers,
                total_images=self.settings.train_images,
                bar=not self.settings.progress_interval_s,  # on a terminal
            )
        self.model.train()  # the compiled forward shares the module, and its mode
        running = RunningSums(self.device)
        consumed: list[np.ndarray] = []  # the indices of the images trained on, for checkpoints
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
            if every and step > first_step and step % every == 0:
                # Taken before this batch is trained on, so never at an epoch's end: its own checkpoint follows.
                self.save_mid_epoch(epoch, step, running, consumed)
            if self.samples is not None:
                self.samples.write(epoch, step, batch)
            if "index" in batch:
                consumed.append(host_indices(batch))
            self.reseed(epoch, step)
            step_start = time.perf_counter()
            x, labels = self.model_input(batch)
            if keep_inputs and kept is None:
                kept = x[:keep_inputs].detach().float().cpu()
            logits, loss = self.step(x, labels)
            running.add(loss, logits, labels)
            if time_first_step and step == first_step:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # once: the first step's own time (compiling, autotuning)
                first_step_seconds = time.perf_counter() - step_start
            if progress is not None:
                progress(running.read, data_seconds, time.perf_counter() - start, images=len(labels))
        if progress is not None:
            progress.close()
        return EpochStats(
            running.read(), time.perf_counter() - start, data_seconds, first_step_seconds, kept, steps=step - first_step
        )

    def reseed(self, epoch: int, step: int) -> None:
        """Dropout (torch's global RNG) and lighting (self.generator) for this step alone."""
        seed = step_seed(self.cfg.seed, self.rank, epoch, step)
        torch.manual_seed(seed)
        self.generator.manual_seed(seed)

    def model_input(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 crops -> lighting (§4.1) and normalisation on the device: (N, 3, C, C) floats, and labels."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        lighting = self.settings.lighting
        x = device_stages.to_model_input(
            images, self.generator, lighting_std=self.cfg.lighting_std, eigval=lighting.eigval, eigvec=lighting.eigvec
        )
        memory_format = torch.channels_last if self.precision.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format), labels

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step (§5) on a batch of model inputs; returns the logits and the loss, not read."""
        with self.precision.autocast(self.device):
            logits = self.forward(x)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.precision.scaler is not None:  # fp16: scale the loss so small gradients do not flush to zero
            self.precision.scaler.scale(loss).backward()
            self.precision.scaler.step(self.optimizer)
            self.precision.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return logits, loss

    def save_mid_epoch(self, epoch: int, step: int, running: RunningSums, consumed: list[np.ndarray]) -> None:
        """A checkpoint inside the epoch: where it is, the sums so far, and the images every worker has
        trained on (the resumed attempt's too). Every worker takes part: the sums and indices are gathered."""
        resumed = self.start_of(epoch)
        sums = running.read().all_reduce(device=self.device).add(sums_before(resumed))
        everyone = _all_gather(np.concatenate(consumed) if consumed else np.empty(0, np.int64))
        if resumed.consumed is not None:
            everyone.append(resumed.consumed)
        within = checkpoint.Start(
            epoch, step, np.concatenate(everyone), (sums.loss, sums.correct1, sums.correct5, sums.images)
        )
        if self.rank == 0:
            log.info(f"epoch {epoch + 1}/{self.cfg.epochs}  checkpoint at step {step}  {sums.images:,} images")
        # Ranked below every epoch's checkpoint by --keep-checkpoints; Ray Train keeps the latest anyway.
        self.report(
            {"epoch": epoch, "step": step, "train_images": sums.images, checkpoint.SCORE: checkpoint.MID_EPOCH_SCORE},
            epoch=epoch,
            within_epoch=within,
        )

    def evaluate(self, batches: Iterable[dict]) -> EvalSums:
        """Val loss and top-1/top-5 (and per class) over every worker's shard: summed counts, exact."""
        return validate(unwrap(self.model), batches, self.device, self.precision.dtype).all_reduce(
            classes=self.settings.num_classes, device=self.device
        )

    def epoch_metrics(self, epoch: int, stats: EpochStats, val_sums: EvalSums, *, lr: float) -> dict[str, Any]:
        """What every worker reports at an epoch's end (the same on each: the sums are all-reduced)."""
        resumed = self.start_of(epoch)
        this_attempt = stats.sums.all_reduce(device=self.device)
        train_sums = this_attempt.add(sums_before(resumed))
        # The slowest worker sets the pace of a synchronous step: report the largest wait.
        # On the worker's device: NCCL, the process group of GPU workers, reduces CUDA tensors only.
        waits = torch.full((1,), stats.data_seconds / max(stats.seconds, 1e-9), dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(waits, op=torch.distributed.ReduceOp.MAX)
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
            "node_id": self.node_id,
        }
        if self.cfg.compile and epoch == self.start.epoch:
            metrics["compile_seconds"] = stats.first_step_seconds  # the first step compiles the model
        return metrics

    def report(self, metrics: dict[str, Any], **saved) -> None:
        """ray.train.report: every worker reports (Ray Train waits for all); rank 0 adds its checkpoint of
        the model, optimiser and schedule, with `saved` (checkpoint.save's keywords)."""
        import ray.train  # deferred: the device check runs the loop without Ray, and overrides this

        with tempfile.TemporaryDirectory() as directory:
            reported = None
            if self.rank == 0:
                self.save(directory, metrics, **saved)
                reported = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=reported)

    def save(self, directory: str, metrics: dict[str, Any], **saved) -> None:
        checkpoint.save(
            directory,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            config=self.cfg.to_dict(),
            num_classes=self.settings.num_classes,
            classes=list(self.settings.classes),
            words=list(self.settings.words),
            metrics=metrics,
            **saved,
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker; config is the driver's train_loop_config, {"settings": LoopSettings}."""
    import ray.train  # deferred, as in TrainLoop.in_this_worker

    loop = TrainLoop.in_this_worker(config["settings"])
    loop.run(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"))


def sums_before(start: checkpoint.Start) -> EvalSums:
    """The train sums of an epoch's steps taken before a restart (none at an epoch's start)."""
    return EvalSums(*start.sums) if start.sums else EvalSums()


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    compiled = f"  (compiled in {metrics['compile_seconds']:.0f} s)" if "compile_seconds" in metrics else ""
    return (
        f"epoch {metrics['epoch'] + 1}/{epochs}  loss {metrics['train_loss']:.3f}  "
        f"val top-1 {metrics['val_top1']:.1f}%  top-5 {metrics['val_top5']:.1f}%  "
        f"lr {metrics['lr']:g}  {metrics['images_per_s']:.0f} img/s  "
        f"waiting for data {100 * metrics['data_wait_fraction']:.0f}%" + compiled
    )


class ProgressLines:
    """Rank 0's progress through an epoch: off a terminal (CI, `ray job logs`, a file) a line every `interval` s; on
    one (bar=True) a bar the driver draws (ray.experimental.tqdm_ray; none without Ray), not Ray Data's. Counts are
    this worker's times the worker count (all take the same steps); the sums are read only when a line is due."""

    def __init__(self, *, interval: float, epoch: int, epochs: int, workers: int, total_images: int | None, bar=False):
        self.interval, self.epoch, self.epochs = interval, epoch, epochs
        self.workers, self.total, self.lines, self.bar = workers, total_images, not bar, None
        self.last = time.perf_counter()
        ray = sys.modules.get("ray")  # in a Ray worker, imported already; the device check runs without it
        if bar and ray is not None and ray.is_initialized():
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(desc=f"epoch {epoch + 1}/{epochs}", total=total_images, unit="img")

    def __call__(self, read_sums: Callable[[], EvalSums], data_seconds: float, seconds: float, images: int = 0) -> None:
        if self.bar is not None:
            self.bar.update(images * self.workers)  # its state goes to the driver at most once a second
        now = time.perf_counter()
        if not self.lines or now - self.last < self.interval:
            return
        self.last = now
        sums = read_sums()
        images = sums.images * self.workers
        of = f"/{self.total:,}" if self.total else ""
        log.info(
            f"epoch {self.epoch + 1}/{self.epochs}  {images:,}{of} images  loss {sums.loss / sums.images:.3f}  "
            f"{images / seconds:.0f} img/s  waiting for data {100 * data_seconds / seconds:.0f}%"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
