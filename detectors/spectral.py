"""Spectral Signatures (sample level).

Paper: Brandon Tran, Jerry Li, Aleksander Madry, "Spectral Signatures in Backdoor Attacks",
NeurIPS 2018, arXiv:1811.00636; official code MadryLab/backdoor_data_poisoning
(``compute_corr.py``, ``config.json``). Also checked against BackdoorBench ``defense/spectral.py``
and ``config/defense/spectral/config.yaml``.

For every label separately: take the learned representations of the images carrying that label,
centre them, find the top right singular vector, and score each image by the magnitude of its
centred representation's projection on it. Poisoned images of a label share a direction the
clean ones lack, so they score high. The method then removes the images above the
``percentile``-th percentile of the scores: 85 in the official code (``config.json``) and in
BackdoorBench; the paper removes 1.5 x the expected poison count.

Here the answer is the score itself (the harness computes AUROC, TPR at 5 % FPR and precision at
the true poison count); ``info["flagged"]`` counts what the percentile rule would remove.
Departures, with reasons:
- Representation: the input of the model's last linear layer (``detectors.base.features``), so
  any classifier works; BackdoorBench hooks model-specific blocks (ResNet's ``layer4`` before
  pooling).
- Every label is examined (on inputs without labels, the test-time mix, the model's predicted
  labels take their place: ``detectors.base.input_labels``). The official code examines the
  attack's target label only, and BackdoorBench's config passes it when known (``target_label``):
  a fair detector is never given it.
- Scores are divided by their label's median score, so that labels of different spread rank on one
  scale (the paper ranks within a label only). The official code and BackdoorBench project the
  uncentred representations on the direction found from the centred ones; the paper and we
  project the centred ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import param
from bench.data import ImageSet
from bench.official import table
from bench.registry import BenchError
from defenses.base import DefenseContext
from detectors.base import DETECTORS, Detection, Detector, features, input_labels


def spectral_scores(reps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image: |projection of its centred representation on its label's top singular vector|,
    divided by that label's median score (labels with fewer than 2 images score 0)."""
    out = torch.zeros(len(reps), dtype=torch.float64)
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            continue
        r = reps[idx].double()
        centred = r - r.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        s = (centred @ vh[0]).abs()
        out[idx] = s / s.median().clamp_min(1e-12)
    return out


@DETECTORS.register("spectral")
@dataclass(frozen=True)
class SpectralSignatures(Detector):
    description: ClassVar[str] = "Spectral Signatures: per-label top singular direction of the features; score = |projection|"
    paper: ClassVar[str] = "Tran, Li & Madry, Spectral Signatures in Backdoor Attacks, NeurIPS 2018, arXiv:1811.00636"
    level: ClassVar[str] = "sample"

    percentile: float = param(85.0, low=0.0, high=100.0, doc="flag images above this percentile of their label (official 85)")

    official: ClassVar[dict] = table(
        percentile=(85.0, "MadryLab/backdoor_data_poisoning config.json: data.percentile 85 "
                          "(BackdoorBench config/defense/spectral/config.yaml: percentile 85)"),
    )

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, inputs: ImageSet | None = None) -> Detection:
        if inputs is None:
            raise BenchError("spectral is a sample-level detector: it needs the images to score")
        reps, logits = features(model.to(ctx.device), inputs.x, device=ctx.device, bf16=ctx.bf16)
        labels = input_labels(inputs, logits)
        scores = spectral_scores(reps, labels)
        flagged = 0
        for c in labels.unique().tolist():
            s = scores[labels == c]
            flagged += int((s > torch.quantile(s, self.percentile / 100)).sum()) if len(s) > 1 else 0
        return Detection(scores=scores.float(), info={"flagged": flagged, "feature_dim": int(reps.shape[1])})
