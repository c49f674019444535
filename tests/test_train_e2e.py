"""The whole job, for real: Ray Data -> 2 Ray Train workers -> a real MLflow server and registry."""

from __future__ import annotations

import dataclasses
import time

import mlflow
import pytest

from pipeline import runner
from pipeline.config import PRESETS

TINY = dataclasses.replace(
    PRESETS["sample"], width=0.125, resize_size=80, crop_size=67, epochs=2, batch_size=16,
    lr=0.01, workers=2, experiment="e2e", registered_model="alexnet-e2e", max_failures=0,
)


def test_training_job_records_every_epoch_and_registers_the_best(ray_session, mlflow_server, tiny_imagenet,
                                                                in_tmp_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = dataclasses.replace(TINY, data=str(tiny_imagenet), storage_path=str(in_tmp_dir / "ray_results"))
    summary = runner.run(cfg)

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "16" and run.data.params["num_classes"] == "3"
    assert run.data.params["val_images"] == "24" and len(run.data.tags["git_sha"]) >= 7

    for key in ("val_top1", "val_top5", "train_loss", "val_loss", "lr", "images_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1], key
    top1 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
    top5 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top5")}
    for step in (0, 1):
        # 24 val images: every accuracy is a whole number of images out of 24 (summed, not averaged).
        assert (top1[step] * 24 / 100) == pytest.approx(round(top1[step] * 24 / 100))
        assert top5[step] == 100.0  # 3 classes: the true class is always among the top 5
    assert summary["val_top1"] == pytest.approx(top1[1])

    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    by_epoch = {int(m.tags["epoch"]): m for m in models if m.source_run_id == run.info.run_id}
    assert sorted(by_epoch) == [0, 1]
    for epoch, model in by_epoch.items():
        metrics = {m.key: m.value for m in model.metrics}
        assert metrics["val_top1"] == pytest.approx(top1[epoch])
        assert metrics["val_top5"] == pytest.approx(top5[epoch])

    champion = client.get_model_version_by_alias(cfg.registered_model, "champion")
    best_epoch = max(top1, key=lambda e: (top1[e], -e))  # the first epoch reaching the best top-1
    assert champion.run_id == run.info.run_id
    assert champion.tags["epoch"] == str(best_epoch)
    assert float(champion.tags["val_top1"]) == pytest.approx(top1[best_epoch], abs=1e-3)

    # The registered model loads and classifies.
    loaded = mlflow.pytorch.load_model(f"models:/{cfg.registered_model}@champion")
    import torch
    with torch.no_grad():
        out = loaded(torch.randn(2, 3, cfg.crop_size, cfg.crop_size))
    assert tuple(out.shape) == (2, 3)


@pytest.mark.parametrize("make", ["missing", "empty", "no_val"])
def test_bad_data_path_fails_fast_with_a_clear_message(tmp_path, make):
    import subprocess
    import sys

    target = tmp_path / "imagenet"
    if make == "empty":
        target.mkdir()
    elif make == "no_val":
        (target / "train" / "n01440764").mkdir(parents=True)
    started = time.time()
    result = subprocess.run([sys.executable, str(runner.__file__).replace("pipeline/runner.py", "jobs/train.py"),
                             "--data", str(target)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert str(target) in result.stderr
    assert time.time() - started < 30
