"""Test the paper's design choices: a baseline and one training run per switched choice, compared in MLflow.

    python jobs/ablate.py                                          # every switch flipped once, on the sample
    python jobs/ablate.py --ablate activation=tanh --ablate lrn=off --epochs 3
    python jobs/ablate.py --ablate activation=tanh,lrn=off        # one run with both switched
    python jobs/ablate.py --figure1                                # Figure 1: ReLU against tanh, four-layer CNN
    python jobs/ablate.py --preset paper --data s3://bucket/imagenet --workers 8 --use-gpu --parallel 4

Every training flag of jobs/train.py applies to all runs (--help lists them); the logic lives in
pipeline/ablate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from pipeline.experiments import ablate  # noqa: E402

if __name__ == "__main__":
    sys.exit(ablate.main())
