"""No defense: the backdoored model as it is, the baseline row of every table.

It has no hyperparameters and no paper; ``info`` is empty and there is no sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from bench.data import ImageSet
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult


@DEFENSES.register("none")
@dataclass(frozen=True)
class NoDefense(Defense):
    description: ClassVar[str] = "no defense: the backdoored model unchanged (baseline)"
    paper: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    official: ClassVar[dict] = {}

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        return DefenseResult(model=model, info={})
