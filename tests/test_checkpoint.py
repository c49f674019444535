"""The one checkpoint format: written by the worker loop, read with weights_only=True by the callback, the
evaluation job and the served model; a restart continues exactly; a checkpoint the flat layout (f34a58d)
wrote still loads and scores the same; the keep and log policies, as seen on disk after a real run."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from pipeline.config import PRESETS
from pipeline.models import checkpoint
from pipeline.models.alexnet import build_model
from pipeline.models.placement import grouped_state_dict, place_model
from pipeline.train import metrics, recipe
from pipeline.transforms import stages
from pipeline.transforms.device_stages import normalize, to_float

CFG = dataclasses.replace(PRESETS["paper"], width=0.125, crop_size=67, resize_size=80, schedule="plateau")
CLASSES = ["n01440764", "n01443537", "n01484850"]
# Written by the code of f34a58d, before pipeline/ moved into subpackages (fixtures/make_old_fixtures.py).
OLD = Path(__file__).parent / "fixtures" / "old_layout"


def trained_parts(placement: str = "data", steps: int = 2, seed: int = 0):
    """A model placed as `placement`, its SGD (with momentum buffers) and plateau scheduler after `steps` steps."""
    torch.manual_seed(seed)
    model = place_model(
        build_model("alexnet", num_classes=3, width=CFG.width, image_size=CFG.crop_size, dropout=0.0),
        placement,
        ["cpu"],
    )
    optimizer = recipe.make_optimizer(model, CFG)
    scheduler = recipe.make_scheduler(optimizer, CFG)
    for step in range(steps):
        step_on(model, optimizer, seed=step)
        scheduler.step(float(step))
    return model, optimizer, scheduler


def step_on(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    x, y = torch.randn(4, 3, 67, 67, generator=g), torch.randint(0, 3, (4,), generator=g)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def save(directory, model, optimizer, scheduler, epoch: int = 4, within_epoch=None):
    return checkpoint.save(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=epoch,
        config=CFG.to_dict(),
        num_classes=3,
        classes=CLASSES,
        words=["a", "b", "c"],
        metrics={"val_top1": 50.0, "node_id": "abc"},
        val_per_class={"correct": [1, 2, 3], "images": [4, 4, 4]},
        files={checkpoint.TRAIN_BATCH_FILE: b"\x89PNG..."},
        within_epoch=within_epoch,
    )


@pytest.mark.parametrize("placement", ["data", "grouped"])
def test_a_restart_continues_exactly_where_the_checkpoint_left(tmp_path, placement):
    model, optimizer, scheduler = trained_parts(placement)
    save(tmp_path, model, optimizer, scheduler)
    state = checkpoint.load(tmp_path)  # weights_only=True: tensors and plain Python only

    restored, restored_opt, restored_sched = trained_parts(placement, steps=0, seed=99)  # other weights, no momentum
    assert checkpoint.resume(state, restored, restored_opt, restored_sched) == checkpoint.Start(5)  # the next epoch
    assert restored_sched.state_dict() == scheduler.state_dict()
    # The next step from the restored state equals the next step of the original: momentum came back too.
    step_on(model, optimizer, seed=7)
    step_on(restored, restored_opt, seed=7)
    for (key, a), b in zip(grouped_state_dict(model).items(), grouped_state_dict(restored).values()):
        assert torch.equal(a, b), key


def test_a_mid_epoch_checkpoint_resumes_inside_its_epoch(tmp_path):
    model, optimizer, scheduler = trained_parts()
    consumed = np.array([7, 3, 2 << 20, 11], dtype=np.int64)
    save(tmp_path, model, optimizer, scheduler, epoch=4, within_epoch=checkpoint.Start(4, 3, consumed, (12.5, 2, 4, 4)))
    restored, restored_opt, restored_sched = trained_parts(steps=0, seed=99)
    start = checkpoint.resume(checkpoint.load(tmp_path), restored, restored_opt, restored_sched)
    assert (start.epoch, start.step, start.sums) == (4, 3, (12.5, 2, 4, 4))  # the same epoch, not the next
    assert start.consumed.tolist() == consumed.tolist()


def test_the_checkpoint_carries_what_its_readers_need(tmp_path):
    model, optimizer, scheduler = trained_parts()
    save(tmp_path, model, optimizer, scheduler)
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_FILE)
    assert (state["epoch"], state["num_classes"], state["classes"], state["words"]) == (4, 3, CLASSES, ["a", "b", "c"])
    assert state["config"] == CFG.to_dict() and state["val_per_class"]["correct"] == [1, 2, 3]
    assert (tmp_path / checkpoint.TRAIN_BATCH_FILE).read_bytes() == b"\x89PNG..."

    network = checkpoint.build_model(state)
    assert not network.training
    x = torch.randn(2, 3, 67, 67)
    with torch.no_grad():
        assert torch.equal(network(x), model.eval()(x))

    # The served form drops the optimiser: with one momentum buffer per weight, half the bytes.
    served = tmp_path / checkpoint.MODEL_FILE
    torch.save(checkpoint.for_serving(state), served)
    assert "optimizer" not in checkpoint.load(served)
    assert 0.45 < served.stat().st_size / (tmp_path / checkpoint.CHECKPOINT_FILE).stat().st_size < 0.55


class NotAllowed:
    pass


def test_loading_refuses_pickled_code_and_names_the_file(tmp_path):
    bad = tmp_path / checkpoint.CHECKPOINT_FILE
    torch.save(
        {"format": 1, "model": {}, "epoch": 0, "config": {}, "num_classes": 3, "x": NotAllowed()},
        bad,
        pickle_module=pickle,
    )
    with pytest.raises(ValueError, match=rf"{bad}.*weights_only=True"):
        checkpoint.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere.*checkpoint\.pt"):
        checkpoint.load(tmp_path / "nowhere")
    torch.save({"model": {}}, bad)
    with pytest.raises(ValueError, match=r"lacks \['format', 'epoch', 'config', 'num_classes'\]"):
        checkpoint.load(bad)


def test_open_model_reads_a_checkpoint_directory(tmp_path):
    model, optimizer, scheduler = trained_parts()
    save(tmp_path, model, optimizer, scheduler)
    opened = checkpoint.open_model(str(tmp_path))
    assert opened.state["epoch"] == 4 and opened.model_id == "" and opened.version == ""


@pytest.mark.parametrize(
    "policy,improved,last,logged",
    [
        ("best", True, False, True),
        ("best", False, False, False),
        ("best", False, True, True),
        ("all", False, False, True),
        ("none", True, True, False),
    ],
)
def test_which_epochs_become_logged_models(policy, improved, last, logged):
    assert checkpoint.should_log(policy, improved=improved, last_epoch=last) is logged


def test_a_checkpoint_of_the_flat_layout_loads_scores_and_evaluates_the_same():
    """checkpoint.pt as the old worker loop saved it: the file pickles no class of ours (load() reads it with
    weights_only=True, which refuses any), so moving modules cannot break it; its network gives the old code's
    logits on the old code's eval view of the same files, and the evaluation sums the old code counted."""
    expected = torch.load(OLD / "expected.pt", weights_only=True)
    opened = checkpoint.open_model(str(OLD))
    state = opened.state
    assert (state["epoch"], state["num_classes"], state["classes"]) == (0, 3, CLASSES)
    assert (state["config"]["width"], state["config"]["crop_size"]) == (0.03125, 67)
    assert "optimizer" in state  # the training form, as Ray Train keeps it

    jpegs = [f.read_bytes() for f in sorted((OLD / "val").glob("*.JPEG"))]
    crops = stages.center_crops(
        {"jpeg": jpegs, "key": ["0", "1", "2"]},
        resize_size=state["config"]["resize_size"],
        crop_size=state["config"]["crop_size"],
    )
    assert torch.equal(torch.from_numpy(crops["image"]), expected["crops"])  # the eval view did not change
    network = checkpoint.build_model(state)
    with torch.no_grad():
        logits = network(normalize(to_float(expected["crops"])))
    torch.testing.assert_close(logits, expected["logits"])
    assert logits.argmax(1).tolist() == expected["labels"].tolist()  # it was trained to tell these three apart

    with torch.no_grad():
        sums = metrics.score_batch(network, expected["crops"], expected["labels"])
    old = expected["sums"]
    assert (sums.correct1, sums.correct5, sums.images) == (old["correct1"], old["correct5"], old["images"])
    assert sums.loss == pytest.approx(old["loss"], abs=1e-5)
    assert state["metrics"]["val_top1"] == pytest.approx(100.0 * sums.correct1 / sums.images)


def test_ray_keeps_the_best_k_by_val_top1(trained_run, mlflow_server):
    """On disk after the shared run: Ray Train's folder for the run holds the checkpoints of the K epochs with
    the best val top-1 (K = --keep-checkpoints) and the latest, each a checkpoint.pt that loads."""
    cfg, summary = trained_run
    run_folder = Path(cfg.storage_path) / f"alexnet-{summary['run_id'][:12]}"  # RunConfig(name=...) in the driver
    kept = {}
    for folder in sorted(p for p in run_folder.glob("checkpoint_*") if p.is_dir()):
        state = checkpoint.load(folder)
        kept[state["epoch"]] = (folder, state["metrics"]["val_top1"])

    top1 = {m.step: m.value for m in MlflowClient(mlflow_server).get_metric_history(summary["run_id"], "val_top1")}
    assert sorted(top1) == list(range(cfg.epochs))
    # Ray Train's rule: the K best (a tie goes to the later epoch), and the latest even when it is not one of them.
    best_k = sorted(top1, key=lambda e: (-top1[e], -e))[: cfg.keep_checkpoints]
    assert set(kept) == set(best_k) | {cfg.epochs - 1}
    for epoch, (_, val_top1) in kept.items():
        assert val_top1 == pytest.approx(top1[epoch])  # each checkpoint is the epoch MLflow recorded
    assert Path(summary["checkpoint"]) == kept[cfg.epochs - 1][0]  # the run's result is the latest

    policy = checkpoint.keep_policy(cfg.keep_checkpoints)
    assert (policy.num_to_keep, policy.checkpoint_score_attribute, policy.checkpoint_score_order) == (
        cfg.keep_checkpoints,
        checkpoint.SCORE,
        "max",
    )
    assert checkpoint.keep_policy(0).num_to_keep is None  # --keep-checkpoints 0: every checkpoint
