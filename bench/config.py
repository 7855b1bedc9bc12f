"""Typed, validated component configs and ``--set component.field=value`` overrides.

Every component (dataset, model, attack, defense, the trainer) is a frozen dataclass
whose fields are its hyperparameters. ``param`` declares a field with its allowed
range; ``Literal[...]`` types declare choices. Values are checked when the object is
built, so a bad override fails before any work starts, with a one-line message that
names the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from bench.registry import BenchError


def param(default: Any, *, low: float | None = None, high: float | None = None, doc: str = "") -> Any:
    """A dataclass field with an allowed closed range ``[low, high]`` and a docstring."""
    kw = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return dataclasses.field(metadata={"low": low, "high": high, "doc": doc}, **kw)


class Config:
    """Mixin for frozen dataclass configs: validates ranges and choices on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            value = getattr(self, f.name)
            where = f"{_label(self)}.{f.name}"
            tp = hints.get(f.name)
            if get_origin(tp) is Literal and value not in get_args(tp):
                allowed = ", ".join(map(str, get_args(tp)))
                raise BenchError(f"{where}={value!r} is not allowed; choose one of: {allowed}")
            low, high = f.metadata.get("low"), f.metadata.get("high")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if (low is not None and value < low) or (high is not None and value > high):
                    raise BenchError(f"{where}={value!r} is out of range; allowed: [{_fmt(low)}, {_fmt(high)}]")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]


def _label(obj: Any) -> str:
    return getattr(type(obj), "name", type(obj).__name__)


def _fmt(x: float | None) -> str:
    return "..." if x is None else f"{x:g}"


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def parse_value(cls: type, field_name: str, text: str) -> Any:
    """Convert the string ``text`` to the type of ``cls.field_name``; raise BenchError otherwise."""
    label = getattr(cls, "name", cls.__name__)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if field_name not in fields:
        raise BenchError(f"{label} has no field {field_name!r}; fields: {', '.join(sorted(fields))}")
    tp = typing.get_type_hints(cls)[field_name]
    try:
        return _convert(tp, text)
    except (ValueError, TypeError):
        raise BenchError(f"{label}.{field_name}={text!r} is not a valid {_type_name(tp)}") from None


def _convert(tp: Any, text: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        for choice in get_args(tp):
            if str(choice) == text:
                return choice
        return text  # validation in Config names the allowed choices
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _convert(args[0], text)
    if origin is tuple:
        inner = get_args(tp)[0]
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        return tuple(_convert(inner, p.strip()) for p in parts)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    return str(text)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "choice of " + ", ".join(map(str, get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def build(cls: type, overrides: dict[str, str] | None = None, **values: Any) -> Any:
    """Build ``cls`` from typed ``values`` and string ``overrides`` (field -> text)."""
    kwargs = dict(values)
    for name, text in (overrides or {}).items():
        kwargs[name] = parse_value(cls, name, text)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise BenchError(f"{getattr(cls, 'name', cls.__name__)}: {exc}") from None


def parse_sets(items: typing.Iterable[str]) -> dict[str, dict[str, str]]:
    """``["rnp.clean_threshold=0.3"]`` -> ``{"rnp": {"clean_threshold": "0.3"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        comp, dot, field_name = key.strip().partition(".")
        if not sep or not dot or not comp or not field_name:
            raise BenchError(f"--set {item!r} is malformed; expected component.field=value, e.g. rnp.clean_threshold=0.3")
        out.setdefault(comp, {})[field_name] = value.strip()
    return out


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(field, type, default, doc) rows, for ``bench list --fields``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows
