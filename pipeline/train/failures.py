"""When a run fails: which failures another try can mend, and the paragraph the job ends with.

    Trainer              Ray's TorchTrainer, except that a failure another try cannot mend (is_permanent)
                         ends the run at once instead of spending --max-failures restarts on it
    root_cause(error)    the error that explains a failure, dug out of Ray's wrappers
    is_permanent(error)  a damaged shard, a label outside the classes, a listed file missing, a bad value
                         found late, a bug: reading or computing the same thing again meets it again. A lost
                         worker or node, storage that does not answer (StoreUnavailable), a collective cut
                         short by a peer that died: another try may well succeed
    explain(...)         what failed, the root cause, what was kept, how to continue, where the run is

Ray Train V2 decides on restarts in its controller, through a FailurePolicy that RunConfig does not let a
user choose; Trainer hands its controller one that asks is_permanent first (the only use of Ray Train's
private API here; tests/test_failure_report.py guards it with a damaged shard).
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy
from ray.train.v2.api.exceptions import WorkerGroupError

from pipeline import errors

# Root causes another try meets again: bad data or a bad value (ValueError: the readers' damaged files,
# plan.py's labels outside the classes), files that are not there, and bugs.
PERMANENT = (ValueError, LookupError, FileNotFoundError, NotADirectoryError, TypeError, AttributeError, NameError)


def root_cause(error: BaseException) -> BaseException:
    """The innermost error this project raised itself (its messages name the file, the row group, the
    attempts), else the innermost of all. For a failed worker group, that of the worker whose failure
    explains the others (worker_failure)."""
    failed = getattr(error, "worker_failures", None)
    if failed:
        return root_cause(worker_failure(failed))
    behind = errors.chain(error)
    ours = [e for e in behind if _defined_in_pipeline(e)]
    return (ours or behind)[-1]


def worker_failure(failed: dict[int, BaseException]) -> BaseException:
    """Among the workers' failures, the one to explain: a permanent one (its peers fail with it, cut off
    mid-collective), else the lowest rank's."""
    ranked = [failed[rank] for rank in sorted(failed)]
    return next((e for e in ranked if _is_permanent_cause(root_cause(e))), ranked[0])


def is_permanent(error: BaseException) -> bool:
    failed = getattr(error, "worker_failures", None)
    if failed:
        return any(is_permanent(e) for e in failed.values())
    return _is_permanent_cause(root_cause(error))


def _is_permanent_cause(cause: BaseException) -> bool:
    transient = isinstance(cause, OSError) and not isinstance(cause, (FileNotFoundError, NotADirectoryError))
    return isinstance(cause, PERMANENT) and not transient


def details(error: BaseException) -> str:
    """Everything Ray knows of a failure: every worker's whole traceback (Ray's own message cuts them)."""
    failed = getattr(error, "worker_failures", None)
    if not failed:
        return str(error)
    return "\n\n".join(f"--- worker {rank} ---\n{failed[rank]}" for rank in sorted(failed))


def describe(error: BaseException) -> str:
    """`Type: message` of the root cause, on one line (Ray's task errors carry a traceback: its last line)."""
    cause = root_cause(error)
    text = str(cause).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
    name = _original_type(cause).__name__
    first = text.splitlines()[0] if text else ""
    return first if first.startswith(f"{name}:") else f"{name}: {first}"


class FailFastOnPermanent(FailurePolicy):
    """Ray's own policy, asked only after a failure that another try could mend."""

    def __init__(self, inner: FailurePolicy):
        super().__init__(inner.failure_config)
        self.inner = inner

    def make_decision(self, training_failed_error) -> FailureDecision:
        if isinstance(training_failed_error, WorkerGroupError) and is_permanent(training_failed_error):
            return FailureDecision.RAISE
        return self.inner.make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """TorchTrainer whose controller ends the run at once on a permanent failure (module docstring)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any):
        controller_init_kwargs["failure_policy"] = FailFastOnPermanent(controller_init_kwargs["failure_policy"])
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def _original_type(error: BaseException) -> type:
    """Ray's RayTaskError(ValueError) stands for a ValueError: its second base is the original type."""
    kind = type(error)
    if kind.__name__.startswith("RayTaskError(") and len(kind.__bases__) > 1:
        return kind.__bases__[1]
    return kind


def _defined_in_pipeline(error: BaseException) -> bool:
    return _original_type(error).__module__.startswith("pipeline.")
