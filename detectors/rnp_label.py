"""RNP's backdoor label detection (model level).

Paper: Yige Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023,
arXiv:2305.14876 (the abstract: the unlearned model at RNP's intermediate step serves backdoor
label detection). Procedure (the paper's Algorithm 1, as issue 8 states it): unlearn the model
on the clean defense data exactly as the RNP defense does (``defenses.rnp.RNP.unlearned``, the
same settings, the same stop), then predict the defense data with the unlearned model; the
backdoor label is the label it predicts most often. Unlearning pushes clean images away from
their labels, and a backdoored model has a ready-made exit: the target label.

The backdoor score (ours; the paper detects the label, not whether there is a backdoor): the
share of the defense images that the unlearned model assigns to that label, in [1/K, 1].
A clean model that is unlearned scatters its errors over many labels; a backdoored one sends
most of them to the target. Measured beside the alternatives it is chosen over: see the README
(detection table).

Settings: the ``rnp`` defense's fields and defaults (this class inherits them), and the grid
gives it the ``rnp`` preset fields and ``--set rnp.*`` first (``settings_from``), so the
detector unlearns as the removal run beside it does. Only stage 1 runs: no recovering, no
pruning. With ``select=auto`` the held-out share is set aside as in the defense, so the
unlearned model is the defense's own.

``info``: ``predictions`` (the label histogram at every stop check), ``unlearn_steps``,
``unlearn_acc``, ``unlearn_reached``, ``top_share`` (the score) and ``entropy`` (normalised
entropy of the final histogram, in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.data import ImageSet
from defenses.base import DefenseContext
from defenses.rnp import RNP
from detectors.base import DETECTORS, Detection, Detector


def histogram_facts(hist: list[int]) -> dict:
    """Top label, its share, and the normalised entropy of a label histogram."""
    h = torch.tensor(hist, dtype=torch.float64)
    n = float(h.sum())
    p = h / n if n > 0 else h
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum()) / math.log(len(h)) if len(h) > 1 else 0.0
    return {"label": int(h.argmax()), "top_share": float(p.max()) if n > 0 else 0.0, "entropy": entropy}


@DETECTORS.register("rnp_label")
@dataclass(frozen=True)
class RNPLabel(RNP, Detector):
    name = "rnp_label"  # explicit: the inherited RNP class already carries the name "rnp"
    description: ClassVar[str] = "RNP backdoor label: the label the unlearned model predicts most; score = its share"
    paper: ClassVar[str] = "Li et al., Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023, arXiv:2305.14876"
    level: ClassVar[str] = "model"
    settings_from: ClassVar[str | None] = "rnp"

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> Detection:
        _, label, info = unlearned_label(self, model, clean, ctx)
        return Detection(label=label, score=info["top_share"], info=info)


def unlearned_label(rnp: RNP, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> tuple[nn.Module, int, dict]:
    """RNP's stage 1 as the defense runs it, and what RNP's detectors read off it: (the unlearned
    model, the label it predicts most on the defense data, facts for the record)."""
    unlearned, un, *_ = rnp.unlearned(model, clean, ctx)
    facts = histogram_facts(un["predictions"][-1])
    info = {"predictions": un["predictions"], "unlearn_steps": un["steps"], "unlearn_acc": un["acc"],
            "unlearn_reached": un["reached"], "top_share": facts["top_share"], "entropy": facts["entropy"]}
    return unlearned, facts["label"], info
