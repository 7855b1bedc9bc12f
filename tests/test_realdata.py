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
    train, test = DATASETS.get("mnist")().load(data_dir)
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.y).tolist()[:3] == [980, 1135, 1032]


@pytest.mark.realdata
@pytest.mark.slow
def test_badnets_implants_on_gtsrb_and_rnp_clearly_lowers_the_asr(data_dir, tmp_path):
    from bench.grid import GridSpec, run_grid

    overrides = {
        "gtsrb": {"train_subset": "12000"},
        "resnet18": {"width": "8"},
        "train": {"epochs": "4"},
        "rnp": {},
    }
    cells = GridSpec(attacks=["badnets"], defenses=["none", "rnp"], preset="quick", overrides=overrides).resolve()
    recs = run_grid(cells, tmp_path / "run", preset="quick", data_dir=str(data_dir), progress=False, log=print)
    by = {r["defense"]: r for r in recs}
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    before, after = by["none"]["metrics"], by["rnp"]["metrics"]
    print(f"GTSRB subset: before CA {before['ca']:.3f} ASR {before['asr']:.3f}; after RNP CA {after['ca']:.3f} ASR {after['asr']:.3f}")
    assert before["ca"] > 0.85 and before["asr"] > 0.9  # the backdoor is implanted
    assert after["asr"] < 0.5 * before["asr"]  # RNP clearly removes most of it
    assert after["ca"] > before["ca"] - 0.15  # without destroying the model
