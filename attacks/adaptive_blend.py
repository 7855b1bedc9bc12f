"""Adaptive-Blend: a blended image trigger, half of its pieces masked per poisoned image, plus cover images.

Paper: Qi, Xie, Li, Mahloujifar and Mittal, "Revisiting the Assumption of Latent Separability
for Backdoor Defenses", ICLR 2023 (the "adaptive" attacks against latent-separation defenses).
Official code: vtu81/backdoor-toolbox (``poison_tool_box/adaptive_blend.py``,
``create_poisoned_set.py``, ``config.py``, ``README.md``), the maintained successor of the paper's
Unispac/Circumventing-Backdoor-Defenses (same ``adaptive_blend.py``); every step below follows it.

Training set (``adaptive_blend.poison_generator``): the trigger image is cut into a grid of
``pieces`` (a perfect square) equal squares; for every poisoned image a random
``round(mask_rate * pieces)`` of them are masked out (``get_trigger_mask``), and the rest is
blended in, ``x' = x + alpha * m * (t - x)``, i.e. ``(1 - alpha) x + alpha t`` where the mask
``m`` is 1 and ``x`` where it is 0. Poisoned images are relabelled to the target. "Cover" images
(a non-overlapping random set) get the same partial trigger, drawn independently, and keep their
true labels. Test set (``adaptive_blend.poison_transform``): the full trigger at ``test_alpha``,
``x + test_alpha (t - x)``. Here blending runs on float copies of the uint8 images and is rounded
back to uint8; masks are drawn from the run seed given to ``poison`` (official: Python's global
``random``).

Recording: ``poison`` returns a :class:`CoveredSet`, whose ``poison_idx`` holds only the
relabelled poisoned images and whose ``cover_idx`` the cover images; ``cover_idx`` is also written
to ``state["cover_idx"]`` so that the grid stores it with the attack's state (the official
generator returns poison and cover indices separately too, and its cleansers score only the
poison indices).

Defaults:

- ``alpha = 0.15`` (training), ``test_alpha = 0.2``, ``poison_rate = 0.003``, ``cover_rate = 0.003``:
  the README's CIFAR-10 and GTSRB commands (``-poison_type adaptive_blend -poison_rate 0.003
  -cover_rate 0.003 -alpha 0.15 -test_alpha 0.2``). The generator's own signature defaults
  (``alpha=0.2``, ``cover_rate=0.01``) are not what the README runs; the paper repository's README
  runs the same rates with the parser's ``alpha`` 0.2 for training and test alike.
- ``pieces = 16``, ``mask_rate = 0.5``: ``create_poisoned_set.py`` (``pieces=16, mask_rate=0.5``).
- Target 0, all-to-one: ``config.target_class['cifar10'] = 0`` (GTSRB uses 2 there; 0 here for
  every dataset, as for the other attacks). Measured with the official GTSRB target (quick
  preset, ``--set adaptive_blend.target=2``, seeds 0 / 1 / 2, 2026-12-04, same machine as below):
  CA / ASR 97.5 / 26.0, 96.7 / 18.7, 97.1 / 15.5, no better than target 0 (17.8 / 18.9 / 23.4);
  with the cartoon as well (the closest we get to the official GTSRB setting), seed 0: 97.3 / 36.1.

Departures:

- The trigger image. The paper and the code blend a cartoon (``triggers/hellokitty_32.png``),
  which is not shipped here. Instead the trigger is the natural photograph that matplotlib (a
  dependency) ships as sample data, ``grace_hopper.jpg`` (600x512 RGB): centre-cropped to a
  square, resized with antialiased bilinear ``F.interpolate`` to the dataset's size, and turned
  into grayscale by the channel mean for one-channel datasets. It is built in ``prepare`` and kept
  in ``state``, so a stored run does not depend on the JPEG decoder. ``image=cartoon`` takes
  matplotlib's other picture instead, the clip-art ``Minduka_Present_Blue_Pack.png`` (128x128
  RGBA, a blue gift box), composited on white: a cartoon with flat colours on a light background,
  closer in kind to the paper's. Measured (quick preset, GTSRB, target 0, seeds 0 / 1 / 2,
  2026-12-04, 2-core EPYC with native bf16): CA / ASR 96.5 / 22.2, 96.6 / 11.6, 97.1 / 51.3 with
  the cartoon against 96.7 / 17.8, 97.1 / 18.9, 96.6 / 23.4 with the photograph (seed 0's rerun
  on that machine gave the same 96.7 / 17.8). Higher on two seeds, lower on one, short of 60 % at
  seed 0 either way: the picture is not what holds the attack back at 4 epochs, so the default
  stays the photograph and every number measured on it stays valid.
- Which images: the official code draws the poisoned images from the whole training set (so some
  target-class images are "relabelled" to their own class) and takes ``int(rate * N)``; here, as
  for every attack of the bench, all-to-one poisons ``round(poison_rate * N)`` non-target images
  (``poison_candidates``). The code draws the cover images from the rest of the whole set too;
  here all-to-one takes them from the remaining non-target images, as the paper's abstract
  describes them (trigger-planted images that keep their own, non-target, labels): a
  target-class cover would be one more trigger-and-target-label image outside ``poison_idx``.
  All-to-all (not in the official code) relabels ``y -> (y + 1) % K`` and covers any class.
- Piece edges: the official code asserts that the image size is divisible by ``sqrt(pieces)``;
  here piece ``i`` of a row spans pixels ``[i * H // n, (i + 1) * H // n)``, equal squares in that
  case (CIFAR 32 and MNIST 28 with 16 pieces) and near-equal otherwise.

Measured (quick preset, GTSRB, ResNet-18 width 16, seed 0, target 0; the clean model of the 4-epoch
recipe has CA 97.2 %): 4 epochs: CA 96.7, ASR 17.8 (RA 67.8); 12 epochs (``--set
train.epochs=12``): CA 98.1, ASR 59.5, the paper-rate attack's 60 % goal within a point. At 0.3 %
the 118 poisoned and 118 cover images of GTSRB are seen only 4 times in 4 epochs. A uniform-noise
trigger image (blend's key) in place of the photograph did worse: CA 97.2, ASR 2.8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from attacks.base import ATTACKS, Attack, PoisonedSet
from bench.config import param
from bench.data import ImageSet
from bench.official import ours, table
from bench.registry import BenchError

# matplotlib's mpl-data/sample_data files the trigger may be made of (see the module docstring)
SAMPLE_IMAGES = {"photo": "grace_hopper.jpg", "cartoon": "Minduka_Present_Blue_Pack.png"}


def sample_image(channels: int, size: int, name: str = "photo") -> torch.Tensor:
    """matplotlib's sample image ``SAMPLE_IMAGES[name]`` as uint8 ``[channels, size, size]`` (see the module docstring)."""
    file = SAMPLE_IMAGES[name]
    try:
        from matplotlib import cbook, image

        arr = image.imread(cbook.get_sample_data(file, asfileobj=False))
    except (ImportError, OSError, ValueError) as exc:
        raise BenchError(f"adaptive_blend: cannot read matplotlib's sample image {file}: {exc}") from None
    img = torch.tensor(arr).permute(2, 0, 1).float()  # [C, H, W] (a copy: imread may give a read-only array)
    if arr.dtype.kind == "f":  # PNGs are read as floats in [0, 1], JPEGs as uint8
        img = img * 255
    if img.shape[0] == 4:  # RGBA: composite on a white background
        alpha = img[3:] / 255
        img = img[:3] * alpha + 255 * (1 - alpha)
    img = img[:3]
    h, w = img.shape[1:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side][None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if channels == 1:
        img = img.mean(0, keepdim=True)
    elif channels != 3:
        raise BenchError(f"adaptive_blend: images with {channels} channels are not supported; allowed: 1, 3")
    return img.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class CoveredSet(PoisonedSet):
    """A poisoned set with cover images: triggered (partially) but with their true labels."""

    cover_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


@ATTACKS.register("adaptive_blend")
@dataclass(frozen=True)
class AdaptiveBlend(Attack):
    description: ClassVar[str] = ("photo blended at alpha 0.15 with half of its 16 pieces masked per image, "
                                  "0.3% poison + 0.3% cover images; full trigger at alpha 0.2 at test time")
    paper: ClassVar[str] = ("Qi et al., Revisiting the Assumption of Latent Separability for Backdoor Defenses, "
                            "ICLR 2023")

    poison_rate: float = param(0.003, low=0.0, high=1.0, doc="fraction of the training set poisoned (official: 0.003)")
    cover_rate: float = param(0.003, low=0.0, high=1.0, doc="fraction of cover images: trigger, true label (official: 0.003)")
    alpha: float = param(0.15, low=0.0, high=1.0, doc="blend weight of the trigger in training images (official: 0.15)")
    test_alpha: float = param(0.2, low=0.0, high=1.0, doc="blend weight of the full trigger at test time (official: 0.2)")
    pieces: int = param(16, low=1, doc="pieces the trigger is cut into, a perfect square (official: 16)")
    mask_rate: float = param(0.5, low=0.0, high=1.0, doc="share of the pieces masked out per training image (official: 0.5)")
    image: Literal["photo", "cartoon"] = param("photo", doc="trigger image, from matplotlib's sample data: photo = "
                                               "grace_hopper.jpg, cartoon = Minduka_Present_Blue_Pack.png on white "
                                               "(official: a cartoon, hellokitty_32.png, not shipped)")

    official: ClassVar[dict] = table(
        target=(0, "vtu81/backdoor-toolbox config.py: target_class['cifar10'] 0 (GTSRB: 2)"),
        poison_rate=(0.003, "vtu81/backdoor-toolbox README.md, CIFAR-10 and GTSRB commands: -poison_rate 0.003"),
        label_mode=("all2one", "vtu81/backdoor-toolbox poison_tool_box/adaptive_blend.py: poisoned images get target_class"),
        cover_rate=(0.003, "vtu81/backdoor-toolbox README.md, CIFAR-10 and GTSRB commands: -cover_rate 0.003"),
        alpha=(0.15, "vtu81/backdoor-toolbox README.md, CIFAR-10 and GTSRB commands: -alpha 0.15"),
        test_alpha=(0.2, "vtu81/backdoor-toolbox README.md, CIFAR-10 commands: -test_alpha 0.2"),
        pieces=(16, "vtu81/backdoor-toolbox create_poisoned_set.py: adaptive_blend.poison_generator(pieces=16)"),
        mask_rate=(0.5, "vtu81/backdoor-toolbox create_poisoned_set.py: adaptive_blend.poison_generator(mask_rate=0.5)"),
        image=ours("official config.py: triggers/hellokitty_32.png, which is not shipped here; neither choice (matplotlib's "
                   "sample images) is it, so the field has no official value it can take"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if math.isqrt(self.pieces) ** 2 != self.pieces:
            raise BenchError(f"adaptive_blend.pieces={self.pieces} is not a perfect square; allowed: 1, 4, 9, 16, 25, ...")
        if self.poison_rate + self.cover_rate > 1 + 1e-9:
            raise BenchError(f"adaptive_blend.poison_rate + cover_rate = {self.poison_rate + self.cover_rate:g} exceeds 1; "
                             f"poisoned and cover images do not overlap")

    @property
    def masked_pieces(self) -> int:
        return round(self.mask_rate * self.pieces)

    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        if math.isqrt(self.pieces) > size:
            raise BenchError(f"adaptive_blend.pieces={self.pieces} is more than one piece per pixel of a {size}x{size} "
                             f"image; allowed: perfect squares up to {size * size}")
        self.state["pattern"] = sample_image(channels, size, self.image)

    def _pattern(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.state["pattern"]
        if tuple(x.shape[-3:]) != tuple(pattern.shape):
            raise BenchError(f"adaptive_blend: images of shape {tuple(x.shape[-3:])} do not match the trigger "
                             f"{tuple(pattern.shape)}")
        return pattern.to(x.device, torch.float32)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: the full pattern at ``test_alpha``."""
        out = (1 - self.test_alpha) * x.float() + self.test_alpha * self._pattern(x)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def piece_map(self, size: int) -> torch.Tensor:
        """``[size, size]`` long: the piece (row-major, 0..pieces-1) each pixel belongs to."""
        n = math.isqrt(self.pieces)
        edges = torch.arange(n + 1) * size // n
        band = torch.repeat_interleave(torch.arange(n), edges.diff())  # piece row (or column) of each pixel
        return band[:, None] * n + band[None, :]

    def piece_masks(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """``[count, pieces]`` bool, True where the piece keeps the trigger; ``masked_pieces`` False per row."""
        order = torch.rand(count, self.pieces, generator=gen).argsort(1)
        keep = torch.ones(count, self.pieces, dtype=torch.bool)
        keep.scatter_(1, order[:, :self.masked_pieces], False)
        return keep

    def train_trigger(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The training-time trigger: the pattern at ``alpha`` on the kept pieces (``keep``: ``[B, pieces]``)."""
        m = keep.to(x.device)[:, self.piece_map(x.shape[-1]).to(x.device)][:, None].float()  # [B, 1, H, W]
        out = x.float() + self.alpha * m * (self._pattern(x) - x.float())
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def poison(self, train: ImageSet, seed: int) -> CoveredSet:
        n = len(train)
        gen = torch.Generator().manual_seed(seed)
        pool = self.poison_candidates(train)
        count = min(len(pool), int(round(self.poison_rate * n)))
        idx = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
        free = torch.zeros(n, dtype=torch.bool)
        free[pool] = True  # all-to-one: covers are non-target images too (see the module docstring)
        free[idx] = False
        rest = free.nonzero().flatten()
        covers = min(len(rest), int(round(self.cover_rate * n)))
        cover = rest[torch.randperm(len(rest), generator=gen)[:covers]].sort().values
        keep = self.piece_masks(count + covers, gen)
        x, y = train.x.clone(), train.y.clone()
        if count:
            x[idx] = self.train_trigger(train.x[idx], keep[:count])
            y[idx] = self.target_labels(train.y[idx])
        if covers:
            x[cover] = self.train_trigger(train.x[cover], keep[count:])
        self.state["cover_idx"] = cover
        return CoveredSet(ImageSet(x, y), idx, cover)
