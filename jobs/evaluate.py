"""Evaluate a trained model: top-1 / top-5 from the centre crop and from the paper's ten crops (§4.1).

    python jobs/evaluate.py --model models:/alexnet@champion --data s3://bucket/imagenet-shards
    python jobs/evaluate.py --model models:/alexnet-sample@champion             # the generated sample
    python jobs/evaluate.py --model ray_results/alexnet-.../checkpoint_... --data /data/imagenet --use-gpu

--model takes a registered model (models:/name@alias, models:/name/3), a logged model (models:/m-...,
runs:/<run id>/epoch-004) or a Ray Train checkpoint (directory or checkpoint.pt, local or s3://). The
numbers go on the model version (tags) and its logged model (metrics of an evaluation run); the
logic lives in pipeline/experiments/evaluation.py.
"""

import json
import sys

from pipeline import errors
from pipeline.experiments import evaluation


def main(argv=None) -> int:
    args = evaluation.parse_args(argv)
    result = evaluation.evaluate_model(
        args.model, args.data, use_gpu=args.use_gpu, actors=args.actors, record=not args.no_record
    )
    m = result["metrics"]
    print(
        f"\n{args.model} (epoch {result['epoch'] + 1}) on {result['data']} val: {result['images']} images"
        + (f", {len(result['failed'])} could not be decoded and are left out" if result["failed"] else "")
    )
    print(f"  centre crop  top-1 {m['val_top1']:.2f}%  top-5 {m['val_top5']:.2f}%")
    print(f"  ten crops    top-1 {m['val_top1_10crop']:.2f}%  top-5 {m['val_top5_10crop']:.2f}%")
    for where in result["recorded"]:
        print(f"  recorded on {where}")
    if not result["recorded"]:
        print(
            "  not recorded in MLflow"
            + (
                " (--no-record)"
                if args.no_record
                else " (a checkpoint has no model version or logged model to hold it)"
            )
        )
    print(json.dumps({"metrics": m, "images": result["images"], "failed": len(result["failed"])}))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_job(main))  # bad input: one line, `error: ...`, exit 2
