"""Evaluate a trained model: top-1 / top-5 from the centre crop and from the paper's ten crops (§4.1).

    python jobs/evaluate.py --model models:/alexnet@champion --data s3://bucket/imagenet-shards
    python jobs/evaluate.py --model models:/alexnet-sample@champion             # the generated sample
    python jobs/evaluate.py --model ray_results/alexnet-.../checkpoint_... --data /data/imagenet --use-gpu

--model takes a registered model (models:/name@alias, models:/name/3), a logged model (models:/m-...,
runs:/<run id>/epoch-004) or a Ray Train checkpoint (directory or checkpoint.pt, local or s3://). The
numbers go on the model version (tags) and its logged model (metrics of an evaluation run); the
logic lives in pipeline/evaluate.py.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True,
                        help="models:/name@alias, models:/name/version, models:/<logged model id>, "
                             "runs:/<run id>/<model name>, or a checkpoint directory / file")
    parser.add_argument("--data", default="", help="dataset root, as for training; empty = the generated sample")
    parser.add_argument("--use-gpu", action="store_true", help="score on GPUs, one actor per GPU")
    parser.add_argument("--actors", type=int, default=0,
                        help="scoring actors holding the model; 0 = one per GPU with --use-gpu, else one per "
                             "read unit (256 images) up to the cluster's CPUs less one")
    parser.add_argument("--no-record", action="store_true", help="print the numbers only; write nothing to MLflow")
    args = parser.parse_args(argv)
    if args.actors < 0:
        parser.error(f"--actors must be >= 0, got {args.actors}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.experiments import evaluation  # after parsing: --help and flag errors answer without importing Ray

    try:
        result = evaluation.evaluate_model(args.model, args.data, use_gpu=args.use_gpu, actors=args.actors,
                                         record=not args.no_record)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = result["metrics"]
    print(f"\n{args.model} (epoch {result['epoch'] + 1}) on {result['data']} val: {result['images']} images"
          + (f", {len(result['failed'])} could not be decoded and are left out" if result["failed"] else ""))
    print(f"  centre crop  top-1 {m['val_top1']:.2f}%  top-5 {m['val_top5']:.2f}%")
    print(f"  ten crops    top-1 {m['val_top1_10crop']:.2f}%  top-5 {m['val_top5_10crop']:.2f}%")
    for where in result["recorded"]:
        print(f"  recorded on {where}")
    if not result["recorded"]:
        print("  not recorded in MLflow" + (" (--no-record)" if args.no_record else
                                            " (a checkpoint has no model version or logged model to hold it)"))
    print(json.dumps({"metrics": m, "images": result["images"], "failed": len(result["failed"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
