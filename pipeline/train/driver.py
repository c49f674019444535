"""The driver side of a training run: data -> Ray -> trainer -> MLflow -> registry.

`run(cfg)` is everything `python jobs/train.py` does, importable and testable:

    1. ask the tracking server whether it is there; resolve the data (generate the cached sample when --data
       is empty with --preset sample) and fail fast on a bad path or data too small for one step
    2. join the Ray cluster the user points at (--address, RAY_ADDRESS, `ray job submit`), or start a
       private local one; plan the workers' CPUs on what is free, so the job cannot deadlock; refuse
       workers no node can hold (GPUs on a machine without, a --train-resource nobody offers) unless an
       autoscaler can add such nodes
    3. build the Ray Data plans and a TorchTrainer whose MLflowCallback hands every epoch to the Recorder,
       which delivers it to MLflow (and keeps it while the server is down)
    4. fit, wait for the records, register the run's best model (registry.py), close the MLflow run, say
       where the model went

The run's status is never left wrong: FINISHED after a complete run, KILLED after Ctrl-C or SIGTERM
(Ray Train aborts the workers gracefully either way), FAILED with the error after a crash. Only a
finished run registers a model.

Logs: on a terminal Ray Data draws its progress bars; off one (CI, `ray job logs`, a redirected
file) the bars are off, and rank 0 prints a progress line every PROGRESS_INTERVAL_S and one per epoch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import cluster, config, data
from pipeline.config import Config
from pipeline.data import sample
from pipeline.models import checkpoint
from pipeline.tracking import recording, registry, runs
from pipeline.train.worker import LoopSettings, train_loop_per_worker
from pipeline.transforms.lighting import IMAGENET as IMAGENET_LIGHTING
from pipeline.transforms.lighting import Lighting


def resolve_data(cfg: Config) -> data.Source:
    """The dataset the run trains on; the generated sample when --data is empty with --preset sample."""
    if not cfg.data and cfg.preset != "sample":
        # An unset $DATA would otherwise train the paper's network for 90 epochs on ten drawn patterns.
        raise ValueError(
            f"--data is empty: --preset {cfg.preset} needs a dataset (a folder in ImageNet layout, "
            f"prepared shards, s3://...); the generated sample is the default of --preset sample only"
        )
    uri = cfg.data or str(sample.ensure_sample_imagenet())
    source = data.open_source(uri, num_classes=cfg.num_classes, manifest_sha256=cfg.manifest_sha256)
    for path in source.ignored:
        print(f"[data] not read (not part of the {source.kind} layout): {path}", file=sys.stderr)
    return source


def check_enough_data(cfg: Config, source: data.Source) -> None:
    """Refuse, before anything starts, data too small for one training step. Every worker takes whole
    batches (the last partial one is dropped, so that DDP's workers take the same steps); without this
    each epoch would train on nothing and the run fail after its restarts, minutes later."""
    train, val = source.images.get("train"), source.images.get("val")
    if train is not None and train < cfg.batch_size:
        raise ValueError(
            f"{source.uri} has {train} train images, fewer than one step takes: --workers {cfg.workers} x "
            f"{cfg.worker_batch_size} images (--batch-size {cfg.batch_size}). Use a smaller --batch-size or more data"
        )
    if val == 0:
        raise ValueError(f"{source.uri} has no val images: validation, the schedule and the registry need some")


def storage_path(cfg: Config) -> str:
    if cfg.storage_path:
        return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    return str(Path("ray_results").resolve())


# Seconds between progress lines when the output is not a terminal: ~60 lines an hour.
PROGRESS_INTERVAL_S = 60.0


class TrainingFailed(RuntimeError):
    """The worker group failed more often than --max-failures allows; the message ends with the last error."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; its MLflow run is marked KILLED."""

    def __init__(self, signal_name: str, run_id: str):
        super().__init__(f"{signal_name}: MLflow run {run_id} marked KILLED")
        self.signal_name, self.run_id = signal_name, run_id

    @property
    def exit_code(self) -> int:  # the shell's convention: 128 + the signal's number
        return 128 + (signal.SIGTERM if self.signal_name == "SIGTERM" else signal.SIGINT)


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[str]]:
    """SIGTERM (`kill`, a scheduler stopping the job) takes the path Ctrl-C takes: during fit() Ray Train's
    SIGINT handler, which aborts the workers gracefully; elsewhere KeyboardInterrupt. Python's default
    for SIGTERM is to die on the spot, which would leave the MLflow run RUNNING. Yields the list of
    signals caught this way; restores both handlers on the way out."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield caught
        return

    def on_sigterm(signum, frame):
        caught.append("SIGTERM")
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    # fit() installs Ray Train's SIGINT handler and leaves it there: both go back as they were.
    previous = {
        signal.SIGINT: signal.getsignal(signal.SIGINT),
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
    }
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def class_words(cfg: Config, source: data.Source) -> list[str]:
    """A readable name per class: the sample's drawn patterns; none for other data (ImageNet's words are
    in the devkit's meta.mat, which the shards' manifest does not carry yet)."""
    if not cfg.data:
        return list(sample.PATTERNS[: source.num_classes])
    return []


def run(
    cfg: Config, callbacks: Sequence[Any] = (), *, tags: dict[str, str] | None = None, register: bool = True
) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics, where they were recorded and where the model went.

    callbacks: extra ray.train.UserCallback instances, beside the MLflow one.
    tags: extra tags on the MLflow run (an ablation's parent run and switches, ablate.py).
    register: False registers nothing (ablation runs: an experiment must never take `champion`).
    """
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    started = time.time()
    tracking_uri_from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # before MLflow sets it for its children
    tracking_uri = runs.resolve_tracking_uri()
    recording.check_server(tracking_uri)  # first: a dead server is answered in one line, before anything starts
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint  # read here, and forwarded to every Ray task
    source = resolve_data(cfg)
    check_enough_data(cfg, source)
    counts = " / ".join(f"{source.images.get(s) or '?'} {s}" for s in data.SPLITS)
    print(f"[data] {source.uri}: {source.kind}, {counts} images, {source.num_classes} classes")
    lighting = Lighting.from_dict(source.lighting) if source.lighting else IMAGENET_LIGHTING
    model_name = registry.model_name(cfg.registered_model, sample=not cfg.data)

    # Off a terminal every redraw of a progress bar is a new line (a default run wrote 350 KB of them).
    interactive = sys.stdout.isatty()
    if not interactive:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # forwarded to Ray's processes
    cluster.connect_ray(train_workers=cfg.workers, address=cfg.address)
    resources = cluster.worker_resources(
        cfg, ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU")
    )
    cluster.check_placeable(cfg, resources)  # else a request no node can hold waits in fit() forever
    # The datasets copy this context when they are built, and Ray Train's SplitCoordinator actors, which
    # execute them in other processes, run with that copy: setting it here reaches them.
    DataContext.get_current().enable_progress_bars = interactive

    data_fingerprint = source.fingerprint
    run_info = runs.start_run(
        cfg,
        tracking_uri=tracking_uri,
        params={
            "data_resolved": source.uri,
            "data_kind": source.kind,
            "num_classes": source.num_classes,
            "train_images": source.images.get("train"),
            "val_images": source.images.get("val"),
            "data_fingerprint": data_fingerprint,
            "lighting_source": lighting.source,
            "worker_batch_size": cfg.worker_batch_size,
            "resources_per_worker": resources,
            "registered_model_resolved": model_name,
        },
        tags={"data_fingerprint": data_fingerprint, **(tags or {})},
    )
    run_id = run_info.run_id
    print(f"[mlflow] run {run_id} in experiment {cfg.experiment!r} at {tracking_uri}")

    recorder = None
    storage = storage_path(cfg)
    with sigterm_as_interrupt() as caught:
        try:
            report = data.ReadReport.remote()
            resume_point = data.ResumePoint.remote()
            recorder = recording.start_recorder(
                tracking_uri=tracking_uri,
                run_id=run_id,
                data_uri=source.uri,
                data_fingerprint=data_fingerprint,
                decode_failures=report,
            )
            callback = runs.MLflowCallback(recorder, epochs=cfg.epochs, log_models=cfg.log_models)
            settings = LoopSettings(
                config=cfg,
                num_classes=source.num_classes,
                lighting=lighting,
                classes=tuple(source.wnids),
                words=tuple(class_words(cfg, source)),
                train_images=source.images.get("train"),
                progress_interval_s=0.0 if interactive else PROGRESS_INTERVAL_S,
                read_report=report,
                resume_point=resume_point,
            )
            trainer = TorchTrainer(
                train_loop_per_worker,
                # A dict: Ray Train's run state checks for one (and shows its values, as text, on the dashboard).
                train_loop_config={"settings": settings},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.workers,
                    use_gpu=cfg.use_gpu,
                    resources_per_worker=resources,
                    placement_strategy=cfg.worker_strategy,
                ),
                datasets={
                    "train": data.train_dataset(source, cfg, report),
                    "val": data.val_dataset(source, cfg, report),
                },
                dataset_config=data.TrainValDataConfig(
                    execution_options=data.execution_options(cfg), resume_point=resume_point
                ),
                run_config=ray.train.RunConfig(
                    name=f"alexnet-{run_id[:12]}",
                    storage_path=storage,
                    failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=checkpoint.keep_policy(cfg.keep_checkpoints),
                    callbacks=[callback, *callbacks],  # type: ignore[list-item]  # a Train V2 UserCallback
                ),
            )
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                restarts = "no restarts" if cfg.max_failures == 0 else f"all {cfg.max_failures} restarts used"
                raise TrainingFailed(
                    f"training failed, {restarts} (--max-failures {cfg.max_failures}); the last attempt ended with: {e}"
                ) from e
            delivery = recording.wait_for_records(
                recorder, tracking_uri, recording.TRACKING_WAIT_S, checkpoints=result.path
            )
            if register:
                registration = registry.register_best(
                    tracking_uri=tracking_uri,
                    run_id=run_id,
                    name=model_name,
                    lineage={
                        "git_sha": runs.git_sha(),
                        "data_uri": source.uri,
                        "data_fingerprint": data_fingerprint,
                        "data_kind": source.kind,
                        "preset": cfg.preset,
                        "val_images": source.images.get("val"),
                        "switches": config.describe(config.switched(cfg)) or "none",
                    },
                )
            else:
                registration = registry.Registration(
                    model_name, None, False, "nothing registered: not asked to (an ablation run)"
                )
            assert result.metrics is not None  # fit() returned: the last epoch reported
            final = {k: result.metrics[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss")}
            runs.finish_run(
                tracking_uri,
                run_id,
                "FINISHED",
                {
                    "final_val_top1": final["val_top1"],
                    "final_val_top5": final["val_top5"],
                    "registered": registration.uri or "nothing",
                    "registration": registration.message,
                    **runs.delivery_tags(delivery),
                },
            )
        except recording.RecordsNotDelivered:
            recording.abandon_run()
            raise
        except BaseException as e:
            # Ray Train answers Ctrl-C (and SIGTERM, above) by aborting the workers and leaving fit() with
            # SystemExit; anywhere else it is KeyboardInterrupt.
            if caught or isinstance(e, (KeyboardInterrupt, SystemExit)):
                name = caught[0] if caught else "SIGINT"
                runs.close_unfinished_run(recorder, tracking_uri, run_id, "KILLED", {"stopped_by": name}, storage)
                raise RunInterrupted(name, run_id) from None
            runs.close_unfinished_run(
                recorder, tracking_uri, run_id, "FAILED", {"error": f"{type(e).__name__}: {e}"}, storage
            )
            raise

    return {
        **final,
        "runs.best_val_top1": runs.best_val_top1(tracking_uri, run_id),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "url": runs.run_url(tracking_uri, run_id, run_info.experiment_id),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": time.time() - started,
        "decode_failures": len(ray.get(report.get.remote())),  # in MLflow already: logged every epoch
        "data": cfg.data,
        "tracking_uri_from_env": tracking_uri_from_env,
        "registered_model": model_name,
        "registration": registration,
        "tracking": delivery,
    }


def where_it_went(summary: dict[str, Any]) -> str:
    """The job's last lines: the result, the MLflow run, the registered model and how to use it."""
    registration = summary["registration"]
    lines = [
        f"\nfinal val top-1 {summary['val_top1']:.1f}%  top-5 {summary['val_top5']:.1f}%  "
        f"(best top-1 {summary['runs.best_val_top1']:.1f}%) in {summary['seconds']:.0f} s",
    ]
    delivery = summary.get("tracking") or {}
    if delivery.get("retries"):
        lines.append(
            f"tracking: {summary['tracking_uri']} was down (longest {delivery['outage_s']:.0f} s); "
            f"training went on and the records were delivered when it answered again"
        )
    if delivery.get("undelivered"):
        lines.append(f"tracking: NOT delivered (tag 'undelivered' on the run): {'; '.join(delivery['undelivered'])}")
    lines += [
        f"MLflow run {summary['run_id']}: {summary['url']}",
        f"registry: {registration.message}",
    ]
    if registration.version:
        # Commands run elsewhere need the store; name it unless the environment already does.
        env = "" if summary["tracking_uri_from_env"] else f"MLFLOW_TRACKING_URI={summary['tracking_uri']} "
        uri = f"models:/{registration.name}@{registry.CHAMPION}" if registration.champion else registration.uri
        lines += [
            f"  classify JPEGs:  mlflow.pyfunc.load_model({uri!r})"
            f".predict(pandas.DataFrame({{'image': [jpeg_bytes]}}))",
            f"  serve it:        {env}mlflow models serve -m {uri} --env-manager local --port 5001",
            f"  10-crop top-1:   {env}python jobs/evaluate.py --model {uri}"
            + (f" --data {summary['data']}" if summary["data"] else ""),
        ]
    return "\n".join(lines)
