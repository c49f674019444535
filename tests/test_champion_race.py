"""The champion rule when registrations race (issue 18): runs registering on one name at the same moment,
against a real `mlflow server`, must leave `champion` on the best version and `previous` on the version it
displaced, exactly as if they had registered one after another in the order the server numbered them."""

from __future__ import annotations

import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import mlflow

from tests.test_registry import finished_run, register

ROUNDS = 20


def race(server: str, name: str, tops: list[float]):
    """Register one run per top-1 in `tops` on `name`, all released at once by a barrier."""
    client = mlflow.MlflowClient(server)
    if client.get_experiment_by_name(name) is None:  # before the threads: each would create it
        client.create_experiment(name)
    barrier = threading.Barrier(len(tops))

    def go(top1: float):
        run_id = finished_run(server, name, {0: top1})
        barrier.wait()
        try:
            return register(server, name, run_id)
        except mlflow.exceptions.MlflowException as e:  # two alias writes at once: one may be refused
            return e

    with ThreadPoolExecutor(len(tops)) as pool:
        return list(pool.map(go, tops))


def in_version_order(server: str, name: str) -> tuple[str, str | None]:
    """(champion, previous) as the rule leaves them when the versions register one after another."""
    versions = mlflow.MlflowClient(server).search_model_versions(f"name = '{name}'")
    champion, previous, best = None, None, float("-inf")
    for mv in sorted(versions, key=lambda mv: int(mv.version)):
        if float(mv.tags["val_top1"]) > best:
            champion, previous, best = mv.version, champion, float(mv.tags["val_top1"])
    assert champion is not None
    return champion, previous


def test_racing_registrations_leave_the_best_champion(mlflow_server):
    draw = random.Random(18)
    wrong = []
    for round_ in range(ROUNDS):
        name = f"race-{uuid.uuid4().hex[:8]}"
        if round_ % 2:  # a champion already there, three runs racing, better and worse than it
            register(mlflow_server, name, finished_run(mlflow_server, name, {0: 40.0}))
            tops = draw.sample([30.0, 45.0, 50.0, 55.0], 3)
        else:  # a fresh name, one worse and one better run racing
            tops = [30.0, 35.0]
        results = race(mlflow_server, name, tops)
        if failed := [r for r in results if isinstance(r, Exception)]:
            wrong.append(f"round {round_} {tops}: {str(failed[0]).splitlines()[0]}")
            continue
        champion, previous = in_version_order(mlflow_server, name)
        aliases = dict(mlflow.MlflowClient(mlflow_server).get_registered_model(name).aliases)
        expected = {"champion": champion, **({"previous": previous} if previous else {})}
        # Each registration says whether it is champion, and a loser names the winner.
        truthful = all(
            r.champion == (r.version == champion) and (r.champion or f"champion version {champion} " in r.message)
            for r in results
        )
        if aliases != expected or not truthful:
            wrong.append(f"round {round_} {tops}: {aliases}, expected {expected}; {[r.message for r in results]}")
    assert not wrong, f"{len(wrong)} of {ROUNDS} rounds wrong:\n" + "\n".join(wrong)
