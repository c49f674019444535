"""Train AlexNet: Ray Data -> Ray Train -> MLflow.

    python jobs/train.py                                  # the embedded default: sample data, local Ray
    python jobs/train.py --preset paper --data /data/imagenet --workers 8 --use-gpu
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/imagenet ...

Every flag is listed by --help; the logic lives in pipeline/.
"""

import sys

from pipeline import config


def main(argv=None) -> int:
    cfg = config.parse_args(argv)
    from pipeline.tracking import recording  # after parsing: --help and flag errors answer without importing Ray
    from pipeline.train import driver

    try:
        summary = driver.run(cfg)
    except driver.RunInterrupted as e:
        print(
            f"\ninterrupted by {e.signal_name}: MLflow run {e.run_id} marked KILLED; nothing registered",
            file=sys.stderr,
        )
        return e.exit_code
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)  # bad input, or a server (Ray, MLflow) that does not answer
        return 2
    except recording.RecordsNotDelivered as e:
        print(f"error: {e}", file=sys.stderr)  # trained, but the tracking server did not come back in time
        return 1
    import ray

    ray.shutdown()  # Ray's buffered log lines come out now, so that the job's last lines are these
    print(driver.where_it_went(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
