"""Activation Clustering (sample level).

Paper: Bryant Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", AAAI SafeAI workshop 2019, arXiv:1811.03728. Settings from BackdoorBench
``config/defense/ac/config.yaml`` (``nb_dims`` 10, ``nb_clusters`` 2, ``cluster_analysis``
"smaller"), which wraps IBM ART's ``ActivationDefence``.

For every label separately: the last hidden layer's activations of its images, reduced to
``nb_dims`` dimensions, are split into two clusters by k-means; a poisoned label splits into its
clean images and its poisoned ones, and the poisoned cluster is the smaller one ("smaller"
analysis; ART calls a cluster poisoned when it holds at most ``size_threshold`` 35 % of its label).

Score (for AUROC and the other rankings): how much closer an image lies to its label's smaller
cluster than to the larger one, ``d(larger) - d(smaller)``, divided by the mean distance between
the label's images and their own centroid, so labels rank on one scale. ``info["flagged"]``:
images in a smaller cluster of at most ``size_threshold`` of their label.

Departures, with reasons:
- Dimension reduction by PCA (an SVD in torch) instead of ART's FastICA: scikit-learn is not a
  dependency, and the clusters of a 2-way split live in the leading directions either way.
- k-means: 2 clusters, k-means++-style seeding from the run seed, 50 Lloyd iterations, best of
  ``n_init`` 4 by inertia (ART uses scikit-learn's KMeans defaults).
- Representation: the input of the model's last linear layer (``detectors.base.features``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from bench.registry import BenchError
from defenses.base import DefenseContext
from detectors.base import DETECTORS, Detection, Detector, features, input_labels


def kmeans2(z: torch.Tensor, gen: torch.Generator, n_init: int = 4, iters: int = 50) -> torch.Tensor:
    """Labels (0/1) of a 2-means clustering of the rows of ``z``, best of ``n_init`` seeded starts."""
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        first = int(torch.randint(len(z), (1,), generator=gen))
        d = ((z - z[first]) ** 2).sum(1)
        second = int(torch.multinomial(d + 1e-12, 1, generator=gen))  # k-means++: far from the first
        cent = torch.stack([z[first], z[second]])
        for _ in range(iters):
            assign = torch.cdist(z, cent).argmin(1)
            new = torch.stack([z[assign == k].mean(0) if (assign == k).any() else cent[k] for k in range(2)])
            if torch.allclose(new, cent):
                break
            cent = new
        inertia = float(torch.cdist(z, cent).min(1).values.pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = torch.cdist(z, cent).argmin(1), inertia
    return best


@DETECTORS.register("ac")
@dataclass(frozen=True)
class ActivationClustering(Detector):
    description: ClassVar[str] = "Activation Clustering: per-label 2-means on reduced features; score = nearness to the smaller cluster"
    paper: ClassVar[str] = "Chen et al., Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering, arXiv:1811.03728"
    level: ClassVar[str] = "sample"

    nb_dims: int = param(10, low=1, doc="dimensions after reduction (BackdoorBench / ART 10)")
    size_threshold: float = param(0.35, low=0.0, high=1.0, doc="a smaller cluster of at most this share of its label is poisoned (ART 0.35)")
    n_init: int = param(4, low=1, doc="k-means restarts (best inertia kept)")

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, inputs: ImageSet | None = None) -> Detection:
        if inputs is None:
            raise BenchError("ac is a sample-level detector: it needs the images to score")
        reps, logits = features(model.to(ctx.device), inputs.x, device=ctx.device, bf16=ctx.bf16)
        labels = input_labels(inputs, logits)  # the model's predictions where the inputs carry no labels
        gen = torch.Generator().manual_seed(ctx.seed)
        scores = torch.zeros(len(reps))
        flagged = 0
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().flatten()
            if len(idx) < 3:
                continue
            r = reps[idx].double()
            centred = r - r.mean(0, keepdim=True)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            z = (centred @ vh[: self.nb_dims].T).float()
            assign = kmeans2(z, gen, self.n_init)
            if int(assign.sum()) in (0, len(assign)):  # one cluster only (identical features): nothing stands out
                continue
            small = int((assign == 1).sum() < (assign == 0).sum())
            cent = torch.stack([z[assign == k].mean(0) for k in range(2)])
            dist = torch.cdist(z, cent)
            scale = (z - z.mean(0)).norm(dim=1).mean().clamp_min(1e-12)
            scores[idx] = ((dist[:, 1 - small] - dist[:, small]) / scale).float()
            share = float((assign == small).float().mean())
            if share <= self.size_threshold:
                flagged += int((assign == small).sum())
        return Detection(scores=scores, info={"flagged": flagged, "feature_dim": int(reps.shape[1])})
