"""--placement grouped through the real job: two towers per worker, DDP across 2 workers, and the
same loss curve as the single-device placement (dropout off, so both draw no random masks)."""

import dataclasses
from pathlib import Path

import mlflow
import pytest

from pipeline.config import PRESETS
from pipeline.train import driver

BASE = dataclasses.replace(
    PRESETS["sample"],
    width=0.125,
    resize_size=80,
    crop_size=67,
    epochs=2,
    batch_size=16,
    workers=2,
    dropout=0.0,
    deterministic=True,
    max_failures=0,
    experiment="placement",
    registered_model="placement",
)


def test_grouped_placement_trains_the_same_function_as_data_placement(ray_session, tiny_imagenet, in_tmp_dir):
    import torch

    from pipeline.models import checkpoint
    from pipeline.models.alexnet import AlexNet

    curves, summaries = {}, {}
    for placement in ("data", "grouped"):
        cfg = dataclasses.replace(
            BASE, data=str(tiny_imagenet), placement=placement, storage_path=str(in_tmp_dir / "ray_results")
        )
        summary = summaries[placement] = driver.run(cfg)
        client = mlflow.MlflowClient(summary["tracking_uri"])
        curves[placement] = [
            m.value for m in sorted(client.get_metric_history(summary["run_id"], "train_loss"), key=lambda m: m.step)
        ]
        assert client.get_run(summary["run_id"]).data.params["placement"] == placement
    assert len(curves["grouped"]) == 2
    assert curves["grouped"] == pytest.approx(curves["data"], rel=1e-4)

    # The registered model is the single-device form whatever the placement. Checked on the grouped run's
    # own version, by its number, not by `champion`: both runs train the same function on the same data,
    # so they reach the same top-1, a tie does not move `champion`, and it stays on the data-placement
    # run's version: loading the champion would check the wrong run's model.
    grouped = summaries["grouped"]
    version = grouped["registration"].version
    assert version is not None and version != summaries["data"]["registration"].version
    mlflow.set_tracking_uri(grouped["tracking_uri"])
    assert client.get_model_version("placement", version).run_id == grouped["run_id"]
    model = mlflow.pyfunc.load_model(f"models:/placement/{version}").unwrap_python_model().network
    assert type(model) is AlexNet
    # Its weights are the grouped run's: the same function as the network rebuilt from the model.pt of
    # the logged model that run logged (dropout is off: eval is deterministic).
    x = torch.randn(4, 3, 67, 67, generator=torch.Generator().manual_seed(0))
    logged = client.get_model_version("placement", version).tags["logged_model_id"]
    assert client.get_logged_model(logged).source_run_id == grouped["run_id"]
    with torch.no_grad():
        out = model.eval()(x)
        assert out.shape == (4, 3)
        path = mlflow.artifacts.download_artifacts(f"models:/{logged}")
        own = checkpoint.build_model(checkpoint.load(next(Path(path).rglob(checkpoint.MODEL_FILE)))).eval()(x)
        assert torch.allclose(out, own, atol=1e-6)
