"""--resume: continue a run in a new job, from its newest checkpoint, in the same MLflow run.

A run is hours of cloud GPUs and its driver the weak point (a Ctrl-C, `ray job stop`, a lost head node).
Ray Train V2 continues a run when a trainer is built again with the same RunConfig(name, storage_path):
its checkpoint manager reloads the run's checkpoints from storage (local or s3://, on this cluster or a
new one) and every worker's ray.train.get_checkpoint() is the newest, at an epoch's end or inside one.
The driver (driver.py) does that with the run's own name, and here is everything around it:

    find_run(...)           the run --resume names: a run id, or `latest` (the experiment's newest run that
                            did not finish and whose driver is gone)
    Continuation.of(...)    the run's config, with the flags this command gives; refuses a flag that changes
                            what the run computes (the model, a switch, the batch, the seed ...), naming each;
                            allows the rest (more --epochs, other --workers or --address ...) and records them
    check_data(...)         the data must be what the run trained on (its fingerprint)
    unlogged_epochs(...)    the epochs whose checkpoints exist but whose metrics never reached MLflow (the
                            driver died between the report and the delivery): logged before training goes on
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.data import storage
from pipeline.models import checkpoint
from pipeline.tracking import lifeline

# Flags a continuation may change: where and how fast it runs, how long, what it keeps and records.
# Everything else changes what the run computes, so the continued run would not be the run it says it is.
SAFE_CHANGES = frozenset(
    {
        "epochs",
        "workers",
        "cpus_per_worker",
        "address",
        "train_resource",
        "data_resource",
        "worker_strategy",
        "use_gpu",
        "compile",
        "decode_on",
        "data",  # the same images elsewhere (a bucket instead of a folder): check_data compares the fingerprint
        "storage_path",  # checkpoints copied elsewhere (a new cluster's bucket)
        "max_failures",
        "keep_checkpoints",
        "checkpoint_every_steps",
        "log_models",
        "registered_model",
        "experiment",
        "sample_log",
        "resume",
        "verbose",
    }
)


def run_name(run_id: str) -> str:
    """Ray Train's name for the MLflow run `run_id`: the same name and storage continue a Ray Train run."""
    return f"alexnet-{run_id[:12]}"


class ResumeRefused(ValueError):
    """--resume cannot continue that run as asked; the message says why and what to do."""


def find_run(tracking_uri: str, experiment: str, reference: str):
    """The MLflow run `reference` names: a run id, or `latest`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri)
    run: Any
    if reference != "latest":
        try:
            run = client.get_run(reference)
        except MlflowException:
            raise ResumeRefused(f"--resume {reference}: no such run at {tracking_uri}") from None
    else:
        found = client.get_experiment_by_name(experiment)
        candidates = (
            []
            if found is None
            else client.search_runs(
                [found.experiment_id], "attributes.status != 'FINISHED'", order_by=["attributes.start_time DESC"]
            )
        )
        run = next((r for r in candidates if not lifeline.is_live(r)), None)
        if run is None:
            raise ResumeRefused(
                f"--resume latest: experiment {experiment!r} at {tracking_uri} has no unfinished run whose driver "
                f"is gone; name a run id to continue a finished run for more epochs"
            )
    if lifeline.is_live(run):
        age = lifeline.heartbeat_age(run) or 0.0
        raise ResumeRefused(
            f"run {run.info.run_id} is still running: its driver was alive {age:.0f} s ago. Stop that job first "
            f"(Ctrl-C, ray job stop), or wait {lifeline.LOST_AFTER_S:.0f} s after a driver that died"
        )
    return run


def config_of(params: dict[str, str], base: Config) -> Config:
    """The Config a run recorded in its params (MLflow keeps them as text); fields it lacks are `base`'s."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name not in params:
            continue
        text = params[f.name]
        kind = str(f.type)
        values[f.name] = {"bool": lambda t: t == "True", "int": int, "float": float}.get(kind, str)(text)
    return dataclasses.replace(base, **values)


@dataclass(frozen=True)
class Continuation:
    """What a new job continues: the run, its config as this job runs it, and what this job changed."""

    run_id: str
    config: Config
    changes: dict[str, tuple[Any, Any]]  # field -> (the run's value, this job's)
    storage: str  # where the run's checkpoints are
    logged_epochs: frozenset[int]  # epochs whose metrics MLflow holds already
    best_top1: float  # the run's best val top-1 so far (the callback's `improved`)

    @classmethod
    def of(cls, run, cfg: Config, given: frozenset[str] | None, tracking_uri: str, storage_default: str):
        """`cfg` is this command's config; `given` the fields its command line set (None: all of them, as
        when a Config is built in code). Fields not given are the run's."""
        import mlflow

        recorded = config_of(run.data.params, cfg)
        given = frozenset(f.name for f in dataclasses.fields(Config)) if given is None else given
        changes = {
            name: (getattr(recorded, name), getattr(cfg, name))
            for name in sorted(given)
            if getattr(recorded, name) != getattr(cfg, name) and name != "resume"
        }
        unsafe = {name: values for name, values in changes.items() if name not in SAFE_CHANGES}
        if unsafe:
            listed = "; ".join(f"--{_flag(n)} {old!r} in the run, {new!r} now" for n, (old, new) in unsafe.items())
            raise ResumeRefused(
                f"--resume {run.info.run_id}: these flags would change what the run computes: {listed}. "
                f"Drop them to continue the run as it was, or start a new run without --resume"
            )
        merged = dataclasses.replace(recorded, **{name: new for name, (_, new) in changes.items()}, resume=cfg.resume)
        client = mlflow.MlflowClient(tracking_uri)
        top1 = client.get_metric_history(run.info.run_id, "val_top1")
        storage_uri = cfg.storage_path if "storage_path" in changes else run.data.params.get("storage_resolved")
        return cls(
            run_id=run.info.run_id,
            config=merged,
            changes=changes,
            storage=storage_uri or storage_default,
            logged_epochs=frozenset(int(m.step) for m in top1),
            best_top1=max((m.value for m in top1), default=float("-inf")),
        )

    @property
    def run_name(self) -> str:
        return run_name(self.run_id)

    def describe(self) -> str:
        """One line for the run's tags and the job's log: when, and what changed."""
        changed = ", ".join(f"{_flag(n)} {old} -> {new}" for n, (old, new) in self.changes.items()) or "no flag"
        return f"continued at {lifeline.when(time.time())}: {changed}"


def check_data(run, fingerprint: str) -> None:
    recorded = run.data.params.get("data_fingerprint")
    if recorded and recorded != fingerprint:
        raise ResumeRefused(
            f"--resume {run.info.run_id}: the data differs from what the run trained on (fingerprint "
            f"{fingerprint[:12]}, the run's {recorded[:12]}, data {run.data.params.get('data_resolved')!r})"
        )


def checkpoint_folders(storage_uri: str, run_name: str) -> tuple[Any, list[str]]:
    """The filesystem and the checkpoint folders of Ray Train's run `run_name` under `storage_uri`, oldest
    first (Ray names them by time); none when the run has no folder there."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(storage_uri, run_name))
    folders = sorted(
        info.path
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )
    return fs, folders


def unlogged_epochs(storage_uri: str, run_name: str, logged: frozenset[int]) -> list[dict[str, Any]]:
    """The reports of the epoch-end checkpoints of Ray Train's run `run_name` under `storage_uri` whose
    epochs MLflow lacks, oldest first."""
    fs, folders = checkpoint_folders(storage_uri, run_name)
    found = {}
    for folder in folders:
        try:
            report = json.loads(storage.read_bytes(fs, f"{folder}/{checkpoint.METRICS_FILE}"))
        except FileNotFoundError:  # written before checkpoints carried their report
            continue
        if not report["within_epoch"] and report["epoch"] not in logged:
            found[report["epoch"]] = report["metrics"]
    return [found[epoch] for epoch in sorted(found)]


def latest_checkpoint(storage_uri: str, run_name: str) -> str:
    """The newest checkpoint of Ray Train's run `run_name`, in words ("" when there is none)."""
    try:
        fs, folders = checkpoint_folders(storage_uri, run_name)
        if not folders:
            return ""
        report = json.loads(storage.read_bytes(fs, f"{folders[-1]}/{checkpoint.METRICS_FILE}"))
    except (OSError, ValueError) as e:  # the storage may be what failed
        return f"unknown: the checkpoints under {storage_uri} cannot be read ({e})"
    metrics = report["metrics"]
    where = (
        f"inside epoch {report['epoch'] + 1}, at step {metrics.get('step')}"
        if report["within_epoch"]
        else f"at the end of epoch {report['epoch'] + 1}"
    )
    location = folders[-1] if "://" not in storage_uri else f"{storage_uri.split('://')[0]}://{folders[-1]}"
    return f"the checkpoint {where} ({location})"


def check_epochs_left(continuation: Continuation, logged: frozenset[int]) -> None:
    """A run that trained every epoch it was asked for has nothing to continue unless --epochs grows."""
    done = max(logged, default=-1) + 1
    if done >= continuation.config.epochs:
        raise ResumeRefused(
            f"--resume {continuation.run_id}: the run has trained all {done} of its --epochs "
            f"{continuation.config.epochs}; give a larger --epochs to train it further"
        )


def _flag(name: str) -> str:
    return name.replace("_", "-")
