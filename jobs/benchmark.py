"""Benchmarks that compare the project with what a user would use instead, in one run.

    python jobs/benchmark.py data                          # 4,000 generated photo-like JPEGs
    python jobs/benchmark.py data --data /data/imagenet-subset --epochs 3 --json
    python jobs/benchmark.py gpu --json                    # one GPU; plain PyTorch, no Ray or MLflow
    python jobs/benchmark.py scale --images 14200000       # tiny synthetic images at ImageNet-21k's count
    python jobs/benchmark.py folder --images 1281000       # an ImageNet folder of 1.28 M tiny files

`data`: the Ray Data plan (from a folder, prepared shards, 256-px shards, s3://) against
torchvision's DataLoader on the same files, cores and output; see pipeline/benchmark.py.
`gpu`: the training step per precision and layout, the two towers, and the data side on one
device; see pipeline/gpu_benchmark.py. `scale`: N tiny images written straight into prepared shards,
then open, first batch, steady img/s, driver and worker memory and a resumed epoch at that N; see
pipeline/experiments/scale.py. Each prints its measurements (and with --json one JSON
document, last) whose numbers go to BENCHMARKS.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# `gpu` runs on a lent GPU machine from a clone that is not installed, where `python jobs/benchmark.py` puts
# jobs/ on sys.path, not the clone's root (the jobs that need Ray find it installed, or on Ray's PYTHONPATH).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA_PATHS = ("decode", "reference", "folder", "shards", "shards-256", "uint8", "s3")
GPU_VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")  # gpu_benchmark.VARIANTS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser(
        "data",
        help="the data path vs torchvision's DataLoader",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data.add_argument(
        "--data",
        default=None,
        help="an ImageNet-layout folder (train/<class>/*.JPEG, val/...) to use instead of generated photo-like JPEGs",
    )
    data.add_argument("--images", type=int, default=4000, help="photo-like JPEGs to generate (500x375, quality 90)")
    data.add_argument("--epochs", type=int, default=2, help="passes over the train images per path")
    data.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores every path may use")
    data.add_argument("--paths", default=",".join(DATA_PATHS), help=f"which paths to run, of {','.join(DATA_PATHS)}")
    data.add_argument(
        "--work",
        default=str(Path.home() / ".cache" / "alexnet-ray" / "benchmark"),
        help="where generated files and prepared shards are kept between runs",
    )
    data.add_argument("--json", action="store_true", help="print the whole report as JSON at the end")

    gpu = commands.add_parser(
        "gpu",
        help="training step, two towers and data rates on one device",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gpu.add_argument("--device", default="auto", help="auto (the first GPU, else the CPU), cuda:N or cpu")
    gpu.add_argument("--batch-sizes", default="128,256", help="global batch sizes to time the step at")
    gpu.add_argument("--variants", default=",".join(GPU_VARIANTS), help=f"of {','.join(GPU_VARIANTS)}")
    gpu.add_argument("--width", type=float, default=1.0, help="channel multiplier; 1.0 is the paper's network")
    gpu.add_argument("--image-size", type=int, default=227)
    gpu.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported")
    gpu.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    gpu.add_argument("--images", type=int, default=256, help="photo-like JPEGs for the data rates")
    gpu.add_argument("--json", action="store_true", help="print the whole report as JSON at the end")

    scale = commands.add_parser(
        "scale",
        help="the data path at N synthetic tiny images (open, first batch, img/s, memory, resume)",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scale.add_argument("--images", type=int, default=1_281_167, help="train images to synthesise (64x48 JPEGs)")
    scale.add_argument("--measure-images", type=int, default=300_000, help="images of epoch 0 to time")
    scale.add_argument(
        "--resume-images", type=int, default=300_000, help="images of the resumed epoch to time (or the rest of it)"
    )
    scale.add_argument(
        "--limit-s", type=float, default=600, help="seconds each read may take; one cut off reports what it got"
    )
    scale.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores for synthesis and Ray")
    scale.add_argument(
        "--work", default="/tmp/alexnet-scale", help="where the shards are synthesised, and reused between runs"
    )
    scale.add_argument("--delete", action="store_true", help="delete the synthesised shards afterwards")
    scale.add_argument("--json", action="store_true", help="print the whole report as JSON at the end")
    folder = commands.add_parser(
        "folder",
        help="an ImageNet folder of N tiny JPEGs (open, first batch, img/s, driver memory, resume)",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    folder.add_argument("--images", type=int, default=1_281_000, help="train files to write (64x48 JPEGs)")
    folder.add_argument("--measure-images", type=int, default=300_000, help="images of epoch 0 to time")
    folder.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores for Ray")
    folder.add_argument("--work", default="/tmp/alexnet-folder", help="where the folder is written, and reused")
    folder.add_argument("--json", action="store_true", help="print the whole report as JSON at the end")
    args = parser.parse_args(argv)
    if args.command == "folder":
        if args.images < 1000 or args.measure_images < 512 or args.cores < 1:
            parser.error("--images must be at least 1000, --measure-images at least 512, --cores at least 1")
        return args
    if args.command == "scale":
        # Two row groups at least: the resumed epoch skips the first half of them.
        if args.images < 512 or min(args.measure_images, args.resume_images, args.cores) < 1 or args.limit_s <= 0:
            parser.error(
                "--images must be at least 512, --measure-images, --resume-images and --cores at least 1, "
                "--limit-s positive"
            )
        return args
    if args.command == "gpu":
        try:
            args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        except ValueError:
            parser.error(f"--batch-sizes: expected numbers separated by commas, got {args.batch_sizes!r}")
        args.variants = tuple(v for v in args.variants.split(",") if v)
        unknown = set(args.variants) - set(GPU_VARIANTS)
        if unknown or not args.variants:
            parser.error(
                f"--variants: unknown {', '.join(sorted(unknown)) or '(none given)'}; "
                f"choose from {','.join(GPU_VARIANTS)}"
            )
        if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0 or args.images < 1:
            parser.error("--batch-sizes, --steps and --images must be at least 1, --warmup at least 0")
        return args
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
    if args.command == "gpu":
        from pipeline.experiments import gpu_benchmark

        report = gpu_benchmark.run_gpu(
            device=args.device,
            batch_sizes=args.batch_sizes,
            variants=args.variants,
            width=args.width,
            image_size=args.image_size,
            steps=args.steps,
            warmup=args.warmup,
            images=args.images,
        )
        if args.json:
            print(json.dumps(report))
        return 0
    if args.command == "folder":
        from pipeline.experiments import folder_scale

        report = folder_scale.run_folder(args.images, Path(args.work), args.cores, args.measure_images)
        print("\n".join(f"{name:24s} {value}" for name, value in report.items()))
        if args.json:
            print(json.dumps(report))
        return 0
    if args.command == "scale":
        # A read cut off at --limit-s goes on in its thread until Ray shuts down; after that Ray's APIs would
        # call ray.init() on their own and join any other Ray on the machine (it did, once). Read at import.
        os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
        from pipeline.experiments import scale

        report = scale.run_scale(
            images=args.images,
            measure_images=args.measure_images,
            resume_images=args.resume_images,
            limit_s=args.limit_s,
            cores=args.cores,
            work=Path(args.work),
            delete=args.delete,
        )
        print()
        print(scale.table(report))
        if args.json:
            print(json.dumps(report))
        return 0
    from pipeline.experiments import benchmark

    report = benchmark.run_data(
        data_dir=args.data,
        images=args.images,
        epochs=args.epochs,
        cores=args.cores,
        work=Path(args.work),
        paths=args.paths,
    )
    print()
    print(benchmark.table(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    from pipeline import errors  # here: after sys.path holds the clone's root (above)

    sys.exit(errors.run_job(main))  # bad input: one line, `error: ...`, exit 2
