"""The driver side of a training run: data -> Ray -> trainer -> MLflow -> registry.

`run(cfg)` is everything `python jobs/train.py` does, importable and testable:

    1. resolve the data (generate the cached sample when --data is empty) and fail fast on a bad path
    2. connect to the Ray cluster there is, or start a local one that cannot deadlock
    3. build the Ray Data plans and a TorchTrainer whose MLflowCallback records every epoch
    4. fit, register the run's best model (registry.py), close the MLflow run, say where the model went

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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline import checkpoint, data, registry, sample, tracking
from pipeline.config import Config
from pipeline.lighting import IMAGENET as IMAGENET_LIGHTING
from pipeline.lighting import Lighting


def resolve_data(cfg: Config) -> data.Source:
    """The dataset the run trains on; the generated sample when --data is empty."""
    uri = cfg.data or str(sample.ensure_sample_imagenet())
    source = data.open_source(uri, num_classes=cfg.num_classes, manifest_sha256=cfg.manifest_sha256)
    for path in source.ignored:
        print(f"[data] not read (not part of the {source.kind} layout): {path}", file=sys.stderr)
    return source


# Where object storage is: every task that reads s3:// needs it. Credentials are not forwarded; each
# node reads them from its own AWS chain (environment, profile, instance role). And whether MLflow
# draws download bars, which the Train controller would print into the job's log.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


def connect_ray(*, train_workers: int = 0) -> None:
    """Join the cluster there is (RAY_ADDRESS, `ray start`, `ray job submit`), else start one here.

    A local instance gets a logical CPU per train worker on top of the physical cores: on a
    2-core laptop two workers holding one CPU each would otherwise leave Ray Data none, and the
    job would wait forever for its first batch.
    """
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    runtime_env = {"env_vars": env} if env else None
    try:
        ray.init(address="auto", runtime_env=runtime_env)
        return
    except ConnectionError:
        pass
    ray.init(num_cpus=(os.cpu_count() or 1) + train_workers, runtime_env=runtime_env)


def worker_resources(cfg: Config, cluster_cpus: float) -> dict[str, float]:
    """CPUs (and GPUs) per train worker, leaving Ray Data at least one CPU.

    Explicit --cpus-per-worker is checked, not trusted: a request that leaves Ray Data no CPU on
    a CPU-only cluster is refused with the numbers, because the job would hang, not fail.
    """
    if cfg.use_gpu:
        return {"CPU": cfg.cpus_per_worker or 1.0, "GPU": 2.0 if cfg.placement == "grouped" else 1.0}
    cpus = cfg.cpus_per_worker or min(1.0, (cluster_cpus - 1.0) / cfg.workers)
    left_for_data = cluster_cpus - cpus * cfg.workers
    if cpus <= 0 or left_for_data < 1.0:
        raise ValueError(
            f"{cfg.workers} train workers x {cpus:g} CPU on a cluster of {cluster_cpus:g} CPUs leaves Ray Data "
            f"{max(left_for_data, 0):g} CPU; it needs at least 1 to feed them. Use fewer --workers, a smaller "
            f"--cpus-per-worker, or a bigger cluster.")
    return {"CPU": cpus}


def storage_path(cfg: Config) -> str:
    if cfg.storage_path:
        return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    return str(Path("ray_results").resolve())


# Seconds between progress lines when the output is not a terminal: ~60 lines an hour.
PROGRESS_INTERVAL_S = 60.0


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
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        yield caught
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def class_words(cfg: Config, source: data.Source) -> list[str]:
    """A readable name per class: the sample's drawn patterns; none for other data (ImageNet's words are
    in the devkit's meta.mat, which the shards' manifest does not carry yet)."""
    if not cfg.data:
        return list(sample.PATTERNS[:source.num_classes])
    return []


def run(cfg: Config, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics, where they were recorded and where the model went.

    callbacks: extra ray.train.UserCallback instances, beside the MLflow one.
    """
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    started = time.time()
    tracking_uri_from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # before MLflow sets it for its children
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint  # read here, and forwarded to every Ray task
    source = resolve_data(cfg)
    counts = " / ".join(f"{source.images.get(s) or '?'} {s}" for s in data.SPLITS)
    print(f"[data] {source.uri}: {source.kind}, {counts} images, {source.num_classes} classes")
    lighting = Lighting.from_dict(source.lighting) if source.lighting else IMAGENET_LIGHTING
    model_name = registry.model_name(cfg.registered_model, sample=not cfg.data)

    # Off a terminal every redraw of a progress bar is a new line (a default run wrote 350 KB of them).
    interactive = sys.stdout.isatty()
    if not interactive:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # forwarded to Ray's processes
    connect_ray(train_workers=cfg.workers)
    resources = worker_resources(cfg, ray.cluster_resources().get("CPU", 0.0))
    # The datasets copy this context when they are built, and Ray Train's SplitCoordinator actors, which
    # execute them in other processes, run with that copy: setting it here reaches them.
    DataContext.get_current().enable_progress_bars = interactive

    tracking_uri = tracking.resolve_tracking_uri()
    data_fingerprint = source.fingerprint
    run_info = tracking.start_run(cfg, tracking_uri=tracking_uri, params={
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
    }, tags={"data_fingerprint": data_fingerprint})
    run_id = run_info.run_id
    print(f"[mlflow] run {run_id} in experiment {cfg.experiment!r} at {tracking_uri}")

    with sigterm_as_interrupt() as caught:
        try:
            report = data.DecodeFailures.remote()
            callback = tracking.MLflowCallback(
                tracking_uri=tracking_uri, run_id=run_id, epochs=cfg.epochs, log_models=cfg.log_models,
                data_uri=source.uri, data_fingerprint=data_fingerprint, decode_failures=report)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"config": cfg.to_dict(), "num_classes": source.num_classes,
                                   "lighting": lighting.to_dict(), "classes": list(source.wnids),
                                   "words": class_words(cfg, source), "train_images": source.images.get("train"),
                                   "progress_interval_s": 0.0 if interactive else PROGRESS_INTERVAL_S},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                    placement_strategy=cfg.worker_strategy),
                datasets={"train": data.train_dataset(source, cfg, report),
                          "val": data.val_dataset(source, cfg, report)},
                dataset_config=data.TrainValDataConfig(execution_options=data.execution_options(cfg)),
                run_config=ray.train.RunConfig(
                    name=f"alexnet-{run_id[:12]}",
                    storage_path=storage_path(cfg),
                    failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=checkpoint.keep_policy(cfg.keep_checkpoints),
                    callbacks=[callback, *callbacks],
                ),
            )
            result = trainer.fit()
            registration = registry.register_best(tracking_uri=tracking_uri, run_id=run_id, name=model_name, lineage={
                "git_sha": tracking.git_sha(), "data_uri": source.uri, "data_fingerprint": data_fingerprint,
                "data_kind": source.kind, "preset": cfg.preset, "val_images": source.images.get("val")})
            final = {k: result.metrics[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss")}
            tracking.finish_run(tracking_uri, run_id, "FINISHED", {
                "final_val_top1": final["val_top1"], "final_val_top5": final["val_top5"],
                "registered": registration.uri or "nothing", "registration": registration.message})
        except BaseException as e:
            # Ray Train answers Ctrl-C (and SIGTERM, above) by aborting the workers and leaving fit() with
            # SystemExit; anywhere else it is KeyboardInterrupt.
            if caught or isinstance(e, (KeyboardInterrupt, SystemExit)):
                name = caught[0] if caught else "SIGINT"
                tracking.finish_run(tracking_uri, run_id, "KILLED", {"stopped_by": name})
                raise RunInterrupted(name, run_id) from None
            tracking.finish_run(tracking_uri, run_id, "FAILED", {"error": f"{type(e).__name__}: {e}"})
            raise

    return {
        **final,
        "best_val_top1": best_val_top1(tracking_uri, run_id),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "url": tracking.run_url(tracking_uri, run_id, run_info.experiment_id),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": time.time() - started,
        "decode_failures": len(ray.get(report.get.remote())),  # in MLflow already: logged every epoch
        "data": cfg.data,
        "tracking_uri_from_env": tracking_uri_from_env,
        "registered_model": model_name,
        "registration": registration,
    }


def best_val_top1(tracking_uri: str, run_id: str) -> float:
    """The best val_top1 of the run, read back from MLflow (the callback lives in another process)."""
    import mlflow

    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "val_top1")
    return max(m.value for m in history)


def where_it_went(summary: dict[str, Any]) -> str:
    """The job's last lines: the result, the MLflow run, the registered model and how to use it."""
    registration = summary["registration"]
    lines = [
        f"\nfinal val top-1 {summary['val_top1']:.1f}%  top-5 {summary['val_top5']:.1f}%  "
        f"(best top-1 {summary['best_val_top1']:.1f}%) in {summary['seconds']:.0f} s",
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
