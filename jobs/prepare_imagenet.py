"""ImageNet (as downloaded or extracted) -> Parquet shards + manifest.json, locally or on s3://.

    python jobs/prepare_imagenet.py /data/imagenet s3://bucket/imagenet-shards
    python jobs/prepare_imagenet.py /data/imagenet /data/shards-256 --resize 256 --lighting-sample 20000
    ray job submit --working-dir . -- python jobs/prepare_imagenet.py s3://raw/imagenet s3://bucket/shards

The input folder may hold train/<wnid>/ and val/<wnid>/ folders, the flat official val folder with
LOC_val_solution.csv or the devkit, or ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar as
downloaded (read in place, never extracted). One Ray task writes each shard, in parallel over the
cluster's CPUs; re-running completes a partial output (pipeline/data/prepare.py).
"""

import sys

from pipeline import errors
from pipeline.data import prepare


def main(argv=None) -> int:
    args = prepare.parse_args(argv)
    prepare.prepare_on_ray(
        args.source,
        args.output,
        resize=args.resize,
        quality=args.quality,
        target_mb=args.shard_mb,
        val_labels=args.val_labels,
        devkit=args.devkit,
        lighting_sample=args.lighting_sample,
    )
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_job(main))  # bad input: one line, `error: ...`, exit 2
