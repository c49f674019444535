"""Joining a Ray cluster, or starting a private one, and what the train workers ask of it.

    connect_ray(address=...)         join --address / RAY_ADDRESS (`ray job submit`), else a private local Ray
                                     (which pipeline/reaper.py ends if this process dies without shutting it down);
                                     verbose=False keeps Ray's healthy-run chatter off the console (quiet_console)
    worker_resources(cfg, free)      CPUs (and GPUs) per train worker, leaving Ray Data at least one CPU
    plan_workers(cfg)                the same on the CPUs free now, waiting a few seconds for work that just ended
    check_placeable(cfg, resources)  refuse at once workers no node can ever hold when no autoscaler can add one
    FORWARDED_ENV                    the environment every task of the job needs (object storage's endpoint)

The training driver, the evaluation job, the prepare job and the ablations all start here, so a job
can never deadlock on a 2-core laptop nor wait for ever for GPUs that cannot come.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from pipeline.config import Config

# Where object storage is: every task that reads s3:// needs it. Credentials are not forwarded; each
# node reads them from its own AWS chain (environment, profile, instance role). And whether MLflow
# draws download bars, which the Train controller would print into the job's log.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "STORAGE_EMULATOR_HOST",  # a GCS emulator (gs://), as AWS_ENDPOINT_URL is for s3://
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
)


def submitted_job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env this job was submitted with (`ray job submit --runtime-env`). Ray
    gives them to every task of the job already, and refuses to start a driver whose ray.init names one
    of them again ("Failed to merge the Job's runtime env"), even with the same value."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def connect_ray(*, train_workers: int = 0, address: str = "", verbose: bool = False) -> None:
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
    A private instance ends with this process, however it ends: pipeline/reaper.py, started beside it,
    stops what is left of it once this process is gone (SIGKILL included); a joined cluster is never touched.

    verbose=False (--verbose off): the lines Ray Train and Ray Data print on every healthy run stay out of
    this process's console (quiet_console); Ray's log files keep them.
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
        # Every process of the private Ray runs find_own_ray() first.
        hook = {"worker_process_setup_hook": f"{__name__}.{find_own_ray.__name__}"}
        ray.init(
            address="local", num_cpus=(os.cpu_count() or 1) + train_workers, runtime_env={**(runtime_env or {}), **hook}
        )
        _private_gcs_address = ray.get_runtime_context().gcs_address
        start_reaper()
        quiet_console(verbose)
        return
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as e:
        # Ray 2.60 turns token authentication on for `ray start` clusters, and an explicit address never
        # turns it on in the client: its refusal reads like an absent cluster.
        auth = (
            ""
            if os.environ.get("RAY_AUTH_MODE") == "token"
            else ("; if it runs with token authentication (the default of `ray start`), set RAY_AUTH_MODE=token")
        )
        raise ConnectionError(
            f"cannot join the Ray cluster at {address!r} ({source}: {str(e).splitlines()[0]}): start one there "
            f"(`ray start --head`){auth}; or unset RAY_ADDRESS and drop --address to run on a private local "
            f"Ray"
        ) from None
    quiet_console(verbose)


def find_own_ray() -> None:
    """Run by every worker process of a private Ray as it starts (runtime_env's worker_process_setup_hook): sets
    RAY_ADDRESS to this Ray's GCS. Ray Train's PlacementGroupCleaner asks Ray's state API for the controller
    with no address, which, with several Rays on one machine (jobs side by side), fails with "Found multiple
    active Ray instances": its thread died with a 26-line traceback, and stopped watching the controller."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # an empty one inherited included


_reaper: subprocess.Popen | None = None


def start_reaper() -> None:
    """pipeline/reaper.py, watching this process: once it is gone, it ends what is left of its private Ray.
    One per process (it watches all of this process's descendants, a later private Ray's included). In a session
    of its own, so that a kill of this process's group spares it; with no stream of this process's, so that
    nobody reading this process's output waits for it."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "pipeline.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# The lines Ray prints on every healthy run, which quiet_console keeps off the console (Ray 2.60's wording; the
# files under the session's logs/ keep them). Ray Train: every ray.train.report() of every worker, with the
# whole metrics dict; every checkpoint; the worker group's start. Ray Data: each dataset's execution plan,
# start and end, every epoch. Everything else (warnings, errors, restarts, the job's own lines) passes.
HEALTHY_CHATTER = re.compile(
    "|".join(
        [
            r"^Reporting training result \d+: TrainingReport\(",
            r"^Checkpoint successfully created at: ",
            r"^Requesting resources: ",
            r"^Attempting to start training worker group ",
            r"^Started training worker group of size \d+:",
            r"^- \(ip=\S+, pid=\d+\) world_rank=\d+, local_rank=\d+, node_rank=\d+$",
            r"^Setting up process group for: ",
            r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store",
            r"^Starting execution of Dataset \S+\.",
            r"^Execution plan of Dataset \S+: ",
            r"Dataset \S+ execution finished in [\d.]+ seconds",
            r"^Progress bars disabled\. To enable, set ",
            r"^Progress will be logged because stdout is a non-interactive terminal",
            r"^\[dataset\]: A new progress UI is available",
        ]
    )
)


def without_tracebacks(lines) -> list[str]:
    """`lines` without blank lines and Python traceback frames ("Traceback (most recent call last):", each
    `  File "..."` line, its source line and carets): the error lines stay. A failing run's workers and Ray
    Data's executors print a traceback for every error, hundreds of lines; the job's closing paragraph names
    the root cause and the file that holds every worker's traceback (driver.closing_lines)."""
    kept: list[str] = []
    in_frame = False
    for line in lines:
        if not line.strip() or line.startswith("Traceback (most recent call last)"):
            continue
        if _FRAME.match(line):
            in_frame = True
            continue
        if in_frame and (line.startswith("    ") or _CARETS.match(line)):
            continue  # the frame's source line and its carets
        in_frame = False
        if not line.startswith(("During handling of the above exception", "The above exception was the direct")):
            kept.append(line)
    return kept


_FRAME = re.compile(r'^\s*File "[^"]+", line \d+')
_CARETS = re.compile(r"^\s*[\^~]+\s*$")


def quiet_console(verbose: bool) -> None:
    """Keep HEALTHY_CHATTER of Ray's processes off this process's console, unless `verbose`.

    Ray's processes do not log to this console: the driver prints what they write, batch by batch
    (log_to_driver), through the handler that ray.init registers as "ray_print_logs" with
    ray._private.ray_logging.global_worker_stdstream_dispatcher. This wraps that handler to drop those lines
    first. Python logging levels set here would not reach those processes, and the settings that would (Ray
    Train's RunConfig(logging_config=...) for `ray.train` loggers, RAY_DATA_LOG_LEVEL in the runtime_env for
    `ray.data`'s) leave out "Reporting training result" (logged by a logger named after its file, through
    the worker's root logger) and silence warnings and restarts too. ray.shutdown() removes the wrapper with
    the handler; the next ray.init() registers a new one."""
    if verbose:
        return
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
    if len(printers) != 1 or getattr(printers[0], "quiet", False):  # log_to_driver=False, or wrapped already
        return
    print_logs = printers[0]

    def quiet(data: dict[str, Any]) -> None:
        # Blank lines too (without_tracebacks): Ray Train's workers print through a logger, which follows each
        # progress bar update (ray.experimental.tqdm_ray's line ends in a newline of its own) with an empty line.
        lines = [line for line in without_tracebacks(data.get("lines", ())) if not HEALTHY_CHATTER.search(line)]
        if lines or not data.get("lines"):
            print_logs({**data, "lines": lines})

    quiet.quiet = True  # type: ignore[attr-defined]
    # One assignment, as remove_handler makes it: no batch finds the dispatcher without a printer.
    dispatcher.handlers = [(name, quiet if name == "ray_print_logs" else h) for name, h in dispatcher.handlers]


# The GCS address of the private local Ray connect_ray started in this process, if it did: that Ray is this
# machine alone, and never has an autoscaler.
_private_gcs_address: str | None = None


def on_private_ray() -> bool:
    """Whether this process is connected to the private local Ray that connect_ray started for it."""
    import ray

    return (
        _private_gcs_address is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _private_gcs_address
    )


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
    holds = [
        min((int(total.get(k, 0.0) / v + 1e-9) for k, v in wanted.items()), default=cfg.workers) for total in totals
    ]
    flags = []
    if cfg.use_gpu:
        flags += ["--use-gpu", "--placement grouped"] if cfg.placement == "grouped" else ["--use-gpu"]
    if cfg.train_resource:
        flags.append(f"--train-resource {cfg.train_resource}")
    if cfg.cpus_per_worker:
        flags.append(f"--cpus-per-worker {cfg.cpus_per_worker:g}")
    if cfg.worker_strategy.startswith("STRICT"):
        flags.append(f"--worker-strategy {cfg.worker_strategy}")
    asks = f"{' '.join(flags) if flags else 'the job'} asks for {cfg.workers} train workers x {_shown(resources)}"
    largest = {k: max((total.get(k, 0.0) for total in totals), default=0.0) for k in wanted}
    missing = [k for k in sorted(wanted, key=lambda k: (k != "GPU", k == "CPU", k)) if largest[k] < wanted[k]]
    remedies = []
    if max(holds, default=0) == 0:
        if missing:
            why = "no node of this Ray cluster has " + " or ".join(
                f"{_amount(k, wanted[k])} (the largest has {largest[k]:g})" for k in missing
            )
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
        why = (
            f"--worker-strategy STRICT_SPREAD puts each on a node of its own, and {fit} "
            f"node{'' if fit == 1 else 's'} can hold one"
        )
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
        raise ValueError(
            f"{asks}, and this job's private local Ray (no --address, no RAY_ADDRESS) is this "
            f"machine alone, with no autoscaler to add one: {remedies}"
        )
    if not has_autoscaler():
        raise ValueError(f"{asks}, and the cluster has no autoscaler to add one: {remedies}")
    print(f"[ray] {asks} now: waiting for the cluster's autoscaler to start nodes with those resources", flush=True)


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
            f"to feed them. Use a bigger cluster, or wait until other jobs on it finish."
        )
    if left_for_data < 1.0:
        raise ValueError(
            f"{cfg.workers} train workers x {cpus:g} CPU with {free_cpus:g}{of} CPUs free leaves Ray Data "
            f"{max(left_for_data, 0):g} CPU; it needs at least 1 to feed them. Use fewer --workers, a smaller "
            f"--cpus-per-worker, a bigger cluster, or wait until other jobs on it finish."
        )
    return {"CPU": cpus}


# Work that has just ended (the tasks of a job or dataset that finished a moment ago) hands its CPUs back
# within seconds: a plan that finds too few free asks again for this long before it refuses.
CPU_SETTLE_S = 20.0


def plan_workers(cfg: Config, settle_s: float = CPU_SETTLE_S) -> dict[str, float]:
    """worker_resources on the CPUs free now, asked again every second for up to `settle_s` while they are
    too few; then its error, with the numbers."""
    import ray

    deadline = time.monotonic() + settle_s
    while True:
        try:
            return worker_resources(cfg, ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU"))
        except ValueError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)
