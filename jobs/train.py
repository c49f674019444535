"""Train AlexNet: Ray Data -> Ray Train -> MLflow.

    python jobs/train.py                                  # the embedded default: sample data, local Ray
    python jobs/train.py --preset paper --data /data/imagenet --workers 8 --use-gpu
    ray job submit --working-dir . -- python jobs/train.py --data s3://bucket/imagenet ...

Every flag is listed by --help; the logic lives in pipeline/.
"""

import sys

from pipeline import config, errors


def main(argv=None) -> int:
    cfg = config.parse_args(argv)
    from pipeline.tracking import runs  # after parsing: --help and flag errors answer without importing Ray
    from pipeline.train import driver

    try:
        summary = driver.run(cfg, given=config.given_fields(argv))
    except driver.RunInterrupted as e:
        print(
            f"\ninterrupted by {e.signal_name}: MLflow run {e.run_id} marked KILLED; nothing registered. "
            f"Continue it with: python jobs/train.py --resume {e.run_id}",
            file=sys.stderr,
        )
        return e.exit_code
    except driver.TrainingFailed as e:
        quiet_ray()
        print(f"\n{e.paragraph()}", file=sys.stderr)
        return 1
    except runs.RecordsNotDelivered as e:
        print(f"error: {e}", file=sys.stderr)  # trained, but the tracking server did not come back in time
        return 1
    quiet_ray()
    print(driver.where_it_went(summary), flush=True)
    return 0


def quiet_ray() -> None:
    """Ray's buffered log lines come out now, so that the job's last lines are ours."""
    import ray

    ray.shutdown()


if __name__ == "__main__":
    sys.exit(errors.run_job(main))  # bad input (a path, a bucket, a server that does not answer): one line, exit 2
