"""The detection track's harness: run detectors on the grid's cached models and score their answers.

A detection cell is (dataset, model, attack, detector, seed): the model trained in phase 1
(the ``clean`` attack's model is the negative case) and one detector (``detectors``). The
detector gets the model and the same clean defense subset a defense of that cell gets, and a
``DefenseContext``: nothing that names the attack. The harness alone knows the truth
(``truth``: whether the model is backdoored and the attack's target) and scores the answer
after the detector has returned:

- model level: ``label`` (the suspected target, or None), ``score`` (larger = more likely
  backdoored) and ``label_correct`` (the label is the all-to-one target; None where no target
  is defined: the clean model and all-to-all attacks). The record's ``truth`` also carries the
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
import json
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from bench.data import defense_subset
from defenses.base import DefenseContext
from detectors.base import Detector


@dataclass(frozen=True)
class DetectCell:
    job: "TrainJob"  # noqa: F821  (bench.grid.TrainJob; imported there, not here, to avoid a cycle)
    detector: Detector
    run: "RunConfig"  # noqa: F821

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
    from bench.grid import git_revision, job_config, versions

    j = cell.job
    return {
        "cell": cell.id, "dataset": j.dataset.name, "model": j.model.name, "attack": j.attack.name,
        "detector": cell.detector.name, "level": cell.detector.level, "seed": j.seed,
        "status": "failed", "error": None, "truth": truth(j.attack), "detection": None,
        "seconds": {"detect": None}, "info": {},
        "config": {"preset": preset, **job_config(j), "detector": {"name": cell.detector.name, **cell.detector.to_dict()},
                   "run": cell.run.to_dict(), "model_key": j.key},
        "versions": versions(), "git": git_revision(),
    }


def run_detect_cell(cell: DetectCell, data_dir: str | None, device: str, preset: str) -> dict:
    """Run the cell's detector on the cached model and score its answer; return the record."""
    from bench.grid import load_backdoored, model_dir
    from bench.store import read_json

    job = cell.job
    ds = job.dataset
    rec = base_detect_record(cell, preset)
    rec["truth"]["asr"] = read_json(model_dir(job) / "meta.json")["metrics"]["asr"]  # did the backdoor implant?
    train_set, _ = ds.load(data_dir)
    model, _, poison_idx, _ = load_backdoored(job, device)
    # The same clean subset a defense of this model gets; the poison indices only keep it clean.
    clean = defense_subset(train_set, cell.run.defense_data, seed=job.seed, exclude=poison_idx)
    ctx = DefenseContext(num_classes=ds.num_classes, augmentation=ds.augmentation, seed=job.seed,
                         device=torch.device(device), bf16=job.train.bf16)
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
    rec["info"] = {**det.info, "defense_images": len(clean)}
    if det.tensors:
        rec["_tensors"] = {k: v.detach().cpu() for k, v in det.tensors.items()}
    rec["status"] = "ok"
    return rec


def safe_detect_cell(cell: DetectCell, data_dir, device, preset) -> dict:
    from bench.grid import _error

    try:
        return run_detect_cell(cell, data_dir, device, preset)
    except Exception as exc:
        rec = base_detect_record(cell, preset)
        rec["error"] = _error(exc)
        return rec


def is_done(rec: dict | None, cell: DetectCell) -> bool:
    """Finished if ok and made with the same model, detector config and run config."""
    if rec is None or rec.get("status") != "ok":
        return False
    cfg = rec.get("config", {})
    want = json.loads(json.dumps({"detector": {"name": cell.detector.name, **cell.detector.to_dict()},
                                  "run": cell.run.to_dict()}))
    return cfg.get("model_key") == cell.job.key and cfg.get("detector") == want["detector"] and cfg.get("run") == want["run"]


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
