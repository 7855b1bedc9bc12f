"""Statistics over seeds that say which defense wins: intervals, BackdoorBench's DER, paired comparisons.

- ``summary(values)``: mean, sample std, and a 95 % confidence interval of the mean by Student's t
  (``scipy.stats.t``; with n seeds, n - 1 degrees of freedom). A bootstrap over 3 seeds has only 10
  distinct resamples and gives intervals too narrow to mean anything, so t it is; with one seed
  the interval is undefined (None).
- ``der(before, after)``: the defense effectiveness rating of BackdoorBench (Wu et al.,
  "BackdoorBench: A Comprehensive Benchmark of Backdoor Learning", NeurIPS 2022 Datasets and
  Benchmarks, arXiv:2206.12654): DER = [max(0, ASR_before - ASR_after) - max(0, CA_before -
  CA_after) + 1] / 2, in [0, 1]; 0.5 changes nothing, 1 removes the backdoor at no cost. Metrics
  as fractions in [0, 1].
- ``paired(a, b)``: two defenses on the same models (one value each per model): on how many each is
  better, ties, and the Wilcoxon signed-rank test's two-sided p (``scipy.stats.wilcoxon``, zero
  differences dropped as its default ``zero_method="wilcox"`` does; None when every pair ties or
  fewer than one differs).
"""

from __future__ import annotations

import math
from typing import Sequence


def summary(values: Sequence[float]) -> dict:
    """``{"n", "mean", "std", "ci_low", "ci_high"}`` of ``values`` (None where undefined)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = sum(vals) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "ci_low": None, "ci_high": None}
    from scipy import stats

    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def der(before: dict, after: dict) -> float | None:
    """BackdoorBench's DER from the model's metrics before and after a defense ({"ca", "asr"} fractions);
    None where ASR is undefined (the clean model, an unknown trigger)."""
    if before.get("asr") is None or after.get("asr") is None or before.get("ca") is None or after.get("ca") is None:
        return None
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["ca"] - after["ca"]) + 1) / 2


def paired(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> dict:
    """``{"n", "a_better", "b_better", "ties", "p"}`` for paired values (the same models under two defenses)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same models on both sides; got {len(a)} and {len(b)}")
    sign = 1.0 if higher_is_better else -1.0
    diffs = [sign * (float(x) - float(y)) for x, y in zip(a, b)]
    out = {"n": len(diffs), "a_better": sum(d > 0 for d in diffs), "b_better": sum(d < 0 for d in diffs),
           "ties": sum(d == 0 for d in diffs), "p": None}
    if out["a_better"] + out["b_better"] >= 1:
        from scipy import stats

        out["p"] = float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue)
    return out
