"""The Ray Train worker loop: train_one_epoch / evaluate / report, every epoch (§5).

Each worker holds one replica (DDP: gloo on CPU, NCCL on GPU) and receives its share of the
global batch: `--batch-size 128 --workers 2` is 64 images per worker per step, and gradients are
averaged across workers, so the optimiser sees the paper's 128-image batch whatever the worker
count. Workers compute and report; they never talk to MLflow (tracking.py does, on the driver
side).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from pipeline import device_stages
from pipeline.config import Config
from pipeline.evaluate import EvalSums, evaluate, topk_correct
from pipeline.model import build_model
from pipeline.placement import grouped_state_dict, load_grouped_state_dict, place_model

CHECKPOINT_FILE = "checkpoint.pt"
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


def train_one_epoch(model, optimizer, batches: Iterable[dict], device, cfg: Config,
                    generator: torch.Generator, lighting: dict[str, Any]) -> EvalSums:
    """One pass over this worker's shard; returns its sums (loss, top-1/5 counts, images)."""
    model.train()
    sums = EvalSums()
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        x = device_stages.to_model_input(images, generator, lighting_std=cfg.lighting_std,
                                         eigval=lighting["eigval"], eigvec=lighting["eigvec"])
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            sums = sums.add(EvalSums(loss.item() * len(labels), topk_correct(logits, labels, 1),
                                     topk_correct(logits, labels, 5), len(labels)))
    return sums


def save_checkpoint(directory: str, *, model, optimizer, scheduler, epoch: int, cfg: Config,
                    num_classes: int, metrics: dict[str, float]) -> None:
    """The single-device grouped state_dict, so a checkpoint loads however it was trained or placed."""
    torch.save({
        "model": grouped_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "config": cfg.to_dict(),
        "num_classes": num_classes,
        "metrics": metrics,
    }, os.path.join(directory, CHECKPOINT_FILE))


def load_checkpoint(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location="cpu", weights_only=False)


def model_from_checkpoint(directory: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model a checkpoint holds, in eval mode, and the checkpoint's contents."""
    state = load_checkpoint(directory)
    cfg = Config(**state["config"])
    model = build_model(cfg.model, num_classes=state["num_classes"], width=cfg.width,
                        image_size=cfg.crop_size, dropout=cfg.dropout, init=cfg.init)
    model.load_state_dict(state["model"])
    return model.eval(), state


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
    rank = ray.train.get_context().get_world_rank()
    devices = ray.train.torch.get_devices() if cfg.use_gpu else [torch.device("cpu")]
    device = devices[0]  # where batches go in and logits come out, for either placement

    torch.manual_seed(cfg.seed)  # the same initial weights on every worker (DDP also broadcasts rank 0's)
    model = build_model(cfg.model, num_classes=num_classes, width=cfg.width,
                        image_size=cfg.crop_size, dropout=cfg.dropout, init=cfg.init)
    model = place_and_wrap(model, cfg, devices)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restart after a failure: continue from the last reported epoch
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory)
        load_grouped_state_dict(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, rank, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, rank, epoch))
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        batches = train_shard.iter_torch_batches(batch_size=cfg.worker_batch_size, drop_last=True)
        train_sums = train_one_epoch(model, optimizer, batches, device, cfg, generator,
                                     loop_config["lighting"]).all_reduce()
        seconds = time.perf_counter() - start

        val_batches = val_shard.iter_torch_batches(batch_size=cfg.worker_batch_size)
        val_sums = evaluate(unwrap(model), val_batches, device).all_reduce()
        metrics = {
            "epoch": epoch,
            **train_sums.metrics("train"),
            **val_sums.metrics("val"),
            "lr": lr,
            "images_per_s": train_sums.images / seconds,
            "train_images": train_sums.images,
            "val_images": val_sums.images,
            "epoch_seconds": seconds,
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        step_scheduler(scheduler, metrics["val_top1"])

        if rank == 0:
            log.info(f"epoch {epoch + 1}/{cfg.epochs}  loss {metrics['train_loss']:.3f}  "
                     f"val top-1 {metrics['val_top1']:.1f}%  top-5 {metrics['val_top5']:.1f}%  "
                     f"lr {lr:g}  {metrics['images_per_s']:.0f} img/s")
        # Every worker reports (Ray Train waits for all); only rank 0 writes the checkpoint.
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(directory, model=model, optimizer=optimizer, scheduler=scheduler,
                                epoch=epoch, cfg=cfg, num_classes=num_classes, metrics=metrics)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
