"""Registries, typed configs and overrides, data, models, trainer: the shared core."""

import dataclasses
from typing import Literal

import pytest
import torch

from attacks import ATTACKS
from bench.config import Config, build, param, parse_sets
from bench.data import DATASETS, Augmentation, ImageSet, augment, defense_subset
from bench.models import MODELS
from bench.registry import BenchError, Registry
from bench.train import TrainConfig, TrainExtension, accuracy, predict, train
from defenses import DEFENSES

ALL = [("attack", ATTACKS), ("defense", DEFENSES), ("dataset", DATASETS), ("model", MODELS)]


def test_registry_refuses_duplicates_and_lists_names_on_a_miss():
    reg = Registry("thing")
    reg.register("alpha")(type("A", (), {}))
    with pytest.raises(BenchError, match="already registered"):
        reg.register("alpha")(type("B", (), {}))
    with pytest.raises(BenchError, match=r"unknown thing 'alpah' \(did you mean alpha\?\); known: alpha"):
        reg.get("alpah")


def test_a_family_resolves_its_members_on_first_use():
    reg = Registry("thing")
    reg.register("alpha")(type("A", (), {}))
    made = []

    def make(rest):
        if rest == "bad":
            raise BenchError(f"no such thing {rest!r}")
        made.append(rest)
        return type(f"T_{rest}", (), {})

    reg.register_family("fam", make, "x1: a thing")
    a = reg.get("fam:x1")
    assert a.name == "fam:x1" and reg.get("fam:x1") is a and made == ["x1"], "built once, remembered"
    assert "fam:x2" in reg and "fam:bad" not in reg and "other:x1" not in reg
    with pytest.raises(BenchError, match="no such thing 'bad'"):
        reg.get("fam:bad")
    with pytest.raises(BenchError, match=r"known: alpha, fam:x1, fam:x2, fam:NAME"):
        reg.get("nosuch")
    with pytest.raises(BenchError, match="names no member of 'fam'"):
        reg.get("fam:")


def test_a_name_becomes_a_file_name_without_separators():
    from bench.registry import slug

    assert slug("torchvision:resnet18") == "torchvision:resnet18"
    assert slug("folder:~/data/my signs") == "folder:~_data_my_signs"
    assert "/" not in slug("folder:/a/b/../c") and slug("") == "_"


def test_broken_plugin_is_reported_not_fatal(monkeypatch):
    from importlib import metadata

    class EP:
        name = "broken"

        def load(self):
            raise ImportError("no module named nowhere")

    monkeypatch.setattr(metadata, "entry_points", lambda group: [EP()])
    reg = Registry("attack", entry_point_group="bdbench.attacks")
    reg.register("fine")(type("F", (), {}))
    assert reg.names() == ["fine"]
    assert "ImportError" in reg.plugin_errors["broken"]
    with pytest.raises(BenchError, match="plugin 'broken' failed to load"):
        reg.get("broken")


@pytest.mark.parametrize("kind,reg", ALL, ids=[k for k, _ in ALL])
def test_every_registered_component_is_a_documented_valid_config(kind, reg):
    assert reg.names(), f"no {kind} registered"
    for name, cls in reg.items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, name
        assert isinstance(cls.description, str) and cls.description, name
        if kind in ("attack", "defense"):
            assert isinstance(cls.paper, str) and __import__(cls.__module__, fromlist=["x"]).__doc__, name
            assert cls.paper or name == "none", f"{name} cites no paper"
        cls()  # the defaults pass the config's own range and choice checks


@dataclasses.dataclass(frozen=True)
class Toy(Config):
    name = "toy"
    rate: float = param(0.1, low=0.0, high=1.0)
    steps: int = param(3, low=1)
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    sizes: tuple[int, ...] = (1, 2)


def test_overrides_are_typed_and_validated():
    t = build(Toy, {"rate": "0.5", "steps": "7", "mode": "b", "flag": "true", "sizes": "3,4"})
    assert (t.rate, t.steps, t.mode, t.flag, t.sizes) == (0.5, 7, "b", True, (3, 4))
    with pytest.raises(BenchError, match=r"toy.rate=1.5 is out of range; allowed: \[0, 1\]"):
        build(Toy, {"rate": "1.5"})
    with pytest.raises(BenchError, match="toy.mode='c' is not allowed; choose one of: a, b"):
        build(Toy, {"mode": "c"})
    with pytest.raises(BenchError, match="toy has no field 'rat'; fields: flag, mode, rate, sizes, steps"):
        build(Toy, {"rat": "1"})
    with pytest.raises(BenchError, match="toy.steps='many' is not a valid int"):
        build(Toy, {"steps": "many"})
    assert parse_sets(["rnp.clean_threshold=0.3", "train.epochs=2"]) == {"rnp": {"clean_threshold": "0.3"}, "train": {"epochs": "2"}}
    with pytest.raises(BenchError, match="malformed"):
        parse_sets(["rnp=0.3"])


def test_synthetic_is_deterministic_balanced_and_seeded():
    a, _ = DATASETS.get("synthetic")(n_train=200, n_test=50).load()
    b, _ = DATASETS.get("synthetic")(n_train=200, n_test=50).load()
    c, _ = DATASETS.get("synthetic")(n_train=200, n_test=50, seed=1).load()
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert a.x.dtype == torch.uint8 and a.x.shape == (200, 3, 32, 32)
    assert torch.bincount(a.y).tolist() == [20] * 10


def test_augment_crops_and_flips_whole_batches():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4).repeat(64, 1, 1, 1)
    out = augment(x, Augmentation(pad=1, flip=False), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    # every output is a shifted window of its zero-padded input
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(len(x)):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 4, dx:dx + 4]) for dy in range(3) for dx in range(3))
    assert not torch.equal(out, x)  # 128 images, 9 offsets: some moved
    flipped = augment(x, Augmentation(pad=0, flip=True), torch.Generator().manual_seed(0))
    is_flip = [torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x))]
    assert 0 < sum(is_flip) < len(x)
    assert all(f or torch.equal(flipped[i], x[i]) for i, f in enumerate(is_flip))


def test_no_horizontal_flip_for_traffic_signs_and_digits():
    assert DATASETS.get("gtsrb").augmentation.flip is False
    assert DATASETS.get("mnist").augmentation.flip is False


def test_defense_subset_is_clean_seeded_and_sized():
    train = ImageSet(torch.zeros(100, 1, 4, 4, dtype=torch.uint8), torch.arange(100))
    exclude = torch.arange(0, 100, 2)
    sub = defense_subset(train, 0.1, seed=3, exclude=exclude)
    assert len(sub) == 10 and (sub.y % 2 == 1).all()
    assert torch.equal(sub.y, defense_subset(train, 10, seed=3, exclude=exclude).y)
    assert not torch.equal(sub.y, defense_subset(train, 10, seed=4, exclude=exclude).y)
    with pytest.raises(BenchError, match="allowed: 1..50"):
        defense_subset(train, 60, seed=0, exclude=exclude)


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels,size,classes", [(3, 32, 10), (1, 28, 43)])
def test_models_take_any_classes_and_channels(name, channels, size, classes):
    m = MODELS.get(name)(width=4).build(classes, channels, (0.5,) * channels, (0.25,) * channels, seed=0)
    same = MODELS.get(name)(width=4).build(classes, channels, (0.5,) * channels, (0.25,) * channels, seed=0)
    other = MODELS.get(name)(width=4).build(classes, channels, (0.5,) * channels, (0.25,) * channels, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), same.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))
    assert m(torch.rand(2, channels, size, size)).shape == (2, classes)


def test_training_learns_and_is_reproducible_on_cpu():
    train_set, test_set = DATASETS.get("synthetic")(n_train=600, n_test=200).load()
    spec = MODELS.get("smallcnn")(width=8)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.1)
    runs = []
    for _ in range(2):
        m = spec.build(10, 3, (0.5,) * 3, (0.29,) * 3, seed=1)
        stats = train(m, train_set, cfg, Augmentation(4, True), seed=5)
        runs.append((m, stats))
    (m1, s1), (m2, _) = runs
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert accuracy(m1, test_set) > 0.3  # chance is 0.1
    assert s1["img_per_s"] > 0 and set(s1) >= {"seconds", "loss", "train_acc"}
    assert predict(m1, test_set.x[:5]).shape == (5,)


def test_train_extension_points_are_called_in_order():
    train_set, _ = DATASETS.get("synthetic")(n_train=256, n_test=10).load()
    calls = []

    class Ext(TrainExtension):
        def start(self, model, device):
            calls.append("start")

        def batch(self, x, y, gen):
            calls.append(("batch", len(x), x.dtype))
            return x, torch.zeros_like(y)

        def loss(self, model, x, y, out, loss):
            calls.append(("loss", x.dtype))
            return loss

        def after_step(self, model):
            calls.append("after")

        def end(self, model):
            calls.append("end")

    m = MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.29,) * 3)
    stats = train(m, train_set, TrainConfig(epochs=2, batch_size=64), Augmentation(0, False), seed=0, extensions=[Ext()])
    per_step = [("batch", 64, torch.uint8), ("loss", torch.float32), "after"]
    assert calls == ["start"] + per_step * 8 + ["end"]
    assert stats["train_acc"] > 0.9  # every label was rewritten to 0 by the extension: easy to fit


def test_train_extension_plan_sees_the_run_before_start():
    train_set, _ = DATASETS.get("synthetic")(n_train=200, n_test=10).load()
    calls = []

    class Planner(TrainExtension):
        def plan(self, data, cfg, aug, steps_per_epoch):
            calls.append(("plan", len(data), cfg.epochs, aug, steps_per_epoch))

        def start(self, model, device):
            calls.append("start")

    m = MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.29,) * 3)
    aug = Augmentation(2, True)
    train(m, train_set, TrainConfig(epochs=2, batch_size=64), aug, seed=0, extensions=[Planner()])
    assert calls == [("plan", 200, 2, aug, 3), "start"]  # 200 // 64 = 3 steps: the ragged batch is dropped


def test_train_seconds_include_the_extensions_plan(monkeypatch):
    """An extension's pre-training (IAD's mask generator) is part of what training the model cost.

    On a fake clock (one second per reading, 100 more while ``plan`` runs): no real timing here."""
    import types

    import bench.train

    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(bench.train, "time", types.SimpleNamespace(perf_counter=clock))
    train_set, _ = DATASETS.get("synthetic")(n_train=128, n_test=10).load()

    class SlowPlan(TrainExtension):
        def plan(self, data, cfg, aug, steps_per_epoch):
            now[0] += 100.0

    m = MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.29,) * 3)
    stats = train(m, train_set, TrainConfig(epochs=1, batch_size=64), Augmentation(2, True), seed=0, extensions=[SlowPlan()])
    assert stats["plan_seconds"] >= 100 and stats["seconds"] >= stats["plan_seconds"] + 1  # the loop's own time on top
    plain = train(m, train_set, TrainConfig(epochs=1, batch_size=64), Augmentation(2, True), seed=0)
    assert plain["plan_seconds"] < 100 and plain["seconds"] < stats["seconds"] - 99 and stats["img_per_s"] > 0


def test_train_extension_may_return_float_images_and_extra_loss_moves_the_model():
    train_set, _ = DATASETS.get("synthetic")(n_train=128, n_test=10).load()

    class Half(TrainExtension):  # float input in [0, 1], and a loss term that pulls the head to zero
        def batch(self, x, y, gen):
            return x.float() / 255 * 0.5, y

        def loss(self, model, x, y, out, loss):
            assert x.dtype == torch.float32 and float(x.max()) <= 0.5
            return loss + 1.0 * model.net[-1].weight.pow(2).sum()

    def run(exts):
        m = MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.29,) * 3)
        train(m, train_set, TrainConfig(epochs=1, batch_size=64), Augmentation(0, False), seed=0, extensions=exts)
        return m.net[-1].weight.norm().item()

    assert run([Half()]) < 0.5 * run([])


def test_train_extension_end_runs_when_training_fails():
    train_set, _ = DATASETS.get("synthetic")(n_train=64, n_test=10).load()
    ended = []

    class Boom(TrainExtension):
        def batch(self, x, y, gen):
            raise RuntimeError("boom")

        def end(self, model):
            ended.append(True)

    m = MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.29,) * 3)
    with pytest.raises(RuntimeError):
        train(m, train_set, TrainConfig(epochs=1, batch_size=32), Augmentation(0, False), seed=0, extensions=[Boom()])
    assert ended == [True]


def test_smallcnn_last_factor_widens_the_third_stage_only():
    """``last_factor`` sets the third stage's channels as a multiple of ``width`` (the demo's 8); 4 is the old network."""
    from torch import nn as tnn

    def convs(**kw):
        net = MODELS.get("smallcnn")(width=4, **kw).build(10, 3, (0.5,) * 3, (0.29,) * 3).net
        return [m.out_channels for m in net.modules() if isinstance(m, tnn.Conv2d)], net[-1].in_features

    assert convs() == ([4, 4, 8, 8, 16, 16], 16)
    assert convs(last_factor=8) == ([4, 4, 8, 8, 32, 32], 32)
