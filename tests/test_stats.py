"""bench.stats against hand computations and scipy's own documented values."""

import math

import pytest

from bench.stats import der, paired, summary


def test_summary_is_mean_sample_std_and_a_t_interval():
    s = summary([0.9, 0.8, 1.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 df), from tables
    assert s["ci_low"] == pytest.approx(0.9 - half) and s["ci_high"] == pytest.approx(0.9 + half)
    assert summary([0.5]) == {"n": 1, "mean": 0.5, "std": 0.0, "ci_low": None, "ci_high": None}
    assert summary([None, float("nan")])["mean"] is None


def test_der_follows_backdoorbench():
    assert der({"ca": 0.9, "asr": 1.0}, {"ca": 0.9, "asr": 0.0}) == 1.0  # removed at no cost
    assert der({"ca": 0.9, "asr": 1.0}, {"ca": 0.9, "asr": 1.0}) == 0.5  # nothing changed
    assert der({"ca": 0.9, "asr": 1.0}, {"ca": 0.7, "asr": 0.2}) == pytest.approx((0.8 - 0.2 + 1) / 2)
    assert der({"ca": 0.9, "asr": 0.5}, {"ca": 0.95, "asr": 0.6}) == 0.5  # gains and ASR rises are clipped at 0
    assert der({"ca": 0.9, "asr": None}, {"ca": 0.9, "asr": None}) is None


def test_paired_counts_and_wilcoxon():
    r = paired([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert (r["a_better"], r["b_better"], r["ties"]) == (6, 0, 0)
    assert r["p"] == pytest.approx(0.03125)  # exact two-sided p of 6 positive ranks: 2 / 2**6
    low = paired([0.1, 0.2], [0.3, 0.2], higher_is_better=False)  # ASR: lower is better
    assert (low["a_better"], low["b_better"], low["ties"]) == (1, 0, 1)
    assert paired([0.1], [0.1])["p"] is None
    with pytest.raises(ValueError, match="same models"):
        paired([0.1], [0.1, 0.2])
