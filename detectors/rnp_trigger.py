"""RNP's trigger recovery (model level): a (mask, pattern) trigger for the detected label.

Paper: Yige Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023,
arXiv:2305.14876: the unlearned model at RNP's intermediate step serves trigger recovery. The
unlearned model has lost its clean features but kept the backdoor, so a trigger search against
it meets less resistance from the clean evidence in each image than against the backdoored model.

Procedure:
1. Unlearn as the ``rnp`` defense does (``defenses.rnp.RNP.unlearned``, its settings; the
   grid gives this detector the ``rnp`` preset fields and ``--set rnp.*`` first) and take
   ``rnp_label``'s label: the label the unlearned model predicts most on the defense data.
2. Reverse-engineer one trigger for that label only with the project's one trigger optimiser
   (``defenses.trigger.reverse_triggers``, Neural Cleanse's, with this detector's
   ``TriggerSearch`` fields), against the unlearned model ("guided by the unlearned model").
3. For comparison, the same optimiser, same label, same budget and seed, against the backdoored
   model alone (``baseline`` tensors).

The answer is the label and, as its score, the unlearning speed (``rnp_label``'s default
score); the harness scores both recovered triggers against the truth:
their ASR on the backdoored model (clean test images of other labels, stamped) and, for a patch
trigger, the IoU of the mask's top pixels with the pixels the true trigger touches
(``bench.detect.trigger_scores``). ``tensors``: ``mask``/``pattern`` (guided by the unlearned model)
and ``baseline_mask``/``baseline_pattern`` (the backdoored model alone), for the report's picture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from defenses.base import DefenseContext
from defenses.rnp import RNP
from defenses.trigger import TriggerSearch, reverse_triggers
from detectors.base import DETECTORS, Detection, Detector
from detectors.rnp_label import unlearned_label


@DETECTORS.register("rnp_trigger")
@dataclass(frozen=True)
class RNPTrigger(RNP, TriggerSearch, Detector):
    name = "rnp_trigger"  # explicit: the inherited RNP class already carries the name "rnp"
    description: ClassVar[str] = "RNP trigger recovery: NC's optimiser on the unlearned model, for the detected label only"
    paper: ClassVar[str] = "Li et al., Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023, arXiv:2305.14876"
    level: ClassVar[str] = "model"
    settings_from: ClassVar[str | None] = "rnp"

    # RNP and the trigger search both name a field batch_size; here it is RNP's (unlearning, 128), and
    # the search's own (official NC 32) is this one.
    trigger_batch_size: int = param(32, low=1, doc="clean images per trigger-search mini-batch (official NC 32)")

    def search(self, model: nn.Module, data: ImageSet, label: int, ctx: DefenseContext):
        names = {f.name for f in dataclasses.fields(TriggerSearch)} - {"batch_size"}
        search = TriggerSearch(**{n: getattr(self, n) for n in names}, batch_size=self.trigger_batch_size)
        gen = torch.Generator().manual_seed(ctx.seed)
        return reverse_triggers(model, data, [label], search, gen=gen, device=ctx.device, bf16=ctx.bf16)

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> Detection:
        unlearned, label, info = unlearned_label(self, model, clean, ctx)
        data = clean.to(ctx.device)
        guided = self.search(unlearned.eval(), data, label, ctx)
        alone = self.search(model.to(ctx.device).eval(), data, label, ctx)
        info = {**info, "norm": round(float(guided.norms[0]), 3), "baseline_norm": round(float(alone.norms[0]), 3),
                "reached": bool(guided.reached[0]), "baseline_reached": bool(alone.reached[0]),
                "trigger_steps": guided.steps}
        tensors = {"mask": guided.masks[0], "pattern": guided.patterns[0],
                   "baseline_mask": alone.masks[0], "baseline_pattern": alone.patterns[0]}
        return Detection(label=label, score=info["speed"], info=info, tensors=tensors)
