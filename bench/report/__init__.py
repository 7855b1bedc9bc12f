"""Tables, plots and one HTML page of a run, always regenerated from its records.

``write_reports(run_dir)`` writes ``RUN_DIR/report/`` (see ``bench.report.write``). One job per module,
every import pointing down:

- ``render``: ordering, reading a metric, Markdown and LaTeX escaping, the figures' look and saving;
- ``records``: reading and checking ``records.jsonl`` and ``detections.jsonl``;
- ``grid``: the table model, statistics over seeds (``bench.stats``) and BackdoorBench's DER;
- ``tables``: ``table.md``, ``table.csv``, ``table.tex``;
- ``plots``: the PNG figures;
- ``detection``: the detection track's tables and figures;
- ``compare``: our numbers beside published ones (``results/reference/``);
- ``pairs``: two defenses on the same models (``bench report --compare-defenses``);
- ``html``: the self-contained ``index.html``;
- ``write``: the entry point that writes them all.
"""

from bench.report.compare import compare_markdown, reference_names, reference_table
from bench.report.grid import Table, TableCell, build_tables
from bench.report.records import load_detections, load_records
from bench.report.tables import csv_rows, csv_text, latex_table, markdown_table
from bench.report.write import write_reports

__all__ = ["Table", "TableCell", "build_tables", "compare_markdown", "csv_rows", "csv_text", "latex_table", "load_detections",
           "load_records", "markdown_table", "reference_names", "reference_table", "write_reports"]
