"""The table model of a run: per (dataset, model), the attacks x defenses grid of cells, each cell's
statistics over seeds (``bench.stats.summary``: mean, sample std, 95 % t interval) and its DER.

DER is BackdoorBench's defense effectiveness rating (Wu et al., "BackdoorBench: A Comprehensive
Benchmark of Backdoor Learning", NeurIPS 2022 Datasets and Benchmarks, arXiv:2206.12654), computed
per seed by ``bench.stats.der`` against the same model before the defense (its ``none`` record, else
the record's ``backdoor`` metrics), then summarised over seeds like the other metrics. It lies in
[0, 1]: 0.5 changes nothing, 1 removes the backdoor at no cost in clean accuracy. It is undefined
where ASR is (the clean model, an unknown trigger). A defense's rank per attack is by mean DER
(1 = best, ties share the average rank); its mean rank is over the attacks where it has a DER.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.official import describe
from bench.report.records import before_metrics, model_key, with_backdoor_rows
from bench.report.render import METRICS, frac, ok, ordered, short, value
from bench.stats import der, summary

PARTIAL_MARK = "*"
AVERAGE_MARK = "†"
DEPARTURE_MARK = "‡"
DEPARTURE_NOTE = ("‡ (on CA) a cell run at settings that differ from the official ones (bench/official.py); "
                  "what differs, and its official value:")
PARTIAL_NOTE = "* some seeds of this cell failed; the value is over the others."
NONE_NOTE = "none: the backdoored model before any defense."
AVERAGE_NOTE = "† average over fewer attacks than the table has (the others failed or are missing)."
NO_ASR_NOTE = "{}: no trigger, so ASR and RA are not defined (-); left out of the Average row."
UNKNOWN_NOTE = "unknown: a checkpoint defended without --attack: its trigger is not known, so ASR and RA are not measured (-)."
DER_NOTE = ("DER: BackdoorBench's defense effectiveness rating (arXiv:2206.12654), "
            "[max(0, ASR before - ASR after) - max(0, CA before - CA after) + 1] / 2 per seed against the same model "
            "before the defense, mean over seeds; 0.5 changes nothing, 1 removes the backdoor at no cost. "
            "Rank: the defense's mean rank by DER over the attacks (1 = best).")


@dataclass
class TableCell:
    """One (dataset, model, attack, defense) over its seeds; values in percent, DER as a fraction."""

    n_ok: int = 0
    n_failed: int = 0
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    ders: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    departures: dict[str, dict] = field(default_factory=dict)  # describe(departure) -> departure, over its seeds

    def stats(self, m: str) -> dict:
        """``bench.stats.summary`` of a metric (``"der"`` included) over the seeds."""
        return summary(self.ders if m == "der" else self.values[m])

    def mean(self, m: str) -> float | None:
        return self.stats(m)["mean"]

    def std(self, m: str) -> float | None:
        """The sample std; None with fewer than two seeds."""
        s = self.stats(m)
        return s["std"] if s["n"] > 1 else None

    def text(self, m: str, pm: str = " ± ") -> str:
        s = self.stats(m)
        if s["mean"] is None:
            return "failed" if self.n_failed else "-"
        digits = 3 if m == "der" else 2
        t = f"{s['mean']:.{digits}f}" if s["n"] < 2 else f"{s['mean']:.{digits}f}{pm}{s['std']:.{digits}f}"
        return t + (PARTIAL_MARK if self.n_failed else "") + (DEPARTURE_MARK if self.departures and m == "ca" else "")


@dataclass
class Table:
    """A paper-style table for one (dataset, model)."""

    dataset: str
    model: str
    attacks: list[str]
    defenses: list[str]
    cells: dict[tuple[str, str], TableCell]
    max_seeds: int
    none_from_backdoor: bool = False
    no_asr: list[str] = field(default_factory=list)  # rows without a trigger (clean): not averaged

    def cell(self, attack: str, defense: str) -> TableCell | None:
        return self.cells.get((attack, defense))

    @property
    def averaged(self) -> list[str]:
        """The rows the Average row is over: every attack with a trigger."""
        return [a for a in self.attacks if a not in self.no_asr]

    @property
    def defended(self) -> list[str]:
        """The defenses proper (not ``none``)."""
        return [d for d in self.defenses if d != "none"]

    def average(self, defense: str, m: str) -> tuple[float | None, int, bool]:
        """(mean over attacks of the cell means, attacks used, whether any cell failed entirely); m may be "der"."""
        means, failed = [], False
        for a in self.averaged:
            c = self.cells.get((a, defense))
            mu = c.mean(m) if c else None
            if mu is not None:
                means.append(mu)
            elif c is not None and c.n_failed:
                failed = True
        return (sum(means) / len(means) if means else None), len(means), failed

    def average_text(self, defense: str, m: str) -> str:
        mu, n, failed = self.average(defense, m)
        if mu is None:
            return "failed" if failed else "-"
        return f"{mu:.{3 if m == 'der' else 2}f}" + (AVERAGE_MARK if n < len(self.averaged) else "")

    def ranks(self) -> dict[str, tuple[float | None, int]]:
        """{defense: (mean rank by DER over the attacks, attacks ranked)}; rank 1 is the best DER of an attack."""
        got: dict[str, list[float]] = {d: [] for d in self.defended}
        for a in self.averaged:
            scores = {d: c.mean("der") for d in self.defended if (c := self.cells.get((a, d))) and c.mean("der") is not None}
            for d, s in scores.items():  # average rank among ties: 1 + (#better) + (#equal - 1) / 2
                better = sum(o > s for o in scores.values())
                equal = sum(o == s for o in scores.values())
                got[d].append(1 + better + (equal - 1) / 2)
        return {d: ((sum(r) / len(r)) if r else None, len(r)) for d, r in got.items()}

    def rows(self, pm: str = " ± ") -> list[tuple[str, list[str]]]:
        """``(row label, [cell texts in defense-major, CA/ASR/RA order])``, Average last."""
        out = []
        for a in self.attacks:
            texts = []
            for d in self.defenses:
                c = self.cells.get((a, d))
                texts += [c.text(m, pm) if c else "-" for m in METRICS]
            out.append((a, texts))
        out.append(("Average", [self.average_text(d, m) for d in self.defenses for m in METRICS]))
        return out

    def notes(self) -> list[str]:
        flat = [t for _, texts in self.rows() for t in texts]
        notes = [NONE_NOTE] if self.none_from_backdoor else []
        if self.no_asr:
            known = [a for a in self.no_asr if a != "unknown"]
            if known:
                notes.append(NO_ASR_NOTE.format(", ".join(known)))
            if "unknown" in self.no_asr:
                notes.append(UNKNOWN_NOTE)
        if any(t.endswith(PARTIAL_MARK) for t in flat):
            notes.append(PARTIAL_NOTE)
        if any(t.endswith(AVERAGE_MARK) for t in flat):
            notes.append(AVERAGE_NOTE)
        notes += [f"failed: {a} / {d}: {short(c.errors[0])}" for (a, d), c in self.cells.items() if c.errors and not c.n_ok]
        return notes + self.departure_notes()

    def departure_notes(self) -> list[str]:
        """What the marked cells depart in, grouped: the departures every cell shares, then those of whole
        attack rows, of whole defense columns, and the rest by cell. [] when every cell is at official settings."""
        where: dict[str, set[tuple[str, str]]] = {}
        for key, c in self.cells.items():
            for text in c.departures:
                where.setdefault(text, set()).add(key)
        if not where:
            return []
        every = set(self.cells)
        groups: dict[str, list[str]] = {}
        for text, keys in where.items():
            rows, cols = {a for a, _ in keys}, {d for _, d in keys}
            if keys == every:
                label = "every cell"
            elif len(rows) == 1 and keys == {k for k in every if k[0] in rows}:
                label = f"attack {next(iter(rows))}"
            elif len(cols) == 1 and keys == {k for k in every if k[1] in cols}:
                label = f"defense {next(iter(cols))}"
            else:
                label = "cells " + ", ".join(f"{a} / {d}" for a, d in sorted(keys))
            groups.setdefault(label, []).append(text)
        order = sorted(groups, key=lambda g: (g != "every cell", not g.startswith("attack"), not g.startswith("defense"), g))
        return [DEPARTURE_NOTE] + [f"{g}: {'; '.join(groups[g])}" for g in order]


def build_tables(records: list[dict], backdoor: bool = True) -> list[Table]:
    """Group records into one ``Table`` per (dataset, model), in order of first appearance.

    ``backdoor``: fill the ``none`` column from the records' ``backdoor`` metrics where
    no ``none`` record exists (see ``with_backdoor_rows``).
    """
    before = before_metrics(records)
    if backdoor:
        records = with_backdoor_rows(records)
    tables = []
    for ds, mo in ordered((r["dataset"], r["model"]) for r in records):
        group = [r for r in records if r["dataset"] == ds and r["model"] == mo]
        attacks = ordered(str(r["attack"]) for r in group)
        defenses = ordered(str(r["defense"]) for r in group)
        if "none" in defenses:
            defenses.remove("none")
            defenses.insert(0, "none")
        cells: dict[tuple[str, str], TableCell] = {}
        seeds: dict[tuple[str, str], set] = {}
        for r in group:
            key = (str(r["attack"]), str(r["defense"]))
            c = cells.setdefault(key, TableCell())
            seeds.setdefault(key, set()).add(r["seed"])
            for d in r.get("departures") or []:
                if isinstance(d, dict) and "field" in d:
                    c.departures.setdefault(describe(d), d)
            if ok(r):
                c.n_ok += 1
                for m in METRICS:
                    v = value(r["metrics"], m)
                    if v is not None:
                        c.values[m].append(v)
                b = before.get(model_key(r))
                if r["defense"] != "none" and b is not None:
                    d = der({m: frac(b, m) for m in ("ca", "asr")}, {m: frac(r["metrics"], m) for m in ("ca", "asr")})
                    if d is not None:
                        c.ders.append(d)
            else:
                c.n_failed += 1
                if r.get("error"):
                    c.errors.append(str(r["error"]).splitlines()[0])
        tables.append(Table(str(ds), str(mo), attacks, defenses, cells, max((len(s) for s in seeds.values()), default=0),
                            none_from_backdoor=any(r.get("from_backdoor") for r in group), no_asr=no_asr(group)))
    return tables


def no_asr(records: list[dict]) -> list[str]:
    """Attacks with finished records and no ASR in any of them (``clean``: no trigger), in order."""
    finished = ordered(str(r["attack"]) for r in records if ok(r))
    with_asr = {str(r["attack"]) for r in records if ok(r) and value(r["metrics"], "asr") is not None}
    return [a for a in finished if a not in with_asr]


def title(t: Table) -> str:
    seeds = f"mean ± std over up to {t.max_seeds} seeds" if t.max_seeds > 1 else "one seed"
    return f"{t.dataset} / {t.model}: CA, ASR, RA in % ({seeds})"
