"""The one training loop of bdbench, in the spirit of airbench.

Data stays on the device as uint8 tensors; each step draws a batch by index,
augments it as a whole batch, converts to float in [0, 1] in channels_last and runs
forward and backward under bf16 autocast where the device supports it. No DataLoader,
no per-sample Python.

On a GPU the per-step draws (shuffle, crop offsets, flips) come from a generator on the
GPU (``bench.data.step_generator``) and nothing in a step waits for the GPU, so the host
queues steps ahead; on the CPU the draws are those of every earlier version, so CPU
results stay reproducible. Timings read the clock after ``synchronize``.

``TrainExtension`` is the loop's one extension point. Everything that must change how a
model is trained, without a private copy of the loop, goes through it:

- ``plan(data, cfg, aug, steps_per_epoch)``: once before ``start``, with what the run will
  train on (its training set on the device, recipe, augmentation, steps per epoch): for an
  extension whose own modules need a pre-training phase or a schedule scaled to the run
  (IAD's mask-generator pre-training and generator learning-rate steps).
- ``start(model, device)``: once before the first step (attach hooks, build optimisers).
- ``batch(x, y, gen) -> (x, y)``: rewrite each augmented uint8 batch; may return float
  images in [0, 1] (a generator's output, with gradient). WaNet's and NC's on-the-fly
  poisoning and stamping live here.
- ``loss(model, x, y, out, loss) -> loss``: add terms to the batch's cross-entropy (NAD's
  attention distillation, FST's head penalty); ``x`` is the model's float input.
- ``after_step(model)``: after the optimiser step (FST's head rescaling; an extension's own
  optimiser for its own modules steps here).
- ``end(model)``: once after the last step (remove hooks).

Extensions compose: ``train(..., extensions=[a, b])`` calls them in order.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

import torch
from torch import nn

from bench.config import Config, param
from bench.data import Augmentation, ImageSet, augment, step_generator



class TrainExtension:
    """The extension point of :func:`train`; every method is optional (the defaults do nothing)."""

    def plan(self, data: ImageSet, cfg: "TrainConfig", aug: Augmentation, steps_per_epoch: int) -> None:
        """Called once before ``start``: the run's training set (on its device), recipe, augmentation, steps per epoch."""

    def start(self, model: nn.Module, device: torch.device) -> None:
        """Called once before the first step."""

    def batch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewrite an augmented uint8 batch; return uint8 images or float images in [0, 1]."""
        return x, y

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Return the batch's loss, given its cross-entropy ``loss`` (``x`` is the float model input)."""
        return loss

    def after_step(self, model: nn.Module) -> None:
        """Called after each optimiser step."""

    def end(self, model: nn.Module) -> None:
        """Called once after the last step, also when training fails."""


class BatchRewrite(TrainExtension):
    """An extension that only rewrites batches: ``fn(x_uint8, y, gen) -> (x, y)``."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]) -> None:
        self.fn = fn

    def batch(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(x, y, gen)


@dataclass(frozen=True)
class TrainConfig(Config):
    """Training recipe; ``--set train.field=value`` overrides a preset's values."""

    name = "train"

    epochs: int = param(4, low=1, doc="passes over the (poisoned) training set")
    batch_size: int = param(128, low=1, doc="images per step")
    lr: float = param(0.1, low=0.0, doc="peak SGD learning rate")
    momentum: float = param(0.9, low=0.0, high=1.0)
    nesterov: bool = True
    weight_decay: float = param(5e-4, low=0.0)
    schedule: Literal["onecycle", "cosine", "multistep", "constant"] = "onecycle"
    warmup: float = param(0.15, low=0.0, high=1.0, doc="onecycle: fraction of steps spent warming up")
    milestones: tuple[int, ...] = param((), doc="multistep: epochs at which lr is multiplied by gamma")
    gamma: float = param(0.1, low=0.0, high=1.0)
    label_smoothing: float = param(0.0, low=0.0, high=1.0)
    bf16: bool = param(True, doc="bf16 autocast where the device supports it natively")
    channels_last: bool = True


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast speeds this device up.

    On CPUs without native bf16 (AVX512-BF16 or AMX), oneDNN has no bf16 convolution
    and PyTorch falls back to a slow path: measured here on an AVX2 EPYC, a smallcnn
    step ran 10x slower under bf16 autocast than in fp32. So bf16 only where it is native.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast where the device supports it natively, else a no-op context."""
    if enabled and bf16_supported(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it measures the work.

    CUDA kernels run asynchronously: without this, ``time.perf_counter()`` after a loop measures
    how fast the host queued the kernels, not how fast the GPU ran them (PyTorch's "CUDA semantics"
    notes, "Asynchronous execution", https://pytorch.org/docs/stable/notes/cuda.html). A no-op on the CPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` in one copy: itself when it is there already (always so on the CPU); from the
    CPU to a GPU through pinned (page-locked) memory with ``non_blocking=True``, so the copy does not block
    the host (PyTorch's "CUDA semantics" notes, "Use pinned memory buffers")."""
    device = torch.device(device)
    if x.device == device or (device.type == x.device.type and device.index is None):
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def to_input(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float in [0, 1] (float input passes as it is), channels_last when asked."""
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def lr_lambda(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.schedule == "onecycle":  # linear warm-up, then linear decay to zero
            w = max(1, int(cfg.warmup * total_steps))
            return (step + 1) / w if step < w else max(0.0, (total_steps - step) / max(1, total_steps - w))
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * step / total_steps))
        if cfg.schedule == "multistep":
            epoch = step // steps_per_epoch
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return f


def train(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    aug: Augmentation,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    extensions: Sequence[TrainExtension] = (),
    params: Optional[Iterable[nn.Parameter]] = None,
    progress: bool = False,
    desc: str = "train",
    keep_ragged: bool = False,
) -> dict:
    """Train ``model`` in place on ``data``; return throughput and final-epoch loss/accuracy.

    Returned: ``seconds`` (wall time of the extensions' ``plan`` and the loop together), ``steps``,
    ``plan_seconds`` (the ``plan`` part), ``img_per_s`` (the loop's images per second),
    ``loss`` and ``train_acc`` (last epoch).

    ``extensions`` plug into the loop (see :class:`TrainExtension`); ``params`` are the
    parameters the SGD optimiser updates (default: all of the model's).

    An epoch is ``len(data) // batch_size`` full batches; ``keep_ragged`` adds the rest as a last,
    smaller batch, as a PyTorch ``DataLoader`` does by default (``drop_last=False``), which is what
    the official codes of the fine-tuning defenses use. A rest of one image is dropped even then:
    BatchNorm cannot train on a batch of one.
    """
    device = torch.device(device)
    # gen: the CPU stream the extensions draw from (and, on the CPU, everything else: the draws stay the
    # ones of every earlier version); dgen: the per-step draws (shuffle, crops, flips), on the device.
    gen = torch.Generator().manual_seed(seed)
    dgen = step_generator(gen, device, seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt).train()
    data = data.to(device)
    n = len(data)
    bs = min(cfg.batch_size, n)
    # Training a model drops the ragged last batch (tiny batches upset BatchNorm); a defense's
    # fine-tune keeps it (keep_ragged), as the DataLoaders of the official codes do.
    steps_per_epoch = n // bs + (1 if keep_ragged and n % bs > 1 else 0)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.SGD(list(model.parameters() if params is None else params), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total, steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    bar = _bar(total, desc, progress)
    synchronize(device)
    t_plan = time.perf_counter()
    for ext in extensions:
        ext.plan(data, cfg, aug, steps_per_epoch)
    synchronize(device)
    plan_seconds = time.perf_counter() - t_plan
    for ext in extensions:
        ext.start(model, device)
    try:
        stats = _loop(model, data, cfg, aug, gen, dgen, device, opt, sched, loss_fn, extensions, bar, steps_per_epoch, bs)
        # "seconds" is the whole cost of training this model, an extension's own pre-training (IAD's
        # mask generator) included; "img_per_s" stays the loop's own rate.
        stats["plan_seconds"] = plan_seconds
        stats["seconds"] += plan_seconds
        # CPU float reductions, and so the trained weights, depend on the thread count: record it.
        stats["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    finally:
        for ext in extensions:
            ext.end(model)
        if bar is not None:
            bar.close()
    model.eval()
    return stats


def _loop(model, data, cfg, aug, gen, dgen, device, opt, sched, loss_fn, extensions, bar, steps_per_epoch, bs) -> dict:
    n = len(data)
    loss_sum, correct, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    synchronize(device)
    t0, seen, steps = time.perf_counter(), 0, 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=dgen, device=dgen.device).to(device)
        loss_sum, correct, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]  # with keep_ragged the last slice is the shorter rest
            x, y = augment(data.x[idx], aug, dgen), data.y[idx]
            for ext in extensions:
                x, y = ext.batch(x, y, gen)
            x = to_input(x, cfg.channels_last)
            with autocast(device, cfg.bf16):
                out = model(x)
                loss = loss_fn(out.float(), y)
                for ext in extensions:
                    loss = ext.loss(model, x, y, out, loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for ext in extensions:
                ext.after_step(model)
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            count += len(y)
            seen += len(y)
            steps += 1
            if bar is not None:
                bar.update(1)
                if i % 10 == 0 or i == steps_per_epoch - 1:
                    rate = seen / (time.perf_counter() - t0)
                    bar.set_postfix(ep=epoch + 1, loss=f"{loss_sum.item() / count:.3f}", acc=f"{correct.item() / count:.3f}", img_s=f"{rate:.0f}")
    synchronize(device)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "steps": steps,
        "img_per_s": seen / max(seconds, 1e-9),
        "loss": loss_sum.item() / max(count, 1),
        "train_acc": correct.item() / max(count, 1),
    }


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # off when not a terminal


@torch.no_grad()
def _eval_logits(model: nn.Module, x: torch.Tensor, device: torch.device | str, batch_size: int,
                 bf16: bool) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice of ``x``, float logits) per batch of uint8 images ``x``, model in eval mode (its mode restored after)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    x = to_device(x, device)  # the whole uint8 set in one copy, not one copy per batch
    try:
        for i in range(0, len(x), batch_size):
            with autocast(device, bf16):
                z = model(to_input(x[i:i + batch_size]))
            yield slice(i, i + batch_size), z.float()
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: torch.Tensor, *, device: torch.device | str = "cpu", batch_size: int = 256,
            bf16: bool = True) -> torch.Tensor:
    """Predicted labels (CPU int64) of uint8 images ``x``, model in eval mode (one copy back, at the end)."""
    preds = [z.argmax(1) for _, z in _eval_logits(model, x, device, batch_size, bf16)]
    return torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)


def true_class_probability(model: nn.Module, data: ImageSet, *, device: torch.device | str = "cpu",
                           batch_size: int = 256, bf16: bool = True) -> float:
    """Mean softmax probability that ``model`` (eval mode) gives each image's own label: a "soft accuracy"."""
    if len(data) == 0:
        return float("nan")
    y = to_device(data.y, device)
    sums = [z.softmax(1).gather(1, y[part][:, None]).sum() for part, z in _eval_logits(model, data.x, device, batch_size, bf16)]
    return sum(float(s) for s in sums) / len(data)  # read once all batches ran; the same Python float sum as ever


def accuracy(model: nn.Module, data: ImageSet, **kw) -> float:
    """Fraction of ``data`` classified as its label."""
    if len(data) == 0:
        return float("nan")
    return (predict(model, data.x, **kw) == data.y.cpu()).float().mean().item()
