"""The clean model (``clean``), the shared clean reference model, and LF (low-frequency UAP).

Tiny synthetic data and tiny models only. The DCT used to check LF's band is written here from
its textbook definition, independently of the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar, Optional

import pytest
import torch
from click.testing import CliRunner

import attacks  # noqa: F401  (registers the built-in attacks)
import bench.run.cells as grid
from attacks import ATTACKS
from attacks.base import Attack
from attacks.lf import LowFrequency
from bench.cli import main
from bench.config import build
from bench.data import Augmentation, ImageSet, cache_dir
from bench.run.plan import GridSpec, model_dir, reference_job
from bench.run.cells import load_model
from bench.run.execute import run_grid
from bench.metrics import evaluate
from bench.models import MODELS
from bench.registry import BenchError
from bench.report import build_tables, compare_markdown, csv_rows, load_records, write_reports
from bench.train import TrainConfig, predict, train
from defenses.base import Defense, DefenseResult
from reference_math import naive_dct_matrix

K = 10
TINY = {"synthetic": {"n_train": "300", "n_test": "100"}, "smallcnn": {"width": "4"}, "train": {"epochs": "1", "batch_size": "64"},
        "run": {"defense_data": "40"}}
QUIET = {"preset": "demo", "progress": False, "log": lambda m: None}


def random_set(n: int = 64, c: int = 3, s: int = 32, seed: int = 100) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, c, s, s), generator=gen, dtype=torch.uint8), torch.arange(n) % K)


def tiny_model(c: int = 3, seed: int = 0):
    return MODELS.get("smallcnn")(width=4).build(K, c, (0.5,) * c, (0.29,) * c, seed=seed).eval()


# ---------------------------------------------------------------- clean


def test_clean_has_no_trigger_poisons_nothing_and_has_no_asr():
    atk = ATTACKS.get("clean")()
    assert not atk.has_trigger and not atk.needs_clean_model and atk.to_dict() == {}
    train_set = random_set()
    atk.prepare(K, 3, 32, train_set, 0)
    p = atk.poison(train_set, seed=1)
    assert len(p.poison_idx) == 0 and torch.equal(p.data.x, train_set.x) and torch.equal(p.data.y, train_set.y)
    ts = atk.test_set(train_set)
    assert len(ts) == 0
    m = evaluate(tiny_model(), train_set, ts, bf16=False)
    assert m["asr"] is None and m["ra"] is None and 0 <= m["ca"] <= 1  # undefined, never 0
    # Its fields change nothing, so they do not enter the cache key; a non-zero rate is refused.
    assert ATTACKS.get("clean")(target=3).to_dict() == atk.to_dict()
    with pytest.raises(BenchError, match=r"clean.poison_rate=0.1 is out of range; allowed: \[0, 0\]"):
        build(ATTACKS.get("clean"), {"poison_rate": "0.1"})


@dataclasses.dataclass(frozen=True)
class Sweeper(Defense):
    """Test-only: returns the model unchanged and a two-point operating curve (as RNP does)."""

    name = "sweeper"
    description = "test-only: identity with an oracle sweep"
    paper = "-"

    def __call__(self, model, clean, ctx):
        return DefenseResult(model, {"threshold": 0.5}, sweep=lambda: iter([(0.0, model), (1.0, model)]))


def md_rows(md: str) -> dict[str, list[str]]:
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    return {cells[0].strip("*"): cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows[2:])}


def test_clean_row_through_grid_records_tables_plots_and_cli(tmp_path, monkeypatch):
    """clean beside an attack: records store null ASR/RA, the tables show "-", the Average skips it, plots survive."""
    base = GridSpec(attacks=["clean", "badnets"], defenses=["none"], overrides=TINY, preset="demo").plan().defense_cells
    cells = base + [dataclasses.replace(c, defense=Sweeper()) for c in base]
    run = tmp_path / "run"
    evaluated: list[int] = []  # one entry (the clean set's size) per evaluate() call
    real_evaluate = grid.evaluate
    monkeypatch.setattr(grid, "evaluate", lambda m, c, t, **k: (evaluated.append(len(c)), real_evaluate(m, c, t, **k))[1])
    recs = run_grid(cells, run, **QUIET)
    # Sweeper's two settings yield one model object: the harness evaluates it once per sweeper cell.
    assert len(evaluated) == 2 + 4 + 2  # two trained models, four cells, one sweep evaluation per sweeper cell
    assert all(r["status"] == "ok" for r in recs)
    raw = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for r in raw:
        if r["attack"] == "clean":
            assert r["metrics"]["asr"] is None and r["metrics"]["ra"] is None and r["backdoor"]["asr"] is None
            assert r["metrics"]["ca"] > 0 and r["config"]["attack"] == {"name": "clean"}
            if r["defense"] == "sweeper":
                assert all(p["asr"] is None and p["ca"] is not None for p in r["info"]["oracle_curve"])
        else:
            assert isinstance(r["metrics"]["asr"], float)
    out = write_reports(run)
    assert {"table.md", "table.csv", "table.tex", "ca_vs_asr.png", "asr_before_after.png", "rnp_curve.png", "gallery.png"} <= set(out)
    md = out["table.md"].read_text()
    rows = md_rows(md)
    clean, badnets, avg = rows["clean"], rows["badnets"], rows["Average"]
    assert clean[1] == clean[2] == clean[4] == clean[5] == "-"  # ASR and RA of none and sweeper
    assert clean[0] != "-" and clean[3] != "-"                  # its CA is there
    # The Average is over the attacks only; the departure mark (‡) stays on the rows it belongs to.
    assert avg == [v.rstrip("‡") for v in badnets] and any(v.endswith("‡") for v in badnets) and not any("‡" in v for v in avg)
    assert "clean: no trigger, so ASR and RA are not defined" in md
    csv_clean = [r for r in csv_rows(load_records(run)) if r["attack"] == "clean"]
    assert len(csv_clean) == 2 and all(r["asr_mean"] is None and r["ra_mean"] is None and r["ca_mean"] > 0 for r in csv_clean)
    csv_text = out["table.csv"].read_text().splitlines()
    assert any(ln.startswith("synthetic,smallcnn,clean,none,1,0,") and ",,,," in ln for ln in csv_text)
    tex = [ln for ln in out["table.tex"].read_text().splitlines() if ln.startswith("clean &")]
    assert len(tex) == 1 and tex[0].count("--") == 4
    (t,) = build_tables(load_records(run))
    assert t.no_asr == ["clean"] and t.averaged == ["badnets"]
    res = CliRunner().invoke(main, ["report", str(run), "--compare"])
    assert res.exit_code == 0, res.output
    assert "| clean |" in res.output


def test_compare_with_a_clean_row_on_a_published_dataset():
    def rec(attack, defense, asr):
        return {"dataset": "cifar10", "model": "resnet18", "attack": attack, "defense": defense, "seed": 0, "status": "ok",
                "metrics": {"ca": 0.9, "asr": asr, "ra": None if asr is None else 0.1}}

    cmp = compare_markdown([rec("clean", "none", None), rec("clean", "nad", None), rec("lf", "none", 0.95), rec("lf", "nad", 0.1)])
    # LF is on the BackdoorBench leaderboard (NAD: CA 92.37, ASR 47.83); the leaderboard has no clean row
    assert "| resnet18 | lf | nad | 90.00 | 92.37 | 10.00 | 47.83 | removes | keeps | no |" in cmp
    assert "| clean |" not in cmp and "agrees with the published one in 0 of 1 defended cells" in cmp


# ---------------------------------------------------------------- the clean reference model


@dataclasses.dataclass(frozen=True)
class SpyA(Attack):
    """Test-only: needs the clean model, keeps its parameters in the state, flips a 2x2 corner."""

    name: ClassVar[str] = "spya"
    description: ClassVar[str] = "test-only"
    paper: ClassVar[str] = "-"
    needs_clean_model: ClassVar[bool] = True

    def prepare(self, num_classes, channels, size, train, seed, reference: Optional[torch.nn.Module] = None) -> None:
        super().prepare(num_classes, channels, size, train, seed, reference)
        self.state["ref_params"] = torch.cat([p.detach().flatten().cpu() for p in reference.state_dict().values()
                                              if p.is_floating_point()])

    def trigger(self, x):
        out = x.clone()
        out[..., -2:, -2:] = 255 - out[..., -2:, -2:]
        return out


@dataclasses.dataclass(frozen=True)
class SpyB(SpyA):
    name: ClassVar[str] = "spyb"


def spy_cells(with_clean_row: bool):
    (base,) = GridSpec(attacks=["clean"], defenses=["none"], overrides=TINY, preset="demo").plan().defense_cells
    spies = [dataclasses.replace(base, job=dataclasses.replace(base.job, attack=a)) for a in (SpyA(), SpyB())]
    return ([base] if with_clean_row else []) + spies


def test_the_clean_reference_is_trained_once_and_shared(tmp_path, monkeypatch):
    from bench.run.plan import graph

    tasks = graph(spy_cells(with_clean_row=True), [])
    train = [t for t in tasks if t.kind == "train"]
    assert [t.item.attack.name for t in train] == ["clean", "spya", "spyb"], "one task per model, the reference first"
    assert all(t.deps == (train[0].key,) for t in train[1:]), "each attack's model waits for the shared clean one"
    assert all(t.deps == (train[i].key,) for i, t in enumerate(t for t in tasks if t.kind == "defend")), "a cell waits for its model only"
    trained: list[str] = []
    real_train = grid.train
    monkeypatch.setattr(grid, "train", lambda *a, **k: trained.append(k["desc"].split("/")[2]) or real_train(*a, **k))
    recs = run_grid(spy_cells(with_clean_row=True), tmp_path / "run", **QUIET)
    assert [r["status"] for r in recs] == ["ok"] * 3
    assert sorted(trained) == ["clean", "spya", "spyb"], "the clean model is trained once: it is also the clean row"
    assert len(list((cache_dir() / "models").glob("*-clean-*"))) == 1
    ref = reference_job(spy_cells(False)[0].job)
    clean_model, *_ = load_model(ref, "cpu")
    want = torch.cat([p.detach().flatten() for p in clean_model.state_dict().values() if p.is_floating_point()])
    for job in (c.job for c in spy_cells(False)):
        _, attack, _, _ = load_model(job, "cpu")
        assert torch.equal(attack.state["ref_params"], want), f"{job.attack.name} got other weights"
        assert json.loads((model_dir(job) / "meta.json").read_text())["reference"] == model_dir(ref).name
    # A new grid without the clean row reuses the cached clean model: nothing is trained again.
    run_grid(spy_cells(with_clean_row=False), tmp_path / "run2", **QUIET)
    assert sorted(trained) == ["clean", "spya", "spyb"]


def test_a_failed_reference_fails_its_attacks_once(tmp_path, monkeypatch):
    calls: list[str] = []

    def broken(*a, **k):
        calls.append(k["desc"].split("/")[2])
        raise RuntimeError("no clean model today")

    monkeypatch.setattr(grid, "train", broken)
    recs = run_grid(spy_cells(with_clean_row=False), tmp_path / "run", **QUIET)
    assert calls == ["clean"], "the reference is tried once, not once per attack"
    assert [r["status"] for r in recs] == ["failed", "failed"]
    assert all("its clean reference model failed: RuntimeError: no clean model today" in r["error"] for r in recs)


def test_an_attack_that_needs_the_reference_refuses_to_prepare_without_it():
    with pytest.raises(BenchError, match="lf needs a clean reference model"):
        LowFrequency().prepare(K, 3, 32, random_set(), 0)


# ---------------------------------------------------------------- LF


def lf_prepared(c: int = 3, s: int = 32, seed: int = 0, **fields) -> tuple[LowFrequency, ImageSet]:
    atk = LowFrequency(**{"uap_steps": 10, **fields})
    data = random_set(c=c, s=s)
    atk.prepare(K, c, s, data, seed, reference=tiny_model(c))
    return atk, data


@pytest.mark.parametrize("c,s,cutoff", [(3, 32, 0.125), (3, 32, 0.25), (1, 28, 0.125)])
def test_lf_pattern_is_low_frequency_and_spans_the_amplitude(c, s, cutoff):
    atk, data = lf_prepared(c, s, cutoff=cutoff, target=0)  # the class these shares were sized on (default: official 6)
    v = atk.state["pattern"].double()
    assert v.shape == (c, s, s)
    assert abs(float(v.min())) < 1e-3 and abs(float(v.max()) - 51.0) < 1e-3, "spans [0, 0.2 * 255]"
    d = naive_dct_matrix(s)
    coef = d @ v @ d.T  # per channel
    k = torch.arange(s, dtype=torch.float64) / s
    outside = (k[:, None] ** 2 + k[None, :] ** 2).sqrt() > cutoff + 1e-9
    energy = coef.pow(2)
    assert float(energy[:, outside].sum()) < 1e-8 * float(energy.sum()), "no energy outside the band"
    inside_non_dc = ~outside.clone()
    inside_non_dc[0, 0] = False
    assert float(energy[:, inside_non_dc].sum()) > 0.01 * float(energy.sum()), "not only the mean"
    # The trigger adds the rounded pattern and clips: never below the image, never more than 51 above.
    xt = atk.trigger(data.x)
    diff = xt.int() - data.x.int()
    assert int(diff.min()) >= 0 and int(diff.max()) <= 51
    free = (data.x.double() + v) <= 255
    assert (diff.double() - v.expand_as(diff))[free].abs().max() <= 0.5 + 1e-6


def test_lf_is_seeded_and_leaves_the_reference_alone():
    ref = tiny_model()
    before = {k: t.clone() for k, t in ref.state_dict().items()}
    data = random_set()
    a, b, c = (LowFrequency(uap_steps=10) for _ in range(3))
    a.prepare(K, 3, 32, data, 0, reference=ref)
    b.prepare(K, 3, 32, data, 0, reference=ref)
    c.prepare(K, 3, 32, data, 1, reference=ref)
    assert torch.equal(a.state["pattern"], b.state["pattern"]) and not torch.equal(a.state["pattern"], c.state["pattern"])
    assert all(torch.equal(before[k], t) for k, t in ref.state_dict().items())
    assert all(p.grad is None for p in ref.parameters()) and not ref.training


def ramp_classes(n: int, seed: int) -> ImageSet:
    """Class k: a brightness ramp along the angle 2 pi k / K over a random grey level, plus pixel noise.

    The classes differ only in low frequencies, so a low-frequency pattern can imitate one.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    t = torch.linspace(-1, 1, 32)
    ang = 2 * math.pi * y.float() / K
    ramp = torch.cos(ang)[:, None, None] * t[None, None, :] + torch.sin(ang)[:, None, None] * t[None, :, None]
    level = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    img = level + 0.12 * ramp[:, None] + 0.04 * torch.randn(n, 3, 32, 32, generator=gen)
    return ImageSet((img.clamp(0, 1) * 255).round().to(torch.uint8), y)


def test_lf_perturbation_pushes_the_reference_model_to_the_target():
    """Against a random pattern of the same band and range (uap_steps=0, the same start), on held-out images."""
    data = ramp_classes(800, 0)
    train_set, test_set = data.subset(torch.arange(600)), data.subset(torch.arange(600, 800))
    ref = MODELS.get("smallcnn")(width=4).build(K, 3, (0.5,) * 3, (0.29,) * 3, seed=0)
    train(ref, train_set, TrainConfig(epochs=4, batch_size=32, bf16=False), Augmentation(pad=0, flip=False), seed=0)
    assert (predict(ref, test_set.x, bf16=False) == test_set.y).float().mean() > 0.9
    target = 3
    held_out = test_set.x[test_set.y != target]
    rates = {}
    for steps in (0, 100):
        atk = LowFrequency(target=target, uap_steps=steps)
        atk.prepare(K, 3, 32, train_set, 0, reference=ref)
        rates[steps] = float((predict(ref, atk.trigger(held_out), bf16=False) == target).float().mean())
    # The random pattern's own rate depends on the toy model (0.00-0.16 across thread counts); the
    # optimised one must beat it clearly.
    assert rates[100] > rates[0] + 0.1, rates


@pytest.mark.parametrize("field,value,match", [
    ("amplitude", "0", r"lf.amplitude=0.0 is out of range; allowed: \(0, 1\]"),
    ("amplitude", "1.5", r"lf.amplitude=1.5 is out of range; allowed: \(0, 1\]"),
    ("cutoff", "0", r"lf.cutoff=0.0 is out of range; allowed: \(0, 1\]"),
    ("cutoff", "2", r"lf.cutoff=2.0 is out of range; allowed: \(0, 1\]"),
    ("uap_lr", "0", r"lf.uap_lr=0.0 is out of range"),
    ("uap_images", "0", r"lf.uap_images=0 is out of range; allowed: \[1, ...\]"),
    ("uap_steps", "-1", r"lf.uap_steps=-1 is out of range; allowed: \[0, ...\]"),
    ("amplitude", "x", r"lf.amplitude='x' is not a valid float"),
])
def test_lf_bad_settings_are_one_line_errors_before_any_work(field, value, match):
    with pytest.raises(BenchError, match=match) as err:
        GridSpec(attacks=["lf"], defenses=["none"], overrides={**TINY, "lf": {field: value}}, preset="demo").plan().defense_cells
    assert "\n" not in str(err.value)


def test_lf_band_holding_only_the_mean_is_refused():
    with pytest.raises(BenchError, match=r"lf.cutoff=0.02 keeps only the mean of a 32x32 image; allowed: \[0.03125, 1\]"):
        LowFrequency(cutoff=0.02).prepare(K, 3, 32, random_set(), 0, reference=tiny_model())
