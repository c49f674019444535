"""The ablation switches (§3-§5 as experiments): each changes exactly what it names, the defaults are the
paper's network, and the switches travel with the config into checkpoints and back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline import config, data
from pipeline.config import PRESETS, Config, parse_args
from pipeline.data.readers.folder import image_paths
from pipeline.models import checkpoint
from pipeline.models.alexnet import (
    BIAS_ONE,
    LAYERS,
    PAPER_PARAMETERS,
    AlexNet,
    FourLayerCNN,
    build_from_config,
    count_parameters,
    map_sides,
)
from pipeline.transforms import stages


class Calls(TorchFunctionMode):
    """Every torch function a forward pass calls, by name."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def calls(model: torch.nn.Module, size: int) -> list[str]:
    with torch.no_grad(), Calls() as recorded:
        model.eval()(torch.randn(2, 3, size, size))
    return recorded.names


def small(**switches) -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(num_classes=10, width=0.25, image_size=112, **switches)


def test_the_defaults_build_exactly_the_papers_network():
    cfg = parse_args(["--preset", "paper"])
    assert config.switched(cfg) == {} and config.switches(cfg) == {
        "activation": "relu",
        "lrn": "on",
        "pool": "overlapping",
        "dropout": 0.5,
        "lighting": "on",
        "augment": "on",
        "init": "paper",
        "init_bias": 1.0,
    }
    torch.manual_seed(0)
    built = build_from_config(cfg.to_dict(), 1000)
    torch.manual_seed(0)
    reference = AlexNet()
    assert count_parameters(built) == PAPER_PARAMETERS and built.paper_layers
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), reference.state_dict().values()))
    names = calls(built, 227)
    assert (
        names.count("relu") == 7 and names.count("local_response_norm") == 4 and "tanh" not in names
    )  # 2 LRNs x 2 towers


def test_tanh_replaces_every_relu():
    relu, tanh = small(), small(activation="tanh")
    assert calls(relu, 112).count("relu") == 7  # conv1-5, fc6, fc7
    names = calls(tanh, 112)
    assert names.count("tanh") == 7 and "relu" not in names
    assert not any(isinstance(m, torch.nn.ReLU) for m in tanh.modules())
    # Only the nonlinearity changed: the same seed gives the same weights.
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), tanh.state_dict().values()))


def test_lrn_off_removes_the_normalisation_and_nothing_else():
    on, off = small(), small(lrn=False)
    assert calls(on, 112).count("local_response_norm") == 4  # after conv1 and conv2, in each tower
    names = calls(off, 112)
    assert "local_response_norm" not in names and names.count("relu") == 7 and names.count("max_pool2d") == 3
    # Without LRN the output is the LRN-free computation, step by step.
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        h = off.pool(F.relu(off.conv2(off.pool(F.relu(off.conv1(x))))))
        h = off.pool(F.relu(off.conv5(F.relu(off.conv4(F.relu(off.conv3(h)))))))
        expected = off.fc8(F.relu(off.fc7(F.relu(off.fc6(h.flatten(1))))))
        assert torch.allclose(off.eval()(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    "pool,size,sides,params",
    [
        # At 227 both pools give the paper's maps (its "equivalent dimensions"), so the same parameters.
        ("overlapping", 227, [55, 27, 13, 6], PAPER_PARAMETERS),
        ("non-overlapping", 227, [55, 27, 13, 6], PAPER_PARAMETERS),
        # At the sample's 112 px they differ, and so does fc6 (9 values per pool5 map instead of 4).
        ("overlapping", 112, [26, 12, 5, 2], None),
        ("non-overlapping", 112, [26, 13, 6, 3], None),
    ],
)
def test_pooling_gives_the_documented_shapes(pool, size, sides, params):
    assert map_sides(size, pool) == sides
    model = AlexNet(num_classes=1000 if params else 10, width=1.0 if params else 0.25, image_size=size, pool=pool)
    assert (model.pool.kernel_size, model.pool.stride) == ((3, 2) if pool == "overlapping" else (2, 2))
    shapes = []
    model.pool.register_forward_hook(lambda m, i, out: shapes.append(out.shape[-1]))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    assert shapes == sides[1:]
    assert model.fc6.in_features == model.conv5.out_channels * sides[-1] ** 2
    if params:
        assert count_parameters(model) == params


def test_init_variants_give_their_weight_statistics():
    torch.manual_seed(0)
    xavier = AlexNet(num_classes=10, width=0.25, image_size=112, init="xavier")
    for name in LAYERS:
        w = getattr(xavier, name).weight
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        assert w.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.1), name
        assert torch.count_nonzero(getattr(xavier, name).bias) == 0, name
    caffe = small(init="paper", init_bias=0.1)  # Caffe's reference model: biases of 0.1 instead of 1
    for name in LAYERS:
        layer = getattr(caffe, name)
        assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05), name
        expected = 0.1 if name in BIAS_ONE else 0.0
        assert torch.equal(layer.bias, torch.full_like(layer.bias, expected)), name


def test_switches_are_flags_and_lighting_is_one_number():
    cfg = parse_args(
        [
            "--activation",
            "tanh",
            "--lrn",
            "off",
            "--pool",
            "non-overlapping",
            "--dropout",
            "0",
            "--lighting",
            "off",
            "--augment",
            "off",
            "--init",
            "xavier",
        ]
    )
    assert cfg.lighting_std == 0.0
    assert config.switched(cfg) == {
        "activation": "tanh",
        "lrn": "off",
        "pool": "non-overlapping",
        "dropout": 0.0,
        "lighting": "off",
        "augment": "off",
        "init": "xavier",
    }
    assert config.describe(config.switched(cfg)).startswith("activation=tanh, lrn=off, pool=non-overlapping, dropout=0")
    # The sample preset's own choices (He init) are no switch; relative to the paper they would be.
    assert config.switched(parse_args([])) == {} and config.switched(parse_args(["--init", "paper"])) == {
        "init": "paper"
    }
    assert parse_args(["--lighting", "on", "--lighting-std", "0.2"]).lighting_std == 0.2
    back_on = config.with_switches(cfg, {"lighting": "on", "init": "paper", "init_bias": "0.1"})
    assert (back_on.lighting_std, back_on.init, back_on.init_bias) == (0.1, "paper", 0.1)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lighting", "off", "--lighting-std", "0.1"], "--lighting off contradicts --lighting-std 0.1"),
        (["--activation", "sigmoid"], "invalid choice: 'sigmoid'"),
        (["--preset", "torchvision", "--lrn", "off"], "--lrn off switches the paper's network; --model torchvision"),
        (["--placement", "grouped", "--activation", "tanh"], "--activation tanh needs --placement data"),
        (["--init", "kaiming", "--init-bias", "0.1"], "--init kaiming starts every bias at 0"),
    ],
)
def test_bad_switches_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_with_switches_refuses_unknown_names_and_values():
    with pytest.raises(ValueError, match="unknown switch 'relu'; the switches are activation, lrn"):
        config.with_switches(Config(), {"relu": "off"})
    with pytest.raises(ValueError, match=r"pool='none': expected one of overlapping, non-overlapping"):
        config.with_switches(Config(), {"pool": "none"})
    with pytest.raises(ValueError, match="dropout='half': expected a number"):
        config.with_switches(Config(), {"dropout": "half"})


def test_a_checkpoint_rebuilds_the_switched_network(tmp_path):
    cfg = dataclasses.replace(PRESETS["sample"], activation="tanh", lrn="off", pool="non-overlapping", dropout=0.0)
    torch.manual_seed(0)
    model = build_from_config(cfg.to_dict(), 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    checkpoint.save(
        tmp_path,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        epoch=0,
        config=cfg.to_dict(),
        num_classes=3,
        classes=["a", "b", "c"],
        words=[],
        metrics={},
    )
    rebuilt = checkpoint.build_model(checkpoint.load(tmp_path))
    assert isinstance(rebuilt.act, torch.nn.Tanh) and rebuilt.lrn is None and rebuilt.pool.kernel_size == 2
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    # A checkpoint written before the switches existed rebuilds the paper's layers.
    old = {k: v for k, v in cfg.to_dict().items() if k not in config.SWITCHES or k in ("dropout", "init")}
    assert build_from_config(old, 3).paper_layers


def test_figure1_network_differs_only_in_its_nonlinearity():
    torch.manual_seed(0)
    relu = FourLayerCNN(activation="relu")
    torch.manual_seed(0)
    tanh = FourLayerCNN(activation="tanh")
    assert (
        count_parameters(relu)
        == count_parameters(tanh)
        == 3 * 32 * 25 + 32 + 32 * 32 * 25 + 32 + 32 * 64 * 25 + 64 + 64 * 16 * 10 + 10
    )
    assert calls(relu, 32).count("relu") == 3 and calls(tanh, 32).count("tanh") == 3
    assert "relu" not in calls(tanh, 32)


def test_augment_off_gives_the_same_central_crops_every_epoch(ray_session, tiny_imagenet):
    folder = data.scan_image_folder(str(tiny_imagenet))
    cfg = dataclasses.replace(PRESETS["sample"], resize_size=80, crop_size=67, seed=3)

    def epochs(cfg, n=2):
        dataset = data.train_dataset(folder, cfg, keys=True)
        return [
            {
                k: image
                for batch in dataset.iter_batches(batch_size=24, batch_format="numpy")
                for k, image in zip(batch["key"], batch["image"])
            }
            for _ in range(n)
        ]

    first, second = epochs(dataclasses.replace(cfg, augment="off"))
    assert sorted(first) == sorted(second) and len(first) == 72
    assert all(np.array_equal(first[k], second[k]) for k in first)
    paths = {Path(path).stem: path for path in image_paths(folder, "train")}  # key: train/<file name without .JPEG>
    for key in sorted(first)[:3]:  # and they are the central crops validation takes
        with open(paths[key.rsplit("/", 1)[-1]], "rb") as f:
            centre = stages.center_crops({"jpeg": [f.read()], "key": [key]}, resize_size=80, crop_size=67)["image"][0]
        assert np.array_equal(first[key], centre)
    # With augmentation on, the crops move between epochs.
    first, second = epochs(cfg)
    assert sum(not np.array_equal(first[k], second[k]) for k in first) > 36
