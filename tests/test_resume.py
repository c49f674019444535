"""An exact mid-epoch resume: a train worker is SIGKILLed inside an epoch; Ray Train restarts the worker
group from the last --checkpoint-every-steps checkpoint, and the epoch goes on with exactly the images
it had not trained on. The run's --sample-log says what every step took."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import mlflow
import pytest
from test_failures import our_train_workers
from test_train_loop import RecordingLoop

from pipeline.config import PRESETS
from pipeline.train import driver

IMAGES, STEPS = 72, 9  # tiny_imagenet's train split; 72 = 9 steps of a global batch of 8: nothing left over


def tiny(tmp: Path, **changes):
    return dataclasses.replace(
        PRESETS["sample"],
        **{
            "width": 0.125,
            "resize_size": 80,
            "crop_size": 67,
            "epochs": 3,
            "batch_size": 8,
            "workers": 2,
            "checkpoint_every_steps": 2,
            "sample_log": str(tmp / "samples"),
            "storage_path": str(tmp / "ray_results"),
            **changes,
        },
    )


def steps_logged(folder: Path) -> list[dict]:
    return [json.loads(line) for path in folder.glob("rank0-*.jsonl") for line in path.read_text().splitlines()]


def kill_a_worker_inside_epoch(folder: Path, epoch: int, step: int, killed: list, timeout: float = 600) -> None:
    """SIGKILL one of our train workers once rank 0 has taken `step` of `epoch` (the checkpoints before
    that step have been reported by then: a checkpoint is taken before the step that follows it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("epoch") == epoch and r.get("step", -1) >= step for r in steps_logged(folder)):
            pids = our_train_workers()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.05)


def effective_steps(folder: Path) -> dict[int, dict[int, list[list[int]]]]:
    """rank -> epoch -> the images of each step the run kept: an attempt's steps up to where the next
    attempt resumed (what came after was lost with the worker), then the next attempt's."""
    kept: dict[int, dict[int, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
    for rank in (0, 1):
        attempts = [
            [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(folder.glob(f"rank{rank}-*.jsonl"), key=lambda p: int(p.name.split("-")[1]))
        ]
        for i, attempt in enumerate(attempts):
            until = tuple(attempts[i + 1][0]["start"]) if i + 1 < len(attempts) else (10**9, 0)
            for record in attempt[1:]:
                if (record["epoch"], record["step"]) < until:
                    kept[rank][record["epoch"]].append((record["step"], record["index"]))
    return {
        rank: {epoch: [ids for _, ids in sorted(steps)] for epoch, steps in epochs.items()}
        for rank, epochs in kept.items()
    }


def test_an_epoch_resumed_from_a_step_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """The worker's loop alone: checkpoints every 2 steps (never at the end), naming the images trained
    on; a fresh loop resumed from the step-4 checkpoint file (checkpoint.save, then load and resume, as
    a restarted worker does) ends the epoch with bit for bit the weights of the epoch that was never
    interrupted (dropout and lighting included), and counts the epoch's images and steps whole."""
    import numpy as np
    import torch

    from pipeline.models import checkpoint
    from pipeline.models.alexnet import build_model
    from pipeline.train import worker
    from pipeline.transforms.lighting import IMAGENET

    cfg = dataclasses.replace(
        PRESETS["sample"], batch_size=8, workers=1, dropout=0.5, lighting_std=0.1, checkpoint_every_steps=2
    )
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": torch.from_numpy(rng.integers(0, 256, (8, 67, 67, 3), dtype=np.uint8)),
            "label": torch.from_numpy(rng.integers(0, 3, 8)),
            "index": torch.arange(8 * i, 8 * i + 8),
        }
        for i in range(6)
    ]

    def loop(directory):
        torch.manual_seed(0)
        model = build_model("alexnet", num_classes=3, width=0.125, image_size=67, dropout=0.5, init="kaiming")
        return RecordingLoop(
            worker.LoopSettings(cfg, 3, IMAGENET), model, device=torch.device("cpu"), directory=directory
        )

    whole = loop(tmp_path / "whole")
    stats = whole.train_one_epoch(5, batches)
    # none at the end: the epoch's own follows
    assert [m["step"] for m, _ in whole.reports] == [2, 4] and stats.steps == 6
    at_4 = whole.reports[1][1]["within_epoch"]
    assert (at_4.epoch, at_4.sums[3], at_4.consumed.tolist()) == (5, 32, list(range(32)))  # 4 steps: images 0..31

    resumed = loop(tmp_path / "resumed")
    resumed.resume(checkpoint.load(tmp_path / "whole" / "1"))
    assert (resumed.start.epoch, resumed.start.step) == (5, 4)
    rest = resumed.train_one_epoch(5, batches[4:])
    assert rest.steps == 2 and resumed.reports == []  # no checkpoint again at the resume step
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    val = resumed.evaluate(batches[:1])
    metrics = resumed.epoch_metrics(5, rest, val, lr=cfg.lr)
    assert (metrics["train_images"], metrics["train_steps"]) == (48, 6)  # the steps before the restart count
    assert metrics["train_loss"] == pytest.approx(
        whole.epoch_metrics(5, stats, val, lr=cfg.lr)["train_loss"], rel=1e-12
    )  # the same losses, summed in another order


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_epoch_resumes_with_exactly_the_images_left(ray_session, tiny_imagenet, in_tmp_dir):
    cfg = tiny(in_tmp_dir, data=str(tiny_imagenet), max_failures=1, experiment="resume", registered_model="resume")
    samples = Path(cfg.sample_log)
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_inside_epoch, args=(samples, 1, 6, killed), daemon=True)
    killer.start()
    summary = driver.run(cfg)
    killer.join(timeout=5)
    assert killed, "no train worker was killed: the test did not exercise a failure"

    starts = [json.loads(p.read_text().splitlines()[0])["start"] for p in samples.glob("rank0-*.jsonl")]
    assert sorted(starts) == [[0, 0], sorted(starts)[1]] and sorted(starts)[1][0] == 1 and sorted(starts)[1][1] > 0, (
        f"the restart did not resume inside epoch 1: {starts}"
    )

    steps = effective_steps(samples)
    for epoch in range(cfg.epochs):
        per_rank = [steps[rank][epoch] for rank in (0, 1)]
        assert [len(s) for s in per_rank] == [STEPS, STEPS], (epoch, [len(s) for s in per_rank])
        images = Counter(i for s in per_rank for ids in s for i in ids)
        assert sorted(images) == list(range(IMAGES)) and set(images.values()) == {1}, epoch  # no gap, no repeat

    # What the failure cost (BENCHMARKS.md, "Faults"): the steps taken again, and the job's time.
    resumed_at = sorted(starts)[1][1]
    first_attempt = sorted(samples.glob("rank0-*.jsonl"), key=lambda p: int(p.name.split("-")[1]))[0]
    last = max(r["step"] for r in map(json.loads, first_attempt.read_text().splitlines()[1:]) if r["epoch"] == 1)
    print(
        f"\nkilled after step {last} of epoch 1, resumed at step {resumed_at}: {last + 1 - resumed_at} steps "
        f"taken again; job {summary['seconds']:.0f} s"
    )

    client = mlflow.MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    for name, expected in (("train_images", IMAGES), ("train_steps", STEPS)):  # as the uninterrupted run's
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert history == [(e, expected) for e in range(cfg.epochs)], (name, history)


def test_a_run_out_of_restarts_fails_saying_so(ray_session, tiny_imagenet, in_tmp_dir):
    cfg = tiny(
        in_tmp_dir,
        data=str(tiny_imagenet),
        epochs=1,
        max_failures=0,
        experiment="no-restarts",
        registered_model="no-restarts",
    )
    killed: list[int] = []
    killer = threading.Thread(target=kill_a_worker_inside_epoch, args=(Path(cfg.sample_log), 0, 3, killed), daemon=True)
    killer.start()
    with pytest.raises(Exception) as info:
        driver.run(cfg)
    killer.join(timeout=5)
    assert killed
    assert "--max-failures 0" in str(info.value), str(info.value)[:2000]
    client = mlflow.MlflowClient(f"sqlite:///{in_tmp_dir / 'mlflow.db'}")  # the default store, in the cwd
    (run,) = client.search_runs([client.get_experiment_by_name("no-restarts").experiment_id])
    assert run.info.status == "FAILED" and "--max-failures 0" in run.data.tags["error"]
