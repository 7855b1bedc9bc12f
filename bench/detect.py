"""The detection track's harness: run detectors on the grid's cached models and score their answers.

A detection cell is (dataset, model, attack, detector, seed): the model trained in phase 1
(the ``clean`` attack's model is the negative case) and one detector (``detectors``). The
detector gets the model and the same clean defense subset a defense of that cell gets, and a
``DefenseContext``: nothing that names the attack. The harness alone knows the truth
(``truth``: whether the model is backdoored and the attack's target) and scores the answer
after the detector has returned:

- model level: ``label`` (the suspected target, or None), ``score`` (larger = more likely
  backdoored) and ``label_correct`` (the label is the all-to-one target; None where no target
  is defined: the clean model and all-to-all attacks).
- sample and input level: the detector scores inputs (``detection_inputs``: the poisoned
  training set, or a shuffled, unlabelled test-time mix for attacks that store no poisoned image
  and for input-level detectors); the harness records ``auroc``, ``tpr_at_5fpr`` (the true positive rate where 5 %
  of the clean inputs are flagged) and ``precision_at_k`` (k = the true poison count), with
  ``source`` saying which inputs were scored. Where there is nothing to find (the clean model) the
  cell's status is "not applicable", not "failed". The record's ``truth`` also carries the
  model's own ASR, so that tables can tell a backdoor that did not implant (ASR <= 20 %) from a
  detector's miss.

Across cells, ``bench.report`` computes each detector's label accuracy over the backdoored
models and the AUROC of its score over backdoored against clean models (``auroc``).

Each finished detection cell is its own file ``RUN_DIR/detect/<cell>.json`` (atomic, as a
removal cell), so detection resumes and survives SIGKILL as removal does; ``--detect`` on a
run folder made without it computes only the detection cells that are missing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from bench.data import ImageSet
from bench.metrics import TriggeredSet
from bench.registry import BenchError
from defenses.base import DefenseContext
from detectors.base import Detector

if TYPE_CHECKING:  # bench.grid imports this module, so only for the annotations
    from bench.grid import RunConfig, TrainJob


@dataclass(frozen=True)
class DetectCell:
    job: TrainJob
    detector: Detector
    run: RunConfig

    @property
    def id(self) -> str:
        j = self.job
        return f"{j.dataset.name}-{j.model.name}-{j.attack.name}-{self.detector.name}-s{j.seed}"


def truth(attack) -> dict:
    """What the harness scores against: is the model backdoored, and the all-to-one target (else None)."""
    backdoored = bool(attack.has_trigger)
    target = int(attack.target) if backdoored and getattr(attack, "label_mode", "all2one") == "all2one" else None
    return {"backdoored": backdoored, "target": target}


def base_detect_record(cell: DetectCell, preset: str) -> dict:
    from bench.grid import defense_pool, git_revision, job_config, versions

    j = cell.job
    return {
        "cell": cell.id, "dataset": j.dataset.name, "model": j.model.name, "attack": j.attack.name,
        "detector": cell.detector.name, "level": cell.detector.level, "seed": j.seed,
        "status": "failed", "error": None, "truth": truth(j.attack), "detection": None,
        "seconds": {"detect": None}, "info": {}, "data": None,
        "config": {"preset": preset, **job_config(j), "detector": {"name": cell.detector.name, **cell.detector.to_dict()},
                   "run": cell.run.to_dict(), "model_key": j.key, "defense_pool": defense_pool(j.attack),
                   **({} if cell.detector.level == "model" else {"inputs_version": INPUTS_VERSION})},
        "versions": versions(), "git": git_revision(),
    }


def run_detect_cell(cell: DetectCell, device: str, preset: str) -> dict:
    """Run the cell's detector on the cached model and score its answer; return the record."""
    from bench.grid import defense_data, load_backdoored, model_dir
    from bench.store import read_json

    job = cell.job
    ds = job.dataset
    rec = base_detect_record(cell, preset)
    rec["truth"]["asr"] = read_json(model_dir(job) / "meta.json")["metrics"]["asr"]  # did the backdoor implant?
    train_set, test_set = ds.load(job.data_dir)
    rec["data"] = job.data
    model, attack, poison_idx, triggered = load_backdoored(job, device)
    clean = defense_data(train_set, attack, poison_idx, cell.run.defense_data, job.seed)  # exactly what a defense of this model gets
    ctx = DefenseContext(num_classes=ds.num_classes, augmentation=ds.augmentation, seed=job.seed,
                         device=torch.device(device), bf16=job.train.bf16)
    level = cell.detector.level
    if level == "model":
        t0 = time.perf_counter()
        det = cell.detector(copy.deepcopy(model), clean, ctx)
        rec["seconds"]["detect"] = time.perf_counter() - t0
        # Scored here, after the detector returned, against the truth it never saw.
        target = rec["truth"]["target"]
        rec["detection"] = {
            "label": det.label,
            "score": float(det.score),
            "label_correct": None if target is None else det.label == target,
        }
        if {"mask", "pattern"} <= set(det.tensors) and rec["truth"]["backdoored"]:  # a recovered trigger
            want = target if target is not None else det.label
            for prefix in TRIGGER_PREFIXES:
                if f"{prefix}mask" in det.tensors:
                    rec["detection"].update({f"{prefix}{k}": v for k, v in trigger_scores(
                        model, attack, test_set, det.tensors[f"{prefix}mask"], det.tensors[f"{prefix}pattern"], want,
                        device=device, bf16=job.train.bf16).items()})
    else:
        inputs, poisoned, source = detection_inputs(attack, level, train_set, test_set, triggered, poison_idx, job.seed)
        if inputs is None:  # nothing to find here: recorded as such, not as a failure
            rec.update(status=NOT_APPLICABLE, info={"reason": source, "defense_images": len(clean)})
            return rec
        t0 = time.perf_counter()
        det = cell.detector(copy.deepcopy(model), clean, ctx, inputs)
        rec["seconds"]["detect"] = time.perf_counter() - t0
        scores = det.scores.detach().double().cpu()
        if scores.shape != (len(inputs),):
            raise ValueError(f"{cell.detector.name} returned {tuple(scores.shape)} scores for {len(inputs)} inputs")
        pos, neg = scores[poisoned].tolist(), scores[~poisoned].tolist()
        rec["detection"] = {
            "source": source, "labelled": inputs.labelled, "inputs": len(inputs), "poisoned": int(poisoned.sum()),
            "auroc": auroc(pos, neg), "tpr_at_5fpr": tpr_at_fpr(pos, neg, 0.05),
            "precision_at_k": precision_at_k(scores, poisoned),
        }
    rec["info"] = {**det.info, "defense_images": len(clean)}
    if det.tensors:
        rec["_tensors"] = {k: v.detach().cpu() for k, v in det.tensors.items()}
    rec["status"] = "ok"
    return rec


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


def safe_detect_cell(cell: DetectCell, device, preset) -> dict:
    from bench.grid import _error

    try:
        return run_detect_cell(cell, device, preset)
    except Exception as exc:
        rec = base_detect_record(cell, preset)
        rec["error"] = _error(exc)
        return rec




def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    None when either side is empty (the AUROC is not defined without both kinds of model).
    """
    if not positives or not negatives:
        return None
    pos = torch.tensor(list(positives), dtype=torch.float64)[:, None]
    neg = torch.tensor(list(negatives), dtype=torch.float64)[None, :]
    return float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())


def roc_points(positives: Sequence[float], negatives: Sequence[float]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) of every threshold, from (0, 0) to (1, 1)."""
    scores = sorted({*positives, *negatives}, reverse=True)
    fpr, tpr = [0.0], [0.0]
    for t in scores:
        tpr.append(sum(s >= t for s in positives) / len(positives))
        fpr.append(sum(s >= t for s in negatives) / len(negatives))
    return fpr, tpr
