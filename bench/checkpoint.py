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

Fit: PyTorch decides. The state dict is loaded with ``Module.load_state_dict(strict=True)``, so a
checkpoint loads here exactly when PyTorch loads it into the architecture, with PyTorch's own
rules: BatchNorm's ``num_batches_tracked`` may be missing from a state dict without version
metadata (every safetensors file) or whose metadata gives BatchNorm a version below 2, from before
it had that buffer (the module keeps its own value), a 0-d buffer may come as a one-element vector,
modules' load hooks read the metadata and rename legacy keys (torchvision's ViT ``mlp.linear_1``;
its MNASNet refuses a state dict without metadata, so its safetensors files too), non-persistent
buffers are never expected, and tensors of another dtype are cast (an fp16 or bf16 checkpoint into
an fp32 model). A ``.pt`` state dict keeps the version metadata that ``torch.save(model.state_dict())``
writes (``_metadata``, its keys stripped of ``module.`` with the tensors'), and those rules read it,
as PyTorch's do.

Every problem is one ``BenchError`` line naming the file and what was expected, raised before
any defense runs: a missing file, a truncated or foreign file, no tensors, a number of classes other
than the dataset's, or a state dict PyTorch refuses for the architecture (the first few missing,
unexpected and mis-shaped keys it names, or the first line of another reason).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

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
    """The checkpoint's tensors by name (unwrapped, ``module.`` stripped), and the per-module version metadata
    (``_metadata``) of a ``.pt`` state dict that has it, which ``load_state_dict`` reads; nothing else is kept."""
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
        consume_prefix_in_state_dict_if_present(tensors, "module.")  # the keys and the metadata's
    return tensors


def _unwrap(obj) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        return {}
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = OrderedDict((k, v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor))
    metadata = getattr(obj, "_metadata", None)
    if isinstance(metadata, dict):
        tensors._metadata = metadata  # type: ignore[attr-defined]
    return tensors


def load_into(model: nn.Module, ckpt: Checkpoint, num_classes: int, dataset: str, model_name: str) -> None:
    """Load the checkpoint into ``model`` (a ``bench.models.Classifier``) by ``load_state_dict(strict=True)``.

    Our own cached models (``net.*``, ``mean``, ``std``) load whole; a foreign state dict loads
    into ``model.net`` and the wrapper's mean and std come from ``ckpt.normalize`` (None: the
    dataset's, already in the model). What PyTorch refuses is one ``BenchError`` line; the model is then
    partly loaded, and the callers (``bench.run.plan``, ``bench.run.cells``) drop it.
    """
    tensors = read_tensors(ckpt.path)
    ours = "mean" in tensors and "std" in tensors and any(k.startswith("net.") for k in tensors)
    target = model if ours else model.net
    head = _head(target)
    if head is not None and head in tensors and tuple(tensors[head].shape) != tuple(target.get_parameter(head).shape):
        got = tensors[head].shape[0]
        raise BenchError(f"checkpoint {ckpt.name} has {got} classes ({head}: {tuple(tensors[head].shape)}), "
                         f"dataset {dataset} has {num_classes}; give the dataset the model was trained on")
    try:
        target.load_state_dict(tensors, strict=True)
    except Exception as exc:  # PyTorch's refusal (a RuntimeError), or whatever a module's load hook raises
        raise BenchError(f"checkpoint {ckpt.name} does not fit --model {model_name}: {_refusal(exc)}") from None
    if not ours and ckpt.normalize is not None:
        mean, std = ckpt.normalize
        channels = model.mean.shape[1]
        mean = mean or (0.0,)
        std = std or (1.0,)
        if len(mean) not in (1, channels):
            raise BenchError(f"--normalize gives {len(mean)} means for {channels} channels; give 1 or {channels}")
        with torch.no_grad():
            model.mean.copy_(torch.tensor(mean).expand(channels).view_as(model.mean))
            model.std.copy_(torch.tensor(std).expand(channels).view_as(model.std))


_SIZE = re.compile(r"size mismatch for (.+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
                   r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")


def _refusal(exc: Exception) -> str:
    """PyTorch's reasons, in our words: the first few missing, unexpected and mis-shaped keys, or its first line.

    ``load_state_dict`` raises one RuntimeError, ``Error(s) in loading state_dict for X:`` and then one
    line (after a tab) per reason: the missing keys, the unexpected keys (each quoted), one size mismatch
    per key, or another reason (a copy that failed)."""
    text = str(exc)
    missing, unexpected, shaped, other = [], [], [], []
    if isinstance(exc, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        for line in text.split("\n\t")[1:]:
            size = _SIZE.match(line)
            if line.startswith("Missing key(s) in state_dict:"):
                missing += re.findall(r'"([^"]*)"', line)
            elif line.startswith("Unexpected key(s) in state_dict:"):
                unexpected += re.findall(r'"([^"]*)"', line)
            elif size:
                shaped.append((size[1], *(tuple(int(d) for d in dims.split(", ") if d) for dims in size.groups()[1:])))
            elif line.strip():
                other.append(line.strip().splitlines()[0])
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} ({', '.join(keys[:SHOW])}{', ...' if len(keys) > SHOW else ''})")
    if shaped:
        shown = ", ".join(f"{k} {got} != {expected}" for k, got, expected in shaped[:SHOW])
        parts.append(f"{len(shaped)} mis-shaped ({shown}{', ...' if len(shaped) > SHOW else ''})")
    if other:
        parts.append(other[0][:200])
    if not parts:
        parts.append(f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:200]}")
    return "; ".join(parts)


def _head(net: nn.Module) -> str | None:
    """The state-dict key of the classifier head's weight: the last Linear layer's."""
    last = None
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return f"{last}.weight" if last is not None else None
