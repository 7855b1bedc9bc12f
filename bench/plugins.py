"""``--plugin FILE.py``: a researcher's attacks, defenses, detectors, models or datasets in one file, no packaging.

The file is imported once, under a module name derived from its path, before any registry is
read: its ``@ATTACKS.register(...)`` (etc.) decorators add its components. Worker processes
(local or Dask) cannot import a file by that name, so its module is registered with cloudpickle
to travel by value: its classes reach the workers inside the tasks. A file that is missing or
fails to import fails on one line naming the file and the error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from bench.registry import BenchError

_LOADED: dict[str, ModuleType] = {}


def load_plugin(path: str) -> ModuleType:
    """Import ``path`` (once per resolved path) and return its module."""
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix != ".py":
        raise BenchError(f"--plugin {path}: no such Python file (expected an existing FILE.py)")
    key = str(p.resolve())
    if key in _LOADED:
        return _LOADED[key]
    name = f"bdbench_plugin_{p.stem}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, key)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BenchError as exc:
        del sys.modules[name]
        raise BenchError(f"--plugin {p.name}: {exc}") from None
    except Exception as exc:  # any error in the user's file: one line, where it happened
        del sys.modules[name]
        tb = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == key]
        where = f" (line {tb[-1].lineno})" if tb else ""
        raise BenchError(f"--plugin {p.name} failed to import{where}: {type(exc).__name__}: {exc}") from None
    try:
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    except ImportError:  # without cloudpickle (no joblib/dask) only in-process runs use plugins
        pass
    _LOADED[key] = module
    return module
