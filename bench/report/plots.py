"""The run's plots, regenerated from its records (matplotlib's object API on an Agg canvas: no pyplot):

- ``ca_vs_asr.png``: CA against ASR, one point per (attack, seed), a colour and marker per defense;
- ``asr_before_after.png``: ASR of the backdoored model and after each defense, per attack;
- ``rnp_curve.png``: the harness's oracle view of a defense's threshold sweep (on the test set);
- ``gallery.png``: clean and triggered examples from ``RUN_DIR/examples/`` (and NC's reversed triggers).

Each ``plot_*`` returns the path it wrote, or None when it has no data (nothing written).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from bench.report.grid import no_asr
from bench.report.records import before_metrics
from bench.report.render import figure, ok, ordered, save_png, series_style, value

BACKDOOR_STYLE = {"color": "0.25", "marker": "x"}


def _backdoor_points(records: list[dict]) -> dict[tuple, dict]:
    """(dataset, model, attack, seed) -> backdoored metrics with an ASR (not the clean model)."""
    return {k: v for k, v in before_metrics(records).items() if value(v, "asr") is not None}


def _defenses(records: list[dict]) -> list[str]:
    return [d for d in ordered(str(r["defense"]) for r in records) if d != "none"]


def plot_ca_vs_asr(records: list[dict], path: Path) -> Path | None:
    """CA against ASR: one point per (attack, seed) cell, a colour and marker per defense."""
    bd = _backdoor_points(records)
    defended = [r for r in records if r["defense"] != "none" and ok(r)
                and value(r["metrics"], "ca") is not None and value(r["metrics"], "asr") is not None]
    groups = ordered([(k[0], k[1]) for k in bd] + [(r["dataset"], r["model"]) for r in defended])
    if not groups:
        return None
    defenses = _defenses(records)
    fig, axes = figure(len(groups), 3, 5.2, 4.4)
    for ax, (ds, mo) in zip(axes, groups):
        pts = {k: v for k, v in bd.items() if k[:2] == (ds, mo)}
        for r in defended:  # thin lines from each backdoored model to its defended versions
            k = (r["dataset"], r["model"], r["attack"], r["seed"])
            if k[:2] == (ds, mo) and k in pts:
                ax.plot([value(pts[k], "asr"), value(r["metrics"], "asr")], [value(pts[k], "ca"), value(r["metrics"], "ca")],
                        color="0.8", lw=0.7, zorder=1)
        if pts:
            ax.scatter([value(v, "asr") for v in pts.values()], [value(v, "ca") for v in pts.values()], s=45,
                       label="backdoored (no defense)", zorder=3, **BACKDOOR_STYLE)
        for i, d in enumerate(defenses):
            rs = [r for r in defended if r["defense"] == d and (r["dataset"], r["model"]) == (ds, mo)]
            if rs:
                st = series_style(i)
                ax.scatter([value(r["metrics"], "asr") for r in rs], [value(r["metrics"], "ca") for r in rs], s=40,
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
    groups = ordered([(k[0], k[1]) for k in bd] + [(r["dataset"], r["model"]) for r in records if r["defense"] != "none"])
    series_per_group = []
    for ds, mo in groups:
        mine = [r for r in records if (r["dataset"], r["model"]) == (ds, mo)]
        skip = set(no_asr(mine))  # no trigger (clean): no ASR bar to draw
        attacks = [a for a in ordered(str(r["attack"]) for r in mine) if a not in skip]
        series: list[tuple[str, dict, dict[str, list[float]], dict[str, int]]] = []
        vals: dict[str, list[float]] = {a: [] for a in attacks}
        for k, v in bd.items():
            if k[:2] == (ds, mo):
                vals[str(k[2])].append(value(v, "asr"))  # type: ignore[arg-type]
        series.append(("backdoored", BACKDOOR_STYLE, vals, {}))
        for i, d in enumerate(defenses):
            vals, failed = {a: [] for a in attacks}, {a: 0 for a in attacks}
            for r in records:
                if (r["dataset"], r["model"], r["defense"]) != (ds, mo, d) or str(r["attack"]) in skip:
                    continue
                v = value(r.get("metrics"), "asr") if ok(r) else None
                if not ok(r):
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
    names = ordered(name for _, _, series in series_per_group for name, _, _, _ in series) + (["one seed"] if "one seed" in handles else [])
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
    panels = ordered((r["dataset"], r["model"], r["defense"], r["attack"]) for r in rs)
    fig, axes = figure(len(panels), 3, 4.6, 3.6)
    multi = len({(p[0], p[1], p[2]) for p in panels}) > 1
    for ax, (ds, mo, de, at) in zip(axes, panels):
        mine = [r for r in rs if (r["dataset"], r["model"], r["defense"], r["attack"]) == (ds, mo, de, at)]
        for k, r in enumerate(mine):
            pts = sorted((p for p in r["info"]["oracle_curve"] if isinstance(p, dict) and isinstance(p.get("threshold"), (int, float))),
                         key=lambda p: p["threshold"])
            th = [p["threshold"] for p in pts]
            first = k == 0
            ax.plot(th, [value(p, "ca") for p in pts], color="tab:blue", marker=".", lw=1.3, label="CA" if first else None)
            if any(value(p, "asr") is not None for p in pts):  # none for the clean model (no trigger)
                ax.plot(th, [value(p, "asr") for p in pts], color="tab:red", marker=".", lw=1.3, ls="--",
                        label="ASR" if first else None)
            if any(value(p, "ra") is not None for p in pts):
                ax.plot(th, [value(p, "ra") for p in pts], color="tab:green", lw=1.0, ls=":", label="RA" if first else None)
            chosen = r["info"].get("threshold")
            if isinstance(chosen, (int, float)) and not isinstance(chosen, bool):
                ax.axvline(chosen, color="0.3", lw=1.0, ls="-.", label="chosen threshold" if first else None)
        ax.set(xlabel="mask threshold", ylabel="%", ylim=(-3, 103),
               title=f"{at} ({ds} / {mo}, {de})" if multi else f"{at}" + (f" ({len(mine)} seeds)" if len(mine) > 1 else ""))
        ax.grid(alpha=0.3)
    legend = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}  # a clean panel has no ASR line
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=len(legend), fontsize=9)
    name = ", ".join(ordered(p[2] for p in panels))
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

    order = {a: i for i, a in enumerate(ordered(str(r["attack"]) for r in records))}
    dorder = {d: i for i, d in enumerate(ordered(str(r["dataset"]) for r in records))}
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
        rel = (r.get("info") or {}).get("tensors_file") if r.get("defense") == "nc" and ok(r) else None
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
