"""``bench perf``: how fast the pieces are on this machine, measured in one run.

- ``augment_speedup``: images per second of ``bench.data.augment`` (random crop with
  4 pixels of padding and a horizontal flip, on whole uint8 batches of 256) divided by
  the per-sample torchvision pipeline that does the same (``RandomCrop(32, padding=4)``,
  ``RandomHorizontalFlip``, ``PILToTensor`` over PIL images, through a ``DataLoader``
  with ``num_workers=0`` and batch 256), on the same number of images.
- ``matmul_gflops``: the best of a few large square matmuls, fp32, and bf16 where the
  device runs bf16 natively (``bench.train.bf16_supported``).
- ``train_peak_fraction``: per model, images per second of ``bench.train.train`` over a
  few steps on synthetic images (8 on the CPU, 50 on a GPU; batch 128), times 3x the forward FLOPs per image
  (conv and linear MACs counted by forward hooks, 2 FLOPs each; a training step is
  about 3 forward passes), over the matmul peak of the dtype the trainer uses.
- ``rnp_seconds``: the RNP defense with its defaults on a demo-scale model (smallcnn at
  the demo's width, trained briefly on synthetic data) and 100 clean images.
- ``paper_train`` (CUDA only; ``None`` on the CPU): the ``paper`` preset's model at its
  width (ResNet-18, width 64) and batch size, trained by ``bench.train.train`` under bf16
  autocast on synthetic 32x32 images, after a warm-up, for at least ``PAPER_MIN_STEPS``
  steps and ``PAPER_MIN_SECONDS`` seconds. Its FLOPs per training image (forward and
  backward) are counted by ``torch.utils.flop_counter.FlopCounterMode``, which sums the
  formula of every matmul and convolution the step dispatches (multiply-adds as 2 FLOPs;
  the input's own gradient is not computed, so not counted); ``peak_fraction`` is the
  achieved FLOP rate over the GPU's published dense bf16 tensor-core peak
  (``bf16_peak_tflops``), ``None`` for a GPU not in the table.

Everything runs on one device, the CPU unless another is named (``bench perf --device
cuda``); the torchvision pipeline always runs on the CPU, as it would in a DataLoader.
Timings on a GPU read the clock after ``bench.train.synchronize``. ``quick=True`` shrinks
everything (a few hundred images, one training step of batch 16 without warm-up, a
256 matmul, RNP with 2 unlearning and 2 recovering epochs): it checks the code path,
its numbers are not worth reading. No timing is asserted anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import re
import time
from typing import Any, Callable

import torch
from torch import nn

from bench.data import Augmentation, ImageSet, augment, step_generator
from bench.train import TrainConfig, bf16_supported, synchronize, train

def _preset_fields(preset: str, model: str) -> dict:
    from bench.presets import PRESETS

    return dict(PRESETS[preset].fields[model])


# The plain names are the models as their preset trains them: "smallcnn" as in the demo,
# "resnet18" as in the quick preset; the others are there to show how throughput moves with width.
PERF_MODELS: dict[str, tuple[str, dict]] = {
    "smallcnn": ("smallcnn", _preset_fields("demo", "smallcnn")),
    "smallcnn-w32": ("smallcnn", {"width": 32}),
    "resnet18-w8": ("resnet18", {"width": 8}),
    "resnet18": ("resnet18", _preset_fields("quick", "resnet18")),
}

QUICK_RNP = {"unlearn_epochs": 2, "unlearn_milestones": (), "recover_epochs": 2}

PAPER_MIN_STEPS = 50  # the paper model's timed run: at least this many steps ...
PAPER_MIN_SECONDS = 10.0  # ... and at least this long, so that clocks and caches have settled
PAPER_WARMUP_STEPS = 20  # untimed first (cuDNN's algorithm choice, the allocator's pool)

# Published dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOPS, by a pattern of the name CUDA
# reports (``torch.cuda.get_device_name``); the first match wins. NVIDIA's datasheets print the
# sparse figure, marked "*", with "specifications 1/2 lower without sparsity": the numbers here are
# halved. Sources (checked 2026-12-05 against copies of the datasheets' tables):
# - H100 SXM 1,979* / H100 PCIe 1,513* TFLOPS BFLOAT16: NVIDIA H100 Tensor Core GPU datasheet,
#   https://www.nvidia.com/en-us/data-center/h100/
# - H200 (SXM) 1,979* TFLOPS BF16: NVIDIA H200 datasheet, https://www.nvidia.com/en-us/data-center/h200/
# - A100 (40 and 80 GB, SXM and PCIe) 312 / 624* TFLOPS BFLOAT16: NVIDIA A100 datasheet,
#   https://www.nvidia.com/en-us/data-center/a100/
# - L4 242* TFLOPS BF16: NVIDIA L4 datasheet, https://www.nvidia.com/en-us/data-center/l4/
# - L40S 362.05 / 733* TFLOPS BF16: NVIDIA L40S datasheet, https://www.nvidia.com/en-us/data-center/l40s/
# - GeForce RTX 4090 165.2 / 330.4* TFLOPS "Peak BF16 Tensor TFLOPS with FP32 Accumulate": NVIDIA Ada
#   GPU Architecture whitepaper, appendix A, https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf
# Variants with other clocks or power limits (H100 NVL, H200 NVL, L40 without S, RTX 4090 D) and MIG
# slices (a fraction of the chip) are listed as None, so they are never scored against a sibling's peak.
BF16_PEAKS_TFLOPS: tuple[tuple[str, float | None], ...] = (
    (r"\bMIG\b", None),
    (r"H100.*\bNVL\b", None),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),
    (r"H200.*\bNVL\b", None),
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL40\b", None),
    (r"\bL4\b", 121.0),
    (r"RTX 4090 D\b", None),
    (r"RTX 4090", 165.0),
)


def bf16_peak_tflops(gpu_name: str | None) -> float | None:
    """The published dense bf16 peak (TFLOPS) of the GPU called ``gpu_name``; None if unknown."""
    if not gpu_name:
        return None
    for pattern, peak in BF16_PEAKS_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return peak
    return None


# ---------------------------------------------------------------- FLOPs


def count_flops(model: nn.Module, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """Forward FLOPs of one input of shape ``input_shape`` (no batch dim): 2 x conv and linear MACs.

    MACs come from forward hooks: a convolution does ``out.numel() * in_channels / groups
    * prod(kernel_size)`` of them (bias, BatchNorm, activations and pooling are not
    counted), a transposed one ``in.numel() * out_channels / groups * prod(kernel_size)``,
    a linear layer ``out.numel() * in_features``. The model's mode is restored.
    """
    macs = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        k = 1
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            for s in mod.kernel_size:
                k *= s
            macs += inp[0].numel() * (mod.out_channels // mod.groups) * k
        elif isinstance(mod, nn.modules.conv._ConvNd):
            for s in mod.kernel_size:
                k *= s
            macs += out.numel() * (mod.in_channels // mod.groups) * k
        elif isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs


def train_flops_per_image(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, batch: int = 2) -> float:
    """FLOPs of one training image (forward, cross-entropy, backward) as ``FlopCounterMode`` counts them.

    Counted on a CPU copy of ``model`` in train mode with a batch of ``batch`` zero images (the count
    is a formula of the shapes, so the values do not matter); ``model`` itself is untouched.
    """
    from torch.utils.flop_counter import FlopCounterMode

    work = copy.deepcopy(model).cpu().train()
    x = torch.zeros((batch, *input_shape))
    y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(work(x), y).backward()
    return counter.get_total_flops() / batch


# ---------------------------------------------------------------- timing helpers


def _best_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def gpu_name(device: torch.device) -> str | None:
    """The name CUDA reports for ``device``; None for a CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"cpu ({cpu}, {n} thread{'' if n == 1 else 's'})"


# ---------------------------------------------------------------- the measurements


def augment_throughput(n: int, device: torch.device, batch: int = 256, size: int = 32) -> dict[str, float]:
    """Images per second of ``bench.data.augment`` and of the torchvision/PIL pipeline on ``n`` images."""
    from PIL import Image
    from torchvision import transforms

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    aug = Augmentation(pad=4, flip=True)

    xd = x.to(device)
    dgen = step_generator(gen, device, 0)  # the draws on the device, as the trainer makes them (the CPU: gen itself)
    augment(xd[:batch], aug, dgen)  # warm-up

    def ours() -> None:
        for i in range(0, n, batch):
            augment(xd[i:i + batch], aug, dgen)

    t_ours = _best_seconds(ours, 2, device)

    images = [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).numpy()]
    tf = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(), transforms.PILToTensor()])

    class PILSet(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int) -> torch.Tensor:
            return tf(images[i])

    loader = torch.utils.data.DataLoader(PILSet(), batch_size=batch, shuffle=False, num_workers=0)

    def theirs() -> None:
        for _ in loader:
            pass

    with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
        torch.manual_seed(0)
        t_theirs = _best_seconds(theirs, 1, torch.device("cpu"))
    return {"bench": n / t_ours, "torchvision": n / t_theirs}


def matmul_peak(device: torch.device, n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of an ``n x n`` matmul, best of ``repeats``: fp32, and bf16 where it is native."""
    dtypes = {"fp32": torch.float32}
    if bf16_supported(device):
        dtypes["bf16"] = torch.bfloat16
    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, dt in dtypes.items():
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
        a @ b  # warm-up
        out[name] = 2 * n**3 / _best_seconds(lambda: a @ b, repeats, device) / 1e9
    return out


def train_throughput(model_name: str, kw: dict, *, steps: int, batch: int, device: torch.device,
                     warmup: bool = True) -> dict[str, float]:
    """Training images per second of ``bench.train.train`` and forward FLOPs per image of one model."""
    from bench.models import MODELS

    model = MODELS.get(model_name)(**kw).build(10, 3, (0.5,) * 3, (0.25,) * 3, seed=0)
    fwd = count_flops(model, (3, 32, 32))
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (batch * steps, 3, 32, 32), dtype=torch.uint8, generator=gen),
                    torch.randint(0, 10, (batch * steps,), generator=gen))
    aug = Augmentation(pad=4, flip=True)
    cfg = TrainConfig(epochs=1, batch_size=batch, schedule="constant", lr=0.01)
    if warmup:  # kernel selection, allocator
        train(model, ImageSet(data.x[: 2 * batch], data.y[: 2 * batch]), cfg, aug, seed=0, device=device)
    synchronize(device)
    stats = train(model, data, cfg, aug, seed=1, device=device)
    synchronize(device)
    return {"img_per_s": stats["img_per_s"], "fwd_flops": float(fwd)}


def sustained_train_throughput(model_name: str, kw: dict, *, num_classes: int, shape: tuple[int, int, int], batch: int,
                               device: torch.device, min_steps: int = PAPER_MIN_STEPS,
                               min_seconds: float = PAPER_MIN_SECONDS, warmup_steps: int = PAPER_WARMUP_STEPS,
                               max_steps: int = 20000) -> dict[str, Any]:
    """Training throughput of one model held long enough to be stable, and its share of the device's peak.

    A warm-up of ``warmup_steps`` steps (skipped when 0), then a timed run of ``min_steps`` steps
    (one epoch over ``batch * min_steps`` synthetic images); if that took less than ``min_seconds``,
    the run is repeated with as many epochs as reach ``min_seconds`` (at most ``max_steps`` steps)
    and that one is reported. bf16 autocast where the device runs it natively (the trainer's rule).

    Returns ``model``, ``kw``, ``batch``, ``steps``, ``seconds``, ``img_per_s``, ``dtype``,
    ``train_flops_per_image`` (``train_flops_per_image``), ``tflops`` (achieved), ``gpu`` (None on
    a CPU), ``peak_tflops`` (``bf16_peak_tflops``; None unless bf16 on a listed GPU) and
    ``peak_fraction`` (None where the peak is).
    """
    from bench.models import MODELS

    c, h, w = shape
    model = MODELS.get(model_name)(**kw).build(num_classes, c, (0.5,) * c, (0.25,) * c, seed=0)
    flops = train_flops_per_image(model, shape, num_classes)
    gen = torch.Generator().manual_seed(0)
    n = batch * min_steps
    data = ImageSet(torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=gen),
                    torch.randint(0, num_classes, (n,), generator=gen)).to(device)
    aug = Augmentation(pad=4, flip=True)
    cfg = TrainConfig(epochs=1, batch_size=batch, schedule="constant", lr=0.01)
    dtype = "bf16" if cfg.bf16 and bf16_supported(device) else "fp32"
    if warmup_steps > 0:
        k = min(n, batch * warmup_steps)
        train(model, ImageSet(data.x[:k], data.y[:k]), cfg, aug, seed=0, device=device)
    stats = train(model, data, cfg, aug, seed=1, device=device)
    steps = min_steps
    if stats["seconds"] < min_seconds:
        epochs = max(2, min(max_steps // min_steps, math.ceil(min_seconds / max(stats["seconds"], 1e-9))))
        stats = train(model, data, dataclasses.replace(cfg, epochs=epochs), aug, seed=2, device=device)
        steps = epochs * min_steps
    name = gpu_name(device)
    peak = bf16_peak_tflops(name) if dtype == "bf16" else None
    tflops = flops * stats["img_per_s"] / 1e12
    return {"model": model_name, "kw": dict(kw), "batch": batch, "steps": steps, "seconds": stats["seconds"],
            "img_per_s": stats["img_per_s"], "dtype": dtype, "train_flops_per_image": flops, "tflops": tflops,
            "gpu": name, "peak_tflops": peak, "peak_fraction": tflops / peak if peak else None}


def paper_train_throughput(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """``sustained_train_throughput`` of the ``paper`` preset's model, width and batch size on its dataset's image shape."""
    from bench.data import DATASETS
    from bench.presets import PRESETS

    preset = PRESETS["paper"]
    ds = DATASETS.get(preset.dataset)
    kw = dict(preset.fields.get(preset.model, {}))
    more = {"min_steps": 2, "min_seconds": 0.0, "warmup_steps": 1} if quick else {}
    return sustained_train_throughput(preset.model, kw, num_classes=ds.num_classes, shape=(ds.channels, ds.size, ds.size),
                                      batch=preset.train.batch_size, device=device, **more)


def rnp_time(device: torch.device, quick: bool) -> float | None:
    """Seconds of the RNP defense with its defaults on a demo-scale model; None if RNP is not registered."""
    from bench.data import Synthetic, defense_subset
    from bench.models import MODELS
    from defenses import DEFENSES, DefenseContext

    if "rnp" not in DEFENSES:
        return None
    ds = Synthetic(n_train=128 if quick else 2000, n_test=10)
    train_set, _ = ds.load()
    model = MODELS.get("smallcnn")(**_preset_fields("demo", "smallcnn")).build(ds.num_classes, ds.channels, ds.mean, ds.std, seed=0)
    # A trained model, so that RNP's unlearning has accuracy to remove (it stops at <= 20%).
    train(model, train_set, TrainConfig(epochs=1 if quick else 3), ds.augmentation, seed=0, device=device)
    clean = defense_subset(train_set, 100, seed=0)
    cls = DEFENSES.get("rnp")
    fields = {f.name for f in dataclasses.fields(cls)}
    # quick: two epochs of each phase instead of the paper's twenty (only the fields RNP has)
    defense = cls(**{k: v for k, v in QUICK_RNP.items() if k in fields}) if quick else cls()
    ctx = DefenseContext(num_classes=ds.num_classes, augmentation=ds.augmentation, seed=0, device=device)
    model = copy.deepcopy(model)
    synchronize(device)
    t0 = time.perf_counter()
    defense(model, clean, ctx)
    synchronize(device)
    return time.perf_counter() - t0


def run_perf(quick: bool = False, device: torch.device | str | None = None) -> dict:
    """Measure everything; ``quick`` shrinks every measurement (for tests). ``device``: default cuda if available.

    Returns a dict: ``device``, ``torch``, ``quick``, ``augment_img_per_s`` ({bench,
    torchvision}), ``augment_speedup``, ``matmul_gflops`` ({fp32[, bf16]}), ``train_dtype``,
    ``train`` ({model: {img_per_s, fwd_flops, gflops}}), ``train_peak_fraction``
    ({model: fraction}), ``rnp_seconds`` (None when RNP is not registered), ``paper_train``
    (``paper_train_throughput``; CUDA only, else None), ``total_seconds``,
    ``matmul_size``, ``cpus``, and the 1-minute load average ``load_before`` / ``load_after``
    (``format_table`` warns when other processes competed for the CPU).
    """
    t_start = time.perf_counter()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    res: dict[str, Any] = {"device": _device_name(device), "gpu": gpu_name(device), "torch": torch.__version__, "quick": quick,
                           "load_before": _load(), "cpus": os.cpu_count()}

    aug = augment_throughput(512 if quick else 20480, device)
    res["augment_img_per_s"] = aug
    res["augment_speedup"] = aug["bench"] / aug["torchvision"]

    n = 256 if quick else (8192 if device.type == "cuda" else 2048)  # big enough to reach the device's peak
    res["matmul_gflops"] = peak = matmul_peak(device, n, 2 if quick else 5)
    res["matmul_size"] = n

    cfg = TrainConfig()
    dtype = "bf16" if cfg.bf16 and bf16_supported(device) else "fp32"
    res["train_dtype"] = dtype
    res["train"], res["train_peak_fraction"] = {}, {}
    for name, (model_name, kw) in PERF_MODELS.items():
        steps = 1 if quick else (50 if device.type == "cuda" else 8)  # a GPU step is short: more of them
        t = train_throughput(model_name, kw, steps=steps, batch=16 if quick else 128, device=device,
                             warmup=not quick)
        t["gflops"] = 3 * t["fwd_flops"] * t["img_per_s"] / 1e9
        res["train"][name] = t
        res["train_peak_fraction"][name] = t["gflops"] / peak[dtype]

    res["rnp_seconds"] = rnp_time(device, quick)
    res["paper_train"] = paper_train_throughput(device, quick) if device.type == "cuda" else None
    res["total_seconds"] = time.perf_counter() - t_start
    res["load_after"] = _load()
    return res


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def format_table(result: dict) -> str:
    """A plain-text table of a ``run_perf`` result."""
    a = result["augment_img_per_s"]
    lines = [f"bdbench perf on {result['device']}, torch {result['torch']}" + (" (quick)" if result.get("quick") else ""), ""]
    lines.append("augmentation (crop pad 4 + flip, 32x32)")
    lines.append(f"  {'bench.data.augment (batched)':<34}{a['bench']:>14,.0f} img/s")
    lines.append(f"  {'torchvision + PIL (DataLoader)':<34}{a['torchvision']:>14,.0f} img/s")
    lines.append(f"  {'speedup':<34}{result['augment_speedup']:>14.1f} x")
    lines.append("")
    lines.append(f"matmul peak ({result.get('matmul_size', '?')} x {result.get('matmul_size', '?')}, best of a few)")
    for k, v in result["matmul_gflops"].items():
        lines.append(f"  {k:<34}{v:>14,.1f} GFLOP/s")
    lines.append("")
    lines.append(f"training ({result['train_dtype']}; effective GFLOP/s = 3 x forward FLOPs x img/s)")
    lines.append(f"  {'model':<16}{'img/s':>10}{'fwd MFLOP/img':>15}{'GFLOP/s':>10}{'of peak':>10}")
    for name, t in result["train"].items():
        frac = result["train_peak_fraction"][name]
        lines.append(f"  {name:<16}{t['img_per_s']:>10,.0f}{t['fwd_flops'] / 1e6:>15,.1f}{t['gflops']:>10,.1f}{frac:>10.1%}")
    p = result.get("paper_train")
    if p:
        lines.append("")
        frac = f"{p['peak_fraction']:.1%} of {p['peak_tflops']:g} TFLOPS" if p["peak_fraction"] is not None else "peak unknown"
        lines.append(f"paper preset's model ({p['model']} {p['kw']}, batch {p['batch']}, {p['dtype']}, {p['steps']} steps "
                     f"in {p['seconds']:.1f} s) on {p['gpu']}")
        lines.append(f"  {'img/s':<34}{p['img_per_s']:>14,.0f}")
        lines.append(f"  {'GFLOP per training image':<34}{p['train_flops_per_image'] / 1e9:>14.3f}")
        lines.append(f"  {'achieved TFLOP/s':<34}{p['tflops']:>14.1f}   ({frac}, dense bf16)")
    lines.append("")
    lines.append("seconds")
    rnp = result.get("rnp_seconds")
    demo_model = " ".join(f"{k} {v}" for k, v in _preset_fields("demo", "smallcnn").items())
    rnp_label = f"rnp defense (smallcnn {demo_model}, 100 images)"
    lines.append(f"  {rnp_label:<34}" + (f"{rnp:>14.2f} s" if rnp is not None else f"{'not registered':>14}"))
    lines.append(f"  {'total':<34}{result['total_seconds']:>14.1f} s")
    busy = [x for x in (result.get("load_before"), result.get("load_after")) if x is not None]
    if busy and result.get("cpus") and max(busy) > 0.75 * result["cpus"]:
        lines += ["", f"warning: load average {max(busy):.1f} on {result['cpus']} CPUs: other processes competed for the CPU, "
                      "so these timings are low and noisy (CPU threads that wait on each other suffer most)"]
    return "\n".join(lines)
