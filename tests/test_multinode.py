"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): workers on different nodes train the
same function as workers on one node. Run in a subprocess: it needs a Ray cluster of its own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # whole jobs and clusters

ROOT = Path(__file__).resolve().parents[1]


def test_workers_on_two_nodes_give_the_single_node_loss_curve():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_check.py")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    runs = json.loads(lines[-1].removeprefix("RESULT "))
    spread, packed = runs["STRICT_SPREAD"], runs["STRICT_PACK"]

    assert len(spread["nodes"]) == 2 and len(set(spread["nodes"])) == 2  # one worker per node
    assert len(packed["nodes"]) == 2 and len(set(packed["nodes"])) == 1  # both on one node
    assert len(spread["train_loss"]) == 2
    assert spread["train_loss"] == pytest.approx(packed["train_loss"], rel=1e-5)
    assert spread["val_top1"] == pytest.approx(packed["val_top1"], abs=1e-6)
