"""BadNets: a small fixed patch in the bottom-right corner.

Paper: Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", arXiv:1708.06733, 2017.

Where the defaults come from:

- The patch is the ``gridTrigger`` of the official RNP code (bboylyg/RNP,
  ``data/poison_tool_cifar.py``, ``DatasetBD._gridTriger``), the trigger RNP's
  ``train_backdoor.py`` uses by default (``--trigger_type gridTrigger``, ``--trig_w 3``,
  ``--trig_h 3``). That code writes into the HWC image ``img[row][col] = v`` (all channels
  of the pixel at once) for the last three rows and columns; read with the top-left of
  the patch first, the 3x3 values are::

      row H-3:   0    0  255
      row H-2:   0  255    0
      row H-1: 255    0  255

  i.e. a 255/0 checkerboard whose top-left cell is 0 instead of 255 (the official
  pattern, kept as is). It touches the image corner: ``_gridTriger`` ignores the
  ``distance`` argument, so the margin is 0. The same code paints every channel, so a
  grayscale (MNIST) image gets the same values in its single channel.
- Target 0, all-to-one, poison rate 0.1: RNP's ``--target_label 0``, ``--target_type
  all2one``, ``--inject_portion 0.1`` (the base-class defaults). RNP's all-to-all label map
  is ``(y + 1) % 10``; ``label_mode="all2all"`` gives ``(y + 1) % K``.

No code of the paper's authors is known here, so the table of official values (``official``) cites BackdoorBench
(SCLBD/BackdoorBench, commit f02e353), whose BadNets agrees on every field: target 0, all-to-one,
rate 0.1, and a 3x3 patch touching the bottom-right corner (``resource/badnet/trigger_image.png``,
a white square there; the pattern itself differs and is not a field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attacks.base import ATTACKS, Attack
from bench.config import param
from bench.data import ImageSet
from bench.official import table
from bench.registry import BenchError
from attacks.common import GRID_TRIGGER

# The official RNP gridTrigger, rows top to bottom, columns left to right (see above).



@ATTACKS.register("badnets")
@dataclass(frozen=True)
class BadNets(Attack):
    description: ClassVar[str] = "3x3 black-and-white patch at the bottom-right corner (RNP's gridTrigger)"
    paper: ClassVar[str] = ("Gu et al., BadNets: Identifying Vulnerabilities in the Machine Learning Model "
                            "Supply Chain, arXiv:1708.06733, 2017")

    margin: int = param(0, low=0, doc="pixels between the patch and the bottom/right edges (0 in RNP's code)")

    official: ClassVar[dict] = table(
        target=(0, "BackdoorBench config/attack/badnet/default.yaml: attack_target 0 "
                   "(RNP train_backdoor.py: --target_label 0)"),
        poison_rate=(0.1, "BackdoorBench config/attack/badnet/default.yaml: pratio 0.1 (RNP: --inject_portion 0.1)"),
        label_mode=("all2one", "BackdoorBench config/attack/badnet/default.yaml: attack_label_trans all2one "
                               "(RNP: --target_type all2one)"),
        margin=(0, "BackdoorBench resource/badnet/trigger_image.png: the 3x3 patch touches the corner (RNP "
                   "data/poison_tool_cifar.py _gridTriger: the last three rows and columns)"),
    )

    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int) -> None:
        super().prepare(num_classes, channels, size, train, seed)
        patch = torch.tensor(GRID_TRIGGER, dtype=torch.uint8)
        if self.margin + patch.shape[0] > size:
            raise BenchError(f"badnets.margin={self.margin} puts the {patch.shape[0]}x{patch.shape[1]} patch outside a "
                             f"{size}x{size} image; allowed: [0, {size - patch.shape[0]}]")
        self.state["patch"] = patch

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.state["patch"].to(x.device)
        ph, pw = patch.shape
        h, w = x.shape[-2:]
        r1, c1 = h - self.margin, w - self.margin
        out = x.clone()
        out[..., r1 - ph:r1, c1 - pw:c1] = patch  # broadcast over batch and channels
        return out
