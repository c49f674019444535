"""The worker loop as a class, driven without Ray on CPU tensors: a step changes the weights, an epoch
counts what it trained on, run() reports every epoch the keys the tracking side reads and a checkpoint,
--compile's first epoch alone reports compile_seconds. (tests/test_resume.py resumes it mid-epoch.)"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from pipeline.config import PRESETS
from pipeline.models import checkpoint
from pipeline.models.alexnet import build_from_config
from pipeline.train import worker
from pipeline.transforms.lighting import IMAGENET

CFG = dataclasses.replace(
    PRESETS["sample"], width=0.125, crop_size=67, resize_size=76, batch_size=8, workers=1, epochs=2
)
CPU = torch.device("cpu")
# What every epoch reports: the tracking callback and Ray Train's checkpoint ranking read these.
EPOCH_KEYS = {
    "epoch",
    "train_loss",
    "train_top1",
    "train_top5",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_s",
    "data_wait_fraction",
    "train_images",
    "train_steps",
    "val_images",
    "epoch_seconds",
    "node_id",
}


class RecordingLoop(worker.TrainLoop):
    """The loop with Ray Train's report played here: each report kept, rank 0's checkpoint written to
    `directory`/<n> through the loop's own save()."""

    def __init__(self, *args: Any, directory=None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.directory, self.reports = directory, []

    def report(self, metrics: dict[str, Any], **saved: Any) -> None:
        if self.directory is not None:
            folder = self.directory / str(len(self.reports))
            folder.mkdir(parents=True)
            self.save(str(folder), metrics, **saved)
        self.reports.append((metrics, saved))


class ListShard:
    """Ray Data's DataIterator as input_batches calls it (--decode-on cpu), over rows in memory."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool, **_: Any):
        n = len(self.rows["label"])
        for i in range(0, n - batch_size + 1 if drop_last else n, batch_size):
            yield {k: torch.from_numpy(v[i : i + batch_size]) for k, v in self.rows.items()}


def rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, 67, 67, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, n),
        "index": np.arange(n, dtype=np.int64),
    }


def loop_for(cfg=CFG, **kwargs: Any) -> RecordingLoop:
    torch.manual_seed(0)
    model = worker.place_and_wrap(build_from_config(cfg.to_dict(), 10), cfg, [CPU])
    return RecordingLoop(
        worker.LoopSettings(cfg, 10, IMAGENET, classes=tuple(f"n{i}" for i in range(10))), model, device=CPU, **kwargs
    )


def test_a_step_changes_every_weight_and_an_epoch_counts_its_images():
    loop = loop_for()
    before = [p.detach().clone() for p in loop.model.parameters()]
    batch = {"image": torch.from_numpy(rows(8)["image"]), "label": torch.zeros(8, dtype=torch.long)}
    x, labels = loop.model_input(batch)
    assert x.shape == (8, 3, 67, 67) and x.dtype == torch.float32
    logits, loss = loop.step(x, labels)
    assert logits.shape == (8, 10) and torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, loop.model.parameters()))

    stats = loop.train_one_epoch(0, ListShard(rows(20)).iter_torch_batches(batch_size=8, drop_last=True))
    assert (stats.steps, stats.sums.images, stats.first_step_seconds, stats.first_inputs) == (2, 16, 0.0, None)
    assert loop.reports == []  # no --checkpoint-every-steps: nothing within the epoch


def test_the_same_step_draws_the_same_noise_whatever_came_before():
    """Dropout and lighting come from (seed, rank, epoch, step): a step taken again draws what it drew."""
    cfg = dataclasses.replace(CFG, lighting_std=0.1)
    loop = loop_for(cfg)
    batch = {"image": torch.from_numpy(rows(8)["image"]), "label": torch.zeros(8, dtype=torch.long)}
    loop.reseed(1, 3)
    first, _ = loop.model_input(batch)
    torch.rand(5)  # anything drawn in between
    loop.generator.manual_seed(99)
    loop.reseed(1, 3)
    again, _ = loop.model_input(batch)
    loop.reseed(1, 4)
    other, _ = loop.model_input(batch)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_run_reports_every_epoch_with_a_checkpoint_and_the_first_batch_picture(tmp_path):
    loop = loop_for(directory=tmp_path)
    loop.run(ListShard(rows(24)), ListShard(rows(12, seed=1)))
    assert [m["epoch"] for m, _ in loop.reports] == [0, 1]
    for metrics, saved in loop.reports:
        assert set(metrics) == EPOCH_KEYS, set(metrics) ^ EPOCH_KEYS
        assert (metrics["train_images"], metrics["train_steps"], metrics["val_images"]) == (24, 3, 12)
        assert sum(saved["val_per_class"]["images"]) == 12
    assert set(loop.reports[0][1]["files"]) == {checkpoint.TRAIN_BATCH_FILE} and loop.reports[1][1]["files"] == {}
    state = checkpoint.load(tmp_path / "1")
    assert (state["epoch"], state["within_epoch"], state["classes"][:2]) == (1, None, ["n0", "n1"])
    resumed = loop_for()
    resumed.resume(state)
    assert resumed.start == checkpoint.Start(2)  # the run is over: nothing left to train


def test_compile_seconds_are_reported_for_the_first_epoch_of_a_compiled_run_only():
    loop = loop_for(dataclasses.replace(CFG, compile=True))
    val = loop.evaluate(ListShard(rows(8)).iter_torch_batches(batch_size=8, drop_last=False))
    metrics = []
    for epoch in (0, 1):
        stats = loop.train_one_epoch(epoch, ListShard(rows(16)).iter_torch_batches(batch_size=8, drop_last=True))
        metrics.append(loop.epoch_metrics(epoch, stats, val, lr=0.01))
    assert metrics[0]["compile_seconds"] > 0 and "compile_seconds" not in metrics[1]
    assert set(metrics[1]) == EPOCH_KEYS
