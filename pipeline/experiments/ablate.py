"""The paper's claims as experiments: a baseline and one training run per switched design choice, compared.

    plan(cfg, grid)            the baseline (cfg as given) and one run per entry of `grid`, each a dict of
                               switches ({"activation": "tanh"}); default_grid(cfg) flips every switch once
    run(cfg, grid, ...)        every run through driver.run (the training job itself) on the same data, seed
                               and budget, each an MLflow run tagged with its ablation under one parent run,
                               none registered; then the comparison table, printed and logged on the parent
    summarise(...)             one row of the table from a run's per-epoch metrics

The table, per run: final val top-1 / top-5 and the change from the baseline, final train top-1 and the
train-vs-val gap (overfitting: §4.1 and §4.2 argue augmentation and dropout shrink it), and how soon the
training error fell to a threshold (default 25%, Figure 1's): in epochs, and in seconds of training passes
(epoch_seconds summed; validation excluded). Train top-1 is measured during each epoch's training pass, on
augmented crops with dropout on, as the paper's training error is.

Runs are independent Ray Train jobs: --parallel N runs N at once on the cluster, each planning its workers'
CPUs on what is free when it starts (cluster.worker_resources), so that every run's Ray Data keeps a CPU. On a
private local Ray the instance is started with a logical CPU for every train worker of the N runs.

What the switches claim (the paper's numbers are ImageNet's; README says what the sample can show):
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pipeline import cluster, config
from pipeline.config import SWITCHES, Config
from pipeline.data import storage
from pipeline.tracking import recording
from pipeline.tracking import runs as tracking
from pipeline.train import driver

CLAIMS = {
    "activation": "§3.1: ReLU trains several times faster than tanh (Figure 1: 6x to 25% training error)",
    "lrn": "§3.3: response normalisation lowers top-1 / top-5 error by 1.4% / 1.2%",
    "pool": "§3.4: overlapping pooling lowers top-1 / top-5 error by 0.4% / 0.3% and overfits less",
    "lighting": "§4.1: PCA lighting lowers top-1 error by over 1%",
    "augment": "§4.1: without crops and reflections the network overfits substantially",
    "dropout": "§4.2: without dropout the network overfits substantially",
    "init": "§5: N(0, 0.01) weights, biases of 1 (later work: He / Glorot init)",
    "init_bias": "§5: biases of 1 speed up early learning (Caffe's reference model: 0.1)",
}
__doc__ += "".join(f"    {name:<11}{claim}\n" for name, claim in CLAIMS.items())

BASELINE = "baseline"
TRAIN_ERROR_THRESHOLD = 25.0  # %, Figure 1's


@dataclass(frozen=True)
class Ablation:
    label: str  # "baseline", or the switches as "activation=tanh, lrn=off"
    choices: dict[str, Any]  # the switches set otherwise than the baseline
    cfg: Config


def parse_grid_entry(text: str) -> dict[str, str]:
    """ "activation=tanh,lrn=off" -> {"activation": "tanh", "lrn": "off"}: one run with both switched."""
    choices = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise ValueError(
                f"--ablate {text!r}: expected switch=value[,switch=value...], e.g. activation=tanh; "
                f"the switches are {', '.join(SWITCHES)}"
            )
        choices[name.strip().replace("-", "_")] = value.strip()
    if not choices:
        raise ValueError(f"--ablate {text!r} names no switch")
    return choices


def default_grid(cfg: Config) -> list[dict[str, str]]:
    """Every switch flipped once from the baseline: each other value of a choice switch, dropout 0 (or 0.5
    when the baseline has none), and Caffe's bias of 0.1 where the baseline uses the paper's init."""
    base = config.switches(cfg)
    grid = []
    for name, values in SWITCHES.items():
        if name == "dropout":
            grid.append({name: "0" if cfg.dropout > 0 else "0.5"})
        elif name == "init_bias":
            if cfg.init == "paper":
                grid.append({name: "0.1" if cfg.init_bias == 1.0 else "1"})
        else:
            grid += [{name: value} for value in values if value != base[name]]
    if cfg.model != "alexnet":  # the torchvision variant has no model switches
        grid = [g for g in grid if set(g) <= {"dropout", "lighting", "augment"}]
    return grid


def plan(cfg: Config, grid: Sequence[dict[str, str]]) -> list[Ablation]:
    """The baseline and one run per grid entry, every config built (and so checked) before anything runs."""
    ablations = [Ablation(BASELINE, {}, cfg)]
    base = config.switches(cfg)
    for choices in grid:
        try:
            switched = config.with_switches(cfg, choices)
        except ValueError as e:
            raise ValueError(f"--ablate {config.describe(choices)}: {e}") from None
        changed = {k: v for k, v in config.switches(switched).items() if v != base[k]}
        if not changed:
            raise ValueError(
                f"--ablate {config.describe(choices)} is the baseline's own choice: it would train the baseline again"
            )
        label = config.describe(changed)
        if label in {r.label for r in ablations}:
            raise ValueError(f"--ablate {label} is given twice")
        ablations.append(Ablation(label, changed, switched))
    return ablations


def slug(label: str) -> str:
    """An MLflow metric-name prefix for a run: "activation=tanh, lrn=off" -> "activation_tanh_lrn_off"."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_")


def summarise(
    label: str,
    history: dict[str, dict[int, float]],
    *,
    threshold: float,
    seconds: float | None,
    baseline_top1: float | None = None,
) -> dict[str, Any]:
    """One row of the table from a run's per-epoch metrics ({metric: {epoch: value}})."""
    epochs = sorted(history["val_top1"])
    last = epochs[-1]
    reached = next((e for e in epochs if 100.0 - history["train_top1"][e] <= threshold), None)
    row = {
        "run": label,
        "epochs": len(epochs),
        "val_top1": history["val_top1"][last],
        "val_top5": history["val_top5"][last],
        "train_top1": history["train_top1"][last],
        "gap": history["train_top1"][last] - history["val_top1"][last],
        "epochs_to_threshold": None if reached is None else reached + 1,
        "train_seconds_to_threshold": None
        if reached is None
        else sum(history["epoch_seconds"][e] for e in epochs if e <= reached),
        "run_seconds": seconds,
    }
    row["delta_top1"] = None if baseline_top1 is None else row["val_top1"] - baseline_top1
    return row


def table(rows: Sequence[dict[str, Any]], threshold: float) -> str:
    """The comparison as a Markdown table (it reads as plain text too)."""

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    head = (
        f"| run | val top-1 % | vs baseline | val top-5 % | train top-1 % | train-val gap | "
        f"epochs to {threshold:g}% train error | train s to it | run s |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['run']} | failed: {r['error']} |" + " |" * 7)
            continue
        reached = num(r["epochs_to_threshold"], "d") if r["epochs_to_threshold"] else f"not in {r['epochs']}"
        lines.append(
            f"| {r['run']} | {r['val_top1']:.1f} | {num(r['delta_top1'], '+.1f')} | {r['val_top5']:.1f} | "
            f"{r['train_top1']:.1f} | {r['gap']:+.1f} | {reached} | "
            f"{num(r['train_seconds_to_threshold'], '.0f')} | {num(r['run_seconds'], '.0f')} |"
        )
    return "\n".join(lines)


HISTORY = ("val_top1", "val_top5", "train_top1", "epoch_seconds")


def history_of(client, run_id: str) -> dict[str, dict[int, float]]:
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in HISTORY}


@dataclass
class Result:
    parent_run_id: str
    rows: list[dict[str, Any]]
    table: str
    runs: dict[str, str] = field(default_factory=dict)  # label -> MLflow run id
    seconds: float = 0.0


def run(
    cfg: Config,
    grid: Sequence[dict[str, str]] | None = None,
    *,
    parallel: int = 1,
    threshold: float = TRAIN_ERROR_THRESHOLD,
    train: Callable[..., dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> Result:
    """Train the baseline and every ablation of `grid` (default_grid when None), `parallel` at a time;
    returns the table and where it was logged. A run that fails is a row saying so; the others go on."""
    import mlflow

    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    if not 0 < threshold < 100:
        raise ValueError(f"--train-error must be in (0, 100) %, got {threshold}")
    train = train or driver.run
    ablations = plan(cfg, default_grid(cfg) if grid is None else grid)
    tracking_uri = tracking.resolve_tracking_uri()
    recording.check_server(tracking_uri)
    # Every run would fail on a data or checkpoint place that is not there, each as a row of the table:
    # refused here instead, in seconds, before the parent run and Ray.
    endpoint = cfg.s3_endpoint or None
    storage.check_location(cfg.data, "dataset path", endpoint=endpoint, must_exist=True)
    storage.check_location(cfg.storage_path, "--storage-path", endpoint=endpoint)
    started = time.time()
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = tracking.ensure_experiment(cfg.experiment, tracking_uri)
    parent = client.create_run(
        experiment_id,
        tags={
            "mlflow.runName": f"ablation of {len(ablations) - 1} switches",
            "ablation": "parent",
            "preset": cfg.preset,
            "git_sha": tracking.git_sha(),
        },
    ).info.run_id
    client.log_batch(
        parent,
        params=[
            mlflow.entities.Param(k, str(v)[:6000])
            for k, v in {
                **cfg.to_dict(),
                "ablations": json.dumps([r.label for r in ablations[1:]]),
                "parallel": parallel,
                "train_error_threshold": threshold,
            }.items()
        ],
    )
    log(
        f"[ablate] {len(ablations)} runs ({', '.join(r.label for r in ablations)}), {parallel} at a time; "
        f"MLflow parent run {parent}"
    )
    # Before the first run: a private local Ray gets a logical CPU for every train worker of `parallel` runs.
    cluster.connect_ray(train_workers=parallel * cfg.workers, address=cfg.address)

    def one(ablation: Ablation) -> dict[str, Any]:
        tags = {
            "mlflow.parentRunId": parent,
            "mlflow.runName": ablation.label,
            "ablation": ablation.label,
            **{f"ablation.{k}": str(v) for k, v in ablation.choices.items()},
        }
        try:
            summary = train(ablation.cfg, tags=tags, register=False)
        except driver.RunInterrupted:
            raise
        except Exception as e:  # noqa: BLE001 - recorded in the table and the parent; the other runs go on
            log(f"[ablate] {ablation.label}: FAILED: {type(e).__name__}: {e}")
            return {"run": ablation.label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        return {"run": ablation.label, "run_id": summary["run_id"], "seconds": summary["seconds"]}

    status = "FAILED"
    try:
        if parallel == 1:
            done = [one(a) for a in ablations]  # in this thread: Ctrl-C and SIGTERM stop the run as the train job's do
        else:
            # Only the main thread receives Ctrl-C: it cancels the runs not yet started, and the running ones
            # (whose fit() has no signal handler off the main thread) finish before the parent is marked KILLED.
            pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="ablation")
            try:
                done = list(pool.map(one, ablations))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        rows, ids = [], {}
        baseline_top1 = None
        for ablation, outcome in zip(ablations, done):
            if "error" in outcome:
                rows.append(outcome)
                continue
            ids[ablation.label] = outcome["run_id"]
            row = summarise(
                ablation.label,
                history_of(client, outcome["run_id"]),
                threshold=threshold,
                seconds=outcome["seconds"],
                baseline_top1=baseline_top1,
            )
            if ablation.label == BASELINE:
                baseline_top1 = row["val_top1"]
                row["delta_top1"] = 0.0
            rows.append(row)
        text = table(rows, threshold)
        claims = "\n".join(
            f"- {name}: {CLAIMS[name]}" for name in SWITCHES if any(name in r.choices for r in ablations[1:])
        )
        report = (
            f"Ablation of the {cfg.preset} preset on {cfg.data or 'the generated sample'}: seed {cfg.seed}, "
            f"{cfg.epochs} epochs each; run ids in ablation.json.\n\n{text}\n\nThe paper's claims:\n{claims}\n"
        )
        client.log_text(parent, report, "ablation.md")
        client.log_text(
            parent, json.dumps({"rows": rows, "runs": ids, "threshold": threshold}, indent=2), "ablation.json"
        )
        now = int(time.time() * 1000)
        metrics = [
            mlflow.entities.Metric(f"{slug(r['run'])}.{key}", float(r[key]), now, 0)
            for r in rows
            if "error" not in r
            for key in (
                "val_top1",
                "val_top5",
                "train_top1",
                "gap",
                "delta_top1",
                "epochs_to_threshold",
                "train_seconds_to_threshold",
            )
            if r[key] is not None
        ]
        for start in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
            client.log_batch(parent, metrics=metrics[start : start + 900])
        failed = [r["run"] for r in rows if "error" in r]
        status = "FAILED" if failed else "FINISHED"
        if failed:
            client.set_tag(parent, "failed_runs", ", ".join(failed))
        log(f"\n{text}\n")
        return Result(parent, rows, text, ids, time.time() - started)
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """jobs/ablate.py's flags: the training job's (the baseline's config) and the `ablation` group. Returns them
    with .cfg, the baseline's Config, and .grid, the runs to compare with it (None: default_grid), every run's
    config already built, so that a bad --ablate is refused before anything starts. Exits 2 naming bad input."""
    parser = config.build_parser(
        description="Trains a baseline (the training flags as given) and one run per --ablate (default: every "
        "switch flipped once), on the same data, seed and budget, as child MLflow runs of one parent; "
        "nothing is registered. Ends with a table of final top-1 / top-5, the gap between train and val "
        "top-1, and the epochs and training seconds until the training error fell to --train-error. "
        "--figure1 reproduces the paper's Figure 1 (ReLU against tanh, four-layer CNN) on the sample.",
        usage="%(prog)s [--ablate SWITCH=VALUE[,SWITCH=VALUE...]]... [--parallel N] [--train-error PERCENT] "
        "[training flags...]\n       %(prog)s --figure1 [--figure1-epochs N]",
    )
    switches = ", ".join(f"{k}={'|'.join(v) if isinstance(v, tuple) else 'NUMBER'}" for k, v in SWITCHES.items())
    group = parser.add_argument_group("ablation", f"switches: {switches}")
    group.add_argument(
        "--ablate",
        action="append",
        default=None,
        metavar="SWITCH=VALUE[,SWITCH=VALUE...]",
        help="one run with these switches set (repeat for more runs); default: every switch flipped once",
    )
    group.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once on the cluster")
    group.add_argument(
        "--train-error",
        type=float,
        default=TRAIN_ERROR_THRESHOLD,
        metavar="PERCENT",
        help="the training error whose epochs and seconds to reach the table compares",
    )
    group.add_argument("--figure1", action="store_true", help="Figure 1 on the sample instead; takes no training flags")
    group.add_argument("--figure1-epochs", type=int, default=None, metavar="N", help="epochs of each --figure1 run")
    args = parser.parse_args(argv)
    training = [
        f"--{name.replace('_', '-')}"
        for name in vars(args)
        if name in {f.name for f in dataclasses.fields(Config)} | {config.LIGHTING_FLAG}
    ]
    if args.figure1 and (training or args.ablate):
        parser.error(
            f"--figure1 takes no training flags (only --figure1-epochs); got "
            f"{' '.join(training + ['--ablate'] * bool(args.ablate))}"
        )
    try:
        args.cfg = config.from_namespace(args)
        args.grid = None if args.ablate is None else [parse_grid_entry(text) for text in args.ablate]
        if not args.figure1:
            plan(args.cfg, default_grid(args.cfg) if args.grid is None else args.grid)
    except ValueError as e:
        parser.error(str(e))
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    if not 0 < args.train_error < 100:
        parser.error(f"--train-error must be in (0, 100) %, got {args.train_error}")
    return args
