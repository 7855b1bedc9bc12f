"""Neural Attention Distillation (NAD).

Paper: Yige Li, Xixiang Lyu, Nodens Koren, Lingjuan Lyu, Bo Li, Xingjun Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021, arXiv:2101.05930.
Official code: github.com/bboylyg/NAD (``main.py``, ``config.py``, ``at.py``, ``utils/util.py``,
``README.md``).

Two fine-tunes on the clean defense data, both through the shared trainer (``bench.train.train``):

1. Teacher: a copy of the backdoored model, fine-tuned with plain cross-entropy. The official
   repository ships no teacher script; its README says the teacher is the backdoored model
   fine-tuned on the same clean data for 5 to 10 epochs, with ``main.py`` and every beta set to 0.
2. Student: the backdoored model, trained on cross-entropy plus ``sum_i beta_i * AT_i``, where
   ``AT_i`` compares the student's and the frozen teacher's (eval mode) attention maps at layer
   i. An attention map (``at.py``): the sum over channels of ``|a|^p``, flattened, divided by its
   L2 norm (+ 1e-6); ``AT_i`` is the mean squared error between the two maps (``F.mse_loss``,
   a mean over batch and positions), not the norm of their difference. The term is added through
   the trainer's extension point (:class:`AttentionDistillation`); the student is returned.

Layers. ``layers`` names modules of the model (``--set nad.layers=net.layer1,net.layer2``); their
outputs are distilled, one beta each. Empty (the default) is the automatic rule, from a probe forward
pass of one defense image. The model's stage outputs are found (residual stages named ``layer1``,
``layer2``, ... as in our ResNet-18s, torchvision's and timm's; in any other model, each run of
consecutive 4-D outputs of one spatial size is a stage, its last module the stage output); then
- where the model has stages at the official maps' sizes, the input's side, its half and its quarter
  (the official WRN-16-1's three residual groups on 32x32 CIFAR-10: 32x32, 16x16, 8x8), those are
  taken: ``net.layer1/2/3`` of our ResNet-18s on 32x32 inputs, the first three conv stages of
  ``smallcnn`` and ``vgg``;
- otherwise (an ImageNet stem that halves the input twice first, as torchvision's ``resnet18``), the
  last stages whose maps are larger than 1x1, and ``info["official_sizes"]`` is false: the official
  betas then weigh each term by a map of another size (``area_scaled`` corrects that, below).
Every chosen map must be larger than 1x1 (a one-position attention map normalises to 1 and carries
no signal; BackdoorBench's PreAct-ResNet18 NAD puts its third term on the pooled 1x1 map, we do
not). Unknown names fail in :meth:`NAD.check`, before any work.

Defaults, the official code's (``official`` below, with sources): ``betas`` (500, 1000, 1000), ``p``
2, 20 student ``epochs``, SGD ``lr`` 0.1 with momentum 0.9, weight decay 1e-4, Nesterov, ``batch_size``
64 (the ragged last batch kept), the lr x0.1 from epoch 2 (``utils/util.py``), on 5 % of the training
set (the grid's defense data instead: a departure the record lists); ``teacher_epochs`` 10, the upper
end of the README's 5-10, with the student's optimiser. ``lr`` follows the fine-tuning rule
(``bench/finetune.py``; NAD trains its backdoored models at SGD 0.1, ``train_badnet.py``).

``area_scaled`` (off by default, the official loss as it is): each AT term is a mean over the map's
positions of a unit-norm map, so for the same attention difference it scales as 1 / positions;
``area_scaled`` multiplies beta j by (map positions) / (input positions / 4^j), the official map's at
that depth, for models whose maps are not the official sizes. Measurements on the quick and demo
presets, official betas on the official sizes against area scaling: docs/measurements.md.

Departures:
- The official schedule sets 0.01 after epoch 2 whatever ``lr`` is; ours multiplies ``lr`` by 0.1.
- Augmentation is the dataset's (random crop, flip where the dataset flips); the official loader
  adds Cutout (1 hole of 3x3 pixels), which the shared trainer does not have.
- The official model returns its activations; we capture them with forward hooks (any model).

``info``: ``layers``, ``map_sizes``, ``betas_effective``, ``acc_before`` / ``teacher_acc`` /
``acc_after`` (accuracy on the defense data), ``train_loss`` (student, last epoch) and
``at_terms_last_step`` (the weighted AT terms of the last student step).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from torch import nn

from bench.config import param
from bench.finetune import FineTuneLR
from bench.official import ours, table
from bench.data import ImageSet
from bench.registry import BenchError
from bench.train import TrainConfig, TrainExtension, accuracy, to_input, train
from defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult

_STAGE = re.compile(r"(.*\.)?layer\d+")  # residual stages of torchvision-style and CIFAR ResNets


def attention_map(fm: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W]``: sum over channels of ``|a|^p``, divided by its L2 norm + eps."""
    am = fm.float().abs().pow(p).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (the teacher's is detached)."""
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).mean()


@torch.no_grad()
def probe_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """``(module name, output shape)`` for every submodule, in the order their forwards finish.

    One eval-mode forward pass of ``x`` (no gradient; BatchNorm statistics untouched).
    """
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, tuple(out.shape))) if torch.is_tensor(out) else None)
             for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def stage_outputs(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """(stage output module names in forward order, {name: spatial size}) from one probe pass of ``x``."""
    seen = probe_outputs(model, x)
    spatial = {n: tuple(s[-2:]) for n, s in seen if len(s) == 4}
    stages = [n for n, _ in model.named_modules() if _STAGE.fullmatch(n) and n in spatial]
    if len(stages) < 2:  # not a ResNet: one stage per run of equal spatial size
        stages, last = [], None
        for n, s in seen:
            if len(s) != 4:
                continue
            if stages and s[-2:] == last:
                stages[-1] = n
            else:
                stages.append(n)
            last = s[-2:]
    return stages, spatial


def auto_layers(model: nn.Module, x: torch.Tensor, k: int) -> tuple[list[str], bool]:
    """The automatic choice of ``k`` layers (module docstring) and whether they are at the official sizes."""
    stages, spatial = stage_outputs(model, x)
    h, w = x.shape[-2:]
    official = []
    for j in range(k):  # the last stage at each official size: the input's side, its half, its quarter, ...
        at = [n for n in stages if spatial[n] == (h // 2**j, w // 2**j)]
        if not at or h // 2**j * (w // 2**j) <= 1:
            break
        official.append(at[-1])
    if len(official) == k:
        return official, True
    big = [n for n in stages if spatial[n][0] * spatial[n][1] > 1]
    if len(big) < k:
        raise BenchError(f"nad: found only {len(big)} feature maps larger than 1x1 ({', '.join(big) or 'none'}) "
                         f"for {k} betas; set nad.layers and nad.betas")
    return big[-k:], False


class AttentionDistillation(TrainExtension):
    """Adds ``sum_i beta_i * attention_loss(student_i, teacher_i)`` to the student's loss.

    Forward hooks record the outputs of ``layers`` in the student (during the trainer's forward)
    and in the frozen teacher, which this extension runs in eval mode on the same batch.
    """

    def __init__(self, teacher: nn.Module, layers: Sequence[str], betas: Sequence[float], p: float) -> None:
        self.teacher, self.layers, self.betas, self.p = teacher, list(layers), list(betas), p
        self.student_maps: dict[str, torch.Tensor] = {}
        self.teacher_maps: dict[str, torch.Tensor] = {}
        self.hooks: list = []
        self.last_terms: list[float] = []

    def _record(self, store: dict[str, torch.Tensor], name: str):
        return lambda mod, inp, out: store.__setitem__(name, out)

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.teacher.to(device).eval()
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        for name in self.layers:
            self.hooks.append(model.get_submodule(name).register_forward_hook(self._record(self.student_maps, name)))
            self.hooks.append(self.teacher.get_submodule(name).register_forward_hook(self._record(self.teacher_maps, name)))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher(x)
        terms = [b * attention_loss(self.student_maps[n], self.teacher_maps[n], self.p) for n, b in zip(self.layers, self.betas)]
        self.student_maps.clear()
        self.teacher_maps.clear()
        self.last_terms = [t.item() for t in terms]
        return loss + sum(terms)

    def end(self, model: nn.Module) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


@DEFENSES.register("nad")
@dataclass(frozen=True)
class NAD(Defense):
    description: ClassVar[str] = "Neural Attention Distillation: fine-tune a teacher, distil its attention maps into the backdoored model"
    paper: ClassVar[str] = ("Li, Lyu, Koren, Lyu, Li, Ma, Neural Attention Distillation: Erasing Backdoor Triggers from Deep "
                            "Neural Networks, ICLR 2021, arXiv:2101.05930")

    layers: tuple[str, ...] = param((), doc="module names whose outputs are distilled, one per beta (empty: automatic rule)")
    betas: tuple[float, ...] = param((500.0, 1000.0, 1000.0), doc="weight of each layer's attention loss, low to high layer")
    area_scaled: bool = param(False, doc="scale beta j by (map positions) / (input positions / 4^j), the official maps' size")
    p: float = param(2.0, low=0.0, doc="attention map exponent: sum over channels of |a|^p")
    epochs: int = param(20, low=1, doc="student (distillation) epochs")
    teacher_epochs: int = param(10, low=1, doc="teacher fine-tuning epochs (README: 5-10)")
    lr: float = param(0.1, low=0.0, doc="SGD learning rate of teacher and student")
    milestones: tuple[int, ...] = param((2,), doc="epochs at which lr is multiplied by gamma")
    gamma: float = param(0.1, low=0.0, high=1.0)
    momentum: float = param(0.9, low=0.0, high=1.0)
    weight_decay: float = param(1e-4, low=0.0)
    nesterov: bool = param(True, doc="Nesterov momentum (the official SGD)")
    batch_size: int = param(64, low=1, doc="images per step (the ragged last batch kept)")

    official: ClassVar[dict] = table(
        layers=ours("no single value: the official code distils WRN-16-1's three group outputs; the automatic rule "
                    "takes the stages at their sizes (module docstring)"),
        betas=((500.0, 1000.0, 1000.0), "bboylyg/NAD config.py: --beta1 500, --beta2 1000, --beta3 1000"),
        area_scaled=(False, "bboylyg/NAD at.py: the loss on the maps as they are"),
        p=(2.0, "bboylyg/NAD config.py: --p 2.0"),
        epochs=(20, "bboylyg/NAD config.py: --epochs 20"),
        teacher_epochs=(10, "bboylyg/NAD README.md: the teacher fine-tuned 5-10 epochs (the upper end)"),
        lr=(0.1, "bboylyg/NAD config.py: --lr 0.1"),
        milestones=((2,), "bboylyg/NAD utils/util.py adjust_learning_rate: lr for epochs 0-1, then 0.01"),
        gamma=(0.1, "bboylyg/NAD utils/util.py adjust_learning_rate: 0.1 -> 0.01"),
        momentum=(0.9, "bboylyg/NAD config.py: --momentum 0.9"),
        weight_decay=(1e-4, "bboylyg/NAD config.py: --weight_decay 1e-4"),
        nesterov=(True, "bboylyg/NAD main.py: SGD(..., nesterov=True)"),
        batch_size=(64, "bboylyg/NAD config.py: --batch_size 64"),
        defense_data=(0.05, "bboylyg/NAD config.py: --ratio 0.05"),
    )
    finetune_lr: ClassVar[FineTuneLR] = FineTuneLR(("lr",), 0.1, "bboylyg/NAD trains its backdoored models at SGD lr 0.1 (train_badnet.py, config.py)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.betas:
            raise BenchError("nad.betas is empty; give one weight per distilled layer, e.g. 500,1000,1000")
        if any(b < 0 for b in self.betas):
            raise BenchError(f"nad.betas={','.join(map(str, self.betas))} has a negative weight; allowed: >= 0")
        if self.p <= 0:
            raise BenchError(f"nad.p={self.p} is out of range; allowed: > 0")
        if self.layers and len(self.layers) != len(self.betas):
            raise BenchError(f"nad.layers={','.join(self.layers)} names {len(self.layers)} layer(s) but nad.betas has {len(self.betas)} "
                             f"weights; give one beta per layer, e.g. --set nad.betas={','.join(['1000'] * len(self.layers))}")

    def check(self, model: nn.Module) -> None:
        names = {n for n, _ in model.named_modules() if n}
        for name in self.layers:
            if name not in names:
                hint = [n for n in names if n.count(".") <= 1]
                raise BenchError(f"nad.layers: the model has no module {name!r}; e.g.: {', '.join(sorted(hint)[:12])}")

    def choose_layers(self, model: nn.Module, x: torch.Tensor) -> list[str]:
        """The layers to distil (checked, or chosen by the automatic rule) for inputs like ``x``."""
        self.check(model)
        if not self.layers:
            return auto_layers(model, x, len(self.betas))[0]
        shapes = dict(probe_outputs(model, x))
        for name in self.layers:
            s = shapes.get(name)
            if s is None or len(s) != 4 or s[-1] * s[-2] <= 1:
                raise BenchError(f"nad.layers: {name!r} outputs {s}, not a feature map larger than 1x1")
        return list(self.layers)

    def effective_betas(self, map_sizes: Sequence[tuple[int, int]], input_size: tuple[int, int]) -> list[float]:
        """``betas``, each scaled (with ``area_scaled``) by its map's positions over those of the official map at that depth.

        The official maps (WRN-16-1's groups) are at full, half and quarter resolution of the input, so
        the j-th has ``H * W / 4**j`` positions; an MSE over a unit-norm map of ``A`` positions scales as
        ``1 / A``, so the factor ``A / (H * W / 4**j)`` gives every depth the official weight.
        """
        if not self.area_scaled:
            return [float(b) for b in self.betas]
        hw = input_size[0] * input_size[1]
        return [float(b) * (h * w) / (hw / 4**j) for j, (b, (h, w)) in enumerate(zip(self.betas, map_sizes))]

    def recipe(self, epochs: int, ctx: DefenseContext) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                           weight_decay=self.weight_decay, schedule="multistep", milestones=self.milestones, gamma=self.gamma,
                           bf16=ctx.bf16)

    def __call__(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        model = model.to(ctx.device)
        data = clean.to(ctx.device)
        layers = self.choose_layers(model, to_input(data.x[:1]))
        sizes = {n: tuple(s[-2:]) for n, s in probe_outputs(model, to_input(data.x[:1])) if n in layers}
        h, w = data.x.shape[-2:]
        at_official = all(sizes[n] == (h // 2**j, w // 2**j) for j, n in enumerate(layers))
        betas = self.effective_betas([sizes[n] for n in layers], tuple(data.x.shape[-2:]))
        acc_before = accuracy(model, data, device=ctx.device, bf16=ctx.bf16)
        teacher = copy.deepcopy(model)
        train(teacher, data, self.recipe(self.teacher_epochs, ctx), ctx.augmentation, seed=ctx.seed, device=ctx.device,
              progress=ctx.progress, desc="nad teacher", keep_ragged=True)
        distil = AttentionDistillation(teacher, layers, betas, self.p)
        stats = train(model, data, self.recipe(self.epochs, ctx), ctx.augmentation, seed=ctx.seed + 1, device=ctx.device,
                      extensions=[distil], progress=ctx.progress, desc="nad student", keep_ragged=True)
        model.eval()
        info = {
            "layers": layers,
            "map_sizes": [list(sizes[n]) for n in layers],
            "official_sizes": at_official,
            "betas_effective": betas,
            "acc_before": acc_before,
            "teacher_acc": accuracy(teacher, data, device=ctx.device, bf16=ctx.bf16),
            "acc_after": accuracy(model, data, device=ctx.device, bf16=ctx.bf16),
            "train_loss": stats["loss"],
            "at_terms_last_step": distil.last_terms,
        }
        return DefenseResult(model=model, info=info)
