"""The late stages: float math on the trainer's device (torch), after the uint8 crops have travelled.

    to_float            (N, H, W, 3) uint8          -> (N, 3, H, W) float in [0, 1]
    lighting_shift      N, generator                -> (N, 3)                      §4.1: eigvec @ (alpha * eigval)
    pca_lighting        (N, 3, H, W), generator     -> same                        §4.1: adds the shift to every pixel
    normalize           (N, 3, H, W)                -> same                        subtract the mean, divide by std
    to_model_input      (N, H, W, 3) uint8, gen.    -> (N, 3, H, W) float          the three above in one pass

to_model_input is what the trainer calls: all three are affine per image and channel, so
normalize(pca_lighting(to_float(x))) = x * 1/(255 std) + (shift - mean) / std, one conversion and one
multiply-add over the batch instead of four passes: 7 ms instead of 32 for a 64-image batch of 224
crops on one core of the dev VM (9.6 M floats), which on a CPU-only machine is a third of what an
image costs. tests/test_device_stages.py holds it equal to the chain.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.stages import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD

Floats = tuple[float, ...]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1], on the images' device."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def lighting_shift(n: int, generator: torch.Generator, *, std: float = 0.1, eigval: Floats = IMAGENET_EIGVAL,
                   eigvec: tuple[Floats, ...] = IMAGENET_EIGVEC) -> torch.Tensor:
    """§4.1: per image the RGB shift eigvec @ (alpha * eigval), alpha ~ N(0, std); (N, 3) on the CPU.

    The eigen-decomposition is of the RGB covariance of the training set (pixels in [0, 1]).
    `generator` is a CPU generator: alpha is drawn there, so a seed gives the same noise on any device.
    """
    alpha = torch.randn(n, 3, generator=generator) * std
    return (alpha * torch.tensor(eigval)) @ torch.tensor(eigvec).T


def pca_lighting(images: torch.Tensor, generator: torch.Generator, *, std: float = 0.1,
                 eigval: Floats = IMAGENET_EIGVAL, eigvec: tuple[Floats, ...] = IMAGENET_EIGVEC) -> torch.Tensor:
    """§4.1 lighting: add lighting_shift to every pixel of each (N, 3, H, W) image in [0, 1]."""
    if std == 0:
        return images
    rgb = lighting_shift(images.shape[0], generator, std=std, eigval=eigval, eigvec=eigvec)
    return images + rgb.to(images.device, images.dtype)[:, :, None, None]


def normalize(images: torch.Tensor, *, mean: Floats = IMAGENET_MEAN, std: Floats = IMAGENET_STD) -> torch.Tensor:
    """Subtract the per-channel mean and divide by the per-channel std; (N, 3, H, W)."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean_t) / std_t


def to_model_input(images: torch.Tensor, generator: torch.Generator, *, lighting_std: float = 0.1,
                   eigval: Floats = IMAGENET_EIGVAL, eigvec: tuple[Floats, ...] = IMAGENET_EIGVEC,
                   mean: Floats = IMAGENET_MEAN, std: Floats = IMAGENET_STD) -> torch.Tensor:
    """normalize(pca_lighting(to_float(images))) in one pass: (N, H, W, 3) uint8 -> (N, 3, H, W) float32
    (in channels_last memory, as the uint8 batch came).

    Draws from `generator` exactly as pca_lighting does (nothing when lighting_std is 0).
    """
    n, h, w, _ = images.shape
    shift = torch.zeros(n, 3)
    if lighting_std:
        shift = lighting_shift(n, generator, std=lighting_std, eigval=eigval, eigvec=eigvec)
    mean_t, std_t = torch.tensor(mean), torch.tensor(std)
    # Each image row is w RGB triples: repeating the per-channel factors along it lets the
    # multiply-add run over long contiguous rows (a trailing dimension of 3 defeats vectorisation:
    # 3x slower on a CPU).
    scale = (1 / (255 * std_t)).repeat(w).to(images.device)                            # (w * 3,)
    offset = ((shift - mean_t) / std_t).repeat(1, w).to(images.device)[:, None, :]     # (n, 1, w * 3)
    if images.device.type == "cpu":
        # NumPy's uint8 -> float32 conversion is vectorised, torch's on the CPU is not (5 vs 17 ms
        # for a 64-image batch of 224 crops on the dev VM).
        x = torch.from_numpy(images.numpy().astype(np.float32))
    else:
        x = images.float()
    x = x.reshape(n, h, w * 3)  # a view: both conversions give a contiguous tensor
    torch.addcmul(offset, x, scale, out=x)
    return x.view(n, h, w, 3).permute(0, 3, 1, 2)
