"""What the first GPU run depends on, shown on the CPU as far as the CPU can show it: batches where the
worker loop expects them (Ray Data's device="auto" is the GPU inside a Train worker), a compiled and a
channels-last step, and the device check running as it will on a lent GPU machine (no Ray, no MLflow).
The CUDA-only half (NCCL, nvJPEG, sync-free steps) is jobs/gpu_check.py on a device (BENCHMARKS.md)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train_loop import RecordingLoop

from conftest import ROOT
from pipeline.config import PRESETS
from pipeline.models.alexnet import build_from_config
from pipeline.train import batches, recipe, worker
from pipeline.transforms.lighting import IMAGENET

CFG = dataclasses.replace(PRESETS["sample"], width=0.125, crop_size=67, resize_size=76, batch_size=8, workers=1)
# What a lent GPU machine lacks (BENCHMARKS.md, "The device check"): it has torch, torchvision, pyarrow,
# Pillow, OpenCV and NumPy, and simplejpeg only when its wheel is carried.
NOT_ON_THE_DEVICE = (
    "ray",
    "mlflow",
    "boto3",
    "botocore",
    "s3transfer",
    "moto",
    "scipy",
    "matplotlib",
    "pandas",
    "sklearn",
    "psutil",
    "tqdm",
)


def settings(cfg) -> worker.LoopSettings:
    return worker.LoopSettings(cfg, 10, IMAGENET)


def crops_dataset(ray, n: int = 20):
    rng = np.random.default_rng(0)
    return ray.data.from_items(
        [
            {"image": rng.integers(0, 256, (67, 67, 3), dtype=np.uint8), "label": int(rng.integers(0, 10)), "index": i}
            for i in range(n)
        ]
    )


def test_batches_stay_on_the_host_where_ray_would_move_them_to_the_gpu(ray_session, monkeypatch):
    """Inside a Ray Train worker, iter_torch_batches' default device "auto" is the worker's GPU, and every
    column goes there, `index` included, which the loop reads on the host. Played here with Ray's own
    iterator, told it runs in a Train worker whose device is "meta" (a device NumPy cannot read either)."""
    import ray.train.torch
    import ray.train.utils

    monkeypatch.setattr(ray.train.utils, "_in_ray_train_worker", lambda: True)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("meta"))
    shard = crops_dataset(ray_session).iterator()
    taken = list(batches.input_batches(shard, CFG, torch.device("cpu"), drop_last=True))
    assert len(taken) == 2 and all(v.device.type == "cpu" for b in taken for v in b.values())
    # and the loop trains on them, reading the indices on the host (a checkpoint after the first step names them)
    loop = RecordingLoop(
        settings(dataclasses.replace(CFG, checkpoint_every_steps=1)),
        build_from_config(CFG.to_dict(), 10),
        device=torch.device("cpu"),
    )
    stats = loop.train_one_epoch(0, taken)
    [(_, saved)] = loop.reports
    assert stats.sums.images == 16 and len(set(saved["within_epoch"].consumed.tolist())) == 8


def test_the_loop_refuses_indices_that_are_not_on_the_host():
    batch = {
        "image": torch.zeros(2, 67, 67, 3, dtype=torch.uint8),
        "label": torch.zeros(2, dtype=torch.long),
        "index": torch.arange(2, device="meta"),
    }
    loop = worker.TrainLoop(settings(CFG), build_from_config(CFG.to_dict(), 10), device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="index column is on meta, expected the CPU"):
        loop.train_one_epoch(0, [batch])


def batches_of_shapes(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": torch.from_numpy(rng.integers(0, 256, (8, 67, 67, 3), dtype=np.uint8)),
            "label": torch.from_numpy(rng.integers(0, 10, 8)),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("placement", ["data", "grouped"])
def test_channels_last_steps_train_like_the_default_layout(placement):
    """The same weights, batches and seeds: one SGD step in each memory layout gives the same weights (to
    float rounding), and the channels_last model really is channels_last, towers included."""
    models = []
    for channels_last in ("off", "on"):
        cfg = dataclasses.replace(CFG, placement=placement, dropout=0.0, lighting_std=0.0, channels_last=channels_last)
        torch.manual_seed(0)
        model = worker.place_and_wrap(
            build_from_config(cfg.to_dict(), 10), cfg, [torch.device("cpu")], channels_last=channels_last == "on"
        )
        loop = worker.TrainLoop(settings(cfg), model, device=torch.device("cpu"))
        assert loop.precision == recipe.Precision(None, channels_last == "on")
        loop.train_one_epoch(0, batches_of_shapes())
        models.append(model)
    convs = [m for m in models[1].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_compiled_model_trains_and_times_its_first_step():
    """--compile as the worker loop runs it: torch.compile (inductor, C++ on the CPU) of the placed model;
    the first step, timed alone, is the compilation; the steps change the weights and count every image."""
    cfg = dataclasses.replace(CFG, compile=True)
    torch.manual_seed(0)
    model = worker.place_and_wrap(build_from_config(cfg.to_dict(), 10), cfg, [torch.device("cpu")])
    before = [p.detach().clone() for p in model.parameters()]
    loop = worker.TrainLoop(settings(cfg), model, device=torch.device("cpu"))
    stats = loop.train_one_epoch(0, batches_of_shapes())  # --compile's first epoch: its first step timed alone
    assert stats.sums.images == 24 and np.isfinite(stats.sums.loss)
    assert stats.first_step_seconds > 0.5 * stats.seconds  # compiling dwarfs two tiny steps
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def run_as_on_the_device(
    script: str, *args: str, missing: tuple[str, ...] = NOT_ON_THE_DEVICE, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run a job from the clone, uninstalled, with `missing` importable as on a lent GPU machine: not."""
    code = (
        f"import runpy, sys\nfor name in {list(missing)!r}: sys.modules[name] = None\n"
        f"sys.argv = {[script, *args]!r}\nrunpy.run_path({script!r}, run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a job in a subprocess
def test_the_device_check_runs_without_ray_or_mlflow(tmp_path):
    out = tmp_path / "out" / "gpu_check.json"
    result = run_as_on_the_device("jobs/gpu_check.py", "--device", "cpu", "--no-compile", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report and report["ok"] is True
    assert report["towers"]["grad_rel_diff"] < report["towers"]["tolerance"] == 1e-5
    loop = report["loop"]
    assert loop["backend"] == "gloo" and loop["train_images"] == 24 and loop["val_images"] == 24
    assert loop["checkpoint_images"] == [16]  # three steps of 8: a checkpoint at step 2, after two
    variants = {(v["placement"], v["precision"], v["channels_last"]) for v in report["steps"]["variants"]}
    assert variants == {
        ("data", "fp32", False),
        ("data", "bf16", False),
        ("data", "bf16", True),
        ("data", "fp16", True),
        ("grouped", "bf16", True),
    }
    assert all(v["images_per_s"] > 0 for v in report["steps"]["variants"])
    decode = report["decode"]
    assert decode["images"] == 24 and decode["failed"] == {} and decode["stream_reuse"]["corrupted"] == 0


@pytest.mark.slow  # a job in a subprocess
def test_the_gpu_benchmark_reports_its_steps_where_the_decoder_is_missing():
    result = run_as_on_the_device(
        "jobs/benchmark.py",
        "gpu",
        "--device",
        "cpu",
        "--width",
        "0.125",
        "--image-size",
        "67",
        "--batch-sizes",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--variants",
        "fp32",
        "--json",
        missing=(*NOT_ON_THE_DEVICE, "simplejpeg"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"][0]["images_per_s"] > 0 and "simplejpeg" in report["data"]["skipped"]
