"""The experiment's runs at a glance, and how to continue one whose job ended early.

    python jobs/runs.py                          # experiment alexnet, the store MLFLOW_TRACKING_URI names
    python jobs/runs.py --experiment resnet-ablation --limit 30

A RUNNING run whose driver stopped beating (killed, its machine gone) is marked FAILED here first, as
jobs/train.py does when it starts; the logic lives in pipeline/tracking/lifeline.py.
"""

import argparse
import sys

from pipeline import errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--experiment", default="alexnet", help="MLflow experiment name (default: alexnet)")
    parser.add_argument("--limit", type=int, default=10, help="newest runs shown (default: 10)")
    args = parser.parse_args(argv)
    from pipeline.tracking import lifeline, recording, runs  # after parsing: --help answers at once

    tracking_uri = runs.resolve_tracking_uri()
    recording.check_server(tracking_uri)
    print("\n".join(lifeline.overview(tracking_uri, args.experiment, args.limit)))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_job(main))
