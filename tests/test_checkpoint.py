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


# ---------------------------------------------------------------- the fit is PyTorch's: load_state_dict(strict=True)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NBT = "num_batches_tracked"


def fresh(name: str) -> torch.nn.Module:
    """A model of the grid as a cell builds it before loading: width 4, 10 classes, 3x32x32, seed 0."""
    return MODELS.get(name)(width=4).build(10, 3, MEAN, STD, seed=0)


def source(name: str) -> torch.nn.Module:
    """The network someone trained: another seed, and one training-mode pass (BatchNorm's statistics and
    counters moved)."""
    model = MODELS.get(name)(width=4).build(10, 3, MEAN, STD, seed=1)
    with torch.no_grad():
        model.train()(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return model.net


def without_nbt(sd):
    """The state dict without BatchNorm's counters, keeping its version metadata."""
    out = type(sd)((k, v) for k, v in sd.items() if not k.endswith(NBT))
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata
    return out


def bn_version_1(net, sd):
    """As saved by a PyTorch whose BatchNorm had no counter yet: version 1 in the metadata, no num_batches_tracked."""
    out = without_nbt(sd)
    bns = {n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    out._metadata = type(sd._metadata)((k, {**v, "version": 1} if k in bns else v) for k, v in sd._metadata.items())
    return out


def nbt_as_vector(sd):
    """0-d buffers stored as one-element vectors (PyTorch 0.3's way; converters do it too)."""
    out = type(sd)((k, v.reshape(1) if v.dim() == 0 else v) for k, v in sd.items())
    out._metadata = sd._metadata
    return out


def as_dtype(sd, dtype):
    out = type(sd)((k, v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items())
    out._metadata = sd._metadata
    return out


def non_contiguous(sd):
    """Every weight of two or more dimensions a transposed view (torch.save keeps the strides)."""
    out = type(sd)((k, v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() >= 2 else v) for k, v in sd.items())
    out._metadata = sd._metadata
    assert any(not v.is_contiguous() for v in out.values())
    return out


def data_parallel_v1(net, sd):
    """DataParallel's state dict (``module.`` keys and metadata) from an older PyTorch, saved under state_dict."""
    dp = torch.nn.DataParallel(net)
    return {"state_dict": bn_version_1(dp, dp.state_dict()), "epoch": 7}


# (id, suffix, what is saved): each a checkpoint that PyTorch's load_state_dict(strict=True) takes
ACCEPTED = [
    ("as-saved", ".safetensors", lambda net, sd: sd),
    ("as-saved", ".pt", lambda net, sd: sd),
    ("fp16", ".safetensors", lambda net, sd: as_dtype(sd, torch.float16)),
    ("bf16", ".pt", lambda net, sd: as_dtype(sd, torch.bfloat16)),
    ("non-contiguous", ".pt", lambda net, sd: non_contiguous(sd)),
    # refused before: PyTorch fills BatchNorm's num_batches_tracked where the metadata does not say version 2
    ("no-nbt", ".safetensors", lambda net, sd: without_nbt(sd)),
    ("no-nbt-no-metadata", ".pt", lambda net, sd: dict(without_nbt(sd))),
    ("no-nbt-bn-version-1", ".pt", bn_version_1),
    ("data-parallel-no-nbt-bn-version-1", ".pt", data_parallel_v1),
    # refused before: a 0-d buffer given as a one-element vector
    ("nbt-as-vector", ".safetensors", lambda net, sd: nbt_as_vector(sd)),
    ("nbt-as-vector", ".pt", lambda net, sd: nbt_as_vector(sd)),
]


def save(obj, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(dict(obj), str(path))
    else:
        torch.save(obj, path)
    return path


def pytorch_reads(path: Path) -> dict:
    """What a PyTorch user loads from the file: safetensors' load_file, or torch.load's state dict (under
    state_dict if there, DataParallel's module. prefix consumed)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, weights_only=True)
    sd = obj.get("state_dict", obj)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(sd, "module.")
    return sd


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("model", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("case, suffix, make", ACCEPTED, ids=[f"{c}{s}" for c, s, _ in ACCEPTED])
def test_what_pytorch_loads_strictly_loads_here(tmp_path, model, case, suffix, make):
    """load_into takes every checkpoint that load_state_dict(strict=True) takes for the architecture, and
    the model it gives is the one PyTorch gives: the same state dict, the same outputs."""
    from bench.checkpoint import Checkpoint, load_into

    net = source(model)
    path = save(make(net, net.state_dict()), tmp_path / f"{case}{suffix}")
    reference = fresh(model)
    reference.net.load_state_dict(pytorch_reads(path), strict=True)
    loaded = fresh(model)
    load_into(loaded, Checkpoint.open(path), 10, "synthetic", model)
    assert_same_model(loaded, reference)
    x = torch.rand(4, 3, 32, 32)
    assert not torch.equal(loaded(x), fresh(model).eval()(x)), "the checkpoint's weights are in"


def drop_first_weight(net, sd):
    return {k: v for k, v in sd.items() if k != next(iter(sd))}


def add_key(net, sd):
    return {**sd, "extra.weight": torch.zeros(3)}


def first_running_var_as_row(net, sd):
    key = next(k for k in sd if k.endswith("running_var"))
    return {**sd, key: sd[key].reshape(1, -1)}


# (id, suffix, what is saved, the reason our line gives from the state dict): PyTorch refuses each
REFUSED = [
    ("missing-weight", ".safetensors", drop_first_weight, lambda sd: f"1 missing ({next(iter(sd))})"),
    ("unexpected-key", ".pt", add_key, lambda sd: "1 unexpected (extra.weight)"),
    ("mis-shaped", ".safetensors", first_running_var_as_row,
     lambda sd: next(f"1 mis-shaped ({k} (1, {len(v)}) != ({len(v)},))" for k, v in sd.items() if k.endswith("running_var"))),
    # BatchNorm's metadata says version 2, so PyTorch wants its counter (torch.save(model.state_dict()) minus them)
    ("no-nbt-bn-version-2", ".pt", lambda net, sd: without_nbt(sd),
     lambda sd: (lambda keys: f"{len(keys)} missing ({', '.join(keys[:3])}, ...)")([k for k in sd if k.endswith(NBT)])),
]


@pytest.mark.parametrize("model", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("case, suffix, make, reason", REFUSED, ids=[f"{c}{s}" for c, s, _, _ in REFUSED])
def test_what_pytorch_refuses_is_one_line_naming_the_keys(tmp_path, model, case, suffix, make, reason):
    from bench.checkpoint import Checkpoint, load_into
    from bench.registry import BenchError

    net = source(model)
    sd = net.state_dict()
    path = save(make(net, sd), tmp_path / f"{case}{suffix}")
    with pytest.raises(RuntimeError, match="Error.s. in loading state_dict"):
        fresh(model).net.load_state_dict(pytorch_reads(path), strict=True)
    with pytest.raises(BenchError) as err:
        load_into(fresh(model), Checkpoint.open(path), 10, "synthetic", model)
    assert str(err.value) == f"checkpoint {path.name} does not fit --model {model}: {reason(sd)}"


MNASNET = "torchvision:mnasnet0_5"  # its _load_from_state_dict needs the version metadata (1 or 2)


def mnasnet(seed: int) -> torch.nn.Module:
    return MODELS.get(MNASNET)().build(10, 3, MEAN, STD, seed=seed)


def test_torchvision_mnasnet_loads_a_pt_state_dict_with_its_metadata(tmp_path):
    """torch.save(model.state_dict()) keeps the metadata MNASNet's own loading reads (without it: ValueError)."""
    from bench.checkpoint import Checkpoint, load_into

    pt = save(mnasnet(1).net.state_dict(), tmp_path / "mnasnet.pt")
    loaded, reference = mnasnet(0), mnasnet(0)
    reference.net.load_state_dict(pytorch_reads(pt), strict=True)
    load_into(loaded, Checkpoint.open(pt), 10, "synthetic", MNASNET)
    assert_same_model(loaded, reference)


def test_torchvision_mnasnet_refuses_a_safetensors_file_on_one_line_as_pytorch_does(tmp_path):
    from bench.checkpoint import Checkpoint, load_into
    from bench.registry import BenchError

    st = save(mnasnet(1).net.state_dict(), tmp_path / "mnasnet.safetensors")
    with pytest.raises(ValueError, match="version should be set to 1 or 2 instead of None"):
        mnasnet(0).net.load_state_dict(pytorch_reads(st), strict=True)
    with pytest.raises(BenchError) as err:
        load_into(mnasnet(0), Checkpoint.open(st), 10, "synthetic", MNASNET)
    assert str(err.value) == (f"checkpoint mnasnet.safetensors does not fit --model {MNASNET}: "
                              "ValueError: version should be set to 1 or 2 instead of None")


def test_torchvision_vit_takes_the_legacy_mlp_keys_it_renames_itself(tmp_path):
    """torchvision's ViT (a small one of its class) renames mlp.linear_1 / linear_2 to mlp.0 / mlp.3 when
    the state dict has no metadata or an older version."""
    from torchvision.models import VisionTransformer

    from bench.checkpoint import Checkpoint, load_into
    from bench.models import Classifier

    def vit(seed):
        torch.manual_seed(seed)
        return Classifier(VisionTransformer(32, 16, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=10),
                          MEAN, STD)

    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
              for k, v in vit(1).net.state_dict().items()}
    assert sum("linear_1" in k for k in legacy) == 4
    path = save(legacy, tmp_path / "vit.safetensors")
    loaded, reference = vit(0), vit(0)
    reference.net.load_state_dict(pytorch_reads(path), strict=True)
    load_into(loaded, Checkpoint.open(path), 10, "synthetic", "vit")
    assert_same_model(loaded, reference)


def test_defend_takes_a_safetensors_file_without_batchnorm_counters(tmp_path):
    """The issue's case end to end: the network saved with safetensors minus num_batches_tracked gives the
    records of the same network saved whole."""
    sd = tiny_net(MEAN, STD).net.state_dict()
    for name, tensors in (("whole", dict(sd)), ("no-nbt", {k: v for k, v in sd.items() if not k.endswith(NBT)})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        res = invoke("defend", str(tmp_path / f"{name}.safetensors"), *COMMON, "--defense", "none",
                     "--out", str(tmp_path / name))
        assert res.exit_code == 0, res.output
    (whole,), (no_nbt,) = records(tmp_path / "whole"), records(tmp_path / "no-nbt")
    assert no_nbt["status"] == "ok" and no_nbt["metrics"] == whole["metrics"]


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
    by = {r["defense"]: r for r in recs}
    assert by["shrink"]["info"]["defense_images"] == 30 and by["shrink"]["config"]["clean_data"]["path"] == str(folder.resolve())
    assert by["none"]["info"]["defense_images"] == 0  # `none` needs no defense data and draws none
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
