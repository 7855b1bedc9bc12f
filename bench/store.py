"""Atomic file writes, safetensors I/O, content hashes and the fault points tests kill runs at.

Nothing here unpickles: tensors are read from safetensors files only.

Every write goes to a temporary file in the same folder and is renamed into place,
so a reader (or a rerun after SIGKILL) sees either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.registry import BenchError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors (made contiguous, on the CPU) as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one fails naming it (nothing in it is run)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as exc:  # SafetensorError and friends: a torn or foreign file
        raise BenchError(f"{path} is not a readable safetensors file ({exc}); delete it to have it rebuilt") from None


def load_tensors_and_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file and its string metadata (``{}`` when it has none)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


FAULT_EXIT = 86  # the exit status of a process stopped by fault_point
_FAULTS: dict[str, int] = {}


def fault_point(event: str, tag: str = "") -> None:
    """A named point where a test may kill the process. ``BENCH_FAULT=<mode>:<event>[:<n>][@<text>]``:

    - ``after``: the process ends at once, ``os._exit(FAULT_EXIT)``, as a SIGKILL would end it;
      ``kill``: it sends itself SIGKILL (a Dask worker killed while it works);
    - ``event``: ``model_cached``, ``cell_written``, ``records_written``, ``tensors_written``
      (right after them) or ``train_started`` (a model's training is about to start);
    - ``n``: the n-th such event in this process (default the first); ``@text``: count only events
      whose ``tag`` contains ``text`` (``train_started`` is tagged with the job, e.g.
      ``synthetic/smallcnn/blend/s0``).

    ``BENCH_FAULT_ONCE=<file>`` makes the fault fire once across processes: only the process that
    creates that file first (``O_EXCL``). Without ``BENCH_FAULT`` it does nothing."""
    want = os.environ.get("BENCH_FAULT")
    if not want:
        return
    want, _, text = want.partition("@")
    kind, _, rest = want.partition(":")
    name, _, nth = rest.partition(":")
    if name != event or text not in tag:
        return
    key = f"{os.environ['BENCH_FAULT']} {event}"  # counted per setting: a reused worker starts afresh for a new one
    _FAULTS[key] = _FAULTS.get(key, 0) + 1
    if kind not in ("after", "kill") or _FAULTS[key] != int(nth or 1):
        return
    once = os.environ.get("BENCH_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(FAULT_EXIT)


def content_hash(obj: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
