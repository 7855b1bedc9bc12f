"""Clean: no trigger and no poisoning; the same recipe trains a model that was never attacked.

Not an attack but the benchmark's negative case, as BackdoorBench's ``attack/prototype.py``
("basic normal training") is there (Wu et al., "BackdoorBench: A Comprehensive Benchmark of
Backdoor Learning", NeurIPS 2022 Datasets and Benchmarks, arXiv:2206.12654):

- its row in every table shows what each defense costs a model without a backdoor (CA), and
  what a defense flags on it;
- detection needs it as the negative case;
- attacks that compute their trigger from a clean model (``needs_clean_model``: LF's universal
  perturbation) get this model, trained through the same grid cache (``bench.run.plan.reference_job``).

``trigger`` returns the images unchanged, ``poison`` changes nothing and the triggered test set
is empty: ASR and RA are not defined for it, the records store ``null`` and the tables show "-".
No field changes the model (``poison_rate`` must stay 0; ``target`` and ``label_mode`` have no
effect), so none enters its cache key: every ``clean`` job of a (dataset, model, recipe, seed)
is the same model, whether it is a row of the grid or another attack's reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attacks.base import ATTACKS, Attack, PoisonedSet
from bench.config import param
from bench.data import ImageSet
from bench.metrics import TriggeredSet
from bench.official import ours, table


@ATTACKS.register("clean")
@dataclass(frozen=True)
class Clean(Attack):
    description: ClassVar[str] = "no attack: no trigger, nothing poisoned; the clean model of the same recipe (ASR '-')"
    paper: ClassVar[str] = ("no attack; the benign-training baseline of BackdoorBench (attack/prototype.py), Wu et al., "
                            "NeurIPS 2022 Datasets and Benchmarks, arXiv:2206.12654")
    has_trigger: ClassVar[bool] = False

    poison_rate: float = param(0.0, low=0.0, high=0.0, doc="always 0: nothing is poisoned")

    official: ClassVar[dict] = table(
        target=ours("no effect: nothing is poisoned, so no target class (BackdoorBench attack/prototype.py trains benignly)"),
        poison_rate=(0.0, "BackdoorBench attack/prototype.py: benign training, no image poisoned"),
        label_mode=ours("no effect: nothing is relabelled (BackdoorBench attack/prototype.py trains benignly)"),
    )

    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.clone(), y.clone()  # no trigger, no label map

    def poison(self, train: ImageSet, seed: int) -> PoisonedSet:
        return PoisonedSet(ImageSet(train.x.clone(), train.y.clone()), torch.zeros(0, dtype=torch.long))

    def test_set(self, test: ImageSet) -> TriggeredSet:
        return TriggeredSet(test.x[:0].clone(), test.y[:0].clone(), test.y[:0].clone())

    def to_dict(self) -> dict[str, Any]:
        return {}  # no field changes the clean model (see the module notes): one cache entry per recipe


@dataclass(frozen=True)
class Unknown(Clean):
    """A user's checkpoint defended without ``--attack``: whether, and how, it is backdoored is not known.

    Not registered (``--attack all`` never includes it): ``bench defend`` / ``bench detect`` use it
    for the model as given. Like ``clean`` it has no trigger, so ASR and RA are not measured ("-");
    unlike ``clean`` the detection harness has no truth to score against (``bench.detect.truth``).
    """

    description: ClassVar[str] = "a checkpoint as given, trigger unknown (bench defend / detect without --attack)"
    unknown: ClassVar[bool] = True


Unknown.name = "unknown"
