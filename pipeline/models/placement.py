"""Where the model's parameters live: the paper's two towers on two devices (§3.2), or one device.

    place_model(model, "data", [dev])         the grouped AlexNet on one device; DDP replicates it
    place_model(model, "grouped", [d0, d1])   TwoTowerAlexNet: tower i on device i, the same function
    grouped_state_dict(model)                 the single-device AlexNet state_dict from either form, on
                                              CPU: checkpoints and the registered model do not depend
                                              on how training was placed

§3.2: "The parallelization scheme that we employ essentially puts half of the kernels (or neurons) on
each GPU, with one additional trick: the GPUs communicate only in certain layers." Every layer's
kernels (or neurons) split in two along their output dimension, so tower t holds rows
`weight.chunk(2)[t]` of every grouped weight:

    tower 0 on device 0: conv1[:48] conv2[:128] conv3[:192] conv4[:192] conv5[:128] fc6[:2048] fc7[:2048] fc8[:500]
    tower 1 on device 1: conv1[48:] conv2[128:] conv3[192:] conv4[192:] conv5[128:] fc6[2048:] fc7[2048:] fc8[500:]

conv2, conv4 and conv5 have groups=2 in models/alexnet.py, so output half t of those layers reads input
half t only: each tower's conv reads its own maps. conv3, fc6, fc7 and fc8 read all of their inputs,
so at those four layers each tower copies the other tower's activations to its own device (the
exchange points). LRN normalises within a tower's maps, as model.per_tower does on one device.

Both towers are driven from one Python thread. CUDA kernel launches are asynchronous, so while the
host queues tower 1's work, tower 0's device is already computing: the two devices run side by side
between exchange points, which is the point of the split. For that, each exchange queues all of its
copies before either tower's next layers (exchange()); tests/test_placement.py records the order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.models.alexnet import LAYERS, TOWERS, AlexNet, scaled

PLACEMENTS = ("data", "grouped")
# The full-width sizes (both towers together) that model.scaled() multiplies by `width`.
_SCALED_LAYERS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 4096}


def _half(x: torch.Tensor, tower: int) -> torch.Tensor:
    """Tower `tower`'s rows of a grouped weight or bias. torch.chunk gives tower 0 the extra row when
    the count is odd (7 classes -> 4 + 3)."""
    return x.chunk(TOWERS, dim=0)[tower]


def split_grouped(state: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A grouped AlexNet state_dict -> one state_dict per tower (same keys, each tower's rows)."""
    return [{key: _half(value, t) for key, value in state.items()} for t in range(TOWERS)]


def merge_towers(per_tower: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of split_grouped: tower tensors keyed like 'conv1.weight' (weights, or their .grad)
    -> the grouped layout, on CPU, in AlexNet's key order. Concatenating along rows in tower order is
    the whole conversion, because every layer splits along its output dimension."""
    return {
        f"{layer}.{kind}": torch.cat([tower[f"{layer}.{kind}"].detach().cpu() for tower in per_tower])
        for layer in LAYERS
        for kind in ("weight", "bias")
    }


def alexnet_geometry(model: AlexNet) -> tuple[float, int]:
    """A (width, image_size) for which AlexNet(width=..., image_size=...) has `model`'s layer shapes.

    An AlexNet does not record its constructor arguments, and to_grouped must build one. The width
    is any value inside every layer's rounding interval (scaled(n, w) == channels); the input size is
    the smallest that gives the model's pool5 side (image_size only shapes fc6, so any size with the
    same pool5 side builds the same network: 224, with 5x5 pool5 maps, comes back as 195).
    """
    lo, hi = 0.0, math.inf
    for name, n in _SCALED_LAYERS.items():
        half = getattr(model, name).weight.shape[0] // 2  # scaled() keeps 2 * round(n * width / 2)
        if half > 1:  # round(n * w / 2) == half for w in [(half - 0.5), (half + 0.5)] * 2 / n
            lo = max(lo, (half - 0.5) * 2 / n)
        hi = min(hi, (half + 0.5) * 2 / n)  # half == 1 also covers round() == 0: scaled() floors at 2
    width = (lo + hi) / 2
    if not lo < hi or any(
        scaled(n, width) != getattr(model, name).weight.shape[0] for name, n in _SCALED_LAYERS.items()
    ):
        raise ValueError(
            f"no AlexNet width gives these layer sizes: "
            f"{[getattr(model, name).weight.shape[0] for name in _SCALED_LAYERS]}"
        )

    c5 = model.conv5.out_channels
    side = math.isqrt(model.fc6.in_features // c5)
    if c5 * side * side != model.fc6.in_features:
        raise ValueError(f"fc6 reads {model.fc6.in_features} values, not {c5} square pool5 maps")
    for _ in range(3):  # undo pool5, pool2, pool1 (3x3 stride 2): 6 -> 13 -> 27 -> 55
        side = 2 * side + 1
    image_size = (side - 1) * 4 + 11  # undo conv1 (11x11 stride 4): 55 -> 227
    return width, image_size


class Tower(nn.Module):
    """One GPU's half of every layer (§3.2; one row of Figure 2). Sized from a grouped AlexNet.

    Shape comments are tower 0 at full width and 227 input; tower 1 has the same shapes, except fc8
    with an odd class count.
    """

    def __init__(self, grouped: AlexNet, tower: int):
        super().__init__()
        c1, c2, c3, c4, c5 = (getattr(grouped, f"conv{i}").out_channels for i in range(1, 6))
        hidden = grouped.fc6.out_features
        classes = len(_half(torch.arange(grouped.fc8.out_features), tower))  # 500 of 1000; 4 + 3 of 7

        self.conv1 = nn.Conv2d(3, c1 // 2, kernel_size=11, stride=4)  # 48 kernels on the whole image
        self.conv2 = nn.Conv2d(c1 // 2, c2 // 2, kernel_size=5, padding=2)  # 128 on this tower's 48 maps
        self.conv3 = nn.Conv2d(c2, c3 // 2, kernel_size=3, padding=1)  # 192 on both towers' 256 maps
        self.conv4 = nn.Conv2d(c3 // 2, c4 // 2, kernel_size=3, padding=1)  # 192 on this tower's 192
        self.conv5 = nn.Conv2d(c4 // 2, c5 // 2, kernel_size=3, padding=1)  # 128 on this tower's 192
        self.fc6 = nn.Linear(grouped.fc6.in_features, hidden // 2)  # 2048 on both towers' 9216
        self.fc7 = nn.Linear(hidden, hidden // 2)  # 2048 on both towers' 4096
        self.fc8 = nn.Linear(hidden, classes)  # 500 classes on both's 4096
        # The same LRN (§3.3) and overlapping pooling (§3.4) as the grouped model; dropout (§4.2) per tower.
        self.lrn = nn.LocalResponseNorm(
            size=grouped.lrn.size, alpha=grouped.lrn.alpha, beta=grouped.lrn.beta, k=grouped.lrn.k
        )
        self.pool = nn.MaxPool2d(kernel_size=grouped.pool.kernel_size, stride=grouped.pool.stride)
        self.dropout = nn.Dropout(grouped.dropout.p)

    def conv1_to_pool2(self, image: torch.Tensor) -> torch.Tensor:
        """This tower's maps only: nothing crosses between towers before conv3."""
        x = F.relu(self.conv1(image))  # (B, 48, 55, 55) on this tower
        x = self.pool(self.lrn(x))  # (B, 48, 27, 27)
        x = F.relu(self.conv2(x))  # (B, 128, 27, 27)
        return self.pool(self.lrn(x))  # (B, 128, 13, 13)

    def conv3_to_pool5(self, pool2: torch.Tensor) -> torch.Tensor:
        """`pool2` holds both towers' maps, (B, 256, 13, 13); conv4 and conv5 read this tower's own."""
        x = F.relu(self.conv3(pool2))  # (B, 192, 13, 13)
        x = F.relu(self.conv4(x))  # (B, 192, 13, 13)
        x = F.relu(self.conv5(x))  # (B, 128, 13, 13)
        return torch.flatten(self.pool(x), 1)  # (B, 128 * 6 * 6) = (B, 4608)

    def hidden(self, fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """fc6 or fc7 on both towers' inputs: (B, 9216) or (B, 4096) -> (B, 2048)."""
        return self.dropout(F.relu(fc(x)))


def exchange(parts: Sequence[torch.Tensor], devices: Sequence[torch.device]) -> list[torch.Tensor]:
    """An exchange point: for each tower, both towers' activations in tower order, on that tower's device.

    Every copy is queued before either tower computes on the result. A copy between GPUs is ordered after
    the work already queued on its source device, so copying tower 0's maps to device 1 only after tower
    0's next layers were queued would make tower 1 wait for them at every exchange, and the towers would
    take turns instead of running side by side.
    """
    copies = [[part.to(device, non_blocking=True) for part in parts] for device in devices]
    return [torch.cat(both, dim=1) for both in copies]


def _two_devices(devices: Sequence[torch.device | str]) -> tuple[torch.device, ...]:
    if len(devices) != TOWERS:
        raise ValueError(f"TwoTowerAlexNet needs {TOWERS} devices, one per tower, got {list(devices)!r}")
    return tuple(torch.device(d) for d in devices)


class TwoTowerAlexNet(nn.Module):
    """The paper's AlexNet with tower i on devices[i]; the same function as the grouped AlexNet.

    Built directly, it is initialised as AlexNet(...) is (§5) and then split, so a seed gives the same
    weights in either form. from_grouped / to_grouped / grouped_state_dict convert exactly.

    DDP: wrap it as DistributedDataParallel(model, device_ids=None) — a module spanning several
    devices must not name device_ids; DDP then leaves placement to the module and all-reduces
    each parameter's gradient on the device the parameter lives on. forward returns logits on
    devices[0], so labels and the loss belong there.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        image_size: int = 227,
        dropout: float = 0.5,
        devices: Sequence[torch.device | str] = ("cpu", "cpu"),
    ):
        super().__init__()
        self.width, self.image_size = width, image_size
        self._split(AlexNet(num_classes=num_classes, width=width, image_size=image_size, dropout=dropout), devices)

    @classmethod
    def from_grouped(cls, model: nn.Module, devices: Sequence[torch.device | str] = ("cpu", "cpu")) -> TwoTowerAlexNet:
        """The two-tower form of `model`, weights copied exactly; `model` itself is left as it was."""
        if not isinstance(model, AlexNet):
            raise TypeError(
                f"the grouped placement needs the paper's AlexNet (pipeline.models.alexnet.AlexNet), "
                f"got {type(model).__name__}"
            )
        if not model.paper_layers:  # the towers compute ReLU, LRN and 3/2 pooling, whatever the model had
            raise ValueError(
                "the grouped placement builds the paper's towers (ReLU, LRN, overlapping pooling); "
                "a network with --activation, --lrn or --pool switched trains with --placement data"
            )
        two = cls.__new__(cls)  # skip __init__: its random initialisation would be overwritten at once
        nn.Module.__init__(two)
        two.width, two.image_size = alexnet_geometry(model)
        two._split(model, devices)
        return two

    def _split(self, grouped: AlexNet, devices: Sequence[torch.device | str]) -> None:
        devices = _two_devices(devices)
        if grouped.fc8.out_features < TOWERS:
            raise ValueError(
                f"fc8 is split across {TOWERS} towers, so it needs at least {TOWERS} classes, "
                f"got {grouped.fc8.out_features}"
            )
        with torch.device("meta"):  # shapes only: the weights are copied from `grouped` below
            towers = [Tower(grouped, t) for t in range(TOWERS)]
        self.towers = nn.ModuleList(tower.to_empty(device=device) for tower, device in zip(towers, devices))
        self.load_grouped_state_dict(grouped.state_dict())
        self.train(grouped.training)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Where each tower's parameters are now (read from them, so it stays true after .to())."""
        return tuple(tower.conv1.weight.device for tower in self.towers)

    @property
    def num_classes(self) -> int:
        return sum(tower.fc8.out_features for tower in self.towers)

    def grouped_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device AlexNet state_dict (conv1.weight, ...), on CPU; a copy, not a view."""
        return merge_towers([tower.state_dict() for tower in self.towers])

    def load_grouped_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a grouped AlexNet state_dict; keys and shapes are checked as load_state_dict does."""
        keys = [f"{layer}.{kind}" for layer in LAYERS for kind in ("weight", "bias")]
        if sorted(state) != sorted(keys):
            raise ValueError(f"expected a grouped AlexNet state_dict with keys {keys}, got {sorted(state)}")
        for tower, part in zip(self.towers, split_grouped(state)):
            tower.load_state_dict(part)  # copies onto the tower's device

    def to_grouped(self) -> AlexNet:
        """The single-device AlexNet with these weights, on CPU, in this module's train/eval mode."""
        with torch.device("meta"):  # shapes only: skip AlexNet's random initialisation
            grouped = AlexNet(
                num_classes=self.num_classes,
                width=self.width,
                image_size=self.image_size,
                dropout=cast(Tower, self.towers[0]).dropout.p,
            )
        # assign=True makes the fresh CPU tensors of grouped_state_dict() the parameters, with no second copy.
        grouped.load_state_dict(self.grouped_state_dict(), assign=True)
        return grouped.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        towers, devices = self.towers, self.devices
        # conv1 reads the whole image on each tower; conv2 and both LRNs stay within a tower.
        images = [x.to(d, non_blocking=True) for d in devices]
        pool2 = [tower.conv1_to_pool2(image) for tower, image in zip(towers, images)]  # (B, 128, 13, 13) each
        # Exchange 1: conv3 reads both towers' pool2 maps (tower 0's channels first, as in the grouped model).
        pool5 = [tower.conv3_to_pool5(both) for tower, both in zip(towers, exchange(pool2, devices))]  # (B, 4608)
        # Exchange 2: fc6 reads the flattened pool5 of both towers; flatten(cat) == cat(flatten) per tower.
        fc6 = [tower.hidden(tower.fc6, both) for tower, both in zip(towers, exchange(pool5, devices))]  # (B, 2048)
        # Exchanges 3 and 4: fc7 and fc8 read both towers' previous layer.
        fc7 = [tower.hidden(tower.fc7, both) for tower, both in zip(towers, exchange(fc6, devices))]  # (B, 2048)
        logits = [tower.fc8(both) for tower, both in zip(towers, exchange(fc7, devices))]  # (B, 500)
        return exchange(logits, devices[:1])[0]  # (B, 1000) on device 0


def place_model(model: nn.Module, placement: str, devices: Sequence[torch.device | str]) -> nn.Module:
    """`model` placed for training. "data": the whole model on devices[0] (DDP across workers supplies
    the parallelism). "grouped": TwoTowerAlexNet with tower i on devices[i]; given one device, both
    towers go on it (the same code path, e.g. on CPU or a one-GPU worker)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {', '.join(PLACEMENTS)}")
    if not devices:
        raise ValueError("place_model needs at least one device, got none")
    devices = [torch.device(d) for d in devices]
    if placement == "data":
        return model.to(devices[0])
    towers = devices[:TOWERS] if len(devices) >= TOWERS else devices[:1] * TOWERS
    return TwoTowerAlexNet.from_grouped(model, towers)


def grouped_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state_dict of a placed model (DDP-wrapped or not), copied to CPU: the same
    keys and values whichever placement trained it, and a snapshot later steps do not change."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, TwoTowerAlexNet):
        return model.grouped_state_dict()
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def load_grouped_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """The inverse of grouped_state_dict: single-device weights into a placed model of either form."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, TwoTowerAlexNet):
        model.load_grouped_state_dict(state)
    else:
        model.load_state_dict(state)
