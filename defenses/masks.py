"""Per-channel neuron masks (RNP, ANP) and ANP's bounded neuron perturbations, on any model.

One module for every defense that learns a mask per channel. ``attach_masks(model)`` puts
a mask, initialised to 1, on the weight of every affine ``BatchNorm2d`` through the module
API (``torch.nn.utils.parametrize``), so no model code has to change. A model without
BatchNorm2d gets the masks on its ``Conv2d`` output channels instead (a forward hook);
``MaskSet.kind`` says which ("bn" or "conv").

With ``perturb=True`` each masked channel also gets ANP's multiplicative perturbations
(Wu & Wang, NeurIPS 2021, arXiv:2110.14430; ``NoisyBatchNorm2d`` in csdongxian/ANP_backdoor):
while ``MaskSet.perturbed()`` is active, a BN channel computes
``BN(x; weight * (mask + noise), bias * (1 + noise_bias))``, and outside it
``BN(x; weight * mask, bias)``. In the conv fallback the output channel is scaled by
``mask + noise`` (there is no separate bias term to perturb).

``prune(model, masks, threshold)`` zeroes, in a model without masks attached, the BN weight
(or the conv output channel) of every channel whose mask is <= ``threshold``: pruning with
a 0/1 mask is exactly zeroing those channels.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from bench.registry import BenchError


class _Flag:
    """Shared on/off switch of a MaskSet's perturbations."""

    on = False


class _ChannelScale(nn.Module):
    """Parametrization ``w -> w * (base + noise while perturbed)``; ``base`` None means 1."""

    def __init__(self, base: nn.Parameter | None, noise: nn.Parameter | None, flag: _Flag) -> None:
        super().__init__()
        self.base = base
        self.noise = noise
        self.flag = flag

    def coeff(self) -> torch.Tensor | float:
        c = self.base if self.base is not None else 1.0
        if self.noise is not None and self.flag.on:
            c = c + self.noise
        return c

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.coeff()


@dataclass
class MaskSet:
    """Masks (and optionally perturbations) attached to a model.

    ``masks``: ``{layer name: mask parameter}``; ``noise``: ``{layer name: [weight noise,
    bias noise or None]}`` when attached with ``perturb=True``, else empty.
    """

    kind: str
    masks: dict[str, nn.Parameter]
    noise: dict[str, list] = field(default_factory=dict)
    _flag: _Flag = field(default_factory=_Flag, repr=False)
    _undo: list = field(default_factory=list, repr=False)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.masks.values())

    def noise_parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.noise.values() for p in pair if p is not None]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clip every mask to [0, 1]."""
        for m in self.masks.values():
            m.clamp_(0.0, 1.0)

    @torch.no_grad()
    def reset_noise(self, eps: float, gen: torch.Generator | None = None) -> None:
        """Perturbations uniform in [-eps, eps] (ANP's ``reset(rand_init=True)``); eps 0 gives zeros.

        Drawn on ``gen``'s device (a generator on the model's device: no copy over, no host sync)."""
        for p in self.noise_parameters():
            r = torch.rand(p.shape, generator=gen, device=gen.device) if gen is not None else torch.zeros(p.shape)
            p.copy_(((2 * r - 1) * eps).to(p.device, p.dtype))

    @torch.no_grad()
    def clamp_noise_(self, eps: float) -> None:
        """Project every perturbation back into [-eps, eps]."""
        for p in self.noise_parameters():
            p.clamp_(-eps, eps)

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[None]:
        """Within this block the model computes with the perturbations switched on."""
        if not self.noise:
            raise BenchError("these masks were attached without perturbations (attach_masks(..., perturb=True))")
        self._flag.on = True
        try:
            yield
        finally:
            self._flag.on = False

    def values(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies, ``{layer name: mask}``."""
        return {name: m.detach().float().cpu().clone() for name, m in self.masks.items()}

    def remove(self) -> None:
        """Take the masks off the model again (weights back to their own values)."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def masked_layers(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    """("bn", affine BatchNorm2d layers) if the model has any, else ("conv", Conv2d layers)."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
    if bns:
        return "bn", bns
    return "conv", [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def attach_masks(model: nn.Module, perturb: bool = False) -> MaskSet:
    """Attach a mask (init 1) to every affine BatchNorm2d's weight, else to every Conv2d's output channels.

    ``perturb=True`` adds ANP's perturbations (init 0, switched on by ``MaskSet.perturbed()``).
    """
    kind, layers = masked_layers(model)
    if not layers:
        raise BenchError(f"{type(model).__name__} has no BatchNorm2d or Conv2d layer to attach neuron masks to")
    out = MaskSet(kind, {})
    for name, mod in layers:
        n = mod.num_features if kind == "bn" else mod.out_channels
        like = dict(device=mod.weight.device, dtype=torch.float32)
        mask = nn.Parameter(torch.ones(n, **like))
        noise = nn.Parameter(torch.zeros(n, **like)) if perturb else None
        noise_bias = nn.Parameter(torch.zeros(n, **like)) if perturb and kind == "bn" and mod.bias is not None else None
        out.masks[name] = mask
        if perturb:
            out.noise[name] = [noise, noise_bias]
        if kind == "bn":
            parametrize.register_parametrization(mod, "weight", _ChannelScale(mask, noise, out._flag))
            out._undo.append(lambda mod=mod: parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False))
            if noise_bias is not None:
                parametrize.register_parametrization(mod, "bias", _ChannelScale(None, noise_bias, out._flag))
                out._undo.append(lambda mod=mod: parametrize.remove_parametrizations(mod, "bias", leave_parametrized=False))
        else:
            scale = _ChannelScale(mask, noise, out._flag)
            handle = mod.register_forward_hook(lambda m, inp, y, s=scale: y * _as_channels(s.coeff(), y))
            out._undo.append(handle.remove)
    return out


def _as_channels(c: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor | float:
    return c.view(1, -1, 1, 1).to(y.dtype) if isinstance(c, torch.Tensor) else c


def pruned_channels(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the channels a threshold prunes: those whose mask is <= ``threshold``."""
    return (torch.as_tensor(mask) <= threshold).nonzero().flatten()


@torch.no_grad()
def prune(model: nn.Module, masks: Mapping[str, torch.Tensor], threshold: float) -> int:
    """Zero, in place, the BN weight (or conv output channel) of every channel whose mask is <= ``threshold``.

    Returns the number of channels pruned. ``masks`` maps layer names of ``model`` to mask values.
    """
    count = 0
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        idx = pruned_channels(mask, threshold).to(mod.weight.device)
        mod.weight[idx] = 0.0
        if isinstance(mod, nn.Conv2d) and mod.bias is not None:
            mod.bias[idx] = 0.0
        count += len(idx)
    return count


def pruning_sweep(thresholds: Sequence[float], masks: Mapping[str, torch.Tensor],
                  pruned_at: Callable[[float], tuple[nn.Module, int]]) -> Iterator[tuple[float, nn.Module, dict]]:
    """A mask-pruning defense's ``sweep``: ``(threshold, pruned model, {"channels_pruned"})`` per threshold.

    Consecutive thresholds that prune the same channels (the rule of :func:`prune`) yield the same
    model object, built once by ``pruned_at``; the harness evaluates such a run of settings once.
    """
    last, model, n = None, None, 0
    for t in thresholds:
        chosen = tuple(tuple(pruned_channels(v, t).tolist()) for v in masks.values())
        if chosen != last:
            model, n = pruned_at(t)
            last = chosen
        yield t, model, {"channels_pruned": n}
