"""The run folder, written by the driver alone: a lock, one file per finished cell, the merged records.

    RUN_DIR/cells/<cell>.json     one per finished removal cell (atomic write)
    RUN_DIR/detect/<cell>.json    one per finished detection cell
    RUN_DIR/tensors/<cell>.safetensors   tensors a cell returned (NC's reversed triggers), written before its record
    RUN_DIR/examples/             a clean/triggered pair per attack, for the trigger gallery
    RUN_DIR/records.jsonl         every removal record, this grid's cells first in grid order
    RUN_DIR/detections.jsonl      every detection record

The cell files are the truth; ``records.jsonl`` and ``detections.jsonl`` are regenerated from the
records held in memory (read once at start), atomically, while a grid runs and always at its end.
While it runs, a rewrite waits ``RECORDS_EVERY`` seconds after the last one, or longer where that
one took more than ``RECORDS_SHARE`` of the wait (a large grid's file), and each record's JSON line
is encoded once and kept: the driver's cost per finished cell does not grow with the grid
(re-reading every cell file after each cell, as before 2026-12-05, did; so did re-sorting and
re-encoding every record after each cell, and a rewrite every 2 s of a file that took longer to
write as the grid grew, until 2026-12-05: ``bench perf --driver`` measures it). A run killed at
any moment resumes: finished cells are skipped (``is_done``), the merged files are rebuilt.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from pathlib import Path
from typing import Iterable

from bench.detect import INPUTS_VERSION, NOT_APPLICABLE
from bench.registry import BenchError
from bench.run.cells import defense_pool
from bench.run.plan import DefenseCell, DetectCell
from bench.store import atomic_write_text, fault_point, save_tensors, write_json

RECORDS_EVERY = 2.0  # seconds between two rewrites of records.jsonl while a grid runs, at least
RECORDS_SHARE = 0.05  # ... and at most this share of the driver's time goes to the rewrites


class RunDir:
    """One run's folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.cells = self.path / "cells"
        self.tensors = self.path / "tensors"
        self.detect = self.path / "detect"
        self.records: dict[str, dict] | None = None  # cell id -> record, once ``load`` has run
        self.detections: dict[str, dict] | None = None
        self._written = 0.0  # when the last rewrite ended (time.monotonic)
        self._took = 0.0  # how long it took
        self._lines: dict[tuple[str, str], tuple[dict, dict | None, str]] = {}  # (file, cell) -> (record, block, its line)

    def lock(self):
        """Hold an exclusive lock for the run; a second concurrent run on the same folder is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise BenchError(f"another bench run is using {self.path}; wait for it or pass a different --out") from None
        return f

    def finished(self, folder: Path | None = None) -> dict[str, dict]:
        """Every whole record file of ``folder`` (the removal cells by default), by cell id; torn ones are skipped."""
        done = {}
        for p in sorted((folder or self.cells).glob("*.json")):
            try:
                rec = json.loads(p.read_bytes())
            except (json.JSONDecodeError, OSError):
                continue
            done[rec["cell"]] = rec
        return done

    def load(self) -> None:
        """Read every finished record once (the resume scan)."""
        self.records, self.detections = self.finished(), self.finished(self.detect)

    def write_cell(self, rec: dict) -> None:
        """Write a removal cell's record (its tensors first, see ``save_cell_tensors``)."""
        write_json(self.cells / f"{rec['cell']}.json", rec)
        if self.records is not None:
            self.records[rec["cell"]] = rec
        fault_point("cell_written")

    def write_detection(self, rec: dict) -> None:
        write_json(self.detect / f"{rec['cell']}.json", rec)
        if self.detections is not None:
            self.detections[rec["cell"]] = rec
        fault_point("cell_written")

    def save_cell_tensors(self, rec: dict) -> None:
        """Write a cell's tensors (``_tensors``) before its record, so a finished cell always has them."""
        tensors = rec.pop("_tensors", None)
        if tensors:
            save_tensors(self.tensors / f"{rec['cell']}.safetensors", tensors)
            fault_point("tensors_written")
            rec["info"]["tensors_file"] = f"tensors/{rec['cell']}.safetensors"

    def write_records(self, order: Iterable[str] = (), *, every: float = 0.0) -> list[dict] | None:
        """Regenerate records.jsonl (and detections.jsonl) from the records in memory: this grid's cells
        first, in grid order; return the removal records as written. Each model's detection results are
        also the ``detection`` block ({detector: {label, score, label_correct}}) of its ``none`` record.
        With ``every`` > 0 nothing is done (None is returned) if the last rewrite ended less than
        ``every`` seconds ago, or less than its own duration / ``RECORDS_SHARE`` ago."""
        if self.records is None:
            self.load()
        start = time.monotonic()
        if every > 0 and start - self._written < max(every, self._took / RECORDS_SHARE):
            return None
        dets = sorted(self.detections.values(), key=lambda r: r["cell"])
        by_model: dict[tuple, dict] = {}
        for d in dets:
            if d.get("status") == "ok":
                by_model.setdefault((d["dataset"], d["model"], d["attack"], d["seed"]), {})[d["detector"]] = d["detection"]
        rank = {c: i for i, c in enumerate(order)}
        recs, lines = [], []
        for r in sorted(self.records.values(), key=lambda r: (rank.get(r["cell"], len(rank)), r["cell"])):
            block = by_model.get((r["dataset"], r["model"], r["attack"], r["seed"])) if r["defense"] == "none" else None
            recs.append({**r, "detection": block} if block else r)
            lines.append(self._line("records", r, block))
        atomic_write_text(self.path / "records.jsonl", "".join(lines))
        fault_point("records_written")
        if dets or (self.path / "detections.jsonl").exists():
            atomic_write_text(self.path / "detections.jsonl", "".join(self._line("detections", d, None) for d in dets))
        self._written = time.monotonic()
        self._took = self._written - start
        return recs

    def _line(self, file: str, rec: dict, block: dict | None) -> str:
        """``rec`` (with ``block`` as its ``detection``) as one JSON line, encoded once while neither changes."""
        key = (file, rec["cell"])
        memo = self._lines.get(key)
        if memo is None or memo[0] is not rec or memo[1] != block:
            memo = (rec, block, json.dumps({**rec, "detection": block} if block else rec, sort_keys=True) + "\n")
            self._lines[key] = memo
        return memo[2]


def is_done(rec: dict | None, cell: DefenseCell | DetectCell) -> bool:
    """A removal or detection cell is finished if its record is ok (a detection cell's may also be "not
    applicable") and was made with the same model, the same defense or detector config, run config and
    defense-data pool (and, for a sample- or input-level detector, the same scored inputs: ``INPUTS_VERSION``)."""
    kind, comp = ("defense", cell.defense) if isinstance(cell, DefenseCell) else ("detector", cell.detector)
    if rec is None or rec.get("status") not in ("ok", *(() if kind == "defense" else (NOT_APPLICABLE,))):
        return False
    cfg = rec.get("config", {})
    want = _as_stored(kind, comp, cell.run)
    if kind == "detector" and cell.detector.level != "model" and cfg.get("inputs_version") != INPUTS_VERSION:
        return False
    return (cfg.get("model_key") == cell.job.key and cfg.get(kind) == want[kind] and cfg.get("run") == want["run"]
            and cfg.get("defense_pool", "unpoisoned") == defense_pool(cell.job.attack)
            and cfg.get("clean_data") == (cell.clean_data.facts if cell.clean_data is not None else None))


def _as_stored(kind: str, comp, run) -> dict:
    """The component's and the run's config as a record stores them (tuples become lists): once per
    component and run config (a 10,000-cell grid has a few dozen), not once per cell."""
    try:
        return _as_stored_memo(kind, comp, run)
    except TypeError:  # a component with an unhashable field
        return _as_stored_memo.__wrapped__(kind, comp, run)


@functools.lru_cache(maxsize=1024)
def _as_stored_memo(kind: str, comp, run) -> dict:
    return json.loads(json.dumps({kind: {"name": comp.name, **comp.to_dict()}, "run": run.to_dict()}))
