"""MLflow: one run per training run, written from one place on the driver side.

    start_run(cfg, ...)        the run, with the resolved config, git SHA and data lineage as params
    MLflowCallback             a ray.train.UserCallback on the Train controller: per-epoch metrics,
                               each epoch's checkpoint as a logged model carrying its val_top1/top5,
                               the best one registered with the alias `champion`
    finish_run(...)            status and the final summary

Workers never open an MLflow run: they call ray.train.report, and the controller calls us. That
gives one writer on the tracking store whatever the worker count.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import ray
import ray.train

CHAMPION = "champion"
EPOCH_METRICS = ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                 "lr", "images_per_s", "epoch_seconds")
MODEL_METRICS = ("val_loss", "val_top1", "val_top5")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else the local sqlite default, made absolute.

    Absolute, because the Ray Train controller that logs the epochs may run in another directory.
    Under `ray job submit --working-dir` the current directory is a temporary copy that Ray deletes,
    so there the default store is ~/alexnet-ray/mlflow.db instead.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI and "/runtime_resources/working_dir_files/" in os.getcwd():
        home = Path.home() / "alexnet-ray"
        home.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{home / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        sha = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).parent).stdout.strip()
        return f"{sha}-dirty" if dirty and sha != "unknown" else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(cfg, *, tracking_uri: str, params: dict[str, Any], tags: dict[str, str]):
    """Create the experiment if needed and a run holding the resolved config; returns its RunInfo."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        location = None
        if tracking_uri.startswith("sqlite:"):  # keep artifacts beside the local database
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=location)
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = mlflow.get_experiment_by_name(cfg.experiment).experiment_id
    run = client.create_run(experiment_id, tags={"git_sha": git_sha(), "preset": cfg.preset, **tags})
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k, str(v)[:6000]) for k, v in {**cfg.to_dict(), **params}.items()])
    return run.info


def finish_run(tracking_uri: str, run_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for key, value in (summary or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, status=status)


def run_url(tracking_uri: str, run_id: str, experiment_id: str) -> str:
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}   (then http://127.0.0.1:5000)"


def log_decode_failures(tracking_uri: str, run_id: str, failures: dict[str, str], *, step: int,
                        artifact: bool) -> None:
    """The run's report of images that could not be decoded: a count every epoch, and (when it grew)
    the artifact naming each one with its reason."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    client.log_metric(run_id, "decode_failures", len(failures), step=step)
    if artifact:
        client.log_dict(run_id, dict(sorted(failures.items())), "decode_failures.json")


class MLflowCallback(ray.train.UserCallback):
    """Runs on the Ray Train controller: turns every report into MLflow records."""

    def __init__(self, *, tracking_uri: str, run_id: str, registered_model: str, input_shape: tuple[int, ...],
                 data_fingerprint: str, decode_failures=None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.registered_model = registered_model
        self.input_shape = input_shape
        self.data_fingerprint = data_fingerprint
        self.best_top1 = float("-inf")
        self.decode_failures = decode_failures  # a data.DecodeFailures actor, or None
        self.failures_logged = 0

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        import mlflow

        # Every worker reports the same all-reduced numbers; rank 0's stand for the run.
        m = metrics[0]
        epoch = int(m["epoch"])
        model_id = self._log_model(checkpoint, epoch) if checkpoint is not None else None
        # The val metrics carry the logged model's id: one record, seen on the run and on the model.
        now = int(time.time() * 1000)
        mlflow.MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(k, float(m[k]), now, epoch, model_id=model_id if k in MODEL_METRICS else None)
            for k in EPOCH_METRICS if k in m])
        if model_id is not None and m["val_top1"] > self.best_top1:
            self.best_top1 = m["val_top1"]
            self._register(model_id, m, epoch)
        if self.decode_failures is not None:
            failures = ray.get(self.decode_failures.get.remote())
            log_decode_failures(self.tracking_uri, self.run_id, failures, step=epoch,
                                artifact=len(failures) > self.failures_logged)
            self.failures_logged = len(failures)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        text = "\n\n".join(f"worker {rank}: {type(e).__name__}: {e}" for rank, e in sorted(worker_exceptions.items()))
        client.log_text(self.run_id, text, f"failures/{int(time.time())}.txt")
        client.set_tag(self.run_id, "last_failure", text[:5000])

    def _log_model(self, checkpoint, epoch: int) -> str:
        """The checkpoint as an MLflow logged model (pt2, loadable without this code); returns its id."""
        import mlflow
        import torch

        from pipeline.train import model_from_checkpoint

        with checkpoint.as_directory() as directory:
            model, _ = model_from_checkpoint(directory)
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                # A batch of 2: torch.export would specialise a batch of 1 into the graph.
                model, name=f"epoch-{epoch:03d}", input_example=torch.randn(2, *self.input_shape).numpy(),
                step=epoch, tags={"ray_checkpoint": checkpoint.path, "epoch": str(epoch)},
                # Stated, not inferred: inference runs the model in a subprocess, ~10 s per epoch.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        return info.model_id

    def _register(self, model_id: str, m: dict[str, Any], epoch: int) -> None:
        """A new registered version for every improvement of this run; `champion` moves to it when
        it beats the current champion on the same data (or the champion was measured elsewhere)."""
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        version = mlflow.register_model(f"models:/{model_id}", self.registered_model, tags={
            "val_top1": f"{m['val_top1']:.4f}", "val_top5": f"{m['val_top5']:.4f}", "epoch": str(epoch),
            "run_id": self.run_id, "data_fingerprint": self.data_fingerprint,
        })
        try:
            champion = client.get_model_version_by_alias(self.registered_model, CHAMPION)
        except mlflow.exceptions.MlflowException:
            champion = None
        if (champion is None
                or champion.tags.get("data_fingerprint") != self.data_fingerprint
                or champion.tags.get("run_id") == self.run_id
                or float(champion.tags.get("val_top1", "-inf")) < m["val_top1"]):
            client.set_registered_model_alias(self.registered_model, CHAMPION, version.version)
