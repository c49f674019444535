"""A Ray head of the test's own, started the way a cluster's is (`ray start --head`), and stopped without
touching any other Ray on this machine.

`ray stop` (and ray.cluster_utils.AutoscalingCluster, which calls `ray stop --force`) ends every Ray
process of the user, this pytest session's and other people's included. Instead the head runs under
`ray start --block` in a process group of its own, with ports of its own; every Ray process it starts
(GCS, raylet, dashboard, workers, the autoscaler and the nodes the fake autoscaler adds) stays in that
group, and stopping it ends that group alone, then checks that nothing of it is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import free_port

RAY = str(Path(sys.executable).parent / "ray")


def fake_autoscaler_config(worker_node_types: dict[str, Any], gcs_address: str, idle_timeout_s: float) -> dict:
    """A cluster-launcher config for Ray's fake multi-node provider (what AutoscalingCluster generates from
    the example.yaml that Ray's wheel does not ship), through tests/fake_cloud.py: the head takes no work
    of the node types, and the nodes it adds join *this* head (gcs_address), not one on Ray's default port
    6379."""
    return {
        "cluster_name": "fake-" + secrets.token_hex(3),
        "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {
            "type": "external",
            "module": "fake_cloud.SeparateDisksProvider",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            **worker_node_types,
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class Head:
    def __init__(
        self,
        process: subprocess.Popen,
        ip: str,
        gcs_port: int,
        dashboard_port: int,
        token: str,
        env: dict[str, str],
        log: Path,
    ):
        self.process, self.env, self.token, self.log = process, env, token, log
        self.gcs_address = f"{ip}:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"

    def get(self, path: str, *, token: bool = True) -> Any:
        """GET a dashboard endpoint (the state API, the job API) as JSON, with the cluster's token."""
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        with urllib.request.urlopen(
            urllib.request.Request(self.dashboard + path, headers=headers), timeout=10
        ) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster has had, dead ones included (node_id, state, resources_total)."""
        return self.get("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]


def head_processes(pgid: int, token: str) -> list[int]:
    """The live processes of the head: its process group, and whatever carries the cluster's token in its
    environment (a submitted job's driver runs in a session of its own). Zombies count as gone."""
    marker = f"RAY_AUTH_TOKEN={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and (int(fields[2]) == pgid or marker in (entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@contextmanager
def ray_head(
    *,
    num_cpus: int,
    worker_node_types: dict[str, Any] | None = None,
    idle_timeout_s: float = 5.0,
    env: dict[str, str] | None = None,
) -> Iterator[Head]:
    """`ray start --head --block` with token authentication, free ports and a temp dir of its own; with
    worker_node_types, the fake autoscaler adds and removes nodes of those types on this machine."""
    from ray._private.services import get_node_ip_address

    temp = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths live under it
    ip = get_node_ip_address()
    gcs_port, dashboard_port = free_port(), free_port()
    token = secrets.token_hex(32)
    # The cluster's token in the environment: the head and everything it starts read it from there, and
    # ~/.ray/auth_token, which other Ray users on this machine share, is neither read nor written.
    head_env = {
        **os.environ,
        **(env or {}),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    head_env.pop("RAY_ADDRESS", None)
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--port={gcs_port}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp}",
        "--object-store-memory=300000000",
    ]
    if worker_node_types:
        config = temp / "autoscaler.json"
        config.write_text(json.dumps(fake_autoscaler_config(worker_node_types, f"{ip}:{gcs_port}", idle_timeout_s)))
        command.append(f"--autoscaling-config={config}")
        # The fake provider refuses to run without RAY_FAKE_CLUSTER; 1 s between autoscaler rounds; the
        # autoscaler imports tests/fake_cloud.py.
        head_env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), head_env.get("PYTHONPATH")])),
        )
    log = temp / "head.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(process, ip, gcs_port, dashboard_port, token, head_env, log)
    try:
        deadline = time.time() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                head.get("/api/jobs/")
                if any(n["state"] == "ALIVE" for n in head.nodes()):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the head's dashboard did not answer in 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield head
    finally:
        stop(process, token)
        shutil.rmtree(temp, ignore_errors=True)


def stop(process: subprocess.Popen, token: str, timeout: float = 30.0) -> None:
    """End the head: SIGTERM to its process group (ray start --block then stops its node), then SIGKILL,
    pid by pid, to what is left of it; raise if anything of it survives."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while head_processes(process.pid, token) and time.time() < deadline:
        time.sleep(0.2)
    for pid in head_processes(process.pid, token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=10)
    deadline = time.time() + 10
    while head_processes(process.pid, token) and time.time() < deadline:
        time.sleep(0.2)
    left = head_processes(process.pid, token)
    assert not left, f"processes of the test's Ray head left running: {left}"
