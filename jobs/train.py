"""Train AlexNet: Ray Data -> Ray Train -> MLflow.

    python jobs/train.py                                  # the embedded default: sample data, local Ray
    python jobs/train.py --preset paper --data /data/imagenet --workers 8 --use-gpu
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/imagenet ...

Every flag is listed by --help; the logic lives in pipeline/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from pipeline import config  # noqa: E402


def main(argv=None) -> int:
    cfg = config.parse_args(argv)
    from pipeline import runner  # after parsing: --help and flag errors answer without importing Ray

    try:
        summary = runner.run(cfg)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nfinal val top-1 {summary['val_top1']:.1f}%  top-5 {summary['val_top5']:.1f}%  "
          f"(best top-1 {summary['best_val_top1']:.1f}%) in {summary['seconds']:.0f} s")
    print(f"MLflow run {summary['run_id']}; registered model {cfg.registered_model!r} alias 'champion'")
    print(f"browse it:  {summary['url']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
