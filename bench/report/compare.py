"""Our numbers beside published ones (``results/reference/*.csv``, each with its source lines):
BackdoorBench's leaderboards (CIFAR-10 and GTSRB, PreAct-ResNet18, 10 % poisoning) per (attack, defense),
and RNP's pruning sweep against the official code's log."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from bench.registry import BenchError
from bench.report.grid import build_tables
from bench.report.render import value

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"



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
RNP_LOG = "rnp_official_log_badnets_cifar10"
# BackdoorBench's attack names -> ours (after _norm); defenses match after _norm (i-BAU -> ibau).
ATTACK_ALIASES = {"badnet": "badnets", "blended": "blend", "inputaware": "iad", "trojannn": "trojan",
                  "lowfrequency": "lf", "labelconsistent": "lc"}
# The protocol behind each leaderboard (BackdoorBench v2.2): its model, its training recipe
# (config/attack/prototype/<dataset>.yaml) and its defenses' clean data (config/defense/*/<dataset>.yaml: ratio),
# as (text, what is compared).
PROTOCOLS = {
    "cifar10": {"model": ("preactresnet18, width 64", ("preactresnet18", 64)),
                "recipe": ("100 epochs, SGD lr 0.01, cosine, batch 128", (100, 0.01, "cosine", 128)),
                "defense data": ("5% of the training set", 0.05)},
    "gtsrb": {"model": ("preactresnet18, width 64", ("preactresnet18", 64)),
              "recipe": ("50 epochs, SGD lr 0.01, cosine, batch 128", (50, 0.01, "cosine", 128)),
              "defense data": ("5% of the training set", 0.05)},
}
TRAIN_IMAGES = {"cifar10": 50000, "gtsrb": 39209}
REMOVED = 20.0  # "removes the backdoor": ASR after the defense <= 20 % (the bar the tables use)
NOT_IMPLANTED = "not implanted"  # the backdoored model's own ASR is <= REMOVED: nothing to remove


def _direction(asr: float | None) -> str:
    return "-" if asr is None else ("removes" if asr <= REMOVED else "keeps")


def our_protocol(records: list[dict], dataset: str) -> dict[str, list[tuple[str, object]]]:
    """The model, recipe and defense data of our cells on ``dataset`` as (text, what is compared), one per distinct value."""
    out: dict[str, dict] = {"model": {}, "recipe": {}, "defense data": {}}
    for r in records:
        c = r.get("config") if isinstance(r.get("config"), dict) else {}
        m, t = c.get("model"), c.get("train")
        if isinstance(m, dict):
            name, width = m.get("name", r.get("model")), m.get("width")
            out["model"][(name, width)] = f"{name}" + (f", width {width}" if width is not None else "")
        if isinstance(t, dict) and isinstance(t.get("lr"), (int, float)):
            key = (t.get("epochs"), t.get("lr"), t.get("schedule"), t.get("batch_size"))
            out["recipe"][key] = f"{key[0]} epochs, SGD lr {key[1]:g}, {key[2]}, batch {key[3]}"
        n = (r.get("info") or {}).get("defense_images")
        if isinstance(n, int) and n and r.get("defense") != "none" and dataset in TRAIN_IMAGES:
            share = round(n / TRAIN_IMAGES[dataset], 2)
            out["defense data"][share] = f"{n / TRAIN_IMAGES[dataset]:.0%} of the training set ({n} images)"
    return {k: [(text, key) for key, text in v.items()] for k, v in out.items()}


def protocol_lines(records: list[dict], dataset: str) -> list[str]:
    """Our protocol beside the leaderboard's, and which of model, recipe and defense data differ."""
    ours, theirs = our_protocol(records, dataset), PROTOCOLS.get(dataset)
    if theirs is None:
        return []
    lines = ["| | ours | published |", "|---|---|---|"]
    lines += [f"| {k} | {' / '.join(t for t, _ in ours[k]) or '-'} | {theirs[k][0]} |" for k in theirs]
    differ = [k for k in theirs if any(key != theirs[k][1] for _, key in ours[k])]
    if differ:
        lines += ["", f"The protocols differ in {', '.join(differ)}: the numbers are not comparable cell by cell; read the "
                      "directions. BackdoorBench also picks some defenses' operating points on test data."]
    return lines


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
                + [""] + protocol_lines(recs, dataset)
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
                fmt = lambda m: "-" if value(o, m) is None else f"{value(o, m):.2f}"  # noqa: E731
                lines.append(f"| {r['model']} s{r['seed']} | {p['threshold']} | {o.get('channels_pruned', '-')} | {p['channels_pruned']} "
                             f"| {fmt('ca')} | {p['ca_pct']} | {fmt('asr')} | {p['asr_pct']} |")
        if lines:
            parts.append("\n".join(["### RNP pruning sweep against the official code's log (oracle view, test set)", ""]
                                   + [f"> {s}" for s in ref.source]
                                   + ["", "| our model | threshold | pruned ours | pruned official | CA ours | CA official | ASR ours | ASR official |",
                                      "|---|---:|---:|---:|---:|---:|---:|---:|"] + lines))
    return "\n\n".join(parts) + "\n" if parts else ""
