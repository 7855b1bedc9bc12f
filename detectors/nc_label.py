"""Neural Cleanse's backdoor label detection (model level), the baseline for ``rnp_label``.

Paper: Bolun Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019; official code github.com/bolunwang/backdoor
(``mad_outlier_detection.py``). Steps 1 and 2 of the ``nc`` defense (``defenses/nc.py``), with
its settings and its table of official values (``NeuralCleanse.official``; the grid gives this
detector the ``nc`` preset fields and ``--set nc.*`` first): reverse-engineer a trigger for every
label with the shared optimiser, then the MAD anomaly index of each mask's L1 norm. The defense's
unlearning fields are inherited and unused here.

- Label: the label with the smallest reversed-trigger norm, NC's candidate target (the label
  the paper's outlier test examines first), whether or not the test flags it, as ``rnp_label``
  always names its most predicted label.
- Score: the anomaly index of the smallest norm, the paper's detection statistic; the official
  rule calls the model backdoored when it exceeds ``anomaly_threshold`` (2) and the norm is at
  most the median (``info["flagged"]``). A MAD of 0 gives an infinite index; it is reported as
  1e6 so that it still ranks.

``info``: ``norms`` (per label), ``anomaly_index``, ``smallest`` (the label with the smallest
norm, flagged or not), ``flagged``. ``tensors``: the reversed triggers (as the ``nc`` defense).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from bench.data import ImageSet
from bench.official import extend
from defenses.base import DefenseContext
from defenses.nc import NeuralCleanse, anomaly_indices, flag_labels
from detectors.base import DETECTORS, Detection, Detector

INFINITE_INDEX = 1e6  # a MAD of 0: every norm off the median is infinitely anomalous


@DETECTORS.register("nc_label")
@dataclass(frozen=True)
class NCLabel(NeuralCleanse, Detector):
    name = "nc_label"  # explicit: the inherited class already carries the name "nc"
    description: ClassVar[str] = "Neural Cleanse label: the label of the smallest reversed trigger; score = its MAD anomaly index"
    paper: ClassVar[str] = ("Wang et al., Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks, "
                            "IEEE S&P 2019")
    level: ClassVar[str] = "model"
    settings_from: ClassVar[str | None] = "nc"
    # The official label detection is the nc defense's search and outlier test: its values, nothing of our own.
    official: ClassVar[dict] = extend(NeuralCleanse.official)

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> Detection:
        model = model.to(ctx.device).eval()
        trig = self.reverse(model, clean.to(ctx.device), ctx)
        idx, _, _ = anomaly_indices(trig.norms)
        smallest = int(trig.norms.argmin())
        flagged = bool(flag_labels(trig.norms, self.anomaly_threshold)[smallest])
        index = float(idx[smallest])
        score = index if math.isfinite(index) else INFINITE_INDEX
        info = {"norms": [round(float(v), 3) for v in trig.norms], "anomaly_index": round(score, 4),
                "smallest": smallest, "flagged": flagged}
        return Detection(label=smallest, score=score, info=info, tensors=trig.tensors())
