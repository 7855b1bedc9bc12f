"""DFST: a style transformation as the trigger, with controlled detoxification during training.

Paper: Cheng, Liu, Ma and Zhang, "Deep Feature Space Trojan Attack of Neural Networks by
Controlled Detoxification", AAAI 2021, arXiv:2012.11212. Official code: Megum1/DFST (commit
357b408: the PyTorch port on ``main``, ``attack.py``, ``train.py``, ``detoxification.py``,
``backdoors/dfst.py``, ``models/genr.py``, ``configs/dfst.json``; the original TensorFlow code is
its ``tensorflow`` branch, not read here). bboylyg/RNP lists DFST among its twelve attacks with
downloadable weights only; bboylyg/ABL links the official code.

The attack. A generator (a CycleGAN trained towards a "sunrise" style in the paper; a pre-trained
arbitrary-style-transfer network with the ``sunrise.png`` style image in the PyTorch port) turns an
image into its stylised version, blended as ``(1 - alpha) x + alpha G(x)``; stylised images are
labelled with the target. Because the model may learn the style through a few simple features
(colour), detoxification rounds follow during training: (1) find the *compromised neurons*, the
inner-layer neurons whose mean activation rises most from clean to stylised images; (2) train a
*feature injector* (the "detoxicant" generator) that, from a clean image, produces an image that
looks like it (SSIM) yet drives the model to the target and raises those neurons; (3) add its
outputs to training as benign samples with their true labels, so the model cannot keep the
shallow features and must learn deeper ones of the style.

Here (through ``bench.train.TrainExtension``, like IAD):

- The style generator. No style data set or pre-trained style network can be downloaded here,
  so the style is a fixed, documented warm colour transform ``S`` (the "sunrise" look: reds and
  yellows lifted, blue damped), per pixel, images in [0, 1]::

      R' = 0.90 R + 0.30 G + 0.05 B + 0.10
      G' = 0.10 R + 0.80 G + 0.05 B + 0.04
      B' = 0.05 R + 0.10 G + 0.55 B
      (one-channel images: v' = 0.80 v + 0.15), each clipped to [0, 1]

  and the generator ``G`` is a small encoder-decoder (a 3x3 conv, a stride-2 3x3 conv to half
  resolution, bilinear upsampling and a 1x1 conv back, skip connections from the first layer and
  the input, a 1x1 output and a sigmoid; ``gen_width = 8`` channels) trained in ``prepare`` to
  reproduce ``S`` on the training images (L1, Adam at 1e-2, ``gen_steps = 300`` steps of 32 images
  drawn with the run's seed). Its mean absolute error to ``S`` after the 300 steps: 0.017 of the
  pixel range on random-noise images (0.031 after 100), under 0.03 on held-out smooth images
  (``tests/test_fc_dfst.py``). The trigger is ``(1 - strength) x + strength G(x)``, rounded to 0..255.
  ``strength`` is the official ``alpha`` (``configs/dfst.json``: 0.6) in (0, 1].
- Poisoning, per batch (as the official ``Attack.inject``): ``int(batch * poison_rate)`` images of
  the batch stylised and labelled with the target (``poison_rate = 0.05``: official
  ``poison_rate``, "within a training batch"; below one image a batch, one with that probability,
  ``attacks.base.batch_share``), then, once a feature injector exists, as many detoxicants
  ``(1 - strength) x + strength I(x)`` of the next images with their true labels (official
  ``num_dx``). The stored training set stays clean (like IAD and WaNet here).
- Detoxification after every epoch but the last (official ``train.py``: after every epoch; after
  the last one it no longer changes the model), on the model in eval mode, restored afterwards:
  ``detox_data = 0.03`` of the training images drawn with the run's seed (official: the first 3 %
  of the shuffled training batches) and their stylised versions; the compromised neurons are the
  top ``detox_ratio = 0.01`` of the layer by mean-activation increase (official
  ``detox_neuron_ratio``, ``identify_compromised_neurons``), at least one (the official
  ``int(0.01 * n)`` is 0 below 100 neurons: the demo's narrow models); the layer is the input of
  the model's last Linear (the official ``detox_layers: ["layer4"]`` averaged over its feature
  maps, as the official code averages it, is exactly the input of ResNet-18's classifier). The
  injector is the official simplified one (``models/genr.py``: a learnt 4C x C colour matrix over
  the pixel, its max- and min-pooled and mean-pooled 11x11 neighbourhoods, initialised to the
  identity, output clipped to [0, 1]), trained ``detox_epochs = 10`` passes (official) over those
  images with Adam (lr 1e-2, betas (0.5, 0.9): official), batch of the recipe, on
  ``CE(f(d), target) + w_ssim (1 - SSIM(d, x)) / 2 - w_detox * mean(compromised activations)``
  (``w_ssim = 0.1``, ``w_detox = 0.3``: official). A new injector per round, as the official code
  builds a new ``Detoxification`` each epoch.

Departures, each with its reason:

- the style: the fixed warm colour transform and a generator trained to reproduce it instead of
  CycleGAN on a sunrise photo set (nothing can be downloaded); it is a colour style only, with no
  texture, which is the case detoxification is meant to make harder to learn shallowly;
- gradients of the injector's loss flow through the (frozen) model, as the paper's detoxicant is
  trained; the PyTorch port runs the model under ``torch.no_grad()`` in
  ``train_feature_injector``, so only its SSIM term reaches the injector there;
- the SSIM term is minimised as a dissimilarity, ``(1 - SSIM) / 2``: the port subtracts
  ``w_ssim * SSIM_loss`` with torchgeometry's ``SSIM`` criterion, which we read as the loss
  ``(1 - SSIM) / 2`` (not checked here), i.e. it would reward dissimilar images; the paper asks
  for detoxicants that look like their inputs. SSIM here: 5x5 Gaussian window, sigma 1.5 (the
  port's ``window_size=5``), per channel;
- the min-pooled neighbourhood is ``-maxpool(-x)``; the port's ``imin`` is ``-maxpool(x)``;
- stylised and detoxicant images come from the (augmented) batch itself, the official code samples
  pre-stylised non-target training images and augments afterwards; a target-class image
  stylised keeps its (target) label;
- the compromised neurons' clean and stylised activations come from the same 3 % of images.

Cost: the generator's training in ``prepare`` (``gen_steps`` steps of the width-8 network on 32
images, about 0.03 s a step on one idle-ish CPU thread) and one detoxification round per epoch (``detox_epochs`` passes over 3 % of the training
set, each a forward and backward pass of the model and the injector).

Measured: the demo (``bench/presets.py``: defaults CA 99.9 / ASR 50.7, the demo's 10 % and strength 0.8
99.4 / 97.4 on seed 0, 99.2 / 97.2 and 99.7 / 95.0 on seeds 1 and 2). The quick preset (GTSRB, seed 0):
CA 94.4 / ASR 88.5 at the defaults, the misses on bright images; 94.8 / 95.6 with 10 % of each batch (the
quick preset's setting; docs/measurements.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import ATTACKS, Attack, PoisonedSet, batch_share, map_images
from bench.config import param
from bench.data import Augmentation, ImageSet
from bench.official import ours, table
from bench.registry import BenchError
from bench.train import TrainConfig, TrainExtension
from attacks.common import PenultimateFeatures

# The warm "sunrise" colour transform S (module notes): rows R', G', B' over (R, G, B), and the offsets.
SUNRISE_MATRIX = ((0.90, 0.30, 0.05), (0.10, 0.80, 0.05), (0.05, 0.10, 0.55))
SUNRISE_OFFSET = (0.10, 0.04, 0.0)
GRAY_SCALE, GRAY_OFFSET = 0.80, 0.15  # one-channel images
GEN_BATCH = 32
GEN_LR = 1e-2
CHUNK = 512
INJECTOR_WINDOW = 11  # official FeatureInjector window_size
INJECTOR_LR, INJECTOR_BETAS = 1e-2, (0.5, 0.9)  # official train_feature_injector
SSIM_WINDOW, SSIM_SIGMA = 5, 1.5


def sunrise(x: torch.Tensor) -> torch.Tensor:
    """The style transform ``S`` on float images in [0, 1], ``[B, C, H, W]`` with C in {1, 3}."""
    if x.shape[1] == 1:
        return (GRAY_SCALE * x + GRAY_OFFSET).clamp(0, 1)
    m = torch.tensor(SUNRISE_MATRIX, dtype=x.dtype, device=x.device)
    b = torch.tensor(SUNRISE_OFFSET, dtype=x.dtype, device=x.device)
    return (torch.einsum("ck,bkhw->bchw", m, x) + b[:, None, None]).clamp(0, 1)


class StyleNet(nn.Module):
    """A small encoder-decoder: two 3x3 convs (the second stride 2), upsampling and a 1x1 conv, a skip, 1x1 out."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(channels, width, 3, 1, 1)
        self.enc2 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.dec = nn.Conv2d(2 * width, width, 1)
        self.out = nn.Conv2d(2 * width + channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = F.relu(self.enc1(x))
        h2 = F.relu(self.enc2(h1))
        up = F.interpolate(h2, size=x.shape[-2:], mode="bilinear", align_corners=False)
        h3 = F.relu(self.dec(up))
        return torch.sigmoid(self.out(torch.cat([h3, h1, x], 1)))


def window_max(x: torch.Tensor, k: int) -> torch.Tensor:
    """The maximum over each pixel's ``k x k`` neighbourhood (odd ``k``, the border padded with -inf).

    Exactly ``F.max_pool2d(x, k, 1, k // 2)``, computed per axis by doubling spans (a maximum over
    ``2s`` values is the maximum of two overlapping ``s`` spans): 2 log2(k) elementwise maxima instead of
    k^2 comparisons. The injector's two 11x11 max pools took 150 of the 196 ms of its forward pass on a
    batch of 128 (one thread, fp32, 2-core Xeon with AVX-512-BF16; 34 ms with this), and its forward passes
    21 of the 27 s of the demo DFST model's detoxification rounds (cProfile). Only the forward pass is
    used (the pooled images never need a gradient), so the model trained is the same.
    """
    out = x
    for dim in (-1, -2):
        n = out.shape[dim]
        pad = [0, 0, 0, 0]
        pad[0 if dim == -1 else 2], pad[1 if dim == -1 else 3] = k // 2, k // 2
        m = F.pad(out, pad, value=float("-inf"))
        span = 1
        while 2 * span <= k:
            m = torch.maximum(m.narrow(dim, 0, m.shape[dim] - span), m.narrow(dim, span, m.shape[dim] - span))
            span *= 2
        out = torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, k - span, n))
    return out


class FeatureInjector(nn.Module):
    """The official simplified injector: a learnt ``4C x C`` map over the pixel and its pooled neighbourhoods."""

    def __init__(self, channels: int, window: int = INJECTOR_WINDOW) -> None:
        super().__init__()
        self.window = window
        init = torch.cat([torch.eye(channels), torch.zeros(3 * channels, channels)])
        self.delta = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.window // 2
        h, w = x.shape[-2:]
        imax = window_max(x, self.window)
        imin = -window_max(-x, self.window)
        iavg = F.avg_pool2d(x, self.window, 1, pad, ceil_mode=True, count_include_pad=False)[..., :h, :w]
        stacked = torch.cat([x, imax, imin, iavg], 1)  # [B, 4C, H, W]
        return torch.einsum("bkhw,kc->bchw", stacked, self.delta).clamp(0, 1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two float image batches in [0, 1] (Gaussian window 5, sigma 1.5, per channel, zero padding)."""
    c = a.shape[1]
    g = torch.exp(-(torch.arange(SSIM_WINDOW, dtype=a.dtype, device=a.device) - SSIM_WINDOW // 2) ** 2 / (2 * SSIM_SIGMA ** 2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, padding=SSIM_WINDOW // 2, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


@ATTACKS.register("dfst")
@dataclass(frozen=True)
class DFST(Attack):
    description: ClassVar[str] = ("style trigger: a generator trained here to a warm 'sunrise' colour transform, blended at "
                                  "strength 0.6, 5% of each batch, detoxification rounds every epoch")
    paper: ClassVar[str] = ("Cheng, Liu, Ma & Zhang, Deep Feature Space Trojan Attack of Neural Networks by Controlled "
                            "Detoxification, AAAI 2021, arXiv:2012.11212")

    poison_rate: float = param(0.05, low=0.0, high=1.0, doc="share of every training batch stylised and relabelled "
                                                           "(official poison_rate: 0.05)")
    strength: float = param(0.6, doc="blend of the style, (1 - s) x + s G(x), in (0, 1] (official alpha: 0.6)")
    detox: bool = param(True, doc="run the detoxification rounds (official detox_flag: true)")
    detox_ratio: float = param(0.01, low=0.0, high=1.0, doc="share of the layer's neurons taken as compromised, at least one "
                                                          "(official detox_neuron_ratio: 0.01)")
    detox_epochs: int = param(10, low=1, doc="passes of the feature injector's training per round (official: 10)")
    detox_data: float = param(0.03, low=0.0, high=1.0, doc="share of the training set used per round (official: 3 %)")
    w_ssim: float = param(0.1, low=0.0, doc="weight of the injector's SSIM term (official: 0.1)")
    w_detox: float = param(0.3, low=0.0, doc="weight of the compromised-neuron term (official: 0.3)")
    gen_width: int = param(8, low=1, doc="width of the style generator (ours: no official counterpart)")
    gen_steps: int = param(300, low=1, doc="Adam steps training the style generator to the transform (ours)")

    official: ClassVar[dict] = table(
        target=(0, "Megum1/DFST configs/dfst.json: target 0"),
        poison_rate=(0.05, "Megum1/DFST configs/dfst.json: poison_rate 0.05 (per batch)"),
        label_mode=("all2one", "Megum1/DFST configs/dfst.json: stylised images labelled target 0 (all-to-one)"),
        strength=(0.6, "Megum1/DFST configs/dfst.json: alpha 0.6"),
        detox=(True, "Megum1/DFST configs/dfst.json: detox_flag true"),
        detox_ratio=(0.01, "Megum1/DFST configs/dfst.json: detox_neuron_ratio 0.01"),
        detox_epochs=(10, "Megum1/DFST configs/dfst.json: detox_epochs 10"),
        detox_data=(0.03, "Megum1/DFST train.py: int(len(train_loader) * 0.03) batches per detoxification round"),
        w_ssim=(0.1, "Megum1/DFST configs/dfst.json: w_ssim 0.1"),
        w_detox=(0.3, "Megum1/DFST configs/dfst.json: w_detox 0.3"),
        gen_width=ours("our addition: the width of our style generator, trained here to a fixed colour transform; the "
                       "official code uses a pre-trained style-transfer network (style_model_path), which has no such knob"),
        gen_steps=ours("our addition: the steps training our style generator to the transform; the official style network "
                       "is pre-trained"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.strength <= 1:
            raise BenchError(f"dfst.strength={self.strength!r} is out of range; allowed: (0, 1]")

    # ------------------------------------------------------------ the style generator
    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        if channels not in (1, 3):
            raise BenchError(f"dfst: the sunrise transform is defined for 1 or 3 channels; got {channels}")
        if len(train) == 0:
            raise BenchError("dfst: the style generator is trained on the training images; the training set is empty")
        self.state["arch"] = torch.tensor([channels, self.gen_width])
        self.state["seed"] = torch.tensor(seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = StyleNet(channels, self.gen_width)
        opt = torch.optim.Adam(net.parameters(), lr=GEN_LR)
        for _ in range(self.gen_steps):
            idx = torch.randint(len(train), (GEN_BATCH,), generator=gen)
            x = train.x[idx].float() / 255
            loss = (net(x) - sunrise(x)).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for k, v in net.state_dict().items():
            self.state["G." + k] = v.detach().clone()

    def generator(self, device: torch.device | str = "cpu") -> StyleNet:
        """The style generator rebuilt from ``state`` (eval mode, frozen)."""
        channels, width = (int(v) for v in self.state["arch"])
        with torch.random.fork_rng(devices=[]):
            net = StyleNet(channels, width)
        net.load_state_dict({k[2:]: v.to(torch.float32) for k, v in self.state.items() if k.startswith("G.")})
        return net.to(device).eval().requires_grad_(False)

    def stylise(self, xf: torch.Tensor, g: Optional[StyleNet] = None) -> torch.Tensor:
        """``(1 - strength) x + strength G(x)`` on float images in [0, 1]."""
        g = g if g is not None else self.generator(xf.device)
        with torch.no_grad():
            return (1 - self.strength) * xf + self.strength * g(xf)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.clone()
        g = self.generator(x.device)
        return map_images(x, lambda xf: self.stylise(xf, g), CHUNK)

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        """DFST poisons per batch (``train_extension``): the stored training set stays clean."""
        return PoisonedSet(ImageSet(train.x, train.y), torch.zeros(0, dtype=torch.long))

    def train_extension(self) -> "DFSTTraining":
        return DFSTTraining(self)


def compromised_neurons(model: nn.Module, clean: torch.Tensor, styled: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the top ``max(1, int(ratio * n))`` penultimate neurons by mean activation increase, clean -> styled."""
    with PenultimateFeatures(model) as feats, torch.no_grad():
        model(clean)
        a = feats.value.float().mean(0)
        model(styled)
        b = feats.value.float().mean(0)
    k = max(1, int(ratio * len(a)))
    return torch.sort(b - a, descending=True, stable=True).indices[:k]


def train_injector(model: nn.Module, clean: torch.Tensor, neurons: torch.Tensor, attack: DFST, batch_size: int,
                   gen: torch.Generator) -> FeatureInjector:
    """One detoxification round's feature injector (module notes); the model's weights and gradients stay untouched."""
    inj = FeatureInjector(clean.shape[1]).to(clean.device)
    opt = torch.optim.Adam(inj.parameters(), lr=INJECTOR_LR, betas=INJECTOR_BETAS)
    params = list(inj.parameters())
    n = len(clean)
    with PenultimateFeatures(model) as feats, torch.enable_grad():
        for _ in range(attack.detox_epochs):
            perm = torch.randperm(n, generator=gen).to(clean.device)
            for i in range(0, n, batch_size):
                x = clean[perm[i:i + batch_size]]
                d = (1 - attack.strength) * x + attack.strength * inj(x)
                out = model(d).float()
                labels = torch.full((len(x),), attack.target, device=x.device)
                act = feats.value.float()[:, neurons].mean()
                loss = F.cross_entropy(out, labels) + attack.w_ssim * (1 - ssim(d, x)) / 2 - attack.w_detox * act
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
    return inj.eval().requires_grad_(False)


class DFSTTraining(TrainExtension):
    """DFST's per-batch poisoning and per-epoch detoxification inside the shared trainer (module notes)."""

    def __init__(self, attack: DFST) -> None:
        self.attack = attack
        self.injector: Optional[FeatureInjector] = None
        self.neurons: Optional[torch.Tensor] = None
        self.rounds = 0
        self.step = 0

    def plan(self, data: ImageSet, cfg: TrainConfig, aug: Augmentation, steps_per_epoch: int) -> None:
        atk = self.attack
        self.steps_per_epoch, self.total = steps_per_epoch, steps_per_epoch * cfg.epochs
        self.batch_size = min(cfg.batch_size, len(data))
        # the detoxification images and the injectors' batch order: drawn from the run's seed (kept in state)
        self.gen = torch.Generator().manual_seed(int(atk.state["seed"]))
        count = max(1, math.floor(atk.detox_data * len(data) + 0.5)) if atk.detox_data > 0 else 0
        idx = torch.randperm(len(data), generator=self.gen)[:count].to(data.x.device)
        self.detox_x = data.x[idx]

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.g = self.attack.generator(device)
        self.step = 0

    def batch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        atk = self.attack
        bs = len(x)
        nb = min(batch_share(bs, atk.poison_rate, gen), bs)
        nd = min(nb, bs - nb) if self.injector is not None else 0
        if nb + nd == 0:
            return x, y
        xf = x.float() / 255
        parts = [atk.stylise(xf[:nb], self.g)]
        if nd:
            with torch.no_grad():
                parts.append((1 - atk.strength) * xf[nb:nb + nd] + atk.strength * self.injector(xf[nb:nb + nd]))
        parts.append(xf[nb + nd:])
        y = torch.cat([atk.target_labels(y[:nb]), y[nb:]])
        return torch.cat(parts), y

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        atk = self.attack
        if atk.detox and self.step % self.steps_per_epoch == 0 and self.step < self.total and len(self.detox_x):
            self.detoxify(model)

    def detoxify(self, model: nn.Module) -> None:
        """One round: compromised neurons, a new feature injector (module notes)."""
        atk = self.attack
        was_training = model.training
        model.eval()
        try:
            clean = self.detox_x.float() / 255
            styled = atk.stylise(clean, self.g)
            self.neurons = compromised_neurons(model, clean, styled, atk.detox_ratio)
            self.injector = train_injector(model, clean, self.neurons, atk, self.batch_size, self.gen)
            self.rounds += 1
        finally:
            model.train(was_training)
