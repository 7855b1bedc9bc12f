"""LIRA: a learned, bounded additive trigger, trained jointly with the classifier, then fixed.

Paper: Doan, Lao, Zhao and Li, "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks",
ICCV 2021, arXiv:2104.05808. Official code: sunbelbd/invisible_backdoor_attacks
(``pytorch/lira_trigger_generation.py`` for stage 1, ``pytorch/lira_backdoor_injection.py`` for
stage 2, ``pytorch/attack_models/unet.py`` for the generator, at commit 87e3ab5; the head, f292e73,
keeps the paddle version only; the README gives the commands per dataset). The RNP authors ship
LIRA-backdoored CIFAR-10 weights (bboylyg/RNP README) but no code for it.

The trigger. A generator ``G`` maps the image ``x`` (in [0, 1]) to a perturbation in (-1, 1)
(``tanh`` output); the triggered image is ``clamp(x + eps * G(x), 0, 1)``, so no pixel moves by
more than ``eps`` of the range. ``G`` is the official CIFAR-10 ``UNet``: ``levels`` down blocks (two
conv3x3-BatchNorm-ReLU, then 2x2 average pooling) of widths ``width * 2^i``, a bottom block of
``width * 2^levels``, ``levels`` up blocks (bilinear x2 upsampling with ``align_corners=True``, the
skip connection concatenated, two conv-BN-ReLU), a 1x1 conv to the image's channels, BatchNorm,
``tanh``. Official: width 64, 3 levels (32x32 inputs). Here ``gen_width = 64`` (0 takes 64 too) and the
levels follow the image size (3 when it divides by 8, 2 by 4, else 1), as for IAD.

Training, inside the shared trainer through ``train_extension()`` (a ``TrainExtension``):

1. Stage 1 (trigger generation; the paper's Algorithm 1, the official ``train``), the first
   ``stage1_epochs`` epochs: every step first updates ``G`` by the paper's one-step look-ahead:
   with ``L(w, G) = alpha * CE(f_w(x), y) + (1 - alpha) * CE(f_w(T(x)), target)``, the virtual
   weights ``w' = w - lr * grad_w L`` (``lr`` the classifier's current learning rate, gradient
   kept differentiable in ``G``), and ``G`` takes an Adam step (lr ``lr_atk``) on
   ``CE(f_w'(T(x)), target)``. Then the classifier takes its own step on ``L`` with ``G`` fixed.
2. Stage 2 (backdoor injection, the official ``final_test``): the rest of the run; ``G`` is frozen
   (eval mode, no gradient, no step) and the classifier keeps training on the same loss.
3. ``end``: ``G``'s weights (with its BatchNorm statistics) go into ``state``, which the grid saves
   as safetensors, so the cached model's trigger is reproducible at test time.

The batch: the trainer's augmented batch ``x`` of ``B`` images, followed by triggered copies of its
first ``round(poison_rate * B)`` images with the attack's target labels; the loss (``loss`` hook)
is ``alpha`` times the clean part's mean cross-entropy plus ``1 - alpha`` times the triggered
part's (officially every image appears both ways: ``poison_rate = 1``). The triggered copies are
made by ``G`` in eval mode without gradient (the official classifier steps use the ``atkmodel``
copy in eval mode).

Defaults and sources: ``eps = 0.01`` and ``alpha = 0.5`` (README, CIFAR-10 commands of both
stages since commit 202b4cb: ``--eps 0.01 --test_eps 0.01 --alpha 0.5 --test_alpha 0.5``;
BackdoorBench ``config/attack/lira/cifar10.yaml``: ``eps: 0.01``; the README of the first commits,
07f38cd, ran ``--eps 0.1``, the default here before; the parser's own default eps is 0.3);
``lr_atk = 1e-4`` (parser default ``--lr-atk``; Adam as ``create_models``); ``poison_rate = 1``
(every image clean and triggered, ``train`` and ``final_test``); ``stage1_epochs = 50`` (the
README's CIFAR-10 run: ``--epochs 50`` of stage 1, then ``--test_epochs 250``; a run of at most 50
epochs is stage 1 throughout); ``stage1_epochs = 0`` takes ``max(1, round(epochs * 50 / 300))``
instead, the official share of the run (2 of the demo's 10 epochs, 1 of the quick preset's 4; the
default before); ``lookahead``: the official ``train`` steps a temporary copy of the classifier
and trains ``G`` on it. Target 0, all-to-one (README commands).
``eps`` must lie in (0, 1]: it is a fraction of the pixel range.

Departures:

- Stage 2 continues training the stage-1 classifier (the paper: "fine-tune"; the official script
  does so with ``--test_use_train_last``, by default it trains a fresh classifier for 250 epochs).
  One model, one recipe: the trainer's optimiser, schedule and augmentation throughout (official:
  SGD lr 0.01 momentum 0.9 in stage 1; SGD lr 0.01, weight decay 5e-4, x0.1 at 50/100/150/200 in
  stage 2).
- The look-ahead uses the current ``G`` and ``w`` every step (the paper's algorithm); the official
  ``train`` lets the classifier see a copy of ``G`` refreshed once per epoch. The virtual step is
  plain SGD without momentum, as the official one; it runs in float32 with copies of the
  classifier's BatchNorm buffers (so the look-ahead does not move the real model's statistics).
- One ``eps`` and one ``alpha`` for both stages (the CIFAR-10 commands use equal values).
- ``G`` is the UNet for every dataset (the official GTSRB and MNIST runs use small autoencoders).
- Clipping: images are kept in [0, 1] (official GTSRB ``clip_image``; CIFAR-10 in normalised space
  is not clipped) and ``trigger`` rounds to uint8.
- ``train.label_smoothing`` does not apply to LIRA's loss (the ``loss`` hook recomputes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.base import ATTACKS, Attack, PoisonedSet, map_images
from attacks.common import levels_for
from bench.config import param
from bench.data import Augmentation, ImageSet
from bench.official import table
from bench.registry import BenchError
from bench.train import TrainConfig, TrainExtension, autocast, lr_lambda

OFFICIAL_STAGE1, OFFICIAL_STAGE2 = 50, 250  # README, CIFAR-10: --epochs 50 (stage 1), --test_epochs 250 (stage 2)
CHUNK = 256  # images per generator forward in ``trigger``


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """The official LIRA UNet with a scalable width and depth (module notes); output in (-1, 1)."""

    def __init__(self, channels: int, width: int, levels: int) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList(_double_conv(channels if i == 0 else widths[i - 1], widths[i]) for i in range(levels))
        self.bottom = _double_conv(widths[levels - 1] if levels else channels, widths[levels])
        self.up = nn.ModuleList(_double_conv(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(levels)))
        self.last = nn.Sequential(nn.Conv2d(widths[0], channels, 1), nn.BatchNorm2d(channels))
        self.pool = nn.AvgPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([self.upsample(x), skip], 1))
        return torch.tanh(self.last(x))


@ATTACKS.register("lira")
@dataclass(frozen=True)
class LIRA(Attack):
    description: ClassVar[str] = ("learned additive trigger eps * tanh(UNet(x)), the generator trained with the model by a "
                                  "one-step look-ahead (stage 1), then fixed while the model trains on (stage 2)")
    paper: ClassVar[str] = "Doan, Lao, Zhao & Li, LIRA: Learnable, Imperceptible and Robust Backdoor Attacks, ICCV 2021, arXiv:2104.05808"
    learned_trigger: ClassVar[bool] = True

    poison_rate: float = param(1.0, low=0.0, high=1.0, doc="share of every batch also given as triggered copies "
                                                           "(official: every image, 1.0)")
    eps: float = param(0.01, doc="bound on the perturbation, a fraction of the pixel range, in (0, 1] "
                                 "(official CIFAR-10 command: 0.01)")
    alpha: float = param(0.5, low=0.0, high=1.0, doc="weight of the clean loss, 1 - alpha of the triggered one (official: 0.5)")
    lr_atk: float = param(1e-4, low=0.0, doc="Adam learning rate of the generator (official --lr-atk: 1e-4)")
    stage1_epochs: int = param(50, low=0, doc="epochs of stage 1 (generator trained; official: 50); 0: max(1, "
                                              "round(epochs * 50 / 300)), the official 50 of 300")
    gen_width: int = param(64, low=0, doc="the generator's first width (official: 64; 0 takes 64 too)")
    lookahead: bool = param(True, doc="stage 1's generator loss on the one-step look-ahead classifier (paper); "
                                      "False: on the current classifier (first order)")

    official: ClassVar[dict] = table(
        target=(0, "sunbelbd/invisible_backdoor_attacks README.md, CIFAR-10 commands: --target_label 0"),
        poison_rate=(1.0, "sunbelbd/invisible_backdoor_attacks pytorch/lira_trigger_generation.py (commit 87e3ab5): "
                          "train's loss on every image clean and triggered"),
        label_mode=("all2one", "sunbelbd/invisible_backdoor_attacks README.md, CIFAR-10 commands: --mode all2one"),
        eps=(0.01, "sunbelbd/invisible_backdoor_attacks README.md, CIFAR-10 commands: --eps 0.01 --test_eps 0.01 "
                   "(BackdoorBench config/attack/lira/cifar10.yaml: eps 0.01)"),
        alpha=(0.5, "sunbelbd/invisible_backdoor_attacks README.md, CIFAR-10 commands: --alpha 0.5 --test_alpha 0.5"),
        lr_atk=(1e-4, "sunbelbd/invisible_backdoor_attacks pytorch/lira_trigger_generation.py (commit 87e3ab5): "
                      "--lr-atk 0.0001"),
        stage1_epochs=(50, "sunbelbd/invisible_backdoor_attacks README.md, CIFAR-10 stage 1: --epochs 50"),
        gen_width=(64, "sunbelbd/invisible_backdoor_attacks pytorch/attack_models/unet.py (commit 87e3ab5): UNet, "
                       "first width 64"),
        lookahead=(True, "sunbelbd/invisible_backdoor_attacks pytorch/lira_trigger_generation.py (commit 87e3ab5): "
                         "train steps tmpmodel by the classifier's lr and trains the generator on it"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.eps <= 1:
            raise BenchError(f"lira.eps={self.eps!r} is out of range; allowed: (0, 1], a fraction of the pixel range")

    # ------------------------------------------------------------ the generator
    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        levels = levels_for(size)
        if levels == 0 or size % 2:
            raise BenchError(f"lira: the generator halves the image size at least once; {size}x{size} is odd")
        self.state["arch"] = torch.tensor([channels, size, self.gen_width or 64, levels])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g = self._build("cpu")
        self._store(g)

    def _build(self, device) -> UNet:
        channels, _, width, levels = (int(v) for v in self.state["arch"])
        return UNet(channels, width, levels).to(device)

    def _store(self, g: nn.Module) -> None:
        for k, v in g.state_dict().items():
            self.state["G." + k] = v.detach().cpu().clone()

    def generator(self, device: torch.device | str = "cpu") -> UNet:
        """``G`` rebuilt from ``state`` on ``device``, in eval mode."""
        with torch.random.fork_rng(devices=[]):
            g = self._build(device)
        g.load_state_dict({k[2:]: v for k, v in self.state.items() if k.startswith("G.")})
        return g.eval()

    def _check(self, x: torch.Tensor) -> None:
        channels, size = int(self.state["arch"][0]), int(self.state["arch"][1])
        if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
            raise BenchError(f"lira: images of shape {tuple(x.shape[1:])} do not match the generator's {(channels, size, size)}")

    def perturb(self, x: torch.Tensor, g: nn.Module) -> torch.Tensor:
        """``clamp(x + eps * G(x), 0, 1)`` for float images in [0, 1]."""
        return (x + self.eps * g(x).float()).clamp(0, 1)

    @torch.no_grad()
    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if len(x) == 0:
            return x.clone()
        g = self.generator(x.device)
        return map_images(x, lambda xf: self.perturb(xf, g), CHUNK)

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        """LIRA poisons on the fly (``train_extension``): the stored training set stays clean."""
        return PoisonedSet(ImageSet(train.x, train.y), torch.zeros(0, dtype=torch.long))

    def stage1_epochs_for(self, epochs: int) -> int:
        if self.stage1_epochs:
            return min(self.stage1_epochs, epochs)
        return min(epochs, max(1, math.floor(epochs * OFFICIAL_STAGE1 / (OFFICIAL_STAGE1 + OFFICIAL_STAGE2) + 0.5)))

    def train_extension(self) -> "LIRATraining":
        return LIRATraining(self)


class LIRATraining(TrainExtension):
    """LIRA's two stages inside the shared trainer (module notes)."""

    def __init__(self, attack: LIRA) -> None:
        self.attack = attack
        self.step = 0
        self.stage1_steps = 0
        self.lr_at: Optional[callable] = None
        self.n: Optional[int] = None
        self.g: Optional[UNet] = None
        self.bf16 = False

    def plan(self, data: ImageSet, cfg: TrainConfig, aug: Augmentation, steps_per_epoch: int) -> None:
        self.attack._check(data.x[:0])
        self.stage1_steps = steps_per_epoch * self.attack.stage1_epochs_for(cfg.epochs)
        total = steps_per_epoch * cfg.epochs
        lam = lr_lambda(cfg, total, steps_per_epoch)
        self.lr_at = lambda s: cfg.lr * lam(s)  # the classifier's learning rate at a step (the trainer's LambdaLR)
        self.bf16 = cfg.bf16

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.g = self.attack.generator(device)
        self.opt = torch.optim.Adam(self.g.parameters(), lr=self.attack.lr_atk)
        if self.lr_at is None:  # plan() not called: a constant learning rate of 0.1 for the look-ahead
            self.lr_at = lambda s: 0.1

    @property
    def in_stage1(self) -> bool:
        return self.step < self.stage1_steps

    def generator_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Stage 1: one Adam step of ``G`` on the look-ahead loss (module notes); returns that loss."""
        atk, model, g = self.attack, self.model, self.g
        g.train().requires_grad_(True)
        target = atk.target_labels(y)
        xa = atk.perturb(x, g)
        params = dict(model.named_parameters())
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        if atk.lookahead:
            with torch.autocast(x.device.type, enabled=False):
                loss = (atk.alpha * F.cross_entropy(functional_call(model, (params, buffers), (x,)).float(), y)
                        + (1 - atk.alpha) * F.cross_entropy(functional_call(model, (params, buffers), (xa,)).float(), target))
                names = [k for k, p in params.items() if p.requires_grad]
                grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True)
                lr = self.lr_at(self.step)
                virtual = {**params, **{k: params[k] - lr * gr for k, gr in zip(names, grads)}}
                loss_g = F.cross_entropy(functional_call(model, (virtual, buffers), (xa,)).float(), target)
        else:
            loss_g = F.cross_entropy(functional_call(model, (params, buffers), (xa,)).float(), target)
        self.opt.zero_grad(set_to_none=True)
        loss_g.backward(inputs=list(g.parameters()))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        g.eval()
        return float(loss_g.detach())

    def batch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        atk = self.attack
        atk._check(x)
        self.n = None
        k = min(len(x), math.floor(len(x) * atk.poison_rate + 0.5))
        if k == 0:
            return x, y
        xf = x.float() / 255
        if self.in_stage1:
            self.generator_step(xf[:k], y[:k])
        else:
            self.g.eval().requires_grad_(False)
        with torch.no_grad(), autocast(x.device, self.bf16):
            xa = atk.perturb(xf[:k], self.g.eval())
        self.n = len(x)
        return torch.cat([xf, xa]), torch.cat([y, atk.target_labels(y[:k])])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if self.n is None:
            return loss
        n, a, out = self.n, self.attack.alpha, out.float()
        self.n = None
        return a * F.cross_entropy(out[:n], y[:n]) + (1 - a) * F.cross_entropy(out[n:], y[n:])

    def after_step(self, model: nn.Module) -> None:
        self.step += 1

    def end(self, model: nn.Module) -> None:
        if self.g is not None:
            self.g.eval()
            self.attack._store(self.g)
