"""The benchmark jobs run end to end and report what they promise (their numbers are BENCHMARKS.md's,
not asserted here: timings belong to benchmark runs, not to tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # whole jobs and clusters


def run_job(*args: str, timeout: int = 300) -> dict:
    result = subprocess.run(
        [sys.executable, "jobs/benchmark.py", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_data_benchmark_compares_every_path_with_the_reference(tmp_path):
    report = run_job(
        "data",
        "--images",
        "300",
        "--epochs",
        "1",
        "--paths",
        "decode,reference,folder,shards-256",
        "--work",
        str(tmp_path),
    )
    rows = {r["path"].split(" (")[0].split(":")[0]: r for r in report["results"]}
    assert {"decode PIL, one core", "reference", "folder", "shards-256"} <= rows.keys()
    assert report["files"]["train_images"] == 270 and 60 < report["files"]["mean_kb"] < 140  # photo-like sizes
    for name in ("folder", "shards-256"):
        assert rows[name]["images"] == 270 and rows[name]["first_batch_s"] > 0 and rows[name]["vs_reference"] > 0
    assert rows["reference"]["vs_reference"] == 1.0


def test_gpu_benchmark_runs_on_the_cpu():
    report = run_job(
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
        "2",
        "--warmup",
        "1",
        "--images",
        "8",
        "--variants",
        "fp32,bf16",
    )
    assert [(s["variant"], s["batch_size"]) for s in report["step"]] == [("fp32", 4), ("bf16", 4)]
    assert all(s["images_per_s"] > 0 for s in report["step"] + report["towers"])
    assert [t["placement"] for t in report["towers"]] == ["data", "grouped"]
    assert report["data"]["cpu_images_per_s_per_core"] > 0 and report["data"]["device_images_per_s"] > 0


def test_scale_benchmark_synthesises_shards_and_resumes_half_an_epoch(tmp_path):
    report = run_job("scale", "--images", "3000", "--measure-images", "1000", "--work", str(tmp_path), "--delete")
    assert report["images"] == 3000 and report["row_groups"] == 12  # 2 shards of 2,796 + 204 rows
    assert 1000 <= report["measured_images"] <= 1000 + 64 and report["steady_img_s"] > 0
    assert report["first_batch_s"] > 0 and report["driver_peak_mb"] > 0 and report["task_peak_mb"] > 0
    resume = report["resume"]
    assert resume["skipped"] + resume["left"] == 3000 and 0.4 < resume["left"] / 3000 < 0.6
    assert resume["complete"] and resume["images"] == resume["left"]  # all of the rest, at most 300,000
    assert resume["skipped_delivered"] == 0 and resume["repeated"] == 0 and resume["img_s"] > 0
    assert not (tmp_path / "shards-3000").exists()  # --delete


def test_folder_benchmark_lists_a_folder_and_resumes_half_an_epoch(tmp_path):
    report = run_job("folder", "--images", "3000", "--measure-images", "1000", "--work", str(tmp_path))
    assert report["images"] == {"train": 3000, "val": 1000}  # 1,000 classes of 3, one val image each
    assert report["open_s"] >= 0 and report["first_batch_s"] > 0 and report["steady_img_s"] > 0
    assert report["resumed_img_s"] > 0 and report["driver_peak_mb"] >= report["ray_init_peak_mb"] > 0
    assert len(list((tmp_path / "folder-3000" / "train").iterdir())) == 1000
