"""README claims about the job's options, each proved by a real run (Ray Data -> 2 Ray Train workers -> the
session's mlflow server and registry). Every run costs 30-60 s on 2 cores, so each one carries several claims:

- `best_run`: prepared shards whose manifest carries its own lighting, `--storage-path s3://...` (the moto
  bucket), `--schedule step --lr-step-epochs 1 --lr-gamma 1e-6`, `--log-models best`, 3 epochs. The lr after
  epoch 0 is too small to move a float32 weight, so epochs 1 and 2 score what epoch 0 scored: epoch 1 is
  an epoch `best` must skip (it improves nothing and is not the last).
- `all_run`: the same schedule on the folder, `--log-models all`: every epoch, the non-improving one too.
- `none_run`: one epoch, `--log-models none`: no logged model, nothing registered, and the job says so.
The plateau schedule is unit-tested on the worker's own scheduler functions, without a run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import pytest
import torch

from conftest import TINY_RUN, make_bucket
from pipeline.config import PRESETS
from pipeline.data import prepare
from pipeline.models import checkpoint
from pipeline.train import driver, recipe

GAMMA = 1e-6
BASE = dataclasses.replace(PRESETS["sample"], **{**TINY_RUN, "experiment": "run-options"})
TINY_STEP = {"schedule": "step", "lr_step_epochs": 1, "lr_gamma": GAMMA, "epochs": 3}


def train(cfg, server: str) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", server)
        return driver.run(cfg)


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def logged_epochs(client, run_id: str) -> dict[int, object]:
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'")
    return {int(m.tags["epoch"]): m for m in models}


def improving(top1: dict[int, float]) -> list[int]:
    """The epochs whose val top-1 beats every earlier epoch's, from the recorded history."""
    best, out = float("-inf"), []
    for epoch in sorted(top1):
        if top1[epoch] > best:
            out.append(epoch)
        best = max(best, top1[epoch])
    return out


@pytest.fixture(scope="module")
def shards(ray_session, tiny_imagenet, tmp_path_factory):
    """The tiny data prepared into shards, with §4.1's PCA over their train images in the manifest."""
    out = tmp_path_factory.mktemp("shards") / "tiny-shards"
    manifest = prepare.prepare(str(tiny_imagenet), str(out), lighting_sample=0, log=lambda message: None)
    return out, manifest


@pytest.fixture(scope="module")
def best_run(ray_session, s3_server, mlflow_server, shards):
    data, manifest = shards
    bucket = make_bucket("run-options-checkpoints")
    cfg = dataclasses.replace(
        BASE,
        data=str(data),
        storage_path=f"{bucket}/runs",
        log_models="best",
        registered_model="options-best",
        **TINY_STEP,
    )
    summary = train(cfg, mlflow_server)
    return cfg, summary, manifest, mlflow.MlflowClient(mlflow_server)


@pytest.fixture(scope="module")
def all_run(ray_session, mlflow_server, tiny_imagenet, tmp_path_factory):
    cfg = dataclasses.replace(
        BASE,
        data=str(tiny_imagenet),
        log_models="all",
        registered_model="options-all",
        storage_path=str(tmp_path_factory.mktemp("ray_results")),
        **TINY_STEP,
    )
    return cfg, train(cfg, mlflow_server), mlflow.MlflowClient(mlflow_server)


def test_log_models_best_skips_an_epoch_that_does_not_improve_and_registers_the_first_best(best_run):
    cfg, summary, _, client = best_run
    run_id = summary["run_id"]
    top1 = history(client, run_id, "val_top1")
    assert sorted(top1) == [0, 1, 2]
    # The epochs `best` must log, from the recorded history: each improvement, and the last epoch.
    want = sorted(set(improving(top1)) | {2})
    assert 1 not in want, f"epoch 1 improved val top-1 ({top1}): this run cannot tell best from all"
    by_epoch = logged_epochs(client, run_id)
    assert sorted(by_epoch) == want
    for epoch, model in by_epoch.items():
        (value,) = [m.value for m in model.metrics if m.key == "val_top1" and m.run_id == run_id]
        assert value == pytest.approx(top1[epoch])
    # Registered: the first epoch reaching the best val top-1, not the last one logged.
    version = client.get_model_version(cfg.registered_model, summary["registration"].version)
    first_best = min(e for e in top1 if top1[e] == max(top1.values()))
    assert version.run_id == run_id and version.tags["epoch"] == str(first_best)
    assert version.tags["logged_model_id"] == by_epoch[first_best].model_id


def test_log_models_all_logs_every_epoch_the_non_improving_one_too(all_run):
    cfg, summary, client = all_run
    run_id = summary["run_id"]
    top1 = history(client, run_id, "val_top1")
    assert sorted(top1) == [0, 1, 2]
    assert 1 not in improving(top1), f"epoch 1 improved val top-1 ({top1}): `best` would log it as well"
    by_epoch = logged_epochs(client, run_id)
    # A model the Recorder dropped is named in the run's `undelivered` tag: shown when one is missing.
    assert sorted(by_epoch) == [0, 1, 2], client.get_run(run_id).data.tags.get("undelivered")
    assert all(model.status == "READY" for model in by_epoch.values())
    version = client.get_model_version(cfg.registered_model, summary["registration"].version)
    assert version.run_id == run_id and version.tags["epoch"] == str(max(top1, key=lambda e: (top1[e], -e)))


def test_log_models_none_logs_and_registers_nothing_and_says_so(ray_session, mlflow_server, tiny_imagenet, tmp_path):
    cfg = dataclasses.replace(
        BASE,
        data=str(tiny_imagenet),
        epochs=1,
        log_models="none",
        registered_model="options-none",
        storage_path=str(tmp_path / "ray_results"),
    )
    summary = train(cfg, mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and sorted(history(client, run.info.run_id, "val_top1")) == [0]
    assert logged_epochs(client, run.info.run_id) == {}
    assert summary["registration"].version is None
    assert not client.search_model_versions(f"name = '{cfg.registered_model}'")
    assert run.data.tags["registered"] == "nothing"
    # The job's last lines (jobs/train.py prints where_it_went) say why, and offer no model to load.
    text = driver.where_it_went(summary)
    assert f"registry: nothing registered: run {run.info.run_id} logged no model (--log-models none" in text
    assert "mlflow models serve" not in text and "load_model" not in text


def test_step_schedule_multiplies_the_recorded_lr_by_gamma_every_step(best_run, all_run):
    for cfg, summary, client in (best_run[:2] + best_run[3:], all_run):
        lr = history(client, summary["run_id"], "lr")
        assert sorted(lr) == [0, 1, 2]
        for epoch, value in lr.items():
            assert value == pytest.approx(cfg.lr * GAMMA**epoch, rel=1e-6), (epoch, lr)


def test_training_on_shards_uses_the_manifests_own_lighting(best_run):
    _, summary, manifest, client = best_run
    params = client.get_run(summary["run_id"]).data.params
    assert params["data_kind"] == "shards"
    assert manifest["lighting"]["source"].startswith("data")  # computed by prepare, not the constants
    assert params["lighting_source"] == manifest["lighting"]["source"]
    assert params["lighting_source"] != "imagenet-constants"


def test_checkpoints_land_in_the_s3_storage_path(best_run, tmp_path):
    cfg, summary, manifest, _ = best_run
    bucket, _, prefix = cfg.storage_path.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
        for o in page.get("Contents", [])
    ]
    run_folder = f"{prefix}/alexnet-{summary['run_id'][:12]}/"
    saved = {k for k in keys if k.startswith(run_folder) and k.endswith(f"/{checkpoint.CHECKPOINT_FILE}")}
    assert saved, keys
    # The run's last checkpoint is there, and reads back as the format every reader loads.
    last = f"{summary['checkpoint'].removeprefix('s3://').removeprefix(bucket + '/')}/{checkpoint.CHECKPOINT_FILE}"
    assert last in saved, (summary["checkpoint"], sorted(saved))
    s3.download_file(bucket, last, str(tmp_path / checkpoint.CHECKPOINT_FILE))
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_FILE)
    assert state["epoch"] == 2 and state["classes"] == manifest["classes"]
    assert not os.path.exists(cfg.storage_path)  # nothing went to a local folder named like the URI


def test_plateau_schedule_drops_the_lr_after_patience_epochs_without_a_better_val_top1():
    cfg = dataclasses.replace(PRESETS["paper"], schedule="plateau", lr=0.01, lr_gamma=0.1, plateau_patience=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = recipe.make_scheduler(optimizer, cfg)
    lrs = []
    for val_top1 in (10.0, 20.0, 20.0, 19.0, 20.0, 30.0, 30.0, 30.0, 30.0):
        optimizer.step()  # the worker's order: the epoch's steps, then the scheduler
        recipe.step_scheduler(scheduler, val_top1)
        lrs.append(optimizer.param_groups[0]["lr"])
    # Improvements at 10 and 20; then 20, 19 are two epochs without one (patience 2): still 0.01; the third
    # (20 again: equal is not better, mode max) drops it. 30 improves; three more 30s drop it again.
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001, 0.0001])
    step = recipe.make_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01),
        dataclasses.replace(cfg, schedule="step", lr_step_epochs=2, lr_gamma=0.5),
    )
    assert isinstance(step, torch.optim.lr_scheduler.StepLR)
    seen = []
    for val_top1 in (1.0, 2.0, 3.0, 4.0):  # step ignores val top-1: every 2 epochs, x 0.5
        step.optimizer.step()
        recipe.step_scheduler(step, val_top1)
        seen.append(step.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.01, 0.005, 0.005, 0.0025])


def test_the_printed_commands_find_mlflow_and_uvicorn_in_a_new_shell(monkeypatch):
    """`make train` runs .venv/bin/python with the venv off the PATH: the serve command it prints starts
    `mlflow`, which starts `uvicorn` by name. Pasted into a shell whose PATH lacks the venv, both resolve
    to this environment's, and the printed python imports the project's dependencies."""
    bare = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    monkeypatch.setenv("PATH", bare["PATH"])
    path, python = driver.shell_prefix()
    found = subprocess.run(
        ["bash", "-c", f"{path}bash -c 'command -v mlflow; command -v uvicorn' && {python} -c 'import mlflow, ray'"],
        env=bare,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    venv_bin = Path(sys.executable).parent.resolve()
    assert [(Path.cwd() / line).parent.resolve() for line in found.stdout.split()] == [venv_bin, venv_bin]
