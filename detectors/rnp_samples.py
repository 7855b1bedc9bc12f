"""RNP's backdoor sample detection (sample level).

Paper: Yige Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023,
arXiv:2305.14876: the unlearned model at RNP's intermediate step serves backdoor sample
detection. Unlearning (``defenses.rnp.RNP.unlearned``, the ``rnp`` defense's settings) destroys
the clean features the defense data relies on but leaves the backdoor's shortcut in place, so
the unlearned model still sends triggered images to the target while it has lost the clean ones.

Score, one per image (larger = more likely poisoned), by ``signal``, as a logit margin
``z_c - max_{j != c} z_j`` of the unlearned model for a label ``c`` (a probability saturates at 1
for many images and then ties; the margin keeps ranking them):
- ``"unlearned"`` (default): ``c`` = the image's given label. A poisoned training image is
  labelled with the target (dirty-label) and carries the trigger, which the unlearned model still
  follows; a clean image's own label is what unlearning removed. On inputs without labels (the
  test-time mix) the backdoored model's prediction stands in for the given label.
- ``"target"``: ``c`` = the unlearned model's most predicted label on the defense data
  (``rnp_label``'s label), whatever the given label: the only candidate for clean-label attacks,
  whose poisoned images keep their true label.
Which one the tables use was chosen by measurement (README, detection section).

Settings: the ``rnp`` defense's fields, defaults and table of official values, as ``rnp_label``.

``info``: the unlearning facts as ``rnp_label`` records them, and ``signal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from bench.official import extend, ours
from bench.registry import BenchError
from defenses.base import DefenseContext
from defenses.rnp import RNP
from detectors.base import DETECTORS, Detection, Detector, features, input_labels
from detectors.rnp_label import unlearned_label


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z[i, labels[i]] - max_{j != labels[i]} z[i, j]`` per row."""
    own = logits.gather(1, labels[:, None]).flatten()
    others = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return own - others


@DETECTORS.register("rnp_samples")
@dataclass(frozen=True)
class RNPSamples(RNP, Detector):
    name = "rnp_samples"  # explicit: the inherited RNP class already carries the name "rnp"
    description: ClassVar[str] = "RNP backdoor samples: the unlearned model's confidence in each image's label"
    paper: ClassVar[str] = "Li et al., Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023, arXiv:2305.14876"
    level: ClassVar[str] = "sample"
    settings_from: ClassVar[str | None] = "rnp"

    signal: Literal["unlearned", "target"] = param("unlearned", doc="score: unlearned model's logit margin of the given label, or of its most predicted label")

    official: ClassVar[dict] = extend(
        RNP.official,
        signal=ours("the paper only says the unlearned model serves sample detection and bboylyg/RNP has no "
                    "detection code: the score is ours (module docstring)"),
    )

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, inputs: ImageSet | None = None) -> Detection:
        if inputs is None:
            raise BenchError("rnp_samples is a sample-level detector: it needs the images to score")
        given = None
        if self.signal == "unlearned" and not inputs.labelled:  # the test-time mix: the backdoored model's labels
            given = input_labels(inputs, features(model.to(ctx.device), inputs.x, device=ctx.device, bf16=ctx.bf16)[1])
        unlearned, label, info = unlearned_label(self, model, clean, ctx)
        _, logits = features(unlearned, inputs.x, device=ctx.device, bf16=ctx.bf16)
        if self.signal == "target":
            col = torch.full((len(logits),), label, dtype=torch.long)
        else:
            col = inputs.y.cpu() if given is None else given
        return Detection(scores=logit_margin(logits, col), info={**info, "signal": self.signal, "unlearn_label": label})
