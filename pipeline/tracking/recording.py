"""The Recorder: a training run's one writer to MLflow while it trains, whatever the server does.

    check_server(uri)      before anything starts: a server that does not answer is named in one line
    start_recorder(...)    the Recorder actor, on the driver's node (it reads the checkpoints Ray Train keeps)
    Recorder               per-epoch metrics and pipeline health, the epochs --log-models selects as logged
                           models (classifier.py) with their val_top1/top5, the pictures; while the server is
                           down it keeps them (bounded) and delivers them when it is back
    alive/stopping         the driver's lifeline (lifeline.py), on a thread of their own: a Recorder that
                           watches its driver is a detached actor; when the driver dies it delivers what it
                           holds and closes the run

runs.py waits for the records after fit() and closes the run.

The callback (runs.MLflowCallback) hands every report here and returns at once: a server restarting
mid-run costs no training time, only delay in the records.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray

from pipeline.models import checkpoint as checkpoints
from pipeline.tracking import pictures
from pipeline.tracking.lifeline import HEARTBEAT_S, HEARTBEAT_TAG, DriverWatch

# Pipeline health sits beside the accuracy: images_per_s (training throughput, all workers), the
# fraction of the training pass spent waiting for the next batch (data_wait_fraction, the slowest
# worker's), decode_failures (images left out so far) and storage_retries_<cause> (reads from object
# storage retried so far).
EPOCH_METRICS = (
    "train_loss",
    "train_top1",
    "train_top5",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "images_per_s",
    "data_wait_fraction",
    "epoch_seconds",
    "train_images",
    "train_steps",
)


MODEL_METRICS = ("val_loss", "val_top1", "val_top5")


CURVES = ("epoch", "train_loss", "val_loss", "train_top1", "val_top1", "val_top5")


PICTURES = "pictures"  # the run's artifact folder of PNGs


# The start-up probe's wait. A live server answers /health in milliseconds, and a refused connection fails
# at once; this bounds a host that swallows packets.
PROBE_TIMEOUT_S = 10.0


# While the server is down the Recorder retries its oldest record this often: one refused connection each.
RETRY_S = 2.0


# Times a record is tried while the server answers before it is given up as refused (a bad value, a bug).
ATTEMPTS_WHEN_UP = 3


# The bounded buffer. Logged models are the bulky records (244 MB of weights for the paper's network): while
# the server is down the newest wait and older ones are dropped (under --log-models best the newest are the
# best); a server that answers, however slowly, gets every one. Every other record is small (an epoch's
# metrics, a failure report) or replaces its own older version (a picture).
MAX_PENDING_MODELS = 2


MAX_PENDING_RECORDS = 10_000


class TrackingUnavailable(ConnectionError):
    """The tracking server does not answer."""


def server_down(tracking_uri: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Why an http(s) tracking server does not answer its /health, or "" when it does (any answer below
    HTTP 500 means a server is there). Stores that are not servers (sqlite, file) are never down."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout).close()
        return ""
    except urllib.error.HTTPError as e:  # before OSError: it is one
        return "" if e.code < 500 else f"HTTP {e.code} {e.reason}"
    except OSError as e:  # refused, reset, unknown host, timed out
        reason = getattr(e, "reason", e)  # URLError wraps the socket's error
        return getattr(reason, "strerror", None) or str(reason)


def check_server(tracking_uri: str) -> None:
    """Fail at once, in one line, when the tracking server does not answer: before Ray starts, and instead
    of MLflow's own retries (7 with backoff, about 4 minutes, then chained tracebacks)."""
    reason = server_down(tracking_uri)
    if reason:
        raise TrackingUnavailable(
            f"the MLflow tracking server {tracking_uri} does not answer ({reason}): start it, point "
            f"MLFLOW_TRACKING_URI at one that runs, or unset MLFLOW_TRACKING_URI to record into ./mlflow.db"
        )


@dataclass(eq=False)  # records are told apart by identity
class Record:
    """One thing to write to MLflow: `send` writes it, and can be called again after a failure."""

    name: str  # in words, for the report of what was not delivered
    send: Callable[[], None]
    kind: str = "record"  # "model" records count against MAX_PENDING_MODELS
    key: str = ""  # a newer record with the same key replaces this one while it waits
    attempts: int = 0  # failed tries while the server answered


# The driver's pings (alive, stopping) run on a thread of their own: the main one blocks in flush()
# for as long as the server takes (minutes while it is down), and pings queued behind it would make a
# driver that is waiting for its records look dead.
@ray.remote(num_cpus=0, concurrency_groups={"lifeline": 1})  # type: ignore[call-overload]  # Ray's stubs lack it
class Recorder:
    """The run's one writer to MLflow during training (module docstring).

    The callback hands it each report and returns at once; a thread of its own delivers the records in
    order. While the tracking server is down, training goes on and the records wait; the oldest is retried
    every RETRY_S and everything waiting follows as soon as the server answers again. The buffer is bounded
    (MAX_PENDING_MODELS, MAX_PENDING_RECORDS): what it drops, and what the server refuses while up, is named
    in `undelivered`, which the job puts on the run and in its last lines.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        run_id: str,
        data_uri: str,
        data_fingerprint: str,
        decode_failures=None,
        credentials: dict[str, str] | None = None,
        watch_driver: bool = False,
        heartbeat_s: float = HEARTBEAT_S,
    ):
        import mlflow

        # The driver's sign-in to a server with authentication (start_recorder): this actor's process is
        # its own, so the environment is where MLflow's client looks for them.
        os.environ.update(credentials or {})
        # Our own retry loop replaces MLflow's (7 retries with backoff, ~4 minutes per call): a record that
        # fails is kept and retried here, without blocking the records behind it for minutes. This process
        # is this actor's alone.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # its output is the driver's log, not a terminal
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.data_uri = data_uri
        self.data_fingerprint = data_fingerprint
        self.decode_failures = decode_failures  # a data.ReadReport actor, or None
        self.failures_logged = 0
        self.history: list[dict[str, float]] = []
        self.model_ids: dict[int, str] = {}  # epoch -> its logged model, once delivered

        self.pending: deque[Record] = deque()
        self.sending: Record | None = None
        self.undelivered: list[str] = []
        self.retries = 0  # tries that found the server down
        self.down_since: float | None = None
        self.outages: list[float] = []  # seconds from the first failed try to the next delivery
        self.changed = threading.Condition()
        threading.Thread(target=self._deliver, name="mlflow-delivery", daemon=True).start()
        self.watch = DriverWatch(run_id, self._stamp, self._driver_lost, heartbeat_s) if watch_driver else None

    # --- the driver's life (lifeline.py) ----------------------------------------------------------------------

    @ray.method(concurrency_group="lifeline")
    def alive(self) -> None:
        if self.watch is not None:
            self.watch.beat()

    @ray.method(concurrency_group="lifeline")
    def stopping(self, signal_name: str) -> None:
        if self.watch is not None:
            self.watch.signal = signal_name

    def _stamp(self, now: float) -> None:
        send = partial(_client(self.tracking_uri).set_tag, self.run_id, HEARTBEAT_TAG, str(int(now)))
        self._add(Record("driver heartbeat", send, key=HEARTBEAT_TAG))

    def _driver_lost(self, status: str, message: str) -> None:
        """What the epochs reported goes first, then the run's status and why; then this actor ends."""
        print(f"[mlflow] run {self.run_id}: {message}", file=sys.stderr, flush=True)
        self.flush(TRACKING_WAIT_ON_FAILURE_S)
        try:
            _client(self.tracking_uri).set_tag(self.run_id, "error", message)
            _client(self.tracking_uri).set_terminated(self.run_id, status=status)
        except Exception as e:  # the server is gone too: the heartbeat tells a later job (mark_lost_runs)
            print(f"[mlflow] could not close run {self.run_id}: {first_line(e)}", file=sys.stderr, flush=True)
        os._exit(0)  # a detached actor: nothing else would end it

    # --- what the callback hands over ----------------------------------------------------------------------

    def epoch(
        self,
        m: dict[str, Any],
        *,
        state: dict[str, Any] | None,
        train_batch_png: bytes | None,
        log_model: bool,
        improved: bool,
        checkpoint_path: str,
        reported_ms: int,
    ) -> None:
        """One report: the epoch's metrics (stamped with when it was reported, however late they are
        delivered), its logged model (when log_model) and pictures."""
        epoch = int(m["epoch"])
        try:
            if train_batch_png:
                self._picture(checkpoints.TRAIN_BATCH_FILE, train_batch_png)
            if log_model and state is not None:
                self._add(
                    Record(
                        f"logged model epoch-{epoch:03d} (val top-1 {m['val_top1']:.2f}%)",
                        partial(self._send_model, epoch, state, checkpoint_path),
                        kind="model",
                    )
                )
            if improved and state is not None:
                self._best_pictures(state, m)
            # The val metrics carry the logged model's id: one record, seen on the run and on the model.
            self._add(Record(f"metrics of epoch {epoch}", partial(self._send_metrics, epoch, m, reported_ms)))
            self.history.append({k: float(m[k]) for k in CURVES})

            self._picture("curves.png", pictures.curves_png(self.history))
            if self.decode_failures is not None:
                failures = ray.get(self.decode_failures.get.remote())
                self._add(
                    Record(
                        f"decode_failures of epoch {epoch}",
                        partial(
                            _client(self.tracking_uri).log_metric,
                            self.run_id,
                            "decode_failures",
                            len(failures),
                            timestamp=reported_ms,
                            step=epoch,
                        ),
                    )
                )
                if len(failures) > self.failures_logged:  # the report names each one, when it grew
                    self._add(
                        Record(
                            "decode_failures.json",
                            partial(
                                _client(self.tracking_uri).log_dict,
                                self.run_id,
                                dict(sorted(failures.items())),
                                "decode_failures.json",
                            ),
                            key="decode_failures.json",
                        )
                    )
                    self.failures_logged = len(failures)
                # Reads from object storage that had to be retried so far, per cause (storage.retries).
                for cause, count in ray.get(self.decode_failures.retries.remote()).items():
                    self._add(
                        Record(
                            f"storage retries ({cause}) of epoch {epoch}",
                            partial(
                                _client(self.tracking_uri).log_metric,
                                self.run_id,
                                f"storage_retries_{cause.replace(' ', '_')}",
                                count,
                                timestamp=reported_ms,
                                step=epoch,
                            ),
                        )
                    )
        except Exception as e:  # a bug here must not pass unseen: the callback does not wait for us
            self.undelivered.append(f"records of epoch {epoch}: {type(e).__name__}: {e}")

    def failure(self, text: str) -> None:
        """A failure of the worker group (the restart follows): the report as an artifact and a tag."""
        client = _client(self.tracking_uri)
        stamp = int(time.time())

        def send():
            client.log_text(self.run_id, text, f"failures/{stamp}.txt")
            client.set_tag(self.run_id, "last_failure", text[:5000])

        self._add(Record(f"failure report {stamp}", send))

    def flush(self, timeout: float) -> dict[str, Any]:
        """Wait up to `timeout` s for every record to be delivered; returns what happened:
        pending (still waiting: the server is down), undelivered (dropped or refused), retries, outage_s."""
        deadline = time.time() + timeout
        with self.changed:
            while (self.pending or self.sending) and time.time() < deadline:
                self.changed.wait(timeout=min(1.0, max(deadline - time.time(), 0.01)))
            return {
                "pending": [r.name for r in self.pending],
                "undelivered": list(self.undelivered),
                "retries": self.retries,
                "outage_s": round(max(self.outages, default=0.0), 1),
            }

    # --- the buffer and the delivery thread ------------------------------------------------------------------

    def _add(self, record: Record) -> None:
        with self.changed:
            if record.key:  # only the newest version of a picture is worth sending
                for old in [r for r in self.pending if r.key == record.key and r is not self.sending]:
                    self.pending.remove(old)
            waiting = [r for r in self.pending if r is not self.sending]  # the one in flight cannot be taken back
            if len(self.pending) >= MAX_PENDING_RECORDS:
                self._drop(waiting[0], f"{MAX_PENDING_RECORDS} records were waiting")
            self.pending.append(record)
            if self.down_since is not None:
                self._bound_models()
            self.changed.notify_all()

    def _bound_models(self) -> None:
        """While the server is down: keep the newest MAX_PENDING_MODELS logged models, drop the older ones."""
        models = [r for r in self.pending if r.kind == "model"]
        waiting = [r for r in models if r is not self.sending]  # the one in flight cannot be taken back
        for old in waiting[: max(len(models) - MAX_PENDING_MODELS, 0)]:
            self._drop(old, f"{MAX_PENDING_MODELS} newer logged models were waiting")

    def _drop(self, record: Record, why: str) -> None:
        self.pending.remove(record)
        self.undelivered.append(f"{record.name}: dropped while the tracking server was down ({why})")

    def _deliver(self) -> None:
        while True:
            with self.changed:
                while not self.pending:
                    self.changed.wait()
                record = self.sending = self.pending[0]
            try:
                record.send()
                error = None
            except Exception as e:  # MlflowException, or requests' own for a connection that broke midway
                error = e
            down = server_down(self.tracking_uri, timeout=RETRY_S) if error is not None else ""
            with self.changed:
                self.sending = None
                if down:  # keep it, and everything behind it, for when the server is back
                    self.retries += 1
                    if self.down_since is None:
                        self.down_since = time.time()
                        print(
                            f"[mlflow] {self.tracking_uri} does not answer ({down}); training goes on and its "
                            f"records wait, retried every {RETRY_S:g} s",
                            file=sys.stderr,
                        )
                        self._bound_models()
                else:
                    if self.down_since is not None:
                        self.outages.append(time.time() - self.down_since)
                        self.down_since = None
                        print(
                            f"[mlflow] {self.tracking_uri} answers again after {self.outages[-1]:.0f} s; "
                            f"delivering {len(self.pending)} waiting records",
                            file=sys.stderr,
                        )
                    if error is not None:
                        record.attempts += 1
                    if error is None or record.attempts >= ATTEMPTS_WHEN_UP:
                        if record in self.pending:  # a newer version may have replaced it meanwhile
                            self.pending.remove(record)
                        if error is not None:
                            self.undelivered.append(
                                f"{record.name}: refused ({type(error).__name__}: {first_line(error)})"
                            )
                self.changed.notify_all()
            if error is not None:
                time.sleep(RETRY_S)

    def _send_metrics(self, epoch: int, m: dict[str, Any], timestamp: int) -> None:
        import mlflow

        model_id = self.model_ids.get(epoch)
        on_model = (
            {"model_id": model_id, "dataset_name": self.data_uri, "dataset_digest": self.data_fingerprint[:32]}
            if model_id
            else {}
        )
        _client(self.tracking_uri).log_batch(
            self.run_id,
            metrics=[
                mlflow.entities.Metric(k, float(m[k]), timestamp, epoch, **(on_model if k in MODEL_METRICS else {}))
                for k in EPOCH_METRICS
                if k in m
            ],
        )

    def _send_model(self, epoch: int, state: dict[str, Any], checkpoint_path: str) -> None:
        from pipeline.tracking import classifier  # deferred: MLflow's pyfunc and pandas, when a model is logged

        self.model_ids[epoch] = classifier.log_model(
            state,
            name=f"epoch-{epoch:03d}",
            run_id=self.run_id,
            step=epoch,
            tags={
                "epoch": str(epoch),
                "ray_checkpoint": checkpoint_path,
                "data_uri": self.data_uri,
                "data_fingerprint": self.data_fingerprint,
            },
        )

    def _best_pictures(self, state: dict[str, Any], m: dict[str, Any]) -> None:
        """The best model so far: its conv1 kernels (Figure 3) and its per-class validation top-1."""

        conv1 = next(v for v in state["model"].values() if v.dim() == 4)  # the first conv's weight, either model
        towers = 2 if state["config"]["model"] == "alexnet" else 1
        self._picture("conv1_filters.png", pictures.conv1_png(conv1.numpy(), towers=towers))
        counts = state.get("val_per_class") or {}
        if counts.get("images"):
            names = (
                [w or c for w, c in zip(state["words"], state["classes"])]
                or state["classes"]
                or [str(i) for i in range(state["num_classes"])]
            )
            table = pictures.class_accuracy(counts["correct"], counts["images"], names)
            client = _client(self.tracking_uri)
            self._add(
                Record(
                    f"{PICTURES}/per_class_val.json",
                    partial(
                        client.log_dict,
                        self.run_id,
                        {"epoch": state["epoch"], **table},
                        f"{PICTURES}/per_class_val.json",
                    ),
                    key="per_class_val.json",
                )
            )
            self._picture(
                "per_class_val.png",
                pictures.per_class_png(
                    table,
                    title=f"validation top-1 per class, best epoch so far ({state['epoch'] + 1}: {m['val_top1']:.1f}%)",
                ),
            )

    def _picture(self, name: str, data: bytes) -> None:
        def send():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(data)
                _client(self.tracking_uri).log_artifact(self.run_id, str(path), PICTURES)

        self._add(Record(f"{PICTURES}/{name}", send, key=name))


# How MLflow's client signs in to a server with authentication (the team server's basic auth, a token
# proxy). A file ~/.mlflow/credentials on the driver's node works too: the Recorder runs there.
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def start_recorder(**kwargs):
    """A Recorder on this machine, the driver's: where a sqlite store is, and a node that lasts as long as
    the job (a worker node of an autoscaling cluster may go away mid-run, and the records with it).

    It signs in as the driver does: the driver's MLflow credentials go along as constructor arguments, not
    in a runtime_env, whose variables Ray's dashboard and state API show to anyone who can list actors."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    credentials = {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    if kwargs.get("watch_driver"):  # outlives its driver, to close the run when the driver dies (lifeline.py)
        return Recorder.options(scheduling_strategy=here, lifetime="detached").remote(credentials=credentials, **kwargs)
    return Recorder.options(scheduling_strategy=here).remote(credentials=credentials, **kwargs)


def _client(tracking_uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


# How long the records may take to reach the server before a run that did not finish is closed.
TRACKING_WAIT_ON_FAILURE_S = 30.0
