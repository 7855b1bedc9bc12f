"""Feature Shift Tuning (FST).

Paper: Rui Min, Zeyu Qin, Li Shen, Minhao Cheng, "Towards Stable Backdoor Purification through
Feature Shift Tuning", NeurIPS 2023, arXiv:2310.01875.
Official code: github.com/AISafety-HKUST/stable_backdoor_purification (``fine_tune/ft.py`` with
``--ft_mode fst``; the command line of its ``README.md``).

The method: re-initialise the linear classifier head, then fine-tune all weights on the clean
defense data with cross-entropy plus ``alpha * <W, W_orig>``, the inner product (sum of the
elementwise product) of the head's weight with its ORIGINAL, backdoored weight: minimising it
pushes the new head away from the compromised one, which shifts the features the backbone
learns. After every optimiser step the head's weight is rescaled to the Frobenius norm of the
original weight, so the penalty cannot be lowered by shrinking the head. The head is the model's
last ``nn.Linear`` (``defenses.base.last_linear``); the official code names it (``--linear_name``).
On other libraries' models the same rule holds (torchvision's ResNets: ``net.fc``); one whose
classifier is not an ``nn.Linear`` (torchvision's SqueezeNet ends in a 1x1 conv) is refused on one line.

Everything runs through the shared trainer ``bench.train.train``; the penalty and the
rescaling are one extension (:class:`HeadShift`: ``loss`` and ``after_step``).

Defaults: the official README's CIFAR-10 command (``official`` below, with sources): ``epochs`` 10,
``lr`` 0.01, ``alpha`` 0.1 (``fine_tune/ft.py``'s argparse default is 0.2; the README passes 0.1 and
advises a smaller alpha, or 0, where clean accuracy drops), SGD with ``momentum`` 0.9, no weight
decay, no Nesterov, a cosine schedule over the epochs, ``batch_size`` 128 with the ragged last batch
kept, on 2 % of the training set (``--split_ratio 0.02``; the grid's defense data instead: a departure
the record lists). The head is re-initialised with weight and bias uniform in ``[-1/sqrt(fan_in),
1/sqrt(fan_in)]`` (the official code draws both with the weight's bound), from a generator seeded
with the defense seed; only the weight is rescaled, as there. ``lr`` follows the fine-tuning rule
(``bench/finetune.py``; FST trains its backdoored models at SGD 0.1, its
``config/attack/prototype/cifar10.yaml``). Measurements: docs/measurements.md.

Departure: the cosine schedule is stepped per optimiser step here, per epoch there (same shape).

``info``: ``head`` (module name), ``head_norm`` (the original Frobenius norm the head is held at),
``inner_product_before`` / ``inner_product_after`` (``<W, W_orig>`` right after re-initialisation
and at the end), ``acc_before`` / ``acc_after`` on the defense data, ``train_loss``, ``train_acc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bench.config import param
from bench.finetune import FineTuneLR
from bench.official import table
from bench.data import ImageSet
from bench.registry import BenchError
from bench.train import TrainConfig, TrainExtension, accuracy, train
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult, last_linear


class HeadShift(TrainExtension):
    """FST's two changes to training: ``alpha * <W, W_orig>`` added to the loss, and ``W`` rescaled
    to ``norm`` after every optimiser step.

    Args:
        head: the classifier whose weight ``W`` is trained.
        original: the original (backdoored) weight ``W_orig``, a detached copy.
        alpha: weight of the inner-product penalty.
        norm: the Frobenius norm ``W`` is rescaled to (that of ``W_orig``).
    """

    def __init__(self, head: nn.Linear, original: torch.Tensor, alpha: float, norm: float) -> None:
        self.head, self.original, self.alpha, self.norm = head, original, alpha, norm

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss + self.alpha * (self.head.weight.float() * self.original.to(self.head.weight.device)).sum()

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        w = self.head.weight
        w.mul_(self.norm / w.norm())


def reinit_head(head: nn.Linear, gen: torch.Generator) -> None:
    """Weight and bias uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, drawn from ``gen`` (on the CPU)."""
    bound = 1.0 / math.sqrt(head.weight.shape[1])
    with torch.no_grad():
        for q in (head.weight, head.bias):
            if q is not None:
                q.copy_(torch.empty(q.shape).uniform_(-bound, bound, generator=gen))


@DEFENSES.register("fst")
@dataclass(frozen=True)
class FST(Defense):
    description: ClassVar[str] = "Feature Shift Tuning: re-initialised head pushed away from the backdoored one, norm held"
    paper: ClassVar[str] = ("Min, Qin, Shen, Cheng, Towards Stable Backdoor Purification through Feature Shift Tuning, "
                            "NeurIPS 2023, arXiv:2310.01875")

    epochs: int = param(10, low=1, doc="fine-tuning epochs")
    lr: float = param(0.01, low=0.0, doc="peak SGD learning rate (cosine schedule)")
    alpha: float = param(0.1, low=0.0, doc="weight of the inner product <W_head, W_head_original> in the loss")
    momentum: float = param(0.9, low=0.0, high=1.0)
    weight_decay: float = param(0.0, low=0.0)
    batch_size: int = param(128, low=1, doc="images per step (the ragged last batch kept)")

    official: ClassVar[dict] = table(
        epochs=(10, "AISafety-HKUST/stable_backdoor_purification README.md: --epochs 10"),
        lr=(0.01, "AISafety-HKUST/stable_backdoor_purification README.md: --lr 0.01"),
        alpha=(0.1, "AISafety-HKUST/stable_backdoor_purification README.md CIFAR-10 command: --alpha 0.1 (ft.py default 0.2)"),
        momentum=(0.9, "AISafety-HKUST/stable_backdoor_purification fine_tune/ft.py: SGD(momentum=0.9)"),
        weight_decay=(0.0, "AISafety-HKUST/stable_backdoor_purification fine_tune/ft.py: SGD without weight decay"),
        batch_size=(128, "AISafety-HKUST/stable_backdoor_purification fine_tune/ft.py: --batch_size 128"),
        defense_data=(0.02, "AISafety-HKUST/stable_backdoor_purification README.md: --split_ratio 0.02"),
    )
    finetune_lr: ClassVar[FineTuneLR] = FineTuneLR(
        ("lr",), 0.1, "FST trains its backdoored models at SGD lr 0.1 (stable_backdoor_purification config/attack/prototype/cifar10.yaml)")

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = model.to(ctx.device)
        data = clean.to(ctx.device)
        try:
            name, head = last_linear(model, "fst")
        except BenchError:
            raise BenchError("fst needs a model whose classifier is an nn.Linear (it re-initialises that layer)") from None
        acc_before = accuracy(model, data, device=ctx.device, bf16=ctx.bf16)
        original = head.weight.detach().clone().float()
        norm = original.norm().item()
        reinit_head(head, torch.Generator().manual_seed(ctx.seed))
        ip_before = (head.weight.detach().float() * original).sum().item()
        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, nesterov=False,
                          weight_decay=self.weight_decay, schedule="cosine", bf16=ctx.bf16)
        stats = train(model, data, cfg, ctx.augmentation, seed=ctx.seed, device=ctx.device,
                      extensions=[HeadShift(head, original, self.alpha, norm)], progress=ctx.progress, desc="fst",
                      keep_ragged=True)
        model.eval()
        info = {
            "head": name,
            "head_norm": norm,
            "inner_product_before": ip_before,
            "inner_product_after": (head.weight.detach().float() * original).sum().item(),
            "acc_before": acc_before,
            "acc_after": accuracy(model, data, device=ctx.device, bf16=ctx.bf16),
            "train_loss": stats["loss"],
            "train_acc": stats["train_acc"],
        }
        return DefenseResult(model=model, info=info)
