"""Activation Clustering (sample level).

Paper: Bryant Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", AAAI SafeAI workshop 2019, arXiv:1811.03728. The method as IBM ART's
``ActivationDefence`` runs it (``art/defences/detector/poison/activation_defence.py``, ART 1.20.1,
commit 23539e2; taken as the official code: ART is IBM's, as are the paper's authors), whose
functions BackdoorBench copies into ``defense/ac.py`` (``config/defense/ac/config.yaml``:
``nb_dims`` 10, ``nb_clusters`` 2, ``cluster_analysis`` "smaller"). Every default is ART's value
(``official`` below, with sources):

- For every label separately, the last hidden layer's activations of its images are reduced to
  ``nb_dims`` dimensions by scikit-learn's ``PCA(n_components=nb_dims)``: ``ActivationDefence``
  sets ``reduce = "PCA"`` (line 99) and BackdoorBench passes ``reduce='PCA'``. ``reduce="FastICA"``
  is ART's other choice, ``FastICA(n_components=nb_dims, max_iter=1000, tol=0.005)``
  (``reduce_dimensionality``, line 837; the default of ART's module-level helpers, lines 767 and
  824, not of the class). Activations of at most ``nb_dims`` dimensions are not reduced (line 800).
- The reduced activations are split into 2 clusters by scikit-learn's ``KMeans(n_clusters=2)``,
  ``fit_predict`` (lines 793, 818): k-means++ starts, Lloyd iterations, best of ``n_init`` by
  inertia. ART passes no ``n_init``: it gets scikit-learn's default, 10 before scikit-learn 1.4
  (January 2024, after BackdoorBench's 2022 AC code) and "auto" (a single k-means++ start) since;
  10 here.
- "smaller" analysis: in every label the smaller cluster is the suspected poison
  (``clustering_analyzer.py``, ``analyze_by_size``, line 77).

Seeds: ART passes no ``random_state``; here ``PCA`` (whose randomized solver scikit-learn picks for
large inputs), ``FastICA`` and ``KMeans`` all get ``random_state`` = the run seed, so a run repeats.

Additions, with reasons:
- Score (ART only assigns clusters; AUROC and the other rankings need an order): how much closer an
  image lies to its label's smaller cluster than to the larger one, ``d(larger) - d(smaller)`` in the
  reduced space, divided by the mean distance between the label's images and their own centroid, so
  labels rank on one scale.
- ``info["flagged"]``: images in a smaller cluster holding less than ``size_threshold`` of its label,
  ART's "relative-size" rule (``analyze_by_relative_size``, threshold 0.35, lines 195 and 230), since
  "smaller" alone flags a cluster in every label, clean ones included.
- Labels with fewer than 3 images are not clustered (score 0); PCA keeps at most as many
  components as the label has images (ART fails there: its TODO at line 801).

Departure: the representation is the input of the model's last linear layer
(``detectors.base.features``), as BackdoorBench's hook on ``avgpool`` takes it; ART takes the
activations of its classifier's last named layer (``_get_activations``, line 673).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from bench.official import table
from bench.registry import BenchError
from defenses.base import DefenseContext
from detectors.base import DETECTORS, Detection, Detector, features, input_labels


def reduce_and_cluster(acts: np.ndarray, nb_dims: int, reduce: str, n_init: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reduced activations, cluster of each row 0/1) of one label's activations, as ART's
    ``cluster_activations`` computes them, with ``random_state=seed``."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    z = acts
    if acts.shape[1] > nb_dims:
        n = min(nb_dims, len(acts))
        if reduce == "PCA":
            projector = PCA(n_components=n, random_state=seed)
        else:
            projector = FastICA(n_components=n, max_iter=1000, tol=0.005, random_state=seed)
        z = projector.fit_transform(acts)
    with warnings.catch_warnings():  # identical rows give one distinct cluster: the caller handles it
        warnings.simplefilter("ignore", ConvergenceWarning)
        assign = KMeans(n_clusters=2, n_init=n_init, random_state=seed).fit_predict(z)
    return z, assign


@DETECTORS.register("ac")
@dataclass(frozen=True)
class ActivationClustering(Detector):
    description: ClassVar[str] = "Activation Clustering: per-label 2-means on reduced features; score = nearness to the smaller cluster"
    paper: ClassVar[str] = "Chen et al., Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering, arXiv:1811.03728"
    level: ClassVar[str] = "sample"

    nb_dims: int = param(10, low=1, doc="dimensions after reduction (BackdoorBench / ART 10)")
    reduce: Literal["PCA", "FastICA"] = param("PCA", doc="dimension reduction (ART's ActivationDefence: PCA)")
    size_threshold: float = param(0.35, low=0.0, high=1.0, doc="info['flagged']: a smaller cluster below this share of its label (ART relative-size 0.35)")
    n_init: int = param(10, low=1, doc="k-means starts, best inertia kept (scikit-learn's default before 1.4, which ART relies on)")

    official: ClassVar[dict] = table(
        nb_dims=(10, "ART art/defences/detector/poison/activation_defence.py: ActivationDefence nb_dims = 10 "
                     "(BackdoorBench config/defense/ac/config.yaml: nb_dims 10)"),
        reduce=("PCA", "ART art/defences/detector/poison/activation_defence.py: ActivationDefence reduce = 'PCA' "
                       "(BackdoorBench defense/ac.py: reduce='PCA')"),
        size_threshold=(0.35, "ART art/defences/detector/poison/clustering_analyzer.py: analyze_by_relative_size "
                              "size_threshold 0.35 (BackdoorBench defense/ac.py's copy: 0.35)"),
        n_init=(10, "ART art/defences/detector/poison/activation_defence.py: cluster_activations KMeans(n_clusters) "
                    "with scikit-learn's n_init, 10 before scikit-learn 1.4"),
    )

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, inputs: ImageSet | None = None) -> Detection:
        if inputs is None:
            raise BenchError("ac is a sample-level detector: it needs the images to score")
        reps, logits = features(model.to(ctx.device), inputs.x, device=ctx.device, bf16=ctx.bf16)
        labels = input_labels(inputs, logits)  # the model's predictions where the inputs carry no labels
        seed = ctx.seed % 2**32
        scores = torch.zeros(len(reps))
        flagged = 0
        for c in labels.unique().tolist():
            idx = (labels == c).nonzero().flatten()
            if len(idx) < 3:
                continue
            z, assign = reduce_and_cluster(reps[idx].double().cpu().numpy(), self.nb_dims, self.reduce, self.n_init, seed)
            z, assign = torch.from_numpy(z), torch.from_numpy(assign).long()
            if int(assign.sum()) in (0, len(assign)):  # one cluster only (identical features): nothing stands out
                continue
            small = int((assign == 1).sum() < (assign == 0).sum())
            cent = torch.stack([z[assign == k].mean(0) for k in range(2)])
            dist = torch.cdist(z, cent)
            scale = (z - z.mean(0)).norm(dim=1).mean().clamp_min(1e-12)
            scores[idx] = ((dist[:, 1 - small] - dist[:, small]) / scale).float()
            if float((assign == small).double().mean()) < self.size_threshold:
                flagged += int((assign == small).sum())
        return Detection(scores=scores, info={"flagged": flagged, "feature_dim": int(reps.shape[1])})
