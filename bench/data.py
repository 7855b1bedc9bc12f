"""Datasets as in-memory uint8 tensors, batched augmentation, and the clean defense subset.

Every dataset loads to two ``ImageSet``s (train, test): ``x`` uint8 ``[N, C, H, W]``
and ``y`` int64 ``[N]``. Real sets are decoded once (GTSRB's images through torchvision's
file list and PIL, MNIST's IDX files directly, CIFAR's pickled batches by an unpickler that
builds numpy arrays only) and cached as safetensors under ``cache_dir()/datasets``, keyed by
the data folder and a fingerprint of its files, so a second load is a file read and another
copy of the data is decoded anew. ``Dataset.provenance`` says where the images came from and
carries their digest, which keys the models trained on them. The dataset class declares its
augmentation (random crop with zero padding, horizontal flip or not), which ``augment``
applies to whole batches on the device.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal

import numpy as np
import torch

from bench.config import Config, param
from bench.registry import BenchError, Registry
from bench.store import content_hash, load_tensors_and_metadata, save_tensors


UNLABELLED = -1  # the label of an input whose label nobody knows (the detection track's test-time mix)


@dataclass
class ImageSet:
    """Images ``x`` (uint8, ``[N, C, H, W]``) with labels ``y`` (int64, ``[N]``; ``UNLABELLED`` where unknown)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise ValueError(f"ImageSet.x must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (len(self.x),):
            raise ValueError(f"ImageSet.y must have shape [{len(self.x)}], got {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.x.to(device), self.y.to(device))

    @classmethod
    def unlabelled(cls, x: torch.Tensor) -> "ImageSet":
        """Images without labels: every ``y`` is ``UNLABELLED``."""
        return cls(x, torch.full((len(x),), UNLABELLED, dtype=torch.long))

    @property
    def labelled(self) -> bool:
        """False where the labels are unknown (``ImageSet.unlabelled``)."""
        return not bool((self.y == UNLABELLED).any())


@dataclass(frozen=True)
class Augmentation:
    """Random crop with ``pad`` pixels of zero padding, and a random horizontal flip if ``flip``."""

    pad: int = 4
    flip: bool = True


def step_generator(gen: torch.Generator, device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """The generator for a loop's per-step draws (batch indices, crop offsets, flips, noise) on ``device``.

    On the CPU it is ``gen`` itself: one stream, exactly the draws the loops made before this helper
    existed, so CPU results stay reproducible. On another device it is a generator *on that device*,
    seeded with ``seed`` (the loop's own seed), or, when none is given, with one draw from ``gen`` (a
    host-side draw, no device sync). Draws from it are made on the device: no host-to-device copy and
    no host sync per step (a copy from pageable host memory blocks the host; PyTorch's "CUDA semantics"
    notes, https://pytorch.org/docs/stable/notes/cuda.html, on pinned memory and ``non_blocking``).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return gen
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def augment(x: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """Augment a uint8 batch ``[B, C, H, W]`` on its own device.

    The crop offsets and flips are drawn on ``gen``'s device: a generator on the batch's device
    (``step_generator``) keeps the step free of copies and host syncs; a CPU generator with a batch
    elsewhere still works (the draws are copied over). On the CPU the draws are the ones this
    function always made: offsets ``randint(0, 2p+1, (2, B))``, then flips ``rand(B) < 0.5``.
    """
    b, c, h, w = x.shape
    if aug.pad > 0:
        p = aug.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (2, b), generator=gen, device=gen.device).to(x.device)
        # All crop windows as a view [B, C, 2p+1, 2p+1, H, W], then one gather per image:
        # ~3x faster than indexing rows and columns separately (72k vs 23k img/s, one CPU thread).
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)
        x = windows[torch.arange(b, device=x.device), :, off[0], off[1]]
    if aug.flip:
        flip = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x


DATASETS: Registry[type["Dataset"]] = Registry("dataset", entry_point_group="bdbench.datasets")
_LOADED: dict[tuple, "Loaded"] = {}  # Dataset.load's per-process memo


@dataclass(frozen=True)
class Loaded:
    """A loaded dataset: the two sets and where they came from (``Dataset.provenance``)."""

    train: ImageSet
    test: ImageSet
    provenance: dict


@dataclass(frozen=True)
class Dataset(Config):
    """A dataset: class-level facts plus a ``load`` that returns (train, test) ImageSets."""

    num_classes: ClassVar[int]
    channels: ClassVar[int]
    size: ClassVar[int]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    augmentation: ClassVar[Augmentation]
    description: ClassVar[str]
    paper: ClassVar[str] = ""

    train_subset: int = param(0, low=0, doc="use a seeded random subset of this many training images (0: all)")
    train_images: ClassVar[int | None] = None  # the training split's size, where it is fixed (the official release's)

    def train_count(self, data_dir: str | None = None) -> int | None:
        """The number of training images, without loading anything: exact once loaded in this process (a
        folder's, whose statistics the model needs at planning), else the release's size; None if unknown."""
        loaded = _LOADED.get((self, str(resolve_data_dir(data_dir)), str(cache_dir())))
        n = len(loaded.train) if loaded is not None else self.train_images
        if loaded is None and n is not None and self.train_subset:
            n = min(n, self.train_subset)
        return n

    def load(self, data_dir: str | None = None) -> tuple[ImageSet, ImageSet]:
        """(train, test), loaded once per process for each config and data folder.

        The sets are shared between callers; nothing may write into them (attacks clone first).
        """
        loaded = self._loaded(data_dir)
        return loaded.train, loaded.test

    def provenance(self, data_dir: str | None = None) -> dict:
        """Where the loaded images come from: ``source`` ("built-in", or the data folder with the count,
        bytes and a fingerprint of the files decoded) and ``digest``, a sha256 of the decoded images and
        labels (before ``train_subset``), which keys the models trained on them."""
        return self._loaded(data_dir).provenance

    def _loaded(self, data_dir: str | None) -> Loaded:
        root = resolve_data_dir(data_dir)
        key = (self, str(root), str(cache_dir()))
        if key not in _LOADED:
            (train, test), prov = self._load(root)
            if self.train_subset and self.train_subset < len(train):
                gen = torch.Generator().manual_seed(1234)
                train = train.subset(torch.randperm(len(train), generator=gen)[: self.train_subset].sort().values)
            _LOADED[key] = Loaded(train, test, prov)
        return _LOADED[key]

    def _load(self, root: Path) -> tuple[tuple[ImageSet, ImageSet], dict]:
        """((train, test), provenance): built-in sets return ``built_in(...)``, real ones ``_cached(...)``."""
        raise NotImplementedError


# ---------------------------------------------------------------- folders and caching


def cache_dir() -> Path:
    """``BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/bdbench``, else ``~/.cache/bdbench``."""
    env = os.environ.get("BENCH_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bdbench"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``--data-dir``, else ``BENCH_DATA_DIR``, else ``cache_dir()/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("BENCH_DATA_DIR")
    return Path(env).expanduser() if env else cache_dir() / "data"


def digest(train: ImageSet, test: ImageSet) -> str:
    """sha256 of the decoded images and labels, both splits (a 160 MB GTSRB in ~0.3 s)."""
    h = hashlib.sha256()
    for t in (train.x, train.y, test.x, test.y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def built_in(train: ImageSet, test: ImageSet) -> tuple[tuple[ImageSet, ImageSet], dict]:
    """A generated dataset's sets and provenance: no files, only the digest of what was generated."""
    return (train, test), {"source": "built-in", "digest": digest(train, test)}


def source_files(root: Path, paths: list[Path]) -> dict:
    """What a real dataset is decoded from: the resolved folder, and for every file under ``paths``
    its path relative to ``root``, size and modification time, as a count, a byte total and a
    fingerprint (sha256 of the sorted list). A changed, added or removed file changes it; a walk of
    GTSRB's 51,883 files takes under a second."""
    entries = []
    for p in paths:
        if p.is_file():
            st = p.stat()
            entries.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
            continue
        for folder, _, names in os.walk(p):
            for n in names:
                st = os.stat(os.path.join(folder, n))
                entries.append((os.path.relpath(os.path.join(folder, n), root), st.st_size, st.st_mtime_ns))
    entries.sort()
    fp = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"path": str(root.resolve()), "files": len(entries), "bytes": sum(e[1] for e in entries), "fingerprint": fp}


def _cached(name: str, version: int, source: dict, decode,
            facts: Callable[[ImageSet, ImageSet], dict] | None = None) -> tuple[tuple[ImageSet, ImageSet], dict]:
    """The decoded sets of ``name`` from ``source`` (``source_files``), decoded once and then read from
    ``cache_dir()/datasets``: the cache file is keyed by the name, the decoder's ``version`` and the
    source (folder and fingerprint), so another copy of the data, or a changed file, is decoded anew
    instead of silently reusing the first. An unreadable cache file is decoded anew too. ``facts``,
    if given, adds what it computes from the decoded sets to the provenance (stored with them)."""
    key = content_hash({"name": name, "version": version, "path": source["path"], "fingerprint": source["fingerprint"]})
    path = cache_dir() / "datasets" / f"{name}-{key}.safetensors"
    if path.exists():
        try:
            t, meta = load_tensors_and_metadata(path)
            return (ImageSet(t["train_x"], t["train_y"]), ImageSet(t["test_x"], t["test_y"])), json.loads(meta["provenance"])
        except Exception:  # a torn or foreign file (never unpickled: safetensors only): decode again
            pass
    train, test = decode()
    prov = {"source": source, "digest": digest(train, test), **(facts(train, test) if facts else {})}
    save_tensors(path, {"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y},
                 metadata={"provenance": json.dumps(prov)})
    return (train, test), prov


def _missing(name: str, root: Path, expect: str) -> BenchError:
    return BenchError(
        f"{name} not found under {root} (expected {expect}) and it could not be downloaded; "
        f"pass --data-dir or set BENCH_DATA_DIR to a folder that holds it, or try --preset demo (built-in data)"
    )


def _to_uint8_chw(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr, copy=True))
    return (t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)).contiguous()


# ---------------------------------------------------------------- the datasets


@DATASETS.register("synthetic")
@dataclass(frozen=True)
class Synthetic(Dataset):
    """Ten procedurally drawn shape classes, 32x32 RGB, built in memory from a seed.

    Classes: 0 disk, 1 square, 2 triangle, 3 ring, 4 plus, 5 diamond, 6 X, 7 horizontal
    stripes, 8 vertical stripes, 9 diagonal stripes. Each image draws its shape at a
    random position and size (stripes: random frequency and phase) with a random
    foreground colour on a contrasting random background, plus Gaussian pixel noise.
    """

    num_classes: ClassVar[int] = 10
    channels: ClassVar[int] = 3
    size: ClassVar[int] = 32
    mean: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)
    std: ClassVar[tuple[float, ...]] = (0.29, 0.29, 0.29)
    # Shapes are already drawn at random positions, so small shifts suffice; with pad 4 a corner
    # trigger is shifted or cropped away so often that BadNets needed ~20 epochs to implant
    # (ASR 2% after 5 epochs, 100% after 20; 94% after 8 epochs with pad 2; smallcnn w16, 3-5k images).
    augmentation: ClassVar[Augmentation] = Augmentation(pad=2, flip=True)
    description: ClassVar[str] = "built-in, offline: 10 procedurally drawn shape classes, 32x32 RGB"

    n_train: int = param(5000, low=10, doc="training images")

    def train_count(self, data_dir: str | None = None) -> int | None:
        return min(self.n_train, self.train_subset) if self.train_subset else self.n_train
    n_test: int = param(1000, low=10, doc="test images")
    seed: int = param(0, doc="generator seed (the data, not the run)")
    noise: float = param(0.06, low=0.0, high=1.0, doc="std of the Gaussian pixel noise")

    def _load(self, root: Path) -> tuple[tuple[ImageSet, ImageSet], dict]:
        gen = torch.Generator().manual_seed(self.seed)
        return built_in(self.draw(self.n_train, gen), self.draw(self.n_test, gen))

    def draw(self, n: int, gen: torch.Generator) -> ImageSet:
        s = self.size
        y = torch.arange(n) % self.num_classes
        y = y[torch.randperm(n, generator=gen)]
        u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
        cy, cx = 8 + 16 * u(n, 1, 1), 8 + 16 * u(n, 1, 1)
        r = 5 + 4 * u(n, 1, 1)
        grid = torch.arange(s, dtype=torch.float32)
        dy, dx = grid[None, :, None] - cy, grid[None, None, :] - cx
        ady, adx = dy.abs(), dx.abs()
        freq, phase = 0.5 + 0.7 * u(n, 1, 1), 6.3 * u(n, 1, 1)
        yy, xx = grid[None, :, None].expand(n, s, s), grid[None, None, :].expand(n, s, s)
        masks = torch.stack([
            dx**2 + dy**2 < r**2,                                        # 0 disk
            torch.maximum(adx, ady) < 0.8 * r,                           # 1 square
            (ady < 0.8 * r) & (adx < (dy + 0.8 * r) / 1.6),              # 2 triangle
            ((dx**2 + dy**2) < r**2) & ((dx**2 + dy**2) > (0.55 * r) ** 2),  # 3 ring
            ((adx < r / 3) & (ady < r)) | ((ady < r / 3) & (adx < r)),   # 4 plus
            adx + ady < r,                                               # 5 diamond
            ((adx - ady).abs() < r / 3.5) & (torch.maximum(adx, ady) < r),  # 6 X
            torch.sin(yy * freq + phase) > 0,                            # 7 horizontal stripes
            torch.sin(xx * freq + phase) > 0,                            # 8 vertical stripes
            torch.sin((xx + yy) * freq * 0.7 + phase) > 0,               # 9 diagonal stripes
        ], 1)
        mask = masks[torch.arange(n), y].float()[:, None]  # [n, 1, s, s]
        bg = u(n, 3, 1, 1)
        fg = (bg + 0.35 + 0.3 * u(n, 3, 1, 1)) % 1.0
        img = bg * (1 - mask) + fg * mask + self.noise * torch.randn(n, 3, s, s, generator=gen)
        return ImageSet((img.clamp(0, 1) * 255).round().to(torch.uint8), y.long())


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes call it (``encode(text, "latin1")``), and nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}: only latin1 byte strings")
    return text.encode("latin1")


class ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, bytes, numbers, lists and dicts and nothing else.

    A CIFAR batch file is a Python pickle (a dict of a uint8 array, a list of labels, byte
    strings), and a pickle may name any importable callable to run while it loads. Here the only
    names resolved are numpy's array reconstructor, ``numpy.ndarray`` and ``numpy.dtype`` (under
    the module names numpy 1 and 2 write) and, for byte strings pickled by Python 3 at protocol 2,
    ``_codecs.encode`` restricted to latin-1; any other name is refused before anything runs
    (the "Restricting Globals" recipe of Python's ``pickle`` documentation).
    """

    ALLOWED = {
        ("_codecs", "encode"): _latin1,
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays are allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: only numpy arrays are allowed")


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 ``[N, 3, 32, 32]``, labels int64) of one CIFAR-10/100 batch file, read with
    ``ArraysOnly``; a file that asks for anything else fails on one line and nothing of it runs."""
    try:
        with open(path, "rb") as f:
            batch = ArraysOnly(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[label_key]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{b'data'!r} is not a uint8 array of N x 3072")
        y = torch.tensor([int(v) for v in labels], dtype=torch.long)
        if len(y) != len(data):
            raise ValueError(f"{len(data)} images but {len(y)} labels")
    except Exception as exc:
        raise BenchError(f"{path} is not a CIFAR batch this loader reads ({type(exc).__name__}: {exc}); "
                         "expected the official python-version batches") from None
    return torch.from_numpy(data.copy()).view(-1, 3, 32, 32), y


@dataclass(frozen=True)
class _CIFAR(Dataset):
    """CIFAR-10 and CIFAR-100 from the official python-version batches (torchvision's folder layout
    and md5 list), unpickled by ``ArraysOnly`` only: torchvision's own loader unpickles without limits."""

    channels: ClassVar[int] = 3
    size: ClassVar[int] = 32
    augmentation: ClassVar[Augmentation] = Augmentation(pad=4, flip=True)
    paper: ClassVar[str] = "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009"
    label_key: ClassVar[bytes]

    @classmethod
    def _torchvision(cls):
        from torchvision import datasets

        return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[cls.name]

    def _load(self, root: Path) -> tuple[tuple[ImageSet, ImageSet], dict]:
        from torchvision.datasets.utils import check_integrity, download_and_extract_archive

        tv = self._torchvision()
        folder = root / tv.base_folder
        if not folder.is_dir():
            try:  # where a network exists; the archive's md5 is checked by torchvision
                download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
            except Exception:
                raise _missing(self.name.upper().replace("CIFAR", "CIFAR-"), root, f"{tv.base_folder}/") from None
        files = [(folder / name, md5) for name, md5 in [*tv.train_list, *tv.test_list]]

        def decode() -> tuple[ImageSet, ImageSet]:
            parts = []
            for path, md5 in files:
                if not check_integrity(str(path), md5):
                    raise BenchError(f"{path} is missing or is not the official file (md5 differs from {md5}); "
                                     f"replace {folder} with the official {tv.filename}")
                parts.append(read_cifar_batch(path, self.label_key))
            n_train = len(tv.train_list)
            train, test = parts[:n_train], parts[n_train:]
            return (ImageSet(torch.cat([p[0] for p in train]), torch.cat([p[1] for p in train])),
                    ImageSet(torch.cat([p[0] for p in test]), torch.cat([p[1] for p in test])))

        return _cached(self.name, 2, source_files(root, [f for f, _ in files]), decode)


@DATASETS.register("cifar10")
@dataclass(frozen=True)
class CIFAR10(_CIFAR):
    num_classes: ClassVar[int] = 10
    train_images: ClassVar[int | None] = 50000
    mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)
    description: ClassVar[str] = "CIFAR-10, 50k/10k 32x32 RGB, 10 classes (cifar-10-batches-py, md5-checked)"
    label_key: ClassVar[bytes] = b"labels"


@DATASETS.register("cifar100")
@dataclass(frozen=True)
class CIFAR100(_CIFAR):
    num_classes: ClassVar[int] = 100
    train_images: ClassVar[int | None] = 50000
    # Per-channel mean and std of the 50,000 training images (the figures quoted with CIFAR-100 training
    # code, e.g. weiaicunzai/pytorch-cifar100's conf/global_settings.py).
    mean: ClassVar[tuple[float, ...]] = (0.5071, 0.4865, 0.4409)
    std: ClassVar[tuple[float, ...]] = (0.2673, 0.2564, 0.2762)
    description: ClassVar[str] = "CIFAR-100, 50k/10k 32x32 RGB, 100 fine classes (cifar-100-python, md5-checked)"
    label_key: ClassVar[bytes] = b"fine_labels"


@DATASETS.register("gtsrb")
@dataclass(frozen=True)
class GTSRB(Dataset):
    num_classes: ClassVar[int] = 43
    train_images: ClassVar[int | None] = 39209
    channels: ClassVar[int] = 3
    size: ClassVar[int] = 32
    mean: ClassVar[tuple[float, ...]] = (0.3403, 0.3121, 0.3214)
    std: ClassVar[tuple[float, ...]] = (0.2724, 0.2608, 0.2669)
    # Traffic signs are not mirror-symmetric (left/right turn signs are distinct classes): no flip.
    augmentation: ClassVar[Augmentation] = Augmentation(pad=4, flip=False)
    description: ClassVar[str] = "GTSRB traffic signs resized to 32x32, 39,209/12,630 images, 43 classes"
    paper: ClassVar[str] = "Stallkamp et al., The German Traffic Sign Recognition Benchmark, IJCNN 2011"

    def _load(self, root: Path) -> tuple[tuple[ImageSet, ImageSet], dict]:
        def split(name: str, download: bool = False):
            from torchvision.datasets import GTSRB as TV  # here: importing torchvision takes seconds

            try:
                return TV(str(root), split=name, download=download)
            except Exception:
                raise _missing("GTSRB", root, "gtsrb/GTSRB/Training and gtsrb/GTSRB/Final_Test") from None

        if not (root / "gtsrb").exists():  # downloaded into our own data folder where a network exists
            for name in ("train", "test"):
                split(name, download=True)

        def decode() -> tuple[ImageSet, ImageSet]:
            from PIL import Image

            out = []
            for name in ("train", "test"):
                samples = split(name)._samples
                imgs = [np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR)) for p, _ in samples]
                labels = torch.tensor([t for _, t in samples], dtype=torch.long)
                out.append(ImageSet(_to_uint8_chw(np.stack(imgs)), labels))
            return out[0], out[1]

        return _cached("gtsrb32", 1, source_files(root, [root / "gtsrb"]), decode)


@DATASETS.register("mnist")
@dataclass(frozen=True)
class MNIST(Dataset):
    num_classes: ClassVar[int] = 10
    train_images: ClassVar[int | None] = 60000
    channels: ClassVar[int] = 1
    size: ClassVar[int] = 28
    mean: ClassVar[tuple[float, ...]] = (0.1307,)
    std: ClassVar[tuple[float, ...]] = (0.3081,)
    # Digits are not mirror-symmetric either; small shifts only (pad 2).
    augmentation: ClassVar[Augmentation] = Augmentation(pad=2, flip=False)
    description: ClassVar[str] = "MNIST digits, 60k/10k 28x28 grayscale, 10 classes"
    paper: ClassVar[str] = "LeCun et al., Gradient-Based Learning Applied to Document Recognition, 1998"

    def _load(self, root: Path) -> tuple[tuple[ImageSet, ImageSet], dict]:
        raw = root / "MNIST" / "raw"
        names = [f"{p}-{kind}" for p in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        if not all((raw / n).exists() or (raw / f"{n}.gz").exists() for n in names):
            try:  # downloads into our own data folder, never into a read-only one
                from torchvision.datasets import MNIST as TV

                TV(str(root), download=True)
            except Exception:
                raise _missing("MNIST", root, "MNIST/raw/*-ubyte.gz") from None

        def decode() -> tuple[ImageSet, ImageSet]:
            return tuple(  # type: ignore[return-value]
                ImageSet(_to_uint8_chw(_idx(raw, f"{p}-images-idx3-ubyte")), torch.from_numpy(_idx(raw, f"{p}-labels-idx1-ubyte").astype(np.int64)))
                for p in ("train", "t10k")
            )

        read = [raw / n if (raw / n).exists() else raw / f"{n}.gz" for n in names]  # the files _idx reads
        return _cached("mnist", 1, source_files(root, read), decode)


def _idx(raw: Path, name: str) -> np.ndarray:
    """Read an IDX file (gzipped or not) without writing anything next to it."""
    path = raw / name
    data = path.read_bytes() if path.exists() else gzip.decompress((raw / f"{name}.gz").read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


# ---------------------------------------------------------------- your own images: folder:PATH

# The file names torchvision's ImageFolder takes for images (torchvision/datasets/folder.py, IMG_EXTENSIONS),
# compared in lower case as it does; other files (a README, .DS_Store) are skipped.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_folder(root: Path, label: str) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """(class names, ``{"train": [(file, label), ...], "test": [...]}``) of an image folder laid out as
    ``root/train/<class>/...`` and ``root/test/<class>/...``, or a one-line ``BenchError`` naming ``label``.

    As torchvision's ``ImageFolder``: the classes are the sorted names of the class folders, label i is the
    i-th; images are found recursively under each class folder, in sorted order. Unlike it, folders whose
    name starts with a dot (``.ipynb_checkpoints``) are not classes. Reads names only, no image.
    """
    expect = f"expected {root}/train/<class>/*.png (or .jpg, .jpeg, .ppm, .bmp, ...) and {root}/test/<class>/..."
    if not root.exists():
        raise BenchError(f"{label}: {root} does not exist; {expect}")
    if not root.is_dir():
        raise BenchError(f"{label}: {root} is not a folder; {expect}")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise BenchError(f"{label}: {root} has no {' or '.join(f'{s}/' for s in missing)} folder; {expect}")
    per_split: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test"):
        found: dict[str, list[Path]] = {}
        for entry in sorted(os.scandir(root / split), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                found[entry.name] = sorted(
                    Path(folder) / n for folder, _, names in os.walk(entry.path, followlinks=True)
                    for n in names if n.lower().endswith(IMG_EXTENSIONS))
        per_split[split] = found
    train, test = per_split["train"], per_split["test"]
    if not any(files for found in per_split.values() for files in found.values()):
        raise BenchError(f"{label}: no images at all under {root}/train or {root}/test "
                         f"(looked for {', '.join(IMG_EXTENSIONS)} in class folders); {expect}")
    if set(train) != set(test):
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise BenchError(f"{label}: train and test have different classes: only in train: {', '.join(only_train) or '-'}; "
                         f"only in test: {', '.join(only_test) or '-'}; give both the same class folders")
    empty = [f"{split}/{c}" for split, found in per_split.items() for c, files in found.items() if not files]
    if empty:
        raise BenchError(f"{label}: class folder(s) without images under {root}: {', '.join(empty)} "
                         f"(images: {', '.join(IMG_EXTENSIONS)}); add images or remove the folder from both splits")
    classes = sorted(train)
    if len(classes) < 2:
        raise BenchError(f"{label}: {root}/train has {len(classes)} class ({', '.join(classes)}); a classifier needs at least 2")
    return classes, {split: [(f, i) for i, c in enumerate(classes) for f in found[c]] for split, found in per_split.items()}


def channel_stats(x: torch.Tensor) -> dict:
    """Per-channel ``mean`` and ``std`` (of all pixels, scaled to [0, 1]; rounded to 4 places) of uint8 images
    ``[N, C, H, W]``, summed in chunks so no float copy of the whole set is made. A channel with no variation
    gets std 1 (normalising by 0 would divide by zero)."""
    c = x.shape[1]
    s1, s2 = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for chunk in x.split(1024):
        f = chunk.to(torch.float64) / 255
        s1 += f.sum((0, 2, 3))
        s2 += (f * f).sum((0, 2, 3))
    n = max(1, x.numel() // c)
    mean = s1 / n
    std = (s2 / n - mean**2).clamp_min(0).sqrt()
    std = torch.where(std < 1 / 255, torch.ones_like(std), std)
    return {"mean": [round(float(v), 4) for v in mean], "std": [round(float(v), 4) for v in std]}


@dataclass(frozen=True)
class ImageFolder(Dataset):
    """Your own images, ``--dataset folder:PATH``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``.

    ``DATASETS.get("folder:PATH")`` reads the folder names (``scan_folder``: a missing folder, a missing
    split, no images, classes that differ between the splits or an empty class fail there, on one line) and
    makes a subclass holding the class names (``classes``) and their count. The images are decoded on the
    first load, with PIL: each opened and converted (``mode``: RGB, or L for grayscale; PIL's ``convert``
    from whatever mode the file has, alpha dropped), a file PIL cannot read fails naming it, then resized to
    ``size`` x ``size`` (stretched, not cropped, as GTSRB's images are) with PIL's bilinear filter, which
    has been antialiased (a convolution over every source pixel) when downscaling since Pillow 2.7.0
    (its release notes, "Bicubic and bilinear downscaling"). The decoded uint8 sets are cached
    (``_cached``) under the resolved folder, the size, the mode and the fingerprint of the files, so
    another folder, another size or a changed file decodes anew.

    Choices: images are RGB unless ``mode=L`` is set (explicit rather than guessed from the files, so the
    model's input channels are known before any image is read). ``mean``/``std`` are the per-channel
    statistics of the decoded training split (``channel_stats``, all of it, before ``train_subset``),
    computed once with the decode and kept in the provenance, as the constants of CIFAR and GTSRB are
    computed from their training sets; a fixed 0.5 would leave an unusual set badly scaled. Augmentation
    is GTSRB's: a random crop with zero padding (``size // 8`` pixels, 4 at 32) and no flip, since a
    flip can turn one class into another (signs, digits, text); ``flip=true`` adds it for sets, like
    photographs of objects, whose classes are mirror-symmetric. The provenance (a record's ``data``)
    carries ``classes``, ``mean`` and ``std`` beside the source and digest. The folder is named in the
    dataset's name, so ``--data-dir`` does not apply to it.
    """

    paper: ClassVar[str] = ""
    classes: ClassVar[tuple[str, ...]] = ()
    root: ClassVar[Path]

    size: int = param(32, low=8, high=1024, doc="images are resized to size x size (PIL, bilinear, antialiased)")
    mode: Literal["RGB", "L"] = param("RGB", doc="RGB (3 channels) or L (grayscale, 1 channel), by PIL's convert")
    flip: bool = param(False, doc="random horizontal flips in training (only where a mirrored image keeps its class)")

    @property
    def channels(self) -> int:  # type: ignore[override]
        return 1 if self.mode == "L" else 3

    @property
    def augmentation(self) -> Augmentation:  # type: ignore[override]
        return Augmentation(pad=max(1, self.size // 8), flip=self.flip)

    @property
    def mean(self) -> tuple[float, ...]:  # type: ignore[override]
        return tuple(self._loaded(None).provenance["mean"])

    @property
    def std(self) -> tuple[float, ...]:  # type: ignore[override]
        return tuple(self._loaded(None).provenance["std"])

    def __reduce__(self):  # a worker process rebuilds the class from its name (the class is made at run time)
        return (_folder_dataset, (type(self).name, self.to_dict()))

    def _loaded(self, data_dir: str | None) -> Loaded:
        return super()._loaded(None)  # the folder is in the name; --data-dir does not move it

    def train_count(self, data_dir: str | None = None) -> int | None:
        return len(self._loaded(None).train)  # decoded at planning anyway: the model's statistics need it

    def _load(self, root: Path) -> tuple[tuple[ImageSet, ImageSet], dict]:
        folder = type(self).root
        classes, files = scan_folder(folder, self.name)
        if tuple(classes) != self.classes:
            raise BenchError(f"{self.name}: the class folders changed while this process ran (now {', '.join(classes)}); run again")
        s = self.size

        def decode() -> tuple[ImageSet, ImageSet]:
            train, test = (decode_images(files[split], s, self.mode, self.name) for split in ("train", "test"))
            return train, test

        return _cached(f"folder-{self.mode}{s}", 1, source_files(folder, [folder / "train", folder / "test"]), decode,
                       facts=lambda train, test: {"classes": list(classes), **channel_stats(train.x)})


def decode_images(pairs: list[tuple[Path, int]], size: int, mode: str, label: str) -> ImageSet:
    """``(file, label)`` pairs decoded with PIL: converted to ``mode`` (RGB or L), resized to ``size`` x ``size``
    (bilinear, antialiased when shrinking), as a uint8 ``ImageSet``; a file PIL cannot read fails on one line."""
    from PIL import Image

    c = 1 if mode == "L" else 3
    arr = np.empty((len(pairs), size, size, c), dtype=np.uint8)
    for i, (path, _) in enumerate(pairs):
        try:
            with Image.open(path) as im:
                small = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            arr[i] = np.asarray(small).reshape(size, size, c)
        except Exception as exc:
            why = " ".join(str(exc).split())
            raise BenchError(f"{label}: cannot read image {path} ({type(exc).__name__}: {why}); replace or remove the file") from None
    labels = torch.tensor([lab for _, lab in pairs], dtype=torch.long)
    return ImageSet(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), labels)


@dataclass(frozen=True)
class CleanFolder:
    """``--clean-data FOLDER``: the defender's own clean images, ``FOLDER/<class>/*``, instead of a draw from the
    dataset's training split. A class folder is named by the dataset's class name (a ``folder:`` dataset) or by
    its index (``0`` .. ``K-1``); images are decoded as the dataset's (its size and channels). Keyed by a
    fingerprint of the files, so a changed folder recomputes the cells that used it."""

    path: str
    fingerprint: str
    files: int

    @classmethod
    def open(cls, path: str) -> "CleanFolder":
        root = Path(path).expanduser()
        if not root.is_dir():
            raise BenchError(f"--clean-data {path} is not a folder; expected {path}/<class>/*.png (class name or index)")
        src = source_files(root, [root])
        if not src["files"]:
            raise BenchError(f"--clean-data {path} holds no file; expected {path}/<class>/*.png (class name or index)")
        return cls(str(root.resolve()), src["fingerprint"], src["files"])

    @property
    def facts(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint}

    def load(self, ds: "Dataset") -> ImageSet:
        root = Path(self.path)
        names = list(getattr(ds, "classes", ()) or ())
        pairs = []
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if entry.name in names:
                label = names.index(entry.name)
            elif entry.name.isdigit() and int(entry.name) < ds.num_classes:
                label = int(entry.name)
            else:
                allowed = f"a class name ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) or " if names else ""
                raise BenchError(f"--clean-data {self.path}: class folder {entry.name!r} is not a class of {ds.name}; "
                                 f"allowed: {allowed}an index 0..{ds.num_classes - 1}")
            pairs += [(Path(folder) / n, label) for folder, _, files in os.walk(entry.path)
                      for n in sorted(files) if n.lower().endswith(IMG_EXTENSIONS)]
        if not pairs:
            raise BenchError(f"--clean-data {self.path}: no images in class folders (looked for {', '.join(IMG_EXTENSIONS)})")
        return decode_images(pairs, ds.size, "L" if ds.channels == 1 else "RGB", f"--clean-data {self.path}")


def _folder_dataset(name: str, fields: dict) -> ImageFolder:
    """A folder dataset rebuilt from its name and fields (``ImageFolder.__reduce__``)."""
    return DATASETS.get(name)(**fields)


def _folder_family(path: str) -> type[ImageFolder]:
    """``folder:PATH``: an ``ImageFolder`` subclass for the folder ``PATH`` (``~`` expanded, resolved)."""
    root = Path(path).expanduser().resolve()
    classes, files = scan_folder(root, f"folder:{path}")
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return type("ImageFolder_" + "".join(ch if ch.isalnum() else "_" for ch in root.name), (ImageFolder,), {
        "__module__": __name__,
        "root": root,
        "classes": tuple(classes),
        "num_classes": len(classes),
        "description": f"your images from {root}: {len(classes)} classes ({shown}), "
                       f"{len(files['train'])}/{len(files['test'])} train/test images",
    })


_folder_family.base = ImageFolder  # type: ignore[attr-defined]  (bench list datasets --fields shows its fields)
DATASETS.register_family(
    "folder", _folder_family,
    "PATH (your images: PATH/train/<class>/*.png|jpg|jpeg|ppm|bmp and PATH/test/<class>/..., "
    "resized to folder.size, 32 unless --set folder.size=N)")


# ---------------------------------------------------------------- the clean defense subset


def defense_subset(train: ImageSet, size: float, seed: int, exclude: torch.Tensor | None = None) -> ImageSet:
    """A seeded random clean subset of ``train``: a fraction if ``size < 1``, else a count.

    ``exclude`` are indices (e.g. the poisoned ones) that may not be drawn: the defense
    data is clean. ``train`` must be the clean training set.
    """
    n = len(train)
    count = int(round(size * n)) if size < 1 else int(size)
    allowed = torch.ones(n, dtype=torch.bool)
    if exclude is not None and len(exclude):
        allowed[exclude] = False
    pool = allowed.nonzero().flatten()
    if not 0 < count <= len(pool):
        raise BenchError(f"defense data size {size} gives {count} images; allowed: 1..{len(pool)} clean training images")
    gen = torch.Generator().manual_seed(seed)
    return train.subset(pool[torch.randperm(len(pool), generator=gen)[:count]])
