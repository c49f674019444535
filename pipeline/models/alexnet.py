"""AlexNet as Krizhevsky, Sutskever and Hinton (NIPS 2012) describe it, and torchvision's variant.

    AlexNet()                              the paper's network (§3.5, Figure 2): LRN, overlapping
                                           pooling, two towers as groups=2; 60,965,224 parameters
    AlexNet(width=0.25, image_size=112)    the same shape, narrower and at a lower resolution
    AlexNet(activation="tanh", lrn=False,  one of the paper's design choices switched off, to test its
            pool="non-overlapping", ...)   claim (the ablation switches; jobs/ablate.py)
    FourLayerCNN(activation)               Figure 1's small network: ReLU against tanh
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
models/placement.py puts the two towers on two devices.

Ablation switches, each changing exactly what it names (the defaults are the paper):
    activation  relu | tanh                 every nonlinearity, conv1-conv5, fc6, fc7 (§3.1)
    lrn         True | False                the normalisation after conv1 and conv2 (§3.3); off = none
    pool        overlapping | non-overlapping  3x3 windows every 2 px | 2x2 every 2 px (§3.4). At 227 both give
                                            55 -> 27 -> 13 -> 6 (the paper compares at "equivalent
                                            dimensions"), so the parameter count is the same; at the sample's
                                            112 px overlapping gives 26 -> 12 -> 5 -> 2, non-overlapping
                                            26 -> 13 -> 6 -> 3 (fc6 reads 9 values per map instead of 4)
    init        paper | kaiming | xavier    reset_parameters; init_bias is the paper's bias of 1 (§5)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

PAPER_PARAMETERS = 60_965_224  # grouped network, 1000 classes, 227 input (Caffe's bvlc_alexnet agrees)
TOWERS = 2  # §3.2: one tower per GPU
MIN_IMAGE_SIZE = 67  # 67 -> conv1 15 -> pool1 7 -> pool2 3 -> pool5 1; at 66 pool2 leaves 2x2, too small for pool5

# §5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as well
# as in the fully-connected hidden layers, with the constant 1 ... [this] accelerates the early stages
# of learning by providing the ReLUs with positive inputs." All other biases are 0.
BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")
INITS = ("paper", "kaiming", "xavier")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# §3.1: ReLU, f(x) = max(0, x), against the saturating tanh it replaced.
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
# §3.4: max pooling (window, stride). Overlapping: z = 3 > s = 2 (the paper); non-overlapping: z = s = 2.
POOLS = {"overlapping": (3, 2), "non-overlapping": (2, 2)}


def scaled(channels: int, width: float) -> int:
    """`channels * width`, rounded to an even number >= 2 so the two towers split it evenly."""
    return max(2, 2 * round(channels * width / 2))


def map_sides(image_size: int, pool: str = "overlapping") -> list[int]:
    """Sides of the maps after conv1, pool1, pool2 and pool5 for a square input; only conv1 and the
    three pools shrink them (conv2-5 are padded to keep the size). 227: [55, 27, 13, 6] either pool."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {', '.join(POOLS)}")
    window, stride = POOLS[pool]
    sides = [(image_size - 11) // 4 + 1]  # conv1, 11x11 stride 4: 227 -> 55
    for _ in range(3):  # pool1 55 -> 27, pool2 27 -> 13, pool5 13 -> 6
        sides.append((sides[-1] - window) // stride + 1 if sides[-1] >= window else 0)
    return sides


def pool5_size(image_size: int, pool: str = "overlapping") -> int:
    """Side of the maps leaving pool5 for a square input."""
    return map_sides(image_size, pool)[-1]


def per_tower(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply `layer` to each tower's half of the channels on its own (§3.2: a GPU normalises only the
    maps it holds), so nothing crosses between the towers before conv3."""
    return torch.cat([layer(half) for half in x.chunk(TOWERS, dim=1)], dim=1)


class AlexNet(nn.Module):
    """The paper's network (§3.5). Shape comments are at full width and 227x227 input."""

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        image_size: int = 227,
        dropout: float = 0.5,
        init: str = "paper",
        *,
        activation: str = "relu",
        lrn: bool = True,
        pool: str = "overlapping",
        init_bias: float = 1.0,
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width!r}")
        side = pool5_size(image_size, pool)
        if image_size < MIN_IMAGE_SIZE or side < 1:
            raise ValueError(
                f"image_size {image_size} is too small: AlexNet needs at least {MIN_IMAGE_SIZE} "
                f"(pool5 needs {POOLS[pool][0]}x{POOLS[pool][0]} maps to pool)"
            )
        self.init_bias = init_bias
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
        # lrn=False (the ablation) leaves no normalisation at all.
        self.lrn = nn.LocalResponseNorm(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0) if lrn else None
        # §3.4 overlapping pooling: 3x3 windows every 2 pixels (z = 3 > s = 2), -0.4% top-1 error
        window, stride = POOLS[pool]
        self.pool = nn.MaxPool2d(kernel_size=window, stride=stride)
        # §4.2: dropout 0.5 on the outputs of the first two fully-connected layers
        self.dropout = nn.Dropout(dropout)
        # §3.1: one nonlinearity for every layer but fc8 (it has no parameters: one module serves all seven)
        self.act = ACTIVATIONS[activation]()

        self.reset_parameters(init)

    def reset_parameters(self, init: str = "paper") -> None:
        """paper (§5): every weight from N(0, 0.01); biases 1 (init_bias) in conv2, conv4, conv5, fc6, fc7,
        0 elsewhere. Caffe's reference model changed that 1 to 0.1 (with 1 its loss stayed flat at first).

        kaiming (He et al. 2015): weights N(0, 2 / fan_in), biases 0; fc8 keeps N(0, 0.01) so the first
        logits are near uniform. The paper's fixed 0.01 shrinks the signal at every layer of a narrow
        network (fan-in 4x smaller at width 0.25), which then sits at chance for many hundreds of steps;
        the sample preset uses kaiming so that a few minutes on a laptop show learning. Kaiming keeps the
        ReLU gain (sqrt 2) under --activation tanh too, so that switching the activation changes nothing else.

        xavier (Glorot & Bengio 2010): weights N(0, 2 / (fan_in + fan_out)) in every layer, biases 0.
        """
        for name in LAYERS:
            layer = getattr(self, name)
            if init == "xavier":
                nn.init.xavier_normal_(layer.weight)
                nn.init.zeros_(layer.bias)
            elif init == "kaiming" and name != "fc8":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            else:
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.constant_(layer.bias, self.init_bias if init == "paper" and name in BIAS_ONE else 0.0)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """§3.3 LRN within each tower's maps; the identity with lrn=False."""
        return per_tower(self.lrn, x) if self.lrn is not None else x

    @property
    def paper_layers(self) -> bool:
        """ReLU, LRN and overlapping pooling, as the paper's towers (placement.py) compute them."""
        return isinstance(self.act, nn.ReLU) and self.lrn is not None and self.pool.kernel_size == 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))  # (B, 96, 55, 55)      act: ReLU (§3.1)
        x = self.pool(self.normalise(x))  # (B, 96, 27, 27)      LRN (§3.3), overlapping pool (§3.4)
        x = self.act(self.conv2(x))  # (B, 256, 27, 27)
        x = self.pool(self.normalise(x))  # (B, 256, 13, 13)
        x = self.act(self.conv3(x))  # (B, 384, 13, 13) reads all 256 maps, both towers
        x = self.act(self.conv4(x))  # (B, 384, 13, 13)
        x = self.act(self.conv5(x))  # (B, 256, 13, 13)
        x = self.pool(x)  # (B, 256, 6, 6)
        x = torch.flatten(x, 1)  # (B, 9216)
        x = self.dropout(self.act(self.fc6(x)))  # (B, 4096)
        x = self.dropout(self.act(self.fc7(x)))  # (B, 4096)
        return self.fc8(x)  # (B, 1000) logits; the softmax lives in the loss


class FourLayerCNN(nn.Module):
    """Figure 1's network (§3.1): "a four-layer convolutional neural network" on CIFAR-10 that reaches 25%
    training error six times faster with ReLUs than with tanh units. The paper does not spell it out; this
    is cuda-convnet's CIFAR-10 layout of the time: three 5x5 convolutions of 32, 32 and 64 maps, each
    followed by 3/2 max pooling, and a fully-connected classifier, with no normalisation or regularisation
    ("no regularization of any kind was employed"). Input 32x32."""

    def __init__(self, num_classes: int = 10, activation: str = "relu", image_size: int = 32):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, kernel_size=5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)  # 32 -> 16 -> 8 -> 4
        side = image_size
        for _ in range(3):
            side = -(-(side - 3) // 2) + 1
        self.fc = nn.Linear(64 * side * side, num_classes)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))  # (B, 32, 16, 16)
        x = self.pool(self.act(self.conv2(x)))  # (B, 32, 8, 8)
        x = self.pool(self.act(self.conv3(x)))  # (B, 64, 4, 4)
        return self.fc(torch.flatten(x, 1))  # (B, 10) logits


def torchvision_alexnet(num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet (from "One weird trick", Krizhevsky 2014): 64-192-384-256-256, no LRN, no
    groups, dropout before fc6 and fc7, torchvision's own init; 61,100,840 parameters. Untrained."""
    return torchvision.models.AlexNet(num_classes=num_classes, dropout=dropout)


def build_model(
    name: str,
    *,
    num_classes: int,
    width: float = 1.0,
    image_size: int = 227,
    dropout: float = 0.5,
    init: str = "paper",
    activation: str = "relu",
    lrn: bool = True,
    pool: str = "overlapping",
    init_bias: float = 1.0,
) -> nn.Module:
    """The model a config names. The torchvision variant takes any input size from 63 up (an adaptive
    pool gives its fc6 6x6 maps), so `image_size` only shapes the paper's network; the ablation switches
    are the paper's network's alone."""
    if name == "alexnet":
        return AlexNet(
            num_classes=num_classes,
            width=width,
            image_size=image_size,
            dropout=dropout,
            init=init,
            activation=activation,
            lrn=lrn,
            pool=pool,
            init_bias=init_bias,
        )
    if name == "torchvision":
        if width != 1.0:
            raise ValueError(f"width {width!r} is not supported by the torchvision model; it needs width 1.0")
        return torchvision_alexnet(num_classes=num_classes, dropout=dropout)
    raise ValueError(f"unknown model {name!r}; expected 'alexnet' or 'torchvision'")


def build_from_config(config: dict, num_classes: int) -> nn.Module:
    """The network a run's config (Config.to_dict(), as checkpoints store it) describes: what training builds
    and what every load path rebuilds. A config written before a switch existed gets the paper's choice."""
    return build_model(
        config["model"],
        num_classes=num_classes,
        width=config["width"],
        image_size=config["crop_size"],
        dropout=config["dropout"],
        init=config["init"],
        activation=config.get("activation", "relu"),
        lrn=config.get("lrn", "on") == "on",
        pool=config.get("pool", "overlapping"),
        init_bias=config.get("init_bias", 1.0),
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
