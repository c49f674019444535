"""The champion rule against a real `mlflow server`, with runs whose logged models are made directly (the
behaviour under test is the registry's, not training's): two and three runs on the same data, a better
run on other data, a tie, and the lineage every version carries."""

from __future__ import annotations

import time
import uuid

import mlflow
import pytest

from pipeline.tracking import registry

DATA_A = ("/data/imagenet", "a" * 64)
DATA_B = ("/data/imagenet-v2", "b" * 64)


def finished_run(server: str, experiment: str, val_top1: dict[int, float], data=DATA_A) -> str:
    """A run that logged one model per epoch in `val_top1` ({epoch: top-1}), as the training callback does:
    the val metrics carry the model's id."""
    client = mlflow.MlflowClient(server)
    experiment_id = (
        client.get_experiment_by_name(experiment) or client.get_experiment(client.create_experiment(experiment))
    ).experiment_id
    run_id = client.create_run(experiment_id).info.run_id
    mlflow.set_tracking_uri(server)
    for epoch, top1 in val_top1.items():
        model = mlflow.initialize_logged_model(
            name=f"epoch-{epoch:03d}", source_run_id=run_id, tags={"epoch": str(epoch)}, experiment_id=experiment_id
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(k, v, now, epoch, model_id=model.model_id)
                for k, v in (("val_top1", top1), ("val_top5", top1 + 20))
            ],
        )
        mlflow.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def register(server: str, name: str, run_id: str, data=DATA_A) -> registry.Registration:
    return registry.register_best(
        tracking_uri=server,
        run_id=run_id,
        name=name,
        lineage={
            "git_sha": "0123abc",
            "data_uri": data[0],
            "data_fingerprint": data[1],
            "data_kind": "shards",
            "preset": "paper",
            "switches": "lrn=off",
            "val_images": 50000,
        },
    )


def aliases(server: str, name: str) -> dict[str, str]:
    return dict(mlflow.MlflowClient(server).get_registered_model(name).aliases)


@pytest.fixture
def name():
    return f"alexnet-{uuid.uuid4().hex[:8]}"


def test_three_runs_on_the_same_data_champion_moves_only_up(mlflow_server, name):
    first = register(mlflow_server, name, finished_run(mlflow_server, name, {0: 30.0, 1: 40.0}))
    assert (first.version, first.champion) == ("1", True) and "first champion" in first.message
    assert aliases(mlflow_server, name) == {"champion": "1"}

    second = register(mlflow_server, name, finished_run(mlflow_server, name, {0: 45.0}))
    assert second.champion and "beats version 1 (val top-1 40.00%)" in second.message
    assert aliases(mlflow_server, name) == {"champion": "2", "previous": "1"}

    third = register(mlflow_server, name, finished_run(mlflow_server, name, {0: 42.0, 1: 44.9}))
    assert third.version == "3" and not third.champion
    assert "does not beat champion version 2 (val top-1 45.00%) on the same data" in third.message
    assert aliases(mlflow_server, name) == {"champion": "2", "previous": "1"}


def test_a_model_measured_on_other_data_never_takes_the_champion(mlflow_server, name):
    register(mlflow_server, name, finished_run(mlflow_server, name, {0: 33.3}))
    other = register(mlflow_server, name, finished_run(mlflow_server, name, {0: 99.0}, DATA_B), DATA_B)
    assert other.version == "2" and not other.champion
    assert "measured on other data (/data/imagenet, fingerprint aaaaaaaaaaaa" in other.message
    assert "--registered-model" in other.message  # the fix, named
    assert aliases(mlflow_server, name) == {"champion": "1"}


def test_a_tie_keeps_the_champion(mlflow_server, name):
    register(mlflow_server, name, finished_run(mlflow_server, name, {0: 50.0}))
    tie = register(mlflow_server, name, finished_run(mlflow_server, name, {0: 50.0}))
    assert not tie.champion and aliases(mlflow_server, name) == {"champion": "1"}


def test_every_version_carries_its_lineage(mlflow_server, name):
    # The best epoch is registered; on a tie the first epoch that reached it.
    run_id = finished_run(mlflow_server, name, {0: 20.0, 1: 60.0, 2: 60.0, 3: 55.0})
    version = register(mlflow_server, name, run_id).version
    client = mlflow.MlflowClient(mlflow_server)
    mv = client.get_model_version(name, version)
    best = client.get_logged_model(mv.tags["logged_model_id"])
    assert best.tags["epoch"] == "1" and best.source_run_id == run_id
    assert {k: mv.tags[k] for k in registry.LINEAGE} == {
        "run_id": run_id,
        "git_sha": "0123abc",
        "data_uri": DATA_A[0],
        "data_fingerprint": DATA_A[1],
        "data_kind": "shards",
        "preset": "paper",
        "switches": "lrn=off",
        "epoch": "1",
        "logged_model_id": best.model_id,
        "val_top1": "60.0000",
        "val_top5": "80.0000",
        "val_images": "50000",
    }
    assert mv.run_id == run_id


def test_a_run_without_models_registers_nothing(mlflow_server, name):
    result = register(mlflow_server, name, finished_run(mlflow_server, name, {}))
    assert result.version is None and "logged no model" in result.message
    assert not mlflow.MlflowClient(mlflow_server).search_registered_models(filter_string=f"name = '{name}'")


def test_sample_models_register_apart_from_real_ones():
    assert registry.model_name("", sample=True) == "alexnet-sample"
    assert registry.model_name("", sample=False) == "alexnet"
    assert registry.model_name("mine", sample=True) == "mine"
