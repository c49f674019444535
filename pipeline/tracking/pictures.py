"""Pictures of a training run, where people would rather look than read; each function returns PNG bytes.

    model_inputs_png(x)             the first training batch exactly as the model received it (crop, flip,
                                    §4.1 lighting), de-normalised for viewing           (drawn on the worker)
    curves_png(history)             loss and top-1 / top-5 per epoch, train and val
    per_class_png(correct, images)  val top-1 per class, sorted, the best and worst named
    conv1_png(weight)               the conv1 kernels, one tile each, tower 0 above tower 1 (§6.1, Figure 3)
    figure1_png(curves)             training error against epochs, ReLU solid and tanh dashed (§3.1, Figure 1)

Image grids are drawn with NumPy and PIL (the workers import this module); the plots use matplotlib,
imported only when a plot is drawn, on its non-interactive Agg canvas.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pipeline.transforms.constants import IMAGENET_MEAN, IMAGENET_STD

TOWERS = 2  # model.TOWERS, repeated so that the workers' import of this module stays free of torch


def png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def grid(tiles: np.ndarray, *, columns: int, gap: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """(N, H, W, 3) uint8 tiles -> one (H', W', 3) image, row by row, `gap` pixels apart, each tile
    enlarged `scale` times by repeating pixels (small kernels stay visible, unblurred)."""
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = tiles.shape
    rows = math.ceil(n / columns)
    out = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = tile
    return out


def model_inputs_png(
    x: Any, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, columns: int = 8
) -> bytes:
    """(N, 3, H, W) normalised model inputs -> a grid of what they show: x * std + mean, clipped to [0, 1].
    The lighting shift stays in (it was added before the normalisation), so this is the model's view."""
    x = np.asarray(x, dtype=np.float32)
    pixels = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    tiles = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)  # (N, H, W, 3)
    return png(grid(tiles, columns=min(columns, len(tiles))))


def conv1_png(weight: Any, *, towers: int = TOWERS, scale: int = 4) -> bytes:
    """(K, 3, k, k) conv1 kernels -> §6.1's Figure 3: each kernel scaled to [0, 1] on its own; with two
    towers (the paper's network), tower 0's kernels in the upper rows and tower 1's below, as the
    paper's two GPUs learned them. towers=1 for the torchvision variant, which has none."""
    w = np.asarray(weight, dtype=np.float32)
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    tiles = ((w - lo) / np.maximum(hi - lo, 1e-12) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    per_tower = len(tiles) // towers
    columns = min(16, per_tower)
    blocks = [
        grid(tiles[t * per_tower : (t + 1) * per_tower], columns=columns, scale=scale, background=0)
        for t in range(towers)
    ]
    spacer = np.full((scale * 2, blocks[0].shape[1], 3), 255, np.uint8)  # a white band between the towers
    return png(np.concatenate([part for block in blocks for part in (block, spacer)][:-1]))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_of(figure) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def curves_png(history: Sequence[dict[str, float]]) -> bytes:
    """Per-epoch metrics (dicts with epoch, train_loss, val_loss, train_top1, val_top1, val_top5) -> loss
    on the left, accuracy in percent on the right."""
    epochs = [m["epoch"] + 1 for m in history]
    figure = _figure(10, 4)
    loss, accuracy = figure.subplots(1, 2)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        loss.plot(epochs, [m[key] for m in history], style, label=key.replace("_", " "))
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for key, style in (("train_top1", "-o"), ("val_top1", "-s"), ("val_top5", "-^")):
        accuracy.plot(epochs, [m[key] for m in history], style, label=key.replace("_", " "))
    accuracy.set(xlabel="epoch", ylabel="%", title="accuracy", ylim=(0, 100))
    from matplotlib.ticker import MaxNLocator

    for axes in (loss, accuracy):
        axes.legend()
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    return _png_of(figure)


def class_accuracy(
    correct: Sequence[int], images: Sequence[int], names: Sequence[str], named: int = 5
) -> dict[str, Any]:
    """Per-class val top-1 (percent) and the `named` best and worst classes, as a table to log beside
    the picture: {"classes": [{name, correct, images, top1}], "best": [...], "worst": [...]}."""
    rows = [
        {"name": name, "correct": int(c), "images": int(n), "top1": 100.0 * c / n if n else None}
        for name, c, n in zip(names, correct, images, strict=True)
    ]
    ranked = sorted((r for r in rows if r["images"]), key=lambda r: (-r["top1"], r["name"]))
    named = min(named, len(ranked) // 2) or min(1, len(ranked))
    return {"classes": rows, "best": ranked[:named], "worst": ranked[::-1][:named]}


def per_class_png(table: dict[str, Any], *, title: str = "") -> bytes:
    """class_accuracy's table -> the classes' top-1 sorted from best to worst, best and worst named."""
    ranked = sorted((r for r in table["classes"] if r["images"]), key=lambda r: (-r["top1"], r["name"]))
    figure = _figure(10, 4.5)
    axes = figure.subplots()
    # A white edge tells a few classes apart; at ImageNet's 1000 bars it would hide them.
    axes.bar(
        range(len(ranked)),
        [r["top1"] for r in ranked],
        width=1.0,
        color="tab:blue",
        edgecolor="white" if len(ranked) <= 100 else "none",
    )
    axes.set(
        xlabel=f"{len(ranked)} classes, best to worst",
        ylabel="val top-1 %",
        ylim=(0, 105),
        title=title or "validation top-1 per class",
    )
    best = ", ".join(f"{r['name']} {r['top1']:.0f}%" for r in table["best"])
    worst = ", ".join(f"{r['name']} {r['top1']:.0f}%" for r in table["worst"])
    axes.text(
        0.01,
        0.02,
        f"best: {best}\nworst: {worst}",
        transform=axes.transAxes,
        fontsize=9,
        verticalalignment="bottom",
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"},
    )
    return _png_of(figure)


def figure1_png(
    curves: dict[str, Sequence[tuple[float, float]]], *, threshold: float, labels: dict[str, str], title: str
) -> bytes:
    """{activation: [(epochs, training error %)]} -> the paper's Figure 1: ReLU solid, tanh dashed, the
    threshold as a dotted line, and where each curve first reaches it."""
    figure = _figure(7, 4.5)
    axes = figure.subplots()
    for activation, curve in curves.items():
        at, error = zip(*curve)
        style = "-" if activation == "relu" else "--"
        (line,) = axes.plot(at, error, style, label=labels.get(activation, activation))
        reached = next((a for a, e in curve if e <= threshold), None)
        if reached is not None:
            axes.axvline(reached, color=line.get_color(), alpha=0.4, linewidth=1)
    axes.axhline(threshold, color="black", linestyle=":", linewidth=1, label=f"{threshold:g}% training error")
    axes.set(xlabel="epochs", ylabel="training error rate %", ylim=(0, 100), title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    return _png_of(figure)
