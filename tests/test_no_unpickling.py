"""Nothing is unpickled: a grid, its resume and its report run with every unpickling entry point
made to fail, and a pickle planted in the cache never runs.

The only pickles the project reads are CIFAR's batch files, through ``bench.data.ArraysOnly``
(numpy arrays only; ``tests/test_data_sources.py``); it subclasses the unpickler and is not patched here.
"""

import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench.cli import main
from bench.run.plan import GridSpec, model_dir
from bench.presets import PRESETS
from bench.run.execute import run_grid

TINY = {"synthetic": {"n_train": "300", "n_test": "100"}, "smallcnn": {"width": "4"}, "train": {"epochs": "1", "batch_size": "64"},
        "run": {"defense_data": "40"}}


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def unpickling_forbidden(monkeypatch):
    """Every way to unpickle fails and is recorded: pickle's load and loads, any pickle.Unpickler (what
    torch's loader and numpy use), and torch's loader unless weights_only=True."""
    calls: list[str] = []

    def refuse(what):
        def f(*a, **k):
            calls.append(what)
            raise AssertionError(f"{what} was called")
        return f

    class RefusingUnpickler(pickle._Unpickler):
        def find_class(self, module, name):
            calls.append(f"Unpickler.find_class({module}.{name})")
            raise AssertionError("find_class was called")

    real_torch_load = torch.load

    def torch_load(*a, weights_only=None, **k):
        if weights_only is not True:
            calls.append("torch.load without weights_only=True")
            raise AssertionError("torch.load without weights_only=True")
        return real_torch_load(*a, weights_only=True, **k)

    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(pickle._Unpickler, "find_class", RefusingUnpickler.find_class)
    monkeypatch.setattr(torch, "load", torch_load)
    return calls


def test_the_guard_catches_an_unpickling(unpickling_forbidden, tmp_path):
    """The fixture would notice: a plain pickle.loads and torch.load of a pickle are refused and recorded."""
    blob = pickle.dumps(Payload(tmp_path / "ran"))
    with pytest.raises(AssertionError):
        pickle.loads(blob)
    (tmp_path / "x.pt").write_bytes(blob)
    with pytest.raises(AssertionError):
        torch.load(tmp_path / "x.pt", weights_only=False)  # refused: only weights_only=True may load
    assert unpickling_forbidden == ["pickle.loads", "torch.load without weights_only=True"]
    assert not (tmp_path / "ran").exists()


def test_a_grid_its_resume_and_its_report_never_unpickle(unpickling_forbidden, tmp_path):
    cells = GridSpec(attacks=["badnets", "blend"], defenses=["none", "nc"], preset="demo", detectors=["strip"],
                     overrides={**TINY, "nc": {"epochs": "2", "batches_per_epoch": "1", "unlearn_epochs": "1"},
                                "strip": {"n_overlays": "2"}}).plan()
    out = tmp_path / "run"
    recs = run_grid(cells[0], out, preset="demo", progress=False, log=lambda m: None, detect=cells[1])
    assert all(r["status"] == "ok" for r in recs), [r["error"] for r in recs]
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    # A pickle planted in the cache, in place of a cached model's weights and beside them as a .pt file:
    # the resumed grid reads safetensors only, so the cell fails with a clear error and nothing runs.
    entry = model_dir(cells[0][0].job)
    marker = tmp_path / "payload-ran"
    blob = pickle.dumps(Payload(marker))
    (entry / "model.safetensors").write_bytes(blob)
    (entry / "model.pt").write_bytes(blob)
    for p in out.glob("cells/*badnets*"):
        p.unlink()  # the badnets cells run again, from the cache
    recs = run_grid(cells[0], out, preset="demo", progress=False, log=lambda m: None, detect=cells[1])
    failed = [r for r in recs if r["status"] != "ok"]
    assert failed and all(r["attack"] == "badnets" for r in failed)
    assert all("model.safetensors is not a readable safetensors file" in r["error"] for r in failed), [r["error"] for r in failed]
    assert CliRunner().invoke(main, ["report", str(out)]).exit_code == 0
    assert not marker.exists(), "the planted pickle ran"
    assert unpickling_forbidden == [], unpickling_forbidden


def test_every_torch_load_in_the_project_passes_weights_only_true():
    """A static check beside the runtime guard: no call of torch.load anywhere in the package without
    weights_only=True (a future import path that the grid test does not reach would still be caught)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    calls = []
    for pkg in ("bench", "attacks", "defenses", "detectors"):
        for path in (root / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in node.keywords)
                    calls.append((f"{path.relative_to(root)}:{node.lineno}", ok))
    assert calls, "the scan finds the checkpoint reader's torch.load"
    assert all(ok for _, ok in calls), [c for c, ok in calls if not ok]


def test_defend_reads_a_checkpoint_without_unpickling_code(unpickling_forbidden, tmp_path):
    """bench defend on a .pt checkpoint goes through torch.load(weights_only=True) only (the guard lets that
    pass and records anything else); a planted code-running pickle is refused and does not run."""
    from bench.models import MODELS

    net = MODELS.get("smallcnn")(width=4, last_factor=PRESETS["demo"].fields["smallcnn"]["last_factor"]).build(10, 3, (0.5,) * 3, (0.5,) * 3).net
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ok.pt")
    args = ["defend", "--model", "smallcnn", "--dataset", "synthetic", "--defense", "none", "--preset", "demo", "--jobs", "1",
            "--quiet", *[f"--set={c}.{k}={v}" for c, kv in TINY.items() for k, v in kv.items()]]
    res = CliRunner().invoke(main, [*args[:1], str(tmp_path / "ok.pt"), *args[1:], "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    marker = tmp_path / "payload-ran"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    res = CliRunner().invoke(main, [*args[:1], str(tmp_path / "evil.pt"), *args[1:], "--out", str(tmp_path / "e")])
    assert res.exit_code == 2 and "refused" in res.output
    assert not marker.exists() and unpickling_forbidden == []
