"""What one task does: train (or find) a model, run a defense cell or a detection cell, build its record.

Every function here runs wherever the executor puts it (this process, a local worker, a Dask
worker) and writes nothing but the model cache: records go back to the driver as results, and
the driver alone writes the run folder (``bench.run.rundir``).

- ``train_model``: poison, train, evaluate, and cache the weights, the attack state, the
  poisoned indices and the triggered test set as safetensors + JSON under ``model_dir(job)``.
  The entry is written into a temporary folder and renamed into place, so it is whole or absent
  (also on NFS, where rename within a folder is atomic). An attack that needs a clean model
  (``needs_clean_model``) gets the ``clean`` attack's model of the same dataset, model, recipe and
  seed (``reference_job``) from the same cache; the task graph trains it first, once.
- ``run_defense_cell``: load the cached model, draw the clean defense subset, run the defense,
  evaluate on the test sets, return the record (and, for plots only, the oracle curve).
- ``run_detect_cell``: the same for a detector; the answer is scored by ``bench.detect``
  against the truth the detector never saw.
- ``train_task`` / ``defend_task`` / ``detect_task``: the three task bodies. They never raise:
  a failure becomes an error string or a failed record. Where workers do not share the driver's
  model cache (``ship``), a trained model travels as bytes in the train task's result
  (``model_files``) and is installed into the cache of each process that needs it.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

from attacks.base import Attack, PoisonedSet, prepare_attack
from bench.checkpoint import load_into
from bench.data import ImageSet, defense_subset
from bench.detect import (INPUTS_VERSION, NOT_APPLICABLE, TRIGGER_PREFIXES, auroc, detection_inputs, precision_at_k,
                          tpr_at_fpr, trigger_scores, truth)
from bench.metrics import TriggeredSet, evaluate
from bench.official import defense_data_departure, departures_of, recipe_departures
from bench.presets import PRESETS
from bench.run.plan import DefenseCell, DetectCell, TrainJob, model_dir, reference_job
from bench.store import atomic_write_bytes, fault_point, load_tensors, read_json, save_tensors, write_json
from bench.train import train
from defenses.base import DefenseContext

MODEL_FILES = ("model.safetensors", "attack.safetensors", "triggered.safetensors", "example.safetensors", "meta.json")


# ---------------------------------------------------------------- models


def train_model(job: TrainJob, device: str, progress: bool = False) -> dict:
    """Train (or find cached) the model of ``job``, backdoored or clean; return its metadata. A job with a
    ``checkpoint`` imports it instead (its attack, if any, only builds the trigger: nothing is poisoned)."""
    out = model_dir(job)
    if (out / "meta.json").exists():
        return read_json(out / "meta.json")
    ds = job.dataset
    train_set, test_set = ds.load(job.data_dir)
    attack = copy.deepcopy(job.attack)
    reference = clean_reference(job, device, progress) if attack.needs_clean_model else None
    prepare_attack(attack, ds.num_classes, ds.channels, ds.size, train_set, job.seed, reference)
    model = job.model.build(ds.num_classes, ds.channels, ds.mean, ds.std, seed=job.seed)
    if job.checkpoint is not None:
        poisoned = PoisonedSet(train_set, torch.zeros(0, dtype=torch.long))  # the defender's data: nothing known poisoned
        load_into(model, job.checkpoint, ds.num_classes, ds.name, job.model.name)
        model.to(device).eval()
        stats = {"seconds": 0.0, "threads": None, "imported": True}
    else:
        poisoned = attack.poison(train_set, job.seed)
        fault_point("train_started", job.label)
        if attack.weight_attack:  # the clean reference with its weights perturbed, not trained (attacks/base.py)
            stats = attack.build_model(model, reference, train_set, job.seed, device)
        else:
            stats = train(model, poisoned.data, job.train, ds.augmentation, seed=job.seed, device=device,
                          extensions=[e for e in [attack.train_extension()] if e is not None], progress=progress,
                          desc=job.label)
    del reference
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
        "device": device_info(device),
    }
    if attack.needs_clean_model:  # which cached clean model the trigger was computed on
        meta["reference"] = model_dir(reference_job(job)).name
    if job.checkpoint is not None:
        meta["checkpoint"] = job.checkpoint.facts
    files = {
        "model.safetensors": model.state_dict(),
        "attack.safetensors": {**attack.state, "poison_idx": poisoned.poison_idx},
        "triggered.safetensors": {"x": triggered.x, "y_true": triggered.y_true, "y_target": triggered.y_target},
    }
    i = int((test_set.y != getattr(attack, "target", -1)).nonzero()[0])  # a clean/triggered pair for the gallery
    files["example.safetensors"] = {"clean": test_set.x[i], "triggered": attack.trigger(test_set.x[i:i + 1])[0]}

    def write(tmp: Path) -> None:
        for name, tensors in files.items():
            save_tensors(tmp / name, tensors)
        write_json(tmp / "meta.json", meta)

    return read_json(out / "meta.json") if not _install(out, write) else meta


def _install(out: Path, write) -> bool:
    """Write a cache entry through ``write(tmp_folder)`` and rename it into place; False if another
    process finished the same entry first (its copy is kept: same key, same model)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(tmp)
        try:
            os.rename(tmp, out)  # atomic: the entry is whole or absent
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        fault_point("model_cached")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True


def model_files(job: TrainJob) -> dict[str, bytes]:
    """The cached entry of ``job`` as bytes, to ship to a process that does not share this cache."""
    d = model_dir(job)
    return {name: (d / name).read_bytes() for name in MODEL_FILES}


def install_model(job: TrainJob, files: dict[str, bytes]) -> None:
    """Put shipped bytes (``model_files``) into this process's cache, unless the entry is there already."""
    out = model_dir(job)
    if (out / "meta.json").exists():
        return
    if set(files) != set(MODEL_FILES):
        raise ValueError(f"a shipped model must hold {', '.join(MODEL_FILES)}; got {', '.join(sorted(files))}")

    def write(tmp: Path) -> None:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)

    _install(out, write)


def load_model(job: TrainJob, device: str) -> tuple[torch.nn.Module, Attack, torch.Tensor, TriggeredSet]:
    """The cached model of ``job`` (eval mode, on ``device``), its attack with its state, the poisoned
    indices and the triggered test set."""
    d = model_dir(job)
    ds = job.dataset
    model = job.model.build(ds.num_classes, ds.channels, ds.mean, ds.std, seed=job.seed)
    weights = collections.OrderedDict(load_tensors(d / "model.safetensors"))
    # safetensors keeps no module versions; the entry was saved by this very architecture, so its own versions
    # are the right ones (a module whose loader reads them, e.g. torchvision's MNASNet, needs them).
    weights._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(weights)
    state = load_tensors(d / "attack.safetensors")
    poison_idx = state.pop("poison_idx")
    attack = copy.deepcopy(job.attack)
    attack.load_state(state)
    t = load_tensors(d / "triggered.safetensors")
    return model.to(device).eval(), attack, poison_idx, TriggeredSet(t["x"], t["y_true"], t["y_target"])


def clean_reference(job: TrainJob, device: str, progress: bool = False) -> torch.nn.Module:
    """The clean reference model for ``job`` (eval mode, on ``device``): trained once, then from the cache."""
    ref = reference_job(job)
    train_model(ref, device, progress)
    model, *_ = load_model(ref, device)
    return model


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


def cell_defense_data(cell: DefenseCell | DetectCell, train_set: ImageSet, attack: Attack, poison_idx: torch.Tensor) -> ImageSet:
    """A cell's clean defense data: the ``--clean-data`` folder if given, else ``defense_data``'s draw."""
    if cell.clean_data is not None:
        return cell.clean_data.load(cell.job.dataset)
    return defense_data(train_set, attack, poison_idx, cell.run.defense_data, cell.job.seed)


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


# ---------------------------------------------------------------- records


def departures(cell: DefenseCell | DetectCell, images: int | None = None, n_train: int | None = None) -> list[dict]:
    """The fields of a cell that differ from the official values (``bench.official``), each with its kind:
    the dataset's, the model's, the recipe's (against the paper protocol's; a user's checkpoint was not
    trained here), the attack's, and the defense's or detector's, with its defense data once the images
    are counted. A learning rate the fine-tuning rule scaled says so (``rule``)."""
    j = cell.job
    method = cell.defense if isinstance(cell, DefenseCell) else cell.detector
    kind = "defense" if isinstance(cell, DefenseCell) else "detector"
    out = [{**d, "kind": "dataset"} for d in departures_of(j.dataset.name, type(j.dataset), j.dataset.to_dict())]
    out += [{**d, "kind": "model"} for d in departures_of(j.model.name, type(j.model), j.model.to_dict())]
    if j.checkpoint is None:
        out += [{**d, "kind": "train"} for d in recipe_departures(j.train.to_dict(), PRESETS["paper"].train.to_dict())]
    out += [{**d, "kind": "attack"} for d in departures_of(j.attack.name, type(j.attack), j.attack.to_dict())]
    mine = departures_of(method.name, type(method), method.to_dict())
    if images is not None and cell.clean_data is None:
        mine += defense_data_departure(method.name, type(method), images, n_train)
    ft = cell.finetune or {}
    for d in mine:
        name = d["field"].split(".", 1)[1]
        if name in ft.get("fields", {}) and name not in ft.get("given", []) and ft.get("scale", 1) != 1:
            d["rule"] = f"fine-tuning rule: x{ft['scale']:g} (recipe lr {ft['recipe_lr']:g} / reference {ft['reference_train_lr']:g})"
    return out + [{**d, "kind": kind} for d in mine]


def base_record(cell: DefenseCell, preset: str) -> dict:
    """A removal cell's record before it runs: everything but the results, status "failed"."""
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
            **({"clean_data": cell.clean_data.facts} if cell.clean_data is not None else {}),
            **({"finetune": cell.finetune} if cell.finetune else {}),
        },
        "departures": departures(cell),
        "versions": versions(),
        "git": git_revision(),
    }


def base_detect_record(cell: DetectCell, preset: str) -> dict:
    """A detection cell's record before it runs (the harness's truth already in it)."""
    j = cell.job
    return {
        "cell": cell.id, "dataset": j.dataset.name, "model": j.model.name, "attack": j.attack.name,
        "detector": cell.detector.name, "level": cell.detector.level, "seed": j.seed,
        "status": "failed", "error": None, "truth": truth(j.attack), "detection": None,
        "seconds": {"detect": None}, "info": {}, "data": None,
        "config": {"preset": preset, **job_config(j), "detector": {"name": cell.detector.name, **cell.detector.to_dict()},
                   "run": cell.run.to_dict(), "model_key": j.key, "defense_pool": defense_pool(j.attack),
                   **({"clean_data": cell.clean_data.facts} if cell.clean_data is not None else {}),
                   **({"finetune": cell.finetune} if cell.finetune else {}),
                   **({} if cell.detector.level == "model" else {"inputs_version": INPUTS_VERSION})},
        "departures": departures(cell), "versions": versions(), "git": git_revision(),
    }


def failed_record(cell: DefenseCell | DetectCell, preset: str, error: str) -> dict:
    rec = base_record(cell, preset) if isinstance(cell, DefenseCell) else base_detect_record(cell, preset)
    rec["error"] = error
    return rec


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


def device_info(device: str) -> dict:
    """What computed a result: the CPU model (and thread count), or the GPU's name with CUDA and cuDNN versions."""
    if str(device).startswith("cuda"):
        i = torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(i), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
    return {"type": "cpu", "name": cpu_name(), "threads": torch.get_num_threads()}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def error_text(exc: BaseException) -> str:
    """An exception as one line: its type, message and where it was raised."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


# ---------------------------------------------------------------- cells


def run_defense_cell(cell: DefenseCell, device: str, preset: str, backdoor: dict, keep_model: bool = False) -> dict:
    """Apply the cell's defense to the cached model (``backdoor``: its metadata); return the record
    (with ``keep_model``, also the defended weights under ``_defended``, which the driver saves)."""
    job = cell.job
    ds = job.dataset
    rec = base_record(cell, preset)
    rec["backdoor"] = backdoor["metrics"]
    rec["seconds"]["train"] = backdoor["train"]["seconds"]
    rec["train_threads"] = backdoor["train"].get("threads")  # CPU threads the model trained with (None: GPU, or not recorded)
    rec["train_device"] = backdoor.get("device")
    if "checkpoint" in backdoor:  # a user's model: which file, by content
        rec["checkpoint"] = backdoor["checkpoint"]
    train_set, test_set = ds.load(job.data_dir)
    rec["data"] = job.data
    model, attack, poison_idx, triggered = load_model(job, device)
    if cell.defense.needs_data:
        clean = cell_defense_data(cell, train_set, attack, poison_idx)
    else:  # none, CLP: no clean data drawn (and none asked of a small training set)
        clean = train_set.subset(torch.zeros(0, dtype=torch.long))
    ctx = DefenseContext(num_classes=ds.num_classes, augmentation=ds.augmentation, seed=job.seed,
                         device=torch.device(device), bf16=job.train.bf16)
    rec["device"] = device_info(device)
    t0 = time.perf_counter()
    result = cell.defense(copy.deepcopy(model), clean, ctx)
    rec["seconds"]["defense"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec["metrics"] = evaluate(result.model, test_set, triggered, device=device, bf16=job.train.bf16)
    rec["info"] = dict(result.info)
    rec["info"]["defense_images"] = len(clean)
    rec["departures"] = departures(cell, len(clean), len(train_set))
    if keep_model:
        rec["_defended"] = {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    if result.tensors:  # saved by the driver as RUN_DIR/tensors/<cell>.safetensors before the record
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


def run_detect_cell(cell: DetectCell, device: str, preset: str, backdoor: dict | None = None) -> dict:
    """Run the cell's detector on the cached model and score its answer; return the record."""
    job = cell.job
    ds = job.dataset
    rec = base_detect_record(cell, preset)
    backdoor = backdoor or read_json(model_dir(job) / "meta.json")
    rec["truth"]["asr"] = backdoor["metrics"]["asr"]  # did the backdoor implant?
    if "checkpoint" in backdoor:
        rec["checkpoint"] = backdoor["checkpoint"]
    train_set, test_set = ds.load(job.data_dir)
    rec["data"] = job.data
    model, attack, poison_idx, triggered = load_model(job, device)
    clean = cell_defense_data(cell, train_set, attack, poison_idx)  # exactly what a defense of this model gets
    ctx = DefenseContext(num_classes=ds.num_classes, augmentation=ds.augmentation, seed=job.seed,
                         device=torch.device(device), bf16=job.train.bf16)
    rec["device"] = device_info(device)
    level = cell.detector.level
    if level == "model":
        t0 = time.perf_counter()
        det = cell.detector(copy.deepcopy(model), clean, ctx)
        rec["seconds"]["detect"] = time.perf_counter() - t0
        # Scored here, after the detector returned, against the truth it never saw.
        target = rec["truth"]["target"]
        rec["detection"] = {
            "label": det.label,
            "score": float(det.score),
            "label_correct": None if target is None else det.label == target,
        }
        if {"mask", "pattern"} <= set(det.tensors) and rec["truth"]["backdoored"]:  # a recovered trigger
            want = target if target is not None else det.label
            for prefix in TRIGGER_PREFIXES:
                if f"{prefix}mask" in det.tensors:
                    rec["detection"].update({f"{prefix}{k}": v for k, v in trigger_scores(
                        model, attack, test_set, det.tensors[f"{prefix}mask"], det.tensors[f"{prefix}pattern"], want,
                        device=device, bf16=job.train.bf16).items()})
    else:
        inputs, poisoned, source = detection_inputs(attack, level, train_set, test_set, triggered, poison_idx, job.seed)
        if inputs is None:  # nothing to find here: recorded as such, not as a failure
            rec.update(status=NOT_APPLICABLE, info={"reason": source, "defense_images": len(clean)})
            return rec
        t0 = time.perf_counter()
        det = cell.detector(copy.deepcopy(model), clean, ctx, inputs)
        rec["seconds"]["detect"] = time.perf_counter() - t0
        scores = det.scores.detach().double().cpu()
        if scores.shape != (len(inputs),):
            raise ValueError(f"{cell.detector.name} returned {tuple(scores.shape)} scores for {len(inputs)} inputs")
        pos, neg = scores[poisoned].tolist(), scores[~poisoned].tolist()
        rec["detection"] = {
            "source": source, "labelled": inputs.labelled, "inputs": len(inputs), "poisoned": int(poisoned.sum()),
            "auroc": auroc(pos, neg), "tpr_at_5fpr": tpr_at_fpr(pos, neg, 0.05),
            "precision_at_k": precision_at_k(scores, poisoned),
        }
    rec["info"] = {**det.info, "defense_images": len(clean)}
    rec["departures"] = departures(cell, len(clean), len(train_set))
    if det.tensors:
        rec["_tensors"] = {k: v.detach().cpu() for k, v in det.tensors.items()}
    rec["status"] = "ok"
    return rec


# ---------------------------------------------------------------- task bodies (never raise)


def train_task(job: TrainJob, key: str, device: str, ship: bool, progress: bool, *deps: dict) -> dict:
    """Train (or find) ``job``'s model. ``key`` is the driver's ``job.key``: a worker whose copy of the
    data differs (another digest, so another key) refuses instead of caching a model under a key the
    driver never asks for. ``deps``: the results of the tasks it needs (its clean reference)."""
    out = {"key": key, "meta": None, "error": None, "files": None}
    try:
        for dep in deps:
            if dep.get("error"):
                out["error"] = f"its clean reference model failed: {dep['error']}"
                return out
            if dep.get("files"):
                install_model(dep["job"], dep["files"])
        if job.key != key:
            raise RuntimeError(f"this worker's copy of {job.dataset.name} differs from the driver's "
                               f"(data digest {job.data['digest'][:12]}); give every worker the same data")
        out["meta"] = train_model(job, device, progress)
        if ship:
            out["job"], out["files"] = job, model_files(job)
    except Exception as exc:
        out["error"] = error_text(exc)
    return out


def _cell_task(run, cell, device: str, preset: str, model: dict, **extra) -> dict:
    if model.get("error"):
        return failed_record(cell, preset, f"training the model failed: {model['error']}")
    try:
        if model.get("files"):
            install_model(cell.job, model["files"])
        return run(cell, device, preset, model["meta"], **extra)
    except Exception as exc:
        return failed_record(cell, preset, error_text(exc))


def defend_task(cell: DefenseCell, device: str, preset: str, keep_model: bool, model: dict) -> dict:
    """A removal cell's record (``model``: its train task's result; ``keep_model``: --save-defended)."""
    return _cell_task(run_defense_cell, cell, device, preset, model, **({"keep_model": True} if keep_model else {}))


def detect_task(cell: DetectCell, device: str, preset: str, model: dict) -> dict:
    """A detection cell's record (``model``: its train task's result)."""
    return _cell_task(run_detect_cell, cell, device, preset, model)
