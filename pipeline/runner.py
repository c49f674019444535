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

import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline import checkpoint, config, data, registry, sample, tracking
from pipeline.config import Config
from pipeline.lighting import IMAGENET as IMAGENET_LIGHTING
from pipeline.lighting import Lighting


def resolve_data(cfg: Config) -> data.Source:
    """The dataset the run trains on; the generated sample when --data is empty with --preset sample."""
    if not cfg.data and cfg.preset != "sample":
        # An unset $DATA would otherwise train the paper's network for 90 epochs on ten drawn patterns.
        raise ValueError(f"--data is empty: --preset {cfg.preset} needs a dataset (a folder in ImageNet layout, "
                         f"prepared shards, s3://...); the generated sample is the default of --preset sample only")
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
            f"{cfg.worker_batch_size} images (--batch-size {cfg.batch_size}). Use a smaller --batch-size or more data")
    if val == 0:
        raise ValueError(f"{source.uri} has no val images: validation, the schedule and the registry need some")


# Where object storage is: every task that reads s3:// needs it. Credentials are not forwarded; each
# node reads them from its own AWS chain (environment, profile, instance role). And whether MLflow
# draws download bars, which the Train controller would print into the job's log.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


def submitted_job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env this job was submitted with (`ray job submit --runtime-env`). Ray
    gives them to every task of the job already, and refuses to start a driver whose ray.init names one
    of them again ("Failed to merge the Job's runtime env"), even with the same value."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def connect_ray(*, train_workers: int = 0, address: str = "") -> None:
    """Join the Ray cluster the user points at, else start a private local Ray for this job alone.

    Pointed at: `address` (--address), else RAY_ADDRESS, which `ray job submit` sets for the jobs it
    runs. Never found by looking (ray.init(address="auto")): that joins any Ray on this machine,
    another `python jobs/train.py`'s private instance included, and two jobs on one instance starve
    each other's data pipelines of CPUs until both hang. A private instance gets its own ports and
    session directory (ray.init(address="local")), so any number of jobs can run side by side.

    The private instance gets a logical CPU per train worker on top of the physical cores: on a
    2-core laptop two workers holding one CPU each would otherwise leave Ray Data none, and the
    job would wait forever for its first batch. It is this machine alone, with no autoscaler: on_private_ray()
    says whether this process is on it (check_placeable refuses there what this machine cannot hold).
    """
    global _private_gcs_address
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k) and k not in submitted_job_env_vars()}
    runtime_env = {"env_vars": env} if env else None
    source = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + train_workers, runtime_env=runtime_env)
        _private_gcs_address = ray.get_runtime_context().gcs_address
        return
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as e:
        # Ray 2.60 turns token authentication on for `ray start` clusters, and an explicit address never
        # turns it on in the client: its refusal reads like an absent cluster.
        auth = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if it runs with token authentication (the default of `ray start`), set RAY_AUTH_MODE=token")
        raise ConnectionError(
            f"cannot join the Ray cluster at {address!r} ({source}: {str(e).splitlines()[0]}): start one there "
            f"(`ray start --head`){auth}; or unset RAY_ADDRESS and drop --address to run on a private local "
            f"Ray") from None


# The GCS address of the private local Ray connect_ray started in this process, if it did: that Ray is this
# machine alone, and never has an autoscaler.
_private_gcs_address: str | None = None


def on_private_ray() -> bool:
    """Whether this process is connected to the private local Ray that connect_ray started for it."""
    import ray

    return (_private_gcs_address is not None and ray.is_initialized()
            and ray.get_runtime_context().gcs_address == _private_gcs_address)


# How long has_autoscaler waits for the cluster's monitor to publish its first report (it publishes one every
# AUTOSCALER_UPDATE_INTERVAL_S, 5 s by default): a cluster that has just started may not have one yet.
AUTOSCALER_REPORT_WAIT_S = 12.0


def has_autoscaler(wait_s: float = AUTOSCALER_REPORT_WAIT_S) -> bool:
    """Whether the Ray cluster this process is connected to has an autoscaler that can add nodes.

    Ray 2.60 has no public API that says so. This reads what `ray status` reads: the report the cluster's
    monitor (autoscaler v1, Ray's default) writes to the GCS's internal KV store every round. Every Ray head
    runs a monitor; without an autoscaling config (`ray start --head`, ray.init(), KubeRay without
    enableInTreeAutoscaling) it runs a read-only provider that only mirrors the nodes there are, each
    typed by its own id ("node_<node id>", ray.autoscaler._private.util.format_readonly_node_type). With a
    config (the cluster launcher, KubeRay's autoscaler, tests/fake_cloud.py) the nodes carry the config's
    node-type names. (ray._private.state.state.get_cluster_config(), which Ray Data and Train read, stays
    empty under both of Ray's open-source autoscalers.)

    Only a report that shows the read-only provider answers False. Anything this cannot read (no report
    within wait_s, autoscaler v2, which writes none, a format it does not know) answers True: a job that
    might still get its nodes is never refused. tests/test_gpu_requests.py guards the format on a real
    local Ray (False), and tests/test_cluster_jobs.py's job on the fake autoscaling cluster fails if this
    says False there.
    """
    from ray._private import ray_constants
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental import internal_kv

    if is_autoscaler_v2(fetch_from_server=True):
        return True
    deadline = time.monotonic() + wait_s
    while True:
        # The monitor's first reports, before its autoscaler has run a round, have no autoscaler_report.
        raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        try:
            node_types = json.loads(raw)["autoscaler_report"]["node_type_mapping"]
        except (ValueError, KeyError, TypeError):
            node_types = None
        if isinstance(node_types, dict) and node_types:
            return any(node_type != format_readonly_node_type(node_id) for node_id, node_type in node_types.items())
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.5)


def _amount(name: str, n: float) -> str:
    if name in ("CPU", "GPU"):
        return f"{n:g} {name}{'' if n == 1 else 's'}"
    return f"{n:g} of the resource `{name}`"


def _shown(resources: dict[str, float]) -> str:
    """{GPU: 2, CPU: 1}: GPUs first, custom resources, CPUs last."""
    order = sorted(resources, key=lambda k: (k != "GPU", k == "CPU", k))
    return "{" + ", ".join(f"{k}: {resources[k]:g}" for k in order) + "}"


def _either(choices: list[str]) -> str:
    """a; a or b; a, b, or c"""
    if len(choices) < 3:
        return " or ".join(choices)
    return ", ".join(choices[:-1]) + ", or " + choices[-1]


def unplaceable(cfg: Config, resources: dict[str, float], nodes: list[dict[str, Any]]) -> tuple[str, str] | None:
    """Why the train workers' bundles (cfg.workers x `resources`, cfg.worker_strategy) fit on none of
    `nodes` (ray.nodes()) even when every node is idle, as (what the job asks for and what is missing,
    what the user can do); None when they fit. Each worker's bundle must fit on ONE node: the cluster's
    totals can hold 2 GPUs in two 1-GPU nodes while no node holds a worker that needs 2."""
    totals = [node.get("Resources") or {} for node in nodes if node.get("Alive")]
    wanted = {k: v for k, v in resources.items() if v > 0}
    holds = [min((int(total.get(k, 0.0) / v + 1e-9) for k, v in wanted.items()), default=cfg.workers)
             for total in totals]
    flags = []
    if cfg.use_gpu:
        flags += ["--use-gpu", "--placement grouped"] if cfg.placement == "grouped" else ["--use-gpu"]
    if cfg.train_resource:
        flags.append(f"--train-resource {cfg.train_resource}")
    if cfg.cpus_per_worker:
        flags.append(f"--cpus-per-worker {cfg.cpus_per_worker:g}")
    if cfg.worker_strategy.startswith("STRICT"):
        flags.append(f"--worker-strategy {cfg.worker_strategy}")
    asks = (f"{' '.join(flags) if flags else 'the job'} asks for {cfg.workers} train workers x "
            f"{_shown(resources)}")
    largest = {k: max((total.get(k, 0.0) for total in totals), default=0.0) for k in wanted}
    missing = [k for k in sorted(wanted, key=lambda k: (k != "GPU", k == "CPU", k)) if largest[k] < wanted[k]]
    remedies = []
    if max(holds, default=0) == 0:
        if missing:
            why = "no node of this Ray cluster has " + " or ".join(
                f"{_amount(k, wanted[k])} (the largest has {largest[k]:g})" for k in missing)
        else:
            why = f"no single node of this Ray cluster has all of {_shown(resources)}"
        if "GPU" in missing:
            remedies.append("drop --use-gpu")
            if cfg.placement == "grouped" and largest["GPU"] >= 1:
                remedies.append("use --placement data")
        if cfg.train_resource in missing:
            remedies.append(f"drop --train-resource {cfg.train_resource}")
        if cfg.cpus_per_worker and "CPU" in missing:
            remedies.append("use a smaller --cpus-per-worker")
        if "GPU" in missing:
            where = "GPU nodes"
        elif cfg.train_resource in missing:
            where = f"nodes that offer `{cfg.train_resource}`"
        else:
            where = "bigger nodes"
        remedies.append(f"point --address at a cluster with {where}")
        return f"{asks}; {why}", _either(remedies)
    if cfg.worker_strategy == "STRICT_PACK":
        fit = max(holds)
        why = f"--worker-strategy STRICT_PACK puts them all on one node, and the largest holds {fit}"
    elif cfg.worker_strategy == "STRICT_SPREAD":
        fit = sum(1 for h in holds if h)
        why = (f"--worker-strategy STRICT_SPREAD puts each on a node of its own, and {fit} "
               f"node{'' if fit == 1 else 's'} can hold one")
    else:
        fit, why = sum(holds), f"all the nodes of this Ray cluster together hold {sum(holds)} of them"
    if fit >= cfg.workers:
        return None
    remedies.append(f"use at most --workers {fit}" if fit else "use fewer --workers")
    if cfg.worker_strategy.startswith("STRICT"):
        remedies.append("use --worker-strategy PACK")
    remedies.append("point --address at a bigger cluster")
    return f"{asks}; {why}", _either(remedies)


def check_placeable(cfg: Config, resources: dict[str, float]) -> None:
    """Refuse at once, before anything starts, train workers that no node of the cluster can ever hold,
    when no autoscaler can add one: Ray Train would wait for them forever. With an autoscaler, say that
    the job waits for it to start such nodes, and go on."""
    import ray

    problem = unplaceable(cfg, resources, ray.nodes())
    if problem is None:
        return
    asks, remedies = problem  # what the job asks for and what is missing; what the user can do
    if on_private_ray():
        raise ValueError(f"{asks}, and this job's private local Ray (no --address, no RAY_ADDRESS) is this "
                         f"machine alone, with no autoscaler to add one: {remedies}")
    if not has_autoscaler():
        raise ValueError(f"{asks}, and the cluster has no autoscaler to add one: {remedies}")
    print(f"[ray] {asks} now: waiting for the cluster's autoscaler to start nodes with those resources",
          flush=True)


def worker_resources(cfg: Config, free_cpus: float, total_cpus: float | None = None) -> dict[str, float]:
    """CPUs (and GPUs) per train worker, leaving Ray Data at least one CPU.

    free_cpus: the CPUs no one holds now (ray.available_resources()), not the cluster's total: on a
    cluster shared with other jobs only those are ours to plan with. Explicit --cpus-per-worker is
    checked, not trusted: a request that leaves Ray Data no CPU on a CPU-only cluster is refused with
    the numbers, because the job would hang, not fail.
    """
    if cfg.use_gpu or cfg.train_resource:
        # The workers go to GPU (or --train-resource) nodes, which an autoscaler may not have started yet:
        # the CPUs free now are not the ones they will take, nor the ones Ray Data decodes on.
        resources = {"CPU": cfg.cpus_per_worker or 1.0}
        if cfg.use_gpu:
            resources["GPU"] = 2.0 if cfg.placement == "grouped" else 1.0
        if cfg.train_resource:
            resources[cfg.train_resource] = 1.0
        return resources
    cpus = cfg.cpus_per_worker or min(1.0, (free_cpus - 1.0) / cfg.workers)
    left_for_data = free_cpus - cpus * cfg.workers
    of = f" of the cluster's {total_cpus:g}" if total_cpus is not None and total_cpus != free_cpus else ""
    if cpus <= 0:
        raise ValueError(
            f"{free_cpus:g}{of} CPUs free: too few for {cfg.workers} train workers and the one CPU Ray Data needs "
            f"to feed them. Use a bigger cluster, or wait until other jobs on it finish.")
    if left_for_data < 1.0:
        raise ValueError(
            f"{cfg.workers} train workers x {cpus:g} CPU with {free_cpus:g}{of} CPUs free leaves Ray Data "
            f"{max(left_for_data, 0):g} CPU; it needs at least 1 to feed them. Use fewer --workers, a smaller "
            f"--cpus-per-worker, a bigger cluster, or wait until other jobs on it finish.")
    return {"CPU": cpus}


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


def run(cfg: Config, callbacks: Sequence[Any] = (), *, tags: dict[str, str] | None = None,
        register: bool = True) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics, where they were recorded and where the model went.

    callbacks: extra ray.train.UserCallback instances, beside the MLflow one.
    tags: extra tags on the MLflow run (an ablation's parent run and switches, ablate.py).
    register: False registers nothing (ablation runs: an experiment must never take `champion`).
    """
    import ray
    import ray.train
    from ray.data import DataContext
    from ray.train.torch import TorchTrainer

    from pipeline.train import train_loop_per_worker

    started = time.time()
    tracking_uri_from_env = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # before MLflow sets it for its children
    tracking_uri = tracking.resolve_tracking_uri()
    tracking.check_server(tracking_uri)  # first: a dead server is answered in one line, before anything starts
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
    connect_ray(train_workers=cfg.workers, address=cfg.address)
    resources = worker_resources(cfg, ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU"))
    check_placeable(cfg, resources)  # else a request no node can hold waits in fit() forever
    # The datasets copy this context when they are built, and Ray Train's SplitCoordinator actors, which
    # execute them in other processes, run with that copy: setting it here reaches them.
    DataContext.get_current().enable_progress_bars = interactive

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
    }, tags={"data_fingerprint": data_fingerprint, **(tags or {})})
    run_id = run_info.run_id
    print(f"[mlflow] run {run_id} in experiment {cfg.experiment!r} at {tracking_uri}")

    recorder = None
    storage = storage_path(cfg)
    with sigterm_as_interrupt() as caught:
        try:
            report = data.DecodeFailures.remote()
            resume_point = data.ResumePoint.remote()
            recorder = tracking.start_recorder(tracking_uri=tracking_uri, run_id=run_id, data_uri=source.uri,
                                               data_fingerprint=data_fingerprint, decode_failures=report)
            callback = tracking.MLflowCallback(recorder, epochs=cfg.epochs, log_models=cfg.log_models)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"config": cfg.to_dict(), "num_classes": source.num_classes,
                                   "lighting": lighting.to_dict(), "classes": list(source.wnids),
                                   "words": class_words(cfg, source), "train_images": source.images.get("train"),
                                   "progress_interval_s": 0.0 if interactive else PROGRESS_INTERVAL_S,
                                   "decode_failures": report,   # --decode-on gpu: the workers report there
                                   "resume_point": resume_point},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                    placement_strategy=cfg.worker_strategy),
                datasets={"train": data.train_dataset(source, cfg, report),
                          "val": data.val_dataset(source, cfg, report)},
                dataset_config=data.TrainValDataConfig(execution_options=data.execution_options(cfg),
                                                       resume_point=resume_point),
                run_config=ray.train.RunConfig(
                    name=f"alexnet-{run_id[:12]}",
                    storage_path=storage,
                    failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                    checkpoint_config=checkpoint.keep_policy(cfg.keep_checkpoints),
                    callbacks=[callback, *callbacks],
                ),
            )
            try:
                result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                restarts = "no restarts" if cfg.max_failures == 0 else f"all {cfg.max_failures} restarts used"
                raise TrainingFailed(f"training failed, {restarts} (--max-failures {cfg.max_failures}); the last "
                                     f"attempt ended with: {e}") from e
            delivery = wait_for_records(recorder, tracking_uri, TRACKING_WAIT_S, checkpoints=result.path)
            if register:
                registration = registry.register_best(
                    tracking_uri=tracking_uri, run_id=run_id, name=model_name, lineage={
                        "git_sha": tracking.git_sha(), "data_uri": source.uri, "data_fingerprint": data_fingerprint,
                        "data_kind": source.kind, "preset": cfg.preset, "val_images": source.images.get("val"),
                        "switches": config.describe(config.switched(cfg)) or "none"})
            else:
                registration = registry.Registration(model_name, None, False, "nothing registered: not asked to "
                                                                              "(an ablation run)")
            final = {k: result.metrics[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss")}
            tracking.finish_run(tracking_uri, run_id, "FINISHED", {
                "final_val_top1": final["val_top1"], "final_val_top5": final["val_top5"],
                "registered": registration.uri or "nothing", "registration": registration.message,
                **delivery_tags(delivery)})
        except tracking.RecordsNotDelivered:
            tracking.abandon_run()
            raise
        except BaseException as e:
            # Ray Train answers Ctrl-C (and SIGTERM, above) by aborting the workers and leaving fit() with
            # SystemExit; anywhere else it is KeyboardInterrupt.
            if caught or isinstance(e, (KeyboardInterrupt, SystemExit)):
                name = caught[0] if caught else "SIGINT"
                close_unfinished_run(recorder, tracking_uri, run_id, "KILLED", {"stopped_by": name}, storage)
                raise RunInterrupted(name, run_id) from None
            close_unfinished_run(recorder, tracking_uri, run_id, "FAILED", {"error": f"{type(e).__name__}: {e}"},
                                 storage)
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
        "tracking": delivery,
    }


# How long a finished job waits for a tracking server that is down to take the records it holds, and how
# long a failed or interrupted one waits before it closes the run.
TRACKING_WAIT_S = 300.0
TRACKING_WAIT_ON_FAILURE_S = 30.0


def wait_for_records(recorder, tracking_uri: str, timeout: float, checkpoints: str) -> dict[str, Any]:
    """Wait until the Recorder has delivered every record; returns its account (tracking.Recorder.flush).
    Raises RecordsNotDelivered, naming them, when the server has not taken them within `timeout`."""
    import ray

    waiting = ray.get(recorder.flush.remote(0.0))["pending"]
    if waiting:
        print(f"[mlflow] waiting up to {timeout:.0f} s for {tracking_uri} to take {len(waiting)} records",
              file=sys.stderr)
    delivery = ray.get(recorder.flush.remote(timeout))
    if delivery["pending"]:
        raise tracking.RecordsNotDelivered(tracking_uri, delivery["pending"] + delivery["undelivered"],
                                           waited=timeout, checkpoints=checkpoints)
    return delivery


def close_unfinished_run(recorder, tracking_uri: str, run_id: str, status: str, summary: dict[str, Any],
                         checkpoints: str) -> None:
    """Close a run that did not finish: first what its epochs reported, then its status and why. With the
    server gone, say what is lost and let go of the run."""
    try:
        if recorder is not None:
            wait_for_records(recorder, tracking_uri, TRACKING_WAIT_ON_FAILURE_S, checkpoints)
    except tracking.RecordsNotDelivered as lost:
        print(f"[mlflow] {lost}", file=sys.stderr)
        tracking.abandon_run()
        return
    tracking.finish_run(tracking_uri, run_id, status, summary)


def delivery_tags(delivery: dict[str, Any]) -> dict[str, Any]:
    """What a tracking outage cost, as tags on the run: nothing when there was none."""
    tags = {}
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


def where_it_went(summary: dict[str, Any]) -> str:
    """The job's last lines: the result, the MLflow run, the registered model and how to use it."""
    registration = summary["registration"]
    lines = [
        f"\nfinal val top-1 {summary['val_top1']:.1f}%  top-5 {summary['val_top5']:.1f}%  "
        f"(best top-1 {summary['best_val_top1']:.1f}%) in {summary['seconds']:.0f} s",
    ]
    delivery = summary.get("tracking") or {}
    if delivery.get("retries"):
        lines.append(f"tracking: {summary['tracking_uri']} was down (longest {delivery['outage_s']:.0f} s); "
                     f"training went on and the records were delivered when it answered again")
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
