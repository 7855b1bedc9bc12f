"""Choosing a pruning threshold from the clean defense data alone (``select=auto``).

One helper for every pruning defense that offers ``select=auto`` (RNP, ANP). A defense
never sees test data, so it cannot pick its operating point the way published sweeps do
(BackdoorBench picks ANP's threshold by test-set ASR). Instead:

1. ``split_holdout``: a seeded ``holdout`` fraction of the defense data is set aside; the
   defense learns its masks on the rest.
2. ``largest_within`` (through ``choose_threshold``, which measures the accuracies): the candidates (pruning thresholds, in increasing order of how much
   they prune) are tried in order; the chosen one is the largest ``t`` such that, for every
   candidate up to and including ``t``, the pruned model's held-out accuracy is >= the
   unpruned model's held-out accuracy minus ``max_acc_drop``. If even the first candidate
   fails, the first candidate is used. The search stops at the first failure, so later
   candidates are never evaluated.

Why 0.05 by default (``MAX_ACC_DROP``): with 500 defense images and ``holdout`` 0.2, about
100 images are held out, so one image is 1 point and the binomial standard error of a ~95 %
accuracy is ~2 points; 5 points is ~2 SE: small enough to keep CA, large enough not to stop
on noise. Applied to the official RNP log's test CA it would pick 0.6 (CA -4.0 points, ASR
0.26 %); a 2-point bound would pick 0.3 (ASR 1.7 %).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from bench.data import ImageSet
from bench.registry import BenchError
from bench.train import accuracy

HOLDOUT = 0.2
MAX_ACC_DROP = 0.05
TOL = 1e-6


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


def choose_threshold(candidates: Sequence[float], model: nn.Module, pruned_at: Callable[[float], nn.Module],
                     held: ImageSet, max_drop: float, *, device: torch.device | str = "cpu",
                     bf16: bool = False) -> tuple[float, dict]:
    """``select=auto``: (chosen candidate, facts for the record).

    ``pruned_at(t)`` returns ``model`` pruned at candidate ``t``; accuracies are measured on the
    held-out share ``held``. The facts are ``holdout_images``, ``auto_base_acc`` (the unpruned
    model's held-out accuracy) and ``auto_accs`` (held-out accuracy per candidate tried).
    """
    base = accuracy(model, held, device=device, bf16=bf16)
    chosen, accs = largest_within(candidates, lambda t: accuracy(pruned_at(t), held, device=device, bf16=bf16),
                                  base, max_drop)
    return chosen, {"holdout_images": len(held), "auto_base_acc": base,
                    "auto_accs": dict(zip(map(str, candidates), accs))}
