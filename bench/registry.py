"""Named registries of components, in the spirit of torchvision's ``models/_api.py``.

A registry maps a short name to a component class. ``register`` refuses duplicates,
``get`` fails with an error listing the known names and the closest matches, and
``names`` lists them. Third-party packages add entries through an entry-point group
(``bdbench.attacks``, ``bdbench.defenses``): each plugin is imported lazily, the first
time a name is looked up or listed, and a plugin that fails to import is reported
on its own line (``Registry.plugin_errors``) instead of breaking the CLI.

A registry may also hold families: ``register_family("torchvision", make)`` makes every
``torchvision:NAME`` a component, built on first use by ``make("NAME")`` (which raises a
``BenchError`` for a name it cannot build) and then remembered under its full name.
"""

from __future__ import annotations

import difflib
import re
from importlib import metadata
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class BenchError(ValueError):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""


class Registry(Generic[T]):
    """A name -> component map that refuses duplicates and explains misses."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self._group = entry_point_group
        self._entries: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None
        self.plugin_errors: dict[str, str] = {}
        self.families: dict[str, tuple[Callable[[str], T], str]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@ATTACKS.register("badnets")`` on a component class."""

        def wrap(obj: T) -> T:
            if name in self._entries:
                raise BenchError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            if isinstance(obj, type) and not hasattr(obj, "name"):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return wrap

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self._group):
            if ep.name in self._entries:
                continue
            try:
                obj = ep.load()
                self.register(ep.name)(obj)
            except Exception as exc:  # one broken plugin never breaks the rest
                self.plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"

    def register_family(self, prefix: str, make: Callable[[str], T], doc: str) -> None:
        """Make ``prefix:NAME`` resolve to ``make(NAME)`` (see the module docstring); ``doc`` is shown in lists."""
        if prefix in self.families:
            raise BenchError(f"{self.kind} family {prefix!r} is already registered")
        self.families[prefix] = (make, doc)

    def _member(self, name: str) -> T | None:
        prefix, sep, rest = name.partition(":")
        if not sep or prefix not in self.families:
            return None
        if not rest:
            raise BenchError(f"{self.kind} {name!r} names no member of {prefix!r}; e.g. {prefix}:{self.families[prefix][1].split()[0]}")
        obj = self.families[prefix][0](rest)
        if isinstance(obj, type):
            obj.name = name  # type: ignore[attr-defined]
        self._entries[name] = obj
        return obj

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._load_plugins()
        if name in self._entries:
            return self._entries[name]
        if name in self.plugin_errors:
            raise BenchError(f"{self.kind} plugin {name!r} failed to load: {self.plugin_errors[name]}")
        member = self._member(name)
        if member is not None:
            return member
        close = difflib.get_close_matches(name, self._entries, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        fams = "".join(f", {p}:NAME" for p in self.families)
        raise BenchError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}{fams}")

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        if name in self._entries:
            return True
        try:
            return self._member(name) is not None
        except BenchError:
            return False

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]


def slug(name: str) -> str:
    """A component name as it appears in file names and cell ids: ``torchvision:resnet18`` stays,
    ``folder:~/data/signs`` becomes ``folder:~_data_signs`` (no path separator, nothing a shell trips on)."""
    return re.sub(r"[^A-Za-z0-9_.:~+=-]+", "_", name).strip("_") or "_"
