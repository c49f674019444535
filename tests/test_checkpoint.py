"""The one checkpoint format: written by the worker loop, read with weights_only=True by the callback, the
evaluation job and the served model; a restart continues exactly; the keep and log policies."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PRESETS
from pipeline.models import checkpoint
from pipeline.models.alexnet import build_model
from pipeline.models.placement import grouped_state_dict, place_model
from pipeline.train import worker

CFG = dataclasses.replace(PRESETS["paper"], width=0.125, crop_size=67, resize_size=80, schedule="plateau")
CLASSES = ["n01440764", "n01443537", "n01484850"]


def trained_parts(placement: str = "data", steps: int = 2, seed: int = 0):
    """A model placed as `placement`, its SGD (with momentum buffers) and plateau scheduler after `steps` steps."""
    torch.manual_seed(seed)
    model = place_model(build_model("alexnet", num_classes=3, width=CFG.width, image_size=CFG.crop_size, dropout=0.0),
                        placement, ["cpu"])
    optimizer = worker.make_optimizer(model, CFG)
    scheduler = worker.make_scheduler(optimizer, CFG)
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
    return checkpoint.save(directory, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                           config=CFG.to_dict(), num_classes=3, classes=CLASSES, words=["a", "b", "c"],
                           metrics={"val_top1": 50.0, "node_id": "abc"},
                           val_per_class={"correct": [1, 2, 3], "images": [4, 4, 4]},
                           files={checkpoint.TRAIN_BATCH_FILE: b"\x89PNG..."}, within_epoch=within_epoch)


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
    save(tmp_path, model, optimizer, scheduler, epoch=4,
         within_epoch=checkpoint.Start(4, 3, consumed, (12.5, 2, 4, 4)))
    restored, restored_opt, restored_sched = trained_parts(steps=0, seed=99)
    start = checkpoint.resume(checkpoint.load(tmp_path), restored, restored_opt, restored_sched)
    assert (start.epoch, start.step, start.sums) == (4, 3, (12.5, 2, 4, 4))   # the same epoch, not the next
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
    torch.save({"format": 1, "model": {}, "epoch": 0, "config": {}, "num_classes": 3, "x": NotAllowed()}, bad,
               pickle_module=pickle)
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


@pytest.mark.parametrize("policy,improved,last,logged", [
    ("best", True, False, True), ("best", False, False, False), ("best", False, True, True),
    ("all", False, False, True), ("none", True, True, False),
])
def test_which_epochs_become_logged_models(policy, improved, last, logged):
    assert checkpoint.should_log(policy, improved=improved, last_epoch=last) is logged


def test_ray_keeps_the_best_k_by_val_top1():
    kept = checkpoint.keep_policy(2)
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (2, "val_top1", "max")
    assert checkpoint.keep_policy(0).num_to_keep is None  # every checkpoint
