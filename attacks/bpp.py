"""BppAttack: colour-depth squeezing (optionally dithered) as the trigger, poisoned on the fly.

Paper: Wang, Zhai and Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep
Neural Networks via Image Quantization and Contrastive Adversarial Learning", CVPR 2022,
arXiv:2205.13383. Official code: RU-System-Software-and-Security/BppAttack
(``bppattack.py``, ``config.py``); BackdoorBench re-implements it in SCLBD/BackdoorBench
``attack/bpp.py`` with ``config/attack/bpp/default.yaml``.

The trigger (``bppattack.py``, ``train`` and ``eval``): every channel value ``v`` in 0..255 is
squeezed to ``squeeze_num`` levels, ``round(v / 255 * (n - 1)) / (n - 1) * 255``. The official
code keeps the non-integer levels (36.43, 72.86, ...) as float model inputs; here they are
rounded to uint8, so the levels are ``round(k * 255 / (n - 1))``, ``k = 0..n-1``. With
``dithering`` the official ``floydDitherspeed`` quantises pixel by pixel in raster order and
spreads each pixel's error (``old - new``, all channels independently) to its neighbours with
the Floyd-Steinberg weights 7/16 (right), 3/16 (below left), 5/16 (below), 1/16 (below right),
then rounds. :func:`floyd_steinberg` does the same arithmetic in float64, in the same order of
additions per pixel, batched over images and channels: pixel ``(y, x)`` only depends on pixels
of earlier wavefront steps ``t = x + 2y``, so all pixels of one step are quantised at once.
Cost: ``W + 2(H - 1)`` sequential steps (94 for 32x32, 82 for 28x28), each about twenty small
tensor operations over ``[B*C, pixels of the step]``, whatever the batch size (measured on one
CPU core: 4 ms for 1 CIFAR image, 8 ms for 24, 46 ms for 256); the official code loops over
images too (numba, on the CPU). As in the official code the error is not clamped while it
spreads; the result is clamped to 0..255 at the end.

Training (``bppattack.py``, ``train``; BackdoorBench ``attack/bpp.py``, ``train_step``): in
every training batch of size ``bs`` the first ``num_bd = int(bs * pc)`` images are squeezed and
relabelled to the target (all-to-one: whatever their label, as the official code does), the next
``num_neg = int(bs * neg_ratio)`` are "negative" samples that keep their labels: the image plus
the squeezing residual ``Q(x') - x'`` of another training image ``x'``, clamped to 0..255. The
official code samples the residual from a list precomputed over the (unaugmented) training set
(``residual_list_train``, every image five times); here ``x'`` is a random other image of the
same shuffled batch, after its augmentation, so no list is kept. The paper's abstract describes
the negatives as produced by adversarial attacks; the released code (followed here, as
BackdoorBench does) uses these residuals instead. When ``bs * pc < 1`` one image is poisoned
with probability ``bs * pc`` (BackdoorBench's ``generalize_to_lower_pratio``; the official
``int`` would poison none). The rewrite runs through ``train_extension()`` (a batch rewrite), so
``poison(train, seed)`` returns the training set unchanged with an empty ``poison_idx``, as
WaNet does. Differences from the official loop: the trainer augments (crop with padding, flip)
before the hook, the official code after the squeeze (``PostTensorTransform``: crop with padding
5, rotation up to 10 degrees, flip); all-to-all maps ``y -> (y + 1) % K`` (official and
BackdoorBench: ``torch.remainder(targets + 1, num_classes)``, the same map).

Defaults:

- ``squeeze_num = 8``: official ``config.py`` (``--squeeze_num`` default 8) and BackdoorBench
  ``default.yaml`` (``squeeze_num: 8``); the official README's example command uses 32.
- ``dithering = False``: official ``config.py`` (``--dithering`` default False) and BackdoorBench
  (``dithering: False``).
- ``poison_rate = 0.2`` (the per-batch ``pc``) and ``neg_ratio = 0.2``: official ``config.py``
  (``--injection_rate 0.2``, ``--neg_rate 0.2``; BackdoorBench's ``original_default.yaml`` too).
  BackdoorBench's ``default.yaml`` runs 0.1 and 0.1, the defaults here before: the measurements
  below were made at 0.1 and 0.1.
- Target 0, all-to-one: official ``--target_label 0``, ``--attack_mode all2one``.
The test set (``trigger``) is the squeeze alone, dithered when ``dithering`` is set (official ``eval``).

Measured (quick preset, GTSRB, ResNet-18 width 16, seed 0, target 0; the clean model of the 4-epoch
recipe has CA 97.2 %): 4 epochs: CA 96.5, ASR 74.7 (RA 24.8); 12 epochs (``--set
train.epochs=12``): CA 98.0, ASR 99.0. So the shortfall at 4 epochs is the recipe's length, not
the trigger; squeezing to 4 levels (``--set bpp.squeeze_num=4``, the quick preset's setting) gives
CA 96.5, ASR 94.5 in the 4 epochs. On the demo's synthetic set the defaults reach 22.6 % in 10 epochs; the demo preset
squeezes to 4 levels and poisons 20 % of each batch (88.3 %, ``bench/presets.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attacks.base import ATTACKS, Attack, PoisonedSet, batch_share
from bench.config import param
from bench.data import ImageSet, step_generator
from bench.official import table
from bench.registry import BenchError
from bench.train import BatchRewrite

# Floyd-Steinberg neighbours (dy, dx, weight), in the order their additions reach a pixel in a
# raster scan: below-left (from the previous row) is added before right (from the same row).
_NEIGHBOURS = ((1, 1, 1 / 16), (1, 0, 5 / 16), (1, -1, 3 / 16), (0, 1, 7 / 16))


def squeeze(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Squeeze uint8 images to ``levels`` values per channel (no dithering); uint8 out."""
    q = torch.round(x.float() / 255.0 * (levels - 1)) / (levels - 1) * 255
    return q.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _wavefront(h: int, w: int, device: str) -> list:
    """Per wavefront step: flat indices of its pixels and, per neighbour, (source rows, target indices, weight)."""
    rows = torch.arange(h)
    steps = []
    for t in range(w + 2 * (h - 1)):
        cols = t - 2 * rows
        ok = (cols >= 0) & (cols < w)
        ys, xs = rows[ok], cols[ok]
        moves = []
        for dy, dx, weight in _NEIGHBOURS:
            sel = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
            if sel.any():
                moves.append((sel.nonzero().flatten().to(device), ((ys[sel] + dy) * w + xs[sel] + dx).to(device), weight))
        steps.append(((ys * w + xs).to(device), moves))
    return steps


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of uint8 images ``[B, C, H, W]`` to ``levels`` values per channel.

    Batched over images and channels; the pixels run in wavefront order (see the module docstring).
    """
    b, c, h, w = x.shape
    if x.numel() == 0:
        return x.clone()
    img = x.to(torch.float64).reshape(b * c, h * w)
    for idx, moves in _wavefront(h, w, str(x.device)):
        old = img[:, idx]
        new = torch.round(old / 255.0 * (levels - 1)) / (levels - 1) * 255
        err = old - new
        img[:, idx] = new
        for src, dst, weight in moves:
            img[:, dst] += err[:, src] * weight
    return img.round_().clamp_(0, 255).to(torch.uint8).reshape(b, c, h, w)


@ATTACKS.register("bpp")
@dataclass(frozen=True)
class Bpp(Attack):
    description: ClassVar[str] = ("colour depth squeezed to 8 levels per channel, 20% of each batch poisoned, 20% negative "
                                  "samples, on the fly")
    paper: ClassVar[str] = ("Wang, Zhai & Ma, BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks "
                            "via Image Quantization and Contrastive Adversarial Learning, CVPR 2022, arXiv:2205.13383")

    poison_rate: float = param(0.2, low=0.0, high=1.0, doc="share of every training batch poisoned (official "
                                                          "--injection_rate: 0.2)")
    squeeze_num: int = param(8, low=2, high=255, doc="levels per channel after squeezing (official: 8)")
    dithering: bool = param(False, doc="Floyd-Steinberg dithering of the squeeze (official: False)")
    neg_ratio: float = param(0.2, low=0.0, high=1.0, doc="share of every batch made negative samples "
                                                        "(official --neg_rate: 0.2)")

    official: ClassVar[dict] = table(
        target=(0, "RU-System-Software-and-Security/BppAttack config.py: --target_label 0"),
        poison_rate=(0.2, "RU-System-Software-and-Security/BppAttack config.py: --injection_rate 0.2 (per batch, "
                          "bppattack.py: num_bd = int(bs * rate_bd))"),
        label_mode=("all2one", "RU-System-Software-and-Security/BppAttack config.py: --attack_mode all2one"),
        squeeze_num=(8, "RU-System-Software-and-Security/BppAttack config.py: --squeeze_num 8"),
        dithering=(False, "RU-System-Software-and-Security/BppAttack config.py: --dithering False"),
        neg_ratio=(0.2, "RU-System-Software-and-Security/BppAttack config.py: --neg_rate 0.2 (per batch)"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.poison_rate + self.neg_ratio > 1 + 1e-9:
            raise BenchError(f"bpp.poison_rate + neg_ratio = {self.poison_rate + self.neg_ratio:g} exceeds 1: "
                             f"a batch cannot hold that many rewritten images; lower poison_rate or neg_ratio")

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise BenchError(f"bpp: expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if self.dithering:
            return floyd_steinberg(x, self.squeeze_num)
        return squeeze(x, self.squeeze_num)

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        """BppAttack poisons on the fly (``train_extension``): the stored training set stays clean."""
        return PoisonedSet(ImageSet(train.x, train.y), torch.zeros(0, dtype=torch.long))

    def batch_counts(self, batch_size: int, gen: torch.Generator) -> tuple[int, int]:
        """(squeezed-and-relabelled, negative) images in a batch, as the official ``int(...)``.

        Below one poisoned image per batch, one is poisoned with probability ``batch_size * pc``
        (BackdoorBench), drawn from ``gen``.
        """
        num_bd = batch_share(batch_size, self.poison_rate, gen)
        num_neg = math.floor(batch_size * self.neg_ratio + 1e-9) if batch_size > 1 else 0
        return num_bd, min(num_neg, batch_size - num_bd)

    def train_extension(self) -> BatchRewrite:
        # The counts are host integers (drawn, if at all, from the trainer's CPU generator: no device
        # sync). The negatives' sources are drawn on the batch's device: on the CPU from the trainer's
        # generator itself, exactly as always; on a GPU from a generator there, seeded once per
        # training run by a draw of the trainer's generator (``step_generator``), so that a step
        # copies nothing over and never waits for the GPU.
        on_device: dict = {}

        def hook(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            bs = len(x)
            num_bd, num_neg = self.batch_counts(bs, gen)
            if num_bd + num_neg == 0:
                return x, y
            if on_device.get("source") is not gen or on_device.get("device") != x.device:
                on_device.update(source=gen, device=x.device, gen=step_generator(gen, x.device))
            dgen = on_device["gen"]
            # the residual of a random other image of the batch for each negative sample
            shift = (torch.randint(1, bs, (num_neg,), generator=dgen, device=dgen.device) if num_neg
                     else torch.zeros(0, dtype=torch.long, device=dgen.device))
            src = ((torch.arange(num_bd, num_bd + num_neg, device=dgen.device) + shift) % bs).to(x.device)
            squeezed = self.trigger(torch.cat([x[:num_bd], x[src]]))  # one (dithering) pass for both
            residual = squeezed[num_bd:].short() - x[src].short()
            out, y = x.clone(), y.clone()
            out[:num_bd] = squeezed[:num_bd]
            y[:num_bd] = self.target_labels(y[:num_bd])
            neg = slice(num_bd, num_bd + num_neg)
            out[neg] = (x[neg].short() + residual).clamp_(0, 255).to(torch.uint8)
            return out, y

        return BatchRewrite(hook)
