"""The device check: the CUDA paths of the worker loop, the towers, nvJPEG and the step's speed, in one call.

    python jobs/gpu_check.py --out $OUT/gpu_check.json   # on a lent GPU machine (BENCHMARKS.md: what to carry)
    python jobs/gpu_check.py --device cpu                # the same code on the CPU, small (tests run it)

Plain PyTorch: no Ray, no MLflow. What it checks: pipeline/experiments/device_check.py. The last line printed is
one JSON document; exit code 0 when every section passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# A lent GPU machine runs this from a clone that is not installed, where `python jobs/gpu_check.py` puts jobs/
# on sys.path, not the clone's root (the jobs that need Ray find it installed, or on Ray's PYTHONPATH).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.experiments import device_check  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu"),
        default="auto",
        help="auto: the GPUs if there are any (the paper's network), else the CPU (a small one)",
    )
    parser.add_argument("--quick", action="store_true", help="the small sizes on any device (a smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (~1 min on a GPU)")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = device_check.Size.quick() if args.quick else None
    report = device_check.run(device=args.device, size=size, compile=not args.no_compile)
    line = json.dumps(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
