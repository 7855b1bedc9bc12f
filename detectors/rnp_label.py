"""RNP's backdoor label detection (model level).

Paper: Yige Li et al., "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023,
arXiv:2305.14876 (the abstract: the unlearned model at RNP's intermediate step serves backdoor
label detection). Procedure (the paper's Algorithm 1): unlearn the model
on the clean defense data exactly as the RNP defense does (``defenses.rnp.RNP.unlearned``, the
same settings, the same stop), then predict the defense data with the unlearned model; the
backdoor label is the label it predicts most often. Unlearning pushes clean images away from
their labels, and a backdoored model has a ready-made exit: the target label.

The backdoor score (ours: the paper detects the label, not whether there is a backdoor) is the
speed of the unlearning, ``1 - steps / budget``: how early in its step budget (``unlearn_epochs``
x batches per epoch) the unlearning brought the defense data's accuracy down to
``clean_threshold``; 0 when it never did. A backdoor gives gradient ascent a ready-made exit (send
every image to the target), so a backdoored model collapses in a few steps; a clean model has to
be broken feature by feature. ``backdoor_score=share`` gives the score we tried first instead:
the share of the defense images that the unlearned model assigns to the detected label (the
concentration of the last histogram), in [1/K, 1].

Why speed (the quick preset's GTSRB models; chosen on seeds 0-1, then checked on seed 2; the
README's detection section has the table): a clean model's unlearning can end in a sink label
too (seed 1's clean model: 65 % of the images on label 18, more than the Blend and BPP models'
47-52 %), so the share does not separate (AUROC 0.55 on seeds 0-1's implanted models); the two
clean models needed 56 of 60 steps or never reached the threshold, the implanted models 9-54.
Over seeds 0-2 (36 models): AUROC 0.97 on implanted models against 0.73 for the share; slow
clean-label models (SIG seed 2 never reached the threshold) are the misses.

Settings: the ``rnp`` defense's fields, defaults and table of official values (this class
inherits them; the official code has no detection, so nothing differs for it), and the grid
gives it the ``rnp`` preset fields and ``--set rnp.*`` first (``settings_from``), so the
detector unlearns as the removal run beside it does. Only stage 1 runs: no recovering, no
pruning. With ``select=auto`` the held-out share is set aside as in the defense, so the
unlearned model is the defense's own.

``info``: ``predictions`` (the label histogram at every stop check), ``unlearn_steps``,
``unlearn_budget``, ``unlearn_acc``, ``unlearn_reached``, ``speed``, ``top_share`` (the two scores)
and ``entropy`` (normalised entropy of the final histogram, in [0, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from bench.official import extend, ours
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


def unlearning_speed(steps: int, budget: int, reached: bool) -> float:
    """``1 - steps / budget`` if the unlearning reached its threshold, else 0: in [0, 1), larger = faster."""
    return max(0.0, 1.0 - steps / budget) if reached and budget > 0 else 0.0


@DETECTORS.register("rnp_label")
@dataclass(frozen=True)
class RNPLabel(RNP, Detector):
    name = "rnp_label"  # explicit: the inherited RNP class already carries the name "rnp"
    description: ClassVar[str] = "RNP backdoor label: the label the unlearned model predicts most; score = unlearning speed"
    paper: ClassVar[str] = "Li et al., Reconstructive Neuron Pruning for Backdoor Defense, ICML 2023, arXiv:2305.14876"
    level: ClassVar[str] = "model"
    settings_from: ClassVar[str | None] = "rnp"

    backdoor_score: Literal["speed", "share"] = param(
        "speed", doc="is-it-backdoored score: unlearning speed (1 - steps/budget), or the detected label's share (ours)")

    official: ClassVar[dict] = extend(
        RNP.official,
        backdoor_score=ours("the paper detects the label only and bboylyg/RNP has no detection code: "
                            "a score of whether the model is backdoored is ours (module docstring)"),
    )

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> Detection:
        _, label, info = unlearned_label(self, model, clean, ctx)
        return Detection(label=label, score=info["speed" if self.backdoor_score == "speed" else "top_share"], info=info)


def unlearned_label(rnp: RNP, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> tuple[nn.Module, int, dict]:
    """RNP's stage 1 as the defense runs it, and what RNP's detectors read off it: (the unlearned
    model, the label it predicts most on the defense data, facts for the record)."""
    unlearned, un, *_ = rnp.unlearned(model, clean, ctx)
    facts = histogram_facts(un["predictions"][-1])
    info = {"predictions": un["predictions"], "unlearn_steps": un["steps"], "unlearn_budget": un["budget"],
            "unlearn_acc": un["acc"], "unlearn_reached": un["reached"],
            "speed": unlearning_speed(un["steps"], un["budget"], un["reached"]),
            "top_share": facts["top_share"], "entropy": facts["entropy"]}
    return unlearned, facts["label"], info
