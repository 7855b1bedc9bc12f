"""``bench perf --driver`` and ``bench perf --grid``: what the run layer itself costs.

``--driver`` (``driver_perf``): the driver's own cost per cell, on grids of 1,000 and 10,000
cells, with every part real but the work: the planner (``GridSpec.plan``), the task graph, the
in-process executor through ``run_grid``'s driver loop, the record writing (``RunDir``: one
file per cell, ``records.jsonl``) and the resume scan. Each task's body is a stub
(``Settings.tasks``): a train task that returns a plausible metadata dict (and writes the
gallery example the driver copies), cells that return records built with
``bench.run.cells.base_record`` (the real shape, ~3 KB of JSON, an oracle curve included).
The grid is the synthetic dataset and the demo's model, ``GRID_ATTACKS`` x every defense x
as many seeds as the size needs (cells = datasets x models x attacks x defenses x seeds).
Per size it reports the plan's seconds, the run's, the stubs' share, the driver's
milliseconds per cell (everything but the stubs), and a rerun on the finished folder (plan,
resume scan, nothing to run); then the ratio of the largest size's ms/cell to the smallest's.

``--grid`` (``grid_perf``): the same small real grid (the demo preset, 3 attacks x 3 defenses)
run twice on this machine, by ``LocalProcesses`` (``--jobs 2``) and by a local 2-worker Dask
cluster (``distributed.LocalCluster``, one thread per worker, worker processes), each into its
own fresh run folder and its own fresh model cache, so that each side trains every model: the
wall times and their ratio.

No timing is asserted anywhere; the unit test runs ``driver_perf`` at a tiny size for the
consistency of what it wrote.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.run.cells import base_record, device_info, job_config
from bench.run.execute import InProcess, LocalProcesses, run_grid
from bench.run.plan import DefenseCell, GridSpec, TrainJob, model_dir
from bench.store import save_tensors

GRID_ATTACKS = ["badnets", "blend", "trojan", "lc", "lf", "sig", "wanet", "bpp", "ctrl", "adaptive_blend"]
CURVE_POINTS = 19  # RNP's oracle curve: the largest part of a real record


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- the stubs


class Stubs:
    """The stub task bodies, counting their calls and the seconds spent in them."""

    def __init__(self) -> None:
        self.calls = {"train": 0, "defend": 0}
        self.seconds = 0.0

    def mapping(self) -> dict:
        return {"train": self.train, "defend": self.defend}

    def train(self, job: TrainJob, key: str, device: str, ship: bool, progress: bool, *deps: dict) -> dict:
        t0 = time.perf_counter()
        self.calls["train"] += 1
        d = model_dir(job)
        if not (d / "example.safetensors").exists():  # the driver copies one per attack into the run folder
            save_tensors(d / "example.safetensors", {"clean": torch.zeros(3, 4, 4, dtype=torch.uint8),
                                                     "triggered": torch.ones(3, 4, 4, dtype=torch.uint8)})
        asr = 0.97 if job.attack.has_trigger else None
        meta = {
            "key": key,
            "metrics": {"ca": 0.91, "asr": asr, "ra": None if asr is None else 0.02},
            "train": {"seconds": 12.5, "threads": 1, "epochs": job.train.epochs, "steps": 400, "final_loss": 0.123},
            "eval_seconds": 0.4,
            "poisoned": 500,
            "config": job_config(job),
            "data": job.data,
            "device": device_info(device),
        }
        self.seconds += time.perf_counter() - t0
        return {"key": key, "meta": meta, "error": None, "files": None}

    def defend(self, cell: DefenseCell, device: str, preset: str, keep_model: bool, model: dict) -> dict:
        t0 = time.perf_counter()
        self.calls["defend"] += 1
        rec = base_record(cell, preset)
        meta = model["meta"]
        rec.update(backdoor=meta["metrics"], train_threads=meta["train"]["threads"], train_device=meta["device"],
                   data=cell.job.data, device=device_info(device), status="ok")
        rec["seconds"].update(train=meta["train"]["seconds"], defense=3.21, eval=0.55)
        rec["metrics"] = {"ca": 0.88, "asr": 0.04, "ra": 0.81}
        rec["info"] = {
            "defense_images": 500, "threshold": 0.5, "pruned": 17,
            "oracle_curve": [{"threshold": round(0.05 * i, 2), "pruned": i, "ca": 0.9 - 0.01 * i, "asr": 0.9 / (i + 1),
                              "ra": 0.05 * i} for i in range(CURVE_POINTS)],
            "oracle_curve_images": [200, 200],
        }
        self.seconds += time.perf_counter() - t0
        return rec


# ---------------------------------------------------------------- --driver


def grid_spec(cells: int) -> GridSpec:
    """A demo-preset grid of at least ``cells`` removal cells: ``GRID_ATTACKS`` (the first few, for fewer than
    100 cells) x every defense x enough seeds (1,000 cells: 10 x 10 x 10 seeds; 10,000: 100 seeds)."""
    from defenses import DEFENSES

    defenses = DEFENSES.names()
    attacks = GRID_ATTACKS[:max(1, min(len(GRID_ATTACKS), math.ceil(cells / len(defenses))))]  # fewer for a tiny grid
    seeds = max(1, math.ceil(cells / (len(attacks) * len(defenses))))
    return GridSpec(attacks=attacks, defenses=defenses, preset="demo", seeds=list(range(seeds)))


def driver_once(cells: int, folder: Path) -> dict[str, Any]:
    """One size: plan, run with stubs, rerun (resume), in ``folder`` (its run folder and model cache)."""
    with _env(BENCH_CACHE_DIR=str(folder / "cache")):
        lines: list[str] = []
        stubs = Stubs()
        t0 = time.perf_counter()
        plan = grid_spec(cells).plan()
        t_plan = time.perf_counter() - t0
        out = folder / "run"
        records = run_grid(plan.defense_cells, out, preset="demo", device="cpu", executor=InProcess(), progress=False,
                           log=lines.append, tasks=stubs.mapping())
        t_run = time.perf_counter() - t0 - t_plan

        rerun = Stubs()
        t1 = time.perf_counter()
        plan2 = grid_spec(cells).plan()
        again = run_grid(plan2.defense_cells, out, preset="demo", device="cpu", executor=InProcess(), progress=False,
                         log=lines.append, tasks=rerun.mapping())
        t_resume = time.perf_counter() - t1

    n = len(plan.defense_cells)
    lines_jsonl = (out / "records.jsonl").read_text().splitlines()
    sizes = [p.stat().st_size for p in (out / "cells").glob("*.json")]
    return {
        "cells": n,
        "models": stubs.calls["train"],
        "plan_s": t_plan,
        "run_s": t_run,
        "total_s": t_plan + t_run,
        "stub_s": stubs.seconds,
        "driver_ms_per_cell": 1000 * (t_plan + t_run - stubs.seconds) / n,
        "resume_s": t_resume,
        "record_kb": sum(sizes) / max(1, len(sizes)) / 1024,
        # consistency, for the test (and a reader's trust in the figures)
        "defend_calls": stubs.calls["defend"],
        "returned": len(records),
        "cell_files": len(sizes),
        "jsonl_cells": [json.loads(x)["cell"] for x in lines_jsonl],
        "planned_cells": [c.id for c in plan.defense_cells],
        "resume_calls": sum(rerun.calls.values()),
        "resume_returned": len(again),
    }


def driver_perf(sizes: list[int], folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """``driver_once`` for each size (each in a fresh folder), and the ms/cell ratio of the largest to the smallest."""
    out: dict[str, Any] = {"cpu": cpu_model(), "avx512_bf16": has_avx512_bf16(), "sizes": []}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for n in sizes:
            out["sizes"].append(driver_once(n, Path(tmp) / f"n{n}"))
    first, last = out["sizes"][0], out["sizes"][-1]
    out["ratio"] = last["driver_ms_per_cell"] / first["driver_ms_per_cell"]
    return out


def format_driver(r: dict[str, Any]) -> str:
    rows = [f"driver, stub tasks ({r['cpu']}; avx512_bf16: {'yes' if r['avx512_bf16'] else 'no'})",
            f"{'cells':>8} {'models':>7} {'plan s':>8} {'run s':>8} {'total s':>8} {'stubs s':>8} {'ms/cell':>8} "
            f"{'resume s':>9} {'record KB':>9}"]
    for s in r["sizes"]:
        rows.append(f"{s['cells']:>8} {s['models']:>7} {s['plan_s']:>8.2f} {s['run_s']:>8.2f} {s['total_s']:>8.2f} "
                    f"{s['stub_s']:>8.2f} {s['driver_ms_per_cell']:>8.3f} {s['resume_s']:>9.2f} {s['record_kb']:>9.2f}")
    rows.append(f"ms/cell at {r['sizes'][-1]['cells']} cells / at {r['sizes'][0]['cells']}: {r['ratio']:.2f}")
    return "\n".join(rows)


# ---------------------------------------------------------------- --grid


def grid_perf(attacks: list[str], defenses: list[str], preset: str = "demo", jobs: int = 2, seeds: list[int] = (0,),
              sets: dict[str, dict[str, str]] | None = None, folder: str | os.PathLike | None = None,
              log=lambda m: None) -> dict[str, Any]:
    """The same real grid by ``LocalProcesses(jobs)`` and on a local Dask cluster of ``jobs`` one-thread
    worker processes, each side in a fresh run folder and a fresh model cache (each trains every model)."""
    from distributed import LocalCluster

    from bench.run.execute import DaskCluster

    spec = GridSpec(attacks=attacks, defenses=defenses, preset=preset, seeds=list(seeds), overrides=sets or {})
    out: dict[str, Any] = {"cpu": cpu_model(), "avx512_bf16": has_avx512_bf16(), "cores": os.cpu_count(),
                           "attacks": attacks, "defenses": defenses, "preset": preset, "jobs": jobs, "seeds": list(seeds)}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        def side(name: str, executor) -> dict[str, Any]:
            with _env(BENCH_CACHE_DIR=str(Path(tmp) / name / "cache")):
                plan = spec.plan()
                t0 = time.perf_counter()
                recs = run_grid(plan.defense_cells, Path(tmp) / name / "run", preset=preset, device="cpu",
                                executor=executor, progress=False, log=log)
                wall = time.perf_counter() - t0
            return {"wall_s": wall, "cells": len(recs), "ok": sum(r["status"] == "ok" for r in recs),
                    "describe": executor.describe(),
                    "train_s": sorted({r["config"]["model_key"]: r["seconds"]["train"] for r in recs}.values()),
                    "defense_s": {r["cell"]: r["seconds"]["defense"] for r in recs}}

        local = LocalProcesses(jobs)
        try:
            out["local"] = side("local", local)
        finally:
            local.close()
        t0 = time.perf_counter()
        with LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            out["dask_cluster_start_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            dask = DaskCluster(cluster.scheduler_address)
            out["dask_connect_s"] = time.perf_counter() - t0
            try:
                out["dask"] = side("dask", dask)
            finally:
                dask.close()
    out["ratio"] = out["dask"]["wall_s"] / out["local"]["wall_s"]
    return out


def format_grid(r: dict[str, Any]) -> str:
    rows = [f"grid: {','.join(r['attacks'])} x {','.join(r['defenses'])}, preset {r['preset']}, seeds {r['seeds']} "
            f"({r['cpu']}, {r['cores']} cores; avx512_bf16: {'yes' if r['avx512_bf16'] else 'no'})"]
    for name in ("local", "dask"):
        x = r[name]
        rows.append(f"{name:6s} {x['wall_s']:8.1f} s  {x['ok']}/{x['cells']} cells ok  "
                    f"(training {sum(x['train_s']):.1f} s over {len(x['train_s'])} models; {x['describe']})")
    rows.append(f"Dask cluster start {r['dask_cluster_start_s']:.1f} s, connect {r['dask_connect_s']:.1f} s (not in its wall time)")
    rows.append(f"Dask / local: {r['ratio']:.2f}")
    return "\n".join(rows)


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    from bench.run.cells import cpu_name

    return cpu_name()


def has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False
