"""--placement grouped through the real job: two towers per worker, DDP across 2 workers, and the
same loss curve as the single-device placement (dropout off, so both draw no random masks)."""

import dataclasses

import mlflow
import pytest

from pipeline.config import PRESETS
from pipeline.train import driver

BASE = dataclasses.replace(
    PRESETS["sample"], width=0.125, resize_size=80, crop_size=67, epochs=2, batch_size=16, workers=2,
    dropout=0.0, deterministic=True, max_failures=0, experiment="placement", registered_model="placement")


def test_grouped_placement_trains_the_same_function_as_data_placement(ray_session, tiny_imagenet, in_tmp_dir):
    curves = {}
    for placement in ("data", "grouped"):
        cfg = dataclasses.replace(BASE, data=str(tiny_imagenet), placement=placement,
                                  storage_path=str(in_tmp_dir / "ray_results"))
        summary = driver.run(cfg)
        client = mlflow.MlflowClient(summary["tracking_uri"])
        curves[placement] = [m.value for m in sorted(client.get_metric_history(summary["run_id"], "train_loss"),
                                                     key=lambda m: m.step)]
        assert client.get_run(summary["run_id"]).data.params["placement"] == placement
    assert len(curves["grouped"]) == 2
    assert curves["grouped"] == pytest.approx(curves["data"], rel=1e-4)

    # The registered model is the single-device form whatever the placement.
    from pipeline.models.alexnet import AlexNet
    model = mlflow.pyfunc.load_model("models:/placement@champion").unwrap_python_model().network
    import torch
    assert type(model) is AlexNet and model(torch.zeros(2, 3, 67, 67)).shape == (2, 3)
