"""Neural Cleanse (NC).

Paper: Bolun Wang, Yuanshun Yao, Shawn Shan, Huiying Li, Bimal Viswanath, Haitao Zheng,
Ben Y. Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019. Official code: github.com/bolunwang/backdoor (``visualizer.py``,
``gtsrb_visualize_example.py``, ``mad_outlier_detection.py``). Settings also checked against
BackdoorBench ``defense/nc.py`` and ``config/defense/nc/*.yaml`` (github.com/SCLBD/BackdoorBench).

Three steps, on the clean defense data only:

1. Reverse engineering: for every label, the smallest (mask, pattern) trigger that sends clean
   images to it, with the shared optimiser ``defenses.trigger.reverse_triggers`` (all labels in
   one batch; its module docstring gives the optimiser's defaults and their sources).
2. Detection: the MAD anomaly index of each label's mask L1 norm, ``|norm - median| / (1.4826 x
   median(|norm - median|))``; a label is flagged if its norm is at most the median and its index
   exceeds ``anomaly_threshold`` (2), as in ``mad_outlier_detection.py``.
3. Mitigation by unlearning (paper, Section VI.C): fine-tune on clean data of which 20 % is stamped
   with the reversed trigger(s) while keeping the true labels. We stamp ``unlearn_ratio`` of every
   batch (a random flagged trigger per stamped image) through the shared trainer's ``BatchRewrite``.
   No label flagged: the model is returned unchanged (``info["unlearned"]`` is false).

Defaults (``official`` below, with their sources; the trigger search's in ``defenses/trigger.py``):
- Search: up to 1,000 epochs of 31 mini-batches of 32 images per label, Adam 0.1, the cost starting
  at 0, early stop after the cost has moved both ways and 25 epochs without a smaller mask: the
  official GTSRB driver. On our 500-image defense data an epoch of 31 x 32 draws about two passes.
- ``anomaly_threshold`` 2 and the consistency constant 1.4826: ``mad_outlier_detection.py``.
- Mitigation (the official repository has none; BackdoorBench's ``defense/nc.py`` and its config):
  ``unlearn_ratio`` 0.2 of every batch stamped (also the paper's), SGD ``unlearn_lr`` 0.01 with
  momentum 0.9, weight decay 5e-4, cosine schedule, random crop (+flip), ``unlearn_epochs`` 100 at
  ``unlearn_batch_size`` 256, the ragged last batch kept, on 5 % of the training set (the grid's
  defense data instead: a departure the record lists). The paper fine-tunes one epoch over 10 % of
  the training set. ``unlearn_lr`` follows the fine-tuning rule (``bench/finetune.py``).

Departures (besides the optimiser's, listed in ``defenses/trigger.py``):
- Batch stamping: with several flagged labels BackdoorBench adds one stamped copy of the unlearning
  share per label; we draw one flagged trigger per image.
- Norms are the float L1 norms of the masks; the official script re-reads masks saved as 8-bit PNGs.
- MAD of 0 (more than half the norms equal): every norm below the median counts as anomalous
  (index reported as null); the official script divides by zero.

``info``: ``norms``, ``anomaly_indices`` (per label, index = label), ``median``, ``mad``,
``anomaly_index`` (of the smallest norm, the paper's detection statistic), ``flagged`` (labels,
smallest norm first), ``success`` and ``reached`` (the reversed triggers' attack success on the
defense data), ``trigger_epochs`` (per label) and ``trigger_steps``, ``unlearned``, and after
unlearning ``acc_after_unlearn`` (defense data). ``tensors``: the reversed triggers (``masks``,
``patterns``, ``labels``, ``norms``, ...) plus ``anomaly_indices`` and ``flagged`` (bool per label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import param
from bench.finetune import FineTuneLR
from bench.official import extend
from bench.data import ImageSet
from bench.train import BatchRewrite, TrainConfig, accuracy, train
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from defenses.trigger import Triggers, TriggerSearch, reverse_triggers, stamp

CONSISTENCY = 1.4826  # mad_outlier_detection.py: MAD -> standard deviation for normal data


def anomaly_indices(norms: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(anomaly index per norm, median, MAD) with the official consistency constant.

    The median of an even count is the mean of the two middle values (``np.median``, as the
    official script). A MAD of 0 makes every norm off the median infinitely anomalous.
    """
    v = norms.detach().double().cpu()
    median = float(v.quantile(0.5))
    mad = CONSISTENCY * float((v - median).abs().quantile(0.5))
    dev = (v - median).abs()
    if mad > 0:
        return dev / mad, median, mad
    return torch.where(dev > 0, math.inf, 0.0).double(), median, mad


def flag_labels(norms: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Bool per label: norm <= median and anomaly index > ``threshold`` (``mad_outlier_detection.py``)."""
    idx, median, _ = anomaly_indices(norms)
    return (norms.detach().double().cpu() <= median) & (idx > threshold)


def _finite(x: float) -> float | None:
    return round(x, 4) if math.isfinite(x) else None


@DEFENSES.register("nc")
@dataclass(frozen=True)
class NeuralCleanse(Defense, TriggerSearch):
    description: ClassVar[str] = "Neural Cleanse: reverse-engineer a trigger per label, flag outliers by MAD, unlearn them"
    paper: ClassVar[str] = ("Wang et al., Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks, "
                            "IEEE S&P 2019")

    # The trigger search's fields (epochs, batches_per_epoch, batch_size, lr, init_cost, ...) come
    # from TriggerSearch, with the official values (defenses/trigger.py).
    anomaly_threshold: float = param(2.0, low=0.0, doc="flag a label whose anomaly index exceeds this (official 2)")
    unlearn_ratio: float = param(0.2, low=0.0, high=1.0, doc="fraction of each unlearning batch stamped with a flagged trigger (paper 0.2)")
    unlearn_epochs: int = param(100, low=0, doc="unlearning epochs on the defense data (0: detect only; BackdoorBench 100)")
    unlearn_lr: float = param(0.01, low=0.0, doc="unlearning SGD learning rate, cosine schedule (BackdoorBench 0.01); scaled by the fine-tuning rule")
    unlearn_batch_size: int = param(256, low=1, doc="unlearning batch size (BackdoorBench 256; the ragged last batch kept)")
    momentum: float = param(0.9, low=0.0, high=1.0, doc="unlearning SGD momentum")
    weight_decay: float = param(5e-4, low=0.0, doc="unlearning weight decay")

    official: ClassVar[dict] = extend(
        TriggerSearch.official,
        anomaly_threshold=(2.0, "bolunwang/backdoor mad_outlier_detection.py: flag an anomaly index > 2"),
        unlearn_ratio=(0.2, "BackdoorBench config/defense/nc/cifar10.yaml: unlearning_ratio 0.2 (the paper's 20 %)"),
        unlearn_epochs=(100, "BackdoorBench config/defense/nc/cifar10.yaml: epochs 100 (the official code has no mitigation)"),
        unlearn_lr=(0.01, "BackdoorBench config/defense/nc/cifar10.yaml: lr 0.01"),
        unlearn_batch_size=(256, "BackdoorBench config/defense/nc/cifar10.yaml: batch_size 256"),
        momentum=(0.9, "BackdoorBench config/defense/nc/cifar10.yaml: sgd_momentum 0.9"),
        weight_decay=(5e-4, "BackdoorBench config/defense/nc/cifar10.yaml: wd 5e-4"),
        defense_data=(0.05, "BackdoorBench config/defense/nc/cifar10.yaml: ratio 0.05 (the official driver searches the test set)"),
    )
    finetune_lr: ClassVar[FineTuneLR] = FineTuneLR(("unlearn_lr",), 0.01, "BackdoorBench trains at SGD lr 0.01 (config/attack/prototype/cifar10.yaml)")

    def reverse(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> Triggers:
        """Step 1: a reversed trigger for every label of the model."""
        gen = torch.Generator().manual_seed(ctx.seed)
        return reverse_triggers(model, clean, range(ctx.num_classes), self, gen=gen, device=ctx.device, bf16=ctx.bf16)

    def unlearn(self, model: nn.Module, clean: ImageSet, trig: Triggers, flagged: torch.Tensor, ctx: DefenseContext) -> None:
        """Step 3: fine-tune ``model`` in place, stamping ``unlearn_ratio`` of each batch, true labels kept."""
        masks = trig.masks[flagged].to(ctx.device)
        patterns = trig.patterns[flagged].to(ctx.device)

        def rewrite(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            n = round(self.unlearn_ratio * len(x))  # the batch order is already random: stamp its first n
            pick = torch.randint(0, len(masks), (n,), generator=gen).to(x.device)
            out = x.float() / 255
            out[:n] = stamp(x[:n], masks[pick], patterns[pick])
            return out, y

        cfg = TrainConfig(epochs=self.unlearn_epochs, batch_size=self.unlearn_batch_size, lr=self.unlearn_lr,
                          momentum=self.momentum, nesterov=False, weight_decay=self.weight_decay, schedule="cosine",
                          bf16=ctx.bf16)
        train(model, clean, cfg, ctx.augmentation, seed=ctx.seed, device=ctx.device,
              extensions=[BatchRewrite(rewrite)], progress=ctx.progress, desc="nc unlearn", keep_ragged=True)

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = model.to(ctx.device).eval()
        data = clean.to(ctx.device)
        trig = self.reverse(model, data, ctx)
        idx, median, mad = anomaly_indices(trig.norms)
        is_flagged = flag_labels(trig.norms, self.anomaly_threshold)
        flagged = sorted(torch.nonzero(is_flagged).flatten().tolist(), key=lambda i: (float(trig.norms[i]), i))
        below = trig.norms.double() <= median
        info: dict = {
            "norms": [round(float(v), 4) for v in trig.norms],
            "anomaly_indices": [_finite(float(v)) for v in idx],
            "median": round(median, 4),
            "mad": round(mad, 4),
            "anomaly_index": _finite(float(idx[below].max())) if below.any() else 0.0,
            "flagged": [int(trig.labels[i]) for i in flagged],
            "success": [round(float(v), 4) for v in trig.success],
            "reached": [bool(v) for v in trig.reached],
            "trigger_epochs": [int(v) for v in trig.epochs],
            "trigger_steps": trig.steps,
            "unlearned": False,
        }
        tensors = {**trig.tensors(), "anomaly_indices": idx.float(), "flagged": is_flagged}
        if flagged and self.unlearn_epochs > 0:
            self.unlearn(model, data, trig, torch.tensor(flagged), ctx)
            info["unlearned"] = True
            info["acc_after_unlearn"] = accuracy(model, data, device=ctx.device, bf16=ctx.bf16)
        return DefenseResult(model=model.eval(), info=info, tensors=tensors)
