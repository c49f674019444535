"""§3.2 made real: the two-tower AlexNet computes the grouped AlexNet's function, gradients and SGD
steps from the same weights, converts to and from it exactly, and trains under DDP."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.alexnet import PAPER_PARAMETERS, AlexNet, count_parameters, scaled
from pipeline.models.placement import (
    PLACEMENTS,
    TwoTowerAlexNet,
    alexnet_geometry,
    grouped_state_dict,
    merge_towers,
    place_model,
)

TOLERANCE = 1e-5  # float32: a different summation order alone stays near 1e-7


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale (per element would blow up near zero)."""
    return ((a.detach().cpu() - b.detach().cpu()).abs().max() / b.detach().cpu().abs().max()).item()


def small(seed: int = 0, **kwargs) -> AlexNet:
    """Width 0.25 (24-64-96-96-64, fc 1024), 7 classes so fc8 splits 4 + 3. Kaiming init keeps every
    layer's activations and gradients well away from zero, so relative differences mean something."""
    torch.manual_seed(seed)
    return AlexNet(**{"num_classes": 7, "width": 0.25, "image_size": 99, "init": "kaiming", **kwargs})


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tower_grads(two: TwoTowerAlexNet) -> dict[str, torch.Tensor]:
    """The two-tower gradients in the grouped layout: the conversion grouped_state_dict uses, on .grad."""
    return merge_towers([{name: p.grad for name, p in tower.named_parameters()} for tower in two.towers])


def sgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1) -> None:
    # The paper's optimiser (§5); a large lr so that the update, not the old weights, dominates.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_full_width_outputs_match_grouped_model():
    torch.manual_seed(0)
    grouped = AlexNet().eval()
    two = TwoTowerAlexNet.from_grouped(grouped)
    x = images(1, 227)
    with torch.no_grad():
        want, got = grouped(x), two(x)
    assert got.shape == (1, 1000)
    assert rel_diff(got, want) < TOLERANCE
    assert count_parameters(two) == count_parameters(grouped) == PAPER_PARAMETERS


def test_parameter_count_is_the_papers():
    assert count_parameters(TwoTowerAlexNet()) == PAPER_PARAMETERS


def test_small_width_odd_class_count_outputs_match():
    grouped = small().eval()
    two = TwoTowerAlexNet.from_grouped(grouped)
    assert [tower.fc8.out_features for tower in two.towers] == [4, 3]  # torch.chunk's split of 7
    x = images(3, 99)
    with torch.no_grad():
        want, got = grouped(x), two(x)
    assert got.shape == (3, 7)
    assert rel_diff(got, want) < TOLERANCE


def test_gradients_match_for_every_parameter():
    grouped = small(dropout=0.0).train()
    two = TwoTowerAlexNet.from_grouped(grouped)
    assert two.training
    x, y = images(4, 99), torch.tensor([0, 3, 6, 2])
    F.cross_entropy(grouped(x), y).backward()
    F.cross_entropy(two(x), y).backward()

    got = tower_grads(two)
    assert list(got) == [name for name, _ in grouped.named_parameters()]
    for name, p in grouped.named_parameters():
        assert p.grad.abs().max() > 0, name  # a zero gradient would make the comparison vacuous
        assert rel_diff(got[name], p.grad) < TOLERANCE, name


def test_conversions_round_trip_exactly():
    grouped = small()
    original = {k: v.clone() for k, v in grouped.state_dict().items()}
    two = TwoTowerAlexNet.from_grouped(grouped)

    for state in (two.grouped_state_dict(), grouped_state_dict(two), two.to_grouped().state_dict()):
        assert list(state) == list(original)
        for key in original:
            assert torch.equal(state[key], original[key]), key
            assert state[key].device.type == "cpu"
    back = two.to_grouped()
    assert type(back) is AlexNet and back.training == two.training

    # Copies, not views: training the towers leaves the source model and earlier snapshots alone.
    snapshot = two.grouped_state_dict()
    with torch.no_grad():
        two.towers[0].conv1.weight.add_(1.0)
    assert torch.equal(grouped.conv1.weight, original["conv1.weight"])
    assert torch.equal(snapshot["conv1.weight"], original["conv1.weight"])


def test_built_directly_it_is_initialised_as_the_grouped_model():
    torch.manual_seed(5)
    two = TwoTowerAlexNet(num_classes=7, width=0.25, image_size=99)
    torch.manual_seed(5)
    grouped = AlexNet(num_classes=7, width=0.25, image_size=99)
    for key, value in grouped.state_dict().items():
        assert torch.equal(two.grouped_state_dict()[key], value), key


def test_load_grouped_state_dict_changes_outputs_accordingly():
    grouped = small().eval()
    two = TwoTowerAlexNet.from_grouped(grouped).eval()
    x = images(2, 99)
    with torch.no_grad():
        before = two(x)

    state = grouped.state_dict()
    state = {**state, "conv3.weight": state["conv3.weight"] * 1.5, "fc8.bias": state["fc8.bias"] + 1.0}
    grouped.load_state_dict(state)
    two.load_grouped_state_dict(state)
    with torch.no_grad():
        want, got = grouped(x), two(x)
    assert rel_diff(got, before) > 1e-2
    assert rel_diff(got, want) < TOLERANCE

    with pytest.raises(ValueError, match="fc8.bias"):
        two.load_grouped_state_dict({k: v for k, v in state.items() if k != "fc8.bias"})


def test_sgd_steps_give_the_same_weights():
    grouped = small(dropout=0.0)
    two = TwoTowerAlexNet.from_grouped(grouped)
    start = {k: v.clone() for k, v in grouped.state_dict().items()}
    x, y = images(4, 99), torch.tensor([1, 4, 6, 0])
    sgd_step(grouped, x, y, steps=2)  # two steps, so momentum enters too
    sgd_step(two, x, y, steps=2)

    got = grouped_state_dict(two)
    for key, want in grouped.state_dict().items():
        assert rel_diff(got[key], want) < TOLERANCE, key
        # The update itself, so a small error in it is not hidden under the unchanged weights.
        assert rel_diff(got[key] - start[key], want - start[key]) < 1e-4, key


def test_towers_are_separate_until_conv3():
    grouped = small().eval()
    two = TwoTowerAlexNet.from_grouped(grouped).eval()
    outputs: dict[str, list[torch.Tensor]] = {}

    def record(name):
        return lambda module, inputs, output: outputs.setdefault(name, []).append(output.clone())

    watched = {
        "conv2 tower 0": two.towers[0].conv2,
        "conv2 tower 1": two.towers[1].conv2,
        "conv3 tower 0": two.towers[0].conv3,
    }
    handles = [module.register_forward_hook(record(name)) for name, module in watched.items()]
    x = images(2, 99)
    with torch.no_grad():
        two(x)
        two.towers[1].conv2.weight.mul_(-1.0)
        two(x)
    for h in handles:
        h.remove()

    assert torch.equal(*outputs["conv2 tower 0"])  # groups=2: tower 0 never reads tower 1's conv2 kernels
    assert not torch.equal(*outputs["conv2 tower 1"])
    assert not torch.equal(*outputs["conv3 tower 0"])  # conv3 is where tower 1's maps reach tower 0


def test_ddp_trains_the_two_towers_like_the_unwrapped_model(tmp_path):
    grouped = small(dropout=0.0)
    plain = TwoTowerAlexNet.from_grouped(grouped)
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(TwoTowerAlexNet.from_grouped(grouped), device_ids=None)
        x, y = images(4, 99), torch.tensor([2, 5, 6, 1])
        sgd_step(plain, x, y)
        sgd_step(wrapped, x, y)
        got, want = grouped_state_dict(wrapped), grouped_state_dict(plain)
    finally:
        dist.destroy_process_group()
    for key, before in grouped.state_dict().items():
        assert not torch.equal(want[key], before), key  # the step happened
        assert rel_diff(got[key], want[key]) < 1e-6, key


def test_place_model():
    data = place_model(small(), "data", ["cpu"])
    assert type(data) is AlexNet and data.conv1.weight.device == torch.device("cpu")

    grouped = place_model(small(), "grouped", [torch.device("cpu")])
    assert isinstance(grouped, TwoTowerAlexNet)
    assert grouped.devices == (torch.device("cpu"), torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in grouped.parameters())

    with pytest.raises(ValueError, match=r"'pipes'.*data, grouped"):
        place_model(small(), "pipes", ["cpu"])
    with pytest.raises(ValueError, match="devices"):
        TwoTowerAlexNet.from_grouped(small(), devices=["cpu"])
    assert PLACEMENTS == ("data", "grouped")


def test_grouped_state_dict_of_a_plain_model_is_a_cpu_snapshot():
    model = small()
    state = grouped_state_dict(model)
    assert list(state) == list(model.state_dict())
    with torch.no_grad():
        model.fc8.bias.add_(1.0)
    assert not torch.equal(state["fc8.bias"], model.fc8.bias)


@pytest.mark.parametrize("width", [0.1, 0.25, 0.3, 0.5, 0.77, 1.0, 1.5])
@pytest.mark.parametrize("image_size", [67, 112, 224, 227])
def test_geometry_rebuilds_the_same_shapes(width, image_size):
    with torch.device("meta"):  # shapes only, no memory or init time
        model = AlexNet(width=width, image_size=image_size)
        found_width, found_size = alexnet_geometry(model)
        rebuilt = AlexNet(width=found_width, image_size=found_size)
    assert scaled(4096, found_width) == model.fc6.out_features
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_each_exchange_queues_its_copies_before_either_tower_computes(monkeypatch):
    """On GPUs a copy between devices is ordered after the work already queued on its source: a copy
    issued after tower 0's next layers would make tower 1 wait for them. Recorded here on the CPU: no
    copy may come between the two towers' computing of the same layer."""
    two = TwoTowerAlexNet.from_grouped(small())
    events: list[str] = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        events.append("copy")
        return to(self, *args, **kwargs)

    for t, tower in enumerate(two.towers):
        for layer in ("conv1", "conv3", "fc6", "fc7", "fc8"):
            getattr(tower, layer).register_forward_pre_hook(
                lambda module, args, name=f"{layer} {t}": events.append(name)
            )
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    two(images(2, 99))
    monkeypatch.undo()
    for layer in ("conv1", "conv3", "fc6", "fc7", "fc8"):
        first, second = events.index(f"{layer} 0"), events.index(f"{layer} 1")
        assert "copy" not in events[first:second], (layer, events)
        assert "copy" in events[:first], (layer, events)  # the exchange itself happened, before it


def test_grouped_placement_keeps_channels_last():
    from pipeline.config import PRESETS
    from pipeline.train.worker import place_and_wrap

    cfg = PRESETS["sample"]
    for placement in PLACEMENTS:
        placed = place_and_wrap(
            small(), dataclasses.replace(cfg, placement=placement), [torch.device("cpu")], channels_last=True
        )
        convs = [m for m in placed.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == (10 if placement == "grouped" else 5)
        assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs), placement


def test_load_grouped_state_dict_fills_either_form_of_the_model():
    from pipeline.models.placement import load_grouped_state_dict

    source = small()
    state = grouped_state_dict(source)
    for target in (small(), TwoTowerAlexNet.from_grouped(small())):
        load_grouped_state_dict(target, state)
        assert all(torch.equal(state[k], v) for k, v in grouped_state_dict(target).items())
