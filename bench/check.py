"""The registries' contracts as checks a user can run on their own component: ``bench check --plugin FILE.py``.

The same functions back the contract tests (``tests/test_defenses.py``, ``tests/test_detectors.py``,
``tests/test_attacks.py``), so a plugin is held to exactly what every built-in component is held to:

- a defense or detector sees only the model, its clean defense data and the context: loading or
  drawing any dataset while it runs fails the check; it draws nothing from the global RNG; it
  leaves the clean data as it was; the same seed gives the same model / answer (twice, from
  scratch); its answer has the right shape and its facts are JSON; the model stays on its device;
- an attack's trigger keeps images uint8 and their shape, is the same for the same seed, and
  ``poison`` poisons the documented share;
- every component refuses an unknown field and an ill-typed value on one line (``BenchError``).

Each check returns ``(name, ok, detail)``; ``check_component`` runs those of one registry entry on
tiny synthetic data (seconds).
"""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Callable, Iterator

import torch
from torch import nn

import bench.data
from bench.config import build
from bench.data import DATASETS, ImageSet
from bench.registry import BenchError

Result = tuple[str, bool, str]

# Budgets that make the built-in methods' contract checks take seconds on tiny data: their defaults are
# the official budgets (thousands of steps). The contract is about what a method touches, not how long
# it trains; `bench check` and the contract tests use these.
CHEAP: dict[str, dict] = {
    "anp": {"iterations": 4},
    "fp": {"finetune_epochs": 1},
    "fst": {"epochs": 1},
    "ft": {"epochs": 1},
    "ibau": {"rounds": 1, "search_steps": 2, "outer_steps": 2},
    "nad": {"epochs": 1, "teacher_epochs": 1},
    "nc": {"epochs": 2, "batches_per_epoch": 1, "unlearn_epochs": 1},
    "rnp": {"unlearn_epochs": 2, "recover_epochs": 2},
    "nc_label": {"epochs": 2, "batches_per_epoch": 1, "unlearn_epochs": 0},
    "rnp_label": {"unlearn_epochs": 2, "recover_epochs": 2},
    "rnp_samples": {"unlearn_epochs": 2, "recover_epochs": 2},
    "rnp_trigger": {"unlearn_epochs": 2, "recover_epochs": 2, "epochs": 2, "batches_per_epoch": 1},
    "strip": {"n_overlays": 4},
}


@contextlib.contextmanager
def only_given_data() -> Iterator[None]:
    """While active, loading or drawing a dataset (or a defense subset) raises: a method may use only what it got."""

    def forbidden(*a, **k):
        raise AssertionError("a defense or detector may use only the model, the clean set and the context")

    saved = [(bench.data.Dataset, "load"), (bench.data.Synthetic, "draw"), (bench.data, "defense_subset")]
    old = [getattr(o, n) for o, n in saved]
    try:
        for o, n in saved:
            setattr(o, n, forbidden)
        yield
    finally:
        for (o, n), v in zip(saved, old):
            setattr(o, n, v)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _run(checks: list[Result], name: str, fn: Callable[[], str | None]) -> None:
    try:
        detail = fn()
        checks.append((name, True, detail or ""))
    except Exception as exc:  # a check that fails for any reason is a failed check, with the reason
        checks.append((name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


def check_fields(cls) -> list[Result]:
    """An unknown field and an ill-typed value are refused with a BenchError."""
    checks: list[Result] = []

    def unknown():
        try:
            build(cls, {"no_such_field": "1"})
        except BenchError:
            return None
        raise AssertionError("an unknown field was accepted")

    def typed():
        fields = [f for f in getattr(cls, "__dataclass_fields__", {}).values()
                  if f.init and f.type in ("int", "float", int, float)]
        if not fields:
            return "no numeric field to try"
        try:
            build(cls, {fields[0].name: "not-a-number"})
        except BenchError:
            return None
        raise AssertionError(f"{fields[0].name}=not-a-number was accepted")

    _run(checks, "refuses an unknown field", unknown)
    _run(checks, "refuses an ill-typed value", typed)
    return checks


def tiny_setup(seed: int = 0):
    """A tiny synthetic task: (model trained a few steps, clean defense set, context factory)."""
    from bench.models import MODELS
    from bench.train import TrainConfig, train
    from defenses.base import DefenseContext

    syn = DATASETS.get("synthetic")(n_train=300, n_test=10)
    train_set, _ = syn.load()
    model = MODELS.get("smallcnn")(width=4).build(10, 3, syn.mean, syn.std, seed=seed)
    train(model, train_set.subset(torch.arange(250)), TrainConfig(epochs=2, batch_size=50, lr=0.1), syn.augmentation, seed=seed)
    clean = train_set.subset(torch.arange(250, 300))

    def ctx(s: int = 3):
        return DefenseContext(num_classes=10, augmentation=syn.augmentation, seed=s)

    return model.eval(), clean, ctx


def _twice(call: Callable, before_each: Callable[[], None], out: list) -> None:
    """Two independent runs of ``call`` (``before_each`` first) with only the given data reachable; each
    result appended to ``out``; the global RNG must be where it was."""
    rng = torch.get_rng_state()
    with only_given_data():
        for _ in range(2):
            before_each()
            out.append(call())
    if not torch.equal(torch.get_rng_state(), rng):
        raise AssertionError("it drew from the global RNG")


def check_defense(defense, model: nn.Module, clean: ImageSet, ctx: Callable, before_each: Callable[[], None] = lambda: None) -> list[Result]:
    """The defense contract (module docstring) on ``model`` and ``clean``; ``before_each`` runs before each of
    the two runs (the tests empty RNP's stage-1 memo there, so the runs are independent)."""
    checks: list[Result] = []
    clean_copy = ImageSet(clean.x.clone(), clean.y.clone())
    x = clean.x[:5].float() / 255
    results = []

    _run(checks, "runs on the model and clean data alone, no global RNG",
         lambda: _twice(lambda: defense(copy.deepcopy(model), clean, ctx()), before_each, results))
    if len(results) < 2:
        return checks
    _run(checks, "leaves the clean data as it was",
         lambda: None if torch.equal(clean.x, clean_copy.x) and torch.equal(clean.y, clean_copy.y) else _fail("changed"))

    def shapes():
        for res in results:
            out = res.model(x)
            if out.shape != model(x).shape:
                raise AssertionError(f"the defended model gives {tuple(out.shape)}, expected {tuple(model(x).shape)}")
            json.dumps(res.info)
        if results[0].sweep is not None:
            for point in results[0].sweep():
                if point[1](x).shape != model(x).shape:
                    raise AssertionError(f"sweep point {point[0]} gives another shape")

    _run(checks, "returns a working model and JSON facts", shapes)
    _run(checks, "the same seed gives the same model and facts", lambda: None if (
        same_state(results[0].model, results[1].model)
        and json.dumps(results[0].info, sort_keys=True) == json.dumps(results[1].info, sort_keys=True)) else _fail("they differ"))
    device = next(model.parameters()).device
    _run(checks, "keeps the model on its device", lambda: None if all(
        p.device == device for p in results[0].model.parameters()) else _fail("a parameter moved"))
    return checks


def check_detector(detector, model: nn.Module, clean: ImageSet, ctx: Callable, before_each: Callable[[], None] = lambda: None) -> list[Result]:
    """The detector contract: model level answers (label, score), sample/input level one score per input;
    only the given data, the same answer for the same seed."""
    checks: list[Result] = []
    inputs = ImageSet.unlabelled(clean.x[:20].clone()) if detector.level != "model" else None
    answers = []

    extra = (inputs,) if inputs is not None else ()
    _run(checks, "runs on the model and clean data alone, no global RNG",
         lambda: _twice(lambda: detector(copy.deepcopy(model), clean, ctx(), *extra), before_each, answers))
    if len(answers) < 2:
        return checks

    def shape():
        a = answers[0]
        if detector.level == "model":
            if a.label is not None and not 0 <= int(a.label) < 10:
                raise AssertionError(f"label {a.label} is not a class")
            float(a.score)
        elif tuple(a.scores.shape) != (len(inputs),):
            raise AssertionError(f"{tuple(a.scores.shape)} scores for {len(inputs)} inputs")
        json.dumps(a.info)

    def same():
        a, b = answers
        if detector.level == "model":
            ok = a.label == b.label and float(a.score) == float(b.score)
        else:
            ok = torch.equal(a.scores, b.scores)
        return None if ok else _fail("two runs with the same seed answered differently")

    _run(checks, "answers in the documented shape, JSON facts", shape)
    _run(checks, "the same seed gives the same answer", same)
    return checks


def check_attack(attack_cls) -> list[Result]:
    """The attack contract on a tiny synthetic set: uint8 in, uint8 out, same shape; the same seed the same
    trigger; ``poison`` poisons round(rate x n) images (capped for clean-label attacks)."""
    checks: list[Result] = []
    syn = DATASETS.get("synthetic")(n_train=200, n_test=20)
    train_set, test_set = syn.load()
    made = []

    def prepare():
        if getattr(attack_cls, "needs_clean_model", False):
            return "needs a clean reference model: prepared by the grid, not here"
        for _ in range(2):
            a = attack_cls()
            a.prepare(10, 3, 32, train_set, 0)
            made.append(a)

    _run(checks, "prepares from the seed", prepare)
    if len(made) < 2:
        return checks
    a, b = made
    x = test_set.x[:8]

    def trigger():
        t = a.trigger(x)
        if t.dtype != torch.uint8 or t.shape != x.shape:
            raise AssertionError(f"trigger gives {t.dtype} {tuple(t.shape)} for uint8 {tuple(x.shape)}")
        if not torch.equal(t, b.trigger(x)):
            raise AssertionError("the same seed gave another trigger")

    def poison():
        p = a.poison(train_set, 0)
        want = int(round(a.poison_rate * len(train_set)))
        if not a.clean_label and len(p.poison_idx) != want:
            raise AssertionError(f"{len(p.poison_idx)} poisoned, expected {want}")
        if len(p.data) != len(train_set):
            raise AssertionError("poison changed the number of images")

    _run(checks, "trigger keeps uint8 and the shape, same seed same trigger", trigger)
    if a.has_trigger and not getattr(attack_cls, "learned_trigger", False):
        _run(checks, "poisons the documented share", poison)
    return checks


def _fail(why: str):
    raise AssertionError(why)


def check_component(kind: str, name: str) -> list[Result]:
    """Every check of registry entry ``name`` (kind: attack, defense, detector)."""
    from attacks import ATTACKS
    from defenses import DEFENSES
    from detectors import DETECTORS

    reg = {"attack": ATTACKS, "defense": DEFENSES, "detector": DETECTORS}[kind]
    cls = reg.get(name)
    checks = check_fields(cls)
    if kind == "attack":
        return checks + check_attack(cls)
    model, clean, ctx = tiny_setup()
    obj = cls(**CHEAP.get(name, {})) if cls.__module__.split(".")[0] in ("defenses", "detectors") else cls()
    return checks + (check_defense if kind == "defense" else check_detector)(obj, model, clean, ctx)
