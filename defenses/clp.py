"""Channel Lipschitzness-based Pruning (CLP): data-free.

Paper: Runkai Zheng, Rongjun Tang, Jianze Li, Li Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022, arXiv:2208.03111.
Official code: github.com/rkteddy/channel-Lipschitzness-based-pruning (``defense.py``, ``test.py``).

A channel k of a convolution followed by BatchNorm computes
``gamma_k / sigma_k * (W_k * x) + const``, so the Lipschitz constant of the map from the layer's
input to that channel is bounded by the largest singular value of ``W_k * |gamma_k / sigma_k|``
(the paper's upper bound of the channel Lipschitz constant, UCLC), with W_k the k-th output
filter reshaped to a ``[in_channels / groups, kh * kw]`` matrix as the official code does and
``sigma_k = sqrt(running_var_k + bn.eps)``. Backdoor channels react strongly to the trigger and
stand out with a large UCLC. In every conv->BN pair, every channel whose UCLC exceeds the
layer's ``mean + u * std`` gets its BN weight AND bias set to zero. No data is used; the
clean defense set is ignored.

Pairs come from the model's graph (``torch.fx``): a ``BatchNorm2d`` is paired with the
``Conv2d`` whose output it consumes directly. The official code (and BackdoorBench) pair each
BN with the last conv before it in module order, which is wrong where BN comes before its conv
(pre-activation ResNets: ``block.bn1`` is fed by the previous block's sum, and the conv
registered just before it belongs elsewhere); the official README itself asks users to adapt
the code for Preact ResNet or VGG. A BN fed by anything but a conv (a sum, a ReLU)
is left alone and listed in ``info["unpaired"]``. A model without any conv->BN pair (VGG
without BatchNorm) is refused with a ``BenchError``.

Defaults: ``u`` 3 (``test.py``'s ``-u`` default; BackdoorBench's ``u: 3``). ``sweep``
yields ``(u, pruned model, {"channels_pruned"})`` over BackdoorBench's grid of u (``u_min 0``,
``u_max 10``, ``u_num 21``: 0, 0.5, ..., 10) for the harness's oracle curve; the UCLCs are
computed once.

``info``: ``u``, ``pruned`` ({BN layer: number of channels pruned}), ``channels_pruned``,
``channels_total`` (channels of paired BNs), ``pairs`` ([[conv, bn], ...]) and ``unpaired``.

Departures from the official code, all deliberate:
- Pairing by graph, not module order (above).
- ``sigma_k`` includes BatchNorm's ``eps`` (what the layer actually divides by); the official
  code uses ``sqrt(running_var)``. The two differ only for channels with variance near eps.
- The singular values of all channels of a layer come from one batched
  ``torch.linalg.matrix_norm(ord=2)`` call instead of a per-channel ``torch.svd``; the std is
  the unbiased one, as the official ``Tensor.std()``.

Checked against the official code (2026-11-22): the official ``CLP(net, u)`` from ``defense.py``,
imported unmodified, run on our quick-preset GTSRB BadNets model (resnet18 width 16, seed 0; a
conv->BN network in module order, where both pairings agree) gives weights identical to ours at
u = 3, 2.5 and 2, hence the same CA / ASR: 97.3 / 85.9, 93.7 / 47.0, 90.7 / 2.0 %. That CLP keeps
this BadNets backdoor at u = 3 is the method's, not our code's; BackdoorBench's GTSRB leaderboard
shows the same (PreAct-ResNet18, BadNets, CLP: ASR 66.9 %).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from torch import fx, nn

from bench.config import param
from bench.official import table
from bench.data import ImageSet
from bench.registry import BenchError
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult

SWEEP: tuple[float, ...] = tuple(0.5 * i for i in range(21))  # BackdoorBench: u from 0 to 10, 21 values


def model_name(model: nn.Module) -> str:
    """The network's class (inside a ``Classifier`` wrapper) with its numbers of Conv2d and BatchNorm2d."""
    net = getattr(model, "net", model)
    mods = list(net.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in mods)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in mods)
    return f"{type(net).__name__} ({n_conv} Conv2d, {n_bn} BatchNorm2d)"


def conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """([(conv name, bn name)] for every affine BatchNorm2d fed directly by a Conv2d, [unpaired BN names]).

    Read from the ``torch.fx`` graph of ``model``, in graph order. Raises ``BenchError`` if the
    model cannot be traced.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types on untraceable control flow
        raise BenchError(f"clp: cannot trace {model_name(model)} with torch.fx to pair convs with BatchNorms "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    modules = dict(model.named_modules())
    pairs, unpaired = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        bn = modules[node.target]
        if isinstance(conv, nn.Conv2d) and conv.out_channels == bn.num_features and bn.affine:
            pairs.append((src.target, node.target))
        else:
            unpaired.append(node.target)
    return pairs, unpaired


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC of every output channel: the spectral norm of ``W_k * |gamma_k / sigma_k|``, batched over k."""
    w = conv.weight.detach().float()
    w = w.reshape(w.shape[0], w.shape[1], -1)  # [out, in / groups, kh * kw]
    sigma = (bn.running_var.detach().float() + bn.eps).sqrt()
    scale = (bn.weight.detach().float() / sigma).abs()
    return torch.linalg.matrix_norm(w * scale[:, None, None], ord=2)


def outliers(scores: torch.Tensor, u: float) -> torch.Tensor:
    """Indices of the scores above ``mean + u * std`` (unbiased std) of ``scores``."""
    return (scores > scores.mean() + u * scores.std()).nonzero().flatten()


@DEFENSES.register("clp")
@dataclass(frozen=True)
class CLP(Defense):
    description: ClassVar[str] = "Channel Lipschitzness-based Pruning: zero BN channels with outlying conv x BN spectral norm (data-free)"
    paper: ClassVar[str] = "Zheng et al., Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022, arXiv:2208.03111"

    needs_data: ClassVar[bool] = False  # data-free: no defense images are drawn for it

    # A negative u would prune channels below their layer's mean: no longer outliers.
    u: float = param(3.0, low=0.0, doc="prune channels whose UCLC > mean + u x std of their layer")

    official: ClassVar[dict] = table(u=(3.0, "rkteddy/channel-Lipschitzness-based-pruning test.py: --u default 3"))

    def scores(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]], list[str]]:
        """({bn name: UCLC per channel}, pairs, unpaired BN names); ``BenchError`` if no pair exists."""
        pairs, unpaired = conv_bn_pairs(model)
        if not pairs:
            raise BenchError(f"clp: {model_name(model)} has no Conv2d feeding a BatchNorm2d directly; CLP scores "
                             "channels by conv weight x BN scale and needs such pairs (e.g. vgg with bn=true)")
        return ({bn: channel_lipschitz(model.get_submodule(conv), model.get_submodule(bn)) for conv, bn in pairs},
                pairs, unpaired)

    @staticmethod
    @torch.no_grad()
    def pruned(model: nn.Module, scores: dict[str, torch.Tensor], u: float) -> tuple[nn.Module, dict[str, int]]:
        """A copy of ``model`` with the outlying channels' BN weight and bias zeroed; {bn name: number pruned}."""
        out = copy.deepcopy(model)
        counts = {}
        for name, s in scores.items():
            bn = out.get_submodule(name)
            idx = outliers(s, u).to(bn.running_var.device)
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
            counts[name] = len(idx)
        return out.eval(), counts

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = model.to(ctx.device).eval()
        scores, pairs, unpaired = self.scores(model)
        pruned, counts = self.pruned(model, scores, self.u)

        def sweep() -> Iterator[tuple[float, nn.Module, dict]]:
            for u in SWEEP:  # (u, pruned model, facts for the harness's curve)
                m, c = self.pruned(model, scores, u)
                yield u, m, {"channels_pruned": sum(c.values())}

        info = dict(u=self.u, pruned=counts, channels_pruned=sum(counts.values()),
                    channels_total=sum(len(s) for s in scores.values()),
                    pairs=[list(p) for p in pairs], unpaired=unpaired)
        return DefenseResult(model=pruned, info=info, sweep=sweep)
