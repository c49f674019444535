"""Ends a private local Ray once its driver is gone, whatever ended the driver (SIGKILL included).

    python -m pipeline.reaper DRIVER_PID    cluster.connect_ray starts it beside a private Ray, in a session
                                            of its own, so that a kill of the driver's process group spares it

Ray's processes are the driver's children (GCS, raylet, dashboard) and grandchildren (the raylet's workers
and agents). A driver that dies without ray.shutdown() leaves some of them running for ever (the dashboard
agent and the runtime-env agent, ~250 MB). While the driver lives this remembers its descendants, every
POLL_S; once the driver is gone it sends SIGTERM to each remembered process still alive (and to any child
one has started since the last look), SIGKILL to those left after GRACE_S, and exits. After a normal end
ray.shutdown() has stopped them already, and it exits at once. It never touches another process: other
jobs' Rays on this machine are not this driver's descendants.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

POLL_S = 1.0  # how often the driver's descendants are looked at while it lives
GRACE_S = 5.0  # between SIGTERM and SIGKILL


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a killed driver stays one until its parent waits for it). is_running() also
    says False for a pid reused by another process since."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in process.children(recursive=True) if p.pid != os.getpid()]
    except psutil.Error:
        return []


def end(processes: list[psutil.Process]) -> None:
    """SIGTERM to each process still alive and to its descendants, then SIGKILL to those left after GRACE_S."""
    found = {p.pid: p for p in processes if alive(p)}
    for p in list(found.values()):
        found.update((child.pid, child) for child in descendants(p))
    for p in found.values():
        try:
            p.terminate()  # psutil refuses a pid reused by another process since (NoSuchProcess)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(list(found.values()), timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass


def watch(driver_pid: int) -> None:
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    remembered: list[psutil.Process] = []
    while True:
        seen = descendants(driver)
        if not alive(driver):  # a look taken while it died may have missed some: keep the one before
            break
        remembered = seen
        time.sleep(POLL_S)
    end(remembered)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
