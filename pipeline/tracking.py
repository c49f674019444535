"""MLflow: one run per training run, written from one place on the driver side.

    start_run(cfg, ...)        the run, with the resolved config, git SHA and data lineage as params; system
                               metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) while it lasts
    MLflowCallback             a ray.train.UserCallback on the Train controller: per-epoch metrics and
                               pipeline health, the epochs --log-models selects as logged models (image
                               classifiers, classifier.py) carrying their val_top1/top5, and the pictures
    finish_run(...)            the run's final status (FINISHED, FAILED with the error, KILLED) and summary

Workers never open an MLflow run: they call ray.train.report, and the controller calls us. That
gives one writer on the tracking store whatever the worker count. Registering a model happens once,
after the run finished (registry.py), never from the callback: an interrupted run registers nothing.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train

from pipeline import checkpoint as checkpoints

# Pipeline health sits beside the accuracy: images_per_s (training throughput, all workers), the
# fraction of the training pass spent waiting for the next batch (data_wait_fraction, the slowest
# worker's), and decode_failures (images left out so far).
EPOCH_METRICS = ("train_loss", "train_top1", "train_top5", "val_loss", "val_top1", "val_top5",
                 "lr", "images_per_s", "data_wait_fraction", "epoch_seconds")
MODEL_METRICS = ("val_loss", "val_top1", "val_top5")
CURVES = ("epoch", "train_loss", "val_loss", "train_top1", "val_top1", "val_top5")
PICTURES = "pictures"  # the run's artifact folder of PNGs
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
    """Create the experiment if needed and a run holding the resolved config; returns its RunInfo.

    The run is also made this process's active run with system metrics on: MLflow samples CPU, memory,
    disk and network (GPU too where nvidia-ml-py is installed) every 10 s into system/* metrics, on the
    machine of the driver (the head node on a cluster), until finish_run.
    """
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
    mlflow.start_run(run_id=run.info.run_id, log_system_metrics=True)
    return run.info


def finish_run(tracking_uri: str, run_id: str, status: str, summary: dict[str, Any] | None = None) -> None:
    """Tags from `summary`, then the final status; ends the active run (and its system metrics) if it is this one."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    for key, value in (summary or {}).items():
        client.set_tag(run_id, key, str(value)[:5000])
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
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

    def __init__(self, *, tracking_uri: str, run_id: str, epochs: int, log_models: str, data_uri: str,
                 data_fingerprint: str, decode_failures=None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.epochs = epochs
        self.log_models = log_models
        self.data_uri = data_uri
        self.data_fingerprint = data_fingerprint
        self.best_top1 = float("-inf")
        self.history: list[dict[str, float]] = []
        self.decode_failures = decode_failures  # a data.DecodeFailures actor, or None
        self.failures_logged = 0

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        client = mlflow.MlflowClient(self.tracking_uri)
        # Every worker reports the same all-reduced numbers; rank 0's stand for the run.
        m = metrics[0]
        epoch = int(m["epoch"])
        improved = m["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, m["val_top1"])
        log_model = checkpoint is not None and checkpoints.should_log(
            self.log_models, improved=improved, last_epoch=epoch == self.epochs - 1)

        model_id = None
        if checkpoint is not None and (log_model or improved):
            with checkpoint.as_directory() as directory:
                state = checkpoints.load(directory)
                batch_picture = Path(directory) / checkpoints.TRAIN_BATCH_FILE
                if batch_picture.is_file():
                    self._log_picture(client, checkpoints.TRAIN_BATCH_FILE, batch_picture.read_bytes())
            if log_model:
                model_id = self._log_model(state, epoch, checkpoint.path)
            if improved:
                self._log_best_pictures(client, state, m)

        # The val metrics carry the logged model's id: one record, seen on the run and on the model.
        now = int(time.time() * 1000)
        on_model = self._on_model(model_id)
        client.log_batch(self.run_id, metrics=[
            mlflow.entities.Metric(k, float(m[k]), now, epoch, **(on_model if k in MODEL_METRICS else {}))
            for k in EPOCH_METRICS if k in m])
        self.history.append({k: float(m[k]) for k in CURVES})
        from pipeline import pictures

        self._log_picture(client, "curves.png", pictures.curves_png(self.history))
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

    def _on_model(self, model_id: str | None) -> dict[str, Any]:
        """A metric's link to the logged model and to the data it was measured on."""
        if model_id is None:
            return {}
        return {"model_id": model_id, "dataset_name": self.data_uri, "dataset_digest": self.data_fingerprint[:32]}

    def _log_model(self, state: dict[str, Any], epoch: int, checkpoint_path: str) -> str:
        from pipeline import classifier

        return classifier.log_model(state, name=f"epoch-{epoch:03d}", run_id=self.run_id, step=epoch, tags={
            "epoch": str(epoch), "ray_checkpoint": checkpoint_path, "data_uri": self.data_uri,
            "data_fingerprint": self.data_fingerprint})

    def _log_best_pictures(self, client, state: dict[str, Any], m: dict[str, Any]) -> None:
        """The best model so far: its conv1 kernels (Figure 3) and its per-class validation top-1."""
        from pipeline import pictures

        conv1 = next(v for v in state["model"].values() if v.dim() == 4)  # the first conv's weight, either model
        towers = 2 if state["config"]["model"] == "alexnet" else 1
        self._log_picture(client, "conv1_filters.png", pictures.conv1_png(conv1.numpy(), towers=towers))
        counts = state.get("val_per_class") or {}
        if counts.get("images"):
            names = [w or c for w, c in zip(state["words"], state["classes"])] or state["classes"] \
                or [str(i) for i in range(state["num_classes"])]
            table = pictures.class_accuracy(counts["correct"], counts["images"], names)
            client.log_dict(self.run_id, {"epoch": state["epoch"], **table}, f"{PICTURES}/per_class_val.json")
            self._log_picture(client, "per_class_val.png", pictures.per_class_png(
                table, title=f"validation top-1 per class, best epoch so far ({state['epoch'] + 1}: "
                             f"{m['val_top1']:.1f}%)"))

    def _log_picture(self, client, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            client.log_artifact(self.run_id, str(path), PICTURES)
