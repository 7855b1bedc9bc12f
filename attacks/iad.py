"""Input-Aware Dynamic backdoor (IAD): a trigger generated per image, trained with the classifier.

Paper: Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020, arXiv:2010.08138.
Official code: VinAIResearch/input-aware-backdoor-attack-release (``train.py``, ``config.py``,
``networks/models.py``, ``networks/blocks.py``, ``dataloader.py``); BackdoorBench re-implements it
in SCLBD/BackdoorBench ``attack/inputaware.py`` with ``config/attack/inputaware/default.yaml``.

The trigger. Two encoder-decoder nets see the image ``x`` (in [0, 1]): the pattern generator
``G`` (output channels = image channels) and the mask generator ``M`` (one output channel).
The triggered image is ``x + (G(x) - x) * t(M(x))``, i.e. ``x (1 - m) + p m``, with
``t(v) = tanh(20 v - 10) / (2 + 1e-7) + 0.5`` the official ``threshold`` (``create_bd``). Both
nets follow the official ``Generator``: ``levels`` times (two conv3x3-BatchNorm-ReLU blocks, 2x2
max-pool), doubling the width from ``width``; one middle block; ``levels`` times (bilinear x2
upsampling, two blocks, the second halving the width, the very last one to the output channels
without ReLU); the output squashed to (0, 1) by ``tanh(v) / (2 + 1e-7) + 0.5``. BatchNorm
momentum 0.05, eps 1e-5 (``Conv2dBlock``). Official sizes: width 32 and 3 levels for CIFAR-10
and GTSRB, width 16 and 2 levels for MNIST; here ``levels`` is 3 when the image size is
divisible by 8, else 2 when divisible by 4, else 1, and ``gen_width = 0`` takes 16 for
one-channel images and 32 otherwise (the official choices on those datasets). The nets are
initialised in ``prepare`` from the run seed (PyTorch's default initialisation, drawn under a
forked RNG so the global RNG is untouched), so ``trigger`` works right after ``prepare``.

Where the mix happens. The official code feeds the nets normalised images (CIFAR-10 and MNIST
mean/std; GTSRB unnormalised) and normalises the pattern before mixing. Normalisation is
per-channel affine, so mixing normalised images equals mixing in [0, 1] and normalising after;
here the nets see [0, 1] images (as the official GTSRB setting) and the model normalises its
own input. The diversity ratios below are computed in [0, 1] too (identical for GTSRB; for
CIFAR-10 both distances of the joint-training ratio shrink by about the same std, so the ratio
is nearly unchanged, while the mask pre-training ratio, images over masks, is about 4x smaller).

Training runs inside the shared trainer through ``train_extension()`` (a ``TrainExtension``):

1. ``plan`` (before the classifier's first step): mask pre-training (official ``train_mask_step``,
   run before the classifier's training). ``M`` is trained alone with Adam (lr ``lr_m`` 0.01,
   betas (0.5, 0.9)) on pairs of augmented training batches ``x1, x2`` (two independent
   shuffles, the trainer's batch size and augmentation) to minimise
   ``lambda_norm * mean(relu(t(M(x1)) - mask_density)) + lambda_div * mean(d(x1, x2) / (d(m1, m2) + 1e-7))``
   where ``d(a, b)`` is the per-image root-mean-square difference (official ``criterion_div``, an
   MSE per image, then ``sqrt``). The official pre-training multiplies its diversity term by
   ``lambda_div`` twice (once in ``loss_div``, once in the total); here once, the same at the
   default 1. ``mask_epochs = 25``: the official ``train.py`` (``range(25)``). The official 25
   epochs come with 575 epochs of joint training (``n_iters`` 600 counts the mask epochs too);
   ``mask_epochs = 0`` scales them to the run instead, ``max(1, round(25 * epochs / 575))`` for a
   run of ``epochs`` classifier epochs (1 up to 34 epochs, 3 for 60; the default before). The official
   step-downs at mask epochs 10 and 20 (x0.1) are kept as fractions of the pre-training steps (0.4
   and 0.8). Afterwards ``M`` is frozen (eval mode, no gradient), as in the official code: only the
   pattern generator trains with the classifier. Randomness: a generator seeded from the run seed,
   so the classifier's batches are those of the trainer's own seed. Small data: one epoch is few
   steps (the 5000-image synthetic set at batch 128: 39); on tiny data about 200 Adam steps
   brought the mean mask from 0.4 to about 0.04 (``tests/test_iad.py``), and BatchNorm's running
   statistics (momentum 0.05) need on the order of 100 steps to settle, so set ``mask_epochs``
   there.
2. Every training batch (``batch``, official ``train_step``): of a batch of ``bs`` images the
   first ``num_bd = int(bs * poison_rate)`` get their own trigger and the target label, the next
   ``num_cross = int(bs * cross_rate)`` are cross-trigger samples: the pattern and mask generated
   from another image of the batch, TRUE label kept; the rest stay clean. When ``bs * poison_rate``
   is below 1, one image is backdoored with that probability (BackdoorBench's
   ``generalize_to_lower_pratio``; the official ``int`` would backdoor none), as for BppAttack.
   The rewritten batch is float in [0, 1] and carries ``G``'s graph, so the classifier's loss
   trains ``G`` too. The diversity loss ``lambda_div * mean(d(x_i, x'_i) / (d(G(x_i), G(x'_i)) + 1e-7))``
   over the pairs (backdoored image ``i``, source image of cross sample ``i``) is added to the
   batch's loss (``loss``); ``G`` takes an Adam step (lr ``lr_g`` 0.01, betas (0.5, 0.9)) after the
   classifier's (``after_step``). The official ``G`` schedule (x0.1 at joint epochs 200, 300, 400,
   500 of 575) is kept as fractions of the run's steps. ``g_grad_accumulation = True`` (the
   default): as the official ``train_step`` (and BackdoorBench's), which zeroes only the
   classifier's gradients, ``G``'s gradients add up over the whole training and Adam sees their
   running sum; ``False`` zeroes them after every step (the default before).
3. ``end``: the trained weights of ``G`` and ``M`` (with their BatchNorm statistics) go into
   ``state``, which the grid saves as safetensors, so the test-time trigger is reproducible
   from the cache.

The classifier keeps the preset's recipe (the official one uses SGD lr 0.01, milestones 100, 200,
300, 400). ``poison(train, seed)`` returns the training set unchanged with an empty ``poison_idx``,
as WaNet does: about ``poison_rate`` of every batch is backdoored, no stored image is.

Departures (besides those above):

- Second batch: the official code draws the cross-trigger sources ``x2`` from a second,
  independently shuffled loader; here ``x2`` is the (augmented) batch itself rolled by a random
  shift (trainer's generator), never pairing an image with itself.
- ``G`` runs once on the backdoored and the cross-source images together (the official code runs
  it twice, so its BatchNorm statistics are per part); at test time ``G`` and ``M`` are in eval
  mode (running statistics), as in the official ``eval``.
- Zero distances: ``d`` has zero gradient where two images are identical (the square root's
  gradient at 0 is infinite; the official code would turn such a batch into NaN).
- Augmentation: the trainer's (crop with padding, flip) before the rewrite; the official code
  augments inside its loaders (crop with padding 5, rotation 10, flip for CIFAR-10).
- Rounding: ``trigger`` works on uint8 images and rounds the mix to uint8 (the official code keeps
  float images); during training the classifier sees the unrounded mix (at most 0.5/255 apart).
- All-to-all maps ``y -> (y + 1) % K``: the official ``all2all_mask`` mode and BackdoorBench's
  ``all2all`` (the official ``all2all`` option named in its README raises an error in ``train.py``).

Defaults: ``poison_rate`` (``p_attack``) 0.1, ``cross_rate`` (``p_cross``) 0.1, ``lambda_div`` 1,
``lambda_norm`` 100, ``mask_density`` 0.032, ``lr_g`` = ``lr_m`` = 0.01, Adam betas (0.5, 0.9),
25 mask epochs, ``G``'s gradients never zeroed, target 0, all-to-one: official ``config.py`` and
``train.py``; BackdoorBench ``default.yaml`` has the same values (``pratio`` 0.1 for both shares,
``clean_train_epochs`` 25). ``gen_width = 0`` takes the official width for the image's channels.

Cost (counted multiply-adds per 32x32 image): ``G`` and ``M`` are 80M each at width 32 (0.72M
parameters each), against 35M for ResNet-18 at width 16, 555M at width 64 and 10M for smallcnn at
width 16. Joint training runs ``G`` forward and backward and ``M`` forward on 20% of every batch
(about +60% per step for a width-16 ResNet-18, +4% at width 64); one mask pre-training epoch (``M``
forward and backward on two batches per step) costs about as much as 4.6 classifier epochs of a
width-16 ResNet-18. ``gen_width = 16`` makes both nets about 4x cheaper (20M). The pre-training
runs in the extension's ``plan``; the trainer's reported ``seconds`` include it (``plan_seconds``
is its share), its ``img_per_s`` does not. Both nets run in the recipe's precision and memory format
(``train.bf16`` autocast where native, ``train.channels_last``), as the classifier does; the mixing,
the losses and the test-time ``trigger`` stay in float32. A ``G`` + ``M`` step on 51 images (30 % + 10 % of a
batch of 128) took 226 ms in float32 NCHW, 155 ms channels_last and 72 ms channels_last under bf16 (2-core
EPYC with native bf16); before (``version`` 1) they ran in float32 NCHW.

Measured (quick preset, GTSRB, ResNet-18 width 16, seed 0, target 0, on a 2-core EPYC with native bf16,
bf16 on; the clean model of the 4-epoch recipe has CA 97.2 %), at the defaults before (mask epochs
scaled to the run, ``G``'s gradients zeroed every step), with the generators in float32: 4 epochs:
CA 97.0, ASR 75.9 (RA 23.7), 317 s of which 150 s are the one mask pre-training epoch at width 32;
12 epochs (``--set train.epochs=12``): CA 98.0, ASR 88.8, 620 s.
Backdoor share 0.2: CA 96.8, ASR 89.7; 0.3 (the quick preset's setting): CA 96.5,
ASR 95.7, 438 s; with the generators under bf16 (now): CA 95.8, ASR 93.7, 262 s. On the demo's synthetic set (10 epochs): ASR 35.7; 5 mask epochs: 40.7; ``gen_width=16`` with them: 23.2.
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
from bench.data import Augmentation, ImageSet, augment
from bench.official import table
from bench.registry import BenchError
from bench.train import TrainConfig, TrainExtension, autocast
from attacks.common import levels_for

EPS = 1e-7  # official EPSILON (config.py) and the generators' squashing constant
BETAS = (0.5, 0.9)  # official Adam betas of G and M (train.py)
MASK_MILESTONES = (10 / 25, 20 / 25)  # official schedulerM_milestones [10, 20] of 25 mask epochs
G_MILESTONES = tuple(e / 575 for e in (200, 300, 400, 500))  # official schedulerG_milestones of 575 joint epochs
OFFICIAL_MASK_EPOCHS, OFFICIAL_JOINT_EPOCHS = 25, 575
CHUNK = 256  # images per generator forward in ``trigger``


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TriggerNet(nn.Module):
    """The official encoder-decoder ``Generator`` (see the module notes); output in (0, 1)."""

    def __init__(self, channels: int, out_channels: int, width: int, levels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for i in range(levels):
            w = width * 2 ** i
            layers += [_block(c, w), _block(w, w), nn.MaxPool2d(2)]
            c = w
        layers.append(_block(c, c))
        for i in range(levels):
            last = i == levels - 1
            out = out_channels if last else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), _block(c, c), _block(c, out, relu=not last)]
            c = out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x)) / (2 + EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The official mask ``threshold``: a steep squashing of the mask generator's output."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image root-mean-square difference; zero, with zero gradient, where ``a == b``."""
    d = (a - b).pow(2).flatten(1).mean(1)
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)).sqrt(), torch.zeros_like(d))


def diversity(x1: torch.Tensor, x2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Mean of ``d(x1, x2) / (d(g1, g2) + eps)``: large when different inputs get similar outputs."""
    return (rms(x1, x2) / (rms(g1, g2) + EPS)).mean()


def step_factor(step: int, total: int, milestones: tuple[float, ...]) -> float:
    """x0.1 per milestone (a fraction of ``total`` steps) passed."""
    return 0.1 ** sum(step >= round(f * total) for f in milestones)





@ATTACKS.register("iad")
@dataclass(frozen=True)
class IAD(Attack):
    description: ClassVar[str] = ("input-aware dynamic trigger: pattern and mask generators, mask pre-trained, "
                                  "pattern trained with the model, 10% backdoor + 10% cross-trigger per batch")
    paper: ClassVar[str] = "Nguyen & Tran, Input-Aware Dynamic Backdoor Attack, NeurIPS 2020, arXiv:2010.08138"
    # 2: the generators train in the trainer's precision and memory format (bf16 autocast where native,
    # channels_last), so models trained before (fp32 generators) are not taken from the cache.
    version: ClassVar[int] = 2
    learned_trigger: ClassVar[bool] = True  # the generators train with the classifier: no trigger without that run

    poison_rate: float = param(0.1, low=0.0, high=1.0, doc="share of every training batch backdoored (official p_attack: 0.1)")
    cross_rate: float = param(0.1, low=0.0, high=1.0, doc="share of every batch made cross-trigger samples, true labels (official p_cross: 0.1)")
    lambda_div: float = param(1.0, low=0.0, doc="weight of the diversity losses (official: 1)")
    lambda_norm: float = param(100.0, low=0.0, doc="weight of the mask density loss in pre-training (official: 100)")
    mask_density: float = param(0.032, low=0.0, high=1.0, doc="target mask density (official: 0.032)")
    mask_epochs: int = param(25, low=0, doc="mask pre-training epochs (official: 25); 0: max(1, round(25 * train "
                                            "epochs / 575)), the official 25 of 575 joint epochs scaled to the run")
    lr_g: float = param(0.01, low=0.0, doc="Adam learning rate of the pattern generator (official lr_G: 0.01)")
    lr_m: float = param(0.01, low=0.0, doc="Adam learning rate of the mask generator (official lr_M: 0.01)")
    gen_width: int = param(0, low=0, doc="generators' first width; 0: official, 16 for one-channel images, else 32")
    g_grad_accumulation: bool = param(True, doc="never zero G's gradients, as the official train_step; False: zeroed "
                                                "every step")

    official: ClassVar[dict] = table(
        target=(0, "VinAIResearch/input-aware-backdoor-attack-release config.py: --target_label 0"),
        poison_rate=(0.1, "VinAIResearch/input-aware-backdoor-attack-release config.py: --p_attack 0.1 (per batch)"),
        label_mode=("all2one", "VinAIResearch/input-aware-backdoor-attack-release config.py: --attack_mode all2one"),
        cross_rate=(0.1, "VinAIResearch/input-aware-backdoor-attack-release config.py: --p_cross 0.1"),
        lambda_div=(1.0, "VinAIResearch/input-aware-backdoor-attack-release config.py: --lambda_div 1"),
        lambda_norm=(100.0, "VinAIResearch/input-aware-backdoor-attack-release config.py: --lambda_norm 100"),
        mask_density=(0.032, "VinAIResearch/input-aware-backdoor-attack-release config.py: --mask_density 0.032"),
        mask_epochs=(25, "VinAIResearch/input-aware-backdoor-attack-release train.py: for i in range(25): train_mask_step "
                         "(BackdoorBench config/attack/inputaware/default.yaml: clean_train_epochs 25)"),
        lr_g=(0.01, "VinAIResearch/input-aware-backdoor-attack-release config.py: --lr_G 0.01"),
        lr_m=(0.01, "VinAIResearch/input-aware-backdoor-attack-release config.py: --lr_M 0.01"),
        gen_width=(0, "0 takes the official width for the image: VinAIResearch/input-aware-backdoor-attack-release "
                      "networks/models.py Generator, 32 for CIFAR-10 and GTSRB, 16 for MNIST"),
        g_grad_accumulation=(True, "VinAIResearch/input-aware-backdoor-attack-release train.py: train_step calls "
                                   "optimizerC.zero_grad() only, never optimizerG's"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.poison_rate + self.cross_rate > 1 + 1e-9:
            raise BenchError(f"iad.poison_rate + cross_rate = {self.poison_rate + self.cross_rate:g} exceeds 1: "
                             f"a batch cannot hold that many rewritten images; lower poison_rate or cross_rate")

    # ------------------------------------------------------------ the generators
    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        if size % 2:
            raise BenchError(f"iad: the generators halve the image size at least once; {size}x{size} is odd")
        width = self.gen_width or (16 if channels == 1 else 32)
        levels = levels_for(size)
        self.state["arch"] = torch.tensor([channels, size, width, levels])
        self.state["seed"] = torch.tensor(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g, m = self._build("cpu", "G"), self._build("cpu", "M")
        self._store(g, m)

    def _build(self, device, which: str = "G") -> TriggerNet:
        channels, _, width, levels = (int(v) for v in self.state["arch"])
        return TriggerNet(channels, channels if which == "G" else 1, width, levels).to(device)

    def _store(self, g: Optional[nn.Module], m: Optional[nn.Module]) -> None:
        for prefix, net in (("G.", g), ("M.", m)):
            if net is not None:
                for k, v in net.state_dict().items():
                    self.state[prefix + k] = v.detach().cpu().clone()

    def networks(self, device: torch.device | str = "cpu") -> tuple[TriggerNet, TriggerNet]:
        """``(G, M)`` rebuilt from ``state`` on ``device``, in eval mode."""
        nets = []
        with torch.random.fork_rng(devices=[]):  # construction draws an initialisation we overwrite
            for which in ("G", "M"):
                net = self._build(device, which)
                prefix = which + "."
                net.load_state_dict({k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)})
                nets.append(net.eval())
        return nets[0], nets[1]

    def _check(self, x: torch.Tensor) -> None:
        channels, size = int(self.state["arch"][0]), int(self.state["arch"][1])
        if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
            raise BenchError(f"iad: images of shape {tuple(x.shape[1:])} do not match the generators' "
                             f"{(channels, size, size)}")

    @staticmethod
    def mix(x: torch.Tensor, g: nn.Module, m: nn.Module, source: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x + (G(s) - x) * t(M(s))`` for float images in [0, 1], ``s`` the source (default ``x``); returns (mix, pattern)."""
        s = x if source is None else source
        pattern = g(s)
        mask = threshold(m(s))
        return x + (pattern - x) * mask, pattern

    @torch.no_grad()
    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if len(x) == 0:
            return x.clone()
        g, m = self.networks(x.device)
        g, m = g.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
        return map_images(x, lambda xf: self.mix(xf, g, m)[0], CHUNK, channels_last=True)

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        """IAD poisons on the fly (``train_extension``): the stored training set stays clean."""
        return PoisonedSet(ImageSet(train.x, train.y), torch.zeros(0, dtype=torch.long))

    # ------------------------------------------------------------ training
    def mask_epochs_for(self, epochs: int) -> int:
        """Mask pre-training epochs of a run of ``epochs`` classifier epochs (see the module notes)."""
        if self.mask_epochs:
            return self.mask_epochs
        return max(1, math.floor(OFFICIAL_MASK_EPOCHS * epochs / OFFICIAL_JOINT_EPOCHS + 0.5))

    def batch_counts(self, batch_size: int, gen: torch.Generator) -> tuple[int, int]:
        """(backdoored, cross-trigger) images in a batch, as the official ``int(...)``; below one
        backdoored image per batch, one with probability ``batch_size * poison_rate`` (BackdoorBench)."""
        num_bd = batch_share(batch_size, self.poison_rate, gen)
        num_cross = math.floor(batch_size * self.cross_rate + 1e-9) if batch_size > 2 else 0
        return num_bd, min(num_cross, batch_size - num_bd)

    def pretrain_mask(self, data: ImageSet, batch_size: int, steps_per_epoch: int, epochs: int, aug: Augmentation,
                      bf16: bool = False, channels_last: bool = False) -> TriggerNet:
        """Mask pre-training (module notes, step 1); returns the trained ``M`` (frozen, eval mode), also stored in ``state``.

        ``bf16``/``channels_last``: ``M`` runs under the trainer's bf16 autocast (where native) and memory format.
        """
        device = data.x.device
        _, m = self.networks(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        m.to(memory_format=fmt).train()
        gen = torch.Generator().manual_seed(int(self.state["seed"]))
        opt = torch.optim.Adam(m.parameters(), lr=self.lr_m, betas=BETAS)
        total = steps_per_epoch * epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: step_factor(s, total, MASK_MILESTONES))
        n = len(data)
        for _ in range(epochs):
            perm1 = torch.randperm(n, generator=gen).to(device)
            perm2 = torch.randperm(n, generator=gen).to(device)
            for i in range(steps_per_epoch):
                sl = slice(i * batch_size, (i + 1) * batch_size)
                x1 = (augment(data.x[perm1[sl]], aug, gen).float() / 255).contiguous(memory_format=fmt)
                x2 = (augment(data.x[perm2[sl]], aug, gen).float() / 255).contiguous(memory_format=fmt)
                with autocast(device, bf16):
                    o1, o2 = m(x1), m(x2)
                m1, m2 = threshold(o1.float()), threshold(o2.float())
                loss_norm = F.relu(m1 - self.mask_density).mean()
                loss = self.lambda_norm * loss_norm + self.lambda_div * diversity(x1, x2, m1, m2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        m.eval().requires_grad_(False)
        self._store(None, m)
        return m

    def train_extension(self) -> "IADTraining":
        return IADTraining(self)


class IADTraining(TrainExtension):
    """IAD's joint training inside the shared trainer (module notes, steps 1-3)."""

    def __init__(self, attack: IAD) -> None:
        self.attack = attack
        self.total_steps = 0
        self.g: Optional[TriggerNet] = None
        self.m: Optional[TriggerNet] = None
        self.div: Optional[torch.Tensor] = None
        self.bf16, self.fmt = False, torch.contiguous_format

    def plan(self, data: ImageSet, cfg: TrainConfig, aug: Augmentation, steps_per_epoch: int) -> None:
        atk = self.attack
        atk._check(data.x[:0])
        self.total_steps = steps_per_epoch * cfg.epochs
        bs = min(cfg.batch_size, len(data))
        # The generators run in the classifier's precision and memory format: at width 32 they cost
        # ~8x the demo's smallcnn per image, and a G+M step on 51 images (30 % + 10 % of a batch of 128) took
        # 226 ms in fp32 NCHW, 155 ms channels_last, 72 ms channels_last + bf16 (2-core EPYC with native bf16).
        self.bf16, self.fmt = cfg.bf16, torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.m = atk.pretrain_mask(data, bs, steps_per_epoch, atk.mask_epochs_for(cfg.epochs), aug,
                                   bf16=cfg.bf16, channels_last=cfg.channels_last)

    def start(self, model: nn.Module, device: torch.device) -> None:
        atk = self.attack
        g, m = atk.networks(device)
        self.m = m.requires_grad_(False) if self.m is None else self.m.to(device)  # plan() not called: M as stored
        self.m = self.m.to(memory_format=self.fmt)
        self.g = g.to(memory_format=self.fmt).train()
        self.opt = torch.optim.Adam(self.g.parameters(), lr=atk.lr_g, betas=BETAS)
        total = max(1, self.total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: step_factor(s, total, G_MILESTONES))

    def batch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        atk = self.attack
        atk._check(x)
        self.div = None
        bs = len(x)
        nb, nc = atk.batch_counts(bs, gen)
        # the cross sources: the batch rolled by a shift in 1..bs-1 (no cross sample takes its own trigger),
        # not nb either (a diversity pair would be an image and itself)
        excluded = nb % bs
        choices = bs - 1 - (excluded != 0)
        if choices < 1:
            nc = 0
        if nb + nc == 0:
            return x, y
        shift = 0
        if nc:
            shift = 1 + int(torch.randint(choices, (), generator=gen))
            shift += int(excluded != 0 and shift >= excluded)
        xf = x.float() / 255
        src = (torch.arange(nb, nb + nc, device=x.device) - shift) % bs  # cross sample j takes image src[j]'s trigger
        inputs = torch.cat([xf[:nb], xf[src]]).contiguous(memory_format=self.fmt)
        with autocast(x.device, self.bf16):
            pattern = self.g(inputs)
            with torch.no_grad():
                mask = self.m(inputs)
        pattern, mask = pattern.float(), threshold(mask.float())
        target = torch.cat([xf[:nb], xf[nb:nb + nc]])
        mixed = target + (pattern - target) * mask
        out = torch.cat([mixed, xf[nb + nc:]])
        y = torch.cat([atk.target_labels(y[:nb]), y[nb:]])
        k = min(nb, nc)
        if k and atk.lambda_div:
            self.div = atk.lambda_div * diversity(xf[:k], xf[src[:k]], pattern[:k], pattern[nb:nb + k])
        return out, y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        if self.div is not None:
            loss = loss + self.div
            self.div = None
        return loss

    def after_step(self, model: nn.Module) -> None:
        self.opt.step()
        if not self.attack.g_grad_accumulation:
            self.opt.zero_grad(set_to_none=True)
        self.sched.step()

    def end(self, model: nn.Module) -> None:
        if self.g is not None:
            self.g.eval()
            self.attack._store(self.g, self.m)
