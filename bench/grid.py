"""The grid runner: phase 1 trains each backdoored model once, phase 2 runs each defense.

- ``GridSpec.resolve`` builds and validates every component config before any work.
- Phase 1, once per (dataset, model, attack, seed, training config): poison, train,
  evaluate, and cache the weights, the attack state, the poisoned indices and the
  triggered test set as safetensors + JSON under a content hash in
  ``cache_dir()/models``. The cache entry is written into a temporary folder and
  renamed into place, so it is either whole or absent. An attack that needs a clean
  model (``needs_clean_model``) gets the ``clean`` attack's model of the same dataset,
  model, recipe and seed (``reference_job``) from the same cache; run_grid trains those
  clean jobs first, so with ``--jobs N`` each is trained once and then shared.
- Phase 2, per cell (dataset, model, attack, defense, seed): load the cached model,
  draw the clean defense subset, run the defense, evaluate, and write one record.
  Each record is its own file ``RUN_DIR/cells/<cell>.json`` (atomic), and
  ``RUN_DIR/records.jsonl`` is regenerated from them (atomic) after every cell, so a
  run killed at any moment resumes on rerun: finished cells are skipped, cached
  models are reused, and no cell is written twice.
- Cells run in parallel with joblib (local processes); torch threads are split
  among the workers (``--jobs auto``: one process per core, one thread each). A failing
  cell is recorded with its error; the rest go on.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import functools
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

import attacks as _attacks  # noqa: F401  (registers the built-in attacks)
import defenses as _defenses  # noqa: F401  (registers the built-in defenses)
import detectors as _detectors  # noqa: F401  (registers the built-in detectors)
from attacks.base import ATTACKS, Attack, prepare_attack
from bench.config import Config, build, param
from bench.data import DATASETS, Dataset, ImageSet, cache_dir, defense_subset
from bench.detect import INPUTS_VERSION, NOT_APPLICABLE, DetectCell, base_detect_record as _detect_base, safe_detect_cell
from bench.metrics import TriggeredSet, evaluate
from bench.models import MODELS, ModelSpec
from bench.presets import PRESETS, Preset
from bench.registry import BenchError
from bench.store import atomic_write_text, content_hash, fault_point, load_tensors, read_json, save_tensors, write_json
from bench.train import TrainConfig, train
from defenses.base import DEFENSES, Defense, DefenseContext
from detectors.base import DETECTORS

CODE_VERSION = "1"  # bump when a change alters trained models, so cached ones are not reused


@dataclass(frozen=True)
class RunConfig(Config):
    """Grid-wide settings; ``--set run.field=value``."""

    name = "run"

    defense_data: float = param(0.01, low=0.0, doc="clean defense data: a fraction of the training set if < 1, else a count")
    sweep: bool = param(True, doc="evaluate a defense's whole operating curve on the test sets (oracle view, plots only)")
    # The sweep costs one evaluation per point (19 for RNP): on all of GTSRB's test sets
    # (12,630 clean + ~12,000 triggered) that was ~23 min on this 2-core CPU, 3x the training.
    sweep_images: int = param(2000, low=0, doc="images of each test set (clean, triggered) the sweep uses; 0: all")


@dataclass(frozen=True)
class TrainJob:
    dataset: Dataset
    model: ModelSpec
    attack: Attack
    train: TrainConfig
    seed: int
    data_dir: str | None = field(default=None, compare=False)  # the data root (None: $BENCH_DATA_DIR, else the cache's)

    @property
    def data(self) -> dict:
        """Where the job's images come from and their digest (``Dataset.provenance``; loads the dataset once)."""
        return self.dataset.provenance(self.data_dir)

    @property
    def key(self) -> str:
        """The model cache key: everything that determines the model, the decoded images' digest included
        (another copy of the data, or a changed file, trains anew); not the CPU thread count."""
        return content_hash({
            "code": CODE_VERSION,
            "data": self.data["digest"],
            "dataset": [self.dataset.name, self.dataset.to_dict()],
            "model": [self.model.name, self.model.to_dict()],
            "attack": [self.attack.name, self.attack.to_dict(), getattr(type(self.attack), "version", 1)],
            "train": self.train.to_dict(),
            "seed": self.seed,
        })


@dataclass(frozen=True)
class Cell:
    job: TrainJob
    defense: Defense
    run: RunConfig

    @property
    def id(self) -> str:
        j = self.job
        return f"{j.dataset.name}-{j.model.name}-{j.attack.name}-{self.defense.name}-s{j.seed}"


@dataclass
class GridSpec:
    """What to run; ``resolve()`` turns names and overrides into validated cells."""

    attacks: list[str]
    defenses: list[str]
    datasets: list[str] | None = None
    models: list[str] | None = None
    preset: str = "demo"
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    detectors: list[str] = field(default_factory=list)  # the detection track (--detect); empty: none
    data_dir: str | None = None  # --data-dir (None: $BENCH_DATA_DIR, else the cache's data folder)

    def resolve(self) -> list[Cell]:
        return self.resolve_all()[0]

    def resolve_all(self) -> tuple[list[Cell], list[DetectCell]]:
        """The removal cells and the detection cells (one per model and detector), all validated."""
        if self.preset not in PRESETS:
            raise BenchError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        p: Preset = PRESETS[self.preset]
        known = {"train", "run", *DATASETS.names(), *MODELS.names(), *ATTACKS.names(), *DEFENSES.names(), *DETECTORS.names()}
        for comp in self.overrides:
            if comp not in known:
                raise BenchError(f"--set names unknown component {comp!r}; known: {', '.join(sorted(known))}")
        ov = lambda name: self.overrides.get(name, {})  # noqa: E731
        fields = lambda name: {**p.fields.get(name, {})}  # noqa: E731

        def make(registry, name):
            cls = registry.get(name)
            base = getattr(cls, "settings_from", None)  # a detector that takes a defense's settings first
            if base:
                return build(cls, {**ov(base), **ov(name)}, **fields(base), **fields(name))
            return build(cls, ov(name), **fields(name))

        # Every component is built once here, so a bad name or value fails before any work.
        for name in self.overrides:
            for reg in (DATASETS, MODELS, ATTACKS, DEFENSES, DETECTORS):
                if name in reg:
                    make(reg, name)
        tcfg = build(TrainConfig, ov("train"), **dataclasses.asdict(p.train))
        run = build(RunConfig, ov("run"), **{"defense_data": p.defense_data, **fields("run")})
        datasets = [make(DATASETS, d) for d in (self.datasets or [p.dataset])]
        models = [make(MODELS, m) for m in (self.models or [p.model])]
        atks = [make(ATTACKS, a) for a in self.attacks]
        defs = [make(DEFENSES, d) for d in self.defenses]
        dets = [make(DETECTORS, d) for d in self.detectors]
        for ds in datasets:
            for a in atks:
                if getattr(a, "target", 0) >= ds.num_classes:
                    raise BenchError(f"{a.name}.target={a.target} is out of range for {ds.name}; allowed: [0, {ds.num_classes - 1}]")
        for ds in datasets:  # settings that name parts of a model (NAD's layers) are checked on a built one
            for m in models:
                net = m.build(ds.num_classes, ds.channels, ds.mean, ds.std)
                for d in [*defs, *dets]:
                    d.check(net)
        if not self.seeds:
            raise BenchError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2")
        cells = [
            Cell(TrainJob(ds, m, a, tcfg, s, self.data_dir), d, run)
            for ds in datasets for m in models for a in atks for s in self.seeds for d in defs
        ]
        detect = [
            DetectCell(TrainJob(ds, m, a, tcfg, s, self.data_dir), d, run)
            for ds in datasets for m in models for a in atks for s in self.seeds for d in dets
        ]
        return cells, detect


# ---------------------------------------------------------------- phase 1: backdoored models


def model_dir(job: TrainJob) -> Path:
    return cache_dir() / "models" / f"{job.dataset.name}-{job.model.name}-{job.attack.name}-s{job.seed}-{job.key}"


def reference_job(job: TrainJob) -> TrainJob:
    """The clean model's job for ``job``: the same dataset, model, recipe and seed, the ``clean`` attack.

    ``clean`` has no field that changes the model, so this is also the key of the grid's own
    ``clean`` row: the reference and the row are one cache entry.
    """
    return dataclasses.replace(job, attack=ATTACKS.get("clean")())


def clean_reference(job: TrainJob, device: str, progress: bool = False) -> torch.nn.Module:
    """The clean reference model for ``job`` (eval mode, on ``device``): trained once, then from the cache."""
    ref = reference_job(job)
    train_backdoored(ref, device, progress)
    model, *_ = load_backdoored(ref, device)
    return model


def train_backdoored(job: TrainJob, device: str, progress: bool = False) -> dict:
    """Train (or find cached) the backdoored model of ``job``; return its metadata."""
    out = model_dir(job)
    if (out / "meta.json").exists():
        return read_json(out / "meta.json")
    ds = job.dataset
    train_set, test_set = ds.load(job.data_dir)
    attack = copy.deepcopy(job.attack)
    reference = clean_reference(job, device, progress) if attack.needs_clean_model else None
    prepare_attack(attack, ds.num_classes, ds.channels, ds.size, train_set, job.seed, reference)
    del reference
    poisoned = attack.poison(train_set, job.seed)
    model = job.model.build(ds.num_classes, ds.channels, ds.mean, ds.std, seed=job.seed)
    stats = train(model, poisoned.data, job.train, ds.augmentation, seed=job.seed, device=device,
                  extensions=[e for e in [attack.train_extension()] if e is not None], progress=progress, desc=f"{ds.name}/{job.model.name}/{job.attack.name}/s{job.seed}")
    t0 = time.perf_counter()
    triggered = attack.test_set(test_set)
    metrics = evaluate(model, test_set, triggered, device=device, bf16=job.train.bf16)
    meta = {
        "key": job.key,
        "metrics": metrics,
        "train": stats,
        "eval_seconds": time.perf_counter() - t0,
        "poisoned": int(len(poisoned.poison_idx)),
        "config": job_config(job),
        "data": job.data,
    }
    if attack.needs_clean_model:  # which cached clean model the trigger was computed on
        meta["reference"] = model_dir(reference_job(job)).name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        save_tensors(tmp / "attack.safetensors", {**attack.state, "poison_idx": poisoned.poison_idx})
        save_tensors(tmp / "triggered.safetensors", {"x": triggered.x, "y_true": triggered.y_true, "y_target": triggered.y_target})
        i = int((test_set.y != getattr(attack, "target", -1)).nonzero()[0])  # a clean/triggered pair for the gallery
        save_tensors(tmp / "example.safetensors", {"clean": test_set.x[i], "triggered": attack.trigger(test_set.x[i:i + 1])[0]})
        write_json(tmp / "meta.json", meta)
        try:
            os.rename(tmp, out)  # atomic: the entry is whole or absent
        except OSError:  # another worker finished the same job first
            shutil.rmtree(tmp, ignore_errors=True)
            return read_json(out / "meta.json")
        fault_point("model_cached")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def load_backdoored(job: TrainJob, device: str) -> tuple[torch.nn.Module, Attack, torch.Tensor, TriggeredSet]:
    d = model_dir(job)
    ds = job.dataset
    model = job.model.build(ds.num_classes, ds.channels, ds.mean, ds.std, seed=job.seed)
    model.load_state_dict(load_tensors(d / "model.safetensors"))
    state = load_tensors(d / "attack.safetensors")
    poison_idx = state.pop("poison_idx")
    attack = copy.deepcopy(job.attack)
    attack.load_state(state)
    t = load_tensors(d / "triggered.safetensors")
    return model.to(device).eval(), attack, poison_idx, TriggeredSet(t["x"], t["y_true"], t["y_target"])


def defense_data(train_set: ImageSet, attack: Attack, poison_idx: torch.Tensor, size: float, seed: int) -> ImageSet:
    """The clean defense data every defense and detector of a model gets: ``size`` images drawn with ``seed``.

    Images the attack relabelled are left out of the pool. A clean-label attack's poisoned
    images kept their true labels, so their clean originals stay in: leaving them out, as this
    function did before 2026-12-02, emptied the target class from the defense data (SIG, LC and
    CTRL at 5-10 % poison nearly all of GTSRB's class 2: 0-5 of 400 unlearning images were class 2
    instead of ~23), a hint at the target that a real defender's clean data does not carry.
    Leaving out the relabelled ones still over-represents the target class by 1 / (1 - rate)
    (1.11x at 10 %); it is kept so that the dirty-label numbers stay reproducible.
    """
    exclude = None if defense_pool(attack) == "all" else poison_idx
    return defense_subset(train_set, size, seed=seed, exclude=exclude)


def defense_pool(attack: Attack) -> str:
    """Which images ``defense_data`` draws from, as records store it: ``"unpoisoned"`` (the only
    rule before 2026-12-02, so a record without the field means it) or ``"all"`` (clean-label
    attacks since). A cell whose record says otherwise is recomputed on resume."""
    return "all" if attack.clean_label else "unpoisoned"


def job_config(job: TrainJob) -> dict:
    return {
        "dataset": {"name": job.dataset.name, **job.dataset.to_dict()},
        "model": {"name": job.model.name, **job.model.to_dict()},
        "attack": {"name": job.attack.name, **job.attack.to_dict()},
        "train": job.train.to_dict(),
    }


# ---------------------------------------------------------------- phase 2: defenses


def run_cell(cell: Cell, device: str, preset: str, backdoor: dict) -> dict:
    """Apply the cell's defense to the cached backdoored model; return the record."""
    job = cell.job
    ds = job.dataset
    rec = base_record(cell, preset)
    rec["backdoor"] = backdoor["metrics"]
    rec["seconds"]["train"] = backdoor["train"]["seconds"]
    rec["train_threads"] = backdoor["train"].get("threads")  # CPU threads the model trained with (None: GPU, or not recorded)
    train_set, test_set = ds.load(job.data_dir)
    rec["data"] = job.data
    model, attack, poison_idx, triggered = load_backdoored(job, device)
    clean = defense_data(train_set, attack, poison_idx, cell.run.defense_data, job.seed)
    ctx = DefenseContext(num_classes=ds.num_classes, augmentation=ds.augmentation, seed=job.seed,
                         device=torch.device(device), bf16=job.train.bf16)
    t0 = time.perf_counter()
    result = cell.defense(copy.deepcopy(model), clean, ctx)
    rec["seconds"]["defense"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec["metrics"] = evaluate(result.model, test_set, triggered, device=device, bf16=job.train.bf16)
    rec["info"] = dict(result.info)
    rec["info"]["defense_images"] = len(clean)
    if result.tensors:  # saved by run_grid as RUN_DIR/tensors/<cell>.safetensors before the record
        rec["_tensors"] = {k: v.detach().cpu() for k, v in result.tensors.items()}
    if result.sweep is not None and cell.run.sweep:
        # Oracle view: the whole operating curve on the TEST sets, for plots only; the defense chose before this.
        curve = []
        sub_clean, sub_trig = _sweep_subsets(test_set, triggered, cell.run.sweep_images)
        last, point = None, {}
        for setting, m, *extra in result.sweep():  # (setting, model) or (setting, model, {facts})
            if m is not last:  # a sweep may yield one model for several settings: evaluated once
                point = evaluate(m, sub_clean, sub_trig, device=device, bf16=job.train.bf16)
                last = m
            curve.append({"threshold": float(setting), **(extra[0] if extra else {}), **point})
        rec["info"]["oracle_curve"] = curve
        rec["info"]["oracle_curve_images"] = [len(sub_clean), len(sub_trig)]
    rec["seconds"]["eval"] = time.perf_counter() - t0
    rec["status"] = "ok"
    return rec


def _sweep_subsets(clean: ImageSet, triggered: TriggeredSet, n: int) -> tuple[ImageSet, TriggeredSet]:
    """Fixed seeded subsets of at most ``n`` images of each test set (all when ``n`` is 0)."""
    if n <= 0:
        return clean, triggered
    gen = torch.Generator().manual_seed(0)
    ic = torch.randperm(len(clean), generator=gen)[:n]
    it = torch.randperm(len(triggered), generator=gen)[:n]
    return clean.subset(ic), TriggeredSet(triggered.x[it], triggered.y_true[it], triggered.y_target[it])


def base_record(cell: Cell, preset: str) -> dict:
    j = cell.job
    return {
        "cell": cell.id,
        "dataset": j.dataset.name,
        "model": j.model.name,
        "attack": j.attack.name,
        "defense": cell.defense.name,
        "seed": j.seed,
        "status": "failed",
        "error": None,
        "metrics": None,
        "backdoor": None,
        "seconds": {"train": None, "defense": None, "eval": None},
        "info": {},
        "data": None,
        "config": {
            "preset": preset,
            **job_config(j),
            "defense": {"name": cell.defense.name, **cell.defense.to_dict()},
            "run": cell.run.to_dict(),
            "model_key": j.key,
            "defense_pool": defense_pool(j.attack),
        },
        "versions": versions(),
        "git": git_revision(),
    }


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    import numpy

    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    # torchvision's version from its metadata: importing it only for the string cost 2.6 s per run on
    # the synthetic set, which never needs it (2-core EPYC, 2026-12-03).
    return {"bdbench": installed("bdbench"), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": installed("torchvision"), "numpy": numpy.__version__}


@functools.lru_cache(maxsize=1)
def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- the run


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells it, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def auto_jobs(device: str) -> int:
    """``--jobs auto``: one worker process per CPU core on the CPU, one on CUDA (the workers would share the GPU)."""
    return 1 if device == "cuda" else cpu_cores()


WORKER_ENV = ("BENCH_CACHE_DIR", "BENCH_DATA_DIR")  # the driver's folders, which its workers must use


def _worker(fn: Callable, threads: int, env: dict[str, str | None], *args) -> Any:
    # loky reuses worker processes across grids: set the driver's folders each time, not those of
    # whichever grid started the worker (a test changes BENCH_CACHE_DIR between grids).
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.set_num_threads(threads)
    return fn(*args)


def _safe_train(job: TrainJob, device, progress) -> tuple[str, dict | None, str | None]:
    try:
        return job.key, train_backdoored(job, device, progress), None
    except Exception as exc:
        return job.key, None, _error(exc)


def _safe_cell(cell: Cell, device, preset, backdoor) -> dict:
    try:
        return run_cell(cell, device, preset, backdoor)
    except Exception as exc:
        rec = base_record(cell, preset)
        rec["error"] = _error(exc)
        return rec


def _error(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


class RunDir:
    """One run's folder: ``cells/*.json`` (one per finished cell) and ``records.jsonl``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.cells = self.path / "cells"
        self.tensors = self.path / "tensors"  # tensors a defense returns (NC's reversed triggers), one file per cell
        self.detect = self.path / "detect"  # one file per finished detection cell (bench.detect)

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
        done = {}
        for p in sorted((folder or self.cells).glob("*.json")):
            try:
                rec = read_json(p)
            except (json.JSONDecodeError, OSError):
                continue
            done[rec["cell"]] = rec
        return done

    def write_cell(self, rec: dict) -> None:
        write_json(self.cells / f"{rec['cell']}.json", rec)
        fault_point("cell_written")

    def write_detection(self, rec: dict) -> None:
        write_json(self.detect / f"{rec['cell']}.json", rec)
        fault_point("cell_written")

    def write_records(self, order: Iterable[str] = ()) -> list[dict]:
        """Regenerate records.jsonl from the cell files: this grid's cells first, in grid order.

        Detection cells go to detections.jsonl, and each model's detection results are also the
        ``detection`` block ({detector: {label, score, label_correct}}) of its ``none`` record.
        """
        done = self.finished()
        dets = sorted(self.finished(self.detect).values(), key=lambda r: r["cell"])
        by_model: dict[tuple, dict] = {}
        for d in dets:
            if d.get("status") == "ok":
                by_model.setdefault((d["dataset"], d["model"], d["attack"], d["seed"]), {})[d["detector"]] = d["detection"]
        for r in done.values():
            block = by_model.get((r["dataset"], r["model"], r["attack"], r["seed"])) if r["defense"] == "none" else None
            if block:
                r["detection"] = block
        rank = {c: i for i, c in enumerate(order)}
        recs = sorted(done.values(), key=lambda r: (rank.get(r["cell"], len(rank)), r["cell"]))
        atomic_write_text(self.path / "records.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
        fault_point("records_written")
        if dets or (self.path / "detections.jsonl").exists():
            atomic_write_text(self.path / "detections.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in dets))
        return recs


def run_grid(
    cells: list[Cell],
    out: str | os.PathLike,
    *,
    preset: str,
    device: str = "cpu",
    jobs: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    detect: list[DetectCell] = (),
) -> list[dict]:
    """Run ``cells`` (and the detection cells ``detect``) into ``out``; return this grid's removal records."""
    rd = RunDir(out)
    with rd.lock():
        # Load each dataset once up front (its digest keys the models): a missing one fails here,
        # before any training, and the decoded-tensor cache is warm before workers start.
        for ds, data_dir in {(c.job.dataset, c.job.data_dir) for c in [*cells, *detect]}:
            ds.load(data_dir)
        order = [c.id for c in cells]
        finished = rd.finished()
        todo = [c for c in cells if not _is_done(finished.get(c.id), c)]
        if len(todo) < len(cells):
            log(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already finished")
        finished_det = rd.finished(rd.detect)
        todo_det = [c for c in detect if not _is_done(finished_det.get(c.id), c)]
        if len(todo_det) < len(detect):
            log(f"resuming: {len(detect) - len(todo_det)} of {len(detect)} detection cells already finished")
        jobs_by_key = {c.job.key: c.job for c in [*todo, *todo_det]}
        # Clean reference models first (the grid's own clean rows among them), so that attacks
        # that need one, run in parallel afterwards, all load it from the cache: trained once.
        refs = {r.key: r for r in (reference_job(j) for j in jobs_by_key.values() if j.attack.needs_clean_model)}
        threads = max(1, cpu_cores() // max(1, jobs))
        backdoors = {}
        failed_jobs = {}
        ref_errors: dict[str, str] = {}

        def train_stage(stage: list[TrainJob]) -> None:
            by_key = {j.key: j for j in stage}
            for key, meta, err in _parallel(_safe_train, [(j, device, progress and jobs == 1) for j in stage],
                                            jobs, threads):
                j = by_key[key]
                what = "clean reference" if key not in jobs_by_key else "backdoored" if j.attack.has_trigger else "clean"
                if err is None:
                    m = meta["metrics"]
                    log(f"{what} {j.dataset.name}/{j.model.name}/{j.attack.name}/s{j.seed}: "
                        f"CA {_pct(m['ca'])}  ASR {_pct(m['asr'])}  ({meta['train']['seconds']:.0f} s)")
                else:
                    log(f"training {what} {j.dataset.name}/{j.model.name}/{j.attack.name}/s{j.seed} failed: {err}")
                    if key in refs:
                        ref_errors[key] = err
                if key in jobs_by_key and err is None:
                    backdoors[key] = meta
                elif key in jobs_by_key:
                    failed_jobs[key] = err

        train_stage(list(refs.values()))
        rest = []
        for key, job in jobs_by_key.items():
            ref_key = reference_job(job).key if job.attack.needs_clean_model else None
            if ref_key in ref_errors:  # fails with its reference, without training it again
                failed_jobs[key] = f"its clean reference model failed: {ref_errors[ref_key]}"
            elif key not in refs:
                rest.append(job)
        train_stage(rest)
        for key, job in jobs_by_key.items():
            example = rd.path / "examples" / f"{job.dataset.name}-{job.attack.name}.safetensors"
            if key in backdoors and not example.exists():
                save_tensors(example, load_tensors(model_dir(job) / "example.safetensors"))
        ready = _without_failed(todo, failed_jobs, lambda c: base_record(c, preset), rd.write_cell)
        rd.write_records(order)
        for rec in _parallel(_safe_cell, [(c, device, preset, backdoors[c.job.key]) for c in ready], jobs, threads):
            _save_tensors(rd, rec)
            rd.write_cell(rec)
            rd.write_records(order)
            if rec["status"] == "ok":
                m = rec["metrics"]
                log(f"{rec['cell']}: CA {_pct(m['ca'])}  ASR {_pct(m['asr'])}  RA {_pct(m['ra'])}  "
                    f"(defense {rec['seconds']['defense']:.1f} s)")
            else:
                log(f"{rec['cell']}: FAILED {rec['error']}")
        # Detection: after removal, on the same cached models.
        ready_det = _without_failed(todo_det, failed_jobs, lambda c: _detect_base(c, preset), rd.write_detection)
        for rec in _parallel(safe_detect_cell, [(c, device, preset) for c in ready_det], jobs, threads):
            _save_tensors(rd, rec)
            rd.write_detection(rec)
            rd.write_records(order)
            if rec["status"] == "ok" and rec["level"] == "model":
                d = rec["detection"]
                log(f"{rec['cell']}: label {d['label']}  score {d['score']:.3g}  "
                    f"(truth: {'target ' + str(rec['truth']['target']) if rec['truth']['backdoored'] else 'clean'}; "
                    f"{rec['seconds']['detect']:.1f} s)")
            elif rec["status"] == "ok":
                d = rec["detection"]
                log(f"{rec['cell']}: AUROC {d['auroc']:.3f}  TPR@5%FPR {d['tpr_at_5fpr']:.3f}  P@k {d['precision_at_k']:.3f}  "
                    f"({d['poisoned']} of {d['inputs']} {d['source']} inputs poisoned; {rec['seconds']['detect']:.1f} s)")
            elif rec["status"] == NOT_APPLICABLE:
                log(f"{rec['cell']}: not applicable ({rec['info']['reason']})")
            else:
                log(f"{rec['cell']}: FAILED {rec['error']}")
        recs = rd.write_records(order)
    wanted = set(order)
    return [r for r in recs if r["cell"] in wanted]


def _without_failed(todo: list, failed_jobs: dict[str, str], base: Callable, write: Callable) -> list:
    """The cells whose model trained; each of the others is written at once as failed, with the reason."""
    ready = []
    for c in todo:
        if c.job.key in failed_jobs:
            rec = base(c)
            rec["error"] = f"training the backdoored model failed: {failed_jobs[c.job.key]}"
            write(rec)
        else:
            ready.append(c)
    return ready


def _save_tensors(rd: RunDir, rec: dict) -> None:
    """Write a cell's tensors (``_tensors``) before its record, so a finished cell always has them."""
    tensors = rec.pop("_tensors", None)
    if tensors:
        save_tensors(rd.tensors / f"{rec['cell']}.safetensors", tensors)
        fault_point("tensors_written")
        rec["info"]["tensors_file"] = f"tensors/{rec['cell']}.safetensors"


def _pct(v: float | None) -> str:
    """A metric for the log: percent with one decimal, "-" when undefined (ASR of the clean model)."""
    return "-" if v is None else f"{100 * v:.1f}"


def _is_done(rec: dict | None, cell: Cell | DetectCell) -> bool:
    """A removal or detection cell is finished if its record is ok (a detection cell's may also be "not
    applicable") and was made with the same model, the same defense or detector config, run config and
    defense-data pool (and, for a sample- or input-level detector, the same scored inputs: ``INPUTS_VERSION``)."""
    kind, comp = ("defense", cell.defense) if isinstance(cell, Cell) else ("detector", cell.detector)
    if rec is None or rec.get("status") not in ("ok", *(() if kind == "defense" else (NOT_APPLICABLE,))):
        return False
    cfg = rec.get("config", {})
    want = json.loads(json.dumps({  # as the record stores them (tuples become lists)
        kind: {"name": comp.name, **comp.to_dict()}, "run": cell.run.to_dict()}))
    if kind == "detector" and cell.detector.level != "model" and cfg.get("inputs_version") != INPUTS_VERSION:
        return False
    return (cfg.get("model_key") == cell.job.key and cfg.get(kind) == want[kind] and cfg.get("run") == want["run"]
            and cfg.get("defense_pool", "unpoisoned") == defense_pool(cell.job.attack))


def _parallel(fn: Callable, arglist: list[tuple], jobs: int, threads: int):
    """Yield ``fn(*args)`` for each args, in completion order; in-process when ``jobs == 1``.

    A lone job of a parallel grid runs in-process too, but with the workers' thread count: CPU
    results depend on it, so a model must not come out differently because it happened to be
    trained alone (the clean reference stage, a one-attack grid) instead of beside others.
    """
    if jobs <= 1 or len(arglist) <= 1:
        before = torch.get_num_threads()
        if jobs > 1:
            torch.set_num_threads(threads)
        try:
            for args in arglist:
                yield fn(*args)
        finally:
            torch.set_num_threads(before)
        return
    from joblib import Parallel, delayed

    par = Parallel(n_jobs=min(jobs, len(arglist)), backend="loky", return_as="generator_unordered")
    env = {k: os.environ.get(k) for k in WORKER_ENV}
    yield from par(delayed(_worker)(fn, threads, env, *args) for args in arglist)
