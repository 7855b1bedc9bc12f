"""Reading a run's records: ``RUN_DIR/records.jsonl`` (defense cells) and ``detections.jsonl`` (detection
cells), checked line by line, and the backdoored model's metrics each defended record is compared with."""

from __future__ import annotations

import json
from pathlib import Path

from bench.registry import BenchError
from bench.report.render import frac, ok

REQUIRED = ("dataset", "model", "attack", "defense", "seed", "status")
DETECTION_REQUIRED = ("dataset", "model", "attack", "detector", "seed", "status")
NAMES = ("dataset", "model", "attack", "defense", "detector", "status")


def records_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "records.jsonl"


def _lines(path: Path, required: tuple[str, ...]):
    """(line number, record) of each non-blank line; a torn or foreign line is a BenchError naming its number."""
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
            missing = [k for k in required if k not in rec]
            if missing:
                raise BenchError(f"{path}: line {lineno} lacks {', '.join(missing)}")
            bad = [k for k in NAMES if k in required and not isinstance(rec[k], str)]
            if bad or isinstance(rec["seed"], bool) or not isinstance(rec["seed"], int):
                what = ", ".join(bad + ([] if isinstance(rec["seed"], int) and not isinstance(rec["seed"], bool) else ["seed"]))
                raise BenchError(f"{path}: line {lineno} is not a record of this benchmark ({what} of the wrong type)")
            for k in ("metrics", "backdoor", "info", "seconds", "truth", "detection"):
                if rec.get(k) is not None and not isinstance(rec[k], dict):
                    raise BenchError(f"{path}: line {lineno}: {k!r} must be an object or null")
            yield lineno, rec


def load_records(run_dir: str | Path) -> list[dict]:
    """Parse ``RUN_DIR/records.jsonl``; later records of the same cell replace earlier ones.

    Raises:
        BenchError: the file is missing or has no records (naming the path), or a line
            is not a JSON object with the required keys and types (naming the line number).
    """
    path = records_path(run_dir)
    if not path.is_file():
        raise BenchError(f"no records at {path}: run `bench run` first, or pass the folder of a finished run")
    by_key: dict[tuple, dict] = {}
    for _, rec in _lines(path, REQUIRED):
        key = cell_key(rec)
        by_key.pop(key, None)  # a rerun's record replaces the old one, at the end
        by_key[key] = rec
    if not by_key:
        raise BenchError(f"{path} holds no records")
    return list(by_key.values())


def load_detections(run_dir: str | Path) -> list[dict]:
    """The detection records of a run (``detections.jsonl``; [] when there is none), checked like ``load_records``."""
    path = Path(run_dir) / "detections.jsonl"
    if not path.is_file():
        return []
    return [rec for _, rec in _lines(path, DETECTION_REQUIRED)]


def cell_key(rec: dict) -> tuple:
    return (rec["dataset"], rec["model"], rec["attack"], rec["defense"], rec["seed"])


def model_key(rec: dict) -> tuple:
    """The backdoored model a record is about: (dataset, model, attack, seed)."""
    return (rec["dataset"], rec["model"], rec["attack"], rec["seed"])


def with_backdoor_rows(records: list[dict]) -> list[dict]:
    """Add a ``none`` record (from ``backdoor``) for each seed cell that has no ``none`` record."""
    have = {model_key(r) for r in records if r["defense"] == "none"}
    extra: dict[tuple, dict] = {}
    for r in records:
        key = model_key(r)
        if key in have or key in extra or not isinstance(r.get("backdoor"), dict):
            continue
        extra[key] = {"dataset": key[0], "model": key[1], "attack": key[2], "defense": "none", "seed": key[3],
                      "status": "ok", "error": None, "metrics": r["backdoor"], "from_backdoor": True,
                      "departures": [d for d in r.get("departures") or [] if isinstance(d, dict)
                                     and d.get("kind") not in ("defense", "detector")]}
    return list(extra.values()) + records


def before_metrics(records: list[dict]) -> dict[tuple, dict]:
    """(dataset, model, attack, seed) -> the backdoored model's metrics (fractions): its ``none`` record
    where that finished, else a defended record's ``backdoor`` metrics (the same model before the defense)."""
    out: dict[tuple, dict] = {}
    for r in records:
        if r["defense"] == "none" and ok(r) and frac(r["metrics"], "ca") is not None:
            out[model_key(r)] = r["metrics"]
    for r in records:
        if isinstance(r.get("backdoor"), dict) and frac(r["backdoor"], "ca") is not None:
            out.setdefault(model_key(r), r["backdoor"])
    return out
