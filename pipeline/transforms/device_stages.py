"""The late stages: float math on the trainer's device (torch), after the uint8 crops have travelled.

    to_float            (N, H, W, 3) uint8          -> (N, 3, H, W) float in [0, 1]
    lighting_shift      N, generator                -> (N, 3)                      §4.1: eigvec @ (alpha * eigval)
    pca_lighting        (N, 3, H, W), generator     -> same                        §4.1: adds the shift to every pixel
    normalize           (N, 3, H, W)                -> same                        subtract the mean, divide by std
    to_model_input      (N, H, W, 3) uint8, gen.    -> (N, 3, H, W) float          the three above in one pass
    to_device           CPU tensor, device          -> the same, on device         pinned first for CUDA: no wait

  decoding on the device (optional: the CPUs then only read bytes)
    decode_on_device    jpeg (bytes), key            -> image (list of (3, H, W) uint8), failed
    crops_on_device     image (list), top/left/flip  -> (N, C, C, 3) uint8           the CPU crops' semantics
    stream_reuse_check  device                       -> {corrupted, iterations}      for the GPU check: vision
                                                                                     PR #9606's repro

to_model_input is what the trainer calls: all three are affine per image and channel, so
normalize(pca_lighting(to_float(x))) = x * 1/(255 std) + (shift - mean) / std, one conversion and one
multiply-add over the batch instead of four passes: 7 ms instead of 32 for a 64-image batch of 224
crops on one core of the dev VM (9.6 M floats), which on a CPU-only machine is a third of what an
image costs. tests/test_device_stages.py holds it equal to the chain.

Nothing here makes the host wait for work queued on the device (README: "no step waits for the
device"). What would, on CUDA, and what runs instead:

    would wait                                   instead
    torch.tensor(x, device=cuda); .to(cuda)      constants built once per device and kept there; per-batch
      from pageable memory                         values by to_device: pinned, then non_blocking
    bincount, nonzero, torch.unique, boolean-    metrics.batch_counts: index_add_ onto zeros, hits as 0/1
      mask indexing, .item(), .tolist()            weights; read once per pass (metrics.sums_of)

decode_jpeg on CUDA still waits for its own nvJPEG stream (torchvision does), never for the caller's
queue. tests/test_no_host_sync.py checks what a CPU can see (none of these is called; the constants are
built once); the GPU check runs the same code under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.transforms import decode
from pipeline.transforms.constants import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD

Floats = tuple[float, ...]


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device` without the host waiting for the device: to CUDA it goes from pinned
    memory, non_blocking (from pageable memory the copy is synchronous); anywhere else it is moved.

    The pinned copy may be dropped at once: the caching host allocator records an event for it and
    reuses the block only after the transfer is done. (pin_memory itself needs CUDA: only for CUDA.)
    """
    device = torch.device(device)
    if tensor.device.type != "cpu":  # not what this is for: an ordinary copy
        return tensor.to(device)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1], on the images' device."""
    return images.permute(0, 3, 1, 2).float().div_(255)


def lighting_shift(
    n: int,
    generator: torch.Generator,
    *,
    std: float = 0.1,
    eigval: Floats = IMAGENET_EIGVAL,
    eigvec: tuple[Floats, ...] = IMAGENET_EIGVEC,
) -> torch.Tensor:
    """§4.1: per image the RGB shift eigvec @ (alpha * eigval), alpha ~ N(0, std); (N, 3) on the CPU.

    The eigen-decomposition is of the RGB covariance of the training set (pixels in [0, 1]).
    `generator` is a CPU generator: alpha is drawn there, so a seed gives the same noise on any device.
    """
    alpha = torch.randn(n, 3, generator=generator) * std
    return (alpha * torch.tensor(eigval)) @ torch.tensor(eigvec).T


def pca_lighting(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    std: float = 0.1,
    eigval: Floats = IMAGENET_EIGVAL,
    eigvec: tuple[Floats, ...] = IMAGENET_EIGVEC,
) -> torch.Tensor:
    """§4.1 lighting: add lighting_shift to every pixel of each (N, 3, H, W) image in [0, 1]."""
    if std == 0:
        return images
    rgb = lighting_shift(images.shape[0], generator, std=std, eigval=eigval, eigvec=eigvec)
    return images + to_device(rgb.to(images.dtype), images.device)[:, :, None, None]


# The per-channel constants live on the device, built on the first call for that device (and dtype,
# width, mean, std): a copy per call would be a blocking host-to-device transfer. Built outside
# inference mode so that a cache first filled by an inference_mode caller serves any caller. On CUDA
# they are copied on the stream current at that first call; the callers run on one stream.
@functools.lru_cache(maxsize=16)
def _channel_constants(
    device: torch.device, dtype: torch.dtype, mean: Floats, std: Floats
) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's mean and std, (3, 1, 1) on `device`."""
    with torch.inference_mode(False):
        mean_t, std_t = (to_device(torch.tensor(v, dtype=dtype)[:, None, None], device) for v in (mean, std))
        return mean_t, std_t


@functools.lru_cache(maxsize=16)
def _row_constants(
    device: torch.device, width: int, mean: Floats, std: Floats
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """to_model_input's mean and std (3,), and 1 / (255 std) repeated along a row of `width` RGB
    triples (width * 3,), float32 on `device`."""
    with torch.inference_mode(False):
        mean_t, std_t = torch.tensor(mean), torch.tensor(std)
        scale = (1 / (255 * std_t)).repeat(width)
        return to_device(mean_t, device), to_device(std_t, device), to_device(scale, device)


def normalize(images: torch.Tensor, *, mean: Floats = IMAGENET_MEAN, std: Floats = IMAGENET_STD) -> torch.Tensor:
    """Subtract the per-channel mean and divide by the per-channel std; (N, 3, H, W)."""
    mean_t, std_t = _channel_constants(images.device, images.dtype, tuple(mean), tuple(std))
    return (images - mean_t) / std_t


def to_model_input(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    lighting_std: float = 0.1,
    eigval: Floats = IMAGENET_EIGVAL,
    eigvec: tuple[Floats, ...] = IMAGENET_EIGVEC,
    mean: Floats = IMAGENET_MEAN,
    std: Floats = IMAGENET_STD,
) -> torch.Tensor:
    """normalize(pca_lighting(to_float(images))) in one pass: (N, H, W, 3) uint8 -> (N, 3, H, W) float32
    (in channels_last memory, as the uint8 batch came).

    Draws from `generator` exactly as pca_lighting does (nothing when lighting_std is 0).
    """
    n, h, w, _ = images.shape
    mean_t, std_t, scale = _row_constants(images.device, w, tuple(mean), tuple(std))  # scale: (w * 3,)
    if lighting_std:  # drawn on the CPU generator, then the (n, 3) shift alone travels
        shift = to_device(lighting_shift(n, generator, std=lighting_std, eigval=eigval, eigvec=eigvec), images.device)
    else:
        shift = torch.zeros(n, 3, device=images.device)
    # Each image row is w RGB triples: repeating the per-channel factors along it lets the
    # multiply-add run over long contiguous rows (a trailing dimension of 3 defeats vectorisation:
    # 3x slower on a CPU).
    offset = ((shift - mean_t) / std_t).repeat(1, w)[:, None, :]  # (n, 1, w * 3)
    if images.device.type == "cpu":
        # NumPy's uint8 -> float32 conversion is vectorised, torch's on the CPU is not (5 vs 17 ms
        # for a 64-image batch of 224 crops on the dev VM).
        x = torch.from_numpy(images.numpy().astype(np.float32))
    else:
        x = images.float()
    x = x.reshape(n, h, w * 3)  # a view: both conversions give a contiguous tensor
    torch.addcmul(offset, x, scale, out=x)
    return x.view(n, h, w, 3).permute(0, 3, 1, 2)


def decode_on_device(
    jpegs: Sequence[bytes], keys: Sequence[str], device: torch.device | str, *, max_pixels: int = decode.MAX_PIXELS
) -> tuple[list[torch.Tensor], list[int], dict[str, str]]:
    """Image bytes -> (3, H, W) uint8 RGB tensors on `device`; (images, the rows they came from, failed).

    JPEGs that libjpeg converts itself (YCbCr, grayscale) are decoded together by torchvision's
    decode_jpeg, which on a CUDA device is nvJPEG. The CPU decoder (decode.decode_image) takes the
    rest, one image at a time: files that are not such JPEGs (CMYK, PNG) and files the device's
    decoder refuses (nvJPEG reads fewer chroma subsamplings than libjpeg). A file that both refuse is
    left out and named in `failed` with the CPU decoder's reason, as on the CPU path, never replaced.
    The pixel limit is checked from the header first.
    """
    device = torch.device(device)
    failed: dict[str, str] = {}
    for_device, for_cpu = [], []
    for i, (data, key) in enumerate(zip(jpegs, keys)):
        size = decode.plain_jpeg_size(data)
        if size is None:
            for_cpu.append(i)
            continue
        try:
            decode.check_pixels(key, *size, max_pixels)
            for_device.append(i)
        except decode.DecodeError as e:
            failed[key] = e.reason
    decoded = dict(zip(for_device, _decode_jpegs([jpegs[i] for i in for_device], device)))
    images = {i: image for i, image in decoded.items() if image is not None}
    refused = [i for i, image in decoded.items() if image is None]  # by the device's decoder: retried here
    for i in for_cpu + refused:
        try:
            pixels = decode.decode_image(jpegs[i], key=keys[i], max_pixels=max_pixels)
        except decode.DecodeError as e:
            failed[keys[i]] = e.reason
            continue
        images[i] = to_device(torch.tensor(pixels), device).permute(2, 0, 1)  # a copy: PIL's arrays are read-only
    rows = sorted(images)
    return [images[i] for i in rows], rows, failed


def _decode_jpegs(files: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """torchvision's decode_jpeg over `files`, all in one call; None for each file it refuses."""
    if not files:
        return []
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    try:
        return list(_decode_on_stream(encoded, device))
    except RuntimeError:  # one file it refuses fails the whole call: find which, one at a time
        pass
    out: list[torch.Tensor | None] = []
    for data in encoded:
        try:
            out.extend(_decode_on_stream([data], device))
        except RuntimeError:
            out.append(None)
    return out


@functools.cache
def _decode_stream(device_index: int) -> torch.cuda.Stream:
    """The stream nvJPEG's outputs are allocated on, one per GPU (see _decode_on_stream)."""
    return torch.cuda.Stream(device=device_index)


def _decode_on_stream(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """decode_jpeg(encoded) in RGB on `device`; on CUDA, never into memory the caller's stream still reads.

    torchvision's nvJPEG decode allocates its outputs while the caller's stream is current, then writes
    them on a private stream that does not wait for the caller's (pytorch/vision PR #9606, not merged).
    The caching allocator hands out a block as soon as it is freed on its stream, so kernels queued on
    the caller's stream may still read the block nvJPEG overwrites. Making the private stream wait
    would not help: nvJPEG's hardware engine does not honour device-side waits, only a host wait
    holds it back (meta-pytorch/torchcodec PR #1634).

    Instead, no host wait: decode while a stream of our own is current, so the outputs come from that
    stream's pool, which never holds a block freed on the caller's stream. record_stream(caller) then
    keeps each output's block out of that pool until the caller's kernels queued up to its free have
    run, which the allocator checks on the host by querying events, without waiting on them. Nothing
    but these outputs is allocated on the decode stream (in RGB mode torchvision runs no kernel of its
    own), and torchvision waits for its private stream before returning, so the pixels are written
    when the call returns; wait_stream orders the caller after the decode stream regardless.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type != "cuda":
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    caller = torch.cuda.current_stream(device)
    side = _decode_stream(caller.device_index)
    with torch.cuda.stream(side):
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(side)
    for image in images:
        image.record_stream(caller)
    return images


def crops_on_device(
    images: Sequence[torch.Tensor], top, left, flip, *, resize_size: int = 256, crop_size: int = 224
) -> torch.Tensor:
    """stages.random_crops' view of already decoded (3, H, W) uint8 images, on their device: the
    crop_size patch at (top, left) of the central resize_size square, mirrored where flip; the same
    box arithmetic (decode.crop_box) and a bilinear resize without antialiasing, as OpenCV does on
    the CPU. Returns (N, crop_size, crop_size, 3) uint8, ready for to_model_input."""
    out = []
    for image, t, l, f in zip(images, top, left, flip):
        y0, x0, y1, x1 = decode.crop_box(
            image.shape[1], image.shape[2], resize_size=resize_size, top=int(t), left=int(l), crop_size=crop_size
        )
        region = image[:, y0:y1, x0:x1]
        if region.shape[1:] != (crop_size, crop_size):
            region = (
                F.interpolate(
                    region[None].float(),
                    size=(crop_size, crop_size),
                    mode="bilinear",
                    align_corners=False,
                    antialias=False,
                )[0]
                .round_()
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        out.append(region.flip(-1) if f else region)
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()


def stream_reuse_check(
    device: torch.device | str, *, guarded: bool = True, tensors: int = 8, iterations: int = 5, side: int = 512
) -> dict[str, Any]:
    """pytorch/vision PR #9606's repro, for the GPU check: does decoding write over memory that kernels
    queued on the caller's stream have yet to read? Single-threaded and deterministic; each iteration

      1. fills `tensors` (3, side, side) uint8 tensors with 1, 2, ... and synchronizes;
      2. queues a long kernel (ten 8192^2 matmuls, 11 TFLOP: a tenth of a second or more), then one sum
         per tensor;
      3. frees the tensors, their sums still queued: the blocks are free on the caller's stream;
      4. decodes as many side x side JPEGs: outputs the size of the freed blocks, the allocator's best fit;
      5. synchronizes and counts the sums that differ from their exact value.

    guarded: decode with decode_on_device (must give 0); False calls torchvision's decode_jpeg itself,
    the control that shows the check sees the fault (> 0 where nvJPEG's hardware engine decodes).
    Synchronizes the device: not for use under torch.cuda.set_sync_debug_mode("error").
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {"corrupted": 0, "iterations": 0, "note": f"no CUDA streams on {device}: only meaningful on a GPU"}
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(tensors):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    keys = [f"reuse{i}" for i in range(tensors)]
    values = range(1, tensors + 1)
    expected = torch.tensor([v * 3 * side * side for v in values])
    a = torch.randn(8192, 8192, device=device)
    c = torch.empty_like(a)
    corrupted = 0
    for _ in range(iterations):
        filled = [torch.full((3, side, side), v, dtype=torch.uint8, device=device) for v in values]
        torch.cuda.synchronize(device)
        for _ in range(10):
            torch.mm(a, a, out=c)
        sums = torch.stack([t.sum(dtype=torch.int64) for t in filled])
        del filled
        if guarded:
            decoded = decode_on_device(jpegs, keys, device)[0]
        else:
            decoded = decode_jpeg(
                [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
                mode=ImageReadMode.RGB,
                device=device,
            )
        torch.cuda.synchronize(device)
        corrupted += int((sums.cpu() != expected).sum())
        del decoded
    return {"corrupted": corrupted, "iterations": iterations, "sums": iterations * tensors, "guarded": guarded}
