"""Planning a run: what to train and what to run on each model, as validated, hashable items and a task graph.

Nothing here trains, evaluates or writes. ``GridSpec.plan()`` turns names and ``--set``
overrides into a ``Plan``: its ``defense_cells`` (dataset, model, attack, defense, seed) and
``detect_cells`` (the same with a detector), every component built and checked before any work.
``graph`` turns the cells still to do into ``Task`` nodes with their dependencies:

    clean reference model  ->  models of the attacks that need it (LC, Adaptive-Blend, ...)
    model                  ->  each of its defense cells and detection cells

so that an executor (``bench.run.execute``) starts a cell as soon as its own model is ready,
with no stage barrier. A ``TrainJob`` is keyed by everything that determines its model
(``TrainJob.key``: code version, decoded images' digest, dataset, model, attack, recipe, seed),
which names its folder in the model cache (``model_dir``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import attacks as _attacks  # noqa: F401  (registers the built-in attacks)
import defenses as _defenses  # noqa: F401  (registers the built-in defenses)
import detectors as _detectors  # noqa: F401  (registers the built-in detectors)
from attacks.base import ATTACKS, Attack
from attacks.clean import Unknown
from bench import finetune
from bench.checkpoint import Checkpoint, load_into
from bench.config import Config, build, param
from bench.data import DATASETS, CleanFolder, Dataset, cache_dir, resolve_data_dir
from bench.models import MODELS, ModelSpec
from bench.presets import PRESETS, Preset
from bench.registry import BenchError, slug
from bench.store import content_hash
from bench.train import TrainConfig
from defenses.base import DEFENSES, Defense
from detectors.base import DETECTORS, Detector

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
    finetune_lr: Literal["recipe", "official"] = param(
        "recipe", doc="fine-tuning learning rates: the official value scaled to the recipe's lr (bench/finetune.py), or the official constant")


@dataclass(frozen=True)
class TrainJob:
    """One model to train (or find in the cache): backdoored by ``attack``, or clean for the ``clean`` attack."""

    dataset: Dataset
    model: ModelSpec
    attack: Attack
    train: TrainConfig
    seed: int
    data_dir: str | None = field(default=None, compare=False)  # the data root (None: $BENCH_DATA_DIR, else the cache's)
    checkpoint: Checkpoint | None = None  # a user's model (bench defend / detect): imported, never trained

    @property
    def data(self) -> dict:
        """Where the job's images come from and their digest (``Dataset.provenance``; loads the dataset once)."""
        return self.dataset.provenance(self.data_dir)

    @property
    def key(self) -> str:
        """The model cache key: everything that determines the model, the decoded images' digest included
        (another copy of the data, or a changed file, trains anew); not the CPU thread count.

        Computed once per data and cache folder this process sees (the driver asks for it a few times
        per cell: 180 us each, 40 % of the driver's time on a 1,000-cell grid before 2026-12-05), and
        never pickled: a worker computes its own, from its own copy of the data (``train_task``)."""
        where = (str(resolve_data_dir(self.data_dir)), str(cache_dir()))
        memo = self.__dict__.get("_key")
        if memo is None or memo[0] != where:
            memo = (where, self._compute_key())
            self.__dict__["_key"] = memo  # a frozen dataclass: the memo bypasses __setattr__
        return memo[1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_key"}

    def _compute_key(self) -> str:
        parts = {
            "code": CODE_VERSION,
            "data": self.data["digest"],
            "dataset": [self.dataset.name, self.dataset.to_dict()],
            "model": [self.model.name, self.model.to_dict()],
            "attack": [self.attack.name, self.attack.to_dict(), getattr(type(self.attack), "version", 1)],
            "train": self.train.to_dict(),
            "seed": self.seed,
        }
        if self.checkpoint is not None:  # the file's content, not its path: a changed file is a new model
            parts["checkpoint"] = [self.checkpoint.sha256, self.checkpoint.facts["normalize"]]
            del parts["train"]  # nothing is trained
        return content_hash(parts)

    @property
    def label(self) -> str:
        return f"{slug(self.dataset.name)}/{slug(self.model.name)}/{self.attack.name}/s{self.seed}"


@dataclass(frozen=True)
class DefenseCell:
    """A removal cell: one defense applied to one job's model."""

    job: TrainJob
    defense: Defense
    run: RunConfig
    clean_data: CleanFolder | None = None  # --clean-data: the defender's own images instead of a draw from the training split
    finetune: dict | None = field(default=None, compare=False, hash=False)  # the fine-tuning rule's facts (bench/finetune.py)

    @property
    def id(self) -> str:
        j = self.job
        return f"{slug(j.dataset.name)}-{slug(j.model.name)}-{j.attack.name}-{slug(self.defense.name)}-s{j.seed}"


@dataclass(frozen=True)
class DetectCell:
    """A detection cell: one detector run on one job's model (scored by ``bench.detect``)."""

    job: TrainJob
    detector: Detector
    run: RunConfig
    clean_data: CleanFolder | None = None
    finetune: dict | None = field(default=None, compare=False, hash=False)

    @property
    def id(self) -> str:
        j = self.job
        return f"{slug(j.dataset.name)}-{slug(j.model.name)}-{j.attack.name}-{slug(self.detector.name)}-s{j.seed}"


class Plan(NamedTuple):
    """A grid's cells: removal (``defense_cells``) and detection (``detect_cells``, empty without ``--detect``)."""

    defense_cells: list[DefenseCell]
    detect_cells: list[DetectCell]


@dataclass
class GridSpec:
    """What to run, by name; ``plan()`` turns names and overrides into validated cells."""

    attacks: list[str]
    defenses: list[str]
    datasets: list[str] | None = None
    models: list[str] | None = None
    preset: str = "demo"
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    detectors: list[str] = field(default_factory=list)  # the detection track (--detect); empty: none
    data_dir: str | None = None  # --data-dir (None: $BENCH_DATA_DIR, else the cache's data folder)
    checkpoint: Checkpoint | None = None  # bench defend / detect: this model instead of training (attacks: [] or one)
    clean_data: CleanFolder | None = None  # --clean-data: the defense data of every cell

    def plan(self) -> Plan:
        """The removal cells and the detection cells (one per model and detector), all validated."""
        if self.preset not in PRESETS:
            raise BenchError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        p: Preset = PRESETS[self.preset]
        registries = (DATASETS, MODELS, ATTACKS, DEFENSES, DETECTORS)
        # A family's members (folder:PATH, whose name holds dots and slashes) take --set under the family's prefix.
        known = {"train", "run", *(n for reg in registries for n in [*reg.names(), *reg.families])}
        for comp in self.overrides:
            if comp not in known:
                raise BenchError(f"--set names unknown component {comp!r}; known: {', '.join(sorted(known))}")

        def names(registry, name):  # where a component's settings are looked up, later ones winning
            prefix, sep, _ = name.partition(":")
            return [prefix, name] if sep and prefix in registry.families else [name]

        ov = lambda *ns: {k: v for n in ns for k, v in self.overrides.get(n, {}).items()}  # noqa: E731
        fields = lambda *ns: {k: v for n in ns for k, v in p.fields.get(n, {}).items()}  # noqa: E731

        def settings(registry, name) -> tuple[dict, dict]:
            """(the --set overrides, the preset's fields) that apply to a component, later names winning."""
            base = getattr(registry.get(name), "settings_from", None)  # a detector that takes a defense's settings first
            ns = [base, name] if base else names(registry, name)
            return ov(*ns), fields(*ns)

        def make(registry, name):
            overrides, preset_fields = settings(registry, name)
            return build(registry.get(name), overrides, **preset_fields)

        def tuned(registry, name):
            """A defense or detector with the fine-tuning rule applied to the learning rates nobody set."""
            overrides, preset_fields = settings(registry, name)
            return finetune.apply(make(registry, name), tcfg.lr, run.finetune_lr, {*overrides, *preset_fields})

        # Every component is built once here, so a bad name or value fails before any work.
        for name in self.overrides:
            for reg in registries:
                if name in reg:
                    make(reg, name)
        tcfg = build(TrainConfig, ov("train"), **dataclasses.asdict(p.train))
        run = build(RunConfig, ov("run"), **{"defense_data": p.defense_data, **fields("run")})
        datasets = [make(DATASETS, d) for d in (self.datasets or [p.dataset])]
        models = [make(MODELS, m) for m in (self.models or [p.model])]
        atks = [make(ATTACKS, a) for a in self.attacks]
        if self.checkpoint is not None:
            atks = atks or [Unknown()]
            for a in atks:
                if a.needs_clean_model or a.learned_trigger:
                    why = "a clean reference model of the same recipe" if a.needs_clean_model else "state learned while the model trained"
                    raise BenchError(f"--attack {a.name}: its trigger needs {why}, which a checkpoint does not carry; "
                                     "give an attack whose trigger its fields and the seed define (badnets, blend, sig, wanet, ...)")
        defs = [tuned(DEFENSES, d) for d in self.defenses]
        dets = [tuned(DETECTORS, d) for d in self.detectors]
        for ds in datasets:
            for a in atks:
                if getattr(a, "target", 0) >= ds.num_classes:
                    raise BenchError(f"{a.name}.target={a.target} is out of range for {ds.name}; allowed: [0, {ds.num_classes - 1}]")
        for ds in datasets:  # the model takes the images (a dry forward pass); settings that name its parts (NAD's layers)
            for m in models:
                net = m.build(ds.num_classes, ds.channels, ds.mean, ds.std)
                m.check(net, ds.num_classes, ds.channels, ds.size, ds.name)
                if self.checkpoint is not None:  # the checkpoint fits the architecture and the dataset, or one line here
                    load_into(net, self.checkpoint, ds.num_classes, ds.name, m.name)
                for d, _ in [*defs, *dets]:
                    d.check(net)
        if not self.seeds:
            raise BenchError("--seeds is empty; give at least one seed, e.g. --seeds 0,1,2")
        jobs = [TrainJob(ds, m, a, tcfg, s, self.data_dir, self.checkpoint)
                for ds in datasets for m in models for a in atks for s in self.seeds]
        if self.clean_data is not None:  # its class folders fit every dataset: one line here, not in a cell
            for ds in datasets:
                self.clean_data.load(ds)
        elif any(getattr(d, "needs_data", True) for d, _ in [*defs, *dets]):
            for ds in datasets:
                for a in atks:
                    check_defense_data(ds, a, run.defense_data, self.data_dir)
        return Plan([DefenseCell(j, d, run, self.clean_data, ft) for j in jobs for d, ft in defs],
                    [DetectCell(j, d, run, self.clean_data, ft) for j in jobs for d, ft in dets])


def check_defense_data(ds: Dataset, attack: Attack, size: float, data_dir: str | None) -> None:
    """Fail on one line, before any work, when ``run.defense_data`` asks for more clean images than the
    training split has left once the attack relabelled its share (the pool ``defense_data`` draws from).

    Exact where the size is known before loading (``Dataset.train_count``) and the attack relabels a fixed
    share of the set (the base class's poisoning); an attack that poisons per batch relabels nothing in the
    set, and an unknown size is checked when the cell draws its data."""
    n = ds.train_count(data_dir)
    if n is None:
        return
    want = int(round(size * n)) if size < 1 else int(size)
    relabelled = 0
    if not attack.clean_label and type(attack).poison is Attack.poison:
        relabelled = min(n, int(round(attack.poison_rate * n)))
    pool = n - relabelled
    if not 0 < want <= pool:
        left = f"{pool} clean ones" + (f" once {attack.name} relabels {relabelled}" if relabelled else "")
        fix = f"--set run.defense_data={pool}" if pool > 0 else "a larger training set"
        raise BenchError(f"run.defense_data={size:g} asks for {want} clean training images, but {ds.name} has {n} training "
                         f"images, {left}; use {fix} or less (or a fraction, e.g. --set run.defense_data=0.1)")


def model_dir(job: TrainJob) -> Path:
    """The job's folder in the model cache (``cache_dir()/models``), named by its key."""
    return cache_dir() / "models" / f"{slug(job.dataset.name)}-{slug(job.model.name)}-{job.attack.name}-s{job.seed}-{job.key}"


def reference_job(job: TrainJob) -> TrainJob:
    """The clean model's job for ``job``: the same dataset, model, recipe and seed, the ``clean`` attack.

    ``clean`` has no field that changes the model, so this is also the key of the grid's own
    ``clean`` row: the reference and the row are one cache entry.
    """
    return dataclasses.replace(job, attack=ATTACKS.get("clean")())


# ---------------------------------------------------------------- the task graph


@dataclass(frozen=True)
class Task:
    """A node of the run's graph. ``kind`` is "train" (``item`` a TrainJob), "defend" (a DefenseCell) or
    "detect" (a DetectCell); ``deps`` are the keys of the tasks whose results it takes, in order."""

    key: str
    kind: str
    item: TrainJob | DefenseCell | DetectCell
    deps: tuple[str, ...] = ()


def train_key(job: TrainJob) -> str:
    return f"train-{job.key}"


def graph(defense_cells: list[DefenseCell], detect_cells: list[DetectCell]) -> list[Task]:
    """The tasks for these cells, each after its dependencies: every model their cells need (and the clean
    reference an attack needs, once), then the cells. A model is one task however many cells use it."""
    train: dict[str, Task] = {}

    def add_job(job: TrainJob) -> str:
        key = train_key(job)
        if key not in train:
            deps = ()
            if job.attack.needs_clean_model:
                deps = (add_job(reference_job(job)),)
            train[key] = Task(key, "train", job, deps)
        return key

    cells = [Task(f"defend-{c.id}", "defend", c, (add_job(c.job),)) for c in defense_cells]
    cells += [Task(f"detect-{c.id}", "detect", c, (add_job(c.job),)) for c in detect_cells]
    return [*train.values(), *cells]
