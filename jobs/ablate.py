"""Test the paper's design choices: a baseline and one training run per switched choice, compared in MLflow.

    python jobs/ablate.py                                          # every switch flipped once, on the sample
    python jobs/ablate.py --ablate activation=tanh --ablate lrn=off --epochs 3
    python jobs/ablate.py --ablate activation=tanh,lrn=off        # one run with both switched
    python jobs/ablate.py --figure1                                # Figure 1: ReLU against tanh, four-layer CNN
    python jobs/ablate.py --preset paper --data s3://bucket/imagenet --workers 8 --use-gpu --parallel 4

Every training flag of jobs/train.py applies to all runs (--help lists them); the logic lives in
pipeline/experiments/ablate.py and figure1.py.
"""

import sys

from pipeline import errors
from pipeline.experiments import ablate, figure1
from pipeline.tracking import runs
from pipeline.train import driver


def main(argv=None) -> int:
    args = ablate.parse_args(argv)
    if args.figure1:
        result = figure1.run(**({"epochs": args.figure1_epochs} if args.figure1_epochs else {}))
        print(result["text"])
        return 0
    try:
        result = ablate.run(args.cfg, args.grid, parallel=args.parallel, threshold=args.train_error)
    except driver.RunInterrupted as e:
        print(f"\ninterrupted by {e.signal_name}: MLflow run {e.run_id} marked KILLED", file=sys.stderr)
        return e.exit_code
    print(
        f"MLflow parent run {result.parent_run_id} ({runs.resolve_tracking_uri()}): the table is its ablation.md "
        f"artifact; {len(result.runs)} child runs, none registered; {result.seconds:.0f} s in all"
    )
    return 0 if all("error" not in r for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(errors.run_job(main))  # bad input: one line, `error: ...`, exit 2
