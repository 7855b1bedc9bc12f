"""Small helpers that several attacks share (one copy each; attacks import them from here, not from each other)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from bench.registry import BenchError

# BadNets' 3x3 colour grid (its stamp), also the patch FC's evaluation stamps.
GRID_TRIGGER = ((0, 0, 255), (0, 255, 0), (255, 0, 255))


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (``[n, n]``): ``D @ v`` is the DCT of ``v``, ``D.T`` its inverse."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def levels_for(size: int) -> int:
    """How many down-sampling levels the IAD / LIRA generators use for a ``size`` x ``size`` image."""
    return 3 if size % 8 == 0 else 2 if size % 4 == 0 else 1


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` in ``modules()`` order (the classifier head); BenchError if none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise BenchError(f"this attack needs a model with an nn.Linear classifier; {type(model).__name__} has none")
    return linears[-1]


class PenultimateFeatures:
    """Context manager: ``.value`` holds the input of the last Linear of the latest forward, ``[B, D]``."""

    def __init__(self, model: nn.Module) -> None:
        self.layer = last_linear(model)
        self.value: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        feats = inputs[0]
        self.value = feats.reshape(len(feats), -1, feats.shape[-1]).mean(1) if feats.dim() > 2 else feats

    def __enter__(self) -> "PenultimateFeatures":
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
