"""The paper's AlexNet (§3, §4.2, §5) and the torchvision variant, checked against the paper's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from pipeline.models.alexnet import (
    LAYERS,
    PAPER_PARAMETERS,
    AlexNet,
    build_model,
    count_parameters,
    per_tower,
    pool5_size,
)

TORCHVISION_PARAMETERS = 61_100_840


@pytest.fixture(scope="module")
def paper_model() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet().eval()


def small_model(**kwargs) -> AlexNet:
    """A fast stand-in with the paper's shape: width 0.25 (24-64-96-96-64, fc 1024), 67x67 input."""
    return AlexNet(**{"num_classes": 10, "width": 0.25, "image_size": 67, **kwargs})


def paper_lrn(a: np.ndarray, k: float = 2.0, n: int = 5, alpha: float = 1e-4, beta: float = 0.75) -> np.ndarray:
    """§3.3 as printed: b_i = a_i / (k + alpha * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta."""
    N = a.shape[1]
    b = np.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        b[:, i] = a[:, i] / (k + alpha * (a[:, lo : hi + 1] ** 2).sum(axis=1)) ** beta
    return b


def test_layer_shapes_at_227(paper_model):
    outputs: dict[str, list[tuple[int, ...]]] = {}

    def record(name):
        return lambda module, inputs, output: outputs.setdefault(name, []).append(tuple(output.shape[1:]))

    # Measured at each conv's output (ReLU and LRN keep the shape, so this is also the conv block's
    # output before its pool); `pool` is one module called three times: pool1, pool2, pool5.
    handles = [
        getattr(paper_model, name).register_forward_hook(record(name))
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "pool", "fc8")
    ]
    with torch.no_grad():
        paper_model(torch.randn(1, 3, 227, 227))
    for h in handles:
        h.remove()

    assert outputs == {
        "conv1": [(96, 55, 55)],
        "conv2": [(256, 27, 27)],
        "conv3": [(384, 13, 13)],
        "conv4": [(384, 13, 13)],
        "conv5": [(256, 13, 13)],
        "pool": [(96, 27, 27), (256, 13, 13), (256, 6, 6)],
        "fc8": [(1000,)],
    }


def test_parameter_counts(paper_model):
    assert count_parameters(paper_model) == PAPER_PARAMETERS == 60_965_224
    torch.manual_seed(0)
    assert count_parameters(build_model("torchvision", num_classes=1000)) == TORCHVISION_PARAMETERS


def test_groups_follow_the_two_towers(paper_model):
    groups = {name: getattr(paper_model, name).groups for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    assert groups == {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}


def test_conv2_first_tower_ignores_second_towers_maps(paper_model):
    x = torch.randn(1, 96, 27, 27)
    perturbed = x.clone()
    perturbed[:, 48:] += torch.randn(1, 48, 27, 27)
    with torch.no_grad():
        y, y_perturbed = paper_model.conv2(x), paper_model.conv2(perturbed)
    torch.testing.assert_close(y[:, :128], y_perturbed[:, :128], rtol=0, atol=0)
    assert not torch.allclose(y[:, 128:], y_perturbed[:, 128:])


def test_towers_do_not_mix_before_conv3():
    """conv1 -> LRN -> pool -> conv2 -> LRN -> pool stays inside each tower (§3.2), LRN included:
    changing tower 1's conv1 kernels leaves tower 0's pool2 maps untouched."""
    torch.manual_seed(0)
    model = small_model().eval()
    x = torch.randn(2, 3, 67, 67) * 50  # large enough that LRN's denominator is not ~k^beta

    def pool2(m):
        pooled = []
        handle = m.pool.register_forward_hook(lambda module, inputs, output: pooled.append(output))
        with torch.no_grad():
            m(x)
        handle.remove()
        return pooled[1]  # pool1, pool2, pool5

    before = pool2(model)
    with torch.no_grad():
        model.conv1.weight[12:] += 0.05 * torch.randn_like(model.conv1.weight[12:])  # tower 1's 12 of 24 kernels
    after = pool2(model)
    torch.testing.assert_close(before[:, :32], after[:, :32], rtol=0, atol=0)
    assert not torch.allclose(before[:, 32:], after[:, 32:])


def test_init_statistics(paper_model):
    """§5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0."""
    for name in LAYERS:
        layer = getattr(paper_model, name)
        w = layer.weight.detach()
        n = w.numel()  # smallest is conv1: 34,848 weights, so the sample std is within ~0.4% (1 sigma)
        assert w.std().item() == pytest.approx(0.01, rel=0.03), name
        assert abs(w.mean().item()) < 5 * 0.01 / n**0.5, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(layer.bias, torch.full_like(layer.bias, expected_bias)), name


def test_kaiming_init_for_narrow_networks():
    """init="kaiming": He normal (std sqrt(2 / fan_in)), zero biases; fc8 stays N(0, 0.01)."""
    torch.manual_seed(0)
    model = AlexNet(num_classes=10, width=0.25, image_size=112, init="kaiming")
    for name in LAYERS:
        layer = getattr(model, name)
        fan_in = layer.weight[0].numel()
        expected_std = 0.01 if name == "fc8" else (2 / fan_in) ** 0.5
        assert layer.weight.std().item() == pytest.approx(expected_std, rel=0.1), name
        assert torch.count_nonzero(layer.bias) == 0, name
    with pytest.raises(ValueError, match="unknown init 'orthogonal'"):
        AlexNet(init="orthogonal")


def test_lrn_matches_the_papers_formula(paper_model):
    torch.manual_seed(0)
    # 7 channels: both edges (fewer than n neighbours) and a full window in the middle. Values of
    # order 100 make alpha * sum(a^2) ~ 5, so alpha and alpha / n give clearly different results.
    a = torch.randn(2, 7, 4, 4, dtype=torch.float64) * 100
    expected = paper_lrn(a.numpy())
    np.testing.assert_allclose(paper_model.lrn(a).numpy(), expected, rtol=1e-10)
    unscaled = torch.nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)(a).numpy()
    assert not np.allclose(unscaled, expected, rtol=1e-3)

    # In the network each tower normalises its own maps: channel 6 does not see channel 7.
    two_towers = torch.cat([a, -a.flip(1)], dim=1)
    np.testing.assert_allclose(
        per_tower(paper_model.lrn, two_towers).numpy(),
        np.concatenate([expected, paper_lrn(-a.flip(1).numpy())], axis=1),
        rtol=1e-10,
    )


def test_dropout_is_on_fc6_and_fc7_outputs_in_train_mode_only():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(4, 3, 67, 67)
    inputs: dict[str, list[torch.Tensor]] = {}
    for name in ("fc6", "fc7", "fc8"):
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: inputs.setdefault(name, []).append(args[0])
        )

    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
        inputs.clear()
        model.train()
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(inputs["fc6"][0], inputs["fc6"][1], rtol=0, atol=0)  # no dropout before fc6
    for name in ("fc7", "fc8"):  # dropout on fc6's and fc7's outputs: about half of them zeroed
        a, b = inputs[name]
        assert not torch.equal(a, b), name
        assert 0.4 < (a == 0).float().mean().item() < 0.6, name

    no_dropout = small_model(dropout=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(no_dropout(x), no_dropout(x), rtol=0, atol=0)


def test_reduced_width_and_resolution():
    model = AlexNet(num_classes=10, width=0.25, image_size=112)
    channels = [getattr(model, n).out_channels for n in ("conv1", "conv2", "conv3", "conv4", "conv5")]
    assert channels == [24, 64, 96, 96, 64]
    assert model.fc6.in_features == 64 * 2 * 2  # 112 -> conv1 26 -> pool1 12 -> pool2 5 -> pool5 2
    assert model.fc6.out_features == model.fc7.out_features == 1024
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 112, 112)).shape == (2, 10)


@pytest.mark.parametrize("width", [0.01, 0.3, 0.55])
def test_widths_are_even_so_the_towers_split_evenly(width):
    model = small_model(width=width).eval()
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        channels = getattr(model, name).out_channels
        assert channels >= 2 and channels % 2 == 0, (name, channels)
    assert model.fc6.out_features % 2 == 0 and model.fc8.out_features == 10
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 67, 67)).shape == (1, 10)


def test_smallest_image_size():
    assert pool5_size(227) == 6 and pool5_size(67) == 1
    small_model(image_size=67)
    with pytest.raises(ValueError, match=r"image_size 66 .* at least 67"):
        small_model(image_size=66)


def test_build_model():
    alexnet = build_model("alexnet", num_classes=10, width=0.25, image_size=112, dropout=0.3)
    assert isinstance(alexnet, AlexNet)
    assert (alexnet.fc8.out_features, alexnet.fc6.in_features, alexnet.dropout.p) == (10, 256, 0.3)

    tv = build_model("torchvision", num_classes=10, dropout=0.3)
    assert isinstance(tv, torchvision.models.AlexNet)
    assert tv.classifier[0].p == 0.3
    assert "features.0.weight" in tv.state_dict()  # torchvision's keys, so its checkpoints load
    with torch.no_grad():
        assert tv.eval()(torch.randn(2, 3, 224, 224)).shape == (2, 10)

    with pytest.raises(ValueError, match=r"unknown model 'vgg'; expected 'alexnet' or 'torchvision'"):
        build_model("vgg", num_classes=10)
    with pytest.raises(ValueError, match="width 0.5"):
        build_model("torchvision", num_classes=10, width=0.5)
