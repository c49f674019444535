"""A run whose driver died says so: the driver's heartbeat, and what happens when it stops.

Nothing can write FAILED from a process killed by SIGKILL, and `ray job stop` kills the driver a few
seconds after its SIGTERM, before the job can close its run. So the driver's life is watched from two
places that outlive it:

    Lifeline                 a thread of the driver that tells the Recorder "still here" every PING_S
    DriverWatch              inside the Recorder, a detached Ray actor that outlives its driver on a
                             cluster: it stamps the run's `driver_heartbeat` tag every HEARTBEAT_S while
                             the pings come; when they stop it delivers what the epochs reported, closes
                             the run (KILLED after a SIGTERM the driver announced, else FAILED) with
                             "continue it with --resume <id>", and ends itself
    mark_lost_runs(...)      when the Recorder died too (a private local Ray dies with its driver): any
                             later job on the same tracking store (jobs/train.py, jobs/runs.py) closes
                             RUNNING runs whose heartbeat is older than LOST_AFTER_S

The heartbeat is a tag, not a metric: one value, overwritten, readable in the UI and by search_runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

HEARTBEAT_TAG = "driver_heartbeat"  # unix seconds of the driver's latest sign of life

# The Recorder stamps the tag every HEARTBEAT_S and counts the driver lost after as long without a ping;
# the driver pings every PING_S; a RUNNING run whose stamp is LOST_AFTER_S old has lost both driver and
# Recorder. Tests shorten all three with ALEXNET_HEARTBEAT_S (the others scale with it).
HEARTBEAT_S = float(os.environ.get("ALEXNET_HEARTBEAT_S", "30"))
PING_S = HEARTBEAT_S / 6
LOST_AFTER_S = HEARTBEAT_S * 4


def when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def lost_message(run_id: str, seconds: float, how: str = "") -> str:
    return f"driver lost at {when(seconds)}{how}; continue it with --resume {run_id}"


class Lifeline:
    """The driver side: pings `recorder` every PING_S until stop(); announces a signal with stopping()."""

    def __init__(self, recorder, ping_s: float = PING_S):
        self.recorder, self.ping_s = recorder, ping_s
        self.done = threading.Event()
        threading.Thread(target=self._ping, name="lifeline", daemon=True).start()

    def _ping(self) -> None:
        while not self.done.is_set():
            self.recorder.alive.remote()
            self.done.wait(self.ping_s)

    def stopping(self, signal_name: str) -> None:
        """Said first when SIGTERM arrives: `ray job stop` may kill the driver before it closes the run."""
        self.recorder.stopping.remote(signal_name)

    def stop(self) -> None:
        self.done.set()


class DriverWatch:
    """The Recorder's side: beat() on every ping; a thread stamps the heartbeat every `heartbeat_s` and,
    once the pings stop for as long, calls on_lost(status, message) once. The Recorder's process does not
    share the driver's environment: the driver hands it `heartbeat_s`."""

    def __init__(
        self,
        run_id: str,
        stamp: Callable[[float], None],
        on_lost: Callable[[str, str], None],
        heartbeat_s: float = HEARTBEAT_S,
    ):
        self.run_id, self.stamp, self.on_lost, self.heartbeat_s = run_id, stamp, on_lost, heartbeat_s
        self.last_ping = time.time()
        self.signal = ""  # the signal the driver announced, if any
        threading.Thread(target=self._watch, name="driver-watch", daemon=True).start()

    def beat(self) -> None:
        self.last_ping = time.time()

    def _watch(self) -> None:
        stamped = 0.0
        while True:
            now = time.time()
            if now - self.last_ping > self.heartbeat_s:
                status, how = ("KILLED", f" after {self.signal}") if self.signal else ("FAILED", "")
                self.on_lost(status, lost_message(self.run_id, self.last_ping, how))
                return
            if now - stamped >= self.heartbeat_s:
                self.stamp(now)
                stamped = now
            time.sleep(min(1.0, self.heartbeat_s / 6))


def heartbeat_age(run, now: float | None = None) -> float | None:
    """Seconds since the run's driver last showed life, or None for a run without a heartbeat."""
    stamp = run.data.tags.get(HEARTBEAT_TAG)
    return None if stamp is None else (now or time.time()) - float(stamp)


def is_live(run) -> bool:
    """RUNNING with a fresh heartbeat: a driver is (very likely) still at work on it."""
    age = heartbeat_age(run)
    return run.info.status == "RUNNING" and age is not None and age < LOST_AFTER_S


def mark_lost_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Close the RUNNING runs of `experiment` whose heartbeat stopped LOST_AFTER_S ago: FAILED, with the
    time the driver was last seen and how to continue. Returns their ids."""
    import mlflow

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).exists():
        return []  # no store yet, so no run (and asking would create the database)
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    lost = []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        age = heartbeat_age(run)
        if age is not None and age >= LOST_AFTER_S:
            client.set_tag(run.info.run_id, "error", lost_message(run.info.run_id, time.time() - age))
            client.set_terminated(run.info.run_id, status="FAILED")
            lost.append(run.info.run_id)
    return lost


def overview(tracking_uri: str, experiment: str, limit: int = 10) -> list[str]:
    """jobs/runs.py: the experiment's newest runs, one line each, after closing those whose driver is gone;
    for a run that did not finish, how to continue it."""
    import mlflow

    lost = set(mark_lost_runs(tracking_uri, experiment))
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return [f"no experiment {experiment!r} at {tracking_uri}"]
    lines = [f"experiment {experiment!r} at {tracking_uri}, newest first:"]
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit):
        run_id, status = run.info.run_id, run.info.status
        epochs = client.get_metric_history(run_id, "val_top1")
        best = f"best val top-1 {max(m.value for m in epochs):.1f}%" if epochs else "no epoch recorded"
        state = (
            "RUNNING, driver alive"
            if is_live(run)
            else status + (" (driver lost: just marked)" if run_id in lost else "")
        )
        lines.append(
            f"  {run_id}  {state:<28} {len(epochs)} epochs, {best}  started {when(run.info.start_time / 1000)}"
        )
        why = run.data.tags.get("error") or run.data.tags.get("stopped_by")
        if why:
            lines.append(f"      {why.splitlines()[0][:160]}")
        if status != "FINISHED" and not is_live(run):
            lines.append(f"      continue it: python jobs/train.py --resume {run_id}")
    return lines
