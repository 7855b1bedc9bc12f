"""Model registry. Every model takes float images in [0, 1] and normalises them itself.

``Classifier`` wraps a network with the dataset's mean and std as buffers, so the
input stage is the one place where normalisation happens, and a defense can treat
the model as a black box over ``x / 255``. Any number of classes and input channels.

Beside our own models, two families name architectures of other libraries (``MODELS.get``
builds their spec on first use, see ``bench.registry``), wrapped in ``Classifier`` like ours:

- ``torchvision:NAME``: any classification builder of ``torchvision.models``
  (``list_models(module=torchvision.models)``), called with ``weights=None`` and the dataset's
  ``num_classes``. A dataset with other than 3 channels (MNIST: 1) gets the model's first
  ``Conv2d`` taking 3 channels replaced by the same convolution taking C (see
  :func:`adapt_in_channels`): with no pretrained weights this is the architecture built for C
  channels, as our own models are. GoogLeNet and Inception-v3 are built without their auxiliary
  heads (their training-mode output is then the logits, as every model's here).
- ``timm:NAME`` (``pip install 'bdbench[timm]'``): ``timm.create_model(NAME, pretrained=False,
  num_classes=K, in_chans=C)``; timm adapts the stem to C channels itself.

ImageNet architectures are built as they are; small images (32x32) go through them unchanged,
so some cannot take them (AlexNet's pools shrink a 32x32 map to nothing, Inception-v3 needs
75x75). :meth:`ModelSpec.check` runs one dry forward pass of two images of the dataset's size
on the model the grid builds at plan time, so such a model fails on one line before any
training, with the library's reason.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import Config, param
from bench.registry import BenchError, Registry

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

    @torch.no_grad()
    def check(self, model: nn.Module, num_classes: int, channels: int, size: int, dataset: str = "") -> None:
        """Raise a one-line ``BenchError`` if ``model`` (built by :meth:`build`) cannot classify the dataset's images.

        One training-mode forward pass of two grey ``channels x size x size`` images, without gradient and
        with the global RNG left as it was (dropout draws from it); the output must be logits ``[2, num_classes]``.
        Training mode, because that is where a 1x1 map meets BatchNorm; its running statistics move, so the
        grid calls this on a throwaway model (``bench.run.plan``), before any training. It also refuses a
        strided 1x1 convolution with 2-7 input channels (a ResNet below width 8): torch 2.14.1's CPU backward
        of it in channels_last, the trainer's format, aborted the process with a double free (2-core AVX2
        EPYC, 2026-12-05; 1 and 8-12 channels ran).
        """
        where = f"model {getattr(self, 'name', type(self).__name__)} cannot take {dataset + ' ' if dataset else ''}" \
                f"images of {channels}x{size}x{size}"
        was_training = model.training
        model.train()
        try:
            with torch.random.fork_rng(devices=[]):
                out = model(torch.full((2, channels, size, size), 0.5, device=next(model.buffers()).device))
        except Exception as exc:  # whatever the library raises, on one line
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise BenchError(f"{where}: {type(exc).__name__}: {first}") from None
        finally:
            model.train(was_training)
        if not torch.is_tensor(out) or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise BenchError(f"{where}: it returns {got}, not logits of shape (2, {num_classes})")
        for name, m in model.named_modules():
            if (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) != (1, 1)
                    and 1 < m.in_channels < 8):
                raise BenchError(
                    f"model {getattr(self, 'name', type(self).__name__)}: its strided 1x1 convolution {name} takes "
                    f"{m.in_channels} channels; torch {torch.__version__.split('+')[0]}'s CPU backward of such a "
                    f"convolution in channels_last corrupts memory (2 to 7 input channels; measured: the process "
                    f"aborts); give the model a width of at least 8")


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
    """Three stages of two conv-BN-ReLU layers, each stage ending in a 2x2 max-pool.

    ``last_factor`` widens the third stage alone (w, 2w, ``last_factor`` x w): it runs on a sixteenth of
    the input's pixels, so its channels are the cheapest to add (width 8: 5.2 M forward FLOPs an image at
    4, 9.3 M at 8, 19.8 M at width 16; the demo preset's use, ``bench/presets.py``).
    """

    description: ClassVar[str] = "plain 6-conv CNN (conv-BN-ReLU, widths w, 2w, 4w by default), the fastest model"

    width: int = param(32, low=1, doc="channels of the first stage")
    last_factor: int = param(4, low=1, doc="channels of the third stage, a multiple of width")

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        layers: list[nn.Module] = []
        cin = in_channels
        for i in range(3):
            cout = self.width * (self.last_factor if i == 2 else 2**i)
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


# ---------------------------------------------------------------- other libraries' architectures


def _unknown(family: str, arch: str, known: list[str]) -> BenchError:
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(f'{family}:{c}' for c in close)}?" if close else ""
    return BenchError(f"{family} has no classification model {arch!r}{hint} ({len(known)} known, e.g. {family}:{known[0]})")


def adapt_in_channels(net: nn.Module, in_channels: int) -> nn.Module:
    """Replace, in place, the first ``Conv2d`` (module order) that takes 3 channels by the same convolution
    taking ``in_channels``; its weight is the built one's, tiled or cut along the input channels, so each
    element keeps the model's own initialisation. A no-op for 3 channels.

    In torchvision 0.29 this convolution is the first one every classifier applies (checked on all 80 of
    ``list_models(module=torchvision.models)`` with a hooked forward pass), and it has ``groups=1``; the dry
    forward pass of :meth:`ModelSpec.check` confirms the adapted model on the dataset's images.
    """
    if in_channels == 3:
        return net
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            break
    else:
        raise BenchError(f"{type(net).__name__} has no Conv2d taking 3 channels to adapt to {in_channels}-channel images")
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        reps = math.ceil(in_channels / 3)
        new.weight.copy_(conv.weight.repeat(1, reps, 1, 1)[:, :in_channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return net


def _rebuild(name: str, fields: dict) -> ModelSpec:
    return MODELS.get(name)(**fields)


@dataclass(frozen=True)
class ForeignModel(ModelSpec):
    """A family member (``torchvision:NAME``, ``timm:NAME``): a class made on first use, holding ``arch``.

    Pickled as its full name and fields, so a worker process rebuilds it through ``MODELS`` (the class
    itself exists only in the process that resolved the name)."""

    arch: ClassVar[str] = ""

    def __reduce__(self):
        return _rebuild, (self.name, self.to_dict())


def _member(base: type, arch: str, description: str) -> type:
    return type(f"{base.__name__}[{arch}]", (base,), {"arch": arch, "description": description, "__module__": __name__})


_TV_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False, "init_weights": True}}


@dataclass(frozen=True)
class TorchvisionModel(ForeignModel):
    paper: ClassVar[str] = "the architecture's paper, cited in torchvision.models (weights=None: trained from scratch)"

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        from torchvision import models as tvm  # importing torchvision takes seconds: only when used

        net = tvm.get_model_builder(self.arch)(weights=None, num_classes=num_classes, **_TV_EXTRA.get(self.arch, {}))
        return adapt_in_channels(net, in_channels)


def torchvision_model(arch: str) -> type:
    """``torchvision:ARCH``'s spec class, or a one-line ``BenchError`` with the closest names."""
    from torchvision import models as tvm

    known = tvm.list_models(module=tvm)
    if arch not in known:
        raise _unknown("torchvision", arch, known)
    return _member(TorchvisionModel, arch, f"torchvision.models.{arch}, weights=None (ImageNet architecture as built)")


@dataclass(frozen=True)
class TimmModel(ForeignModel):
    paper: ClassVar[str] = "the architecture's paper, cited in timm (pretrained=False: trained from scratch)"

    def net(self, num_classes: int, in_channels: int) -> nn.Module:
        return _timm().create_model(self.arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _timm():
    try:
        import timm
    except ImportError:
        raise BenchError("timm:NAME models need timm: pip install 'bdbench[timm]'") from None
    return timm


def timm_model(arch: str) -> type:
    """``timm:ARCH``'s spec class, or a one-line ``BenchError`` (timm missing, or an unknown name with the closest)."""
    timm = _timm()
    if not timm.is_model(arch):
        raise _unknown("timm", arch, timm.list_models())
    return _member(TimmModel, arch, f"timm {arch}, pretrained=False (as built by timm.create_model)")


MODELS.register_family("torchvision", torchvision_model, "NAME (any torchvision.models classifier, e.g. resnet18; built with weights=None)")
MODELS.register_family("timm", timm_model, "NAME (any timm model, e.g. resnet18; pretrained=False; needs pip install 'bdbench[timm]')")
