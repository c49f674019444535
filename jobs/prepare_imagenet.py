"""ImageNet (as downloaded or extracted) -> Parquet shards + manifest.json, locally or on s3://.

    python jobs/prepare_imagenet.py /data/imagenet s3://bucket/imagenet-shards
    python jobs/prepare_imagenet.py /data/imagenet /data/shards-256 --resize 256 --lighting-sample 20000
    ray job submit --working-dir . -- python jobs/prepare_imagenet.py s3://raw/imagenet s3://bucket/shards

The input folder may hold train/<wnid>/ and val/<wnid>/ folders, the flat official val folder with
LOC_val_solution.csv or the devkit, or ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar as
downloaded (read in place, never extracted). One Ray task writes each shard, in parallel over the
cluster's CPUs; re-running completes a partial output (pipeline/prepare.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("source", help="ImageNet root: a local folder or s3://bucket/prefix")
    parser.add_argument("output", help="where the shards go: a local folder or s3://bucket/prefix")
    parser.add_argument("--resize", type=int, default=None,
                        help="store images with the shorter side resized to this (the paper's 256), re-encoded")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument("--shard-mb", type=float, default=128, help="target shard size in MB")
    parser.add_argument("--val-labels", default=None,
                        help="LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt (default: found in source)")
    parser.add_argument("--devkit", default=None,
                        help="ILSVRC2012_devkit_t12 folder, .tar.gz or meta.mat (default: found in source)")
    parser.add_argument("--lighting-sample", type=int, default=None,
                        help="compute §4.1's PCA lighting from this many train images (0 = all) into the manifest")
    args = parser.parse_args(argv)
    if args.resize is not None and args.resize < 1:
        parser.error(f"--resize must be at least 1, got {args.resize}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.shard_mb <= 0:
        parser.error(f"--shard-mb must be positive, got {args.shard_mb}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.data import prepare, storage

    try:
        prepare.absolute_apart(args.source, args.output)  # before Ray starts: a wrong output is answered at once
        from pipeline.cluster import connect_ray

        connect_ray()
        prepare.prepare(args.source, args.output, resize=args.resize, quality=args.quality,
                        target_mb=args.shard_mb, val_labels=args.val_labels, devkit=args.devkit,
                        lighting_sample=args.lighting_sample)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError,
            storage.StoreUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
