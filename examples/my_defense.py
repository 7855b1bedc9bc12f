"""An example plugin: a defense in one file, usable at once with --plugin (no packaging).

    bench list defenses --plugin examples/my_defense.py
    bench check --plugin examples/my_defense.py
    bench run --plugin examples/my_defense.py --attack badnets --defense shrink --preset demo

"Shrink" is a toy, not a published defense: it scales the classifier head's weights towards their
mean by ``alpha`` and fine-tunes nothing. Replace its body with your method; keep the signature.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult


@DEFENSES.register("shrink")
@dataclass(frozen=True)
class Shrink(Defense):
    description: ClassVar[str] = "example plugin: shrink the last linear layer's weights towards their mean"
    paper: ClassVar[str] = "none (an example of a plugin file)"

    alpha: float = param(0.5, low=0.0, high=1.0, doc="how far each weight moves towards the layer's mean")

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = copy.deepcopy(model).to(ctx.device)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            head.weight.mul_(1 - self.alpha).add_(self.alpha * head.weight.mean())
        return DefenseResult(model.eval(), {"alpha": self.alpha, "defense_images": len(clean)})
