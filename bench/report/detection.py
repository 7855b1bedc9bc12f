"""The detection track's tables and plots, regenerated from ``RUN_DIR/detections.jsonl``.

``write_detection_reports(run_dir)`` writes into ``RUN_DIR/report/`` (nothing when the run has
no detection cells, and stale copies are removed):

- ``detection.md``, ``detection.csv``, ``detection.tex``, per (dataset, model):
  - sample and input level: per attack and detector, AUROC / TPR at 5 % FPR / precision at the
    true poison count (means over seeds), ‡ where a test-time mix was scored, "n/a" where there
    is nothing to detect;
  - trigger recovery: per attack, the recovered trigger's ASR and IoU, and the baseline's;
  - model level: a summary row per detector: label accuracy (the suspected label is the
    all-to-one target, over the backdoored models with one; "n/m" beside it), AUROC of the
    score over backdoored models against the ``clean`` attack's models ("-" without both
    kinds), the same over the implanted models only (own ASR above 20 %), and the median
    detection seconds; then a row per attack: the model's ASR, per detector how many seeds got
    the label right ("2/3"; "-" where no target is defined) and the mean score.
- ``roc.png``: per (dataset, model), each model-level detector's ROC curve over its models.
- ``triggers.png``: per backdoored model with a recovered trigger, the true trigger (amplified
  difference of the run's example pair) beside the recovered ones.

The CSV is the tidy long form: one row per detection cell.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from bench.detect import auroc, roc_points
from bench.metrics import pct
from bench.official import describe
from bench.registry import slug
from bench.report.records import load_detections
from bench.report.render import figure, ordered, save_png, series_style, tex_escape
from bench.store import atomic_write_text

DETECTION_FILES = ("detection.md", "detection.csv", "detection.tex", "roc.png", "triggers.png")
TRIGGER_KEYS = ("trigger_asr", "iou", "unlearned_trigger_asr", "unlearned_iou", "baseline_trigger_asr", "baseline_iou")
CSV_COLUMNS = ["dataset", "model", "attack", "detector", "level", "seed", "status", "backdoored", "target", "model_asr",
               "label", "label_correct", "score", "source", "inputs", "poisoned", "auroc", "tpr_at_5fpr", "precision_at_k",
               *TRIGGER_KEYS, "seconds"]


def model_level(dets: list[dict]) -> list[dict]:
    return [d for d in dets if d.get("level", "model") == "model"]


def summary(dets: list[dict]) -> list[dict]:
    """One row per (dataset, model, model-level detector): label accuracy, AUROC, counts, median seconds."""
    dets = model_level(dets)
    rows = []
    for ds, model in ordered((d["dataset"], d["model"]) for d in dets):
        group = [d for d in dets if (d["dataset"], d["model"]) == (ds, model)]
        for name in ordered(d["detector"] for d in group):
            ok = [d for d in group if d["detector"] == name and d["status"] == "ok"]
            neg = [d["detection"]["score"] for d in ok if d["truth"]["backdoored"] is False]
            row = {"dataset": ds, "model": model, "detector": name}
            for suffix, keep in (("", lambda d: True), ("_implanted", implanted)):
                bd = [d for d in ok if d["truth"]["backdoored"] and keep(d)]
                graded = [d["detection"]["label_correct"] for d in bd if d["detection"]["label_correct"] is not None]
                row[f"label_acc{suffix}"] = sum(graded) / len(graded) if graded else None
                row[f"label_n{suffix}"] = f"{sum(graded)}/{len(graded)}"
                row[f"auroc{suffix}"] = auroc([d["detection"]["score"] for d in bd], neg)
                row[f"n_backdoored{suffix}"] = len(bd)
            secs = [d["seconds"]["detect"] for d in ok]
            rows.append({
                **row, "n_clean": len(neg),
                "failed": sum(1 for d in group if d["detector"] == name and d["status"] != "ok"),
                "median_s": statistics.median(secs) if secs else None,
            })
    return rows


IMPLANTED = 0.2  # a backdoored model counts as implanted when its own ASR is above 20 % (compare.REMOVED)


def implanted(d: dict) -> bool:
    asr = d["truth"].get("asr")
    return asr is not None and asr > IMPLANTED


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _per_attack(dets: list[dict], ds: str, model: str) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
    group = [d for d in model_level(dets) if (d["dataset"], d["model"]) == (ds, model)]
    names = ordered(d["detector"] for d in group)
    rows = []
    for atk in ordered(d["attack"] for d in group):
        texts = []
        for name in names:
            ok = [d for d in group if d["attack"] == atk and d["detector"] == name and d["status"] == "ok"]
            if not ok:
                texts += ["failed" if any(d["attack"] == atk and d["detector"] == name for d in group) else "-", "-"]
                continue
            graded = [d["detection"]["label_correct"] for d in ok if d["detection"]["label_correct"] is not None]
            texts.append(f"{sum(graded)}/{len(graded)}" if graded else "-")
            texts.append(f"{statistics.mean(d['detection']['score'] for d in ok):.3g}")
        asrs = [d["truth"].get("asr") for d in group if d["attack"] == atk and d["truth"].get("asr") is not None]
        rows.append((atk, pct(statistics.mean(asrs)) if asrs else "-", texts))
    return names, rows


MIX_MARK = "‡"
MIX_NOTE = ("‡ scored on a test-time mix of clean and triggered test images, shuffled and without labels: the "
            "attack stores no poisoned training image (it poisons batches on the fly), or the detector works on "
            "inputs (STRIP).")


def _sample_rows(dets: list[dict], ds: str, model: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Per attack, per sample/input-level detector: "AUROC / TPR@5%FPR / P@k" (means over seeds)."""
    group = [d for d in dets if (d["dataset"], d["model"]) == (ds, model) and d.get("level", "model") != "model"]
    names = ordered(d["detector"] for d in group)
    rows = []
    for atk in ordered(d["attack"] for d in group):
        texts = []
        for name in names:
            cell = [d for d in group if d["attack"] == atk and d["detector"] == name]
            ok = [d for d in cell if d["status"] == "ok"]
            if not ok:
                texts.append("n/a" if cell and all(d["status"] == "not applicable" for d in cell) else
                             "failed" if cell else "-")
                continue
            vals = [statistics.mean(v) if (v := [d["detection"][k] for d in ok if d["detection"][k] is not None]) else None
                    for k in ("auroc", "tpr_at_5fpr", "precision_at_k")]
            mark = MIX_MARK if any(d["detection"]["source"] != "training set" for d in ok) else ""
            texts.append(" / ".join(_num(v) for v in vals) + mark)
        rows.append((atk, texts))
    return names, rows


def _trigger_rows(dets: list[dict], ds: str, model: str) -> list[tuple[str, str, list[str]]]:
    """Per (attack, trigger-recovering detector): ASR and IoU of the recovered trigger, guided and baseline."""
    out = []
    group = [d for d in dets if (d["dataset"], d["model"]) == (ds, model) and d["status"] == "ok"
             and "trigger_asr" in (d.get("detection") or {})]
    for name in ordered(d["detector"] for d in group):
        for atk in ordered(d["attack"] for d in group if d["detector"] == name):
            ok = [d for d in group if d["detector"] == name and d["attack"] == atk]
            texts = []
            for k in TRIGGER_KEYS:
                v = [d["detection"].get(k) for d in ok if d["detection"].get(k) is not None]
                texts.append((pct(statistics.mean(v)) if "asr" in k else _num(statistics.mean(v))) if v else "-")
            out.append((name, atk, texts))
    return out


def detection_markdown(dets: list[dict]) -> str:
    parts = []
    rows = summary(dets)
    for ds, model in ordered((d["dataset"], d["model"]) for d in dets):
        trig = _trigger_rows(dets, ds, model)
        if not trig:
            continue
        parts.append(f"### Trigger recovery: {ds} / {model}\n")
        parts.append("| detector | attack | ASR of the recovered trigger | IoU with the true patch | "
                     "unlearned model's trigger: ASR | its IoU | baseline ASR (backdoored model alone) | baseline IoU |")
        parts.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, atk, texts in trig:
            parts.append(f"| {name} | {atk} | " + " | ".join(texts) + " |")
        parts.append("")
        parts.append("ASR in % on the backdoored model (clean test images of other labels, stamped with the recovered "
                     "trigger). IoU: the mask's top pixels (as many as the true trigger touches) against those pixels; "
                     "- where the true trigger is no patch (it touches more than 10 % of the image). The recovered trigger: "
                     "the search against the unlearned model, refined against the backdoored model from there "
                     "(rnp_trigger's refine=true; - in the unlearned columns otherwise). Unlearned model's trigger: "
                     "that first search's. Baseline: the same optimiser, label and total budget against the "
                     "backdoored model alone, from a random start.\n")
    for ds, model in ordered((d["dataset"], d["model"]) for d in dets):
        names, per = _sample_rows(dets, ds, model)
        if not per:
            continue
        parts.append(f"### Poisoned-sample and triggered-input detection: {ds} / {model}\n")
        parts.append("| attack | " + " | ".join(names) + " |")
        parts.append("|---|" + "---:|" * len(names))
        for atk, texts in per:
            parts.append(f"| {atk} | " + " | ".join(texts) + " |")
        parts.append("")
        parts.append("Each cell: AUROC / TPR at 5 % FPR / precision at the true poison count, means over seeds; n/a: "
                     "nothing to detect (the clean model) or the poisoned set cannot be rebuilt from the cache. " + MIX_NOTE + "\n")
    for ds, model in ordered((r["dataset"], r["model"]) for r in rows):
        parts.append(f"### Detection: {ds} / {model}\n")
        parts.append("| detector | label accuracy | AUROC | backdoored / clean models | label accuracy, implanted "
                     "| AUROC, implanted | implanted models | median s |")
        parts.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in rows if (r["dataset"], r["model"]) == (ds, model)):
            fail = f" ({r['failed']} failed)" if r["failed"] else ""
            parts.append(f"| {r['detector']}{fail} | {pct(r['label_acc'])} ({r['label_n']}) | {_num(r['auroc'])} | "
                         f"{r['n_backdoored']} / {r['n_clean']} | {pct(r['label_acc_implanted'])} "
                         f"({r['label_n_implanted']}) | {_num(r['auroc_implanted'])} | {r['n_backdoored_implanted']} | "
                         f"{_num(r['median_s'], '.1f')} |")
        names, per = _per_attack(dets, ds, model)
        parts.append("")
        parts.append("| attack | model's ASR | " + " | ".join(f"{n} label | {n} score" for n in names) + " |")
        parts.append("|---|---:|" + "---:|---:|" * len(names))
        for atk, asr, texts in per:
            parts.append(f"| {atk} | {asr} | " + " | ".join(texts) + " |")
        parts.append("")
        parts.append("Label: seeds whose suspected label is the attack's all-to-one target (- where none is defined: "
                     "the clean model, all-to-all attacks). Score: larger = more likely backdoored, mean over seeds. "
                     "AUROC: the score over backdoored models against the clean models of the same recipe. "
                     "Implanted: backdoored models whose own ASR is above 20 % (an attack that did not implant "
                     "leaves nothing to detect). Model's ASR: mean over seeds, in %.\n")
    deps = departures_markdown(dets)
    return "\n".join(parts + ([deps] if deps else []))


def departures_markdown(dets: list[dict]) -> str:
    """Which settings of the detection cells differ from the official ones, by detector (the recipe, the
    model's and the attacks' fields once, for every cell); "" when every cell is at official settings."""
    by: dict[str, dict[str, None]] = {}
    for d in dets:
        for dep in d.get("departures") or []:
            if isinstance(dep, dict) and "field" in dep:
                key = f"detector {d['detector']}" if dep.get("kind") == "detector" else "every detector"
                by.setdefault(key, {})[describe(dep)] = None
    if not by:
        return ""
    lines = ["### Settings that differ from the official ones\n"]
    lines += [f"- {k}: {'; '.join(v)}" for k, v in sorted(by.items(), key=lambda kv: kv[0] != "every detector")]
    return "\n".join(lines) + "\n"


def detection_csv(dets: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for d in dets:
        det = d.get("detection") or {}
        extra = {k: ("" if det.get(k) is None else (round(det[k], 6) if isinstance(det[k], float) else det[k]))
                 for k in ("source", "inputs", "poisoned", "auroc", "tpr_at_5fpr", "precision_at_k", *TRIGGER_KEYS)}
        w.writerow({**extra, "level": d.get("level", "model"),
                    "dataset": d["dataset"], "model": d["model"], "attack": d["attack"], "detector": d["detector"],
                    "seed": d["seed"], "status": d["status"], "backdoored": d["truth"]["backdoored"],
                    "target": "" if d["truth"]["target"] is None else d["truth"]["target"],
                    "model_asr": "" if d["truth"].get("asr") is None else round(100 * d["truth"]["asr"], 2),
                    "label": "" if det.get("label") is None else det["label"],
                    "label_correct": "" if det.get("label_correct") is None else det["label_correct"],
                    "score": "" if det.get("score") is None else round(det["score"], 6),
                    "seconds": "" if d["seconds"].get("detect") is None else round(d["seconds"]["detect"], 2)})
    return buf.getvalue()


def detection_latex(dets: list[dict]) -> str:
    lines = []
    for ds, model in ordered((d["dataset"], d["model"]) for d in model_level(dets)):
        lines += [f"% Detection: {ds} / {model}", r"\begin{tabular}{lcccccc}", r"\toprule",
                  r"Detector & Label acc. (\%) & AUROC & Backdoored / clean & Label acc., implanted & AUROC, implanted "
                  r"& Median s \\", r"\midrule"]
        for r in (r for r in summary(dets) if (r["dataset"], r["model"]) == (ds, model)):
            lines.append(f"{tex_escape(r['detector'])} & {pct(r['label_acc'])} ({r['label_n']}) & {_num(r['auroc'])} & "
                         f"{r['n_backdoored']} / {r['n_clean']} & {pct(r['label_acc_implanted'])} "
                         f"({r['label_n_implanted']}) & {_num(r['auroc_implanted'])} & {_num(r['median_s'], '.1f')} \\\\")
        lines += [r"\bottomrule", r"\end{tabular}", ""]
    for ds, model in ordered((d["dataset"], d["model"]) for d in dets):
        names, per = _sample_rows(dets, ds, model)
        if not per:
            continue
        lines += [f"% Poisoned-sample detection (AUROC / TPR at 5% FPR / precision at k): {ds} / {model}",
                  r"\begin{tabular}{l" + "c" * len(names) + "}", r"\toprule",
                  "Attack & " + " & ".join(tex_escape(n) for n in names) + r" \\", r"\midrule"]
        for atk, texts in per:
            lines.append(tex_escape(atk) + " & " + " & ".join(t.replace(MIX_MARK, r"$^\ddagger$") for t in texts) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def plot_roc(dets: list[dict], path: Path) -> Path | None:
    """ROC curves of model-level detectors; None when no (dataset, model) has both kinds of model."""
    panels = []
    dets = model_level(dets)
    for ds, model in ordered((d["dataset"], d["model"]) for d in dets):
        curves = []
        ok = [d for d in dets if (d["dataset"], d["model"]) == (ds, model) and d["status"] == "ok"]
        for i, name in enumerate(ordered(d["detector"] for d in ok)):
            pos = [d["detection"]["score"] for d in ok if d["detector"] == name and d["truth"]["backdoored"]]
            neg = [d["detection"]["score"] for d in ok if d["detector"] == name and d["truth"]["backdoored"] is False]
            if pos and neg:
                curves.append((i, name, *roc_points(pos, neg), auroc(pos, neg)))
        if curves:
            panels.append((f"{ds} / {model}", curves))
    if not panels:
        return None
    fig, axes = figure(len(panels), 3, 3.6, 3.4)
    for ax, (title, curves) in zip(axes, panels):
        for i, name, fpr, tpr, area in curves:
            ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{name} (AUROC {area:.2f})", **series_style(i))
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        ax.set(title=title, xlabel="false positive rate (clean models)", ylabel="true positive rate (backdoored)",
               xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path)


TRIGGER_PANELS = (("", "recovered", "trigger_asr"), ("unlearned_", "unlearned model only", "unlearned_trigger_asr"),
                  ("baseline_", "backdoored only", "baseline_trigger_asr"))


def plot_triggers(run_dir: Path, dets: list[dict], path: Path) -> Path | None:
    """Per attack with a recovered trigger: the true trigger (amplified difference of the run's example
    pair), the recovered mask x pattern, the unlearned model's (where the detector keeps it), and the baseline's."""
    from bench.store import load_tensors

    rows = []
    for d in dets:
        f = (d.get("info") or {}).get("tensors_file")
        ex = run_dir / "examples" / f"{slug(d['dataset'])}-{d['attack']}.safetensors"
        if d["status"] != "ok" or not d["truth"]["backdoored"] or not f or not (run_dir / f).exists() or not ex.exists():
            continue
        t = load_tensors(run_dir / f)
        if "mask" not in t:
            continue
        e = load_tensors(ex)
        true = (e["triggered"].float() - e["clean"].float()).abs()
        true = (true / true.max().clamp_min(1)).permute(1, 2, 0).numpy()
        rec = [(lab, k, (t[f"{p}mask"] * t[f"{p}pattern"]).permute(1, 2, 0).clamp(0, 1).numpy())
               for p, lab, k in TRIGGER_PANELS if f"{p}mask" in t]
        rows.append((f"{d['attack']} s{d['seed']} ({d['detector']})", true, rec, d["detection"]))
    if not rows:
        return None
    cols = 1 + max(len(rec) for _, _, rec, _ in rows)
    fig, axes = figure(cols * len(rows), cols, 1.9, 2.0)
    for ax in axes:
        ax.axis("off")
    for i, (title, true, rec, det) in enumerate(rows):
        panels = [("true trigger (amplified)", true)]
        panels += [(f"{lab}: ASR {pct(det.get(k))}", img) for lab, k, img in rec]
        for j, (lab, img) in enumerate(panels):
            ax = axes[cols * i + j]
            ax.axis("on")
            ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
            ax.set_title(f"{title}\n{lab}" if j == 0 else lab, fontsize=6)
            ax.set_xticks([]), ax.set_yticks([])
    return save_png(fig, path)


def write_detection_reports(run_dir: str | Path, dets: list[dict] | None = None) -> dict[str, Path]:
    """Write the detection files into ``RUN_DIR/report/``; {} (and no stale files) without detections.

    ``dets``: the run's detection records when the caller has loaded them already."""
    out = Path(run_dir) / "report"
    dets = load_detections(run_dir) if dets is None else dets
    written: dict[str, Path] = {}
    if dets:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("detection.md", detection_markdown(dets)), ("detection.csv", detection_csv(dets)),
                           ("detection.tex", detection_latex(dets))):
            atomic_write_text(out / name, text)
            written[name] = out / name
        if plot_roc(dets, out / "roc.png") is not None:
            written["roc.png"] = out / "roc.png"
        if plot_triggers(Path(run_dir), dets, out / "triggers.png") is not None:
            written["triggers.png"] = out / "triggers.png"
    for name in DETECTION_FILES:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    return written
