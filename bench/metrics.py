"""Clean accuracy (CA), attack success rate (ASR) and robust accuracy (RA).

- CA: accuracy on the whole clean test set.
- ASR: on the triggered test set, the fraction classified as the attack's label:
  the target for all-to-one (images whose true label is the target are left out
  when the set is built), ``y -> y + 1 mod K`` for all-to-all.
- RA: on the same triggered images, the fraction still classified as the true label.

An empty triggered set (the ``clean`` attack has no trigger) leaves ASR and RA undefined:
they are ``None`` (``null`` in the records, "-" in the tables), never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.data import ImageSet
from bench.train import predict


def pct(v: float | None) -> str:
    """A metric (a fraction) as percent text with one decimal; "-" when undefined (ASR of the clean model)."""
    return "-" if v is None else f"{100 * v:.1f}"


@dataclass
class TriggeredSet:
    """Triggered test images with their true labels and the labels the attack wants."""

    x: torch.Tensor
    y_true: torch.Tensor
    y_target: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def evaluate(model: nn.Module, clean: ImageSet, triggered: TriggeredSet, *, device="cpu",
             bf16: bool = True) -> dict[str, float | None]:
    """``{"ca", "asr", "ra"}`` as fractions in [0, 1]; ASR and RA are ``None`` when ``triggered`` is empty."""
    pc = predict(model, clean.x, device=device, bf16=bf16)
    out: dict[str, float | None] = {"ca": (pc == clean.y.cpu()).float().mean().item(), "asr": None, "ra": None}
    if len(triggered):
        pt = predict(model, triggered.x, device=device, bf16=bf16)
        out["asr"] = (pt == triggered.y_target.cpu()).float().mean().item()
        out["ra"] = (pt == triggered.y_true.cpu()).float().mean().item()
    return out
