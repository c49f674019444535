"""Benchmarks that compare the project with what a user would use instead, in one run.

    python jobs/benchmark.py data                          # 1,500 generated photo-like JPEGs
    python jobs/benchmark.py data --data /data/imagenet-subset --epochs 3 --json

`data`: the Ray Data plan (from a folder, prepared shards, 256-px shards, s3://) against
torchvision's DataLoader on the same files, cores and output; see pipeline/benchmark.py. It prints
a table (and with --json one JSON document, last) whose numbers go to BENCHMARKS.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

DATA_PATHS = ("decode", "reference", "folder", "shards", "shards-256", "uint8", "s3")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="the data path vs torchvision's DataLoader", allow_abbrev=False,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_argument("--data", default=None, help="an ImageNet-layout folder (train/<class>/*.JPEG, val/...) to "
                                                   "use instead of generated photo-like JPEGs")
    data.add_argument("--images", type=int, default=4000, help="photo-like JPEGs to generate (500x375, quality 90)")
    data.add_argument("--epochs", type=int, default=2, help="passes over the train images per path")
    data.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores every path may use")
    data.add_argument("--paths", default=",".join(DATA_PATHS), help=f"which paths to run, of {','.join(DATA_PATHS)}")
    data.add_argument("--work", default=str(Path.home() / ".cache" / "alexnet-ray" / "benchmark"),
                      help="where generated files and prepared shards are kept between runs")
    data.add_argument("--json", action="store_true", help="print the whole report as JSON at the end")
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(DATA_PATHS)
    if unknown:
        parser.error(f"--paths: unknown {', '.join(sorted(unknown))}; choose from {','.join(DATA_PATHS)}")
    if args.images < 2 * 64 or args.epochs < 1 or args.cores < 1:
        parser.error("--images must be at least 128, --epochs and --cores at least 1")
    args.paths = paths
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline import benchmark

    try:
        report = benchmark.run_data(data_dir=args.data, images=args.images, epochs=args.epochs, cores=args.cores,
                                    work=Path(args.work), paths=args.paths)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(benchmark.table(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
