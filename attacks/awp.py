"""AWP: a backdoor injected by a bounded perturbation of a trained model's weights.

Paper: Garg, Kumar, Goel and Liang, "Can Adversarial Weight Perturbations Inject Neural
Backdoors?", CIKM 2020, arXiv:2008.01761. Official code: goel96vibhor/AdvWeightPerturbations
(``Vision_Experiments/main.py``, ``adv_extension.py``; linked from the paper's listing in the
backdoor-learning reading lists). The RNP authors ship AWP-backdoored CIFAR-10 weights
(bboylyg/RNP README) but no code for it.

The attack. The attacker starts from a trained, clean model with weights ``w0`` and looks for
``w`` with ``||w - w0||_inf <= eps`` that keeps the clean predictions and sends triggered
images to the target. The paper states the problem as a composite loss over clean and triggered
images minimised by projected gradient descent in weight space; the official ``adv_train`` takes
an Adam step (lr 1e-3) on the cross-entropy of a mixed set of clean and triggered images plus
``weight_reg * sum((w - w0)^2)``, then clips every parameter back into ``[w0 - eps, w0 + eps]``
(``projection_lp_norm`` with ``lp_norm='inf'``), for 10 epochs.

Here (``build_model``, called by the grid instead of training; ``attacks/base.py``):

- ``w0`` is the grid's clean reference model of the same dataset, model, recipe and seed
  (``needs_clean_model``), copied into the model the grid caches for ``awp``;
- the attacker's images: ``round(poison_rate * N)`` training images drawn with the run seed
  (the official ``extend_dataset`` draws ``num_adv_batch`` = 10 batches of 128 = 1280 images,
  2.56 % of CIFAR-10's 50,000: the default rate), each used twice: clean with its true label
  (official ``set_model_labels = 0``) and triggered with the attack's label map;
- ``epochs`` passes over those 2x images in shuffled batches of 128 (official loader),
  Adam (lr 1e-3), loss = mean cross-entropy + ``weight_reg * sum((w - w0)^2)``, then the
  projection onto the l_inf ball of radius ``eps`` around ``w0`` after every step;
- the trigger (official non-random pattern, ``num_pixels_changed`` = 100): a centred square of
  ``patch_size`` = 10 pixels set to 0 in the model's normalised space, i.e. to the per-channel
  mean of the training images (rounded to uint8), which the grid's models normalise with.
  The mean is taken from the training set in ``prepare``.

Defaults and sources: ``eps = 0.005`` (official ``model_eps``, absolute, l_inf); ``lr = 1e-3``
(official ``--lr`` with ``--optim adam``); ``epochs = 10`` (official ``num_epochs``);
``weight_reg = 5e-4`` (official ``weight_reg_param``); ``patch_size = 10`` (sqrt of
``num_pixels_changed`` = 100); ``poison_rate = 0.0256`` (1280 of 50,000); batch 128 (official
loader); target 1 (``adv_extension.py`` sets every triggered label to 1, ``targets[:] = 1``;
all-to-one only; the other attacks here default to 0). The quick preset
takes 60 epochs: at the official 10 its 4-epoch GTSRB model ended 4.3 CA points under the clean one,
at 60 2.15 (``bench/presets.py``).

Departures:

- BatchNorm layers stay in eval mode during the perturbation: their running statistics are
  buffers, not parameters, and the official ``net.train()`` would let them drift freely outside
  the bound. Here the whole model state outside the parameters stays exactly ``w0``'s, so the
  bound holds for everything that changed.
- The projection is always on (the official flag ``--train_model_eps_ball`` switches it); the
  paper's method is the projected one.
- The images are not augmented (the official transforms have crop and flip commented out), run in
  float32 (no bf16 autocast: the step count is small).
- Nothing in the training set is poisoned: ``poison`` returns it unchanged with empty indices, so
  defenses draw their clean data from the whole set and sample-level detectors have no poisoned
  training image to find (the attacker's images never enter the victim's training).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import ATTACKS, Attack, PoisonedSet
from bench.config import param
from bench.data import ImageSet
from bench.official import table
from bench.registry import BenchError

BATCH = 128  # official DataLoader batch size


@ATTACKS.register("awp")
@dataclass(frozen=True)
class AWP(Attack):
    description: ClassVar[str] = ("adversarial weight perturbation: the clean reference model's weights moved within an "
                                  "l_inf ball (PGD, Adam + projection) so a centred mean-colour patch flips to the target")
    paper: ClassVar[str] = ("Garg, Kumar, Goel & Liang, Can Adversarial Weight Perturbations Inject Neural Backdoors?, "
                            "CIKM 2020, arXiv:2008.01761")
    needs_clean_model: ClassVar[bool] = True
    weight_attack: ClassVar[bool] = True

    target: int = param(1, low=0, doc="target class (all-to-one; official: 1, hard-coded)")
    poison_rate: float = param(0.0256, low=0.0, high=1.0,
                               doc="share of the training set the attacker uses, each image clean and triggered "
                                   "(official 10 batches of 128 = 1280 of 50,000); the training set itself is not poisoned")
    eps: float = param(0.005, doc="l_inf bound on every parameter's change, absolute (official model_eps: 0.005); > 0")
    epochs: int = param(10, low=1, doc="passes over the attacker's images (official num_epochs: 10)")
    lr: float = param(1e-3, low=0.0, doc="Adam learning rate (official lr with optim adam: 1e-3)")
    weight_reg: float = param(5e-4, low=0.0, doc="weight of sum((w - w0)^2) in the loss (official weight_reg_param: 5e-4)")
    patch_size: int = param(10, low=1, doc="side of the centred square trigger (official num_pixels_changed 100 = 10x10)")

    official: ClassVar[dict] = table(
        target=(1, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/adv_extension.py: targets[:] = 1"),
        poison_rate=(0.0256, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/main.py: --num_adv_batch 10 batches "
                             "of 128 (adv_extension.py), 1280 of CIFAR-10's 50,000 images"),
        label_mode=("all2one", "goel96vibhor/AdvWeightPerturbations Vision_Experiments/adv_extension.py: one label for "
                               "every triggered image"),
        eps=(0.005, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/main.py: --model_eps 0.005 (--lp_norm inf)"),
        epochs=(10, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/main.py: --num_epochs 10"),
        lr=(1e-3, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/main.py: --lr 0.001 with --optim adam"),
        weight_reg=(5e-4, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/main.py: --weight_reg_param 0.0005"),
        patch_size=(10, "goel96vibhor/AdvWeightPerturbations Vision_Experiments/main.py: --num_pixels_changed 100, "
                        "a sqrt(100) = 10 pixel square (adv_extension.py)"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps > 0:
            raise BenchError(f"awp.eps={self.eps!r} is out of range; allowed: > 0 (the l_inf bound on the weight change)")

    # ------------------------------------------------------------ the trigger
    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int,
                reference: Optional[nn.Module] = None) -> None:
        super().prepare(num_classes, channels, size, train, seed, reference)
        if self.patch_size > size:
            raise BenchError(f"awp.patch_size={self.patch_size} is larger than the {size}x{size} images")
        mean = train.x.float().mean(dim=(0, 2, 3)) if len(train) else torch.full((channels,), 127.5)
        self.state["colour"] = mean.round().clamp(0, 255).to(torch.uint8)
        self.state["arch"] = torch.tensor([channels, size])

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        size = int(self.state["arch"][1])
        lo = (size - self.patch_size) // 2
        out = x.clone()
        out[:, :, lo:lo + self.patch_size, lo:lo + self.patch_size] = self.state["colour"].to(x.device)[None, :, None, None]
        return out

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        """AWP trains on nothing: the training set stays clean, no index is poisoned."""
        return PoisonedSet(ImageSet(train.x, train.y), torch.zeros(0, dtype=torch.long))

    # ------------------------------------------------------------ the weight perturbation
    def attacker_images(self, train: ImageSet, seed: int) -> ImageSet:
        """The attacker's set: ``round(poison_rate * N)`` images drawn with ``seed``, clean (true label) and triggered."""
        count = min(len(train), int(round(self.poison_rate * len(train))))
        if count == 0:
            raise BenchError(f"awp.poison_rate={self.poison_rate:g} draws no image of the {len(train)} training images; "
                             "allowed: a rate that draws at least one")
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(train), generator=gen)[:count].sort().values
        x, y = train.x[idx], train.y[idx]
        xt, yt = self.apply(x, y)
        return ImageSet(torch.cat([x, xt]), torch.cat([y, yt]))

    def build_model(self, model: nn.Module, reference: nn.Module, train: ImageSet, seed: int,
                    device: torch.device | str = "cpu") -> dict:
        """Load ``reference``'s state into ``model`` and perturb its parameters (module notes); returns the stats."""
        t0 = time.perf_counter()
        device = torch.device(device)
        model.load_state_dict(reference.state_dict())
        model.to(device).eval()  # BatchNorm statistics frozen (module notes)
        params = [p for p in model.parameters() if p.requires_grad]
        w0 = [p.detach().clone() for p in params]
        data = self.attacker_images(train, seed).to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.Adam(params, lr=self.lr)
        n = len(data)
        loss_sum, correct, seen, steps = 0.0, 0, 0, 0
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            loss_sum, correct, seen = 0.0, 0, 0
            for i in range(0, n, BATCH):
                idx = perm[i:i + BATCH]
                x = data.x[idx].float() / 255
                out = model(x)
                loss = F.cross_entropy(out, data.y[idx])
                if self.weight_reg:
                    loss = loss + self.weight_reg * sum(((p - q) ** 2).sum() for p, q in zip(params, w0))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # projection onto the l_inf ball around w0
                    for p, q in zip(params, w0):
                        p.copy_(torch.minimum(torch.maximum(p, q - self.eps), q + self.eps))
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((out.argmax(1) == data.y[idx]).sum())
                seen += len(idx)
                steps += 1
        model.eval()
        seconds = time.perf_counter() - t0
        change = max((float((p.detach() - q).abs().max()) for p, q in zip(params, w0)), default=0.0)
        return {"seconds": seconds, "plan_seconds": 0.0, "img_per_s": n * self.epochs / max(seconds, 1e-9),
                "loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                "threads": torch.get_num_threads() if device.type == "cpu" else None,
                "weight_change_linf": change, "attacker_images": n // 2}


def perturbed_copy(attack: AWP, reference: nn.Module, train: ImageSet, seed: int) -> tuple[nn.Module, dict]:
    """A perturbed copy of ``reference`` (the reference itself untouched): for tests and notebooks."""
    model = copy.deepcopy(reference)
    stats = attack.build_model(model, reference, train, seed)
    return model, stats
