"""``bench perf``: the FLOP counter on hand-counted layers, and a quick run's shape (no timing thresholds)."""

import math

import pytest
import torch
from torch import nn

from bench.perf import PERF_MODELS, count_flops, format_table, run_perf
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
    table = format_table(r)
    assert all(name in table for name in PERF_MODELS) and "speedup" in table and "GFLOP/s" in table


def test_plain_model_names_are_the_presets_widths():
    """``train_peak_fraction["smallcnn"]`` is the demo's model and ``["resnet18"]`` the quick preset's."""
    from bench.models import MODELS
    from bench.presets import PRESETS

    for name, preset in (("smallcnn", "demo"), ("resnet18", "quick")):
        model_name, kw = PERF_MODELS[name]
        assert model_name == name == PRESETS[preset].model and kw == PRESETS[preset].fields[name]
        MODELS.get(model_name)(**kw)  # a valid model
