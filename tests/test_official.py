"""Every built-in method's defaults against its table of official values (``bench/official.py``)."""

from __future__ import annotations

import dataclasses

import pytest

import attacks  # noqa: F401
import defenses  # noqa: F401
import detectors  # noqa: F401
from attacks.base import ATTACKS
from bench.official import OURS, PSEUDO_FIELDS, Official, departures_of, official_table, same
from defenses.base import DEFENSES
from detectors.base import DETECTORS

METHODS = [(reg.kind, name) for reg in (ATTACKS, DEFENSES, DETECTORS) for name in reg.names()]


def _cls(kind: str, name: str) -> type:
    return {"attack": ATTACKS, "defense": DEFENSES, "detector": DETECTORS}[kind].get(name)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


@pytest.mark.parametrize("kind,name", METHODS)
def test_every_field_has_an_official_entry(kind, name):
    """A field without an entry (an official value and its source, or ``ours`` with a reason) fails here."""
    cls = _cls(kind, name)
    tab = official_table(cls)
    missing = sorted(set(_fields(cls)) - set(tab))
    assert not missing, f"{name}: no official entry for {', '.join(missing)}"
    unknown = sorted(set(tab) - set(_fields(cls)) - set(PSEUDO_FIELDS))
    assert not unknown, f"{name}: official entries for fields it does not have: {', '.join(unknown)}"
    for field_name, off in tab.items():
        assert isinstance(off, Official) and off.source.strip(), f"{name}.{field_name}: an entry needs its source"


@pytest.mark.parametrize("kind,name", METHODS)
def test_defaults_are_the_official_values(kind, name):
    cls = _cls(kind, name)
    tab = official_table(cls)
    wrong = [f"{n}={_default(f)!r} (official {tab[n].value!r}: {tab[n].source})" for n, f in _fields(cls).items()
             if n in tab and tab[n].value is not OURS and not same(_default(f), tab[n].value)]
    assert not wrong, f"{name}: defaults that are not the official values: " + "; ".join(wrong)
    assert departures_of(name, cls, cls().to_dict()) == []
