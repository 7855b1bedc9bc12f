"""Blend: a fixed full-image random pattern mixed into the image.

Paper: Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning", arXiv:1712.05526, 2017 (the "blended injection strategy" with a
random-noise key pattern).

The triggered image is ``x' = round((1 - alpha) * x + alpha * p)`` with ``p`` a uint8
pattern of the image's shape ``[C, H, W]``, each value uniform in 0..255.

Where the defaults come from:

- ``alpha = 0.2``: BackdoorBench's blended defaults (SCLBD/BackdoorBench,
  ``config/attack/blended/default.yaml`` and ``cifar10.yaml``:
  ``attack_train_blended_alpha: 0.2``, ``attack_test_blended_alpha: 0.2``, "just as in
  bdzoo1"); RNP's own blended trigger (bboylyg/RNP ``_randomPixelTrigger``) uses 0.2 too.
- The pattern: the paper's uniform random noise. BackdoorBench blends a Hello Kitty image
  instead, and RNP's code draws a fresh H x W noise per image (and truncates instead of
  rounding); here it is one fixed pattern drawn from ``pattern_seed`` (not the run seed),
  so every run and every image share the same key, as in the paper.
- Target 0, all-to-one, poison rate 0.1: BackdoorBench's ``attack_target: 0``,
  ``attack_label_trans: all2one``, ``pratio: 0.1`` (the base-class defaults).

No code of the paper's authors is known here: the table of official values (``official``) cites
BackdoorBench; ``pattern_seed`` is ours (BackdoorBench blends an image, not seeded noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attacks.base import ATTACKS, Attack
from bench.config import param
from bench.data import ImageSet
from bench.official import ours, table
from bench.registry import BenchError


@ATTACKS.register("blend")
@dataclass(frozen=True)
class Blend(Attack):
    description: ClassVar[str] = "fixed random-noise pattern blended over the whole image, alpha 0.2"
    paper: ClassVar[str] = ("Chen et al., Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, "
                            "arXiv:1712.05526, 2017")

    alpha: float = param(0.2, low=0.0, high=1.0, doc="blend weight of the pattern (BackdoorBench: 0.2)")
    pattern_seed: int = param(0, doc="seed of the noise pattern (fixed across runs, not the run seed)")

    official: ClassVar[dict] = table(
        target=(0, "BackdoorBench config/attack/blended/default.yaml: attack_target 0"),
        poison_rate=(0.1, "BackdoorBench config/attack/blended/default.yaml: pratio 0.1"),
        label_mode=("all2one", "BackdoorBench config/attack/blended/default.yaml: attack_label_trans all2one"),
        alpha=(0.2, "BackdoorBench config/attack/blended/default.yaml: attack_train_blended_alpha 0.2, "
                    "attack_test_blended_alpha 0.2"),
        pattern_seed=ours("our addition: the seed of the paper's random-noise key; BackdoorBench blends a fixed image "
                          "(resource/blended/hello_kitty.jpeg), so it has no seed"),
    )

    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        gen = torch.Generator().manual_seed(self.pattern_seed)
        self.state["pattern"] = torch.randint(0, 256, (channels, size, size), generator=gen, dtype=torch.uint8)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.state["pattern"]
        if tuple(x.shape[-3:]) != tuple(pattern.shape):
            raise BenchError(f"blend: images of shape {tuple(x.shape[-3:])} do not match the pattern {tuple(pattern.shape)}")
        p = pattern.to(x.device, torch.float32)
        out = (1 - self.alpha) * x.float() + self.alpha * p
        return out.round_().clamp_(0, 255).to(torch.uint8)
