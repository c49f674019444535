"""One frozen config, named presets, and the command line generated from it.

    Config()                          the paper's network and recipe (§3-§5)
    PRESETS["sample"]                 the embedded default: small, fast, CPU-friendly
    PRESETS["torchvision"]            torchvision's AlexNet variant and its reference recipe
    parse_args(["--epochs", "3"])     preset first, then every flag given on the command line

    add_arguments(parser)             every field as a flag, in the --help groups of GROUPS
    from_namespace(args)              the Config of parsed flags (a job's own flags beside them are left)

Every field is a flag (`batch_size` -> `--batch-size`); its help text is the field's `help`
metadata, its --help group the field's `group`. Unknown flags and bad values stop the job with a
message naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _f(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


# The --help groups, in the order --help shows them: a field's `group` metadata names one. Each group has
# a field maker of its own (`_data(default, help)`), so a field cannot be left out of them.
GROUPS = {
    "preset": "preset",
    "data": "data",
    "model": "model",
    "switch": "ablation switches: the paper's design choices (§3-§5), which jobs/ablate.py flips",
    "recipe": "recipe (§5)",
    "device": "devices",
    "cluster": "cluster",
    "checkpoints": "checkpoints and restarts",
    "tracking": "tracking",
}
_preset, _data, _model, _switch, _recipe, _device, _cluster, _checkpoints, _tracking = (
    partial(_f, group=group) for group in GROUPS
)


@dataclass(frozen=True)
class Config:
    preset: str = _preset("paper", "named preset the other flags override", choices=("sample", "paper", "torchvision"))

    # data
    data: str = _data(
        "",
        "dataset root: a local folder in ImageNet layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG); "
        "empty = generate (once, cached) the small sample dataset; --preset sample only",
    )
    s3_endpoint: str = _data(
        "",
        "S3-compatible endpoint URL for s3:// data (MinIO, Ceph, ...); empty = "
        "AWS_ENDPOINT_URL or AWS itself. Credentials always come from the standard AWS chain",
    )
    num_classes: int = _data(
        0,
        "classes, for WebDataset / Hugging Face data that do not name them; 0 = infer "
        "(Parquet label statistics; ImageNet-1k's 1000 for WebDataset)",
    )
    manifest_sha256: str = _data(
        "",
        "refuse to train unless the shards' manifest.json has this sha256 "
        "(pin a run to the exact data of an earlier one)",
    )
    resize_size: int = _data(256, "shorter side is rescaled to this, then the central square is kept (§2)")
    crop_size: int = _data(
        227,
        "random training crop / central eval crop; the paper says 224, 227 makes "
        "conv1's arithmetic exact ((227-11)/4+1 = 55), as in Caffe's reference model",
    )
    flip_p: float = _data(0.5, "probability of a horizontal reflection (§4.1)")

    # model
    model: str = _model(
        "alexnet",
        "alexnet: the paper's network (LRN, groups); torchvision: torchvision's variant",
        choices=("alexnet", "torchvision"),
    )
    width: float = _model(1.0, "multiplier on every layer's width (alexnet only); 1.0 is the paper's network")

    # ablation switches: the paper's design choices (§3-§5), which jobs/ablate.py flips
    activation: str = _switch(
        "relu",
        "alexnet's nonlinearity after conv1-5, fc6 and fc7 (§3.1): relu (the paper) or "
        "tanh, the saturating unit ReLU replaced",
        choices=("relu", "tanh"),
    )
    lrn: str = _switch(
        "on",
        "alexnet's local response normalisation after conv1 and conv2 (§3.3): on (the paper) or off",
        choices=("on", "off"),
    )
    pool: str = _switch(
        "overlapping",
        "alexnet's max pooling after conv1, conv2, conv5 (§3.4): overlapping = 3x3 "
        "every 2 px (the paper); non-overlapping = 2x2 every 2 px. Maps 55-27-13-6 at "
        "227 either way; at 112 px 26-12-5-2 against 26-13-6-3",
        choices=("overlapping", "non-overlapping"),
    )
    dropout: float = _switch(0.5, "dropout probability on fc6 and fc7 (§4.2); 0 = none")
    lighting_std: float = _switch(
        0.1, "std of the PCA lighting coefficients alpha (§4.1); 0 disables it (which --lighting off says in words)"
    )
    augment: str = _switch(
        "on",
        "training crops (§4.1): on = a random crop and a horizontal reflection (--flip-p) of "
        "each image, new every epoch; off = the central crop, unflipped, every epoch (as "
        "validation sees it)",
        choices=("on", "off"),
    )
    init: str = _switch(
        "paper",
        "alexnet weights: paper = N(0, 0.01) and biases of --init-bias (§5); kaiming = He "
        "init, which a narrow network needs to learn within a few epochs; xavier = Glorot "
        "init; kaiming and xavier start every bias at 0",
        choices=("paper", "kaiming", "xavier"),
    )
    init_bias: float = _switch(
        1.0,
        "with --init paper, the bias of conv2, conv4, conv5, fc6 and fc7 (§5: 1; Caffe's "
        "reference model: 0.1); every other bias starts at 0",
    )

    # recipe (§5)
    epochs: int = _recipe(90, "passes over the training set")
    batch_size: int = _recipe(128, "GLOBAL batch size, split evenly across workers (128 = 2 workers x 64)")
    lr: float = _recipe(0.01, "initial learning rate")
    momentum: float = _recipe(0.9, "SGD momentum")
    weight_decay: float = _recipe(5e-4, "L2 weight decay")
    schedule: str = _recipe(
        "plateau",
        "plateau: lr / 10 when val top-1 stops improving (the paper); step: lr x gamma every --lr-step-epochs",
        choices=("plateau", "step"),
    )
    lr_gamma: float = _recipe(0.1, "factor applied to the learning rate at each drop")
    lr_step_epochs: int = _recipe(30, "epochs between drops for --schedule step")
    plateau_patience: int = _recipe(3, "epochs without a better val top-1 before a drop, for --schedule plateau")
    seed: int = _recipe(0, "seed for initialisation, data order and augmentation")

    # devices
    use_gpu: bool = _device(False, "GPUs (1 per worker, 2 with --placement grouped) and NCCL; otherwise CPU and gloo")
    precision: str = _device(
        "auto",
        "auto: bf16 autocast on GPUs that support it, else fp32 (the CPU); bf16 / fp16: "
        "autocast (fp16 with a gradient scaler); fp32: none",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    channels_last: str = _device(
        "auto",
        "channels-last memory for the model and its input: auto = on with GPUs, where "
        "cuDNN's convolutions prefer it; on; off",
        choices=("auto", "on", "off"),
    )
    compile: bool = _device(
        False, "torch.compile the model; the first step's compile time is logged as compile_seconds"
    )
    decode_on: str = _device(
        "cpu",
        "cpu: Ray Data decodes and crops, uint8 crops travel; gpu: Ray Data only reads the "
        "bytes and the trainer decodes them on its GPU (nvJPEG) and crops there",
        choices=("cpu", "gpu"),
    )
    placement: str = _device(
        "data",
        "data: one device per worker, DDP across workers; grouped: the paper's two towers "
        "on two devices inside each worker (both on the CPU without GPUs), DDP across "
        "workers",
        choices=("data", "grouped"),
    )

    # cluster
    address: str = _cluster(
        "",
        "the Ray cluster to join: host:port of its head, or auto for a `ray start` on this "
        "machine; empty = RAY_ADDRESS (which `ray job submit` sets), else a private local Ray "
        "of this job's own, never another job's",
    )
    workers: int = _cluster(2, "Ray Train workers (data-parallel replicas)")
    cpus_per_worker: float = _cluster(
        0.0,
        "logical CPUs each train worker reserves; 0 = automatic (leaves Ray Data "
        "at least one CPU so the job can never deadlock)",
    )
    train_resource: str = _cluster(
        "",
        "a custom resource each train worker takes 1 of, so the workers run only on the "
        "nodes that offer it (cluster/: the GPU node types offer `train`); empty = none",
    )
    data_resource: str = _cluster(
        "",
        "a custom resource each Ray Data decode task takes a sliver of, so decoding runs "
        "only on the nodes that offer it (cluster/: the CPU-only node types offer "
        "`data: 1`, and scale up for it); empty = any node with a free CPU",
    )
    worker_strategy: str = _cluster(
        "PACK",
        "Ray placement strategy for the train workers (SPREAD puts them on different nodes)",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    )
    deterministic: bool = _cluster(
        False,
        "fixed data order (Ray Data preserve_order, fixed read blocks): the same "
        "seed gives the same loss curve on any cluster shape, at some speed cost",
    )
    verbose: bool = _cluster(
        False,
        "print what Ray Train and Ray Data log on every healthy run (each report's metrics, each "
        "checkpoint, each dataset's execution plan); off, Ray's log files still have them",
    )

    # checkpoints and restarts
    storage_path: str = _checkpoints(
        "",
        "where Ray Train keeps checkpoints (local path or s3://); "
        "empty = ./ray_results; a multi-node cluster needs shared storage",
    )
    keep_checkpoints: int = _checkpoints(
        2,
        "Ray Train checkpoints kept: this many with the best val top-1, plus the "
        "latest (to resume from); 0 = keep every epoch's",
    )
    checkpoint_every_steps: int = _checkpoints(
        0,
        "also checkpoint every N training steps within an epoch: a restart "
        "goes on from the last one, leaving out exactly the images already "
        "trained on. 0 = at the end of each epoch only",
    )
    max_failures: int = _checkpoints(2, "restarts of the worker group from the latest checkpoint after a failure")
    resume: str = _checkpoints(
        "",
        "continue an earlier run from its newest checkpoint, in the same MLflow run: its run id, or latest "
        "(the experiment's newest unfinished run). Flags not given are the run's; giving a flag that "
        "changes what it computes is refused",
    )

    # tracking
    experiment: str = _tracking("alexnet", "MLflow experiment name")
    registered_model: str = _tracking(
        "",
        "MLflow registered model that receives the run's best model; empty = "
        "alexnet, or alexnet-sample when training on the generated sample (--data "
        "empty), so sample models never compete with real ones",
    )
    log_models: str = _tracking(
        "best",
        "which epochs become MLflow logged models: best = each epoch that improves "
        "val top-1, and the last; all = every epoch; none = no models (nothing is "
        "registered)",
        choices=("best", "all", "none"),
    )
    sample_log: str = _tracking(
        "",
        "write the indices of the images every training step took to this folder (a "
        "JSON-lines file per worker and attempt): an audit of what the run trained on",
    )

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.num_classes >= 0, f"--num-classes must be >= 0, got {self.num_classes}")
        for name in ("epochs", "batch_size", "workers", "resize_size", "crop_size", "lr_step_epochs"):
            need(getattr(self, name) >= 1, f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        need(self.plateau_patience >= 0, f"--plateau-patience must be >= 0, got {self.plateau_patience}")
        need(
            self.checkpoint_every_steps >= 0,
            f"--checkpoint-every-steps must be >= 0 (0 = per epoch), got {self.checkpoint_every_steps}",
        )
        need(self.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0 (0 = all), got {self.keep_checkpoints}")
        need(self.max_failures >= -1, f"--max-failures must be >= -1 (-1 = forever), got {self.max_failures}")
        need(self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(self.width > 0, f"--width must be positive, got {self.width}")
        need(0 <= self.flip_p <= 1, f"--flip-p must be in [0, 1], got {self.flip_p}")
        need(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        need(0 < self.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], got {self.lr_gamma}")
        need(
            self.momentum >= 0 and self.weight_decay >= 0 and self.lighting_std >= 0 and self.cpus_per_worker >= 0,
            "--momentum, --weight-decay, --lighting-std and --cpus-per-worker must not be negative",
        )
        need(
            self.decode_on == "cpu" or self.use_gpu,
            "--decode-on gpu decodes on the train workers' GPUs: it needs --use-gpu (and a cluster with GPUs)",
        )
        need(
            self.placement == "data" or self.model == "alexnet",
            f"--placement grouped splits the paper's network into towers; --model {self.model} has no towers",
        )
        switched = [
            f"--{_flag(k)} {v}"
            for k, v in (("activation", self.activation), ("lrn", self.lrn), ("pool", self.pool))
            if v != PAPER_LAYERS[k]
        ]
        need(
            self.model == "alexnet" or not switched and self.init_bias == 1.0,
            f"{', '.join(switched) or '--init-bias'} switches the paper's network; --model {self.model} has no such "
            f"switch",
        )
        need(
            self.placement == "data" or not switched,
            f"--placement grouped builds the paper's towers (ReLU, LRN, overlapping pooling): "
            f"{', '.join(switched)} needs --placement data",
        )
        need(
            self.init == "paper" or self.init_bias == 1.0,
            f"--init-bias {self.init_bias:g} is the bias --init paper gives conv2/4/5, fc6 and fc7; --init "
            f"{self.init} starts every bias at 0",
        )
        need(
            self.crop_size <= self.resize_size,
            f"--crop-size {self.crop_size} must not exceed --resize-size {self.resize_size}",
        )
        need(
            self.batch_size % self.workers == 0,
            f"--batch-size {self.batch_size} is the global batch and must divide evenly across "
            f"--workers {self.workers}",
        )
        for name, f in ((f.name, f) for f in dataclasses.fields(self)):
            choices = f.metadata.get("choices")
            need(
                choices is None or getattr(self, name) in choices,
                f"--{_flag(name)} must be one of {', '.join(choices or ())}, got {getattr(self, name)!r}",
            )

    @property
    def worker_batch_size(self) -> int:
        return self.batch_size // self.workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# The layers the paper's towers compute (placement.py); switching one needs --placement data.
PAPER_LAYERS = {"activation": "relu", "lrn": "on", "pool": "overlapping"}


PRESETS: dict[str, Config] = {
    "paper": Config(),
    # A reduced AlexNet (all widths / 4) at 112 px on the generated 10-class sample: trains on a
    # 2-core laptop CPU in a few minutes and still has every part of the paper's network.
    "sample": Config(
        preset="sample",
        width=0.25,
        init="kaiming",
        resize_size=128,
        crop_size=112,
        epochs=5,
        batch_size=64,
        lr=0.005,
        schedule="step",
        lr_step_epochs=4,
    ),
    # torchvision's recipe (references/classification): 224 crops, batch 256 (8 GPUs x 32),
    # lr 0.01, weight decay 1e-4, lr / 10 every 30 epochs.
    "torchvision": Config(
        preset="torchvision",
        model="torchvision",
        crop_size=224,
        batch_size=256,
        weight_decay=1e-4,
        schedule="step",
        lr_step_epochs=30,
    ),
}
DEFAULT_PRESET = "sample"


# The paper's design choices as ablation switches (jobs/ablate.py): name -> its values (float: a number).
# `lighting` is not a field of its own, so that one number says whether and how much: off is
# --lighting-std 0, on is the config's std (the paper's 0.1 where that is 0).
SWITCHES: dict[str, Any] = {
    "activation": ("relu", "tanh"),  # §3.1
    "lrn": ("on", "off"),  # §3.3
    "pool": ("overlapping", "non-overlapping"),  # §3.4
    "dropout": float,  # §4.2
    "lighting": ("on", "off"),  # §4.1
    "augment": ("on", "off"),  # §4.1
    "init": ("paper", "kaiming", "xavier"),  # §5
    "init_bias": float,  # §5
}


def switches(cfg: Config) -> dict[str, Any]:
    """The choice `cfg` makes for each switch."""
    return {
        name: ("on" if cfg.lighting_std > 0 else "off") if name == "lighting" else getattr(cfg, name)
        for name in SWITCHES
    }


def switched(cfg: Config) -> dict[str, Any]:
    """The switches `cfg` sets otherwise than its preset does: what an ablation changed."""
    base = switches(PRESETS[cfg.preset])
    return {name: value for name, value in switches(cfg).items() if value != base[name]}


def describe(choices: dict[str, Any]) -> str:
    """{"activation": "tanh", "lrn": "off"} -> "activation=tanh, lrn=off"; {} -> "" (the preset's own)."""
    return ", ".join(
        f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}" for name, value in choices.items()
    )


def with_switches(cfg: Config, choices: dict[str, str]) -> Config:
    """`cfg` with switches set from text ({"activation": "tanh", "dropout": "0"}); a bad name or value is
    a ValueError naming it and what it could be."""
    overrides: dict[str, Any] = {}
    for name, text in choices.items():
        kind = SWITCHES.get(name)
        if kind is None:
            raise ValueError(f"unknown switch {name!r}; the switches are {', '.join(SWITCHES)}")
        if kind is float:
            try:
                value: Any = float(text)
            except ValueError:
                raise ValueError(f"{name}={text!r}: expected a number") from None
        elif text not in kind:
            raise ValueError(f"{name}={text!r}: expected one of {', '.join(kind)}")
        else:
            value = text
        if name == "lighting":
            overrides["lighting_std"] = 0.0 if value == "off" else (cfg.lighting_std or PRESETS["paper"].lighting_std)
        else:
            overrides[name] = value
    return dataclasses.replace(cfg, **overrides)


# The flags of the config's fields: a flag not given stays out of the namespace (default SUPPRESS), so that
# the preset it names, whatever the flags' order, is what every other flag overrides; --help states the
# sample preset's value in words instead.
LIGHTING_FLAG = "lighting"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every field of Config as a flag (`batch_size` -> `--batch-size`), in its --help group, plus --lighting."""
    defaults = PRESETS[DEFAULT_PRESET].to_dict()
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    for f in dataclasses.fields(Config):
        default = defaults[f.name]
        shown = "" if default == "" else f" (default: { ({True: 'on', False: 'off'}.get(default, default)) })"
        kwargs: dict[str, Any] = {"help": (f.metadata["help"] + shown).replace("%", "%%"), "default": argparse.SUPPRESS}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[str(f.type)]
            kwargs["choices"] = f.metadata.get("choices")
        groups[f.metadata["group"]].add_argument(f"--{_flag(f.name)}", **kwargs)
    groups["switch"].add_argument(
        f"--{LIGHTING_FLAG}",
        choices=SWITCHES["lighting"],
        default=argparse.SUPPRESS,
        help="PCA lighting (§4.1) in words: off = --lighting-std 0; on = the preset's std (default: on)",
    )


def build_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """jobs/train.py's parser; `kwargs` go to ArgumentParser (jobs/ablate.py's description and usage)."""
    kwargs.setdefault(
        "description",
        "Train AlexNet with Ray Data + Ray Train, tracked in MLflow. Defaults shown "
        "are the sample preset's; --preset paper|torchvision changes them.",
    )
    kwargs.setdefault("usage", "%(prog)s [--preset NAME] [FLAG ...]   (the flags: below, in groups)")
    parser = argparse.ArgumentParser(allow_abbrev=False, **kwargs)
    add_arguments(parser)
    return parser


def from_namespace(args: argparse.Namespace) -> Config:
    """The Config of parsed flags: their preset (default: the sample), then every flag given. Other entries of
    `args` (a job's own flags) are left alone. A bad combination is a ValueError naming the flags."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    cfg = dataclasses.replace(PRESETS[given.pop("preset", DEFAULT_PRESET)], **given)
    lighting = getattr(args, LIGHTING_FLAG, None)
    if lighting is not None:
        if "lighting_std" in given and (lighting == "on") != (cfg.lighting_std > 0):
            raise ValueError(f"--lighting {lighting} contradicts --lighting-std {cfg.lighting_std:g}")
        cfg = with_switches(cfg, {"lighting": lighting})
    return cfg


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Preset first, then the flags given explicitly; exits with a usage message on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return from_namespace(args)
    except ValueError as e:
        parser.error(str(e))


def given_fields(argv: Sequence[str] | None = None) -> frozenset[str]:
    """The fields the command line sets explicitly (--resume takes the others from the run it continues)."""
    args, _ = build_parser().parse_known_args(argv)
    names = {f.name for f in dataclasses.fields(Config)} & set(vars(args))
    if hasattr(args, LIGHTING_FLAG):
        names.add("lighting_std")
    return frozenset(names)
