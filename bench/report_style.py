"""What the report modules share: LaTeX escaping and the figures' look and saving (matplotlib, loaded lazily)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from bench.store import atomic_write_bytes

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
