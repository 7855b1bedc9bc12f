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
- ``"sample"``: which of these labelled images are poisoned? The detector is also called with
  ``inputs``: the images the model was trained on, with the labels it was trained on and
  without any poison mark (for an attack that poisons batches on the fly and stores no image,
  a test-time mix of clean and triggered images, see ``bench.detect``, which carries no labels:
  ``inputs.labelled`` is False and ``input_labels`` gives the model's predictions instead).
  ``Detection.scores`` holds one number per input, larger = more likely poisoned.
- ``"input"``: is this input triggered? As ``"sample"``, always on the unlabelled test-time mix.

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

Level = Literal["model", "sample", "input"]


@dataclass
class Detection:
    """A detector's answer: a suspected label and a backdoor score (model level), or a score per input."""

    label: int | None = None
    score: float | None = None
    scores: torch.Tensor | None = None  # sample and input level: one per input, larger = more likely poisoned
    info: dict = field(default_factory=dict)  # JSON-able facts (histograms, norms, ...)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. a recovered trigger, saved as safetensors


@dataclass(frozen=True)
class Detector(Config):
    description: ClassVar[str]
    paper: ClassVar[str]
    level: ClassVar[Level] = "model"
    settings_from: ClassVar[str | None] = None  # a defense whose preset fields and --set overrides come first
    official: ClassVar[dict] = {}  # each field's official value and source (bench.official.table)

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, inputs: ImageSet | None = None) -> Detection:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise ``BenchError`` if a setting names something ``model`` lacks (as ``Defense.check``)."""


def input_labels(inputs: ImageSet, logits: torch.Tensor) -> torch.Tensor:
    """The label of each input a detector may group or score by: the given one, or, where the inputs carry
    none (the test-time mix: at test time nobody knows an input's label), the model's prediction
    (``logits``: the model's, for ``inputs``)."""
    return inputs.y.cpu() if inputs.labelled else logits.argmax(1).cpu()


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu", bf16: bool = True,
             batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of uint8 images ``x``, float32 on the CPU, model in eval mode.

    The features are the input of the model's last ``nn.Linear`` (after global pooling in every
    model here), read by a forward hook, so any classifier with a linear head works.
    """
    from bench.registry import BenchError
    from bench.train import autocast, to_input

    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise BenchError("this detector needs a model whose last layer is an nn.Linear (its input is the feature vector)")
    grabbed: list[torch.Tensor] = []
    hook = heads[-1].register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].flatten(1).float().cpu()))
    was_training = model.training
    model.eval()
    logits = []
    try:
        for i in range(0, len(x), batch_size):
            with autocast(torch.device(device), bf16):
                logits.append(model(to_input(x[i:i + batch_size].to(device))).float().cpu())
    finally:
        hook.remove()
        model.train(was_training)
    if not logits:
        return torch.zeros(0, heads[-1].in_features), torch.zeros(0, heads[-1].out_features)
    return torch.cat(grabbed), torch.cat(logits)
