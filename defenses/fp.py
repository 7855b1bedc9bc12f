"""Fine-Pruning (FP).

Paper: Kang Liu, Brendan Dolan-Gavitt, Siddharth Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018, arXiv:1805.12185.
Reference implementation followed for the settings: BackdoorBench ``defense/fp.py`` with
``config/defense/fp/cifar10.yaml`` (github.com/SCLBD/BackdoorBench).

The method: run the clean defense data through the model, record the mean activation of
each channel of the last convolutional layer, prune channels in increasing order of mean
activation (backdoor neurons are dormant on clean inputs) until accuracy on the clean data
drops past a bound, then fine-tune the pruned model on the clean data.

Model-agnostic form. The channels are the input features of the model's last ``nn.Linear``
(in module registration order), i.e. the feature maps that feed the classifier after global
pooling; their mean activations are recorded with a forward pre-hook on that Linear. Pruning
zeroes the matching input columns of the Linear's weight, permanently (the columns are held
at zero through fine-tuning with ``torch.nn.utils.prune`` and the mask is then baked in).
For a global-average-pool + Linear head this is exactly removing the channel: pooled feature
c reaches the logits only through column c, so zeroing column c gives the same outputs as
zeroing feature map c of the last block. The recorded mean is then exactly the paper's mean
activation of that channel; with another pooling (e.g. max-pool before the average pool in
``smallcnn``) it is the mean of the pooled map, a monotone proxy of the same quantity.
Since pruning only touches the head, the pruning search runs on the features cached once
(one forward pass of the defense data), which gives the same predictions as the pruned model.

Defaults: BackdoorBench's (``config/defense/fp/cifar10.yaml``, ``defense/fp.py``), in ``official``
below with their sources:
- ``acc_ratio`` 0.1: stop once the relative accuracy drop (acc0 - acc) / acc0 reaches 10 %; the
  last pruning step within the bound is kept. The paper stops when validation accuracy falls below
  a threshold the defender picks. BackdoorBench measures this accuracy on the clean TEST set; we
  measure it on the defense data, the only data a defense gets (the model was trained on those
  images, so it is a training-set accuracy, usually higher than test accuracy).
- ``prune_step`` 0.01: ``once_prune_ratio`` (ceil(1 % of the channels) per step).
- Fine-tuning: SGD ``lr`` 0.01, momentum 0.9, weight decay 5e-4, cosine schedule, random crop
  (+flip) augmentation, ``finetune_epochs`` 100 at ``batch_size`` 256, the ragged last batch kept,
  on 5 % of the training set (the grid's defense data instead: a departure the record lists). The
  learning rate follows the fine-tuning rule (``bench/finetune.py``; BackdoorBench trains at 0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from bench.config import param
from bench.finetune import FineTuneLR
from bench.official import table
from bench.data import ImageSet
from bench.registry import BenchError
from bench.train import TrainConfig, accuracy, autocast, to_input, train
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, last_linear


@torch.no_grad()
def head_features(model: nn.Module, head: nn.Linear, data: ImageSet, ctx: DefenseContext, batch_size: int = 1024) -> torch.Tensor:
    """Inputs of ``head`` for every image of ``data`` (eval mode, no augmentation), ``[N, C]``."""
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: feats.append(args[0].reshape(-1, args[0].shape[-1])))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(data), batch_size):
            with autocast(ctx.device, ctx.bf16):
                model(to_input(data.x[i:i + batch_size].to(ctx.device)))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(feats)


@DEFENSES.register("fp")
@dataclass(frozen=True)
class FinePruning(Defense):
    description: ClassVar[str] = "Fine-Pruning: prune dormant last-layer channels, then fine-tune on clean data"
    paper: ClassVar[str] = "Liu, Dolan-Gavitt, Garg, Fine-Pruning: Defending Against Backdooring Attacks on DNNs, RAID 2018, arXiv:1805.12185"

    acc_ratio: float = param(0.1, low=0.0, high=1.0, doc="stop pruning once the relative clean-accuracy drop reaches this")
    prune_step: float = param(0.01, low=0.0, high=1.0, doc="fraction of the channels pruned per step (at least one; 0: one at a time, as in the paper)")
    finetune_epochs: int = param(100, low=0, doc="fine-tuning epochs on the defense data (0: prune only)")
    lr: float = param(0.01, low=0.0, doc="fine-tuning SGD learning rate (cosine schedule); scaled by the fine-tuning rule")
    momentum: float = param(0.9, low=0.0, high=1.0)
    weight_decay: float = param(5e-4, low=0.0)
    batch_size: int = param(256, low=1, doc="fine-tuning batch size (the ragged last batch kept)")

    official: ClassVar[dict] = table(
        acc_ratio=(0.1, "BackdoorBench config/defense/fp/cifar10.yaml: acc_ratio 0.1"),
        prune_step=(0.01, "BackdoorBench config/defense/fp/cifar10.yaml: once_prune_ratio 0.01"),
        finetune_epochs=(100, "BackdoorBench config/defense/fp/cifar10.yaml: epochs 100"),
        lr=(0.01, "BackdoorBench config/defense/fp/cifar10.yaml: lr 0.01"),
        momentum=(0.9, "BackdoorBench config/defense/fp/cifar10.yaml: sgd_momentum 0.9"),
        weight_decay=(5e-4, "BackdoorBench config/defense/fp/cifar10.yaml: wd 0.0005"),
        batch_size=(256, "BackdoorBench config/defense/fp/cifar10.yaml: batch_size 256"),
        defense_data=(0.05, "BackdoorBench config/defense/fp/cifar10.yaml: ratio 0.05"),
    )
    finetune_lr: ClassVar[FineTuneLR] = FineTuneLR(("lr",), 0.01, "BackdoorBench trains at SGD lr 0.01 (config/attack/prototype/cifar10.yaml)")

    def prune_order(self, feats: torch.Tensor) -> torch.Tensor:
        """Channels in increasing order of mean activation (ties: lower index first)."""
        return torch.sort(feats.float().mean(0), stable=True).indices.cpu()

    def search(self, feats: torch.Tensor, y: torch.Tensor, head: nn.Linear, ctx: DefenseContext) -> tuple[torch.Tensor, int, float, list]:
        """(channel order, how many to prune, accuracy unpruned, [(count, accuracy), ...] curve) from cached features."""
        order = self.prune_order(feats)
        c = feats.shape[1]
        w, b = head.weight.detach(), None if head.bias is None else head.bias.detach()

        def acc(k: int) -> float:
            keep = torch.ones(c, device=w.device, dtype=w.dtype)
            keep[order[:k].to(w.device)] = 0
            with autocast(ctx.device, ctx.bf16):
                out = F.linear(feats, w * keep, b)
            return (out.argmax(1) == y).float().mean().item()

        acc0 = acc(0)
        chosen, curve = 0, [(0, acc0)]
        step = max(1, math.ceil(self.prune_step * c))
        for k in range(step, c, step):  # never all channels
            a = acc(k)
            curve.append((k, a))
            if acc0 - a >= self.acc_ratio * acc0 and acc0 > 0:
                break
            chosen = k
        return order, chosen, acc0, curve

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = model.to(ctx.device)
        data = clean.to(ctx.device)
        name, head = last_linear(model, "fp")
        feats = head_features(model, head, data, ctx)
        if feats.shape[0] != len(data):
            raise BenchError(f"fp: the last nn.Linear ({name}) is not called once per image; cannot rank its channels")
        order, k, acc0, curve = self.search(feats, data.y, head, ctx)
        keep = torch.ones_like(head.weight)
        keep[:, order[:k].to(keep.device)] = 0
        tprune.custom_from_mask(head, "weight", keep)  # the columns stay zero while fine-tuning
        acc_pruned = accuracy(model, data, device=ctx.device, bf16=ctx.bf16)
        if self.finetune_epochs > 0:
            cfg = TrainConfig(epochs=self.finetune_epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                              nesterov=False, weight_decay=self.weight_decay, schedule="cosine", bf16=ctx.bf16)
            train(model, data, cfg, ctx.augmentation, seed=ctx.seed, device=ctx.device, progress=ctx.progress, desc="fp finetune",
                  keep_ragged=True)
        tprune.remove(head, "weight")  # bake the mask in: a plain Linear with zero columns
        model.eval()
        info = {
            "layer": name,
            "channels_pruned": k,
            "channels_total": int(feats.shape[1]),
            "pruned_channels": [int(i) for i in order[:k]],
            "acc_before": acc0,
            "acc_after_prune": acc_pruned,
            "acc_after_finetune": accuracy(model, data, device=ctx.device, bf16=ctx.bf16),
            "prune_curve": [[n, round(a, 4)] for n, a in curve],
        }
        return DefenseResult(model=model, info=info)
