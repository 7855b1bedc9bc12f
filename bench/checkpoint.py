"""A user's checkpoint as a model of the grid: read it safely, check it against the architecture, wrap it.

Formats: ``.safetensors`` (read by safetensors: no code can run); ``.pt`` / ``.pth`` / ``.bin``
read by ``torch.load(weights_only=True)`` only, which unpickles tensors, containers and
numbers and refuses anything else (a pickle that would import a module or call a function is
refused on one line, and its code does not run). The weights may sit at the top level or under
one of the usual keys (``state_dict``, ``model``, ``model_state_dict``, ``net``), with or without
DataParallel's ``module.`` prefix. A model cached by bdbench itself (a ``Classifier``: keys
``net.*`` plus its ``mean`` / ``std``) loads as it is.

Normalisation: every model of the grid takes images in [0, 1] and normalises them itself
(``bench.models.Classifier``). A foreign state dict is the network alone, so it is wrapped with
the mean and std it was trained with: ``--normalize MEAN,STD`` (one value each, or one per
channel), ``--normalize none`` (the network takes [0, 1] itself), or by default the dataset's
(``bench list datasets --fields`` does not show them; ``bench/data.py`` does).

Every problem is one ``BenchError`` line naming the file and what was expected, raised before
any defense runs: a missing file, a truncated or foreign file, no tensors, keys or shapes that do
not match the architecture (the first few missing, unexpected and mis-shaped keys), a number of
classes other than the dataset's.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.registry import BenchError

FORMATS = (".safetensors", ".pt", ".pth", ".bin")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
SHOW = 3  # keys named per kind of mismatch


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file as the grid keys it: by content (sha256), not by path."""

    path: str
    name: str
    size: int
    sha256: str
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # None: the dataset's; ((), ()) : none

    @classmethod
    def open(cls, path: str | os.PathLike, normalize: str | None = None) -> "Checkpoint":
        p = Path(path).expanduser()
        if not p.is_file():
            raise BenchError(f"checkpoint {path} does not exist (or is not a file)")
        if p.suffix.lower() not in FORMATS:
            raise BenchError(f"checkpoint {p.name} has suffix {p.suffix or '(none)'!r}; allowed: {', '.join(FORMATS)}")
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return cls(str(p.resolve()), p.name, p.stat().st_size, h.hexdigest(), parse_normalize(normalize))

    @property
    def facts(self) -> dict:
        """What records say about it."""
        return {"file": self.name, "size": self.size, "sha256": self.sha256,
                "normalize": None if self.normalize is None else [list(v) for v in self.normalize]}


def parse_normalize(value: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``--normalize``: None (the dataset's), ``none`` (identity), or ``MEAN,STD`` / ``M1,M2,M3,S1,S2,S3``."""
    if value is None or value.strip().lower() in ("", "dataset"):
        return None
    if value.strip().lower() == "none":
        return ((), ())
    try:
        nums = [float(v) for v in value.split(",")]
    except ValueError:
        raise BenchError(f"--normalize {value!r} is not numbers; allowed: none, MEAN,STD, or one mean and one std per channel") from None
    if len(nums) % 2 or not nums or any(s <= 0 for s in nums[len(nums) // 2:]):
        raise BenchError(f"--normalize {value!r} needs as many means as stds (> 0); e.g. 0.5,0.5 or 0.49,0.48,0.45,0.25,0.24,0.26")
    half = len(nums) // 2
    return tuple(nums[:half]), tuple(nums[half:])


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name (unwrapped, ``module.`` stripped); nothing else is kept."""
    p = Path(path)
    name = p.name
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BenchError(f"checkpoint {name} is not a readable safetensors file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'truncated?'})") from None
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).split("\n")[0]
            why = "it holds code or objects other than tensors" if "weights_only" in str(exc) or "Unsupported" in str(exc) \
                else "it is not a torch checkpoint"
            raise BenchError(f"checkpoint {name} refused: {why}; only tensors are read (torch.load weights_only=True: "
                             f"{first[:160]})") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise BenchError(f"checkpoint {name} is not a readable torch file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else 'truncated?'})") from None
    tensors = _unwrap(obj)
    if not tensors:
        raise BenchError(f"checkpoint {name} holds no tensors; expected a state dict (at the top level or under "
                         f"{', '.join(WRAPPER_KEYS)})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _unwrap(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {}
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return {}


def load_into(model: nn.Module, ckpt: Checkpoint, num_classes: int, dataset: str, model_name: str) -> None:
    """Load the checkpoint into ``model`` (a ``bench.models.Classifier``), checked key by key and shape by shape.

    Our own cached models (``net.*``, ``mean``, ``std``) load whole; a foreign state dict loads
    into ``model.net`` and the wrapper's mean and std come from ``ckpt.normalize`` (None: the
    dataset's, already in the model).
    """
    tensors = read_tensors(ckpt.path)
    ours = "mean" in tensors and "std" in tensors and any(k.startswith("net.") for k in tensors)
    target = model if ours else model.net
    want = target.state_dict()
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    shaped = [k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]
    head = _head(target)
    if head is not None and head in shaped:
        got = tensors[head].shape[0]
        raise BenchError(f"checkpoint {ckpt.name} has {got} classes ({head}: {tuple(tensors[head].shape)}), "
                         f"dataset {dataset} has {num_classes}; give the dataset the model was trained on")
    if missing or unexpected or shaped:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:SHOW])}{', ...' if len(keys) > SHOW else ''})")
        if shaped:
            shown = ", ".join(f"{k} {tuple(tensors[k].shape)} != {tuple(want[k].shape)}" for k in shaped[:SHOW])
            parts.append(f"{len(shaped)} mis-shaped ({shown}{', ...' if len(shaped) > SHOW else ''})")
        raise BenchError(f"checkpoint {ckpt.name} does not fit --model {model_name}: {'; '.join(parts)}")
    with torch.no_grad():
        target.load_state_dict({k: tensors[k].to(want[k].dtype) for k in want})
        if not ours and ckpt.normalize is not None:
            mean, std = ckpt.normalize
            channels = model.mean.shape[1]
            mean = mean or (0.0,)
            std = std or (1.0,)
            if len(mean) not in (1, channels):
                raise BenchError(f"--normalize gives {len(mean)} means for {channels} channels; give 1 or {channels}")
            model.mean.copy_(torch.tensor(mean).expand(channels).view_as(model.mean))
            model.std.copy_(torch.tensor(std).expand(channels).view_as(model.std))


def _head(net: nn.Module) -> str | None:
    """The state-dict key of the classifier head's weight: the last Linear layer's."""
    last = None
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return f"{last}.weight" if last is not None else None
