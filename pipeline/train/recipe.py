"""§5's recipe, as every worker builds it: the optimiser, the learning-rate schedule, the precision of a
step and the seeds of its randomness.

    make_optimizer(model, cfg)      SGD, momentum 0.9, weight decay 5e-4 on every weight
    make_scheduler / step_scheduler lr / 10 when val top-1 stops improving (the paper), or every N epochs
    resolve_precision(cfg, device)  --precision and --channels-last for this worker's device
    step_seed(seed, rank, epoch, s) dropout and lighting noise per step, so a resumed step draws the same
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import Config


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # §5: SGD, momentum 0.9, weight decay 5e-4 on every weight (the paper's update rule has no
    # exceptions for biases).
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config):
    if cfg.schedule == "plateau":
        # §5: "divide the learning rate by 10 when the validation error rate stopped improving".
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.lr_gamma, patience=cfg.plateau_patience
        )
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
    dtype = {"auto": torch.bfloat16 if bf16_ok else None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.precision
    ]
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Precision(dtype, channels_last, scaler)
