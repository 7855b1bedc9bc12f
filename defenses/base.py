"""The defense interface and the ``DEFENSES`` registry.

A defense is a frozen dataclass of hyperparameters (paper or official-code defaults)
called as ``defense(model, clean, ctx) -> DefenseResult``. It receives a copy of the
backdoored model and the clean defense subset, and nothing else: no test set, no
poisoned training data, no trigger, no target label. Any choice it makes (a pruning
threshold, how many channels) comes from the defense data alone.

A defense may also return ``sweep``: a callable yielding ``(setting, model)`` or
``(setting, model, facts_dict)`` over its whole operating curve (RNP: every pruning threshold). The harness evaluates it on
the test sets after the fact, for plots labelled as an oracle view; it never feeds
back into the defense's choice. Consecutive settings may yield the same model object
(``defenses.masks.pruning_sweep``: thresholds that prune the same channels); it is evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Optional

import torch
from torch import nn

from bench.config import Config
from bench.data import Augmentation
from bench.registry import BenchError, Registry

DEFENSES: Registry[type["Defense"]] = Registry("defense", entry_point_group="bdbench.defenses")


def batches_per_epoch(n: int, batch_size: int) -> int:
    """How many batches ``batches`` cuts an epoch of ``n`` images into."""
    return max(1, round(n / batch_size))


def batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One shuffled epoch as round(n / batch_size) near-equal index batches (no tiny last batch), on ``gen``'s device."""
    perm = torch.randperm(n, generator=gen, device=gen.device)
    return list(torch.tensor_split(perm, batches_per_epoch(n, batch_size)))



def last_linear(model: nn.Module, who: str) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``model`` in registration order (the classifier head), with its name."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError(f"{who} needs a model whose classifier is an nn.Linear (it works on that layer)")
    return linears[-1]

@dataclass
class DefenseContext:
    """What a defense may know besides the model and its clean data."""

    num_classes: int
    augmentation: Augmentation
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = True
    progress: bool = False


@dataclass
class DefenseResult:
    model: nn.Module
    info: dict = field(default_factory=dict)  # JSON-able facts: what was pruned, epochs, ...
    sweep: Optional[Callable[[], Iterator[tuple]]] = None  # yields (setting, model[, facts])
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. NC's reversed triggers, saved as safetensors


@dataclass(frozen=True)
class Defense(Config):
    description: ClassVar[str]
    paper: ClassVar[str]
    # Each field's official value and its source, and the official share of defense data
    # (bench.official.table); every field is in it.
    official: ClassVar[dict] = {}
    # False for a defense that reads no clean data (none, CLP): its cells draw none, and a grid of such
    # defenses never fails for want of it.
    needs_data: ClassVar[bool] = True

    def __call__(self, model: nn.Module, clean, ctx: DefenseContext) -> DefenseResult:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise ``BenchError`` if a setting names something ``model`` lacks (e.g. a layer name).

        The grid calls it on a freshly built model of every (dataset, model) pair before any
        training, so a typo fails on one line before work starts. A model the method cannot
        handle at all (CLP on a model without BatchNorm) is not a settings error: the defense
        raises that in ``__call__`` and only its cells fail.
        """
