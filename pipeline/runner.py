"""The driver side of a training run: data -> Ray -> trainer -> MLflow.

`run(cfg)` is everything `python jobs/train.py` does, importable and testable:

    1. resolve the data (generate the cached sample when --data is empty) and fail fast on a bad path
    2. connect to the Ray cluster there is, or start a local one that cannot deadlock
    3. build the Ray Data plans and a TorchTrainer whose MLflowCallback records every epoch
    4. fit, then close the MLflow run and print where to look
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline import data, sample, tracking
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
# node reads them from its own AWS chain (environment, profile, instance role).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


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


def run(cfg: Config, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics and where they were recorded.

    callbacks: extra ray.train.UserCallback instances, beside the MLflow one.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    started = time.time()
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint  # read here, and forwarded to every Ray task
    source = resolve_data(cfg)
    counts = " / ".join(f"{source.images.get(s) or '?'} {s}" for s in data.SPLITS)
    print(f"[data] {source.uri}: {source.kind}, {counts} images, {source.num_classes} classes")
    lighting = Lighting.from_dict(source.lighting) if source.lighting else IMAGENET_LIGHTING

    connect_ray(train_workers=cfg.workers)
    resources = worker_resources(cfg, ray.cluster_resources().get("CPU", 0.0))

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
    }, tags={"data_fingerprint": data_fingerprint})
    run_id = run_info.run_id
    print(f"[mlflow] run {run_id} in experiment {cfg.experiment!r} at {tracking_uri}")

    report = data.DecodeFailures.remote()
    callback = tracking.MLflowCallback(
        tracking_uri=tracking_uri, run_id=run_id, registered_model=cfg.registered_model,
        input_shape=(3, cfg.crop_size, cfg.crop_size), data_fingerprint=data_fingerprint, decode_failures=report)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "num_classes": source.num_classes,
                           "lighting": lighting.to_dict()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.worker_strategy),
        datasets={"train": data.train_dataset(source, cfg, report), "val": data.val_dataset(source, cfg, report)},
        dataset_config=data.TrainValDataConfig(execution_options=data.execution_options(cfg)),
        run_config=ray.train.RunConfig(
            name=f"alexnet-{run_id[:12]}",
            storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[callback, *callbacks],
        ),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        tracking.finish_run(tracking_uri, run_id, "FAILED", {"error": f"{type(e).__name__}: {e}"[:5000]})
        raise

    final = {k: result.metrics[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss")}
    failures = ray.get(report.get.remote())  # already in MLflow: the callback logs them every epoch
    summary = {
        **final,
        "best_val_top1": best_val_top1(tracking_uri, run_id),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "url": tracking.run_url(tracking_uri, run_id, run_info.experiment_id),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": time.time() - started,
        "decode_failures": len(failures),
    }
    tracking.finish_run(tracking_uri, run_id, "FINISHED",
                        {"final_val_top1": final["val_top1"], "final_val_top5": final["val_top5"]})
    return summary


def best_val_top1(tracking_uri: str, run_id: str) -> float:
    """The best val_top1 of the run, read back from MLflow (the callback lives in another process)."""
    import mlflow

    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "val_top1")
    return max(m.value for m in history)
