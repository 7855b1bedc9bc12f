"""``write_reports(run_dir)``: regenerate ``RUN_DIR/report/`` from the run's records.

Everything is read and checked first (``records.jsonl``, ``detections.jsonl``): a bad file fails
before anything in the run folder changes. Then it writes ``table.md``, ``table.csv``, ``table.tex``
(``bench.report.tables``), the plots (``bench.report.plots``; a plot without data is skipped and a
stale copy removed), the detection track (``bench.report.detection``), ``compare.md`` where cells
match a published table (``bench.report.compare``), and ``index.html`` (``bench.report.html``), last.
"""

from __future__ import annotations

from pathlib import Path

from bench.report.compare import compare_markdown
from bench.report.detection import write_detection_reports
from bench.report.html import page
from bench.report.plots import plot_asr_before_after, plot_ca_vs_asr, plot_gallery, plot_oracle_curves
from bench.report.records import load_detections, load_records
from bench.report.tables import csv_text, latex_table, markdown_table
from bench.store import atomic_write_text


def write_reports(run_dir: str | Path) -> dict[str, Path]:
    """Regenerate ``RUN_DIR/report/`` from ``RUN_DIR/records.jsonl``; return {file name: path}."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    detections = load_detections(run_dir)
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
    written.update(write_detection_reports(run_dir, detections))  # the detection track, when the run has one
    compare = compare_markdown(records)
    if compare:
        atomic_write_text(out / "compare.md", compare)
        written["compare.md"] = out / "compare.md"
    else:
        (out / "compare.md").unlink(missing_ok=True)
    detection_md = written["detection.md"].read_text(encoding="utf-8") if "detection.md" in written else ""
    pngs = {n: p for n, p in written.items() if n.endswith(".png")}
    atomic_write_text(out / "index.html", page(run_dir, records, detections, pngs, detection_md, compare))
    written["index.html"] = out / "index.html"
    return written
