"""Grid runner and store: resume, isolation of failing cells, atomic records, safetensors only."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import store
from bench.data import cache_dir
from bench.run.plan import DefenseCell, GridSpec, model_dir
from bench.run.rundir import RunDir
from bench.run.execute import run_grid
from bench.presets import PRESETS
from defenses.base import Defense, DefenseResult

TINY = {"synthetic": {"n_train": "300", "n_test": "100"}, "smallcnn": {"width": "4"}, "train": {"epochs": "1", "batch_size": "64"},
        "run": {"defense_data": "40"}}

CALLS: list[str] = []


@dataclasses.dataclass(frozen=True)
class Counting(Defense):
    name = "counting"
    description = "test-only: returns the model, counts calls"
    paper = "-"

    def __call__(self, model, clean, ctx):
        CALLS.append(f"n={len(clean)}")
        return DefenseResult(model, {"seen": len(clean)})


@dataclasses.dataclass(frozen=True)
class Counting2(Counting):
    """The same cell name ("counting"), another setting."""

    extra: int = 1


@dataclasses.dataclass(frozen=True)
class Boom(Defense):
    name = "boom"
    description = "test-only: always fails"
    paper = "-"

    def __call__(self, model, clean, ctx):
        raise RuntimeError("kaboom")


def cells_with(defenses, seeds=(0,)):
    base = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", seeds=list(seeds), overrides=TINY).plan().defense_cells
    return [dataclasses.replace(c, defense=d) for c in base for d in defenses]


def test_resume_skips_finished_cells_and_reuses_cached_models(tmp_path, monkeypatch):
    import bench.run.cells as grid

    trained = []
    real_train = grid.train
    monkeypatch.setattr(grid, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    CALLS.clear()
    cells = cells_with([Counting()], seeds=(0, 1))
    recs = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    assert [r["status"] for r in recs] == ["ok", "ok"] and len(CALLS) == 2 and len(trained) == 2
    assert all(r["info"]["seen"] == 40 for r in recs)
    before = (tmp_path / "run" / "records.jsonl").read_text()
    recs2 = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    assert len(CALLS) == 2 and len(trained) == 2  # nothing ran again
    assert (tmp_path / "run" / "records.jsonl").read_text() == before and recs2 == recs
    # A changed defense setting reruns that cell (its old record is replaced, not duplicated).
    run_grid([dataclasses.replace(c, defense=Counting2()) for c in cells], tmp_path / "run", preset="demo", progress=False,
             log=lambda m: None)
    assert len(CALLS) == 4 and len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 2
    # A new defense on the same grid trains nothing: the backdoored models come from the cache.
    run_grid(cells_with([Boom()], seeds=(0, 1)), tmp_path / "run2", preset="demo", progress=False, log=lambda m: None)
    assert len(trained) == 2


def test_failing_cell_is_recorded_and_the_rest_finish(tmp_path):
    cells = cells_with([Boom(), Counting()])
    recs = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    by_def = {r["defense"]: r for r in recs}
    assert by_def["boom"]["status"] == "failed" and "RuntimeError: kaboom" in by_def["boom"]["error"]
    assert by_def["counting"]["status"] == "ok" and 0 <= by_def["counting"]["metrics"]["ca"] <= 1
    lines = (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    assert sorted(json.loads(l)["defense"] for l in lines) == ["boom", "counting"]
    # A failed cell is tried again on rerun (and fails again, still recorded once).
    recs = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 2


def test_record_has_the_documented_fields(tmp_path):
    (rec,) = run_grid(cells_with([Counting()]), tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    for key in ("dataset", "model", "attack", "defense", "seed", "status", "error", "metrics", "seconds", "info", "config",
                "versions", "git", "backdoor"):
        assert key in rec
    assert set(rec["metrics"]) == {"ca", "asr", "ra"} and all(0 <= v <= 1 for v in rec["metrics"].values())
    assert set(rec["seconds"]) == {"train", "defense", "eval"}
    assert rec["config"]["attack"]["poison_rate"] == 0.1 and rec["config"]["train"]["epochs"] == 1
    assert rec["versions"]["torch"] == torch.__version__


def test_cache_holds_safetensors_and_json_only(tmp_path):
    (cell,) = cells_with([Counting()])
    run_grid([cell], tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    files = sorted(p.name for p in model_dir(cell.job).iterdir())
    assert files == ["attack.safetensors", "example.safetensors", "meta.json", "model.safetensors", "triggered.safetensors"]


def test_different_configs_get_different_cache_keys():
    a = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", overrides=TINY).plan().defense_cells[0].job
    b = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo",
                 overrides={**TINY, "badnets": {"poison_rate": "0.05"}}).plan().defense_cells[0].job
    c = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", seeds=[1], overrides=TINY).plan().defense_cells[0].job
    assert len({a.key, b.key, c.key}) == 3


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    store.atomic_write_text(path, "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]  # no temp file left behind


def test_concurrent_run_on_the_same_folder_is_refused(tmp_path):
    from bench.registry import BenchError

    rd = RunDir(tmp_path / "run")
    with rd.lock():
        with pytest.raises(BenchError, match="another bench run is using"):
            RunDir(tmp_path / "run").lock()


FAULT_GRID = ["--attack", "badnets,blend", "--defense", "none,nc", "--preset", "demo", "--seeds", "0", "--jobs", "1", "--quiet",
              *[f"--set={c}.{k}={v}" for c, kv in TINY.items() for k, v in kv.items()],
              "--set=nc.epochs=2", "--set=nc.batches_per_epoch=1", "--set=nc.unlearn_epochs=1"]


def _snapshot(out: Path, cache: Path) -> dict[str, dict[str, int]]:
    """mtime (ns) of every model entry and every file of the run folder: what a rerun rewrites shows."""
    models = {p.name: (p / "meta.json").stat().st_mtime_ns for p in (cache / "models").iterdir()} if (cache / "models").exists() else {}
    files = {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} if out.exists() else {}
    return {"models": models, "files": files}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after:model_cached:1", "after:cell_written:2", "after:records_written:2",
                                   "after:tensors_written:1"])
def test_a_run_killed_at_a_named_point_completes_on_rerun_and_reuses_what_was_finished(tmp_path, fault):
    """``BENCH_FAULT=after:<event>[:n]`` ends the run there as SIGKILL would; the rerun completes, retrains no
    cached model, recomputes no finished cell, and leaves every cell once, whole, with its tensors."""
    from bench.store import FAULT_EXIT

    out, cache = tmp_path / "run", Path(os.environ["BENCH_CACHE_DIR"])
    cmd = [sys.executable, "-m", "bench.cli", "run", *FAULT_GRID, "--out", str(out)]
    killed = subprocess.run(cmd, env={**os.environ, "BENCH_FAULT": fault}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == FAULT_EXIT, killed.stderr[-2000:]
    before = _snapshot(out, cache)
    finished_cells = {k for k in before["files"] if k.startswith("cells/")}
    done = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _snapshot(out, cache)
    assert len(after["models"]) == 2 and all(after["models"][m] == t for m, t in before["models"].items()), "no model retrained"
    assert all(after["files"][c] == before["files"][c] for c in finished_cells), "no finished cell recomputed"
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in recs) == sorted({r["cell"] for r in recs}) and len(recs) == 4
    assert all(r["status"] == "ok" for r in recs)
    for r in recs:  # every cell file is whole JSON and equals its line; NC's tensors are there
        assert json.loads((out / "cells" / f"{r['cell']}.json").read_text()) == r
        if r["defense"] == "nc":
            assert (out / r["info"]["tensors_file"]).exists()
    leftovers = [p for p in [*out.rglob(".*"), *(cache / "models").glob(".*")] if p.name != ".lock"]
    assert not leftovers, leftovers  # no temporary file or folder left behind


def test_parallel_jobs_give_the_same_records_as_one_process(tmp_path, monkeypatch):
    """The same grid in-process and with --jobs 2, at the same thread count per model: the same
    metrics and defense facts to the last digit (RNP's masks, thresholds and curves included)."""
    import defenses.rnp
    from bench.run.execute import cpu_cores

    cells = GridSpec(attacks=["badnets", "blend"], defenses=["none", "rnp"], preset="demo", overrides=TINY).plan().defense_cells
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, cpu_cores() // 2))  # what each of the two workers gets
    try:
        serial = run_grid(cells, tmp_path / "one", preset="demo", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    shutil.rmtree(cache_dir() / "models")  # retrain in the workers
    monkeypatch.setattr(defenses.rnp, "_UNLEARNED", {})  # nothing carried over in this process either
    parallel = run_grid(cells, tmp_path / "two", preset="demo", jobs=2, progress=False, log=lambda m: None)
    assert [r["cell"] for r in parallel] == [r["cell"] for r in serial]  # records in grid order
    for a, b in zip(serial, parallel):
        assert b["status"] == "ok" and a["train_threads"] == b["train_threads"]
        assert a["metrics"] == b["metrics"] and a["backdoor"] == b["backdoor"]  # exact, not a tolerance
        assert json.dumps(a["info"], sort_keys=True) == json.dumps(b["info"], sort_keys=True)


def test_a_lone_job_of_a_parallel_grid_trains_with_the_workers_thread_count(tmp_path):
    # CPU results depend on the thread count, so a model of a --jobs N grid must train with the
    # workers' count even when it is the only job of its stage (run in-process).
    from bench.run.execute import cpu_cores

    before = torch.get_num_threads()
    ambient = 7  # not what --jobs 2 gives on any machine with fewer than 14 cores
    torch.set_num_threads(ambient)
    try:
        cells = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", overrides=TINY).plan().defense_cells
        (rec,) = run_grid(cells, tmp_path / "run", preset="demo", jobs=2, progress=False, log=lambda m: None)
        assert rec["train_threads"] == max(1, cpu_cores() // 2) != ambient
        assert torch.get_num_threads() == ambient  # restored afterwards
        shutil.rmtree(cache_dir() / "models")
        (rec,) = run_grid(cells, tmp_path / "serial", preset="demo", jobs=1, progress=False, log=lambda m: None)
        assert rec["train_threads"] == ambient  # --jobs 1 keeps the process's own count
    finally:
        torch.set_num_threads(before)


def test_jobs_auto_is_one_worker_per_core_on_the_cpu_and_one_on_cuda():
    from bench.cli import _jobs
    from bench.run.execute import cpu_cores

    assert _jobs("auto", "cpu") == cpu_cores() and _jobs("auto", "cuda") == 1 and _jobs("3", "cpu") == 3
    assert PRESETS["demo"].jobs == "auto" and PRESETS["quick"].jobs == 1


SEEN: list = []


@dataclasses.dataclass(frozen=True)
class Spy(Defense):
    name = "spy"
    description = "test-only: records what a defense receives"
    paper = "-"

    def __call__(self, model, clean, ctx):
        SEEN.append((clean.x.clone(), clean.y.clone(), dict(vars(ctx))))
        return DefenseResult(model, {})


def test_a_defense_receives_only_clean_training_images_and_no_attack_facts(tmp_path):
    """Fails if the grid hands a defense test images, poisoned images, or the attack's target or trigger."""
    from bench.data import DATASETS
    from bench.run.cells import load_model

    SEEN.clear()
    cells = cells_with([Spy()])
    recs = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda s: None)
    assert recs[0]["status"] == "ok" and len(SEEN) == 1
    x, y, ctx = SEEN[0]
    assert set(ctx) == {"num_classes", "augmentation", "seed", "device", "bf16", "progress"}  # nothing about the attack
    train_set, test_set = DATASETS.get("synthetic")(n_train=300, n_test=100, noise=PRESETS["demo"].fields["synthetic"]["noise"]).load()
    _, _, poison_idx, triggered = load_model(cells[0].job, "cpu")
    rows = lambda t: {bytes(r.numpy().tobytes()) for r in t.flatten(1)}  # noqa: E731
    ours = rows(x)
    assert len(ours) == len(x) == 40
    clean_train = torch.ones(len(train_set), dtype=torch.bool)
    clean_train[poison_idx] = False
    assert ours <= rows(train_set.x[clean_train]), "only clean training images"
    assert not ours & rows(test_set.x) and not ours & rows(triggered.x), "no test image, clean or triggered"
    lookup = {bytes(r.numpy().tobytes()): int(l) for r, l in zip(train_set.x.flatten(1), train_set.y)}
    assert [lookup[bytes(r.numpy().tobytes())] for r in x.flatten(1)] == y.tolist(), "with their true labels"


@dataclasses.dataclass(frozen=True)
class FakeNC(Defense):
    name = "nc"
    description = "test-only: returns reversed-trigger tensors as NC does"
    paper = "-"

    def __call__(self, model, clean, ctx):
        masks = torch.zeros(10, 1, 32, 32)
        masks[3, :, -4:, -4:] = 1.0
        tensors = {"labels": torch.arange(10), "masks": masks, "patterns": torch.ones(10, 3, 32, 32),
                   "norms": masks.flatten(1).sum(1) + torch.arange(10.0), "flagged": torch.arange(10) == 3}
        return DefenseResult(model, {}, tensors=tensors)


def test_defense_tensors_are_saved_with_the_cell_and_shown_in_the_gallery(tmp_path):
    from bench.report import load_records, write_reports
    from bench.report.plots import _reversed_triggers

    run = tmp_path / "run"
    recs = run_grid(cells_with([FakeNC()]), run, preset="demo", progress=False, log=lambda s: None)
    assert recs[0]["status"] == "ok" and "_tensors" not in recs[0]
    rel = recs[0]["info"]["tensors_file"]
    saved = store.load_tensors(run / rel)
    assert saved["masks"].shape == (10, 1, 32, 32) and bool(saved["flagged"][3])
    shown = _reversed_triggers(run, load_records(run))
    img, caption = shown[("synthetic", "badnets")]
    assert caption == "label 0, |m| 0" and float(img.sum()) == 0  # label 0 has the smallest norm (0 + 0)
    assert "gallery.png" in write_reports(run)


def test_a_record_made_with_the_old_defense_pool_is_redone_for_clean_label_attacks_only():
    """Records before 2026-12-02 have no ``defense_pool``: their defense data left out every poisoned
    image. That changed only for clean-label attacks, so only their cells are recomputed on resume."""
    from bench.run.rundir import is_done
    from bench.run.cells import base_record

    cells = GridSpec(attacks=["badnets", "sig"], defenses=["none"], preset="demo", overrides=TINY).plan().defense_cells
    for cell in cells:
        rec = base_record(cell, "demo")
        rec["status"] = "ok"
        assert is_done(rec, cell), "a record of the current code is finished"
        del rec["config"]["defense_pool"]
        assert is_done(rec, cell) == (cell.job.attack.name == "badnets")


class _Constant(torch.nn.Module):
    """Predicts ``label`` for every input: a model no sweep would prefer to the backdoored one's accuracy."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        out[:, self.label] = 1.0
        return out


@dataclasses.dataclass(frozen=True)
class Sweeper(Defense):
    name = "sweeper"
    description = "test-only: returns a useless model, with a sweep whose other point is the accurate original"
    paper = "-"

    def __call__(self, model, clean, ctx):
        chosen = _Constant(5)
        return DefenseResult(chosen, {"threshold": 0.0}, sweep=lambda: iter([(0.0, chosen), (0.5, model)]))


def test_the_oracle_sweep_never_feeds_back_into_the_record(tmp_path):
    """The record is the evaluation of the model the defense returned, whatever its oracle curve prefers."""
    from bench.metrics import evaluate

    trained = {**TINY, "synthetic": {"n_train": "600", "n_test": "100"}, "train": {"epochs": "6", "batch_size": "64"}}
    (none,) = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", overrides=trained).plan().defense_cells
    cell = dataclasses.replace(none, defense=Sweeper())
    (rec,) = run_grid([cell], tmp_path / "run", preset="demo", progress=False, log=lambda m: None)
    curve = rec["info"]["oracle_curve"]
    assert [p["threshold"] for p in curve] == [0.0, 0.5] and curve[1]["ca"] > curve[0]["ca"] + 0.3
    _, test_set = cell.job.dataset.load()
    from bench.run.cells import load_model

    triggered = load_model(cell.job, "cpu")[3]
    assert rec["metrics"] == evaluate(_Constant(5), test_set, triggered, bf16=cell.job.train.bf16)
    assert rec["metrics"]["ca"] < 0.2 and rec["info"]["threshold"] == 0.0


@pytest.mark.parametrize("change, retrained, recomputed", [
    ({"smallcnn": {"width": "6"}}, {"badnets", "blend"}, {"badnets-none", "badnets-counting", "blend-none", "blend-counting"}),
    ({"train": {"lr": "0.05"}}, {"badnets", "blend"}, {"badnets-none", "badnets-counting", "blend-none", "blend-counting"}),
    ({"badnets": {"poison_rate": "0.05"}}, {"badnets"}, {"badnets-none", "badnets-counting"}),
    ({"run": {"defense_data": "30"}}, set(), {"badnets-none", "badnets-counting", "blend-none", "blend-counting"}),
    ({"counting": {"extra": "2"}}, set(), {"badnets-counting", "blend-counting"}),
    ("pool", set(), {"badnets-none", "badnets-counting"}),
], ids=["model-field", "training-field", "attack-field", "run-field", "defense-field", "defense-data-pool"])
def test_a_changed_setting_recomputes_exactly_what_it_touches(tmp_path, monkeypatch, change, retrained, recomputed):
    """Rerun a finished grid with one setting changed: the models and cells it determines are redone, nothing else.
    ("pool": the badnets cells' records say they were made with another defense-data pool.)"""
    import bench.run.cells as grid

    trained: list[str] = []
    real_train = grid.train
    monkeypatch.setattr(grid, "train", lambda model, data, *a, desc="", **k: trained.append(desc.split("/")[2])
                        or real_train(model, data, *a, desc=desc, **k))

    def cells(overrides):
        base = GridSpec(attacks=["badnets", "blend"], defenses=["none"], preset="demo",
                        overrides={k: v for k, v in overrides.items() if k != "counting"}).plan().defense_cells
        extra = overrides.get("counting", {}).get("extra")
        counting = Counting2(extra=int(extra)) if extra else Counting2()
        return [dataclasses.replace(c, defense=d) for c in base for d in (c.defense, counting)]

    out = tmp_path / "run"
    run_grid(cells(TINY), out, preset="demo", progress=False, log=lambda m: None)
    assert sorted(trained) == ["badnets", "blend"]
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    trained.clear()
    if change == "pool":
        for p in (out / "cells").glob("*badnets*"):
            rec = json.loads(p.read_text())
            rec["config"]["defense_pool"] = "all"
            store.write_json(p, rec)
        stamp = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
        overrides = TINY
    else:
        overrides = {k: {**TINY.get(k, {}), **change.get(k, {})} for k in {*TINY, *change}}
    recs = run_grid(cells(overrides), out, preset="demo", progress=False, log=lambda m: None)
    assert set(trained) == retrained and len(trained) == len(retrained)
    redone = {p.name for p in (out / "cells").iterdir() if p.stat().st_mtime_ns != stamp[p.name]}
    assert redone == {f"synthetic-smallcnn-{c.split('-')[0]}-{c.split('-')[1]}-s0.json" for c in recomputed}
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    assert len((out / "records.jsonl").read_text().splitlines()) == 4
