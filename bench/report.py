"""Tables and plots of a run, always regenerated from ``RUN_DIR/records.jsonl``.

``write_reports(run_dir)`` writes into ``RUN_DIR/report/``:

- ``table.md``, ``table.csv``, ``table.tex``: one paper-style table per (dataset, model).
  Rows are the attacks plus an ``Average`` row; column groups are the defenses (in the
  order they first appear, ``none`` first), each with CA, ASR and RA in percent.
  A cell shows ``mean ± std`` over seeds (sample std, ddof=1) when it has several,
  the plain value otherwise, ``failed`` when every seed failed, ``-`` when it is
  missing. ``*`` marks a cell where some seeds failed (the value is over the others);
  ``†`` marks an Average over fewer attacks than the table has (some failed or missing).
  When a (dataset, model, attack, seed) has no ``none`` record, its ``none`` column is
  filled from the records' ``backdoor`` metrics: the same model before the defense.
  A row whose finished cells have no ASR at all (the ``clean`` model: no trigger, so ASR
  and RA are ``null`` in its records) shows "-" there, never 0, and is left out of the
  Average row (all three metrics: the Average summarises attacks), with a note.
  The CSV is the tidy long form of the same numbers (percent), Average rows included.
- ``ca_vs_asr.png``, ``asr_before_after.png``, ``rnp_curve.png`` (the harness's oracle
  view of a defense's threshold sweep, on the test set), ``gallery.png`` (clean and
  triggered examples from ``RUN_DIR/examples/``). A plot without data is skipped, and a
  stale copy of it from an earlier report is removed.
- ``compare.md`` when some cells match a published reference table (``results/reference``).
- ``detection.md``, ``detection.csv``, ``detection.tex`` and ``roc.png`` when the run has a
  detection track (``--detect``; ``bench.report_detect``).

Plots use matplotlib's object API on an Agg canvas: no pyplot, no global backend switch.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bench.registry import BenchError
from bench.report_style import figure, save_png, series_style, tex_escape
from bench.store import atomic_write_text

METRICS = ("ca", "asr", "ra")
LABELS = {"ca": "CA", "asr": "ASR", "ra": "RA"}
REQUIRED = ("dataset", "model", "attack", "defense", "seed", "status")
PARTIAL_MARK = "*"
AVERAGE_MARK = "†"
PARTIAL_NOTE = "* some seeds of this cell failed; the value is over the others."
NONE_NOTE = "none: the backdoored model before any defense."
AVERAGE_NOTE = "† average over fewer attacks than the table has (the others failed or are missing)."
NO_ASR_NOTE = "{}: no trigger, so ASR and RA are not defined (-); left out of the Average row."
UNKNOWN_NOTE = "unknown: a checkpoint defended without --attack: its trigger is not known, so ASR and RA are not measured (-)."
PLOTS = ("ca_vs_asr.png", "asr_before_after.png", "rnp_curve.png", "gallery.png")
REFERENCE_DIR = Path(__file__).resolve().parents[1] / "results" / "reference"


# ---------------------------------------------------------------- reading records


def records_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "records.jsonl"


def load_records(run_dir: str | Path) -> list[dict]:
    """Parse ``RUN_DIR/records.jsonl``; later records of the same cell replace earlier ones.

    Raises:
        BenchError: the file is missing or has no records (naming the path), or a line
            is not a JSON object with the required keys (naming the line number).
    """
    path = records_path(run_dir)
    if not path.is_file():
        raise BenchError(f"no records at {path}: run `bench run` first, or pass the folder of a finished run")
    by_key: dict[tuple, dict] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{path}: line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise BenchError(f"{path}: line {lineno} is not a JSON object")
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                raise BenchError(f"{path}: line {lineno} lacks {', '.join(missing)}")
            for k in ("metrics", "backdoor", "info", "seconds"):
                if rec.get(k) is not None and not isinstance(rec[k], dict):
                    raise BenchError(f"{path}: line {lineno}: {k!r} must be an object or null")
            key = _cell_key(rec)
            by_key.pop(key, None)  # a rerun's record replaces the old one, at the end
            by_key[key] = rec
    if not by_key:
        raise BenchError(f"{path} holds no records")
    return list(by_key.values())


def _cell_key(rec: dict) -> tuple:
    return (rec["dataset"], rec["model"], rec["attack"], rec["defense"], rec["seed"])


def _ok(rec: dict) -> bool:
    return rec.get("status") == "ok" and isinstance(rec.get("metrics"), dict)


def _value(d: dict | None, metric: str) -> float | None:
    """A metric as a percentage, or None when absent or not a finite number."""
    if not isinstance(d, dict):
        return None
    v = d.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return 100.0 * float(v)


def with_backdoor_rows(records: list[dict]) -> list[dict]:
    """Add a ``none`` record (from ``backdoor``) for each seed cell that has no ``none`` record."""
    have = {(r["dataset"], r["model"], r["attack"], r["seed"]) for r in records if r["defense"] == "none"}
    extra: dict[tuple, dict] = {}
    for r in records:
        key = (r["dataset"], r["model"], r["attack"], r["seed"])
        if key in have or key in extra or not isinstance(r.get("backdoor"), dict):
            continue
        extra[key] = {"dataset": key[0], "model": key[1], "attack": key[2], "defense": "none", "seed": key[3],
                      "status": "ok", "error": None, "metrics": r["backdoor"], "from_backdoor": True}
    return list(extra.values()) + records


# ---------------------------------------------------------------- the table model


@dataclass
class TableCell:
    """One (dataset, model, attack, defense) over its seeds; values in percent."""

    n_ok: int = 0
    n_failed: int = 0
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    errors: list[str] = field(default_factory=list)

    def mean(self, m: str) -> float | None:
        v = self.values[m]
        return sum(v) / len(v) if v else None

    def std(self, m: str) -> float | None:
        v = self.values[m]
        if len(v) < 2:
            return None
        mu = sum(v) / len(v)
        return math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1))

    def text(self, m: str, pm: str = " ± ") -> str:
        mu = self.mean(m)
        if mu is None:
            return "failed" if self.n_failed else "-"
        sd = self.std(m)
        s = f"{mu:.2f}" if sd is None else f"{mu:.2f}{pm}{sd:.2f}"
        return s + (PARTIAL_MARK if self.n_failed else "")


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

    def average(self, defense: str, m: str) -> tuple[float | None, int, bool]:
        """(mean over attacks of the cell means, attacks used, whether any cell failed entirely)."""
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
        return f"{mu:.2f}" + (AVERAGE_MARK if n < len(self.averaged) else "")

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
        notes += [f"failed: {a} / {d}: {_short(c.errors[0])}" for (a, d), c in self.cells.items() if c.errors and not c.n_ok]
        return notes


def _short(s: str, n: int = 160) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _ordered(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for x in items:
        seen.setdefault(x, None)
    return list(seen)


def build_tables(records: list[dict], backdoor: bool = True) -> list[Table]:
    """Group records into one ``Table`` per (dataset, model), in order of first appearance.

    ``backdoor``: fill the ``none`` column from the records' ``backdoor`` metrics where
    no ``none`` record exists (see ``with_backdoor_rows``).
    """
    if backdoor:
        records = with_backdoor_rows(records)
    tables = []
    for ds, mo in _ordered((r["dataset"], r["model"]) for r in records):  # type: ignore[misc]
        group = [r for r in records if r["dataset"] == ds and r["model"] == mo]
        attacks = _ordered(str(r["attack"]) for r in group)
        defenses = _ordered(str(r["defense"]) for r in group)
        if "none" in defenses:
            defenses.remove("none")
            defenses.insert(0, "none")
        cells: dict[tuple[str, str], TableCell] = {}
        seeds: dict[tuple[str, str], set] = {}
        for r in group:
            key = (str(r["attack"]), str(r["defense"]))
            c = cells.setdefault(key, TableCell())
            seeds.setdefault(key, set()).add(r["seed"])
            if _ok(r):
                c.n_ok += 1
                for m in METRICS:
                    v = _value(r["metrics"], m)
                    if v is not None:
                        c.values[m].append(v)
            else:
                c.n_failed += 1
                if r.get("error"):
                    c.errors.append(str(r["error"]).splitlines()[0])
        tables.append(Table(str(ds), str(mo), attacks, defenses, cells, max((len(s) for s in seeds.values()), default=0),
                            none_from_backdoor=any(r.get("from_backdoor") for r in group), no_asr=_no_asr(group)))
    return tables


def _no_asr(records: list[dict]) -> list[str]:
    """Attacks with finished records and no ASR in any of them (``clean``: no trigger), in order."""
    finished = _ordered(str(r["attack"]) for r in records if _ok(r))
    with_asr = {str(r["attack"]) for r in records if _ok(r) and _value(r["metrics"], "asr") is not None}
    return [a for a in finished if a not in with_asr]


def _title(t: Table) -> str:
    seeds = f"mean ± std over up to {t.max_seeds} seeds" if t.max_seeds > 1 else "one seed"
    return f"{t.dataset} / {t.model}: CA, ASR, RA in % ({seeds})"


# ---------------------------------------------------------------- Markdown, CSV, LaTeX


def markdown_table(records: list[dict]) -> str:
    """The Markdown tables (one per dataset and model) of ``records``."""
    parts = []
    for t in build_tables(records):
        head = ["Attack"] + [f"{d} {LABELS[m]}" for d in t.defenses for m in METRICS]
        lines = [f"### {_title(t)}", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        for label, texts in t.rows():
            label = "**Average**" if label == "Average" else _md_escape(label)
            lines.append("| " + " | ".join([label] + texts) + " |")
        notes = t.notes()
        if notes:
            lines += [""] + ["- " + _md_escape(n).replace("*", "\\*") for n in notes]
        parts.append("\n".join(lines))
    timing = timing_markdown(records)
    return "\n\n".join(parts + ([timing] if timing else [])) + "\n"


def timing_markdown(records: list[dict]) -> str:
    """Seconds per defense over the finished cells: the median defense time, and the median and
    largest ratio of defense time to the training time of the model it defended (both read from
    the records, as every other number here)."""
    by_def: dict[str, list[tuple[float, float | None]]] = {}
    for r in records:
        sec = r.get("seconds") or {}
        if not _ok(r) or not isinstance(sec.get("defense"), (int, float)):
            continue
        train_s = sec.get("train") if isinstance(sec.get("train"), (int, float)) and sec.get("train") > 0 else None
        by_def.setdefault(str(r["defense"]), []).append((float(sec["defense"]), train_s))
    if not by_def:
        return ""
    lines = ["### Seconds", "", "| defense | cells | median s | median s / training | max s / training |", "|---|---:|---:|---:|---:|"]
    for d in _ordered(by_def):
        secs = sorted(s for s, _ in by_def[d])
        ratios = sorted(s / t for s, t in by_def[d] if t)
        med = lambda v: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # noqa: E731
        rtxt = (f"{med(ratios):.2f} | {ratios[-1]:.2f}") if ratios else "- | -"
        lines.append(f"| {_md_escape(d)} | {len(secs)} | {med(secs):.1f} | {rtxt} |")
    trains = sorted({(str(r.get("dataset")), str(r.get("model")), str(r.get("attack")), r.get("seed")): r["seconds"]["train"]
                     for r in records if _ok(r) and isinstance((r.get("seconds") or {}).get("train"), (int, float))}.items(),
                    key=lambda kv: kv[1])
    if trains:
        lines += ["", f"Training time of the defended models: median {trains[(len(trains) - 1) // 2][1]:.0f} s over "
                      f"{len(trains)} models (min {trains[0][1]:.0f} s, max {trains[-1][1]:.0f} s)."]
    return "\n".join(lines)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


CSV_COLUMNS = ["dataset", "model", "attack", "defense", "n_seeds", "n_failed"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]


def csv_rows(records: list[dict]) -> list[dict[str, Any]]:
    """The tidy long form: one row per (dataset, model, attack, defense), plus Average rows.

    Values in percent; std empty for a single seed; Average rows leave n_seeds,
    n_failed and the stds empty.
    """
    rows: list[dict[str, Any]] = []
    for t in build_tables(records):
        for a in t.attacks:
            for d in t.defenses:
                c = t.cell(a, d)
                if c is None:
                    continue
                row: dict[str, Any] = {"dataset": t.dataset, "model": t.model, "attack": a, "defense": d,
                                       "n_seeds": c.n_ok, "n_failed": c.n_failed}
                for m in METRICS:
                    row[f"{m}_mean"], row[f"{m}_std"] = _round(c.mean(m)), _round(c.std(m))
                rows.append(row)
        for d in t.defenses:
            row = {"dataset": t.dataset, "model": t.model, "attack": "Average", "defense": d, "n_seeds": None, "n_failed": None}
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_std"] = _round(t.average(d, m)[0]), None
            rows.append(row)
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def csv_text(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in csv_rows(records):
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _tex_cell(text: str) -> str:
    if text == "-":
        return "--"
    text = text.replace(AVERAGE_MARK, r"$^\dagger$").replace(PARTIAL_MARK, r"$^*$")
    return text.replace(" ± ", r" $\pm$ ")


def latex_table(records: list[dict]) -> str:
    """booktabs tabulars (needs ``\\usepackage{booktabs}``), one per dataset and model."""
    parts = []
    for t in build_tables(records):
        k = len(t.defenses)
        lines = [f"% {_title(t)}", r"\begin{tabular}{l" + " ccc" * k + "}", r"\toprule"]
        lines.append(" & " + " & ".join(rf"\multicolumn{{3}}{{c}}{{{tex_escape(d)}}}" for d in t.defenses) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(k)))
        lines.append("Attack & " + " & ".join(LABELS[m] for _ in t.defenses for m in METRICS) + r" \\")
        lines.append(r"\midrule")
        for label, texts in t.rows():
            if label == "Average":
                lines.append(r"\midrule")
            lines.append(" & ".join([tex_escape(label)] + [_tex_cell(x) for x in texts]) + r" \\")
        lines.append(r"\bottomrule")
        for note in t.notes():
            note = tex_escape(note).replace(AVERAGE_MARK, r"$^\dagger$").replace(PARTIAL_MARK, r"$^*$", 1)
            lines.append(rf"\multicolumn{{{1 + 3 * k}}}{{l}}{{\footnotesize {note}}} \\")
        lines.append(r"\end{tabular}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- plots


BACKDOOR_STYLE = {"color": "0.25", "marker": "x"}


def _backdoor_points(records: list[dict]) -> dict[tuple, dict]:
    """(dataset, model, attack, seed) -> backdoored metrics, from ``backdoor`` or ``none`` records."""
    out: dict[tuple, dict] = {}
    for r in records:
        key = (r["dataset"], r["model"], r["attack"], r["seed"])
        if isinstance(r.get("backdoor"), dict) and _value(r["backdoor"], "asr") is not None:
            out.setdefault(key, r["backdoor"])
    for r in records:
        key = (r["dataset"], r["model"], r["attack"], r["seed"])
        if r["defense"] == "none" and _ok(r) and _value(r["metrics"], "asr") is not None:  # not the clean model
            out.setdefault(key, r["metrics"])
    return out


def _defenses(records: list[dict]) -> list[str]:
    return [d for d in _ordered(str(r["defense"]) for r in records) if d != "none"]


def plot_ca_vs_asr(records: list[dict], path: Path) -> Path | None:
    """CA against ASR: one point per (attack, seed) cell, a colour and marker per defense."""
    bd = _backdoor_points(records)
    defended = [r for r in records if r["defense"] != "none" and _ok(r)
                and _value(r["metrics"], "ca") is not None and _value(r["metrics"], "asr") is not None]
    groups = _ordered([(k[0], k[1]) for k in bd] + [(r["dataset"], r["model"]) for r in defended])
    if not groups:
        return None
    defenses = _defenses(records)
    fig, axes = figure(len(groups), 3, 5.2, 4.4)
    for ax, (ds, mo) in zip(axes, groups):
        pts = {k: v for k, v in bd.items() if k[:2] == (ds, mo)}
        for r in defended:  # thin lines from each backdoored model to its defended versions
            k = (r["dataset"], r["model"], r["attack"], r["seed"])
            if k[:2] == (ds, mo) and k in pts:
                ax.plot([_value(pts[k], "asr"), _value(r["metrics"], "asr")], [_value(pts[k], "ca"), _value(r["metrics"], "ca")],
                        color="0.8", lw=0.7, zorder=1)
        if pts:
            ax.scatter([_value(v, "asr") for v in pts.values()], [_value(v, "ca") for v in pts.values()], s=45,
                       label="backdoored (no defense)", zorder=3, **BACKDOOR_STYLE)
        for i, d in enumerate(defenses):
            rs = [r for r in defended if r["defense"] == d and (r["dataset"], r["model"]) == (ds, mo)]
            if rs:
                st = series_style(i)
                ax.scatter([_value(r["metrics"], "asr") for r in rs], [_value(r["metrics"], "ca") for r in rs], s=40,
                           c=[st["color"]], marker=st["marker"], edgecolors="white", linewidths=0.5, label=d, zorder=4)
        ax.set(xlabel="ASR (%)", ylabel="CA (%)", title=f"{ds} / {mo}", xlim=(-4, 104))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Clean accuracy vs attack success rate (top left is best)\none point per attack and seed; grey lines join a model before and after")
    return save_png(fig, path)


def plot_asr_before_after(records: list[dict], path: Path) -> Path | None:
    """Grouped bars per attack: ASR of the backdoored model, then after each defense (mean ± std)."""
    bd = _backdoor_points(records)
    defenses = _defenses(records)
    groups = _ordered([(k[0], k[1]) for k in bd] + [(r["dataset"], r["model"]) for r in records if r["defense"] != "none"])
    series_per_group = []
    for ds, mo in groups:
        mine = [r for r in records if (r["dataset"], r["model"]) == (ds, mo)]
        skip = set(_no_asr(mine))  # no trigger (clean): no ASR bar to draw
        attacks = [a for a in _ordered(str(r["attack"]) for r in mine) if a not in skip]
        series: list[tuple[str, dict, dict[str, list[float]], dict[str, int]]] = []
        vals: dict[str, list[float]] = {a: [] for a in attacks}
        for k, v in bd.items():
            if k[:2] == (ds, mo):
                vals[str(k[2])].append(_value(v, "asr"))  # type: ignore[arg-type]
        series.append(("backdoored", BACKDOOR_STYLE, vals, {}))
        for i, d in enumerate(defenses):
            vals, failed = {a: [] for a in attacks}, {a: 0 for a in attacks}
            for r in records:
                if (r["dataset"], r["model"], r["defense"]) != (ds, mo, d) or str(r["attack"]) in skip:
                    continue
                v = _value(r.get("metrics"), "asr") if _ok(r) else None
                if not _ok(r):
                    failed[str(r["attack"])] += 1
                elif v is not None:
                    vals[str(r["attack"])].append(v)
            if any(vals.values()) or any(failed.values()):
                series.append((d, series_style(i), vals, failed))
        if any(v for _, _, vals, _ in series for v in vals.values()):
            series_per_group.append(((ds, mo), attacks, series))
    if not series_per_group:
        return None
    fig, axes = figure(len(series_per_group), 2, 1.0 + 1.1 * max(len(a) for _, a, _ in series_per_group), 4.0)
    for ax, ((ds, mo), attacks, series) in zip(axes, series_per_group):
        width = 0.8 / len(series)
        for j, (name, st, vals, failed) in enumerate(series):
            xs, hs, dots = [], [], []
            for i, a in enumerate(attacks):
                x = i - 0.4 + width * (j + 0.5)
                if vals[a]:
                    xs.append(x), hs.append(sum(vals[a]) / len(vals[a]))
                    if len(vals[a]) > 1:  # with few seeds, the seeds themselves say more than a std
                        dots += [(x, v) for v in vals[a]]
                elif failed.get(a):
                    ax.text(x, 1, "failed", rotation=90, ha="center", va="bottom", fontsize=8, color=st["color"])
            ax.bar(xs, hs, width * 0.95, color=st["color"], label=name,
                   edgecolor="black" if name == "backdoored" else None, linewidth=0.5)
            if dots:
                ax.scatter(*zip(*dots), s=12, color="white", edgecolors="black", linewidths=0.7, zorder=3,
                           label="one seed")
        ax.set_xticks(range(len(attacks)), attacks, rotation=20 if len(attacks) > 4 else 0)
        ax.set(ylabel="ASR (%)", ylim=(0, 105), xlim=(-0.55, len(attacks) - 0.45), title=f"{ds} / {mo}")
        ax.grid(axis="y", alpha=0.3)
    handles = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    names = _ordered(name for _, _, series in series_per_group for name, _, _, _ in series) + (["one seed"] if "one seed" in handles else [])
    fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
               loc="outside lower center", ncols=min(6, len(names)), fontsize=9)
    several = "one seed" in names
    fig.suptitle("Attack success rate before and after each defense" + (" (bars: mean over seeds)" if several else ""))
    return save_png(fig, path)


def plot_oracle_curves(records: list[dict], path: Path) -> Path | None:
    """CA and ASR over a defense's threshold sweep (``info.oracle_curve``), the chosen threshold marked."""
    rs = [r for r in records if isinstance(r.get("info"), dict) and isinstance(r["info"].get("oracle_curve"), list)
          and any(isinstance(p, dict) and "threshold" in p for p in r["info"]["oracle_curve"])]
    if not rs:
        return None
    panels = _ordered((r["dataset"], r["model"], r["defense"], r["attack"]) for r in rs)
    fig, axes = figure(len(panels), 3, 4.6, 3.6)
    multi = len({(p[0], p[1], p[2]) for p in panels}) > 1
    for ax, (ds, mo, de, at) in zip(axes, panels):
        mine = [r for r in rs if (r["dataset"], r["model"], r["defense"], r["attack"]) == (ds, mo, de, at)]
        for k, r in enumerate(mine):
            pts = sorted((p for p in r["info"]["oracle_curve"] if isinstance(p, dict) and isinstance(p.get("threshold"), (int, float))),
                         key=lambda p: p["threshold"])
            th = [p["threshold"] for p in pts]
            first = k == 0
            ax.plot(th, [_value(p, "ca") for p in pts], color="tab:blue", marker=".", lw=1.3, label="CA" if first else None)
            if any(_value(p, "asr") is not None for p in pts):  # none for the clean model (no trigger)
                ax.plot(th, [_value(p, "asr") for p in pts], color="tab:red", marker=".", lw=1.3, ls="--",
                        label="ASR" if first else None)
            if any(_value(p, "ra") is not None for p in pts):
                ax.plot(th, [_value(p, "ra") for p in pts], color="tab:green", lw=1.0, ls=":", label="RA" if first else None)
            chosen = r["info"].get("threshold")
            if isinstance(chosen, (int, float)) and not isinstance(chosen, bool):
                ax.axvline(chosen, color="0.3", lw=1.0, ls="-.", label="chosen threshold" if first else None)
        ax.set(xlabel="mask threshold", ylabel="%", ylim=(-3, 103),
               title=f"{at} ({ds} / {mo}, {de})" if multi else f"{at}" + (f" ({len(mine)} seeds)" if len(mine) > 1 else ""))
        ax.grid(alpha=0.3)
    legend = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}  # a clean panel has no ASR line
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend), fontsize=9)
    name = ", ".join(_ordered(p[2] for p in panels))
    where = "" if multi else f" on {panels[0][0]} / {panels[0][1]}"
    sizes = {tuple(r["info"]["oracle_curve_images"]) for r in rs if isinstance(r["info"].get("oracle_curve_images"), list)}
    on = f"test subset of {sizes.pop()[0]:,} clean images" if len(sizes) == 1 else "test set"
    fig.suptitle(f"{name} pruning sweep{where}: oracle view ({on})\n"
                 "the defense chose its threshold from its own clean data, not from these curves")
    return save_png(fig, path)


def plot_gallery(run_dir: Path, records: list[dict], path: Path) -> Path | None:
    """A clean and a triggered example per attack from ``examples/``, and their amplified difference."""
    files = sorted((run_dir / "examples").glob("*.safetensors"))
    if not files:
        return None
    from bench.store import load_tensors

    order = {a: i for i, a in enumerate(_ordered(str(r["attack"]) for r in records))}
    dorder = {d: i for i, d in enumerate(_ordered(str(r["dataset"]) for r in records))}
    items = []
    for f in files:
        ds, _, attack = f.stem.partition("-")
        try:
            t = load_tensors(f)
            clean, trig = t["clean"], t["triggered"]
            if clean.ndim != 3 or clean.shape != trig.shape:
                raise ValueError(f"shapes {tuple(clean.shape)} and {tuple(trig.shape)}")
        except Exception as exc:  # one bad example never spoils the report
            warnings.warn(f"gallery: skipping {f}: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        items.append((dorder.get(ds, len(dorder)), ds, order.get(attack, len(order)), attack or ds, clean, trig))
    if not items:
        return None
    items.sort(key=lambda it: (it[0], it[1], it[2], it[3]))
    several = len({it[1] for it in items}) > 1
    reversed_ = _reversed_triggers(run_dir, records)
    from matplotlib.figure import Figure

    n = len(items)
    rows = 4 if reversed_ else 3
    fig = Figure(figsize=(1.55 * n + 0.9, 1.65 * rows + 0.1), layout="constrained")
    axes = fig.subplots(rows, n, squeeze=False)
    for j, (_, ds, _, attack, clean, trig) in enumerate(items):
        if reversed_:
            ax = axes[3, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel("NC reversed\n(mask x pattern)", fontsize=9)
            got = reversed_.get((ds, attack))
            if got is None:
                ax.set_axis_off()
            else:
                img, caption = got
                ax.imshow(img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy(),
                          cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
                ax.set_xlabel(caption, fontsize=7)
        diff = (trig.int() - clean.int()).abs().amax(0).float()
        scale = 255.0 / max(float(diff.max()), 1.0)
        for i, (img, label) in enumerate(((clean, "clean"), (trig, "triggered"), (None, "|difference|\n(amplified)"))):
            ax = axes[i, j]
            if img is None:
                ax.imshow((diff * scale).numpy(), cmap="magma", vmin=0, vmax=255, interpolation="nearest")
                ax.set_xlabel(f"x{scale:.0f}", fontsize=8)
            elif img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{attack}\n({ds})" if several else attack, fontsize=9)
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle("Trigger gallery" + ("" if several else f" ({items[0][1]})"))
    return save_png(fig, path)


def _reversed_triggers(run_dir: Path, records: list[dict]) -> dict[tuple[str, str], tuple]:
    """{(dataset, attack): (mask x pattern image, caption)} from NC's saved triggers, lowest seed first.

    The label shown is the one with the smallest mask norm (NC's most suspicious label); the
    caption says whether NC flagged it.
    """
    from bench.store import load_tensors

    out: dict[tuple[str, str], tuple] = {}
    for r in sorted(records, key=lambda r: r.get("seed", 0)):
        rel = (r.get("info") or {}).get("tensors_file") if r.get("defense") == "nc" and _ok(r) else None
        key = (str(r["dataset"]), str(r["attack"]))
        if not rel or key in out or not (run_dir / rel).is_file():
            continue
        try:
            t = load_tensors(run_dir / rel)
            k = int(t["norms"].argmin())
            label, flagged = int(t["labels"][k]), bool(t["flagged"][k])
            out[key] = ((t["masks"][k] * t["patterns"][k]).float().clamp(0, 1),
                        f"label {label}, |m| {float(t['norms'][k]):.0f}" + (", flagged" if flagged else ""))
        except Exception as exc:  # one bad file never spoils the report
            warnings.warn(f"gallery: skipping {rel}: {type(exc).__name__}: {exc}", stacklevel=2)
    return out


# ---------------------------------------------------------------- published reference numbers


@dataclass
class ReferenceTable:
    """A published table from ``results/reference/<name>.csv``: its source lines and rows."""

    name: str
    source: list[str]
    columns: list[str]
    rows: list[dict[str, str]]

    def markdown(self) -> str:
        lines = [f"> {s}" for s in self.source] + ["", "| " + " | ".join(self.columns) + " |",
                                                     "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(r[c] for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def reference_names() -> list[str]:
    return sorted(p.stem for p in REFERENCE_DIR.glob("*.csv"))


def reference_table(name: str) -> ReferenceTable:
    """Load a published reference table by file stem; ``#`` lines are its source and setting."""
    path = REFERENCE_DIR / f"{name}.csv"
    if not path.is_file():
        raise BenchError(f"no reference table {name!r} under {REFERENCE_DIR}; known: {', '.join(reference_names()) or 'none'}")
    lines = path.read_text(encoding="utf-8").splitlines()
    source = [ln.lstrip("#").strip() for ln in lines if ln.startswith("#")]
    reader = csv.DictReader([ln for ln in lines if ln.strip() and not ln.startswith("#")])
    return ReferenceTable(name, source, list(reader.fieldnames or []), list(reader))


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# Published leaderboards by our dataset name: BackdoorBench, PreAct-ResNet18, 10 % poisoning.
LEADERBOARDS = {"cifar10": "backdoorbench_leaderboard_cifar10_preactresnet18_p0.1",
                "gtsrb": "backdoorbench_leaderboard_gtsrb_preactresnet18_p0.1"}
LEADERBOARD = LEADERBOARDS["cifar10"]
RNP_LOG = "rnp_official_log_badnets_cifar10"
# BackdoorBench's attack names -> ours (after _norm); defenses match after _norm (i-BAU -> ibau).
ATTACK_ALIASES = {"badnet": "badnets", "blended": "blend", "inputaware": "iad", "trojannn": "trojan",
                  "lowfrequency": "lf", "labelconsistent": "lc"}
REMOVED = 20.0  # "removes the backdoor": ASR after the defense <= 20 % (the bar)
NOT_IMPLANTED = "not implanted"  # the backdoored model's own ASR is <= REMOVED: nothing to remove


def _direction(asr: float | None) -> str:
    return "-" if asr is None else ("removes" if asr <= REMOVED else "keeps")


def compare_markdown(records: list[dict]) -> str:
    """Our numbers beside published ones where the (dataset, attack, defense) match; "" if none do.

    The settings differ (model, width, epochs, defense data, trigger details): the published
    source and setting lines are quoted with each table, and the "direction" columns say
    whether each side removes the backdoor (ASR <= 20 %), which is what should agree.
    """
    parts = []
    names = set(reference_names())
    for dataset, board in LEADERBOARDS.items():
        recs = [r for r in records if _norm(str(r["dataset"])) == dataset]
        if board not in names or not recs:
            continue
        ref = reference_table(board)
        pub = {(ATTACK_ALIASES.get(_norm(r["attack"]), _norm(r["attack"])), _norm(r["defense"])): r for r in ref.rows}
        lines, agree, total = [], 0, 0
        for t in build_tables(recs):
            for a in t.attacks:
                # An attack whose backdoored model has ASR <= REMOVED was never implanted on that side:
                # no defense can "remove" it, so those cells say so and stay out of the agreement count.
                none_ours, none_pub = t.cell(a, "none"), pub.get((_norm(a), "none"))
                weak_ours = none_ours is not None and _direction(none_ours.mean("asr")) == "removes"
                weak_pub = none_pub is not None and _direction(float(none_pub["asr_pct"])) == "removes"
                for d in t.defenses:
                    c, p = t.cell(a, d), pub.get((_norm(a), _norm(d)))
                    if c is None or p is None:
                        continue
                    ours = NOT_IMPLANTED if weak_ours else _direction(c.mean("asr"))
                    theirs = NOT_IMPLANTED if weak_pub else _direction(float(p["asr_pct"]))
                    undecided = d == "none" or "-" in (ours, theirs) or NOT_IMPLANTED in (ours, theirs)
                    same = "-" if undecided else ("yes" if ours == theirs else "no")
                    if same != "-":
                        total += 1
                        agree += same == "yes"
                    if d == "none":  # the backdoored model: no direction, unless the attack did not implant
                        ours, theirs = (NOT_IMPLANTED if weak_ours else "-"), (NOT_IMPLANTED if weak_pub else "-")
                    lines.append(f"| {t.model} | {a} | {d} | {c.text('ca')} | {p['ca_pct']} | {c.text('asr')} | {p['asr_pct']} "
                                 f"| {ours} | {theirs} | {same} |")
        if lines:
            parts.append("\n".join(
                [f"### Against the BackdoorBench leaderboard ({dataset})", ""] + [f"> {s}" for s in ref.source]
                + ["", f"Direction: a defense 'removes' the backdoor when its ASR is <= {REMOVED:g} %. "
                       f"Our direction agrees with the published one in {agree} of {total} defended cells "
                       f"(an attack whose backdoored model has ASR <= {REMOVED:g} % on either side is marked '{NOT_IMPLANTED}' "
                       "and not counted).", "",
                   "| our model | attack | defense | CA ours | CA published | ASR ours | ASR published | ours | published | agree |",
                   "|---|---|---|---:|---:|---:|---:|---|---|---|"] + lines))
    cifar = [r for r in records if _norm(str(r["dataset"])) == "cifar10"]
    sweeps = [r for r in cifar if _norm(str(r["defense"])) == "rnp" and _norm(str(r["attack"])) == "badnets"
              and isinstance(r.get("info"), dict) and isinstance(r["info"].get("oracle_curve"), list)]
    if RNP_LOG in names and sweeps:
        ref = reference_table(RNP_LOG)
        lines = []
        for r in sweeps:
            ours = {round(float(p["threshold"]), 4): p for p in r["info"]["oracle_curve"] if isinstance(p, dict) and "threshold" in p}
            for p in ref.rows:
                try:
                    o = ours.get(round(float(p["threshold"]), 4))
                except ValueError:
                    continue
                if o is None:
                    continue
                fmt = lambda m: "-" if _value(o, m) is None else f"{_value(o, m):.2f}"  # noqa: E731
                lines.append(f"| {r['model']} s{r['seed']} | {p['threshold']} | {o.get('channels_pruned', '-')} | {p['channels_pruned']} "
                             f"| {fmt('ca')} | {p['ca_pct']} | {fmt('asr')} | {p['asr_pct']} |")
        if lines:
            parts.append("\n".join(["### RNP pruning sweep against the official code's log (oracle view, test set)", ""]
                                   + [f"> {s}" for s in ref.source]
                                   + ["", "| our model | threshold | pruned ours | pruned official | CA ours | CA official | ASR ours | ASR official |",
                                      "|---|---:|---:|---:|---:|---:|---:|---:|"] + lines))
    return "\n\n".join(parts) + "\n" if parts else ""


# ---------------------------------------------------------------- the entry point


def write_reports(run_dir: str | Path) -> dict[str, Path]:
    """Regenerate ``RUN_DIR/report/`` from ``RUN_DIR/records.jsonl``; return {file name: path}."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, text in (("table.md", markdown_table(records)), ("table.csv", csv_text(records)), ("table.tex", latex_table(records))):
        atomic_write_text(out / name, text)
        written[name] = out / name
    plots = {
        "ca_vs_asr.png": lambda p: plot_ca_vs_asr(records, p),
        "asr_before_after.png": lambda p: plot_asr_before_after(records, p),
        "rnp_curve.png": lambda p: plot_oracle_curves(records, p),
        "gallery.png": lambda p: plot_gallery(run_dir, records, p),
    }
    for name, make in plots.items():
        if make(out / name) is not None:
            written[name] = out / name
        else:
            (out / name).unlink(missing_ok=True)  # no stale plot from an earlier report
    from bench.report_detect import write_detection_reports

    written.update(write_detection_reports(run_dir))  # the detection track, when the run has one
    compare = compare_markdown(records)
    if compare:
        atomic_write_text(out / "compare.md", compare)
        written["compare.md"] = out / "compare.md"
    else:
        (out / "compare.md").unlink(missing_ok=True)
    return written
