"""The ``bench`` command line: run, report, list, perf."""

from __future__ import annotations

import dataclasses

import shlex
import sys
from pathlib import Path

import click

from bench.registry import BenchError, slug


def _split(value: str, registry, what: str) -> list[str]:
    """``all`` or a comma list of registered names; a miss fails with the registry's hints."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return registry.names()
    if not names:
        raise BenchError(f"--{what} is empty; allowed: all, {', '.join(registry.names())}")
    for n in names:
        try:
            registry.get(n)
        except BenchError as exc:
            raise BenchError(f"{exc}, or all") from None
    return list(dict.fromkeys(names))


def _seeds(value: str) -> list[int]:
    out = []
    for part in value.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise BenchError(f"--seeds {value!r} is not a list of integers; e.g. --seeds 0,1,2 or --seeds 0-2") from None
    if not out or any(s < 0 for s in out):
        raise BenchError(f"--seeds {value!r} must name non-negative integers; e.g. --seeds 0,1,2")
    return list(dict.fromkeys(out))


def _default_preset(device: str) -> str:
    return "paper" if device == "cuda" else "quick"


def _jobs(value: int | str, device: str) -> int:
    """``--jobs``: a whole number >= 1, or ``auto`` (``bench.run.execute.auto_jobs``)."""
    from bench.run.execute import auto_jobs

    if str(value).strip().lower() == "auto":
        return auto_jobs(device)
    try:
        n = int(str(value))
    except ValueError:
        raise BenchError(f"--jobs {value!r} is not a count; allowed: a whole number >= 1, or auto") from None
    if n < 1:
        raise BenchError(f"--jobs {n} must be >= 1 (or auto)")
    return n


def _device(value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA device is available; allowed here: auto, cpu")
    return value


class _Group(click.Group):
    """Prints a BenchError as one line (no traceback) and exits with status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """bdbench: backdoor attacks vs. defenses, CA and ASR side by side."""


def _grid_options(f):
    """The options every grid command shares (run, defend, detect)."""
    opts = [
        click.option("--preset", default=None, help="demo | quick | paper (default: paper on a CUDA machine, else quick)"),
        click.option("--seeds", default="0", show_default=True, help="comma list or range of seeds, e.g. 0,1,2 or 0-2"),
        click.option("--jobs", default=None, help="tasks run in parallel (local processes): a count, or auto (one per CPU "
                     "core, one thread each; on CUDA one per visible GPU); default: the preset's (demo auto, others 1)"),
        click.option("--scheduler", default=None, help="run the tasks on a Dask cluster: the scheduler's address, e.g. "
                     "tcp://host:8786"),
        click.option("--scheduler-file", default=None, help="run the tasks on the Dask cluster whose scheduler wrote this "
                     "file (dask scheduler --scheduler-file FILE)"),
        click.option("--cache", "cache_mode", default="auto", show_default=True, type=click.Choice(["auto", "shared", "ship"]),
                     help="Dask workers: use the driver's model cache (shared filesystem), or ship each model as bytes; "
                     "auto: shared if the workers see the driver's cache folder"),
        click.option("--out", default=None, help="run folder (default: results/<preset>-<grid hash>); rerunning resumes it"),
        click.option("--data-dir", default=None, help="data root (default: $BENCH_DATA_DIR, else the user cache)"),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--set", "sets", multiple=True, help="component.field=value override, e.g. rnp.clean_threshold=0.3 "
                     "(repeatable)"),
        click.option("--plugin", "plugins", multiple=True, help="a Python file of your own attacks, defenses, detectors, "
                     "models or datasets, imported first (repeatable)"),
        click.option("--quiet", is_flag=True, help="no progress bars"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@click.option("--attack", "attack_", default="all", show_default=True, help="all, or a comma list of attacks (bench list attacks)")
@click.option("--defense", default="rnp", show_default=True, help="all, or a comma list of defenses; 'none' (the baseline row) is always added")
@click.option("--dataset", default=None, help="comma list of datasets (default: the preset's)")
@click.option("--model", default=None, help="comma list of models (default: the preset's)")
@click.option("--detect", default=None, help="all, or a comma list of detectors (bench list detectors): the detection track")
@_grid_options
def run(attack_, defense, dataset, model, detect, **grid) -> None:
    """Train poisoned models, apply defenses, write records, tables and plots."""
    from attacks import ATTACKS

    _load_plugins(grid["plugins"])
    _grid(attacks=lambda: _split(attack_, ATTACKS, "attack"), defense=defense, dataset=dataset, model=model, detect=detect, **grid)


_CHECKPOINT_HELP = ("CHECKPOINT: .safetensors, or .pt/.pth/.bin read with torch.load(weights_only=True) only; a state dict "
                    "at the top level or under state_dict/model/model_state_dict/net, with or without a module. prefix")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="its architecture: a registered model (bench list models), torchvision:NAME or timm:NAME")
@click.option("--dataset", required=True, help="the dataset it classifies (bench list datasets, or folder:PATH)")
@click.option("--defense", default="all", show_default=True, help="all, or a comma list of defenses; 'none' (the checkpoint as given) is always added")
@click.option("--attack", "attack_", default=None, help="the attack it was trained with, if known (one name and its --set "
              "fields): its trigger builds the triggered test set, so ASR and RA are measured")
@click.option("--detect", default=None, help="also the detection track: all, or a comma list of detectors")
@click.option("--normalize", default=None, help="the mean,std it was trained with (one each, or one per channel), or none "
              "for a network that takes [0, 1]; default: the dataset's (e.g. gtsrb 0.3403,0.3121,0.3214,0.2724,0.2608,0.2669)")
@click.option("--save-defended", default=None, type=click.Path(file_okay=False), help="write each defended model to this folder "
              "as safetensors (<cell>.safetensors)")
@click.option("--clean-data", default=None, help="the defense data: a folder of your clean images, FOLDER/<class>/*.png (a class "
              "name of a folder: dataset, or an index 0..K-1); default: a draw from the dataset's training split")
@_grid_options
def defend(checkpoint, model, dataset, defense, attack_, detect, normalize, save_defended, clean_data, **grid) -> None:
    """Apply defenses to your own model (a checkpoint): CA, and ASR/RA with --attack; the same records and reports as run.

    """ + _CHECKPOINT_HELP
    _load_plugins(grid["plugins"])
    _grid(attacks=_one_attack(attack_), defense=defense, dataset=dataset, model=model, detect=detect,
          checkpoint=_checkpoint(checkpoint, normalize), save_defended=save_defended, clean_data=clean_data, **grid)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="its architecture: a registered model (bench list models), torchvision:NAME or timm:NAME")
@click.option("--dataset", required=True, help="the dataset it classifies (bench list datasets, or folder:PATH)")
@click.option("--detect", default="all", show_default=True, help="all, or a comma list of detectors (bench list detectors)")
@click.option("--attack", "attack_", default=None, help="the attack it was trained with, if known: its trigger builds the "
              "triggered inputs, so input-level detection is scored")
@click.option("--normalize", default=None, help="the mean,std it was trained with, or none; default: the dataset's")
@click.option("--clean-data", default=None, help="the detectors' clean data: a folder FOLDER/<class>/*.png (class name or index)")
@_grid_options
def detect(checkpoint, model, dataset, detect, attack_, normalize, clean_data, **grid) -> None:
    """Run detectors on your own model (a checkpoint): is it backdoored, which label, which inputs.

    """ + _CHECKPOINT_HELP
    _load_plugins(grid["plugins"])
    _grid(attacks=_one_attack(attack_), defense="none", dataset=dataset, model=model, detect=detect,
          checkpoint=_checkpoint(checkpoint, normalize), clean_data=clean_data, **grid)


def _one_attack(name: str | None) -> list[str]:
    from attacks import ATTACKS

    if name is None:
        return []
    names = _split(name, ATTACKS, "attack")
    if len(names) != 1 or name.strip() == "all":
        raise BenchError(f"--attack {name!r}: a checkpoint was trained with one attack; give one name")
    return names


def _checkpoint(path: str, normalize: str | None):
    from bench.checkpoint import Checkpoint

    return Checkpoint.open(path, normalize)


def _load_plugins(files) -> None:
    from bench.plugins import load_plugin

    for f in files:
        load_plugin(f)


def _grid(*, attacks, defense, dataset, model, detect, preset, seeds, jobs, scheduler, scheduler_file, cache_mode, out,
          data_dir, device, sets, quiet, plugins, checkpoint=None, save_defended=None, clean_data=None) -> None:
    from bench.config import parse_sets
    from bench.data import DATASETS, CleanFolder
    from bench.models import MODELS
    from bench.presets import PRESETS
    from bench.report import markdown_table, write_reports
    from bench.run.execute import make_executor, run_grid
    from bench.run.plan import GridSpec
    from bench.store import content_hash
    from defenses import DEFENSES
    from detectors import DETECTORS

    cluster = scheduler or scheduler_file
    if cluster and jobs is not None:
        raise BenchError(f"--jobs {jobs} with a Dask scheduler: the cluster's workers set the parallelism; drop --jobs")
    if cache_mode != "auto" and not cluster:
        raise BenchError(f"--cache {cache_mode} is for Dask workers; give --scheduler or --scheduler-file, or drop --cache")
    dev = _device(device) if not cluster else ("cpu" if device == "auto" else device)
    if preset is None:
        preset = _default_preset(dev)
        click.echo(f"no --preset given: using '{preset}' ({'CUDA found' if dev == 'cuda' else 'no CUDA device'})")
    if preset not in PRESETS:
        raise BenchError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    jobs = 1 if cluster else _jobs(PRESETS[preset].jobs if jobs is None else jobs, dev)
    attacks = attacks() if callable(attacks) else attacks  # checked after the preset line, as before
    defs = _split(defense, DEFENSES, "defense")
    if "none" in DEFENSES:  # the baseline row, always, once and first
        defs = ["none", *[d for d in defs if d != "none"]]
    spec = GridSpec(
        attacks=attacks,
        defenses=defs,
        datasets=_split(dataset, DATASETS, "dataset") if dataset else None,
        models=_split(model, MODELS, "model") if model else None,
        preset=preset,
        seeds=_seeds(seeds),
        overrides=parse_sets(sets),
        detectors=_split(detect, DETECTORS, "detect") if detect is not None else [],
        data_dir=data_dir,
        checkpoint=checkpoint,
        clean_data=None if clean_data is None else CleanFolder.open(clean_data),
    )
    if data_dir is not None and not Path(data_dir).is_dir():
        raise BenchError(f"--data-dir {data_dir} is not a folder")
    cells, detect_cells = spec.plan()  # every name and value is checked here, before any work
    if out is None:
        first = cells[0].job
        what = {"cells": [c.id for c in cells], "sets": sorted(sets)}
        if checkpoint is not None:
            what["checkpoint"] = checkpoint.sha256
        out = Path("results") / f"{'defend-' if checkpoint else ''}{preset}-{slug(first.dataset.name)}-" \
            f"{slug(first.model.name)}-{content_hash(what, 8)}"
    extra = f" + {len(detect_cells)} detection cells" if detect_cells else ""
    executor = make_executor(jobs=jobs, scheduler=scheduler, scheduler_file=scheduler_file, device=dev, cache=cache_mode)
    try:
        click.echo(f"run folder: {out}  ({len(cells)} cells{extra}, device {dev}, {executor.describe()})")
        records = run_grid(cells, out, preset=preset, device=dev, executor=executor, progress=not quiet,
                           log=lambda m: click.echo(m), detect=detect_cells, save_defended=save_defended,
                           command=shlex.join(["bench", *sys.argv[1:]]))
    finally:
        executor.close()
    paths = write_reports(out)
    click.echo("")
    click.echo(markdown_table(records))
    if "detection.md" in paths:
        click.echo(paths["detection.md"].read_text(encoding="utf-8"))
    click.echo(f"\nreport: {', '.join(str(p) for p in paths.values())}")
    if save_defended:
        click.echo(f"defended models: {save_defended}")
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        click.echo(f"{len(failed)} cell(s) failed: {', '.join(r['cell'] for r in failed)}", err=True)
        sys.exit(1)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--compare", is_flag=True, help="also print our cells beside the published ones (results/reference/), with each side's direction")
@click.option("--compare-defenses", "compare_defenses", default=None, metavar="A,B",
              help="print on how many models each defense is better in ASR and in CA, the ties, and the Wilcoxon signed-rank p")
def report(run_dir, compare, compare_defenses) -> None:
    """Regenerate tables, plots and report/index.html from RUN_DIR/records.jsonl."""
    from bench.report import compare_markdown, load_records, markdown_table, write_reports
    from bench.report.pairs import check_defenses, compare_defenses_text

    if not Path(run_dir).is_dir():
        raise BenchError(f"run folder {run_dir} does not exist")
    records = load_records(run_dir)  # every check before anything in the run folder changes
    names = check_defenses(records, compare_defenses) if compare_defenses is not None else None
    paths = write_reports(run_dir)
    click.echo(markdown_table(records))
    if "detection.md" in paths:
        click.echo(paths["detection.md"].read_text(encoding="utf-8"))
    if compare:
        click.echo(compare_markdown(records) or "no cell of this run matches a published reference table (results/reference/)")
    if names:
        click.echo(compare_defenses_text(records, names) + "\n")
    click.echo(f"\nreport: {', '.join(str(p) for p in paths.values())}")


@main.command(name="list")
@click.argument("what", type=click.Choice(["attacks", "defenses", "detectors", "datasets", "models", "presets"]))
@click.option("--fields", "-f", is_flag=True, help="also list each entry's hyperparameters and defaults")
@click.option("--plugin", "plugins", multiple=True, help="a Python file of your own components, imported first (repeatable)")
def list_(what, fields, plugins) -> None:
    """List registered components with a one-line description and their paper."""
    _load_plugins(plugins)
    from attacks import ATTACKS
    from bench.config import describe
    from bench.data import DATASETS
    from bench.models import MODELS
    from bench.presets import PRESETS
    from defenses import DEFENSES
    from detectors import DETECTORS

    if what == "presets":
        from bench import finetune
        from bench.official import official_table, recipe_departures

        regs = (ATTACKS, DEFENSES, DETECTORS, DATASETS, MODELS)
        for name, p in PRESETS.items():
            click.echo(f"{name:10s} {p.description}")
            if fields:  # what the preset sets: data, model, recipe, and every field it changes, beside the official value
                t = p.train
                click.echo(f"{'':12s}dataset {p.dataset}, model {p.model}, defense data {p.defense_data:g}; train: "
                           f"{t.epochs} epochs, batch {t.batch_size}, lr {t.lr:g}, {t.schedule}; jobs {p.jobs}")
                if name != "paper":
                    off = "; ".join(f"{d['field']} {d['official']!r}" for d in recipe_departures(
                        dataclasses.asdict(t), dataclasses.asdict(PRESETS["paper"].train)))
                    click.echo(f"{'':12s}  the paper protocol's recipe: {off or 'the same'}")
                for comp, values in p.fields.items():
                    cls = next((r.get(comp) for r in regs if comp in r), None)
                    base = getattr(cls, "settings_from", None)
                    tab = official_table(cls) if cls is not None else {}
                    for fname, value in values.items():
                        o = tab.get(fname)
                        beside = ("" if o is None else f"   (official {o.value!r}: {o.source})" if o.exists
                                  else f"   (no official value: {o.source})")
                        click.echo(f"{'':12s}{comp}.{fname} = {value!r}{beside}")
                    if base:
                        click.echo(f"{'':14s}({comp} also takes the {base} settings above)")
                for dname in DEFENSES.names():  # the fine-tuning rule's learning rates on this recipe
                    rule = finetune.rule_of(DEFENSES.get(dname))
                    given = set(p.fields.get(dname, {}))
                    if rule is None or rule.scale(t.lr) == 1:
                        continue
                    tab = official_table(DEFENSES.get(dname))
                    for f in rule.fields:
                        if f not in given:
                            click.echo(f"{'':12s}{dname}.{f} = {tab[f].value * rule.scale(t.lr):g}   (fine-tuning rule: "
                                       f"official {tab[f].value:g} x {rule.scale(t.lr):g}, recipe lr {t.lr:g} / reference {rule.train_lr:g})")
        return
    reg = {"attacks": ATTACKS, "defenses": DEFENSES, "detectors": DETECTORS, "datasets": DATASETS, "models": MODELS}[what]
    for name, cls in reg.items():
        paper = getattr(cls, "paper", "")
        click.echo(f"{name:16s} {cls.description}" + (f"\n{'':16s} paper: {paper}" if paper else ""))
        if fields:
            for fname, tname, default, doc in describe(cls):
                click.echo(f"{'':18s}{name}.{fname} ({tname}) = {default!r}" + (f"  {doc}" if doc else ""))
    for prefix, (make, doc) in reg.families.items():  # names made on use, e.g. folder:PATH
        click.echo(f"{prefix + ':' + doc.split()[0]:16s} {doc.partition(' ')[2].strip('()')}")
        if fields and getattr(make, "base", None):  # the class its members subclass: --set PREFIX.FIELD=VALUE
            for fname, tname, default, fdoc in describe(make.base):
                click.echo(f"{'':18s}{prefix}.{fname} ({tname}) = {default!r}" + (f"  {fdoc}" if fdoc else ""))
    for name, err in getattr(reg, "plugin_errors", {}).items():
        click.echo(f"{name:16s} [plugin failed to load] {err}", err=True)


@main.command()
@click.argument("names", nargs=-1)
@click.option("--plugin", "plugins", multiple=True, help="a Python file of your own components, imported first (repeatable)")
def check(names, plugins) -> None:
    """Run the registry's contract on components: by default every attack, defense and detector the --plugin
    files add (determinism in the seed, no data beyond what it is given, model on its device, bad fields refused)."""
    from attacks import ATTACKS
    from bench.check import check_component
    from defenses import DEFENSES
    from detectors import DETECTORS

    from bench.plugins import load_plugin

    regs = {"attack": ATTACKS, "defense": DEFENSES, "detector": DETECTORS}
    modules = {load_plugin(f).__name__ for f in plugins}
    if names:
        todo = []
        for n in names:
            kinds = [k for k, r in regs.items() if n in r]
            if not kinds:
                raise BenchError(f"{n!r} is no registered attack, defense or detector; see bench list")
            todo += [(k, n) for k in kinds]
    else:
        todo = [(k, n) for k, r in regs.items() for n, cls in r.items() if getattr(cls, "__module__", None) in modules]
        if not todo:
            raise BenchError("nothing to check: give --plugin FILE.py that registers a component, or component names")
    failed = 0
    for kind, name in todo:
        click.echo(f"{kind} {name}:")
        for what, ok, detail in check_component(kind, name):
            failed += not ok
            click.echo(f"  {'ok  ' if ok else 'FAIL'} {what}" + (f" ({detail})" if detail else ""))
    if failed:
        click.echo(f"{failed} check(s) failed", err=True)
        sys.exit(1)


@main.command()
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="also write the numbers to this JSON file")
@click.option("--quick", is_flag=True, help="a shorter measurement (less precise)")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="where to measure; cuda adds the paper preset's model, timed under bf16, as a share of the GPU's peak")
@click.option("--driver", is_flag=True, help="instead: the run driver's own cost per cell on large grids of stub tasks (bench.perf_grid)")
@click.option("--cells", default="1000,10000", show_default=True, help="--driver: comma list of grid sizes, in cells")
@click.option("--grid", is_flag=True, help="instead: one real grid by local processes and by a local Dask cluster, wall times")
@click.option("--attack", "attack_", default="badnets,blend,trojan", show_default=True, help="--grid: comma list of attacks")
@click.option("--defense", default="none,ft,rnp", show_default=True, help="--grid: comma list of defenses")
@click.option("--preset", default="demo", show_default=True, help="--grid: the preset")
@click.option("--jobs", default=2, show_default=True, type=click.IntRange(min=1), help="--grid: local processes, and Dask workers")
@click.option("--set", "sets", multiple=True, help="--grid: component.field=value override (repeatable)")
def perf(json_path, quick, device, driver, cells, grid, attack_, defense, preset, jobs, sets) -> None:
    """Measure how fast this machine runs the pipeline (ratios against baselines measured in the same run)."""
    from bench.store import write_json

    if driver and grid:
        raise BenchError("--driver and --grid are two measurements; give one")
    if driver:
        from bench.perf_grid import driver_perf, format_driver

        try:
            sizes = [int(c) for c in cells.split(",") if c.strip()]
        except ValueError:
            raise BenchError(f"--cells {cells!r} is not a comma list of counts; e.g. --cells 1000,10000") from None
        if not sizes or min(sizes) < 1:
            raise BenchError(f"--cells {cells!r} must name counts >= 1")
        result = driver_perf(sizes)
        for size in result["sizes"]:  # the consistency lists are for tests, not for the JSON file
            for k in ("jsonl_cells", "planned_cells"):
                size.pop(k)
        click.echo(format_driver(result))
    elif grid:
        from attacks import ATTACKS
        from bench.config import parse_sets
        from bench.perf_grid import format_grid, grid_perf
        from defenses import DEFENSES

        result = grid_perf(_split(attack_, ATTACKS, "attack"), _split(defense, DEFENSES, "defense"), preset=preset,
                           jobs=jobs, sets=parse_sets(sets), log=lambda m: click.echo(m))
        click.echo(format_grid(result))
    else:
        import torch

        from bench.perf import format_table, run_perf

        if device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda was asked for but no CUDA device is available; allowed here: cpu")
        result = run_perf(quick=quick, device=device)
        click.echo(format_table(result))
    if json_path:
        write_json(json_path, result)
        click.echo(f"wrote {json_path}")


if __name__ == "__main__":
    main()
