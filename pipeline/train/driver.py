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

Logs: on a terminal rank 0 draws one progress bar per epoch; off one (CI, `ray job logs`, a redirected
file) it prints a progress line every PROGRESS_INTERVAL_S instead, and one line per epoch either way. Ray
Train's and Ray Data's lines of a healthy run are off unless --verbose (cluster.quiet_console).

A run outlives its driver (lifeline.py: a detached Recorder closes a run whose driver died; resume.py:
--resume continues it in a new job), and a failure ends the job in one paragraph (failures.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import cluster, config, data
from pipeline.config import Config
from pipeline.data import sample
from pipeline.data.storage import check_location, train_filesystem
from pipeline.models import checkpoint
from pipeline.tracking import lifeline, recording, registry, runs
from pipeline.train import failures, resume
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
    """Training failed: at once on a failure another try cannot mend (failures.is_permanent), else after
    --max-failures restarts. str() is one line; paragraph() the job's closing words, once the driver has
    closed the run and said where (`closing`); `details` Ray's full account, worker tracebacks included."""

    def __init__(self, error: BaseException, max_failures: int):
        self.cause = failures.describe(error)
        self.permanent = failures.is_permanent(error)
        if self.permanent:
            how = "another try would meet the same error, so no restart was spent on it"
        else:
            how = "no restarts" if max_failures == 0 else f"all {max_failures} restarts used"
            how += f" (--max-failures {max_failures})"
        super().__init__(f"training failed, {how}: {self.cause}")
        self.details = failures.details(error)
        self.closing: list[str] = []

    def paragraph(self) -> str:
        return "\n".join([f"error: {self}", *self.closing])


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; its MLflow run is marked KILLED."""

    def __init__(self, signal_name: str, run_id: str):
        super().__init__(f"{signal_name}: MLflow run {run_id} marked KILLED")
        self.signal_name, self.run_id = signal_name, run_id

    @property
    def exit_code(self) -> int:  # the shell's convention: 128 + the signal's number
        return 128 + (signal.SIGTERM if self.signal_name == "SIGTERM" else signal.SIGINT)


class CaughtSignals(list):
    """The names of the signals caught; `announce(name)` (if set) is told first, before anything else runs."""

    announce: Callable[[str], None] | None = None


@contextmanager
def sigterm_as_interrupt() -> Iterator[CaughtSignals]:
    """SIGTERM (`kill`, a scheduler stopping the job) takes the path Ctrl-C takes: during fit() Ray Train's
    SIGINT handler, which aborts the workers gracefully; elsewhere KeyboardInterrupt. Python's default
    for SIGTERM is to die on the spot, which would leave the MLflow run RUNNING. Yields the list of
    signals caught this way; restores both handlers on the way out."""
    caught = CaughtSignals()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield caught
        return

    def on_sigterm(signum, frame):
        caught.append("SIGTERM")
        if caught.announce is not None:  # `ray job stop` kills the driver a few seconds after its SIGTERM
            caught.announce("SIGTERM")
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
    """A readable name per class: the sample's drawn patterns; ImageNet's words where the data carries
    them (prepared shards whose source had the devkit or LOC_synset_mapping.txt); else none."""
    if not cfg.data:
        return list(sample.PATTERNS[: source.num_classes])
    return list(source.words)


def run(
    cfg: Config,
    callbacks: Sequence[Any] = (),
    *,
    tags: dict[str, str] | None = None,
    register: bool = True,
    given: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics, where they were recorded and where the model went.

    callbacks: extra ray.train.UserCallback instances, beside the MLflow one.
    tags: extra tags on the MLflow run (an ablation's parent run and switches, ablate.py).
    register: False registers nothing (ablation runs: an experiment must never take `champion`).
    given: with --resume, the fields the command line set (config.given_fields); the others are the run's.
    None: every field of `cfg` counts as given.
    """
    import pyarrow as pa
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = time.time()
    tracking_uri_from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # before MLflow sets it for its children
    tracking_uri = runs.resolve_tracking_uri()
    recording.check_server(tracking_uri)  # first: a dead server is answered in one line, before anything starts
    for lost in lifeline.mark_lost_runs(tracking_uri, cfg.experiment):
        print(
            f"[mlflow] run {lost}: its driver is gone (no heartbeat); marked FAILED. Continue it with --resume {lost}"
        )
    continuation = None
    if cfg.resume:
        previous = resume.find_run(tracking_uri, cfg.experiment, cfg.resume)
        continuation = resume.Continuation.of(previous, cfg, given, tracking_uri, storage_path(cfg))
        cfg = continuation.config
        print(f"[resume] run {continuation.run_id}: {continuation.describe()}")
    if cfg.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = cfg.s3_endpoint  # read here, and forwarded to every Ray task
    source = resolve_data(cfg)
    check_enough_data(cfg, source)
    check_location(continuation.storage if continuation else cfg.storage_path, "--storage-path")  # before Ray
    recovered: list[dict[str, Any]] = []
    if continuation is not None:  # every refusal before the run is reopened
        resume.check_data(previous, source.fingerprint)
        recovered = resume.unlogged_epochs(continuation.storage, continuation.run_name, continuation.logged_epochs)
        resume.check_epochs_left(continuation, continuation.logged_epochs | {int(m["epoch"]) for m in recovered})
    counts = " / ".join(f"{source.images.get(s) or '?'} {s}" for s in data.SPLITS)
    print(f"[data] {source.uri}: {source.kind}, {counts} images, {source.num_classes} classes")
    lighting = Lighting.from_dict(source.lighting) if source.lighting else IMAGENET_LIGHTING
    model_name = registry.model_name(cfg.registered_model, sample=not cfg.data)

    # Off a terminal every redraw of a progress bar is a new line (a default run wrote 350 KB of them).
    interactive = sys.stdout.isatty()
    if not interactive:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # forwarded to Ray's processes
    cluster.connect_ray(train_workers=cfg.workers, address=cfg.address, verbose=cfg.verbose)
    source = source.by_reference()  # a folder's listing into the object store, once, and out of this process
    pa.default_memory_pool().release_unused()  # the memory it was built in (3x the listing's), back to the system
    resources = cluster.plan_workers(cfg)
    cluster.check_placeable(cfg, resources)  # else a request no node can hold waits in fit() forever
    # The datasets copy this context when they are built, and Ray Train's SplitCoordinator actors, which
    # execute them in other processes, run with that copy: setting it here reaches them.
    # A terminal gets one bar per epoch from rank 0 (worker.ProgressLines); Ray Data's own, several per
    # dataset, only with --verbose.
    DataContext.get_current().enable_progress_bars = interactive and cfg.verbose

    data_fingerprint = source.fingerprint
    storage = continuation.storage if continuation else storage_path(cfg)
    if continuation is not None:
        run_info = runs.reopen_run(tracking_uri, continuation.run_id, continuation.describe())
    else:
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
                "storage_resolved": storage,
            },
            tags={"data_fingerprint": data_fingerprint, **(tags or {})},
        )
    run_id = run_info.run_id
    print(f"[mlflow] run {run_id} in experiment {cfg.experiment!r} at {tracking_uri}")
    run_name = resume.run_name(run_id)
    logged = continuation.logged_epochs if continuation else frozenset()
    logged |= runs.log_recovered_epochs(tracking_uri, run_id, recovered)

    recorder = lifeline_ = None
    with sigterm_as_interrupt() as caught:
        try:
            # On the driver's node, as the Recorder: a train node that goes away must not take them along.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            report = data.ReadReport.options(scheduling_strategy=here).remote()
            resume_point = data.ResumePoint.options(scheduling_strategy=here).remote()
            recorder = recording.start_recorder(
                tracking_uri=tracking_uri,
                run_id=run_id,
                data_uri=source.uri,
                data_fingerprint=data_fingerprint,
                decode_failures=report,
                watch_driver=True,
                heartbeat_s=lifeline.HEARTBEAT_S,  # the driver's: the Recorder's process has its own environment
            )
            lifeline_ = lifeline.Lifeline(recorder)
            caught.announce = lifeline_.stopping
            callback = runs.MLflowCallback(
                recorder,
                epochs=cfg.epochs,
                log_models=cfg.log_models,
                logged_epochs=logged,
                best_top1=continuation.best_top1 if continuation else float("-inf"),
            )
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
            storage_fs, storage_in_fs = train_filesystem(storage)
            trainer = failures.Trainer(
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
                    name=run_name,
                    storage_path=storage_in_fs,
                    storage_filesystem=storage_fs,  # None for local, s3:// mostly (see train_filesystem); gs:// always
                    failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=checkpoint.keep_policy(cfg.keep_checkpoints),
                    callbacks=[callback, *callbacks],  # type: ignore[list-item]  # a Train V2 UserCallback
                ),
            )
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                raise TrainingFailed(e, cfg.max_failures) from None  # its details go to a file, not the console
            delivery = runs.wait_for_records(recorder, tracking_uri, runs.TRACKING_WAIT_S, checkpoints=result.path)
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
        except runs.RecordsNotDelivered:
            runs.abandon_run()
            raise
        except BaseException as e:
            # Ray Train answers Ctrl-C (and SIGTERM, above) by aborting the workers and leaving fit() with
            # SystemExit; anywhere else it is KeyboardInterrupt.
            if caught or isinstance(e, (KeyboardInterrupt, SystemExit)):
                name = caught[0] if caught else "SIGINT"
                stopped = {"stopped_by": name, "continue_with": f"--resume {run_id}"}
                runs.close_unfinished_run(recorder, tracking_uri, run_id, "KILLED", stopped, storage)
                raise RunInterrupted(name, run_id) from None
            runs.close_unfinished_run(
                recorder, tracking_uri, run_id, "FAILED", {"error": f"{type(e).__name__}: {e}"}, storage
            )
            if isinstance(e, TrainingFailed):
                e.closing = closing_lines(e, tracking_uri, run_id, run_info.experiment_id, storage, run_name)
            raise
        finally:
            if lifeline_ is not None:  # the run is closed (or let go of): the Recorder's watch ends with it
                lifeline_.stop()
            if recorder is not None:
                ray.kill(recorder)  # a detached actor: it would outlive the job otherwise

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


def closing_lines(
    failed: TrainingFailed, tracking_uri: str, run_id: str, experiment_id: str, storage: str, run_name: str
) -> list[str]:
    """After a failure: what was kept, how to continue, where the run and the full account are."""
    details = runs.save_failure_report(tracking_uri, run_id, failed.details, storage, run_name)
    kept = resume.latest_checkpoint(storage, run_name)
    lines = [f"  kept:     {kept or 'no checkpoint yet: a new run starts from the beginning'}"]
    if kept:
        fix = "once the cause is mended" if failed.permanent else "when the cause has passed"
        lines.append(f"  continue: python jobs/train.py --resume {run_id}   ({fix})")
    lines += [
        f"  run:      MLflow run {run_id} (FAILED): {runs.run_url(tracking_uri, run_id, experiment_id)}",
        f"  details:  every worker's traceback in {details} (and the run's artifact failures/final.txt)",
    ]
    return lines


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
        path, python = shell_prefix()
        uri = f"models:/{registration.name}@{registry.CHAMPION}" if registration.champion else registration.uri
        lines += [
            f"  classify JPEGs:  mlflow.pyfunc.load_model({uri!r})"
            f".predict(pandas.DataFrame({{'image': [jpeg_bytes]}}))",
            f"  serve it:        {path}{env}mlflow models serve -m {uri} --env-manager local --port 5001",
            f"  10-crop top-1:   {env}{python} {evaluate_job()} --model {uri}"
            + (f" --data {summary['data']}" if summary["data"] else ""),
        ]
    return "\n".join(lines)


def evaluate_job() -> str:
    """jobs/evaluate.py as a shell in this folder reaches it: relative from the repository's root."""
    job = Path(__file__).resolve().parents[2] / "jobs" / "evaluate.py"
    return "jobs/evaluate.py" if Path("jobs/evaluate.py").resolve() == job else str(job)


def shell_prefix() -> tuple[str, str]:
    """(a PATH assignment, the python) that make the printed commands work pasted into a new shell: `make
    train` runs .venv/bin/python without the venv on the PATH, where `mlflow` and the `uvicorn` it starts
    by name are not found. Relative to the current folder when the venv is inside it."""
    bin_dir = Path(sys.executable).parent
    if str(bin_dir) in os.environ.get("PATH", "").split(os.pathsep):
        return "", "python"
    shown = os.path.relpath(bin_dir) if bin_dir.is_relative_to(Path.cwd()) else str(bin_dir)
    return f"PATH={shown}:$PATH ", f"{shown}/python"
