"""What the report modules share: ordering, reading a metric, escaping (Markdown, LaTeX), and the
figures' look and saving (matplotlib, loaded lazily; its object API on an Agg canvas, no pyplot)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable

from bench.store import atomic_write_bytes

METRICS = ("ca", "asr", "ra")
LABELS = {"ca": "CA", "asr": "ASR", "ra": "RA"}


def ordered(items: Iterable[Any]) -> list:
    """The distinct items in order of first appearance."""
    return list(dict.fromkeys(items))


def ok(rec: dict) -> bool:
    """A finished defense record with metrics."""
    return rec.get("status") == "ok" and isinstance(rec.get("metrics"), dict)


def frac(d: dict | None, metric: str) -> float | None:
    """A metric as stored (a fraction), or None when absent or not a finite number."""
    if not isinstance(d, dict):
        return None
    v = d.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def value(d: dict | None, metric: str) -> float | None:
    """A metric as a percentage, or None when absent or not a finite number."""
    v = frac(d, metric)
    return None if v is None else 100.0 * v


def short(s: str, n: int = 160) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def md_escape(s: str) -> str:
    return s.replace("|", "\\|")


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in s)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def series_style(i: int) -> dict:
    from matplotlib import colormaps

    return {"color": colormaps["tab10"](i % 10), "marker": _MARKERS[i % len(_MARKERS)]}


def figure(n: int, ncols: int, w: float, h: float, min_width: float = 6.5):
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(max(w * ncols, min_width), h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def save_png(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path
