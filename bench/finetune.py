"""The one rule for the learning rate of every defense that fine-tunes the model's weights.

A fine-tuning defense's official learning rate was set for models trained with its authors'
recipe: BackdoorBench fine-tunes (FT, FP, NC's unlearning) at SGD 0.01 the models it trains at SGD
0.01; NAD fine-tunes at 0.1 the models it trains at 0.1; FST at 0.01 those trained at 0.1. Our
recipes train at other rates (the quick preset 0.1, the demo 0.2), and a constant taken over as it
is would fine-tune ten times more gently in one method than in another relative to the same model.

The rule: a fine-tuning learning rate keeps its official ratio to the training learning rate,

    lr = official lr x (recipe lr / reference lr),

where the reference lr is the peak SGD learning rate of the recipe the official code trains its
backdoored models with (``FineTuneLR.train_lr``, with its source). Where that recipe is not an SGD
one the ratio is undefined and the official value is kept (scale 1): i-BAU's models are trained
with Adam at 0.05 (its paper's appendix), and its outer step is Adam at 1e-3.

The rule is applied in one place, when the grid builds a defense or detector
(``bench.run.plan``), to the fields the class names in ``finetune_lr`` and only where neither the
preset nor ``--set`` gave the field a value. ``--set run.finetune_lr=official`` keeps the official
constants instead. The scaled value is the one in the record's config, and it shows as a departure
from the official value wherever the scale is not 1. For a user's checkpoint the recipe is the
preset's unless ``--set train.lr=...`` says what the model was trained with.

RNP's unlearning and mask learning are not fine-tuning in this sense and keep their official
rates: unlearning ascends until the defense-data accuracy falls to ``clean_threshold``, so its
rate sets how fast, not how far; the masks are not weights. The measured effect of the rule
against the official constants is in docs/measurements.md ("The fine-tuning rule").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from bench.official import official_table


@dataclass(frozen=True)
class FineTuneLR:
    """Which fields of a method are fine-tuning learning rates, and the reference recipe's training lr."""

    fields: tuple[str, ...]
    train_lr: float | None  # None: the reference recipe is not SGD (the official value is kept)
    source: str

    def scale(self, recipe_lr: float) -> float:
        return 1.0 if self.train_lr is None else recipe_lr / self.train_lr


def rule_of(cls: type) -> FineTuneLR | None:
    return getattr(cls, "finetune_lr", None)


def apply(component: Any, recipe_lr: float, mode: str, given: Iterable[str]) -> tuple[Any, dict | None]:
    """``component`` with its fine-tuning learning rates set by the rule, and the facts for the record.

    ``given``: the fields the preset or ``--set`` set (left as they are). ``mode``: "recipe" (the
    rule) or "official" (the official constants, unscaled). Returns ``(component, None)`` for a
    class without fine-tuning learning rates.
    """
    rule = rule_of(type(component))
    if rule is None:
        return component, None
    tab = official_table(type(component))
    scale = rule.scale(recipe_lr) if mode == "recipe" else 1.0
    given = set(given)
    changes = {}
    for name in rule.fields:
        if name in given:
            continue
        base = tab[name].value if name in tab and tab[name].exists else getattr(component, name)
        changes[name] = float(base) * scale
    facts = {"mode": mode, "recipe_lr": recipe_lr, "reference_train_lr": rule.train_lr, "scale": scale,
             "fields": {n: changes.get(n, getattr(component, n)) for n in rule.fields},
             "given": sorted(given & set(rule.fields)), "source": rule.source}
    return (dataclasses.replace(component, **changes) if changes else component), facts
