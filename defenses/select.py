"""Choosing a pruning threshold from the clean defense data alone (``select=auto``).

One helper for every pruning defense that offers ``select=auto`` (RNP, ANP). A defense
never sees test data, so it cannot pick its operating point the way published sweeps do
(BackdoorBench picks ANP's threshold by test-set ASR). Instead:

1. ``split_holdout``: a seeded ``holdout`` fraction of the defense data is set aside; the
   defense learns its masks on the rest.
2. ``largest_within`` (through ``choose_threshold``, which measures each candidate): the
   candidates (pruning thresholds, in increasing order of how much they prune) are tried in
   order; the chosen one is the largest ``t`` such that, for every candidate up to and including
   ``t``, the pruned model's held-out measure is >= the unpruned model's minus ``max_drop``. If
   even the first candidate fails, the first candidate is used. The search stops at the first
   failure, so later candidates are never evaluated.

The measure (``select_measure`` of RNP and ANP; ``MEASURES``):
- ``"accuracy"`` (the class default): the share of held-out images classified right.
- ``"probability"``: the mean softmax probability of each held-out image's own label, a "soft
  accuracy". The defense data come from the training set, which the model has fit: pruning
  costs those images less accuracy than unseen ones, and 100 held-out images move in whole
  points. The probability moves before the labels flip.

Evidence (the RNP matrix study: 16 GTSRB quick-preset models, BadNets and Blend x target 0 and 2
x poison rate 10 % and 2 % x seeds 0 and 1; every sweep threshold of RNP's masks, test CA on
1,000 test images; 151 (model, threshold) points with a test CA drop under 15 points): the
held-out accuracy drop correlates 0.92 with the test CA drop, the held-out probability drop
0.95. Of the 44 points that cost >= 5 test points, 14 passed the 5-point accuracy bound (their
held-out accuracy fell by as little as 1 point); none had a probability drop under 3.7 points.
Chosen per model, ASR <= 10 % at a CA cost <= 5 points: accuracy with 5 points 8 of 16,
accuracy 2 points 11, probability 5 points 11, probability 3 points 12 (the quick preset's
setting), the fixed 0.2 (per-step stop) 6. 12 is what the best threshold picked on the TEST set
reaches: on the other four models (Blend; three at 2 % poisoning) no threshold of RNP's sweep
does. (The README's table, from bench runs on the whole test set with one thread: 3 and 10 of
16; masks move by a channel with the thread count, and some models sit on the edge.) On the demo
preset (smallcnn, ``recalibrate_bn``) probability with 3 points was worse (it left 27-68 % ASR on BadNets, BPP, SIG and TrojanNN where accuracy with 5 points removed them),
so the class default and the demo stay on accuracy.

Why 0.05 by default (``MAX_ACC_DROP``): with 500 defense images and ``holdout`` 0.2, about
100 images are held out, so one image is 1 point and the binomial standard error of a ~95 %
accuracy is ~2 points; 5 points is ~2 SE: small enough to keep CA, large enough not to stop
on noise. Applied to the official RNP log's test CA it would pick 0.6 (CA -4.0 points, ASR
0.26 %); a 2-point bound would pick 0.3 (ASR 1.7 %). A drop of exactly ``max_drop`` passes
(``TOL``: 95/100 as a float32 reads 0.949999988).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from bench.config import Config, param
from bench.data import ImageSet
from bench.official import ours, table
from bench.registry import BenchError
from bench.train import accuracy, true_class_probability

HOLDOUT = 0.2
MAX_ACC_DROP = 0.05
TOL = 1e-6
# The pruning thresholds RNP's and ANP's official code sweeps (and ``select=auto`` tries), in order.
SWEEP: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(19))  # official: 0..0.9 step 0.05


@dataclass(frozen=True)
class ThresholdSelection(Config):
    """The pruning-threshold settings of a defense with ``select=auto`` (RNP, ANP), declared once."""

    threshold: float = param(0.2, low=0.0, high=1.0, doc="prune channels with mask <= this (select=fixed)")
    select: Literal["fixed", "auto"] = param("fixed", doc="fixed threshold, or chosen on held-out defense data")
    holdout: float = param(HOLDOUT, low=0.0, high=0.9, doc="select=auto: fraction of the defense data held out")
    # 0.05: the evidence is in this module's docstring (MAX_ACC_DROP).
    max_acc_drop: float = param(MAX_ACC_DROP, low=0.0, high=1.0, doc="select=auto: allowed held-out drop of select_measure (a fraction)")
    select_measure: Literal["accuracy", "probability"] = param(
        "accuracy", doc="select=auto: what the drop is measured in: held-out accuracy, or mean probability of the right label")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.select == "auto" and self.holdout <= 0:
            name = getattr(type(self), "name", type(self).__name__)
            raise BenchError(f"{name}.select=auto needs {name}.holdout > 0 (the held-out share of the defense data)")


def selection_official(threshold_source: str) -> dict:
    """The official entries of ``ThresholdSelection``'s fields for a method whose official code prunes at a
    fixed threshold (``threshold_source``: where its 0.2 comes from); select=auto's settings are ours."""
    return table(
        threshold=(0.2, threshold_source),
        select=("fixed", "the official code prunes at a fixed threshold (select=auto, from held-out defense data, is ours)"),
        holdout=ours("select=auto only: the held-out share of the defense data (ours)"),
        max_acc_drop=ours("select=auto only: the allowed held-out drop (ours; evidence in defenses/select.py)"),
        select_measure=ours("select=auto only: the held-out measure (ours)"),
    )


def split_holdout(data: ImageSet, fraction: float, gen: torch.Generator, who: str) -> tuple[ImageSet, ImageSet]:
    """(training share, held-out share) of ``data``: a seeded permutation, the first ``fraction`` held out."""
    perm = torch.randperm(len(data), generator=gen).to(data.x.device)
    n_held = int(round(fraction * len(data)))
    if not 0 < n_held < len(data):
        raise BenchError(f"{who}.holdout={fraction} leaves no held-out or no training images of {len(data)}")
    return data.subset(perm[n_held:]), data.subset(perm[:n_held])


def largest_within(candidates: Sequence[float], acc_at: Callable[[float], float], base: float,
                   max_drop: float) -> tuple[float, list[float]]:
    """(chosen candidate, held-out accuracy at each candidate tried): the rule in the module docstring."""
    chosen, accs = candidates[0], []
    for t in candidates:
        accs.append(acc_at(t))
        # TOL: accuracies are float32 fractions; 95/100 is 0.949999988, which must pass a 5-point bound from 1.0.
        if accs[-1] < base - max_drop - TOL:
            break
        chosen = t
    return chosen, accs


# How a candidate's held-out data is scored: the share right, or the mean probability of the right label.
MEASURES: dict[str, Callable[..., float]] = {"accuracy": accuracy, "probability": true_class_probability}


def choose_threshold(candidates: Sequence[float], model: nn.Module, pruned_at: Callable[[float], nn.Module],
                     held: ImageSet, max_drop: float, *, measure: str = "accuracy", device: torch.device | str = "cpu",
                     bf16: bool = False) -> tuple[float, dict]:
    """``select=auto``: (chosen candidate, facts for the record).

    ``pruned_at(t)`` returns ``model`` pruned at candidate ``t``; ``measure`` (a key of ``MEASURES``)
    is taken on the held-out share ``held``. The facts are ``holdout_images``, ``auto_measure``,
    ``auto_base`` (the unpruned model's held-out measure) and ``auto_values`` (per candidate tried).
    """
    score = MEASURES[measure]
    base = score(model, held, device=device, bf16=bf16)
    chosen, values = largest_within(candidates, lambda t: score(pruned_at(t), held, device=device, bf16=bf16),
                                    base, max_drop)
    return chosen, {"holdout_images": len(held), "auto_measure": measure, "auto_base": base,
                    "auto_values": dict(zip(map(str, candidates), values))}
