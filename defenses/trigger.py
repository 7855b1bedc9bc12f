"""Trigger synthesis: reverse-engineer a (mask, pattern) trigger for each candidate target label.

The optimisation of Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating
Backdoor Attacks in Neural Networks", IEEE S&P 2019; official code github.com/bolunwang/backdoor,
``visualizer.py`` and its GTSRB driver ``gtsrb_visualize_example.py``), batched over labels. It is
the project's one trigger optimiser: Neural Cleanse (``defenses/nc.py``) uses it, and so will RNP's
trigger recovery.

For label t it finds the smallest trigger that sends clean images to t. A stamped image is
``x' = (1 - m) * x + m * p`` with a mask ``m`` ``[1, H, W]`` and a pattern ``p`` ``[C, H, W]``, both
in [0, 1] through ``(tanh(v) + 1) / 2`` of free variables ``v`` (official parametrisation; it
divides by ``2 - 1e-7`` instead of 2, a no-op in float32). Loss: ``CE(f(x'), t) + cost_t * |m|_1``.
After each epoch (``batches_per_epoch`` mini-batches), from the epoch's mean attack success rate:
success >= ``success_threshold`` for ``patience`` epochs in a row multiplies ``cost_t`` by
``cost_multiplier``, failure for ``patience`` epochs divides it by ``cost_multiplier ** 1.5``; the
mask kept is the one of smallest mean L1 among epochs that reached the threshold (the last one if
none did); a label stops early once its cost has moved both up and down and its best L1 has not
improved for ``early_stop_patience`` epochs.

Batched over labels: all K labels share each mini-batch of B clean images, and one forward pass
over ``[K x B]`` stamped images serves them all (labels that stopped early drop out). Every label
keeps its own variables, Adam state (Adam is element-wise), cost, counters and best mask, and the
model is in eval mode (no BatchNorm statistics across images), so label t's result does not depend
on which other labels are optimised with it (up to floating-point summation order).

Reuse (RNP's trigger recovery, or any method that wants triggers of another model): call
``reverse_triggers(other_model, clean, labels, TriggerSearch(...), gen=..., device=...)`` with the
model the triggers must fool, e.g. RNP's unlearned model; the function only needs a module mapping
float images in [0, 1] to logits. It leaves the model's weights, ``requires_grad`` flags and
train/eval mode as it found them. ``Triggers.stamp`` applies the result to any batch.

Defaults (``TriggerSearch``), and where they come from:
- ``lr`` 0.1, Adam betas (0.5, 0.9), Adam epsilon 1e-7 (Keras' default): ``LR`` of the GTSRB driver;
  ``Adam(lr, beta_1=0.5, beta_2=0.9)`` in ``visualizer.py``.
- ``batch_size`` 32, ``init_cost`` 1e-3, ``success_threshold`` 0.99, ``patience`` 5,
  ``early_stop_patience`` 25 (= 5 x patience), ``early_stop_threshold`` 1.0: the GTSRB driver.
- ``cost_multiplier`` 2: the GTSRB driver (``COST_MULTIPLIER = 2``; BackdoorBench's NC configs
  also use 2). ``visualizer.py``'s class default reads ``1.5,`` (a one-element tuple that would
  fail at ``** 1.5``), so it is never the value used. Down-steps divide by ``2 ** 1.5``.
- Random uniform initial mask and pattern, no augmentation of the clean images: the GTSRB driver.
- ``epochs`` 1000 and ``batches_per_epoch`` 31: the driver's ``STEPS = 1000`` epochs of
  ``NB_SAMPLE // BATCH_SIZE = 1000 // 32 = 31`` mini-batches, ended early per label by the early stop.
- ``reset_cost_to_zero`` on: the cost starts at 0 and is set to ``init_cost`` once the trigger has
  reached ``success_threshold`` for ``patience`` epochs in a row (``visualizer.py``'s class default
  ``RESET_COST_TO_ZERO = True``, which the driver keeps). Off, the cost starts at ``init_cost``, as
  BackdoorBench's NC does.

Departures: mini-batches are drawn from reshuffled passes over the clean data without a ragged last
batch (the official generator cycles through its whole test set). The loss is the cross-entropy of the
target label, as the paper writes it and BackdoorBench computes it; the Keras code passes
``categorical_crossentropy`` its arguments swapped, which makes its loss 16.12 (1 - p_t), linear in the
target's probability (docs/official-vs-ours.md, NC: it leaves larger masks at the same budget). A preset may shorten the budget
(``epochs``, ``batches_per_epoch``); the record lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import Config, param
from bench.data import ImageSet
from bench.official import table
from bench.registry import BenchError
from bench.train import autocast

BETAS = (0.5, 0.9)  # visualizer.py: Adam(beta_1=0.5, beta_2=0.9)
ADAM_EPS = 1e-7  # Keras' default epsilon (K.epsilon())


@dataclass(frozen=True)
class TriggerSearch(Config):
    """Hyperparameters of the trigger optimiser (official Neural Cleanse values, see the module doc)."""

    epochs: int = param(1000, low=1, doc="most optimisation epochs per label (official GTSRB driver: 1000, with early stop)")
    batches_per_epoch: int = param(31, low=0, doc="mini-batches per epoch, after which cost, best mask and early stop update; 0: one pass over the clean data (official: 31)")
    batch_size: int = param(32, low=1, doc="clean images per label and mini-batch (official 32)")
    lr: float = param(0.1, low=0.0, doc="Adam learning rate on the tanh-space mask and pattern (official 0.1)")
    init_cost: float = param(1e-3, low=0.0, doc="initial weight of the mask's L1 norm in the loss (official 1e-3)")
    success_threshold: float = param(0.99, low=0.0, high=1.0, doc="attack success rate that counts as a working trigger (official 0.99)")
    patience: int = param(5, low=1, doc="epochs above/below the threshold before the cost moves (official 5)")
    cost_multiplier: float = param(2.0, low=1.0, doc="cost x this after success, / this**1.5 after failure (official GTSRB 2)")
    early_stop_threshold: float = param(1.0, low=0.0, high=1.0, doc="best L1 counts as improved only below this x the earlier best (official GTSRB 1.0)")
    early_stop_patience: int = param(25, low=1, doc="epochs without improvement before a label stops (official 25)")
    reset_cost_to_zero: bool = param(True, doc="start the cost at 0 and set init_cost after patience successful epochs (official); false: start at init_cost")

    official: ClassVar[dict] = table(
        epochs=(1000, "bolunwang/backdoor gtsrb_visualize_example.py: STEPS = 1000"),
        batches_per_epoch=(31, "bolunwang/backdoor gtsrb_visualize_example.py: MINI_BATCH = NB_SAMPLE // BATCH_SIZE = 1000 // 32"),
        batch_size=(32, "bolunwang/backdoor gtsrb_visualize_example.py: BATCH_SIZE = 32"),
        lr=(0.1, "bolunwang/backdoor gtsrb_visualize_example.py: LR = 0.1"),
        init_cost=(1e-3, "bolunwang/backdoor gtsrb_visualize_example.py: INIT_COST = 1e-3"),
        success_threshold=(0.99, "bolunwang/backdoor gtsrb_visualize_example.py: ATTACK_SUCC_THRESHOLD = 0.99"),
        patience=(5, "bolunwang/backdoor gtsrb_visualize_example.py: PATIENCE = 5"),
        cost_multiplier=(2.0, "bolunwang/backdoor gtsrb_visualize_example.py: COST_MULTIPLIER = 2"),
        early_stop_threshold=(1.0, "bolunwang/backdoor gtsrb_visualize_example.py: EARLY_STOP_THRESHOLD = 1.0"),
        early_stop_patience=(25, "bolunwang/backdoor gtsrb_visualize_example.py: EARLY_STOP_PATIENCE = 5 * PATIENCE"),
        reset_cost_to_zero=(True, "bolunwang/backdoor visualizer.py: RESET_COST_TO_ZERO = True (the driver keeps it)"),
    )


@dataclass
class Triggers:
    """Reversed triggers, one row per candidate label (all tensors on the CPU)."""

    labels: torch.Tensor  # [K] int64
    masks: torch.Tensor  # [K, 1, H, W] in [0, 1]
    patterns: torch.Tensor  # [K, C, H, W] in [0, 1]
    norms: torch.Tensor  # [K] L1 norm of each mask
    success: torch.Tensor  # [K] mean attack success rate of the epoch the mask comes from
    reached: torch.Tensor  # [K] bool: some epoch reached success_threshold
    epochs: torch.Tensor  # [K] int64: epochs run per label (fewer than asked after an early stop)
    steps: int  # optimiser steps run (mini-batches), all labels together

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1]: ``x`` (uint8 or float in [0, 1]) stamped with trigger ``which[i]`` each."""
        return stamp(x, self.masks[which].to(x.device), self.patterns[which].to(x.device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors, by name, for a safetensors file."""
        return {"labels": self.labels, "masks": self.masks, "patterns": self.patterns, "norms": self.norms,
                "success": self.success, "reached": self.reached, "epochs": self.epochs}


def stamp(x: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """``(1 - m) * x + m * p`` per image, as float in [0, 1]; ``x`` uint8 or float ``[B, C, H, W]``."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return (1 - masks) * x + masks * patterns


def _squash(v: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(v) + 1) / 2


def _unsquash(u: torch.Tensor) -> torch.Tensor:
    return torch.atanh(u.clamp(1e-6, 1 - 1e-6) * 2 - 1)


def _batches(n: int, b: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches of size ``min(b, n)`` from reshuffled passes (a pass's short tail is dropped)."""
    b = min(b, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            yield perm[i:i + b]


@dataclass
class _Label:
    """One label's cost control and best result, as the official optimiser keeps them."""

    cost: float
    reg_best: float = float("inf")
    es_best: float = float("inf")
    es_count: int = 0
    up: int = 0
    down: int = 0
    up_flag: bool = False
    down_flag: bool = False
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    success: float = 0.0
    epochs: int = 0
    done: bool = False
    set_count: int = 0  # successful epochs at cost 0 (reset_cost_to_zero)

    def end_epoch(self, s: TriggerSearch, acc: float, reg: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        """The official per-epoch update: best mask, early stop, then the cost."""
        self.epochs += 1
        if acc >= s.success_threshold and reg < self.reg_best:
            self.best, self.reg_best, self.success = (mask.clone(), pattern.clone()), reg, acc
        if self.reg_best < float("inf"):
            self.es_count = self.es_count + 1 if self.reg_best >= s.early_stop_threshold * self.es_best else 0
        self.es_best = min(self.es_best, self.reg_best)
        if self.up_flag and self.down_flag and self.es_count >= s.early_stop_patience:
            self.done = True
            return
        if self.cost == 0 and acc >= s.success_threshold:  # the zero-cost start: init_cost after patience successes
            self.set_count += 1
            if self.set_count >= s.patience:
                self.cost, self.up, self.down, self.up_flag, self.down_flag = s.init_cost, 0, 0, False, False
        else:
            self.set_count = 0
        self.up, self.down = (self.up + 1, 0) if acc >= s.success_threshold else (0, self.down + 1)
        if self.up >= s.patience:
            self.up, self.cost, self.up_flag = 0, self.cost * s.cost_multiplier, True
        elif self.down >= s.patience:
            self.down, self.cost, self.down_flag = 0, self.cost / s.cost_multiplier ** 1.5, True
        if self.best is None:
            self.success = acc


def reverse_triggers(
    model: nn.Module,
    data: ImageSet,
    labels: Sequence[int],
    search: TriggerSearch,
    *,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
    bf16: bool = True,
    max_images: int = 2048,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Triggers:
    """Reverse-engineer one (mask, pattern) trigger per label in ``labels``, all labels batched.

    Args:
        model: maps float images in [0, 1] ``[N, C, H, W]`` to logits; run in eval mode, weights untouched.
        data: clean images (uint8); mini-batches are drawn from it with ``gen``.
        labels: the candidate target labels.
        search: the optimiser's hyperparameters.
        gen: CPU generator for the initial triggers and the batch order (the global RNG is not used).
        device: where to compute.
        bf16: bf16 autocast where the device supports it natively.
        max_images: most stamped images per forward pass; more labels x batch are split into chunks.
        init: optional starting triggers ``(masks [K, 1, H, W], patterns [K, C, H, W])`` in [0, 1], one per
            label, in place of the random uniform start (e.g. triggers found on another model).

    Returns:
        The triggers, the mask of each label's best epoch (see the module doc), on the CPU.
    """
    device = torch.device(device)
    data = data.to(device)
    k, (c, h, w) = len(labels), tuple(data.x.shape[1:])
    # Each label's initial trigger comes from its own seed, so it does not depend on the other labels.
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    if init is None:
        starts = torch.stack([torch.rand(1 + c, h, w, generator=torch.Generator().manual_seed((base << 16) + int(t)))
                              for t in labels])
    else:
        starts = torch.cat([init[0].float(), init[1].float()], dim=1).cpu()
        if starts.shape != (k, 1 + c, h, w):
            raise BenchError(f"init triggers of shape {tuple(starts.shape)}: need masks [{k}, 1, {h}, {w}] "
                             f"and patterns [{k}, {c}, {h}, {w}]")
    start = _unsquash(starts).to(device)
    mask_v = start[:, :1].clone().requires_grad_(True)
    pat_v = start[:, 1:].clone().requires_grad_(True)
    opt = torch.optim.Adam([mask_v, pat_v], lr=search.lr, betas=BETAS, eps=ADAM_EPS)
    target = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    state = [_Label(cost=0.0 if search.reset_cost_to_zero else search.init_cost) for _ in labels]
    stream = _batches(len(data), search.batch_size, gen)
    per_epoch = search.batches_per_epoch or max(1, len(data) // search.batch_size)
    was_training, steps = model.training, 0
    model.eval()
    try:
        for _ in range(search.epochs):
            active = torch.tensor([i for i, s in enumerate(state) if not s.done], dtype=torch.long)
            if len(active) == 0:
                break
            acc_sum = torch.zeros(k, device=device)
            reg_sum = torch.zeros(k, device=device)
            for _ in range(per_epoch):
                x = data.x[next(stream).to(device)].float() / 255
                b = len(x)
                grads = [torch.zeros_like(mask_v), torch.zeros_like(pat_v)]
                for part in torch.split(active, max(1, max_images // b)):
                    idx = part.to(device)
                    m, p = _squash(mask_v[idx]), _squash(pat_v[idx])
                    xs = ((1 - m)[:, None] * x[None] + (m * p)[:, None]).flatten(0, 1)
                    with autocast(device, bf16):
                        out = model(xs.contiguous(memory_format=torch.channels_last))
                    tgt = target[idx].repeat_interleave(b)
                    ce = F.cross_entropy(out.float(), tgt, reduction="none").view(len(idx), b).mean(1)
                    l1 = m.flatten(1).sum(1)
                    cost = torch.tensor([state[i].cost for i in part.tolist()], device=device)
                    g = torch.autograd.grad((ce + cost * l1).sum(), [mask_v, pat_v])
                    grads[0] += g[0]
                    grads[1] += g[1]
                    acc_sum[idx] += (out.argmax(1) == tgt).view(len(idx), b).float().mean(1)
                    reg_sum[idx] += l1.detach()
                mask_v.grad, pat_v.grad = grads
                opt.step()
                steps += 1
            acc = (acc_sum / per_epoch).tolist()
            reg = (reg_sum / per_epoch).tolist()
            with torch.no_grad():
                masks, patterns = _squash(mask_v).cpu(), _squash(pat_v).cpu()
            for i in active.tolist():
                state[i].end_epoch(search, acc[i], reg[i], masks[i], patterns[i])
    finally:
        model.train(was_training)
    with torch.no_grad():
        last_m, last_p = _squash(mask_v).cpu(), _squash(pat_v).cpu()
    best = [s.best if s.best is not None else (last_m[i], last_p[i]) for i, s in enumerate(state)]
    masks = torch.stack([bm for bm, _ in best])
    return Triggers(
        labels=target.cpu(),
        masks=masks,
        patterns=torch.stack([bp for _, bp in best]),
        norms=masks.flatten(1).sum(1),
        success=torch.tensor([s.success for s in state]),
        reached=torch.tensor([s.best is not None for s in state]),
        epochs=torch.tensor([s.epochs for s in state], dtype=torch.long),
        steps=steps,
    )
