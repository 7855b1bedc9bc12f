"""The detector interface and the ``DETECTORS`` registry.

A detector answers a question about a model instead of repairing it. It is a frozen
dataclass of hyperparameters (paper or official-code defaults, as a defense) called as
``detector(model, clean, ctx) -> Detection``, and it receives what a defense receives: the
backdoored model and the clean defense subset (``defenses.base.DefenseContext`` for the
rest). Never the test sets, the trigger, the target label or the poison indices: the
harness (``bench.detect``) holds those and scores the answer afterwards.

Levels (``level``):

- ``"model"``: is this model backdoored, and which label is the backdoor's target?
  ``Detection.label`` is the suspected target (``None``: no label suspected) and
  ``Detection.score`` a number that is larger for a model that looks more backdoored; the
  harness reports whether the label is the attack's target, and the report computes the
  AUROC of the score over backdoored models against the ``clean`` attack's models.

A detector whose settings are those of a defense (RNP's detectors unlearn exactly as the
``rnp`` defense does) names it in ``settings_from``: the grid then gives the detector that
defense's preset fields and ``--set`` overrides first, its own after, so
``--set rnp.clean_threshold=0.3`` changes the defense and its detectors alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from bench.config import Config
from bench.data import ImageSet
from bench.registry import Registry
from defenses.base import DefenseContext

DETECTORS: Registry[type["Detector"]] = Registry("detector", entry_point_group="bdbench.detectors")

Level = Literal["model"]


@dataclass
class Detection:
    """A detector's answer (model level): a suspected label and a backdoor score, with facts."""

    label: int | None
    score: float
    info: dict = field(default_factory=dict)  # JSON-able facts (histograms, norms, ...)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. a recovered trigger, saved as safetensors


@dataclass(frozen=True)
class Detector(Config):
    description: ClassVar[str]
    paper: ClassVar[str]
    level: ClassVar[Level] = "model"
    settings_from: ClassVar[str | None] = None  # a defense whose preset fields and --set overrides come first

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> Detection:
        raise NotImplementedError
