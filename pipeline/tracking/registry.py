"""The MLflow model registry a team can trust: what gets registered, and when `champion` moves.

    model_name(cfg)                 --registered-model, else `alexnet`, or `alexnet-sample` for the generated sample
    register_best(run_id, ...)      after a run FINISHES: a version of its best logged model, with its lineage,
                                    then the champion rule; returns what happened, in words
    promote(client, name, version)  the champion rule alone, safe when registrations race
    record_evaluation(opened, ...)  the evaluation job's numbers on the model version and its logged model

The champion rule. `champion` moves to a new version only when there is no champion yet, or when the
champion was measured on the same data (its data_fingerprint tag: the manifest's sha256 for shards, a
hash of the listing for folders) and the new version's val top-1 is strictly higher. A model measured
on other data never takes it, whatever its number: accuracies on different data do not compare. When
the alias moves, the version it leaves gets the alias `previous`.

Runs that register on one name at the same moment (one team server, no transactions) end as if they
had registered one after another in the order the server numbered their versions: `champion` is the
best version on the champion's data, and `previous` is the version the champion displaced in that
order (a worse A and a better B racing on a new name: champion B, previous A if A is version 1; if B
is, A was never champion and `previous` is not set). promote() decides over every version of the name,
not just the new one, so a champion moved back by hand to a worse version on the same data stays
only until the next registration; moved by hand to a version on other data, that data is the
champion's data from then on.

Only a run that finishes registers anything, once, at its end: an interrupted or failed run leaves the
registry as it found it (its logged models stay in the run, for anyone who wants one of them).

The generated sample is ten drawn patterns, not ImageNet: its models register under `alexnet-sample`
by default, so that `make train` never competes with (or confuses anyone about) `alexnet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlflow

CHAMPION = "champion"
PREVIOUS = "previous"
DEFAULT_NAME = "alexnet"
SAMPLE_NAME = "alexnet-sample"
# Lineage tags every registered version carries (README "Model registry").
# switches: the ablation switches the run set otherwise than its preset ("activation=tanh, lrn=off"), or "none".
LINEAGE = (
    "run_id",
    "git_sha",
    "data_uri",
    "data_fingerprint",
    "data_kind",
    "preset",
    "switches",
    "epoch",
    "logged_model_id",
    "val_top1",
    "val_top5",
    "val_images",
)


def model_name(registered_model: str, *, sample: bool) -> str:
    """The registered model a run's best model goes to."""
    return registered_model or (SAMPLE_NAME if sample else DEFAULT_NAME)


@dataclass(frozen=True)
class Registration:
    name: str
    version: str | None  # None: nothing was registered
    champion: bool  # whether `champion` now points at this version
    message: str  # what happened and why, for the job's last lines

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else ""


def _metric(model, key: str, run_id: str) -> float | None:
    """The value `run_id` logged on the model (an evaluation run may add its own later)."""
    values = [m.value for m in model.metrics or () if m.key == key and m.run_id == run_id]
    return values[-1] if values else None


def best_logged_model(client: mlflow.MlflowClient, run_id: str):
    """The run's logged model with the highest val top-1 it was logged with; the earliest epoch on a tie."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    scored = [(m, _metric(m, "val_top1", run_id)) for m in models]
    scored = [(m, top1) for m, top1 in scored if top1 is not None]
    if not scored:
        return None
    return max(scored, key=lambda mt: (mt[1], -int(mt[0].tags.get("epoch", 0))))[0]


def register_best(*, tracking_uri: str, run_id: str, name: str, lineage: dict[str, Any]) -> Registration:
    """Register the run's best logged model under `name`, tagged with `lineage` and its own numbers,
    then apply the champion rule."""
    client = mlflow.MlflowClient(tracking_uri)
    best = best_logged_model(client, run_id)
    if best is None:
        return Registration(
            name,
            None,
            False,
            f"nothing registered: run {run_id} logged no model (--log-models none, or no epoch finished)",
        )
    tags = {
        **{k: str(v) for k, v in lineage.items()},
        "run_id": run_id,
        "logged_model_id": best.model_id,
        "epoch": best.tags.get("epoch", ""),
        "val_top1": f"{_metric(best, 'val_top1', run_id):.4f}",
        "val_top5": f"{_metric(best, 'val_top5', run_id):.4f}",
    }
    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(f"models:/{best.model_id}", name, tags=tags).version
    return promote(client, name, str(version))


def promote(client: mlflow.MlflowClient, name: str, version: str) -> Registration:
    """The champion rule (module docstring) for `version` of `name`: puts the aliases where the rule over all the
    versions of `name` puts them, then says where that left `version`.

    Set, then verify: read, decide over every version read, write if the aliases differ, and read again, until a
    read finds the aliases already as decided. Why the last registration to finish is right: every version is
    created before its creator's first read, and every alias write is followed by a read of its writer; so the
    last read of the aliases (taken before the versions) comes after every write and is followed by a read of
    every version, and its reader stopped only because the aliases were what the rule says over all of them.
    """
    refused = 0
    while True:
        # Versions as text: a REST server answers "1", a sqlite store 1.
        aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}  # before the versions
        versions = {str(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
        champion, previous = _rule(versions, aliases.get(CHAMPION))
        if champion == aliases.get(CHAMPION) and previous in (None, aliases.get(PREVIOUS)):
            break
        try:
            if previous:
                client.set_registered_model_alias(name, PREVIOUS, previous)
            client.set_registered_model_alias(name, CHAMPION, champion)
        except mlflow.exceptions.MlflowException:
            # A server can refuse one of two first writes of an alias at the same moment (sqlite: UNIQUE
            # constraint failed): read again. Anything that keeps refusing (no permission) is raised.
            refused += 1
            if refused > 5:
                raise
    return _said(name, versions, version, champion, previous)


def _rule(versions: dict[str, Any], champion: str | None) -> tuple[str, str | None]:
    """(champion, previous) as the champion rule leaves them when `versions` register one after another in
    version order: among those measured on the champion's data (the first version's, when there is no champion),
    the champion is the last to beat every earlier one, previous the one before it."""
    ordered = sorted((mv for mv in versions.values() if "val_top1" in mv.tags), key=lambda mv: int(mv.version))
    reference = versions[champion] if champion in versions else ordered[0]
    data = reference.tags.get("data_fingerprint")
    best = before = None
    for mv in ordered:
        if mv.tags.get("data_fingerprint") == data and (
            best is None or float(mv.tags["val_top1"]) > float(best.tags["val_top1"])
        ):
            best, before = mv, best
    if best is None:  # nothing measured on the champion's data: it stays
        return str(reference.version), None
    return str(best.version), str(before.version) if before else None


def _said(name: str, versions: dict[str, Any], version: str, champion: str, previous: str | None) -> Registration:
    """What the rule did with `version`, in words."""

    def described(mv) -> str:
        return f"version {mv.version} (val top-1 {float(mv.tags.get('val_top1', 'nan')):.2f}%)"

    new = versions[version]
    here = f"{name} {described(new)}"
    if champion == version:
        if previous is None:
            return Registration(name, version, True, f"{here} is the first {CHAMPION} of {name!r}")
        return Registration(
            name,
            version,
            True,
            f"{here} is the new {CHAMPION}: it beats {described(versions[previous])} on the same data, which "
            f"keeps the alias {PREVIOUS!r}",
        )
    old = versions[champion]
    if old.tags.get("data_fingerprint") != new.tags.get("data_fingerprint"):
        return Registration(
            name,
            version,
            False,
            (
                f"{here} is not {CHAMPION}: {CHAMPION} {described(old)} was measured on other data "
                f"({old.tags.get('data_uri', '?')}, "
                f"fingerprint {old.tags.get('data_fingerprint', '?')[:12]}; "
                f"this run: {new.tags.get('data_uri', '?')}, {new.tags.get('data_fingerprint', '?')[:12]}), and "
                f"accuracies on different data do not compare. Register under another --registered-model to keep "
                f"a champion for this data"
            ),
        )
    return Registration(
        name,
        version,
        False,
        f"{here} is not {CHAMPION}: it does not beat {CHAMPION} {described(old)} on the same data",
    )


def record_evaluation(
    opened, metrics: dict[str, float], *, data_uri: str, data_fingerprint: str, tracking_uri: str
) -> list[str]:
    """Write the evaluation job's metrics where people look (returns what was written, in words):

    - on the logged model, as metrics of an evaluation run in the model's experiment, tied to the data
      (dataset name = the data URI, digest = its fingerprint), so the model page lists them;
    - on the registered version, as tags: under their own names when the data is the data the version
      was validated on in training, else under eval/<fingerprint>/ so they never stand in for that
      measurement (the champion rule reads val_top1).
    """
    import time

    client = mlflow.MlflowClient(tracking_uri)
    written = []
    if opened.model_id:
        model = client.get_logged_model(opened.model_id)
        run = client.create_run(
            model.experiment_id,
            run_name=f"evaluate {model.name}",
            tags={"evaluates_model_id": opened.model_id, "model_reference": opened.reference},
        )
        client.log_batch(
            run.info.run_id,
            params=[
                mlflow.entities.Param(k, str(v))
                for k, v in {"model": opened.reference, "data": data_uri, "data_fingerprint": data_fingerprint}.items()
            ],
        )
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[
                mlflow.entities.Metric(
                    k,
                    float(v),
                    now,
                    0,
                    model_id=opened.model_id,
                    dataset_name=data_uri,
                    dataset_digest=data_fingerprint[:32],
                )
                for k, v in metrics.items()
            ],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        written.append(f"logged model {opened.model_id} (evaluation run {run.info.run_id})")
    if opened.version:
        version = client.get_model_version(opened.registered_name, opened.version)
        same = version.tags.get("data_fingerprint") == data_fingerprint
        prefix = "" if same else f"eval/{data_fingerprint[:12]}/"
        tags = {f"{prefix}{k}": f"{v:.4f}" for k, v in metrics.items()}
        if not same:
            tags[f"{prefix}data_uri"] = data_uri
        for key, value in tags.items():
            client.set_model_version_tag(opened.registered_name, opened.version, key, value)
        written.append(
            f"{opened.registered_name} version {opened.version} tags "
            f"{'(same data as its training validation)' if same else prefix + '* (other data)'}"
        )
    return written
