"""The late stages: float math on the trainer's device (torch), after the uint8 crops have travelled.

    to_float            (N, H, W, 3) uint8          -> (N, 3, H, W) float in [0, 1]
    lighting_shift      N, generator                -> (N, 3)                      §4.1: eigvec @ (alpha * eigval)
    pca_lighting        (N, 3, H, W), generator     -> same                        §4.1: adds the shift to every pixel
    normalize           (N, 3, H, W)                -> same                        subtract the mean, divide by std
    to_model_input      (N, H, W, 3) uint8, gen.    -> (N, 3, H, W) float          the three above in one pass

  decoding on the device (optional: the CPUs then only read bytes)
    decode_on_device    jpeg (bytes), key            -> image (list of (3, H, W) uint8), failed
    crops_on_device     image (list), top/left/flip  -> (N, C, C, 3) uint8           the CPU crops' semantics

to_model_input is what the trainer calls: all three are affine per image and channel, so
normalize(pca_lighting(to_float(x))) = x * 1/(255 std) + (shift - mean) / std, one conversion and one
multiply-add over the batch instead of four passes: 7 ms instead of 32 for a 64-image batch of 224
crops on one core of the dev VM (9.6 M floats), which on a CPU-only machine is a third of what an
image costs. tests/test_device_stages.py holds it equal to the chain.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import decode
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


def decode_on_device(jpegs: Sequence[bytes], keys: Sequence[str], device: torch.device | str, *,
                     max_pixels: int = decode.MAX_PIXELS) -> tuple[list[torch.Tensor], list[int], dict[str, str]]:
    """Image bytes -> (3, H, W) uint8 RGB tensors on `device`; (images, the rows they came from, failed).

    JPEGs that libjpeg converts itself (YCbCr, grayscale) are decoded together by torchvision's
    decode_jpeg, which on a CUDA device is nvJPEG; anything else (CMYK, PNG) is decoded by the CPU
    decoder for that image alone, never replaced. A file that fails is left out and named in
    `failed` with the reason, as on the CPU path. The pixel limit is checked from the header first.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    images: dict[int, torch.Tensor] = {}
    failed: dict[str, str] = {}
    on_device: list[int] = []
    for i, (data, key) in enumerate(zip(jpegs, keys)):
        size = decode.plain_jpeg_size(data) if data else None
        try:
            if size is None:  # not for the device's decoder: the CPU decoder, for this image only
                pixels = decode.decode_image(data, key=key, max_pixels=max_pixels)
                images[i] = torch.tensor(pixels).permute(2, 0, 1).to(device)  # a copy: PIL's arrays are read-only
            else:
                decode.check_pixels(key, *size, max_pixels)
                on_device.append(i)
        except decode.DecodeError as e:
            failed[key] = e.reason
    if on_device:
        encoded = [torch.frombuffer(bytearray(jpegs[i]), dtype=torch.uint8) for i in on_device]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: find it, one image at a time
            decoded = []
            for i, data in zip(on_device, encoded):
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as e:
                    failed[keys[i]] = f"corrupt JPEG ({str(e).splitlines()[0]})"
                    decoded.append(None)
        images.update((i, image) for i, image in zip(on_device, decoded) if image is not None)
    rows = sorted(images)
    return [images[i] for i in rows], rows, failed


def crops_on_device(images: Sequence[torch.Tensor], top, left, flip, *, resize_size: int = 256,
                    crop_size: int = 224) -> torch.Tensor:
    """stages.random_crops' view of already decoded (3, H, W) uint8 images, on their device: the
    crop_size patch at (top, left) of the central resize_size square, mirrored where flip; the same
    box arithmetic (decode.crop_box) and a bilinear resize without antialiasing, as OpenCV does on
    the CPU. Returns (N, crop_size, crop_size, 3) uint8, ready for to_model_input."""
    out = []
    for image, t, l, f in zip(images, top, left, flip):
        y0, x0, y1, x1 = decode.crop_box(image.shape[1], image.shape[2], resize_size=resize_size, top=int(t),
                                         left=int(l), crop_size=crop_size)
        region = image[:, y0:y1, x0:x1]
        if region.shape[1:] != (crop_size, crop_size):
            region = F.interpolate(region[None].float(), size=(crop_size, crop_size), mode="bilinear",
                                   align_corners=False, antialias=False)[0].round_().clamp_(0, 255).to(torch.uint8)
        out.append(region.flip(-1) if f else region)
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()
