"""CTRL: a fixed bump on chosen DCT coefficients of the chroma channels (clean-label).

Paper: Li, Pang, Xi, Du, Ji, Yao and Wang, "An Embarrassingly Simple Backdoor Attack on
Self-supervised Learning", ICCV 2023, arXiv:2210.07346. Official code: meet-cjli/CTRL
(``utils/frequency.py``, ``PoisonFre.Poison_Frequency_Diff``; ``main_train.py``;
``loaders/diffaugment.py``, ``PoisonAgent``), commit e3d26f0. BackdoorBench (SCLBD/BackdoorBench,
commit f02e353) runs the same trigger in supervised training (``attack/ctrl.py``,
``utils/bd_img_transform/ctrl.py``, ``config/attack/ctrl/default.yaml``).

The official trigger, per image: RGB in 0..255 -> YUV (kornia ``rgb_to_yuv``: Y = .299 R +
.587 G + .114 B, U = -.147 R - .289 G + .436 B, V = .615 R - .515 G - .100 B) -> split every
channel into ``window x window`` blocks and take the orthonormal 2-D DCT-II of each -> add
``magnitude`` to coefficients ``(p, p)`` for every ``p`` in ``positions``, in every block of
the chosen channels -> inverse DCT -> RGB (kornia ``yuv_to_rgb``: R = Y + 1.14 V,
G = Y - .396 U - .581 V, B = Y + 2.029 U) -> clamp.

Every step is linear, so that equals adding one fixed RGB pattern,
``yuv_to_rgb(IDCT(magnitude * E))`` with ``E`` the indicator of the chosen coefficients;
``prepare`` builds it once (the DCT as products with an orthonormal DCT-II matrix, batched
over blocks) and ``trigger`` adds it, rounds and clamps. The one thing the per-image round
trip adds besides the trigger is kornia's ``yuv_to_rgb(rgb_to_yuv(x)) != x`` (the rounded
constants; under 0.35 of a level per pixel, so it rounds away on uint8 images): not part of
the trigger, left out.

Defaults:

- ``magnitude = 100``: official ``main_train.py`` (``--magnitude`` default 100.0; the
  README's CIFAR-10 commands pass ``--magnitude 100.0``); BackdoorBench hard-codes
  ``self.magnitude = 100`` in its ``ctrl`` transform.
- ``window = 32``, ``positions = (15, 31)``, ``channels = (1, 2)`` (U and V): the README's
  ``--window_size 32 --trigger_position 15 31 --channel 1 2``; ``PoisonFre`` turns the
  positions into coefficients (15, 15) and (31, 31). BackdoorBench: ``pos_list: [15, 31]``,
  ``trigger_channels: [1, 2]``, ``use_yuv: True``, and the image size as the window (32 on
  CIFAR-10 and GTSRB, so the same blocks).
- Clean-label, target 0, all-to-one, ``poison_rate = 0.01`` of the whole training set: official
  ``main_train.py`` (``--target_class`` 0, ``--poison_ratio`` 0.01; the README's commands pass
  ``--poison_ratio 0.01``); ``loaders/diffaugment.py`` poisons the first ``int(poison_ratio * N)``
  target-class images, a cap at the class size as here; here they are drawn at random from the
  run seed. The official rate is for self-supervised training; BackdoorBench's supervised port
  runs ``pratio: 0.05`` (``config/attack/ctrl/default.yaml``, ``attack_target: 0``,
  ``attack_label_trans: all2one``, selecting with ``clean_label=True``), the default here before:
  the measurements below were made at 0.05 or at a preset's rate. Neither code offers a
  dirty-label variant in use (BackdoorBench's ``use_clean_label`` key is never read), so none is
  offered here.

Departures:

- Quantisation: the official code keeps float images; BackdoorBench casts with
  ``.to(torch.uint8)`` before clamping (truncation, and wrap-around outside 0..255). Here
  the result is rounded to the nearest level and clamped to 0..255.
- Images smaller than ``window`` (MNIST, 28x28): the block is the whole image, as the
  official slicing gives, and each position ``p`` becomes ``floor((p + 1) * b / window) - 1``
  for a block of ``b`` pixels, so (15, 31) -> (13, 27) keeps "the middle and the highest
  frequency" (the official code would index past the block). Sizes that are not a multiple
  of the block are refused.
- Grayscale images have no chroma: the trigger goes into the DCT of their single channel,
  at the same coefficients with the same magnitude (``channels`` is not used). The
  official code and BackdoorBench handle RGB only.

Measured (quick preset, GTSRB, ResNet-18 width 16, 4 epochs, seed 0, target 2, 1,960 poisoned
class-2 images; clean model CA 97.2 %): magnitude 100 gives CA 97.4, ASR 0.1 (RA 96.3): the model
ignores the trigger. Magnitude 300 gives CA 97.0, ASR 77.7; magnitude 100 over 12 epochs
(``--set train.epochs=12``) CA 98.7, ASR 75.3. On the demo's synthetic set 100 gives
ASR 0.0 and 300 gives 34.9. At 100 each coefficient adds at most 6.25 levels to a pixel of U or V
(100 x 2 / 32 for the orthonormal 32x32 basis), a checkerboard-like pattern that a one-pixel shift
of the training crop inverts. The official code reports its ASR for self-supervised
training (SimCLR and kin, hundreds of epochs), and its author notes that the right strength depends
on the setting (meet-cjli/CTRL issue #2). The default stays the official 100; ``ctrl.magnitude``
is the knob. Poisoning all 2,250 class-2 images (rate 0.1) at magnitude 200 gives ASR 98.2 but CA
91.3 (the clean class-2 test images are lost); rate 0.055 (2,156 images) at magnitude 300, the
quick preset's setting, gives CA 97.0, ASR 95.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from attacks.base import ATTACKS, CleanLabelAttack, clean_label_rate
from bench.config import param
from bench.data import ImageSet
from bench.official import table
from bench.registry import BenchError
from attacks.common import dct_matrix

# kornia 0.6.5 (the version CTRL's requirements.txt pins), kornia/color/yuv.py: rows give Y, U, V / R, G, B.
RGB_TO_YUV = ((0.299, 0.587, 0.114), (-0.147, -0.289, 0.436), (0.615, -0.515, -0.100))
YUV_TO_RGB = ((1.0, 0.0, 1.14), (1.0, -0.396, -0.581), (1.0, 2.029, 0.0))





def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., H/b, W/b, b, b]``."""
    *lead, h, w = x.shape
    return x.reshape(*lead, h // b, b, w // b, b).transpose(-3, -2)


def _unblocks(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_blocks``."""
    *lead, nh, nw, b, _ = x.shape
    return x.transpose(-3, -2).reshape(*lead, nh * b, nw * b)


def block_dct(x: torch.Tensor, b: int) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of every ``b x b`` block of ``x`` (``[..., H, W]``, H and W multiples of b)."""
    d = dct_matrix(b, x.dtype, x.device)
    return _unblocks(d @ _blocks(x, b) @ d.T)


def block_idct(c: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of ``block_dct``."""
    d = dct_matrix(b, c.dtype, c.device)
    return _unblocks(d.T @ _blocks(c, b) @ d)


@ATTACKS.register("ctrl")
@dataclass(frozen=True)
class CTRL(CleanLabelAttack):
    description: ClassVar[str] = "clean-label: +100 on DCT coefficients (15,15), (31,31) of U and V in 32x32 blocks"
    paper: ClassVar[str] = ("Li et al., An Embarrassingly Simple Backdoor Attack on Self-supervised Learning, "
                            "ICCV 2023, arXiv:2210.07346")

    poison_rate: float = clean_label_rate(0.01, "official --poison_ratio: 0.01; BackdoorBench pratio: 0.05")
    magnitude: float = param(100.0, doc="added to each chosen DCT coefficient, 0..255 pixel units, > 0 (official: 100)")
    window: int = param(32, low=1, doc="side of the square DCT blocks; the image size if smaller (official: 32)")
    positions: tuple[int, ...] = param((15, 31), doc="p: coefficient (p, p) of every block gets the magnitude; "
                                       "scaled on images smaller than window (official: 15 31)")
    channels: tuple[int, ...] = param((1, 2), doc="YUV channels with the trigger, 0 Y, 1 U, 2 V; RGB only (official: 1 2)")

    official: ClassVar[dict] = table(
        target=(0, "meet-cjli/CTRL main_train.py: --target_class 0"),
        poison_rate=(0.01, "meet-cjli/CTRL main_train.py: --poison_ratio 0.01 (README commands too; of the whole set, from "
                           "target-class images: loaders/diffaugment.py)"),
        label_mode=("all2one", "meet-cjli/CTRL loaders/diffaugment.py: the triggered test set is labelled target_class"),
        magnitude=(100.0, "meet-cjli/CTRL main_train.py: --magnitude 100.0"),
        window=(32, "meet-cjli/CTRL main_train.py: --window_size 32"),
        positions=((15, 31), "meet-cjli/CTRL README.md, CIFAR-10 commands: --trigger_position 15 31"),
        channels=((1, 2), "meet-cjli/CTRL README.md, CIFAR-10 commands: --channel 1 2"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.magnitude > 0:
            raise BenchError(f"ctrl.magnitude={self.magnitude!r} is out of range; allowed: (0, ...)")
        if not self.positions or any(not 0 <= p < self.window for p in self.positions):
            raise BenchError(f"ctrl.positions={self.positions!r} is not allowed; give one or more of 0..{self.window - 1} "
                             f"(below ctrl.window={self.window})")
        if not self.channels or any(c not in (0, 1, 2) for c in self.channels) or len(set(self.channels)) < len(self.channels):
            raise BenchError(f"ctrl.channels={self.channels!r} is not allowed; give distinct YUV channels among 0, 1, 2")

    def block(self, size: int) -> tuple[int, list[int]]:
        """The block side for ``size``-pixel images and the positions scaled to it."""
        b = min(self.window, size)
        if size % b:
            raise BenchError(f"ctrl.window={self.window} does not tile {size}x{size} images; allowed: a divisor of {size}, "
                             f"or at least {size}")
        return b, [max(0, (p + 1) * b // self.window - 1) for p in self.positions]

    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        if channels not in (1, 3):
            raise BenchError(f"ctrl: images with {channels} channels are not supported; allowed: 1 (grayscale) or 3 (RGB)")
        b, pos = self.block(size)
        coef = torch.zeros(channels, b, b, dtype=torch.float64)
        carriers = list(self.channels) if channels == 3 else [0]
        for p in pos:
            coef[carriers, p, p] += self.magnitude
        delta = block_idct(coef.repeat(1, size // b, size // b), b)  # the same bump in every block
        if channels == 3:
            delta = torch.einsum("ij,jhw->ihw", torch.tensor(YUV_TO_RGB, dtype=torch.float64), delta)
        self.state["pattern"] = delta.to(torch.float32).contiguous()

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.state["pattern"]
        if tuple(x.shape[-3:]) != tuple(pattern.shape):
            raise BenchError(f"ctrl: images of shape {tuple(x.shape[-3:])} do not match the pattern {tuple(pattern.shape)}")
        out = x.float() + pattern.to(x.device)
        return out.round_().clamp_(0, 255).to(torch.uint8)
