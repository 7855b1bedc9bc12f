"""Real-data tests on ../shared/data (GTSRB 32x32, MNIST) through BENCH_DATA_DIR.

They are skipped when BENCH_DATA_DIR is unset (a laptop without the data) and fail when it
is set but the data is missing (CI sets it).
"""

import pytest
import torch

from bench.data import DATASETS


@pytest.mark.realdata
def test_gtsrb_and_mnist_load_with_the_official_counts(data_dir):
    train, test = DATASETS.get("gtsrb")().load(data_dir)
    assert train.x.shape == (39209, 3, 32, 32) and test.x.shape == (12630, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and int(train.y.max()) == 42 and int(test.y.min()) == 0
    counts = torch.bincount(train.y, minlength=43)
    assert counts.min() == 210 and counts.max() == 2250  # GTSRB's known class imbalance
    # The quick preset points clean-label attacks at GTSRB's largest class (class 0, every other
    # attack's target, is also its smallest): each of them then poisons at least 5 % of the set.
    from attacks import ATTACKS
    from bench.presets import PRESETS

    quick = PRESETS["quick"]
    assert quick.dataset == "gtsrb" and int(counts[0]) == 210
    for name, cls in ATTACKS.items():
        if cls.clean_label:
            target = quick.fields.get(name, {}).get("target", 0)
            assert int(counts[target]) == int(counts.max()), f"{name} targets class {target} on quick"
    train, test = DATASETS.get("mnist")().load(data_dir)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.y).tolist()[:3] == [980, 1135, 1032]


@pytest.mark.realdata
@pytest.mark.slow
def test_badnets_implants_on_gtsrb_and_rnp_clearly_lowers_the_asr(data_dir, tmp_path):
    """The quick preset's BadNets cell, seed 0 (~6 min here): the backdoor takes, RNP removes it.

    Narrower models were cheaper but not a fair test of RNP's default operating point: at
    ResNet-18 width 8 (3 epochs, all of GTSRB: CA 94.0 / ASR 100) threshold 0.2 left ASR at
    73 %, the ASR falling only gradually with the threshold (9.8 % at 0.4, CA 89.4 %).
    """
    from bench.run.plan import GridSpec
    from bench.run.execute import run_grid

    overrides = {"run": {"sweep": "false"}}  # the oracle curve is for plots; skip its 19 evaluations
    cells = GridSpec(attacks=["badnets"], defenses=["none", "rnp"], preset="quick", overrides=overrides,
                     data_dir=str(data_dir)).plan().defense_cells
    recs = run_grid(cells, tmp_path / "run", preset="quick", progress=False, log=print)
    by = {r["defense"]: r for r in recs}
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    before, after = by["none"]["metrics"], by["rnp"]["metrics"]
    print(f"GTSRB quick: before CA {before['ca']:.3f} ASR {before['asr']:.3f}; after RNP CA {after['ca']:.3f} ASR {after['asr']:.3f}")
    assert before["ca"] > 0.9 and before["asr"] > 0.9  # the backdoor is implanted
    # RNP clearly lowers it. The model's last bits differ between CPUs (bf16), and so does RNP's result on it:
    # ASR 0.5 % and 42.3 % after RNP (from ~100 %) on the seed-0 models of two sessions on 2-core Xeons with AVX-512-BF16
    # (2026-12-06/07; docs/measurements.md). Halving the ASR is what every model measured so far shows.
    assert after["asr"] < 0.5 * before["asr"]
    assert after["ca"] > before["ca"] - 0.05  # at a small cost in clean accuracy (measured: -2.1 points)
