"""AlexNet as Krizhevsky, Sutskever and Hinton (NIPS 2012) describe it, and torchvision's variant.

    AlexNet()                              the paper's network (§3.5, Figure 2): LRN, overlapping
                                           pooling, two towers as groups=2; 60,965,224 parameters
    AlexNet(width=0.25, image_size=112)    the same shape, narrower and at a lower resolution
    torchvision_alexnet()                  64-192-384-256-256, no LRN, no groups; its state_dict
                                           keys are torchvision's, so published checkpoints load
    build_model(cfg.model, ...)            either one by name

Input size. The paper says 224x224, but conv1 (11x11, stride 4, no padding) only lands on its
55x55 output exactly from 227: (227 - 11) / 4 + 1 = 55, whereas 224 gives 54.25. Like Caffe's
reference model we take 227 crops (the paper preset crops 227); `image_size` sets the size the
classifier is built for.

Two towers (§3.2). The paper split every layer's kernels across two GPUs, which communicate only
at conv3 and the fully-connected layers. On one device that is the same function as groups=2 in
conv2, conv4 and conv5, plus response normalisation done within each tower's maps (`per_tower`).
pipeline/placement.py puts the two towers on two devices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

PAPER_PARAMETERS = 60_965_224  # grouped network, 1000 classes, 227 input (Caffe's bvlc_alexnet agrees)
TOWERS = 2  # §3.2: one tower per GPU
MIN_IMAGE_SIZE = 67  # 67 -> conv1 15 -> pool1 7 -> pool2 3 -> pool5 1; at 66 pool2 leaves 2x2, too small for pool5

# §5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as well
# as in the fully-connected hidden layers, with the constant 1 ... [this] accelerates the early stages
# of learning by providing the ReLUs with positive inputs." All other biases are 0.
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
INITS = ("paper", "kaiming")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def scaled(channels: int, width: float) -> int:
    """`channels * width`, rounded to an even number >= 2 so the two towers split it evenly."""
    return max(2, 2 * round(channels * width / 2))


def pool5_size(image_size: int) -> int:
    """Side of the maps leaving pool5 for a square input; only conv1 and the three pools shrink them."""
    side = (image_size - 11) // 4 + 1  # conv1, 11x11 stride 4: 227 -> 55
    for _ in range(3):  # pool1 55 -> 27, pool2 27 -> 13, pool5 13 -> 6 (conv2-5 are padded to keep size)
        side = (side - 3) // 2 + 1
    return side


def per_tower(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply `layer` to each tower's half of the channels on its own (§3.2: a GPU normalises only the
    maps it holds), so nothing crosses between the towers before conv3."""
    return torch.cat([layer(half) for half in x.chunk(TOWERS, dim=1)], dim=1)


class AlexNet(nn.Module):
    """The paper's network (§3.5). Shape comments are at full width and 227x227 input."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, image_size: int = 227, dropout: float = 0.5,
                 init: str = "paper"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width!r}")
        side = pool5_size(image_size)
        if image_size < MIN_IMAGE_SIZE or side < 1:
            raise ValueError(f"image_size {image_size} is too small: AlexNet needs at least {MIN_IMAGE_SIZE} "
                             f"(pool5 needs 3x3 maps to pool)")
        c1, c2, c3, c4, c5, hidden = (scaled(n, width) for n in (96, 256, 384, 384, 256, 4096))

        self.conv1 = nn.Conv2d(3, c1, kernel_size=11, stride=4)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=TOWERS)  # each tower sees its own 48 maps
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, padding=1)  # groups=1: the towers exchange here
        self.conv4 = nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=TOWERS)
        self.conv5 = nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=TOWERS)
        self.fc6 = nn.Linear(c5 * side * side, hidden)  # 256 * 6 * 6 = 9216 inputs at 227
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)

        # §3.3 LRN: b = a / (k + alpha * sum_j a_j^2)^beta over n = 5 adjacent maps, k = 2,
        # alpha = 1e-4, beta = 0.75. torch's LocalResponseNorm computes alpha / n * sum, so it is given
        # alpha * n to reproduce the paper's formula. (Caffe also divides by n: its alpha = 1e-4 is 2e-5 here.)
        self.lrn = nn.LocalResponseNorm(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0)
        # §3.4 overlapping pooling: 3x3 windows every 2 pixels (z = 3 > s = 2), -0.4% top-1 error
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        # §4.2: dropout 0.5 on the outputs of the first two fully-connected layers
        self.dropout = nn.Dropout(dropout)

        self.reset_parameters(init)

    def reset_parameters(self, init: str = "paper") -> None:
        """paper (§5): every weight from N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, 0 elsewhere.

        kaiming (He et al. 2015): weights N(0, 2 / fan_in), biases 0; fc8 keeps N(0, 0.01) so the first
        logits are near uniform. The paper's fixed 0.01 shrinks the signal at every layer of a narrow
        network (fan-in 4x smaller at width 0.25), which then sits at chance for many hundreds of steps;
        the sample preset uses kaiming so that a few minutes on a laptop show learning.
        """
        for name in LAYERS:
            layer = getattr(self, name)
            if init == "kaiming" and name != "fc8":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            else:
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.constant_(layer.bias, 1.0 if init == "paper" and name in BIAS_ONE else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))              # (B, 96, 55, 55)
        x = self.pool(per_tower(self.lrn, x))  # (B, 96, 27, 27)
        x = F.relu(self.conv2(x))              # (B, 256, 27, 27)
        x = self.pool(per_tower(self.lrn, x))  # (B, 256, 13, 13)
        x = F.relu(self.conv3(x))              # (B, 384, 13, 13) reads all 256 maps, both towers
        x = F.relu(self.conv4(x))              # (B, 384, 13, 13)
        x = F.relu(self.conv5(x))              # (B, 256, 13, 13)
        x = self.pool(x)                       # (B, 256, 6, 6)
        x = torch.flatten(x, 1)                # (B, 9216)
        x = self.dropout(F.relu(self.fc6(x)))  # (B, 4096)
        x = self.dropout(F.relu(self.fc7(x)))  # (B, 4096)
        return self.fc8(x)                     # (B, 1000) logits; the softmax lives in the loss


def torchvision_alexnet(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet (from "One weird trick", Krizhevsky 2014): 64-192-384-256-256, no LRN, no
    groups, dropout before fc6 and fc7, torchvision's own init; 61,100,840 parameters. Untrained."""
    return torchvision.models.AlexNet(num_classes=num_classes, dropout=dropout)


def build_model(name: str, *, num_classes: int, width: float = 1.0, image_size: int = 227,
                dropout: float = 0.5, init: str = "paper") -> nn.Module:
    """The model a config names. The torchvision variant takes any input size from 63 up (an adaptive
    pool gives its fc6 6x6 maps), so `image_size` only shapes the paper's network."""
    if name == "alexnet":
        return AlexNet(num_classes=num_classes, width=width, image_size=image_size, dropout=dropout, init=init)
    if name == "torchvision":
        if width != 1.0:
            raise ValueError(f"width {width!r} is not supported by the torchvision model; it needs width 1.0")
        return torchvision_alexnet(num_classes=num_classes, dropout=dropout)
    raise ValueError(f"unknown model {name!r}; expected 'alexnet' or 'torchvision'")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
