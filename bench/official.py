"""Official settings: each method's table of its official code's values, and a cell's departures from them.

Every attack, defense and detector class carries ``official``: a table, beside its dataclass, of the
value its official code uses for each field, with the source (BackdoorBench's where no official
code exists), built with :func:`table`. A field with no official counterpart (an engineering knob
of ours, or a choice the official code does not offer) is declared with :func:`ours` and a reason,
so that every field is accounted for: ``tests/test_official.py`` checks that each registered
method's table names every field, and that each default equals its official value.

Two keys are not fields:
- ``defense_data``: the clean data the official code gives the defense, as a fraction of the
  training set (the benchmark gives every defense of a grid the same data, ``run.defense_data``).
- a method whose official procedure gives a field no single value (NAD's layers, chosen from the
  model) says so with :func:`ours`.

A preset (``bench/presets.py``) may set other values, to fit a CPU or a small model; every record
lists the fields of its cell that differ from the official values (:func:`departures`), and the
reports mark those cells. The recipe the model was trained with is compared with the benchmark's
paper protocol (the ``paper`` preset: the RNP code's recipe), under ``train``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

PSEUDO_FIELDS = ("defense_data",)  # table keys that are not dataclass fields


@dataclass(frozen=True)
class Official:
    """One field's official value and where it comes from; ``value`` is ``OURS`` where there is none."""

    value: Any
    source: str

    @property
    def exists(self) -> bool:
        return self.value is not OURS


class _Ours:
    def __repr__(self) -> str:
        return "ours"


OURS = _Ours()  # the marker of a field with no official counterpart


def ours(why: str) -> Official:
    """A field with no official value: ``why`` says what it is (our addition, or a choice the code lacks)."""
    return Official(OURS, why)


def table(**entries: "tuple[Any, str] | Official") -> dict[str, Official]:
    """``table(epochs=(1000, "source"), select=ours("why"))`` -> ``{field: Official}``."""
    out = {}
    for name, e in entries.items():
        out[name] = e if isinstance(e, Official) else Official(_norm(e[0]), e[1])
    return out


def extend(base: Mapping[str, Official], **entries: "tuple[Any, str] | Official") -> dict[str, Official]:
    """``base`` with more (or replaced) entries: a subclass's table over its parent's."""
    return {**base, **table(**entries)}


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def same(a: Any, b: Any) -> bool:
    """Whether a configured value equals an official one (floats to 1e-9 relative, tuples as lists)."""
    a, b = _norm(a), _norm(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def official_table(cls: type) -> dict[str, Official]:
    """The class's table ({} for a class that declares none, e.g. a user's plugin)."""
    return dict(getattr(cls, "official", None) or {})


def departures_of(prefix: str, cls: type, values: Mapping[str, Any]) -> list[dict]:
    """``[{field, value, official, source}]`` for each of ``values`` that differs from ``cls``'s official value."""
    out = []
    for name, off in official_table(cls).items():
        if not off.exists or name not in values or name in PSEUDO_FIELDS:
            continue
        if not same(values[name], off.value):
            out.append({"field": f"{prefix}.{name}", "value": _norm(values[name]), "official": off.value, "source": off.source})
    return out


def defense_data_departure(prefix: str, cls: type, images: int | None, n_train: int | None) -> list[dict]:
    """The departure of the defense data from the method's official share of the training set, if any.

    Compared as counts: the official share of this training set, rounded, against the images given.
    """
    off = official_table(cls).get("defense_data")
    if off is None or not off.exists or images is None or not n_train:
        return []
    want = round(float(off.value) * n_train)
    if images == want:
        return []
    return [{"field": f"{prefix}.defense_data", "value": f"{images} images ({images / n_train:.2%})",
             "official": f"{want} images ({float(off.value):.0%})", "source": off.source}]


def recipe_departures(train: Mapping[str, Any], protocol: Mapping[str, Any],
                      ignore: Iterable[str] = ("bf16", "channels_last")) -> list[dict]:
    """The training recipe's fields that differ from the paper protocol's recipe (precision and layout left out:
    they are how this machine computes, recorded with the device)."""
    out = []
    for name, want in protocol.items():
        if name in ignore or name not in train:
            continue
        if not same(train[name], want):
            out.append({"field": f"train.{name}", "value": _norm(train[name]), "official": _norm(want),
                        "source": "the paper protocol's recipe (bboylyg/RNP train_backdoor.py; bench/presets.py, paper)"})
    return out


def describe(d: dict) -> str:
    """One departure as text: ``nc.epochs 10 (official 1000)``, and the rule that set it if one did."""
    rule = f", {d['rule']}" if d.get("rule") else ""
    return f"{d['field']} {_fmt(d['value'])} (official {_fmt(d['official'])}{rule})"


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
