"""jobs/ablate.py: the grid, the table, and one real ablation (two concurrent Ray Train runs into a real `mlflow
server`) read back from MLflow: parent and child runs, their tags, no registration, and the table against the
children's own metrics."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import mlflow
import pytest

from conftest import ROOT, TINY_RUN
from pipeline.config import PRESETS
from pipeline.experiments import ablate, figure1


def test_grid_entries_parse_and_bad_ones_are_refused():
    assert ablate.parse_grid_entry("activation=tanh, lrn=off") == {"activation": "tanh", "lrn": "off"}
    assert ablate.parse_grid_entry("init-bias=0.1") == {"init_bias": "0.1"}
    for bad in ("tanh", "activation=", ","):
        with pytest.raises(ValueError, match="--ablate"):
            ablate.parse_grid_entry(bad)


def test_the_default_grid_flips_every_switch_once():
    labels = [r.label for r in ablate.plan(PRESETS["paper"], ablate.default_grid(PRESETS["paper"]))]
    assert labels == [
        "baseline",
        "activation=tanh",
        "lrn=off",
        "pool=non-overlapping",
        "dropout=0",
        "lighting=off",
        "augment=off",
        "init=kaiming",
        "init=xavier",
        "init_bias=0.1",
    ]
    sample = [r.label for r in ablate.plan(PRESETS["sample"], ablate.default_grid(PRESETS["sample"]))]
    assert "init=paper" in sample and "init=kaiming" not in sample and not any("init_bias" in s for s in sample)
    tv = [r.label for r in ablate.plan(PRESETS["torchvision"], ablate.default_grid(PRESETS["torchvision"]))]
    assert tv == ["baseline", "dropout=0", "lighting=off", "augment=off"]


@pytest.mark.parametrize(
    "grid,message",
    [
        ([{"activation": "relu"}], "is the baseline's own choice"),
        ([{"lrn": "off"}, {"lrn": "off"}], "lrn=off is given twice"),
        ([{"colour": "on"}], "unknown switch 'colour'"),
        ([{"init": "kaiming", "init_bias": "0.1"}], "--init kaiming starts every bias at 0"),
    ],
)
def test_a_bad_grid_is_refused_before_anything_runs(grid, message):
    with pytest.raises(ValueError, match=message):
        ablate.plan(PRESETS["paper"], grid)


def test_summary_rows_count_epochs_and_seconds_to_the_threshold():
    history = {
        "val_top1": {0: 40.0, 1: 60.0, 2: 70.0},
        "val_top5": {0: 80.0, 1: 90.0, 2: 95.0},
        "train_top1": {0: 50.0, 1: 76.0, 2: 90.0},
        "epoch_seconds": {0: 10.0, 1: 12.0, 2: 11.0},
    }
    row = ablate.summarise("lrn=off", history, threshold=25.0, seconds=50.0, baseline_top1=72.5)
    assert row["epochs_to_threshold"] == 2 and row["train_seconds_to_threshold"] == 22.0  # 24% error at epoch 2
    assert (row["val_top1"], row["gap"], row["delta_top1"]) == (70.0, 20.0, -2.5)
    never = ablate.summarise("x", history, threshold=5.0, seconds=None)
    assert never["epochs_to_threshold"] is None and "not in 3" in ablate.table([never], 5.0)


def test_figure1_counts_epochs_to_the_first_point_under_the_threshold():
    assert figure1.epochs_to([(0.5, 60.0), (1.0, 24.0), (1.5, 30.0), (2.0, 10.0)]) == 1.0
    assert figure1.epochs_to([(0.5, 60.0)]) is None


def test_an_ablation_runs_concurrently_under_one_parent_and_registers_nothing(
    ray_session, mlflow_server, tiny_imagenet, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(tiny_imagenet),
        storage_path=str(tmp_path),
        **{**TINY_RUN, "workers": 1, "experiment": "ablate-e2e", "registered_model": "alexnet-ablate-e2e"},
    )
    # Two runs at once, one train worker each: the session Ray's 4 CPUs leave their Ray Data 2.
    result = ablate.run(cfg, [{"activation": "tanh"}], parallel=2, threshold=60.0)

    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ablation"] == "parent"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    by_label = {c.data.tags["ablation"]: c for c in children}
    assert sorted(by_label) == ["activation=tanh", "baseline"] and result.runs == {
        label: c.info.run_id for label, c in by_label.items()
    }
    tanh, baseline = by_label["activation=tanh"], by_label["baseline"]
    assert (tanh.data.params["activation"], baseline.data.params["activation"]) == ("tanh", "relu")
    assert tanh.data.tags["ablation.activation"] == "tanh"
    # The same data, seed and budget; only the switch differs.
    differ = {k for k in tanh.data.params if tanh.data.params[k] != baseline.data.params.get(k)}
    assert differ <= {"activation", "resources_per_worker"}, differ
    # Concurrent: each started before the other ended.
    assert tanh.info.start_time < baseline.info.end_time and baseline.info.start_time < tanh.info.end_time
    # Nothing registered: no version anywhere, so no champion alias to take.
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["registered"] == "nothing"
    assert not client.search_model_versions(f"name = '{cfg.registered_model}'")
    assert not client.search_registered_models(filter_string=f"name = '{cfg.registered_model}'")

    # The table against the children's own metrics.
    rows = {r["run"]: r for r in result.rows}
    for label, child in by_label.items():
        history = {
            k: {m.step: m.value for m in client.get_metric_history(child.info.run_id, k)}
            for k in ("val_top1", "val_top5", "train_top1")
        }
        assert sorted(history["val_top1"]) == [0, 1]
        row = rows[label]
        assert row["val_top1"] == history["val_top1"][1] and row["val_top5"] == history["val_top5"][1]
        assert row["gap"] == pytest.approx(history["train_top1"][1] - history["val_top1"][1])
        reached = [e for e in (0, 1) if 100 - history["train_top1"][e] <= 60.0]
        assert row["epochs_to_threshold"] == (reached[0] + 1 if reached else None)
        assert parent.data.metrics[f"{ablate.slug(label)}.val_top1"] == pytest.approx(row["val_top1"])
        assert f"| {label} | {row['val_top1']:.1f} |" in result.table
    assert rows["activation=tanh"]["delta_top1"] == pytest.approx(
        rows["activation=tanh"]["val_top1"] - rows["baseline"]["val_top1"]
    )
    logged = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/ablation.md")
    assert result.table in logged and "§3.1" in logged
    assert json.loads(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/ablation.json"))["runs"] == result.runs


@pytest.mark.slow  # a job in a subprocess
def test_the_job_refuses_a_bad_grid_at_once_naming_it(tmp_path):
    job = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "ablate.py"), "--ablate", "pool=none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert job.returncode == 2, job.stderr
    assert "--ablate pool=none: pool='none': expected one of overlapping, non-overlapping" in job.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created


def test_figure1_logs_both_curves_the_ratio_and_the_plot(tiny_imagenet, mlflow_server, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = figure1.run(root=str(tiny_imagenet), epochs=2, learning_rates=(0.01,), experiment="figure1-e2e")
    assert set(result["curves"]) == {"relu", "tanh"} and result["images"] == 72
    for curve in result["curves"].values():  # 72 images: one step an epoch, one point a step
        assert [at for at, _ in curve] == [1.0, 2.0] and all(0 <= error <= 100 for _, error in curve)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["paper_ratio"] == 6.0
    for activation, curve in result["curves"].items():
        logged = [
            m.value
            for m in sorted(
                client.get_metric_history(result["run_id"], f"train_error_{activation}"), key=lambda m: m.step
            )
        ]
        assert logged == pytest.approx([error for _, error in curve])
    reached = result["epochs_to_threshold"]
    assert (result["ratio"] is None) == (None in reached.values())
    if result["ratio"] is not None:
        assert run.data.metrics["ratio"] == pytest.approx(reached["tanh"] / reached["relu"])
    png = mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path="figure1.png")
    assert Image.open(png).format == "PNG"
    assert "the paper: ~6x" in mlflow.artifacts.load_text(f"{run.info.artifact_uri}/figure1.md")
