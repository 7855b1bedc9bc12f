"""``bench perf``: the FLOP counter on hand-counted layers, and a quick run's shape (no timing thresholds)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bench.perf
from bench.cli import main
from bench.perf import (PERF_MODELS, bf16_peak_tflops, count_flops, format_table, paper_train_throughput, run_perf,
                        sustained_train_throughput, train_flops_per_image)
from defenses import DEFENSES


@pytest.mark.parametrize("model, shape, macs", [
    # 8 output channels x 8 x 8 positions, each 3 input channels x 3 x 3 taps; the bias is not counted
    (nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8), 8 * 8 * 8 * 3 * 9),
    # stride 2, no padding: 5x5 -> 2x2 outputs; groups=2: each output sees 4 / 2 input channels
    (nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), (4, 5, 5), 6 * 2 * 2 * 2 * 9),
    (nn.Linear(10, 5), (10,), 10 * 5),
    # BatchNorm, ReLU and pooling are free; conv 1x4x4 -> 2x4x4 (2*16*9 MACs), pool -> 2x2x2, linear 8 -> 3
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
     (1, 4, 4), 2 * 16 * 9 + 8 * 3),
])
def test_count_flops_is_twice_the_hand_counted_macs(model, shape, macs):
    assert count_flops(model, shape) == 2 * macs


def test_count_flops_restores_the_mode_and_leaves_no_hooks():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    count_flops(model, (1, 5, 5))
    assert model.training and not model[0]._forward_hooks


def test_quick_run_reports_every_number(one_thread):
    r = run_perf(quick=True, device="cpu")
    assert "1 thread)" in r["device"]
    assert r["device"].startswith("cpu") and r["torch"]
    assert set(r["augment_img_per_s"]) == {"bench", "torchvision"}
    assert r["augment_speedup"] > 0 and all(v > 0 for v in r["augment_img_per_s"].values())
    assert r["matmul_gflops"]["fp32"] > 0 and r["train_dtype"] in r["matmul_gflops"]
    assert set(r["train_peak_fraction"]) == set(r["train"]) == set(PERF_MODELS)
    for name, t in r["train"].items():
        assert t["img_per_s"] > 0 and t["fwd_flops"] > 0 and t["gflops"] > 0
        assert r["train_peak_fraction"][name] > 0 and math.isfinite(r["train_peak_fraction"][name])
    if "rnp" in DEFENSES:
        assert r["rnp_seconds"] > 0
    else:
        assert r["rnp_seconds"] is None
    assert r["total_seconds"] > 0
    assert r["gpu"] is None and r["paper_train"] is None, "the paper model is timed on CUDA only"
    table = format_table(r)
    assert all(name in table for name in PERF_MODELS) and "speedup" in table and "GFLOP/s" in table
    assert "paper preset" not in table


def test_plain_model_names_are_the_presets_widths():
    """``train_peak_fraction["smallcnn"]`` is the demo's model and ``["resnet18"]`` the quick preset's."""
    from bench.models import MODELS
    from bench.presets import PRESETS

    for name, preset in (("smallcnn", "demo"), ("resnet18", "quick")):
        model_name, kw = PERF_MODELS[name]
        assert model_name == name == PRESETS[preset].model and kw == PRESETS[preset].fields[name]
        MODELS.get(model_name)(**kw)  # a valid model


# ---------------------------------------------------------------- the paper model on a GPU (its CPU-side logic)


def test_training_flops_are_the_hand_counted_forward_and_backward():
    """conv 1->2 (3x3, pad 1) on 4x4, BatchNorm, ReLU, linear 32->3. Forward: conv 2*16*9 = 288 MACs, linear
    32*3 = 96. Backward: the linear layer's weight gradient (96) and its input gradient (96), the conv's
    weight gradient (288); not the conv's input gradient (the images need none). 2 FLOPs per MAC:
    2 * (288 + 96 + 96 + 96 + 288) = 1728 per image; BatchNorm, ReLU, bias and the loss count nothing."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert train_flops_per_image(model, (1, 4, 4), 3) == 1728
    assert train_flops_per_image(model, (1, 4, 4), 3, batch=5) == 1728
    # the model itself is untouched: no BatchNorm statistics moved, no gradients left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 SXM5 80GB", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.0),
    # not in the table: other clocks or a slice of the chip, never scored against a sibling's peak
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA L40", None), ("NVIDIA GeForce RTX 4090 D", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None), ("Tesla T4", None), ("", None), (None, None),
])
def test_bf16_peak_lookup(name, peak):
    assert bf16_peak_tflops(name) == peak


def _fake_train(seconds: list[float], calls: list):
    """Stands in for ``bench.train.train``: records each call's epochs and steps, returns the next ``seconds``."""
    def fake(model, data, cfg, aug, *, seed, device, **kw):
        calls.append({"epochs": cfg.epochs, "steps_per_epoch": len(data) // cfg.batch_size, "seed": seed})
        s = seconds[len(calls) - 1]
        return {"seconds": s, "img_per_s": cfg.epochs * len(data) / s}
    return fake


def test_sustained_run_is_warmed_up_and_stretched_to_the_minimum_time(monkeypatch):
    calls: list = []
    monkeypatch.setattr(bench.perf, "train", _fake_train([0.05, 0.25, 10.5], calls))
    monkeypatch.setattr(bench.perf, "bf16_supported", lambda device: True)
    monkeypatch.setattr(bench.perf, "gpu_name", lambda device: "NVIDIA H100 PCIe")
    r = sustained_train_throughput("smallcnn", {"width": 4}, num_classes=10, shape=(3, 8, 8), batch=4,
                                   device=torch.device("cpu"), min_steps=50, min_seconds=10.0, warmup_steps=20)
    # warm-up of 20 steps, a first timed epoch of 50 steps in 0.25 s, then ceil(10 / 0.25) = 40 epochs
    assert calls == [{"epochs": 1, "steps_per_epoch": 20, "seed": 0}, {"epochs": 1, "steps_per_epoch": 50, "seed": 1},
                     {"epochs": 40, "steps_per_epoch": 50, "seed": 2}]
    assert r["steps"] == 2000 and r["seconds"] == 10.5 and r["img_per_s"] == 40 * 200 / 10.5
    from bench.models import MODELS

    flops = train_flops_per_image(MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.25,) * 3, seed=0), (3, 8, 8), 10)
    assert r["train_flops_per_image"] == flops > 0
    assert r["tflops"] == pytest.approx(flops * r["img_per_s"] / 1e12)
    assert r["gpu"] == "NVIDIA H100 PCIe" and r["dtype"] == "bf16" and r["peak_tflops"] == 756.0
    assert r["peak_fraction"] == pytest.approx(r["tflops"] / 756.0)
    assert set(r) == {"model", "kw", "batch", "steps", "seconds", "img_per_s", "dtype", "train_flops_per_image", "tflops",
                      "gpu", "peak_tflops", "peak_fraction"}
    json.dumps(r)  # JSON-able as it is


def test_sustained_run_long_enough_is_not_repeated_and_unknown_peaks_are_null(monkeypatch):
    calls: list = []
    monkeypatch.setattr(bench.perf, "train", _fake_train([0.05, 12.0], calls))
    monkeypatch.setattr(bench.perf, "bf16_supported", lambda device: True)
    monkeypatch.setattr(bench.perf, "gpu_name", lambda device: "Some Future GPU")
    r = sustained_train_throughput("smallcnn", {"width": 4}, num_classes=10, shape=(3, 8, 8), batch=4,
                                   device=torch.device("cpu"), min_steps=50, min_seconds=10.0, warmup_steps=5)
    assert len(calls) == 2 and r["steps"] == 50 and r["seconds"] == 12.0
    assert r["peak_tflops"] is None and r["peak_fraction"] is None
    monkeypatch.setattr(bench.perf, "bf16_supported", lambda device: False)
    monkeypatch.setattr(bench.perf, "gpu_name", lambda device: "NVIDIA H100 PCIe")
    calls.clear()
    monkeypatch.setattr(bench.perf, "train", _fake_train([0.05, 12.0], calls))
    r = sustained_train_throughput("smallcnn", {"width": 4}, num_classes=10, shape=(3, 8, 8), batch=4,
                                   device=torch.device("cpu"), min_steps=50, min_seconds=10.0, warmup_steps=5)
    assert r["dtype"] == "fp32" and r["peak_fraction"] is None, "fp32 is never scored against the bf16 peak"


def test_paper_measurement_is_the_paper_presets_model_width_and_batch(monkeypatch):
    from bench.presets import PRESETS

    seen = {}
    monkeypatch.setattr(bench.perf, "sustained_train_throughput", lambda name, kw, **k: seen.update(name=name, kw=kw, **k))
    paper_train_throughput(torch.device("cpu"))
    p = PRESETS["paper"]
    assert seen["name"] == p.model == "resnet18" and seen["kw"] == p.fields["resnet18"] == {"width": 64}
    assert seen["batch"] == p.train.batch_size and seen["shape"] == (3, 32, 32) and seen["num_classes"] == 10
    assert "min_steps" not in seen, "the full run keeps the defaults (>= 50 steps, >= 10 s)"
    assert bench.perf.PAPER_MIN_STEPS >= 50 and bench.perf.PAPER_MIN_SECONDS >= 10


def test_format_table_shows_the_paper_model_and_its_peak_fraction():
    base = {"device": "cuda (NVIDIA H100 PCIe)", "torch": "x", "augment_img_per_s": {"bench": 1.0, "torchvision": 1.0},
            "augment_speedup": 1.0, "matmul_gflops": {"fp32": 1.0}, "train_dtype": "bf16", "train": {},
            "train_peak_fraction": {}, "rnp_seconds": 1.0, "total_seconds": 1.0}
    p = {"model": "resnet18", "kw": {"width": 64}, "batch": 128, "steps": 2000, "seconds": 10.2, "img_per_s": 25000.0,
         "dtype": "bf16", "train_flops_per_image": 3.33e9, "tflops": 83.25, "gpu": "NVIDIA H100 PCIe",
         "peak_tflops": 756.0, "peak_fraction": 83.25 / 756}
    table = format_table({**base, "paper_train": p})
    assert "25,000" in table and "NVIDIA H100 PCIe" in table and "11.0% of 756 TFLOPS" in table and "3.330" in table
    assert "peak unknown" in format_table({**base, "paper_train": {**p, "peak_tflops": None, "peak_fraction": None}})


def test_cli_perf_refuses_cuda_without_a_gpu_on_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = CliRunner().invoke(main, ["perf", "--device", "cuda"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_cli_perf_passes_the_device_and_writes_json(monkeypatch, tmp_path):
    seen = {}

    def fake_run_perf(quick, device):
        seen.update(quick=quick, device=device)
        return {"fake": True}

    monkeypatch.setattr(bench.perf, "run_perf", fake_run_perf)
    monkeypatch.setattr(bench.perf, "format_table", lambda r: "table")
    out = tmp_path / "perf.json"
    res = CliRunner().invoke(main, ["perf", "--quick", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert seen == {"quick": True, "device": "cpu"} and json.loads(out.read_text()) == {"fake": True}
