"""Check the two-tower AlexNet on a GPU machine, then time one training step per placement.

    python jobs/gpu_check.py                        # auto: 2 GPUs -> a tower on each; 1 GPU -> both on cuda:0
    python jobs/gpu_check.py --out gpu_check.json   # also write the JSON line to a file
    python jobs/gpu_check.py --device cpu --batch-size 4 --width 0.25 --image-size 112 --steps 2 --warmup 1
                                                    # the CPU smoke test (tests/test_placement.py runs it)

Plain PyTorch: it needs only torch and torchvision (no Ray, no MLflow) and runs from a clone without
installing. It

1. picks the devices and prints the card name(s) and the torch version;
2. checks on those devices that TwoTowerAlexNet computes the grouped AlexNet's outputs and gradients
   from the same weights, in strict float32 (TF32 off for this check only): the largest difference
   relative to the reference's scale must stay under 1e-5, else the exit code is 1;
3. times a training step (forward + backward + SGD step; batch 128 at full width and 227 input by
   default) for the "data" placement (the grouped model on one device) and the "grouped" placement
   (two towers), the median of --steps steps after --warmup, and prints images/s and their ratio;
4. prints one JSON line with every number, last.

Both placements see the same batch on one worker: "grouped" on two GPUs measures what the paper's
split buys a worker, not data parallelism. With one GPU both towers share it, so the ratio is the
split's overhead. Timing runs with torch's default precision settings (cuDNN convolutions may use
TF32; the JSON records the setting). Its numbers go to BENCHMARKS.md with the card's name from
the JSON, the torch version and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from pipeline.gpu_benchmark import synchronize, time_step  # noqa: E402
from pipeline.model import AlexNet  # noqa: E402
from pipeline.placement import PLACEMENTS, TwoTowerAlexNet, merge_towers  # noqa: E402

TOLERANCE = 1e-5
NUM_CLASSES = 1000


def pick_devices(choice: str) -> list[torch.device]:
    """One device per tower: cuda:0 and cuda:1 when there are two GPUs, cuda:0 twice with one."""
    if choice == "auto" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return [torch.device("cuda", 0), torch.device("cuda", 1 if count >= 2 else 0)]
    if choice == "auto":
        print("no CUDA device found; running on the CPU", file=sys.stderr)
    return [torch.device("cpu"), torch.device("cpu")]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for cuDNN convolutions and CUDA matmuls: with ~1e-3 relative rounding it would hide
    the 1e-5 comparison. torch >= 2.9's fp32_precision API (mixing it with allow_tf32 is an error)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale (per element would blow up near zero)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def check_equivalence(devices: list[torch.device], batch: int, width: float, image_size: int) -> tuple[float, float]:
    """(outputs, gradients) max relative differences, two towers vs the grouped model on devices[0].

    dropout 0 so that train mode is deterministic; kaiming init keeps every layer's gradient well
    away from zero, so relative differences mean something.
    """
    torch.manual_seed(0)
    grouped = AlexNet(num_classes=NUM_CLASSES, width=width, image_size=image_size, dropout=0.0, init="kaiming")
    two = TwoTowerAlexNet.from_grouped(grouped, devices)
    grouped = grouped.to(devices[0])
    x = torch.randn(batch, 3, image_size, image_size, device=devices[0])
    y = torch.randint(0, NUM_CLASSES, (batch,), device=devices[0])

    with strict_fp32():
        with torch.no_grad():
            outputs = rel_diff(two.eval()(x), grouped.eval()(x))
        F.cross_entropy(grouped.train()(x), y).backward()
        F.cross_entropy(two.train()(x), y).backward()
        synchronize(*devices)
    got = merge_towers([{name: p.grad for name, p in tower.named_parameters()} for tower in two.towers])
    grads = max(rel_diff(got[name], p.grad) for name, p in grouped.named_parameters())
    return outputs, grads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: the GPUs if there are any, else the CPU")
    parser.add_argument("--batch-size", type=int, default=128, help="the paper's batch (§5)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier; 1.0 is the paper's network")
    parser.add_argument("--image-size", type=int, default=227)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per placement; the median is reported")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(f"need --batch-size >= 1, --steps >= 1, --warmup >= 0; got {args.batch_size}, "
                     f"{args.steps}, {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    devices = pick_devices(args.device)
    names = [device_name(d) for d in devices]
    print(f"torch {torch.__version__}; towers on {', '.join(f'{d} ({n})' for d, n in zip(devices, names))}")

    output_diff, grad_diff = check_equivalence(devices, args.batch_size, args.width, args.image_size)
    equivalent = output_diff < TOLERANCE and grad_diff < TOLERANCE
    print(f"two towers vs grouped: outputs {output_diff:.2e}, gradients {grad_diff:.2e} (max rel diff, "
          f"tolerance {TOLERANCE:.0e}): {'ok' if equivalent else 'FAILED'}")

    torch.backends.cudnn.benchmark = True  # as training would run; both placements alike
    seconds = {placement: time_step("fp32", devices, placement=placement, batch_size=args.batch_size, width=args.width,
                                    image_size=args.image_size, steps=args.steps, warmup=args.warmup).step_ms / 1e3
               for placement in PLACEMENTS}
    images_per_s = {placement: args.batch_size / s for placement, s in seconds.items()}
    ratio = images_per_s["grouped"] / images_per_s["data"]
    for placement in PLACEMENTS:
        print(f"{placement:>8}: {images_per_s[placement]:9.1f} img/s ({seconds[placement] * 1e3:.1f} ms/step)")
    print(f"grouped / data: {ratio:.3f}")

    report = {
        "torch": torch.__version__,
        "devices": [str(d) for d in devices],
        "device_names": names,
        "equivalent": equivalent,
        "output_rel_diff": output_diff,
        "grad_rel_diff": grad_diff,
        "tolerance": TOLERANCE,
        "images_per_s": images_per_s,
        "step_ms": {placement: s * 1e3 for placement, s in seconds.items()},
        "grouped_over_data": ratio,
        "batch_size": args.batch_size,
        "width": args.width,
        "image_size": args.image_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "timing_conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
    }
    line = json.dumps(report)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return 0 if equivalent else 1


if __name__ == "__main__":
    sys.exit(main())
