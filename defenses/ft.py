"""Fine-tuning (FT): all weights, on the clean defense data.

The baseline every fine-tuning defense improves on. Fine-tuning alone as a backdoor defense is
evaluated in Kang Liu, Brendan Dolan-Gavitt, Siddharth Garg, "Fine-Pruning: Defending Against
Backdooring Attacks on Deep Neural Networks", RAID 2018, arXiv:1805.12185, and is BackdoorBench's
``ft`` (Baoyuan Wu et al., "BackdoorBench: A Comprehensive Benchmark of Backdoor Learning",
NeurIPS 2022 Datasets and Benchmarks, arXiv:2206.12654).
Reference implementation followed for the settings: BackdoorBench ``defense/ft.py`` with
``config/defense/ft/cifar10.yaml`` (``gtsrb.yaml`` is identical but for the dataset name) and the
SGD and scheduler of ``utils/aggregate_block/train_settings_generate.py``
(github.com/SCLBD/BackdoorBench).

The model trains on cross-entropy over the defense data, with the dataset's augmentation (random
crop with padding; horizontal flip where the dataset flips, as BackdoorBench flips CIFAR-10 only),
through the shared trainer ``bench.train.train``.

Defaults: BackdoorBench's, in ``official`` below with their sources: SGD ``lr`` 0.01, ``momentum``
0.9 (no Nesterov), ``weight_decay`` 5e-4, cosine schedule (``CosineAnnealingLR``, stepped per epoch
there, per step here: the same shape), ``epochs`` 100, ``batch_size`` 256, the ragged last batch
kept (its DataLoader's default), on 5 % of the training set. The grid gives every defense the same
defense data (``run.defense_data``); the record lists the difference from the 5 % as a departure.

The learning rate follows the one fine-tuning rule (``bench/finetune.py``): BackdoorBench fine-tunes
at 0.01 the models it trains at SGD 0.01, so on a recipe that trains at 0.1 the rule fine-tunes at
0.1 (``--set run.finetune_lr=official`` keeps 0.01). Measurements at both: docs/measurements.md.

``info``: ``epochs``, ``steps``, ``acc_before`` and ``acc_after`` (accuracy on the defense data),
``train_loss`` and ``train_acc`` (over the last epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from bench.config import param
from bench.finetune import FineTuneLR
from bench.official import table
from bench.data import ImageSet
from bench.train import TrainConfig, accuracy, train
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult


@DEFENSES.register("ft")
@dataclass(frozen=True)
class FineTuning(Defense):
    description: ClassVar[str] = "Fine-tuning: train all weights on the clean defense data (BackdoorBench recipe)"
    paper: ClassVar[str] = ("Liu, Dolan-Gavitt, Garg, Fine-Pruning, RAID 2018, arXiv:1805.12185; recipe of BackdoorBench "
                            "(Wu et al., NeurIPS 2022 Datasets and Benchmarks, arXiv:2206.12654)")

    epochs: int = param(100, low=1, doc="passes over the defense data (BackdoorBench's 100)")
    lr: float = param(0.01, low=0.0, doc="peak SGD learning rate (cosine schedule); scaled by the fine-tuning rule")
    momentum: float = param(0.9, low=0.0, high=1.0)
    weight_decay: float = param(5e-4, low=0.0)
    batch_size: int = param(256, low=1, doc="images per step (the ragged last batch kept, as BackdoorBench's DataLoader)")

    official: ClassVar[dict] = table(
        epochs=(100, "BackdoorBench config/defense/ft/cifar10.yaml: epochs 100"),
        lr=(0.01, "BackdoorBench config/defense/ft/cifar10.yaml: lr 0.01"),
        momentum=(0.9, "BackdoorBench config/defense/ft/cifar10.yaml: sgd_momentum 0.9"),
        weight_decay=(5e-4, "BackdoorBench config/defense/ft/cifar10.yaml: wd 5e-4"),
        batch_size=(256, "BackdoorBench config/defense/ft/cifar10.yaml: batch_size 256"),
        defense_data=(0.05, "BackdoorBench config/defense/ft/cifar10.yaml: ratio 0.05"),
    )
    finetune_lr: ClassVar[FineTuneLR] = FineTuneLR(("lr",), 0.01, "BackdoorBench trains at SGD lr 0.01 (config/attack/prototype/cifar10.yaml)")

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = model.to(ctx.device)
        data = clean.to(ctx.device)
        acc_before = accuracy(model, data, device=ctx.device, bf16=ctx.bf16)
        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, nesterov=False,
                          weight_decay=self.weight_decay, schedule="cosine", bf16=ctx.bf16)
        stats = train(model, data, cfg, ctx.augmentation, seed=ctx.seed, device=ctx.device, progress=ctx.progress, desc="ft",
                      keep_ragged=True)
        model.eval()
        info = {
            "epochs": self.epochs,
            "steps": stats["steps"],
            "acc_before": acc_before,
            "acc_after": accuracy(model, data, device=ctx.device, bf16=ctx.bf16),
            "train_loss": stats["loss"],
            "train_acc": stats["train_acc"],
        }
        return DefenseResult(model=model, info=info)
