"""Datasets as in-memory uint8 tensors, batched augmentation, and the clean defense subset.

Every dataset loads to two ``ImageSet``s (train, test): ``x`` uint8 ``[N, C, H, W]``
and ``y`` int64 ``[N]``. Real sets are decoded once through torchvision and cached as
safetensors under ``cache_dir()/datasets``, so a second load is a file read. The
dataset class declares its augmentation (random crop with zero padding, horizontal
flip or not), which ``augment`` applies to whole batches on the device.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bench.config import Config, param
from bench.registry import BenchError, Registry


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


def augment(x: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    """Augment a uint8 batch ``[B, C, H, W]`` on its own device; ``gen`` is a CPU generator."""
    b, c, h, w = x.shape
    if aug.pad > 0:
        p = aug.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (2, b), generator=gen).to(x.device)
        # All crop windows as a view [B, C, 2p+1, 2p+1, H, W], then one gather per image:
        # ~3x faster than indexing rows and columns separately (72k vs 23k img/s, one CPU thread).
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)
        x = windows[torch.arange(b, device=x.device), :, off[0], off[1]]
    if aug.flip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x


DATASETS: Registry[type["Dataset"]] = Registry("dataset")
_LOADED: dict[tuple, tuple["ImageSet", "ImageSet"]] = {}  # Dataset.load's per-process memo


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

    def load(self, data_dir: str | None = None) -> tuple[ImageSet, ImageSet]:
        """(train, test), loaded once per process for each config and data folder.

        The sets are shared between callers; nothing may write into them (attacks clone first).
        """
        root = resolve_data_dir(data_dir)
        key = (self, str(root), str(cache_dir()))
        if key not in _LOADED:
            _LOADED[key] = self._load_subset(root)
        return _LOADED[key]

    def _load_subset(self, root: Path) -> tuple[ImageSet, ImageSet]:
        train, test = self._load(root)
        if self.train_subset and self.train_subset < len(train):
            gen = torch.Generator().manual_seed(1234)
            train = train.subset(torch.randperm(len(train), generator=gen)[: self.train_subset].sort().values)
        return train, test

    def _load(self, root: Path) -> tuple[ImageSet, ImageSet]:
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


def _cached(key: str, decode) -> tuple[ImageSet, ImageSet]:
    from bench.store import load_tensors, save_tensors

    path = cache_dir() / "datasets" / f"{key}.safetensors"
    if path.exists():
        t = load_tensors(path)
        return ImageSet(t["train_x"], t["train_y"]), ImageSet(t["test_x"], t["test_y"])
    train, test = decode()
    save_tensors(path, {"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y})
    return train, test


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
    n_test: int = param(1000, low=10, doc="test images")
    seed: int = param(0, doc="generator seed (the data, not the run)")
    noise: float = param(0.06, low=0.0, high=1.0, doc="std of the Gaussian pixel noise")

    def _load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        gen = torch.Generator().manual_seed(self.seed)
        return self.draw(self.n_train, gen), self.draw(self.n_test, gen)

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


@DATASETS.register("cifar10")
@dataclass(frozen=True)
class CIFAR10(Dataset):
    num_classes: ClassVar[int] = 10
    channels: ClassVar[int] = 3
    size: ClassVar[int] = 32
    mean: ClassVar[tuple[float, ...]] = (0.4914, 0.4822, 0.4465)
    std: ClassVar[tuple[float, ...]] = (0.2470, 0.2435, 0.2616)
    augmentation: ClassVar[Augmentation] = Augmentation(pad=4, flip=True)
    description: ClassVar[str] = "CIFAR-10, 50k/10k 32x32 RGB, 10 classes (torchvision cifar-10-batches-py)"
    paper: ClassVar[str] = "Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009"

    def _load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        def decode() -> tuple[ImageSet, ImageSet]:
            from torchvision.datasets import CIFAR10 as TV

            out = []
            for train in (True, False):
                try:  # torchvision verifies each batch file's md5 before reading it
                    ds = TV(str(root), train=train, download=True)
                except Exception:
                    raise _missing("CIFAR-10", root, "cifar-10-batches-py/") from None
                out.append(ImageSet(_to_uint8_chw(ds.data), torch.tensor(ds.targets, dtype=torch.long)))
            return out[0], out[1]

        return _cached("cifar10", decode)


@DATASETS.register("gtsrb")
@dataclass(frozen=True)
class GTSRB(Dataset):
    num_classes: ClassVar[int] = 43
    channels: ClassVar[int] = 3
    size: ClassVar[int] = 32
    mean: ClassVar[tuple[float, ...]] = (0.3403, 0.3121, 0.3214)
    std: ClassVar[tuple[float, ...]] = (0.2724, 0.2608, 0.2669)
    # Traffic signs are not mirror-symmetric (left/right turn signs are distinct classes): no flip.
    augmentation: ClassVar[Augmentation] = Augmentation(pad=4, flip=False)
    description: ClassVar[str] = "GTSRB traffic signs resized to 32x32, 39,209/12,630 images, 43 classes"
    paper: ClassVar[str] = "Stallkamp et al., The German Traffic Sign Recognition Benchmark, IJCNN 2011"

    def _load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        def decode() -> tuple[ImageSet, ImageSet]:
            from PIL import Image
            from torchvision.datasets import GTSRB as TV

            out = []
            for split in ("train", "test"):
                try:
                    ds = TV(str(root), split=split, download=not (root / "gtsrb").exists())
                except Exception:
                    raise _missing("GTSRB", root, "gtsrb/GTSRB/Training and gtsrb/GTSRB/Final_Test") from None
                imgs = [np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR)) for p, _ in ds._samples]
                labels = torch.tensor([t for _, t in ds._samples], dtype=torch.long)
                out.append(ImageSet(_to_uint8_chw(np.stack(imgs)), labels))
            return out[0], out[1]

        return _cached("gtsrb32", decode)


@DATASETS.register("mnist")
@dataclass(frozen=True)
class MNIST(Dataset):
    num_classes: ClassVar[int] = 10
    channels: ClassVar[int] = 1
    size: ClassVar[int] = 28
    mean: ClassVar[tuple[float, ...]] = (0.1307,)
    std: ClassVar[tuple[float, ...]] = (0.3081,)
    # Digits are not mirror-symmetric either; small shifts only (pad 2).
    augmentation: ClassVar[Augmentation] = Augmentation(pad=2, flip=False)
    description: ClassVar[str] = "MNIST digits, 60k/10k 28x28 grayscale, 10 classes"
    paper: ClassVar[str] = "LeCun et al., Gradient-Based Learning Applied to Document Recognition, 1998"

    def _load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        def decode() -> tuple[ImageSet, ImageSet]:
            raw = root / "MNIST" / "raw"
            if not (raw / "train-images-idx3-ubyte.gz").exists() and not (raw / "train-images-idx3-ubyte").exists():
                try:  # downloads into our own data folder, never into a read-only one
                    from torchvision.datasets import MNIST as TV

                    TV(str(root), download=True)
                except Exception:
                    raise _missing("MNIST", root, "MNIST/raw/*-ubyte.gz") from None
            return tuple(  # type: ignore[return-value]
                ImageSet(_to_uint8_chw(_idx(raw, f"{p}-images-idx3-ubyte")), torch.from_numpy(_idx(raw, f"{p}-labels-idx1-ubyte").astype(np.int64)))
                for p in ("train", "t10k")
            )

        return _cached("mnist", decode)


def _idx(raw: Path, name: str) -> np.ndarray:
    """Read an IDX file (gzipped or not) without writing anything next to it."""
    path = raw / name
    data = path.read_bytes() if path.exists() else gzip.decompress((raw / f"{name}.gz").read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


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
