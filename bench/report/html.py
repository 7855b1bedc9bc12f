"""``RUN_DIR/report/index.html``: one self-contained page a researcher can mail or open offline.

Figures are embedded as base64 PNG data URIs; the page loads nothing (no network, no CDN, no external
script or style sheet). It holds the grid's summary (attacks x defenses: CA / ASR / RA / DER as
mean ± std over seeds, each defense's cells coloured by its DER, the 95 % intervals in the cells'
tooltips and in the table of all cells), each defense's mean rank by DER, the paired comparison of
every two defenses (``bench.report.pairs``), the plots and trigger gallery, the detection track and
the published-number comparison where the run has them, and the provenance (command where recorded,
library versions, git revision, the CPU or GPU from the records' ``device``, seconds per stage).

A few lines of plain JavaScript sort a table by a click on its header and filter rows by dataset,
model and attack (selects) or by text; with JavaScript off the tables read as plain tables. Every
string from the records is escaped (``html.escape``).
"""

from __future__ import annotations

import base64
import html
import re
import statistics
from pathlib import Path

from bench.report.grid import DER_NOTE, Table, build_tables
from bench.report.pairs import MODELS, pair_matrix, p_text
from bench.report.records import model_key
from bench.report.render import LABELS, METRICS, ok, ordered

PLOT_CAPTIONS = {
    "ca_vs_asr.png": "Clean accuracy against attack success rate",
    "asr_before_after.png": "ASR before and after each defense",
    "rnp_curve.png": "Pruning sweeps (oracle view, test set)",
    "roc.png": "Detection: ROC curves",
    "triggers.png": "Detection: true and recovered triggers",
}

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child,td.txt{text-align:left}tfoot td{font-weight:600;background:#fafafa}
table.sortable thead th{cursor:pointer}th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.note{color:#555;font-size:13px}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
#filters{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd}#filters label{margin-right:1em}
.wrap{overflow-x:auto}blockquote{color:#555;border-left:3px solid #ccc;margin:.5em 0;padding-left:.8em}
"""

SCRIPT = """
(function(){
  function key(td){var v=td.getAttribute('data-sort');if(v===null)v=td.textContent.trim();var n=parseFloat(v);
    return isNaN(n)||!/^[-+]?[0-9.]/.test(v)?{n:null,s:v.toLowerCase()}:{n:n,s:v};}
  document.querySelectorAll('table.sortable').forEach(function(t){
    var heads=t.tHead?t.tHead.rows[t.tHead.rows.length-1].cells:[];
    Array.prototype.forEach.call(heads,function(th,i){th.title='click to sort';th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      Array.prototype.forEach.call(heads,function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
        if(x.n===null&&y.n===null)return asc?x.s.localeCompare(y.s):y.s.localeCompare(x.s);
        if(x.n===null)return 1;if(y.n===null)return -1;return asc?x.n-y.n:y.n-x.n;});
      rows.forEach(function(r){body.appendChild(r);});});});});
  var box=document.getElementById('filters');if(!box)return;box.hidden=false;
  var sels=box.querySelectorAll('select'),text=document.getElementById('filter-text');
  function apply(){var q=text.value.trim().toLowerCase();
    document.querySelectorAll('table.filterable tbody tr').forEach(function(r){var show=true;
      sels.forEach(function(s){var v=r.getAttribute('data-'+s.name);if(s.value&&v!==null&&v!==s.value)show=false;});
      if(q&&r.textContent.toLowerCase().indexOf(q)<0)show=false;r.hidden=!show;});}
  sels.forEach(function(s){s.addEventListener('change',apply);});text.addEventListener('input',apply);
})();
"""


def e(s: object) -> str:
    return html.escape(str(s), quote=True)


def _num(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def der_colour(d: float | None) -> str:
    """A cell background by DER: red at 0.5 or below (nothing removed, or CA lost), green at 1."""
    if d is None:
        return ""
    t = min(1.0, max(0.0, (d - 0.5) / 0.5))
    return f"background:hsl({120 * t:.0f},65%,86%)"


def _cell_td(t: Table, attack: str, defense: str, m: str) -> str:
    c = t.cell(attack, defense)
    if c is None:
        return "<td>-</td>"
    s = c.stats(m)
    digits = 3 if m == "der" else 2
    tip = f"n = {s['n']} seeds" + (f"; 95 % CI [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]" if s["ci_low"] is not None else "")
    tip += f"; {c.n_failed} failed" if c.n_failed else ""
    style = der_colour(c.mean("der")) if defense != "none" else ""
    return (f'<td data-sort="{_num(s["mean"], 6)}" title="{e(tip)}"' + (f' style="{style}"' if style else "")
            + f">{e(c.text(m))}</td>")


def _row_attrs(dataset: str, model: str, attack: str | None = None) -> str:
    out = f' data-dataset="{e(dataset)}" data-model="{e(model)}"'
    return out + (f' data-attack="{e(attack)}"' if attack is not None else "")


def summary_html(tables: list[Table]) -> str:
    parts = ['<p class="note">Each cell: mean ± std over seeds (hover for n and the 95 % t interval). A defense\'s cells '
             "are coloured by its DER: green removes the backdoor at no cost (DER 1), red does nothing or costs "
             "clean accuracy (DER 0.5 or less). " + e(DER_NOTE) + "</p>"]
    for i, t in enumerate(tables):
        cols = [(d, m) for d in t.defenses for m in (*METRICS, *(("der",) if d != "none" else ()))]
        parts.append(f"<h3>{e(t.dataset)} / {e(t.model)}</h3>")
        parts.append(f'<div class="wrap"><table class="sortable filterable summary" id="summary-{i}"><thead><tr><th>Attack</th>'
                     + "".join(f'<th data-metric="{m}" data-defense="{e(d)}">{e(d)} {LABELS.get(m, "DER")}</th>' for d, m in cols)
                     + "</tr></thead><tbody>")
        for a in t.attacks:
            parts.append(f"<tr{_row_attrs(t.dataset, t.model, a)}><td>{e(a)}</td>" + "".join(_cell_td(t, a, d, m) for d, m in cols) + "</tr>")
        parts.append("</tbody><tfoot><tr><td>Average</td>" + "".join(f"<td>{e(t.average_text(d, m))}</td>" for d, m in cols)
                     + "</tr></tfoot></table></div>")
        notes = t.notes()
        if notes:
            parts.append('<ul class="note">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


def ranking_html(tables: list[Table]) -> str:
    rows = []
    for t in tables:
        for d, (rank, n) in t.ranks().items():
            mean, used, _ = t.average(d, "der")
            rows.append(f"<tr{_row_attrs(t.dataset, t.model)}><td>{e(d)}</td><td class=txt>{e(t.dataset)}</td><td class=txt>{e(t.model)}</td>"
                        f"<td>{_num(rank)}</td><td>{_num(mean, 3)}</td><td>{n}</td></tr>")
    if not rows:
        return '<p class="note">No defense with a DER (no backdoored model with an ASR, or no defense beside none).</p>'
    return ('<p class="note">Per attack the defenses are ranked by mean DER (1 = best, ties share the average rank); '
            "a defense's mean rank is over the attacks where it has a DER.</p>"
            '<table class="sortable filterable" id="ranking"><thead><tr><th>Defense</th><th>Dataset</th><th>Model</th>'
            "<th>Mean rank</th><th>Mean DER</th><th>Attacks ranked</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def cells_html(tables: list[Table]) -> str:
    head = ["Dataset", "Model", "Attack", "Defense", "Seeds", "Failed"] + [f"{LABELS.get(m, 'DER')} {s}" for m in (*METRICS, "der")
                                                                           for s in ("mean ± std", "95 % CI")]
    rows = []
    for t in tables:
        for a in t.attacks:
            for d in t.defenses:
                c = t.cell(a, d)
                if c is None:
                    continue
                tds = [f"<td class=txt>{e(x)}</td>" for x in (t.dataset, t.model, a, d)] + [f"<td>{c.n_ok}</td>", f"<td>{c.n_failed}</td>"]
                for m in (*METRICS, "der"):
                    s, digits = c.stats(m), 3 if m == "der" else 2
                    tds.append(f'<td data-sort="{_num(s["mean"], 6)}">{e(c.text(m))}</td>')
                    ci = f"[{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]" if s["ci_low"] is not None else "-"
                    tds.append(f'<td data-sort="{_num(s["ci_low"], 6)}">{ci}</td>')
                rows.append(f"<tr{_row_attrs(t.dataset, t.model, a)}>" + "".join(tds) + "</tr>")
    return ('<div class="wrap"><table class="sortable filterable" id="cells"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def pairs_html(records: list[dict]) -> str:
    defs, res = pair_matrix(records)
    if len(defs) < 2:
        return '<p class="note">Fewer than two defenses beside none: nothing to pair.</p>'
    head = "<tr><th>row vs column</th>" + "".join(f"<th>{e(d)}</th>" for d in defs) + "</tr>"
    rows = []
    for a in defs:
        tds = []
        for b in defs:
            if a == b:
                tds.append("<td>—</td>")
                continue
            r = res.get((a, b)) or res[(b, a)]
            flip = (a, b) not in res
            parts = []
            for m in ("asr", "ca"):
                s = r[m]
                win, lose = (s["b_better"], s["a_better"]) if flip else (s["a_better"], s["b_better"])
                parts.append(f"{LABELS[m]} {win}/{lose}/{s['ties']}, p {e(p_text(s['p']) if s['p'] is not None else '-')}")
            tds.append(f'<td title="{r["n"]} models">' + "<br>".join(parts) + f"<br><small>n = {r['n']}</small></td>")
        rows.append(f"<tr><th>{e(a)}</th>" + "".join(tds) + "</tr>")
    return (f'<p class="note">Each cell: on how many models ({MODELS}) the row\'s defense is better / the column\'s is better '
            "/ ties, in ASR (lower is better) and in CA (higher is better), and the two-sided Wilcoxon signed-rank p "
            "(ties dropped; - where no model differs). Pooled over every dataset and model of the run.</p>"
            f'<div class="wrap"><table id="pairs"><thead>{head}</thead><tbody>' + "".join(rows) + "</tbody></table></div>")


def img_html(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def markdown_html(md: str) -> str:
    """The small Markdown the report writes (### headings, > quotes, - lists, | tables |, paragraphs) as HTML."""
    out, table, items = [], [], []

    def flush() -> None:
        if table:
            rows = [[c.strip().replace("\\|", "|").replace("\\*", "*") for c in _CELL_SPLIT.split(ln.strip())[1:-1]] for ln in table]
            body = [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append('<div class="wrap"><table class="sortable filterable"><thead><tr>' + "".join(f"<th>{e(c)}</th>" for c in rows[0])
                       + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</tbody></table></div>")
            table.clear()
        if items:
            out.append('<ul class="note">' + "".join(f"<li>{e(x)}</li>" for x in items) + "</ul>")
            items.clear()

    for ln in md.splitlines():
        if ln.startswith("|"):
            table.append(ln)
            continue
        if ln.startswith("- "):
            items.append(ln[2:].replace("\\*", "*"))
            continue
        flush()
        if ln.startswith("### "):
            out.append(f"<h3>{e(ln[4:])}</h3>")
        elif ln.startswith(">"):
            out.append(f"<blockquote>{e(ln.lstrip('> '))}</blockquote>")
        elif ln.strip():
            out.append(f'<p class="note">{e(ln)}</p>')
    flush()
    return "\n".join(out)


def provenance_html(records: list[dict], detections: list[dict]) -> str:
    recs = records + detections
    parts = []
    commands = ordered(str(c) for r in recs for c in (r.get("command"), (r.get("config") or {}).get("command")) if c)
    if commands:
        parts.append("<h3>Command</h3>" + "".join(f"<pre>{e(c)}</pre>" for c in commands))
    rows = [("preset", ordered(str((r.get("config") or {}).get("preset")) for r in recs if (r.get("config") or {}).get("preset"))),
            ("git revision", ordered(str(r["git"]) for r in recs if r.get("git")))]
    packages = ordered(k for r in recs if isinstance(r.get("versions"), dict) for k in r["versions"])
    rows += [(k, ordered(str(r["versions"][k]) for r in recs if isinstance(r.get("versions"), dict) and k in r["versions"]))
             for k in packages]
    devices: dict[str, int] = {}
    for r in recs:
        for key in ("device", "train_device"):
            d = r.get(key)
            if isinstance(d, dict):
                what = " ".join(str(d[k]) for k in ("type", "name") if d.get(k)) + "".join(
                    f", {k} {d[k]}" for k in ("threads", "cuda", "cudnn", "capability") if d.get(k) is not None)
                label = f"{'training' if key == 'train_device' else 'defense / detection'}: {what}"
                devices[label] = devices.get(label, 0) + 1
    rows += [("device", [f"{k} ({n} records)" for k, n in devices.items()])]
    parts.append('<table class="sortable" id="provenance"><thead><tr><th>What</th><th>Value</th></tr></thead><tbody>'
                 + "".join(f"<tr><td>{e(k)}</td><td class=txt>{'<br>'.join(e(v) for v in vs) or '-'}</td></tr>" for k, vs in rows)
                 + "</tbody></table>")
    stages: dict[str, dict] = {}
    for r in recs:
        for stage, s in (r.get("seconds") or {}).items():
            if isinstance(s, (int, float)) and not isinstance(s, bool) and (r.get("status") == "ok"):
                # a model's training time sits on every record of that model: count it once
                key = model_key(r) if stage == "train" else id(r)
                stages.setdefault(stage, {})[key] = float(s)
    if stages:
        parts.append('<h3>Seconds per stage</h3><table class="sortable" id="seconds"><thead><tr><th>Stage</th><th>Count</th>'
                     "<th>Total s</th><th>Median s</th><th>Max s</th></tr></thead><tbody>"
                     + "".join(f"<tr><td>{e(k)}</td><td>{len(v)}</td><td>{sum(v.values()):.1f}</td>"
                               f"<td>{statistics.median(v.values()):.2f}</td><td>{max(v.values()):.2f}</td></tr>"
                               for k, v in stages.items())
                     + '</tbody></table><p class="note">Training counted once per (dataset, model, attack, seed).</p>')
    return "\n".join(parts)


def filters_html(records: list[dict]) -> str:
    out = ['<div id="filters" hidden>']
    for name in ("dataset", "model", "attack"):
        vals = ordered(str(r[name]) for r in records)
        out.append(f'<label>{name} <select name="{name}"><option value="">all</option>'
                   + "".join(f'<option value="{e(v)}">{e(v)}</option>' for v in vals) + "</select></label>")
    out.append('<label>text <input id="filter-text" type="search" placeholder="filter rows"></label></div>')
    return "".join(out)


def page(run_dir: Path, records: list[dict], detections: list[dict], figures: dict[str, Path],
         detection_md: str = "", compare_md: str = "") -> str:
    """The whole page as text; ``figures``: {file name: path} of the PNGs to embed."""
    tables = build_tables(records)
    n_ok = sum(ok(r) for r in records)
    seeds = ordered(r["seed"] for r in records)
    sections = [("summary", "Summary", summary_html(tables)),
                ("ranking", "Defense ranking by DER", ranking_html(tables)),
                ("pairs", "Paired comparisons", pairs_html(records)),
                ("cells", "Every cell with its 95 % interval", cells_html(tables))]
    plots = [img_html(figures[n], c) for n, c in PLOT_CAPTIONS.items() if n in figures and not n.startswith(("roc", "triggers"))]
    if plots:
        sections.append(("plots", "Plots", "\n".join(plots)))
    if "gallery.png" in figures:
        sections.append(("gallery", "Trigger gallery", img_html(figures["gallery.png"], "Clean and triggered examples")))
    if detection_md or detections:
        det = markdown_html(detection_md) + "".join(img_html(figures[n], PLOT_CAPTIONS[n]) for n in ("roc.png", "triggers.png") if n in figures)
        sections.append(("detection", "Detection track", det))
    if compare_md:
        sections.append(("compare", "Against published numbers", markdown_html(compare_md)))
    sections.append(("provenance", "Provenance", provenance_html(records, detections)))
    nav = " · ".join(f'<a href="#{k}">{e(t)}</a>' for k, t, _ in sections)
    body = "\n".join(f'<section id="{k}"><h2>{e(t)}</h2>\n{h}\n</section>' for k, t, h in sections)
    intro = (f"{len(records)} records ({n_ok} finished), {len(tables)} dataset / model pair(s), "
             f"{len(ordered(r['attack'] for r in records))} attacks, {len(ordered(r['defense'] for r in records))} defenses "
             f"(none included), seeds {', '.join(e(s) for s in seeds)}. CA, ASR and RA in %, DER in [0, 1].")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><link rel=\"icon\" href=\"data:,\">"
            f"<title>bdbench report: {e(run_dir.name)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>bdbench report: {e(run_dir.name)}</h1>\n<p>{intro}</p>\n<nav>{nav}</nav>\n{filters_html(records)}\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")
