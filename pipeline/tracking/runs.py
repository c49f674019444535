"""MLflow: one run per training run, written from one place on the driver side.

    start_run(cfg, ...)        the run, with the resolved config, git SHA and data lineage as params; system
                               metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) while it lasts
    MLflowCallback             a ray.train.UserCallback on the Train controller: hands every report to the
                               Recorder and returns at once
    recording.Recorder         a Ray actor, the run's one writer during training (recording.py)
    finish_run(...)            the run's final status (FINISHED, FAILED with the error, KILLED) and summary

Workers never open an MLflow run: they call ray.train.report, the controller's callback passes each report
on, and the Recorder writes. That gives one writer on the tracking store whatever the worker count, and a
training run that never waits for MLflow: a server restarting mid-run costs no training time, only delay in
the records. Registering a model happens once, after the run finished and the Recorder delivered everything
(registry.py), never from the callback: an interrupted run registers nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train

from pipeline.models import checkpoint as checkpoints
from pipeline.tracking import recording

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
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        sha = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        ).stdout.strip()
        return f"{sha}-dirty" if dirty and sha != "unknown" else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created if needed (with a sqlite store, its artifacts beside the database)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(name) is None:
        location = None
        if tracking_uri.startswith("sqlite:"):  # keep artifacts beside the local database
            location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        mlflow.create_experiment(name, artifact_location=location)
    return mlflow.get_experiment_by_name(name).experiment_id


def start_run(cfg, *, tracking_uri: str, params: dict[str, Any], tags: dict[str, str]):
    """Create the experiment if needed and a run holding the resolved config; returns its RunInfo.

    The run is also made this process's active run with system metrics on: MLflow samples CPU, memory,
    disk and network (GPU too where nvidia-ml-py is installed) every 10 s into system/* metrics, on the
    machine of the driver (the head node on a cluster), until finish_run.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(cfg.experiment, tracking_uri)
    run = client.create_run(experiment_id, tags={"git_sha": git_sha(), "preset": cfg.preset, **tags})
    client.log_batch(
        run.info.run_id,
        params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in {**cfg.to_dict(), **params}.items()],
    )
    # The process's active experiment must be the run's: one set earlier in this process (a notebook, a
    # test) would make start_run refuse the run.
    mlflow.set_experiment(experiment_id=experiment_id)
    mlflow.start_run(run_id=run.info.run_id, log_system_metrics=True)
    return run.info


def reopen_run(tracking_uri: str, run_id: str, description: str):
    """A run continued by a new job (--resume): RUNNING again, active in this process with system metrics as
    start_run's, and a tag `resume_<n>` saying when and with which flags changed (MLflow's params are
    immutable: they keep the values the run started with). Returns its RunInfo."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    resumes = int(run.data.tags.get("resumes", "0")) + 1
    client.set_tag(run_id, "resumes", str(resumes))
    client.set_tag(run_id, f"resume_{resumes}", description)
    for stale in ("error", "stopped_by", "continue_with"):  # the last job's ending, now continued
        if stale in run.data.tags:
            client.delete_tag(run_id, stale)
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    mlflow.start_run(run_id=run_id, log_system_metrics=True)  # status back to RUNNING
    return client.get_run(run_id).info


def log_recovered_epochs(tracking_uri: str, run_id: str, reports: list[dict[str, Any]]) -> frozenset[int]:
    """Log epoch reports that a lost driver never delivered (resume.unlogged_epochs); returns their epochs."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    for m in reports:
        metrics = [
            mlflow.entities.Metric(k, float(m[k]), now, int(m["epoch"])) for k in recording.EPOCH_METRICS if k in m
        ]
        client.log_batch(run_id, metrics=metrics)
        print(f"[mlflow] epoch {int(m['epoch']) + 1}: metrics recovered from its checkpoint")
    return frozenset(int(m["epoch"]) for m in reports)


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


class MLflowCallback(ray.train.UserCallback):
    """Runs on the Ray Train controller: hands every report to the Recorder and returns at once, so that
    a tracking server that is slow or down never holds up training."""

    def __init__(
        self,
        recorder,
        *,
        epochs: int,
        log_models: str,
        logged_epochs: frozenset[int] = frozenset(),
        best_top1: float = float("-inf"),
    ):
        self.recorder = recorder  # a Recorder actor
        self.epochs = epochs
        self.log_models = log_models
        self.logged_epochs = logged_epochs  # a continued run's epochs that MLflow holds already
        self.best_top1 = best_top1

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        # Every worker reports the same all-reduced numbers; rank 0's stand for the run.
        m = metrics[0]
        if "step" in m:  # a checkpoint inside an epoch (--checkpoint-every-steps): only for resuming
            return
        epoch = int(m["epoch"])
        if epoch in self.logged_epochs:  # reported again by a continued run: each epoch is recorded once
            return
        improved = m["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, m["val_top1"])
        log_model = checkpoint is not None and checkpoints.should_log(
            self.log_models, improved=improved, last_epoch=epoch == self.epochs - 1
        )
        # Read now: Ray Train may delete this checkpoint (--keep-checkpoints) before MLflow can take it.
        state = picture = None
        if checkpoint is not None and (log_model or improved):
            with checkpoint.as_directory() as directory:
                state = checkpoints.for_serving(checkpoints.load(directory))
                batch_picture = Path(directory) / checkpoints.TRAIN_BATCH_FILE
                picture = batch_picture.read_bytes() if batch_picture.is_file() else None
        self.recorder.epoch.remote(
            m,
            state=state,
            train_batch_png=picture,
            log_model=log_model,
            improved=improved,
            checkpoint_path=checkpoint.path if checkpoint is not None else "",
            reported_ms=int(time.time() * 1000),
        )

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        text = "\n\n".join(f"worker {rank}: {type(e).__name__}: {e}" for rank, e in sorted(worker_exceptions.items()))
        self.recorder.failure.remote(text)


# --- closing a run from the driver: wait for its records, then its status -------------------------

# How long a finished job waits for a tracking server that is down to take the records it holds.
TRACKING_WAIT_S = 300.0


class RecordsNotDelivered(RuntimeError):
    """The tracking server did not come back in time to take what the run recorded."""

    def __init__(self, tracking_uri: str, records: list[str], *, waited: float, checkpoints: str):
        self.records = records
        shown = "; ".join(records[:5]) + (f"; and {len(records) - 5} more" if len(records) > 5 else "")
        super().__init__(
            f"the MLflow tracking server {tracking_uri} did not take {len(records)} records within {waited:.0f} s "
            f"of the end of training: {shown}. Nothing was registered and the run stays RUNNING there; the "
            f"checkpoints under {checkpoints} hold each kept epoch's metrics and weights"
        )


def wait_for_records(recorder, tracking_uri: str, timeout: float, checkpoints: str) -> dict[str, Any]:
    """Wait until the Recorder has delivered every record; returns its account (Recorder.flush).
    Raises RecordsNotDelivered, naming them, when the server has not taken them within `timeout`."""
    import ray

    waiting = ray.get(recorder.flush.remote(0.0))["pending"]
    if waiting:
        print(
            f"[mlflow] waiting up to {timeout:.0f} s for {tracking_uri} to take {len(waiting)} records", file=sys.stderr
        )
    delivery = ray.get(recorder.flush.remote(timeout))
    if delivery["pending"]:
        raise RecordsNotDelivered(
            tracking_uri, delivery["pending"] + delivery["undelivered"], waited=timeout, checkpoints=checkpoints
        )
    return delivery


def abandon_run() -> None:
    """Let go of this process's active run without waiting for a server that is gone: its status stays
    RUNNING in the store (nothing can reach it to say otherwise), and MLflow's exit hook does not spend
    minutes retrying to end it."""
    import mlflow

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        mlflow.end_run("FAILED")
    except Exception:  # the server is down: that is why we are here
        pass


def close_unfinished_run(
    recorder, tracking_uri: str, run_id: str, status: str, summary: dict[str, Any], checkpoints: str
) -> None:
    """Close a run that did not finish: first what its epochs reported, then its status and why. With the
    server gone, say what is lost and let go of the run."""
    try:
        if recorder is not None:
            wait_for_records(recorder, tracking_uri, recording.TRACKING_WAIT_ON_FAILURE_S, checkpoints)
    except RecordsNotDelivered as lost:
        print(f"[mlflow] {lost}", file=sys.stderr)
        abandon_run()
        return
    finish_run(tracking_uri, run_id, status, summary)


def save_failure_report(tracking_uri: str, run_id: str, text: str, storage: str, run_name: str) -> str:
    """Ray's full account of a failure (every worker's traceback) in a file, and on the run as
    failures/final.txt; returns the file's path: beside the checkpoints when they are local, else in
    the temporary folder."""
    import mlflow

    folder = Path(storage) / run_name if "://" not in storage else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"failure-{run_id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(text)
    try:
        mlflow.MlflowClient(tracking_uri).log_text(run_id, text, "failures/final.txt")
    except Exception as e:  # the file is what counts; the server may be what failed
        print(f"[mlflow] the failure report stays in {path}: {recording.first_line(e)}", file=sys.stderr)
    return str(path)


def delivery_tags(delivery: dict[str, Any]) -> dict[str, Any]:
    """What a tracking outage cost, as tags on the run: nothing when there was none."""
    tags: dict[str, Any] = {}
    if delivery["retries"]:
        tags.update(tracking_retries=delivery["retries"], tracking_outage_s=delivery["outage_s"])
    if delivery["undelivered"]:
        tags["undelivered"] = "; ".join(delivery["undelivered"])
    return tags


def best_val_top1(tracking_uri: str, run_id: str) -> float:
    """The best val_top1 of the run, read back from MLflow (the callback lives in another process)."""
    import mlflow

    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "val_top1")
    return max(m.value for m in history)
