"""The attack interface and the ``ATTACKS`` registry.

An attack is a frozen dataclass of hyperparameters (paper or official-code defaults)
plus a ``state`` dict of tensors (its trigger, drawn in ``prepare``) that the store
saves as safetensors. The methods:

- ``prepare(num_classes, channels, size, train, seed)``: build the trigger; attacks that
  need learned parts do that here. Must be deterministic in ``seed``.
- ``trigger(x)``: put the trigger on a uint8 batch ``[B, C, H, W]`` (same shape, uint8).
- ``apply(x, y) -> (x', y')``: trigger plus the attack's label map.
- ``poison(train, seed) -> PoisonedSet``: choose and transform the poisoned subset
  (the default picks ``round(poison_rate * N)`` images whose label differs from the
  target, and relabels them).
- ``train_extension()``: optionally a ``bench.train.TrainExtension`` for attacks that control
  training (WaNet's on-the-fly warping); ``None`` for static poisoning.
- ``test_set(test)``: the triggered test set used for ASR and RA.

Clean-label attacks (SIG, CTRL) subclass ``CleanLabelAttack`` (``clean_label = True``): they
poison only target-class training images and keep every label. ``poison_rate`` stays a
fraction of the whole training set, as in BackdoorBench (``attack/sig.py``: "poisoning ratio is
ALWAYS defined as number of poisoning samples / number of all samples"), so the count is
``min(round(poison_rate * N), number of target-class images)``. BackdoorBench draws
``np.random.choice(target_idx, round(pratio * N), replace=False)``
(``utils/backdoor_generate_poison_index.py``), which fails when the rate asks for more
images than the target class has; here the count is capped instead, as the official CTRL
code does (``poison_index[:poison_num]``). A target class without training images is refused
in ``prepare`` (and again in ``poison``), before any training. Only all-to-one exists for
them; the triggered test set is unchanged (non-target test images, trigger, target label).

A clean reference model (``needs_clean_model = True``): attacks whose trigger is computed
from a clean model (LF's universal perturbation; TrojanNN and label-consistent later) declare
it, and ``prepare`` then takes one more keyword, ``reference``: the clean model of the same
dataset, model, training recipe and seed, in eval mode on the run's device. The grid makes it
by training the ``clean`` attack's job through its model cache (``bench.run.plan.reference_job``),
so it is trained once per (dataset, model, recipe, seed), by the same trainer, and shared by
every attack that asks; nothing is downloaded. ``prepare`` may run the model forward and
backward but must leave its weights alone. Attacks without the flag keep the five-argument
``prepare`` and are never passed ``reference`` (``prepare_attack`` below passes it only to
attacks with the flag); one with the flag and no ``reference`` fails with a one-line
``BenchError``.

A weight attack (``weight_attack = True``, AWP): the model is not trained on poisoned data but
made from the clean reference model (which it therefore needs: ``needs_clean_model``). The grid
calls ``build_model(model, reference, train, seed, device)`` instead of ``poison`` + ``train``: it
loads the reference's weights into ``model``, changes them in place and returns the training stats
(the trainer's keys: ``seconds``, ``img_per_s``, ``loss``, ``train_acc``, ...). Everything after it
(evaluation, the model cache, records, resume) is as for any other model; ``poison`` returns the
training set unchanged with no poisoned index.

No trigger (``has_trigger = False``, the ``clean`` attack only): ``trigger`` returns the
images unchanged, nothing is poisoned and the triggered test set is empty, so ASR and RA are
undefined (``None`` in the records, "-" in the tables).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import torch
from torch import nn

from bench.config import Config, param
from bench.data import ImageSet
from bench.metrics import TriggeredSet
from bench.registry import Registry
from bench.train import TrainExtension

ATTACKS: Registry[type["Attack"]] = Registry("attack", entry_point_group="bdbench.attacks")


@torch.no_grad()
def map_images(x: torch.Tensor, fn, chunk: int, channels_last: bool = False) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` through ``fn`` (float in [0, 1] -> float in [0, 1]), ``chunk`` at a time,
    back to uint8 (rounded, clamped): the trigger of the attacks whose trigger is a network (IAD, LIRA, DFST)."""
    out = torch.empty_like(x)
    for i in range(0, len(x), chunk):
        xf = x[i:i + chunk].float() / 255
        if channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        out[i:i + chunk] = (fn(xf) * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def batch_share(batch_size: int, rate: float, gen: torch.Generator) -> int:
    """How many images of a batch a training-controlled attack rewrites for a per-batch ``rate``.

    ``int(batch_size * rate)`` as the official BPP and IAD code; below one image per batch, one
    with probability ``batch_size * rate`` (BackdoorBench's rule for tiny rates), drawn from ``gen``.
    """
    expected = batch_size * rate
    n = math.floor(expected + 1e-9)  # + 1e-9: 0.29 * 100 is 28.999...
    if n == 0 and expected > 0:
        n = int(float(torch.rand((), generator=gen)) < expected)
    return n


@dataclass
class PoisonedSet:
    """The poisoned training set and which of its indices were poisoned."""

    data: ImageSet
    poison_idx: torch.Tensor


@dataclass(frozen=True)
class Attack(Config):
    description: ClassVar[str]
    paper: ClassVar[str]

    clean_label: ClassVar[bool] = False  # True: poison target-class images only, keep their labels
    needs_clean_model: ClassVar[bool] = False  # True: prepare() takes reference=<the clean model>
    has_trigger: ClassVar[bool] = True  # False only for ``clean``: no trigger, empty triggered test set
    learned_trigger: ClassVar[bool] = False  # True: the trigger is learned while the model trains (IAD's generators)
    weight_attack: ClassVar[bool] = False  # True: build_model() perturbs the clean reference instead of training (AWP)
    # Each field's official value and its source (bench.official.table); every field is in it.
    official: ClassVar[dict] = {}

    target: int = param(0, low=0, doc="target class (all-to-one)")
    poison_rate: float = param(0.1, low=0.0, high=1.0, doc="fraction of the training set poisoned")
    label_mode: Literal["all2one", "all2all"] = "all2one"
    state: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------ to implement
    def prepare(self, num_classes: int, channels: int, size: int, train: ImageSet, seed: int,
                reference: Optional[nn.Module] = None) -> None:
        """Build the trigger into ``self.state``; the base records the number of classes.

        ``reference`` (only for ``needs_clean_model`` attacks): the clean model, see the module notes.
        """
        from bench.registry import BenchError

        if self.target >= num_classes:
            raise BenchError(f"{self.name}.target={self.target} is out of range; allowed: [0, {num_classes - 1}]")
        if self.needs_clean_model and reference is None:
            raise BenchError(f"{self.name} needs a clean reference model; the grid passes it as prepare(..., reference=model) "
                             "(bench.run.plan.reference_job), outside the grid pass one yourself")
        if self.clean_label:
            self._check_target_present(train)
        self.state["num_classes"] = torch.tensor(num_classes)

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------ shared behaviour
    @property
    def num_classes(self) -> int:
        return int(self.state["num_classes"])

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.label_mode == "all2all":
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trigger(x), self.target_labels(y)

    def _check_target_present(self, train: ImageSet) -> None:
        """Clean-label attacks need target-class training images; one-line BenchError otherwise."""
        if not bool((train.y == self.target).any()):
            from bench.registry import BenchError

            present = ", ".join(str(int(c)) for c in train.y.unique())
            raise BenchError(f"{self.name}.target={self.target} has no training images, and a clean-label attack poisons "
                             f"only target-class images; allowed: a target with training images ({present})")

    def poison_candidates(self, train: ImageSet) -> torch.Tensor:
        """Indices that may be poisoned: target-class images for a clean-label attack; else
        non-target images for all-to-one, all for all-to-all."""
        if self.clean_label:
            return (train.y == self.target).nonzero().flatten()
        if self.label_mode == "all2one":
            return (train.y != self.target).nonzero().flatten()
        return torch.arange(len(train))

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        if self.clean_label:
            self._check_target_present(train)
        pool = self.poison_candidates(train)
        count = min(len(pool), int(round(self.poison_rate * len(train))))
        gen = torch.Generator().manual_seed(seed)
        idx = pool[torch.randperm(len(pool), generator=gen)[:count]].sort().values
        x, y = train.x.clone(), train.y.clone()
        if count and self.clean_label:
            x[idx] = self.trigger(train.x[idx])  # labels kept
        elif count:
            x[idx], y[idx] = self.apply(train.x[idx], train.y[idx])
        return PoisonedSet(ImageSet(x, y), idx)

    def train_extension(self) -> Optional[TrainExtension]:
        return None

    def build_model(self, model: nn.Module, reference: nn.Module, train: ImageSet, seed: int,
                    device: torch.device | str = "cpu") -> dict:
        """Weight attacks only (``weight_attack``): make ``model`` from ``reference`` in place, return stats (module notes)."""
        raise NotImplementedError(f"{self.name} trains on poisoned data; only weight attacks build their model")

    def test_set(self, test: ImageSet) -> TriggeredSet:
        keep = (test.y != self.target) if self.label_mode == "all2one" else torch.ones_like(test.y, dtype=torch.bool)
        x, y = test.x[keep], test.y[keep]
        xt, yt = self.apply(x, y)
        return TriggeredSet(xt, y, yt)

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state.clear()
        self.state.update(tensors)

    def with_overrides(self, **changes) -> "Attack":
        return dataclasses.replace(self, **changes)


def prepare_attack(attack: Attack, num_classes: int, channels: int, size: int, train: ImageSet, seed: int,
                   reference: Optional[nn.Module] = None) -> None:
    """``attack.prepare(...)``, with ``reference=`` passed only to an attack that declares ``needs_clean_model``."""
    extra = {"reference": reference} if attack.needs_clean_model else {}
    attack.prepare(num_classes, channels, size, train, seed, **extra)


CLEAN_LABEL_RATE_DOC = ("fraction of the WHOLE training set poisoned, drawn from target-class images only (labels kept); "
                        "capped at the number of target-class images")


def clean_label_rate(default: float, source: str = "") -> Any:
    """The ``poison_rate`` field of a clean-label attack: its default and where it comes from."""
    return param(default, low=0.0, high=1.0, doc=f"{CLEAN_LABEL_RATE_DOC} ({source})" if source else CLEAN_LABEL_RATE_DOC)


@dataclass(frozen=True)
class CleanLabelAttack(Attack):
    """Base of clean-label attacks: poisons target-class images, keeps labels, all-to-one only."""

    clean_label: ClassVar[bool] = True

    poison_rate: float = clean_label_rate(0.1)
    label_mode: Literal["all2one"] = "all2one"
