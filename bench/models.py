"""Model registry. Every model takes float images in [0, 1] and normalises them itself.

``Classifier`` wraps a network with the dataset's mean and std as buffers, so the
input stage is the one place where normalisation happens, and a defense can treat
the model as a black box over ``x / 255``. Any number of classes and input channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import Config, param
from bench.registry import Registry

MODELS: Registry[type["ModelSpec"]] = Registry("model", entry_point_group="bdbench.models")


class Classifier(nn.Module):
    """``net((x - mean) / std)`` for ``x`` in [0, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass(frozen=True)
class ModelSpec(Config):
    description: ClassVar[str]
    paper: ClassVar[str] = ""

    def build(self, num_classes: int, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0) -> Classifier:
        """Build with weights initialised from ``seed`` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Classifier(self.net(num_classes, in_channels), mean, std)

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        raise NotImplementedError


# ---------------------------------------------------------------- ResNet-18, CIFAR variant


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class ResNet(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, stages of width w, 2w, 4w, 8w."""

    def __init__(self, block: type, num_classes: int, in_channels: int, width: int, preact: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = None if preact else nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            layers.append(nn.Sequential(block(cin, cout, stride), block(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn_final = nn.BatchNorm2d(cin) if preact else None
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = torch.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_final is not None:
            out = torch.relu(self.bn_final(out))
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@MODELS.register("resnet18")
@dataclass(frozen=True)
class ResNet18(ModelSpec):
    description: ClassVar[str] = "ResNet-18, CIFAR variant (3x3 stem, no max-pool), as in the RNP code"
    paper: ClassVar[str] = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016"

    width: int = param(64, low=1, doc="channels of the first stage: 64 is the paper's, 16 the CPU-scale one")

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        return ResNet(BasicBlock, num_classes, in_channels, self.width, preact=False)


@MODELS.register("preactresnet18")
@dataclass(frozen=True)
class PreActResNet18(ModelSpec):
    description: ClassVar[str] = "Pre-activation ResNet-18, BackdoorBench's default model"
    paper: ClassVar[str] = "He et al., Identity Mappings in Deep Residual Networks, ECCV 2016"

    width: int = param(64, low=1, doc="channels of the first stage (64 in BackdoorBench)")

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        return ResNet(PreActBlock, num_classes, in_channels, self.width, preact=True)


@MODELS.register("smallcnn")
@dataclass(frozen=True)
class SmallCNN(ModelSpec):
    """Three stages of two conv-BN-ReLU layers, each stage ending in a 2x2 max-pool."""

    description: ClassVar[str] = "plain 6-conv CNN (conv-BN-ReLU, widths w, 2w, 4w), the fastest model"

    width: int = param(32, low=1, doc="channels of the first stage")

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(3):
            cout = self.width * 2**i
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        return nn.Sequential(*layers)


@MODELS.register("vgg")
@dataclass(frozen=True)
class VGG16(ModelSpec):
    """VGG-16 for 32x32 inputs (the CIFAR variant): 13 3x3 convs in 5 stages, each stage ending in
    a 2x2 max-pool, then global average pooling and one linear classifier.

    The convolutional part is VGG-16's configuration D (widths w, 2w, 4w, 8w, 8w). The CIFAR
    variant's single Linear head replaces ImageNet VGG's three fully connected layers, as in the
    RNP code's ``vgg19_bn`` and most backdoor benchmarks. ``bn=False`` gives a model without any
    BatchNorm (conv-bias-ReLU), the case every defense must handle or refuse on one line. The
    pools use ``ceil_mode`` so 28x28 inputs (MNIST) keep a 1x1 map after the fifth.
    """

    description: ClassVar[str] = "VGG-16 (CIFAR variant, 13 convs + 1 linear), with or without BatchNorm"
    paper: ClassVar[str] = "Simonyan & Zisserman, Very Deep Convolutional Networks for Large-Scale Image Recognition, ICLR 2015"

    width: int = param(64, low=1, doc="channels of the first stage (64 in the paper)")
    bn: bool = param(True, doc="BatchNorm after every conv (vgg16_bn); false: conv with bias, no normalisation")

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        layers: list[nn.Module] = []
        cin = in_channels
        for stage, convs in enumerate((2, 2, 3, 3, 3)):
            cout = self.width * 2 ** min(stage, 3)
            for _ in range(convs):
                layers.append(nn.Conv2d(cin, cout, 3, 1, 1, bias=not self.bn))
                if self.bn:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.ReLU(inplace=True))
                cin = cout
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
        return nn.Sequential(*layers)
