"""The run's tables, always regenerated from its records: ``table.md``, ``table.csv``, ``table.tex``.

One paper-style table per (dataset, model). Rows are the attacks plus an ``Average`` row; column
groups are the defenses (in the order they first appear, ``none`` first), each with CA, ASR and RA in
percent. A cell shows ``mean ± std`` over seeds (sample std) when it has several, the plain value
otherwise, ``failed`` when every seed failed, ``-`` when it is missing. ``*`` marks a cell where some
seeds failed (the value is over the others); ``†`` marks an Average over fewer attacks than the table
has (some failed or missing). When a (dataset, model, attack, seed) has no ``none`` record, its ``none``
column is filled from the records' ``backdoor`` metrics: the same model before the defense. A row whose
finished cells have no ASR at all (the ``clean`` model: no trigger) shows "-" there, never 0, and is
left out of the Average row, with a note.

Below each table, a DER table (``bench.report.grid``: BackdoorBench's DER, arXiv:2206.12654): per
defense and attack the mean ± std over seeds, the mean over attacks, and the defense's mean rank.
The CSV is the tidy long form of the same numbers (percent; DER as a fraction) with the 95 % t
intervals over seeds (``bench.stats.summary``) that the Markdown and LaTeX leave out; Average rows
included, with the defense's mean DER rank.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from bench.report.grid import AVERAGE_MARK, DEPARTURE_MARK, DER_NOTE, PARTIAL_MARK, Table, build_tables, title
from bench.report.render import LABELS, METRICS, md_escape, ok, ordered, tex_escape

STATS_NOTE = "95 % confidence intervals over seeds (Student's t) are in table.csv and index.html."


def der_rows(t: Table) -> list[tuple[str, list[str], str, str]]:
    """(defense, [DER text per averaged attack], mean DER text, mean rank text) per defense with a DER."""
    ranks = t.ranks()
    out = []
    for d in t.defended:
        texts = [c.text("der") if (c := t.cell(a, d)) else "-" for a in t.averaged]
        if all(x in ("-", "failed") for x in texts):
            continue
        rank, n = ranks[d]
        out.append((d, texts, t.average_text(d, "der"), "-" if rank is None else f"{rank:.2f}"))
    return out


def markdown_table(records: list[dict]) -> str:
    """The Markdown tables (one per dataset and model) of ``records``."""
    parts = []
    for t in build_tables(records):
        head = ["Attack"] + [f"{d} {LABELS[m]}" for d in t.defenses for m in METRICS]
        lines = [f"### {title(t)}", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        for label, texts in t.rows():
            label = "**Average**" if label == "Average" else md_escape(label)
            lines.append("| " + " | ".join([label] + texts) + " |")
        notes = t.notes() + ([STATS_NOTE] if t.max_seeds > 1 else [])
        if notes:
            lines += [""] + ["- " + md_escape(n).replace("*", "\\*") for n in notes]
        ders = der_rows(t)
        if ders:
            lines += ["", f"DER by defense ({t.dataset} / {t.model}):", "",
                      "| defense | " + " | ".join(md_escape(a) for a in t.averaged) + " | mean DER | mean rank |",
                      "|---|" + "---:|" * (len(t.averaged) + 2)]
            lines += [f"| {md_escape(d)} | " + " | ".join(texts) + f" | {mean} | {rank} |" for d, texts, mean, rank in ders]
            lines += ["", "- " + DER_NOTE]
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
        if not ok(r) or not isinstance(sec.get("defense"), (int, float)):
            continue
        train_s = sec.get("train") if isinstance(sec.get("train"), (int, float)) and sec.get("train") > 0 else None
        by_def.setdefault(str(r["defense"]), []).append((float(sec["defense"]), train_s))
    if not by_def:
        return ""
    lines = ["### Seconds", "", "| defense | cells | median s | median s / training | max s / training |", "|---|---:|---:|---:|---:|"]
    for d in ordered(by_def):
        secs = sorted(s for s, _ in by_def[d])
        ratios = sorted(s / t for s, t in by_def[d] if t)
        med = lambda v: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # noqa: E731
        rtxt = (f"{med(ratios):.2f} | {ratios[-1]:.2f}") if ratios else "- | -"
        lines.append(f"| {md_escape(d)} | {len(secs)} | {med(secs):.1f} | {rtxt} |")
    trains = sorted({(str(r.get("dataset")), str(r.get("model")), str(r.get("attack")), r.get("seed")): r["seconds"]["train"]
                     for r in records if ok(r) and isinstance((r.get("seconds") or {}).get("train"), (int, float))}.items(),
                    key=lambda kv: kv[1])
    if trains:
        lines += ["", f"Training time of the defended models: median {trains[(len(trains) - 1) // 2][1]:.0f} s over "
                      f"{len(trains)} models (min {trains[0][1]:.0f} s, max {trains[-1][1]:.0f} s)."]
    return "\n".join(lines)


STATS = ("mean", "std", "ci_low", "ci_high")
CSV_COLUMNS = (["dataset", "model", "attack", "defense", "n_seeds", "n_failed"]
               + [f"{m}_{s}" for m in (*METRICS, "der") for s in STATS] + ["der_mean_rank", "departures"])


def csv_rows(records: list[dict]) -> list[dict[str, Any]]:
    """The tidy long form: one row per (dataset, model, attack, defense), plus Average rows.

    Values in percent, DER as a fraction in [0, 1]; std and the 95 % interval empty for a single seed,
    DER empty for ``none`` and where ASR is undefined. Average rows: the mean over attacks of the cell
    means, n_seeds, n_failed, stds and intervals empty, and the defense's mean rank by DER.
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
                for m in (*METRICS, "der"):
                    st = c.stats(m)
                    row[f"{m}_mean"], row[f"{m}_std"] = _round(st["mean"]), _round(c.std(m))
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = _round(st["ci_low"]), _round(st["ci_high"])
                row["der_mean_rank"] = None
                row["departures"] = "; ".join(sorted(c.departures)) or None  # the fields off their official values
                rows.append(row)
        ranks = t.ranks()
        for d in t.defenses:
            row = {"dataset": t.dataset, "model": t.model, "attack": "Average", "defense": d, "n_seeds": None, "n_failed": None}
            for m in (*METRICS, "der"):
                row.update({f"{m}_{s}": None for s in STATS})
                row[f"{m}_mean"] = _round(t.average(d, m)[0])
            row["der_mean_rank"] = _round(ranks.get(d, (None, 0))[0])
            row["departures"] = None
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
    text = text.replace(AVERAGE_MARK, r"$^\dagger$").replace(PARTIAL_MARK, r"$^*$").replace(DEPARTURE_MARK, r"$^\ddagger$")
    return text.replace(" ± ", r" $\pm$ ")


def latex_table(records: list[dict]) -> str:
    """booktabs tabulars (needs ``\\usepackage{booktabs}``), one per dataset and model."""
    parts = []
    for t in build_tables(records):
        k = len(t.defenses)
        lines = [f"% {title(t)}", r"\begin{tabular}{l" + " ccc" * k + "}", r"\toprule"]
        lines.append(" & " + " & ".join(rf"\multicolumn{{3}}{{c}}{{{tex_escape(d)}}}" for d in t.defenses) + r" \\")
        lines.append(" ".join(rf"\cmidrule(lr){{{2 + 3 * i}-{4 + 3 * i}}}" for i in range(k)))
        lines.append("Attack & " + " & ".join(LABELS[m] for _ in t.defenses for m in METRICS) + r" \\")
        lines.append(r"\midrule")
        for label, texts in t.rows():
            if label == "Average":
                lines.append(r"\midrule")
            lines.append(" & ".join([tex_escape(label)] + [_tex_cell(x) for x in texts]) + r" \\")
        lines.append(r"\bottomrule")
        for note in t.notes() + ([STATS_NOTE] if t.max_seeds > 1 else []):
            note = tex_escape(note).replace(AVERAGE_MARK, r"$^\dagger$").replace(PARTIAL_MARK, r"$^*$", 1)
            note = note.replace(DEPARTURE_MARK, r"$^\ddagger$")
            lines.append(rf"\multicolumn{{{1 + 3 * k}}}{{l}}{{\footnotesize {note}}} \\")
        lines.append(r"\end{tabular}")
        ders = der_rows(t)
        if ders:
            n = len(t.averaged)
            lines += ["", f"% DER by defense: {t.dataset} / {t.model}", r"\begin{tabular}{l" + "c" * (n + 2) + "}", r"\toprule",
                      "Defense & " + " & ".join(tex_escape(a) for a in t.averaged) + r" & Mean DER & Mean rank \\", r"\midrule"]
            lines += [" & ".join([tex_escape(d)] + [_tex_cell(x) for x in texts] + [_tex_cell(mean), rank]) + r" \\"
                      for d, texts, mean, rank in ders]
            lines += [r"\bottomrule", rf"\multicolumn{{{n + 3}}}{{p{{0.9\linewidth}}}}{{\footnotesize {tex_escape(DER_NOTE)}}} \\",
                      r"\end{tabular}"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
