"""The fake cloud's node provider, loaded by the autoscaler of tests/ray_head.py's head (provider type
"external"): Ray's FakeMultiNodeProvider, every node a raylet on this machine, but each with a runtime-env
directory of its own, as each machine of a real cluster has its own disk.

Ray's fake nodes share the head's session directory, and each node unpacks a job's working_dir into
session/runtime_resources by deleting and re-extracting it: a node added while a job runs would pull
the working directory out from under the job's processes on the head (their cwd deleted, so
`Path.cwd()` fails in MLflow's log_model). That cannot happen across machines.

And its nodes report themselves set up once Ray runs on them, as a real cloud's do. Ray's fake provider
keeps the launcher's "uninitialized" status on every node for ever (its own "up-to-date" is overwritten
by the launch tags, and with node updaters off nothing sets it again), and the autoscaler replaces only
up-to-date nodes that stop answering ("lost contact with raylet"): a fake node whose processes died
would stay "pending" for ever and keep its node type's slot (tests/test_node_loss.py).
"""

import itertools

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import STATUS_UP_TO_DATE, TAG_RAY_NODE_STATUS


class SeparateDisksProvider(FakeMultiNodeProvider):
    _disks = itertools.count(1)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The parent builds the node's RayParams inline; give it the directory name (called under its lock).
        make_params = ray._private.parameter.RayParams
        disk = f"runtime_resources_node{next(self._disks)}"
        ray._private.parameter.RayParams = lambda *a, **kw: make_params(*a, runtime_env_dir_name=disk, **kw)
        try:
            with self.lock:
                before = set(self._nodes)
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
                # Ray has started on the node (its raylet registers with the GCS before the parent returns).
                for node_id in set(self._nodes) - before:
                    self._nodes[node_id]["tags"][TAG_RAY_NODE_STATUS] = STATUS_UP_TO_DATE
        finally:
            ray._private.parameter.RayParams = make_params
