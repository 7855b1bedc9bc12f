"""Your own model: `bench defend` / `bench detect` on a checkpoint, safe import, plugins, `bench check`."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bench.cli import main
from bench.models import MODELS
from bench.presets import PRESETS

TINY = ["--set=synthetic.n_train=300", "--set=synthetic.n_test=100", "--set=smallcnn.width=4", "--set=train.epochs=1",
        "--set=train.batch_size=64", "--set=run.defense_data=40"]
COMMON = ["--model", "smallcnn", "--dataset", "synthetic", "--preset", "demo", "--jobs", "1", "--quiet", *TINY]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_defense.py"
DEMO = PRESETS["demo"].fields  # what the demo preset sets besides TINY


def tiny_net(mean, std):
    """The network TINY trains under the demo preset."""
    return MODELS.get("smallcnn")(width=4, last_factor=DEMO["smallcnn"]["last_factor"]).build(10, 3, mean, std)


@pytest.fixture(autouse=True)
def _registries_restored():
    """Plugins loaded here register components in this process: forget them afterwards (other test modules
    iterate over the registries)."""
    import bench.plugins
    from attacks import ATTACKS
    from bench.data import DATASETS
    from defenses import DEFENSES
    from detectors import DETECTORS

    regs = (ATTACKS, DEFENSES, DETECTORS, MODELS, DATASETS)
    saved = [dict(r._entries) for r in regs]
    loaded = dict(bench.plugins._LOADED)
    yield
    for r, entries in zip(regs, saved):
        r._entries.clear()
        r._entries.update(entries)
    bench.plugins._LOADED.clear()
    bench.plugins._LOADED.update(loaded)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A badnets model trained by the grid (its cache entry), and its records: the checkpoint's origin."""
    tmp = tmp_path_factory.mktemp("origin")
    with pytest.MonkeyPatch.context() as mp:  # its own cache (the per-test cache does not exist yet at module scope)
        mp.setenv("BENCH_CACHE_DIR", str(tmp / "cache"))
        res = invoke("run", "--attack", "badnets", "--defense", "none", "--out", str(tmp / "run"),
                     *[a for a in COMMON if a not in ("--model", "smallcnn", "--dataset", "synthetic")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp / "run" / "records.jsonl").read_text().splitlines()[0])
    cache = tmp / "cache" / "models"
    entry = next(p for p in cache.iterdir() if p.name.endswith(rec["config"]["model_key"]))
    return {"dir": tmp, "record": rec, "weights": entry / "model.safetensors"}


def foreign_pt(trained, path: Path, wrap: str = "state_dict", prefix: str = "module.") -> Path:
    """The network alone (no normalisation buffers), as a training script would save it."""
    sd = load_file(str(trained["weights"]))
    net = {prefix + k[len("net."):]: v for k, v in sd.items() if k.startswith("net.")}
    torch.save({wrap: net, "epoch": 7} if wrap else net, path)
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_a_foreign_state_dict_is_the_same_model(trained, tmp_path):
    """module.-prefixed weights under state_dict, with the dataset's normalisation: the none row's CA equals
    the model's own; with --attack badnets (same seed) its ASR too; the record names the file by content."""
    ckpt = foreign_pt(trained, tmp_path / "model.pt")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    res = invoke("defend", str(ckpt), *COMMON, "--defense", "none", "--attack", "badnets", "--out", str(tmp_path / "d"))
    assert res.exit_code == 0, res.output
    (rec,) = records(tmp_path / "d")
    assert rec["metrics"] == trained["record"]["metrics"]
    assert rec["checkpoint"] == {"file": "model.pt", "size": ckpt.stat().st_size, "sha256": digest, "normalize": None}
    assert rec["backdoor"]["asr"] is not None


def test_without_attack_asr_is_not_measured_and_detection_has_no_truth(trained, tmp_path):
    ckpt = tmp_path / "ours.safetensors"
    ckpt.write_bytes(trained["weights"].read_bytes())  # our own cached format loads as it is
    res = invoke("detect", str(ckpt), *COMMON, "--detect", "rnp_label,strip", "--out", str(tmp_path / "d"))
    assert res.exit_code == 0, res.output
    (rec,) = records(tmp_path / "d")
    assert rec["attack"] == "unknown" and rec["metrics"]["asr"] is None and rec["metrics"]["ca"] == trained["record"]["metrics"]["ca"]
    dets = {d["detector"]: d for d in map(json.loads, (tmp_path / "d" / "detections.jsonl").read_text().splitlines())}
    assert dets["rnp_label"]["status"] == "ok" and dets["rnp_label"]["truth"]["backdoored"] is None
    assert dets["rnp_label"]["detection"]["label_correct"] is None
    assert dets["strip"]["status"] == "not applicable" and "--attack" in dets["strip"]["info"]["reason"]


def test_defend_resumes_and_a_changed_checkpoint_is_a_new_model(trained, tmp_path):
    ckpt = foreign_pt(trained, tmp_path / "m.pth", wrap="model", prefix="")
    before = ckpt.read_bytes()
    args = ["defend", str(ckpt), *COMMON, "--defense", "shrink", "--plugin", str(EXAMPLE), "--out", str(tmp_path / "d"),
            "--save-defended", str(tmp_path / "saved")]
    assert invoke(*args).exit_code == 0
    cells = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "cells").iterdir()}
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert saved == ["synthetic-smallcnn-unknown-none-s0.safetensors", "synthetic-smallcnn-unknown-shrink-s0.safetensors"]
    res = invoke(*args)
    assert res.exit_code == 0 and "resuming: 2 of 2 cells already finished" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "cells").iterdir()} == cells, "nothing recomputed"
    assert ckpt.read_bytes() == before, "the checkpoint is never written to"
    # The saved defended model is a Classifier state dict whose CA is the record's.
    shrink = next(r for r in records(tmp_path / "d") if r["defense"] == "shrink")
    from bench.data import DATASETS
    from bench.metrics import TriggeredSet, evaluate

    ds = DATASETS.get("synthetic")(n_train=300, n_test=100, noise=DEMO["synthetic"]["noise"])
    net = tiny_net(ds.mean, ds.std)
    net.load_state_dict(load_file(str(tmp_path / "saved" / "synthetic-smallcnn-unknown-shrink-s0.safetensors")))
    _, test = ds.load()
    assert evaluate(net.eval(), test, TriggeredSet(test.x[:0], test.y[:0], test.y[:0]))["ca"] == shrink["metrics"]["ca"]
    # Another file (one weight changed) is another model: its cells are recomputed.
    sd = torch.load(ckpt, weights_only=True)
    first = next(iter(sd["model"]))
    sd["model"][first] = sd["model"][first] + 1e-3
    torch.save(sd, ckpt)
    res = invoke(*args)
    assert res.exit_code == 0 and "resuming" not in res.output


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Payload()}))
    res = invoke("defend", str(bad), *COMMON, "--defense", "none", "--out", str(tmp_path / "d"))
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint evil.pt refused: it holds code or objects other than tensors")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "d").exists()


def _put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda t, p: p / "nope.safetensors", "checkpoint {p}/nope.safetensors does not exist"),
    (lambda t, p: _put(p / "w.ckpt", b"x"), "checkpoint w.ckpt has suffix '.ckpt'; allowed: .safetensors, .pt"),
    (lambda t, p: _put(p / "cut.safetensors", t["weights"].read_bytes()[:500]),
     "checkpoint cut.safetensors is not a readable safetensors file"),
    (lambda t, p: _put(p / "txt.safetensors", b"hello"), "checkpoint txt.safetensors is not a readable safetensors file"),
    (lambda t, p: torch.save({"epoch": 3, "lr": 0.1}, p / "empty.pt") or p / "empty.pt", "checkpoint empty.pt holds no tensors"),
    (lambda t, p: save_file({"conv.weight": torch.zeros(2, 3, 3, 3)}, str(p / "other.safetensors")) or p / "other.safetensors",
     "checkpoint other.safetensors does not fit --model smallcnn: 32 missing (0.weight, 1.weight, 1.bias, ...); 1 unexpected (conv.weight)"),
])
def test_bad_checkpoints_fail_on_one_line_before_any_work(trained, tmp_path, make, message):
    path = make(trained, tmp_path)
    res = invoke("defend", str(path), *COMMON, "--defense", "none", "--out", str(tmp_path / "d"))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message.format(p=tmp_path) in lines[0], lines
    assert not (tmp_path / "d").exists()


def test_a_head_for_another_number_of_classes_is_named(trained, tmp_path):
    sd = load_file(str(trained["weights"]))
    head = [k for k in sd if k.startswith("net.") and k.endswith(".weight") and sd[k].dim() == 2][-1]
    sd[head] = sd[head][:5]
    sd[head.replace("weight", "bias")] = sd[head.replace("weight", "bias")][:5]
    save_file(sd, str(tmp_path / "five.safetensors"))
    res = invoke("defend", str(tmp_path / "five.safetensors"), *COMMON, "--defense", "none", "--out", str(tmp_path / "d"))
    assert res.exit_code == 2
    assert "checkpoint five.safetensors has 5 classes (" in res.output and "dataset synthetic has 10" in res.output


def test_an_attack_whose_trigger_a_checkpoint_cannot_carry_is_refused(trained, tmp_path):
    res = invoke("defend", str(trained["weights"]), *COMMON, "--attack", "iad", "--out", str(tmp_path / "d"))
    assert res.exit_code == 2 and "--attack iad: its trigger needs state learned while the model trained" in res.output


def test_normalize_is_applied_and_checked(trained, tmp_path):
    from bench.checkpoint import Checkpoint, load_into, parse_normalize
    from bench.registry import BenchError

    assert parse_normalize("0.5,0.25") == ((0.5,), (0.25,)) and parse_normalize("none") == ((), ())
    for bad in ("0.5", "a,b", "0.5,0"):
        with pytest.raises(BenchError, match="--normalize"):
            parse_normalize(bad)
    ckpt = Checkpoint.open(foreign_pt(trained, tmp_path / "n.pt"), "0.5,0.25")
    net = tiny_net((0.1,) * 3, (0.2,) * 3)
    load_into(net, ckpt, 10, "synthetic", "smallcnn")
    assert torch.equal(net.mean.flatten(), torch.full((3,), 0.5)) and torch.equal(net.std.flatten(), torch.full((3,), 0.25))


# ---------------------------------------------------------------- plugins and bench check


def test_a_plugin_file_is_listed_run_in_workers_and_checked(tmp_path):
    res = invoke("list", "defenses", "--plugin", str(EXAMPLE))
    assert "shrink" in res.output and "example plugin" in res.output
    res = invoke("run", "--plugin", str(EXAMPLE), "--attack", "badnets", "--defense", "shrink", "--preset", "demo",
                 "--jobs", "2", "--quiet", *TINY, "--out", str(tmp_path / "r"))  # worker processes get it by value
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in records(tmp_path / "r")] == ["ok", "ok"]
    res = invoke("check", "--plugin", str(EXAMPLE))
    assert res.exit_code == 0 and "defense shrink:" in res.output and "FAIL" not in res.output


def test_a_plugin_that_breaks_the_contract_fails_the_check(tmp_path):
    bad = tmp_path / "peeking.py"
    bad.write_text('''
from dataclasses import dataclass
import copy, torch
from defenses.base import DEFENSES, Defense, DefenseResult
from bench.data import DATASETS

@DEFENSES.register("peeking")
@dataclass(frozen=True)
class Peeking(Defense):
    description = "reads the test set and draws from the global RNG"
    def __call__(self, model, clean, ctx):
        torch.rand(1)  # the global RNG
        DATASETS.get("synthetic")().load()  # data it was not given
        return DefenseResult(copy.deepcopy(model), {})
''')
    res = invoke("check", "--plugin", str(bad))
    assert res.exit_code == 1
    assert "FAIL runs on the model and clean data alone, no global RNG (AssertionError: a defense or detector may use only" in res.output


def test_a_broken_plugin_fails_on_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "oops.py"
    bad.write_text("x = 1\nimport no_such_module_here\n")
    res = invoke("list", "defenses", "--plugin", str(bad))
    assert res.exit_code == 2
    assert res.output.strip() == ("error: --plugin oops.py failed to import (line 2): ModuleNotFoundError: "
                                  "No module named 'no_such_module_here'")
    res = invoke("list", "defenses", "--plugin", str(tmp_path / "missing.py"))
    assert res.exit_code == 2 and "--plugin" in res.output and "no such Python file" in res.output


def test_clean_data_from_a_folder_of_the_defenders_own_images(trained, tmp_path):
    from PIL import Image

    from bench.data import DATASETS

    train, _ = DATASETS.get("synthetic")(n_train=300, n_test=100).load()
    folder = tmp_path / "mine"
    for i in range(30):  # class folders named by index; other sizes are resized to the dataset's
        (folder / str(int(train.y[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(train.x[i].permute(1, 2, 0).numpy()).resize((40, 40)).save(folder / str(int(train.y[i])) / f"{i}.png")
    args = ["defend", str(trained["weights"]), *COMMON, "--defense", "shrink", "--plugin", str(EXAMPLE), "--out", str(tmp_path / "d"),
            "--clean-data", str(folder)]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    recs = records(tmp_path / "d")
    assert all(r["info"]["defense_images"] == 30 and r["config"]["clean_data"]["path"] == str(folder.resolve()) for r in recs)
    (folder / "0" / "extra.png").write_bytes((folder / "1" / next(iter(os.listdir(folder / "1")))).read_bytes()
                                            if (folder / "1").exists() else b"")
    res = invoke(*args)  # another file in the folder: another defense set, recomputed
    assert res.exit_code == 0 and "resuming" not in res.output
    (folder / "stop").mkdir()
    res = invoke(*args)
    assert res.exit_code == 2
    assert "--clean-data" in res.output and "class folder 'stop' is not a class of synthetic; allowed: an index 0..9" in res.output


def test_bench_check_runs_the_detector_contract_on_a_named_component():
    res = invoke("check", "strip")
    assert res.exit_code == 0 and "detector strip:" in res.output and "FAIL" not in res.output
    assert "ok   the same seed gives the same answer" in res.output
