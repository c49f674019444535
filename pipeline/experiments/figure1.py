"""Figure 1 of the paper (§3.1), on the generated sample: ReLU against tanh in a four-layer CNN.

    run()     both networks, each at the best of a few learning rates, on the sample's training images
              at 32x32 (CIFAR-10's size); the training error over every tenth of an epoch; the epochs each
              needs to reach 25% training error, and their ratio beside the paper's ~6; a plot; all logged
              as one MLflow run

The paper: "A four-layer convolutional neural network with ReLUs (solid line) reaches a 25% training error
rate on CIFAR-10 six times faster than an equivalent network with tanh neurons (dashed line). The learning
rates for each network were chosen independently to make training as fast as possible. No regularization of
any kind was employed." The same here: no augmentation, dropout or weight decay; the learning rate of each
network is the one of LEARNING_RATES that reaches the threshold soonest; the same seed, so both start from
the same weights and see the images in the same order.

A plain loop in one process, not Ray: the whole data set is 2,600 images of 32x32, decoded once by the same
stages the pipeline uses (stages.center_crops); the experiment is about the nonlinearity, not the pipeline.
The sample's ten drawn patterns are not CIFAR-10: the ratio measured here is this data's, not the paper's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import sample, sources
from pipeline.models.alexnet import FourLayerCNN
from pipeline.tracking import pictures, recording, runs
from pipeline.transforms import device_stages, stages

SIZE = 32  # CIFAR-10's images
THRESHOLD = 25.0  # % training error, the paper's mark
PAPER_RATIO = 6.0  # tanh needs ~6x the epochs of ReLU (Figure 1)
LEARNING_RATES = (0.003, 0.01, 0.03)
BATCH = 128  # cuda-convnet's CIFAR-10 batch
WINDOWS = 10  # training error measured over each tenth of an epoch
EPOCHS = 8


def load_images(root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image of an ImageNet-layout folder as a normalised (N, 3, 32, 32) float tensor, and labels."""
    source = sources.open_source(root)
    images, labels = [], []
    for unit in range(sources.num_units(source, "train")):
        rows = sources.read_unit(source, "train", unit, seed=0, epoch=0, shuffle=False)
        out = stages.center_crops(rows, resize_size=SIZE, crop_size=SIZE)
        images.append(out["image"])
        labels.append(np.asarray(out["label"]))
    x = device_stages.normalize(device_stages.to_float(torch.from_numpy(np.concatenate(images))))
    return x, torch.from_numpy(np.concatenate(labels)).long()


def train_curve(
    x: torch.Tensor, y: torch.Tensor, *, activation: str, lr: float, epochs: int, seed: int = 0
) -> list[tuple[float, float]]:
    """[(epochs so far, training error % over the last tenth of an epoch)], as the batches pass."""
    torch.manual_seed(seed)
    model = FourLayerCNN(num_classes=int(y.max()) + 1, activation=activation)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    batch = min(BATCH, len(x))  # a data set smaller than a batch is one step
    steps = len(x) // batch
    window = max(1, steps // WINDOWS)
    curve, wrong, seen = [], 0, 0
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps):
            rows = order[step * batch : (step + 1) * batch]
            logits = model(x[rows])
            loss = F.cross_entropy(logits, y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            wrong += int((logits.argmax(1) != y[rows]).sum())
            seen += len(rows)
            if (step + 1) % window == 0 or step + 1 == steps:
                curve.append((epoch + (step + 1) / steps, 100.0 * wrong / seen))
                wrong = seen = 0
    return curve


def epochs_to(curve: list[tuple[float, float]], threshold: float = THRESHOLD) -> float | None:
    """The first point of the curve at or below the threshold, in epochs; None if never."""
    return next((at for at, error in curve if error <= threshold), None)


def run(
    *,
    root: str | None = None,
    epochs: int = EPOCHS,
    learning_rates=LEARNING_RATES,
    seed: int = 0,
    log_to_mlflow: bool = True,
    experiment: str = "alexnet-figure1",
) -> dict[str, Any]:
    """The experiment; returns the curves, the epochs to the threshold, the ratio, the text and the plot."""
    started = time.time()
    x, y = load_images(str(root or sample.ensure_sample_imagenet()))
    best: dict[str, dict[str, Any]] = {}
    for activation in ("relu", "tanh"):
        for lr in learning_rates:
            curve = train_curve(x, y, activation=activation, lr=lr, epochs=epochs, seed=seed)
            reached = epochs_to(curve)
            key = (reached is None, reached or 0.0, min(e for _, e in curve))  # soonest, else lowest error
            if activation not in best or key < best[activation]["key"]:
                best[activation] = {"lr": lr, "curve": curve, "epochs": reached, "key": key}
            print(
                f"[figure1] {activation} lr {lr:g}: {THRESHOLD:g}% training error "
                + (f"after {reached:.1f} epochs" if reached is not None else f"not reached in {epochs} epochs")
            )
    relu, tanh = best["relu"]["epochs"], best["tanh"]["epochs"]
    ratio = tanh / relu if relu and tanh else None
    text = (
        f"Figure 1 on the sample ({len(x)} training images at {SIZE}x{SIZE}): {THRESHOLD:g}% training error "
        f"after {_epochs(relu, epochs)} with ReLU (lr {best['relu']['lr']:g}) and {_epochs(tanh, epochs)} with "
        f"tanh (lr {best['tanh']['lr']:g}): "
        + (f"{ratio:.1f}x" if ratio else "no ratio (a network never got there)")
        + f"; the paper: ~{PAPER_RATIO:g}x on CIFAR-10. {time.time() - started:.0f} s."
    )

    plot = pictures.figure1_png(
        {a: best[a]["curve"] for a in best},
        threshold=THRESHOLD,
        labels={a: f"{a} (lr {best[a]['lr']:g})" for a in best},
        title=(
            f"ReLU vs tanh, four-layer CNN: ratio "
            f"{f'{ratio:.1f}x' if ratio else 'n/a'} here, ~{PAPER_RATIO:g}x in the paper"
        ),
    )
    result = {
        "epochs_to_threshold": {a: best[a]["epochs"] for a in best},
        "ratio": ratio,
        "learning_rates": {a: best[a]["lr"] for a in best},
        "curves": {a: best[a]["curve"] for a in best},
        "text": text,
        "png": plot,
        "images": len(x),
        "seconds": time.time() - started,
    }
    if log_to_mlflow:
        result["run_id"] = _log(result, experiment=experiment, epochs=epochs, learning_rates=learning_rates, seed=seed)
    return result


def _epochs(value: float | None, epochs: int) -> str:
    return f"{value:.1f} epochs" if value is not None else f"more than {epochs} epochs"


def _log(result: dict[str, Any], *, experiment: str, epochs: int, learning_rates, seed: int) -> str:
    import mlflow

    uri = runs.resolve_tracking_uri()
    recording.check_server(uri)
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(
        runs.ensure_experiment(experiment, uri),
        tags={"mlflow.runName": "figure 1: relu vs tanh", "git_sha": runs.git_sha()},
    ).info.run_id
    client.log_batch(
        run_id,
        params=[
            mlflow.entities.Param(k, str(v))
            for k, v in {
                "network": "four-layer CNN (conv 32-32-64 5x5, 3/2 max pool, fc)",
                "image_size": SIZE,
                "batch": BATCH,
                "epochs": epochs,
                "learning_rates": list(learning_rates),
                "seed": seed,
                "threshold": THRESHOLD,
                "paper_ratio": PAPER_RATIO,
                "train_images": result["images"],
            }.items()
        ],
    )
    now = int(time.time() * 1000)
    metrics = [
        mlflow.entities.Metric(f"train_error_{a}", error, now, i)
        for a, curve in result["curves"].items()
        for i, (_, error) in enumerate(curve)
    ]
    summary = {
        "paper_ratio": PAPER_RATIO,
        "seconds": result["seconds"],
        **{f"epochs_to_{THRESHOLD:g}_{a}": e for a, e in result["epochs_to_threshold"].items() if e},
        **({"ratio": result["ratio"]} if result["ratio"] else {}),
    }
    metrics += [mlflow.entities.Metric(k, float(v), now, 0) for k, v in summary.items()]
    client.log_batch(run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "figure1.png"
        path.write_bytes(result["png"])
        client.log_artifact(run_id, str(path))
    client.log_text(run_id, result["text"] + "\n", "figure1.md")
    client.set_terminated(run_id, "FINISHED")
    print(f"[figure1] MLflow run {run_id} at {uri}: figure1.png, figure1.md")
    return run_id
