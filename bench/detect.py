"""The detection track's scoring: what a detector is scored on and how (the harness's side).

A detection cell (``bench.run.plan.DetectCell``: dataset, model, attack, detector, seed) runs a
detector (``detectors``) on a cached model, the ``clean`` attack's model being the negative case;
``bench.run.cells.run_detect_cell`` gives it the model and the same clean defense subset a defense
of that model gets, and a ``DefenseContext``: nothing that names the attack. The harness alone
knows the truth (``truth``: whether the model is backdoored and the attack's target) and scores
the answer after the detector has returned:

- model level: ``label`` (the suspected target, or None), ``score`` (larger = more likely
  backdoored) and ``label_correct`` (the label is the all-to-one target; None where no target
  is defined: the clean model and all-to-all attacks); a recovered trigger is scored by
  ``trigger_scores``.
- sample and input level: the detector scores inputs (``detection_inputs``: the poisoned
  training set, or a shuffled, unlabelled test-time mix for attacks that store no poisoned image
  and for input-level detectors); the harness records ``auroc``, ``tpr_at_5fpr`` (the true positive rate where 5 %
  of the clean inputs are flagged) and ``precision_at_k`` (k = the true poison count), with
  ``source`` saying which inputs were scored. Where there is nothing to find (the clean model) the
  cell's status is "not applicable", not "failed". The record's ``truth`` also carries the
  model's own ASR, so that tables can tell a backdoor that did not implant (ASR <= 20 %) from a
  detector's miss.

Across cells, ``bench.report`` computes each detector's label accuracy over the backdoored
models and the AUROC of its score over backdoored against clean models (``auroc``). Each
finished detection cell is its own file ``RUN_DIR/detect/<cell>.json`` (``bench.run.rundir``),
so detection resumes and survives SIGKILL as removal does; ``--detect`` on a run folder made
without it computes only the detection cells that are missing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bench.data import ImageSet
from bench.metrics import TriggeredSet
from bench.registry import BenchError


def truth(attack) -> dict:
    """What the harness scores against: is the model backdoored, and the all-to-one target (else None).
    For a user's checkpoint defended without ``--attack`` (``attacks.clean.Unknown``) nobody knows: None."""
    if getattr(attack, "unknown", False):
        return {"backdoored": None, "target": None}
    backdoored = bool(attack.has_trigger)
    target = int(attack.target) if backdoored and getattr(attack, "label_mode", "all2one") == "all2one" else None
    return {"backdoored": backdoored, "target": target}


TRIGGER_PREFIXES = ("", "unlearned_", "baseline_")  # a detector's answer, its unlearned-model stage, its baseline
PATCH_AREA = 0.1  # a trigger that touches at most this share of the pixels is a patch (IoU is reported)


def true_region(attack, test) -> torch.Tensor:
    """Bool ``[H, W]``: the pixels the attack's trigger changes on any of 32 test images."""
    x = test.x[:32]
    return ((attack.trigger(x).int() - x.int()).abs().sum(1) > 0).any(0)


def trigger_scores(model, attack, test, mask: torch.Tensor, pattern: torch.Tensor, target: int, *,
                   device: str, bf16: bool) -> dict:
    """A recovered (mask, pattern)'s ASR on ``model`` (clean test images of other labels, stamped, sent to
    ``target``) and, for a patch trigger, the IoU of the mask's top pixels (as many as the true trigger
    touches) with the true trigger's pixels; None where the true trigger is no patch."""
    from bench.train import predict
    from defenses.trigger import stamp

    x = test.x[test.y != target]
    stamped = (stamp(x, mask[None], pattern[None]) * 255).round().to(torch.uint8)
    asr = float((predict(model, stamped, device=device, bf16=bf16) == target).float().mean())
    region = true_region(attack, test)
    area = int(region.sum())
    iou = None
    if 0 < area <= PATCH_AREA * region.numel():
        top = torch.zeros(region.numel(), dtype=torch.bool)
        top[torch.topk(mask.flatten().float(), area).indices] = True
        top = top.view_as(region)
        iou = float((top & region).sum() / (top | region).sum())
    return {"trigger_asr": asr, "iou": iou}


NOT_APPLICABLE = "not applicable"  # a cell with nothing to detect (the clean model at sample level): done, not failed
MIX_IMAGES = 500  # the test-time mix: up to this many triggered and this many clean test images
# Bumped when the inputs a sample- or input-level detector scores change, so that resumed runs
# recompute those cells: 2 = the unlabelled, shuffled mix with clean target-class images (2026-12-05);
# a record without the field was scored on the old mix (clean first, labelled, no target class).
INPUTS_VERSION = 2


def detection_inputs(attack, level: str, train, test, triggered: TriggeredSet, poison_idx: torch.Tensor, seed: int):
    """(inputs to score, bool truth per input, where they come from) for a sample- or input-level detector.

    - The clean model: nothing poisoned, nothing triggered: (None, None, reason).
    - Sample level, an attack that poisons stored training images: the poisoned training set as the
      model was trained on it (images and labels: a defender inspects its own training data),
      rebuilt by the cached attack with the run seed and checked against the cached poison indices;
      the truth is those indices (Adaptive-Blend's cover images, which carry the trigger with their
      true label, count as clean).
    - Otherwise (input level, or an attack that poisons batches on the fly: WaNet, IAD, BPP): the
      test-time mix (``test_time_mix``), unlabelled: at test time nobody knows an input's label.
    """
    if getattr(attack, "unknown", False):
        return None, None, "a checkpoint whose trigger is not known: give --attack NAME to score inputs"
    if not attack.has_trigger:
        return None, None, "the clean model: no poisoned image, no trigger"
    if level == "sample" and len(poison_idx):
        try:
            rebuilt = attack.poison(train, seed)
        except BenchError as exc:  # e.g. LC's perturbed images live only in the training process
            return None, None, f"the poisoned training set cannot be rebuilt from the cache ({exc})"
        if not torch.equal(rebuilt.poison_idx.sort().values, poison_idx.sort().values):
            return None, None, "the rebuilt poisoned training set does not match the cached poison indices"
        truth_mask = torch.zeros(len(rebuilt.data), dtype=torch.bool)
        truth_mask[poison_idx] = True
        return rebuilt.data, truth_mask, "training set"
    inputs, truth_mask = test_time_mix(attack, test, triggered, seed)
    return inputs, truth_mask, "test-time mix"


def test_time_mix(attack, test: ImageSet, triggered: TriggeredSet, seed: int) -> tuple[ImageSet, torch.Tensor]:
    """Up to ``MIX_IMAGES`` triggered and as many clean test images, shuffled with ``seed``, without labels.

    The triggered ones come from the model's cached triggered test set (the images its ASR was
    measured on: for all-to-one, test images whose true label is not the target); the clean ones
    from the other test images, every class, the target's included, so that neither the order, nor
    a label, nor a class tells the two apart. Only the truth mask (triggered or not) says which is
    which, and it stays with the harness.
    """
    eligible = (test.y != attack.target).nonzero().flatten() if attack.label_mode == "all2one" else torch.arange(len(test))
    if len(eligible) != len(triggered):
        raise ValueError(f"the cached triggered test set has {len(triggered)} images, the attack selects {len(eligible)}")
    gen = torch.Generator().manual_seed(seed)
    n = min(MIX_IMAGES, len(eligible), len(test) // 2)
    pick = torch.randperm(len(eligible), generator=gen)[:n]  # positions in the triggered set
    rest = torch.ones(len(test), dtype=torch.bool)
    rest[eligible[pick]] = False  # a test image is in the mix once, clean or triggered
    others = rest.nonzero().flatten()
    clean_idx = others[torch.randperm(len(others), generator=gen)[:n]]
    x = torch.cat([test.x[clean_idx], triggered.x[pick]])
    truth_mask = torch.cat([torch.zeros(len(clean_idx), dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    order = torch.randperm(len(x), generator=gen)
    return ImageSet.unlabelled(x[order]), truth_mask[order]


def tpr_at_fpr(positives: Sequence[float], negatives: Sequence[float], fpr: float) -> float | None:
    """True positive rate at the threshold that flags at most ``fpr`` of the negatives."""
    if not positives or not negatives:
        return None
    neg = torch.tensor(sorted(negatives, reverse=True), dtype=torch.float64)
    allowed = int(fpr * len(neg))  # negatives that may score above the threshold (flagged)
    thr = neg[allowed] if allowed < len(neg) else neg[-1] - 1
    return float((torch.tensor(positives, dtype=torch.float64) > thr).double().mean())


def precision_at_k(scores: torch.Tensor, truth_mask: torch.Tensor) -> float | None:
    """Of the k top-scored inputs, k = the true number of poisoned ones, the fraction that are poisoned."""
    k = int(truth_mask.sum())
    if k == 0:
        return None
    top = torch.topk(scores.double(), k).indices
    return float(truth_mask[top].double().mean())


def _scored(positives: Sequence[float], negatives: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(truth 1/0, scores) for scikit-learn; ±inf become ranks (an ROC curve depends only on the scores' order,
    ties kept), since scikit-learn refuses non-finite scores; NaN is an error (it has no place in an order)."""
    from scipy.stats import rankdata

    scores = np.concatenate([np.asarray(positives, dtype=np.float64).ravel(), np.asarray(negatives, dtype=np.float64).ravel()])
    if np.isnan(scores).any():
        raise ValueError("a detection score is NaN: it cannot be ranked")
    if not np.isfinite(scores).all():
        scores = rankdata(scores)
    y = np.zeros(len(scores), dtype=np.int8)
    y[: len(positives)] = 1
    return y, scores


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    scikit-learn's ``roc_auc_score`` (the trapezoidal area under ``roc_curve``, which is that
    probability with ties counted half), in O(n log n) time and O(n) memory: no pairwise matrix.
    None when either side is empty (the AUROC is not defined without both kinds of model).
    """
    if len(positives) == 0 or len(negatives) == 0:
        return None
    from sklearn.metrics import roc_auc_score  # imported here: the CLI starts without scikit-learn

    return float(roc_auc_score(*_scored(positives, negatives)))


def roc_points(positives: Sequence[float], negatives: Sequence[float]) -> tuple[list[float], list[float]] | None:
    """(false positive rates, true positive rates) of every threshold, from (0, 0) to (1, 1).

    scikit-learn's ``roc_curve`` with ``drop_intermediate=False``: one point per distinct score, an input
    flagged when its score is at least the threshold, after the (0, 0) of a threshold above every score
    (no point dropped: the report draws the curve as steps, which collinear points change).
    None when either side is empty.
    """
    if len(positives) == 0 or len(negatives) == 0:
        return None
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_scored(positives, negatives), drop_intermediate=False)
    return fpr.tolist(), tpr.tolist()
