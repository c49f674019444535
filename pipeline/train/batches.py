"""The batches a worker's loop consumes, from its Ray Data shard.

    input_batches(shard, cfg, device, ...)   {image (N, C, C, 3) uint8, label, index} per step: Ray Data's
                                             CPU crops (--decode-on cpu), or JPEG bytes decoded and
                                             cropped on the worker's device (--decode-on gpu, nvJPEG)
    host_indices(batch)                      the batch's image indices, on the host, where the loop reads
                                             them every step (resume points, --sample-log)

Torch and NumPy only: the device check (jobs/gpu_check.py) runs these without Ray, over a stand-in shard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from pipeline.config import Config
from pipeline.transforms import device_stages, stages

# Batches Ray Data prepares ahead of the step (the next one is ready when the step ends).
PREFETCH_BATCHES = 2


def input_batches(
    shard,
    cfg: Config,
    device: torch.device,
    *,
    drop_last: bool,
    report=None,
    crop_rngs: Callable[[int], np.random.Generator] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches of {image (N, C, C, 3) uint8, label, index} (index stays on the CPU).

    --decode-on cpu: Ray Data's crops, copied from pinned memory without blocking. --decode-on gpu:
    Ray Data hands on the JPEG bytes, decoded and cropped here (device_stages.decode_on_device and
    crops_on_device): random crops and flips from crop_rngs(i) for the i-th batch when given
    (training), else the centre. report: the run's data.ReadReport actor, told of files that fail to
    decode here.
    """
    gpu = device.type == "cuda"
    if cfg.decode_on == "cpu":
        # device="cpu", not Ray's default "auto": in a Ray Train worker "auto" is the worker's GPU and
        # would move `index` there too, which the loop reads on the host. Pinned, the loop's
        # non_blocking copies of image and label overlap the step before.
        yield from shard.iter_torch_batches(
            batch_size=cfg.worker_batch_size,
            drop_last=drop_last,
            prefetch_batches=PREFETCH_BATCHES,
            pin_memory=gpu,
            device="cpu",
        )
        return
    for i, batch in enumerate(
        shard.iter_batches(
            batch_size=cfg.worker_batch_size,
            drop_last=drop_last,
            prefetch_batches=PREFETCH_BATCHES,
            batch_format="numpy",
        )
    ):
        images, rows, failed = device_stages.decode_on_device(
            list(batch["jpeg"]), [str(k) for k in batch["key"]], device
        )
        if failed and report is not None:
            report.add.remote(failed)
        if not images:
            raise ValueError(f"no image of a batch of {len(batch['jpeg'])} decoded: {failed}")
        n = len(images)
        if crop_rngs is not None:
            top, left, flip = stages.crop_params(
                n, crop_rngs(i), resize_size=cfg.resize_size, crop_size=cfg.crop_size, flip_p=cfg.flip_p
            )
        else:
            top = left = np.full(n, (cfg.resize_size - cfg.crop_size) // 2)
            flip = np.zeros(n, bool)
        crops = device_stages.crops_on_device(
            images, top, left, flip, resize_size=cfg.resize_size, crop_size=cfg.crop_size
        )
        yield {
            "image": crops,
            "label": device_stages.to_device(torch.as_tensor(batch["label"][rows]), device),
            "index": torch.as_tensor(batch["index"][rows]),
        }


def host_indices(batch: dict) -> np.ndarray:
    """The batch's image indices, which the loop keeps on the host (resume points, --sample-log). A copy
    back from a GPU would make every step wait for the device, so one there is a bug upstream."""
    index = batch["index"]
    if index.device.type != "cpu":
        raise RuntimeError(
            f"the batch's index column is on {index.device}, expected the CPU: the loop reads it on "
            f"the host every step (input_batches asks Ray Data for CPU batches)"
        )
    return index.numpy()
