"""Two defenses on the same models: on how many each is better in ASR (lower is better) and in CA
(higher is better), the ties, and the Wilcoxon signed-rank p (``bench.stats.paired``).

A model is a (dataset, model, attack, seed): it counts when both defenses finished on it and ASR is
defined on both sides (not the clean model, not an unknown trigger). ``bench report RUN
--compare-defenses a,b`` prints this; the HTML page shows it for every pair of defenses.
"""

from __future__ import annotations

from itertools import combinations

from bench.registry import BenchError
from bench.report.records import model_key
from bench.report.render import frac, ok, ordered
from bench.stats import paired

MODELS = "dataset, model, attack, seed with both defenses ok and ASR defined"


def run_defenses(records: list[dict]) -> list[str]:
    """The run's defenses in order of first appearance."""
    return ordered(str(r["defense"]) for r in records)


def check_defenses(records: list[dict], spec: str) -> list[str]:
    """The names in ``spec`` ("rnp,anp"), each one the run has; a BenchError (one line) otherwise."""
    names = ordered(n.strip() for n in spec.split(",") if n.strip())
    have = run_defenses(records)
    if len(names) < 2:
        raise BenchError(f"--compare-defenses {spec!r} needs two defenses or more, e.g. --compare-defenses rnp,anp; "
                         f"this run has: {', '.join(have)}")
    missing = [n for n in names if n not in have]
    if missing:
        raise BenchError(f"--compare-defenses: this run has no {', '.join(missing)}; its defenses: {', '.join(have)}")
    return names


def compare_pair(records: list[dict], a: str, b: str) -> dict:
    """``{"a", "b", "n", "asr": paired(...), "ca": paired(...)}`` over the models both defenses share."""
    got: dict[str, dict[tuple, dict]] = {a: {}, b: {}}
    for r in records:
        if r["defense"] in got and ok(r) and frac(r["metrics"], "asr") is not None and frac(r["metrics"], "ca") is not None:
            got[r["defense"]][model_key(r)] = r["metrics"]
    keys = [k for k in got[a] if k in got[b]]
    out = {"a": a, "b": b, "n": len(keys)}
    for m, higher in (("asr", False), ("ca", True)):
        out[m] = paired([frac(got[a][k], m) for k in keys], [frac(got[b][k], m) for k in keys], higher_is_better=higher)
    return out


def pair_matrix(records: list[dict]) -> tuple[list[str], dict[tuple[str, str], dict]]:
    """The defenses other than ``none`` and ``compare_pair`` for each unordered pair of them."""
    defs = [d for d in run_defenses(records) if d != "none"]
    return defs, {(a, b): compare_pair(records, a, b) for a, b in combinations(defs, 2)}


def p_text(p: float | None) -> str:
    return "undefined (no model differs)" if p is None else f"{p:.3g}"


def pair_text(res: dict) -> str:
    a, b = res["a"], res["b"]
    if not res["n"]:
        return f"{a} vs {b}: no model ({MODELS}) to compare on"
    lines = [f"{a} vs {b} on {res['n']} models ({MODELS}):"]
    for m, what in (("asr", "ASR (lower is better)"), ("ca", "CA (higher is better)")):
        s = res[m]
        lines.append(f"  {what}: {a} better on {s['a_better']}, {b} better on {s['b_better']}, ties {s['ties']}; "
                     f"Wilcoxon signed-rank p = {p_text(s['p'])}")
    return "\n".join(lines)


def compare_defenses_text(records: list[dict], names: list[str]) -> str:
    """``pair_text`` for each pair of ``names`` (checked with ``check_defenses``)."""
    return "\n".join(pair_text(compare_pair(records, a, b)) for a, b in combinations(names, 2))
