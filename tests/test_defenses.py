"""Defenses: the contract every registered defense keeps, and RNP's and FP's own rules.

Tiny and fast: one smallcnn (width 8) trained for a few seconds on synthetic images, and
a 64-image clean defense set.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import bench.data
import defenses.masks
import defenses.rnp
from bench.check import CHEAP, check_defense
from bench.config import build
from bench.data import DATASETS, ImageSet
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, accuracy, to_input, train
from defenses import DEFENSES, DefenseContext, DefenseResult
from defenses.base import last_linear
from defenses.fp import FinePruning, head_features
from defenses.masks import attach_masks, prune, pruning_sweep
from defenses.rnp import RNP, SWEEP, batches, recalibrate_bn
from defenses.select import TOL, split_holdout

from defense_fixtures import SYN, assert_pruned_by_masks, ctx, model, sets, state  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAST_RNP = dict(batch_size=32, unlearn_lr=0.05, recover_epochs=10)  # reaches the threshold, and some masks fall


@pytest.fixture(scope="module")
def rnp_run(model, sets):
    """One RNP run (fast settings) with the model's state before it."""
    before = state(model)
    res = RNP(**FAST_RNP)(model, sets[1], ctx())
    return before, res


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", DEFENSES.names())
def test_contract(name, model, sets, monkeypatch):
    """bench.check's defense contract (the one `bench check` runs on a plugin): only the model, the clean set
    and the context; no global RNG; the clean set untouched; a working model and JSON facts; the same seed,
    the same model (two independent runs: RNP's stage-1 memo emptied before each); the model on its device."""
    checks = check_defense(DEFENSES.get(name)(**CHEAP.get(name, {})), model, sets[1], lambda: ctx(seed=3),
                           before_each=lambda: monkeypatch.setattr(defenses.rnp, "_UNLEARNED", {}))
    assert [c[0] for c in checks if not c[1]] == [] and len(checks) == 5, checks


# ---------------------------------------------------------------- RNP pieces


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return self.inner(x) + x


class Custom(nn.Module):
    """A model RNP has never seen: BN at the top level and inside a nested block, one BN without affine."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = norm(4)
        self.blocks = nn.ModuleList([Block(4) if bn else nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())])
        self.plain = nn.BatchNorm2d(4, affine=False) if bn else nn.Identity()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return self.head(self.plain(x).mean((2, 3)))


def _randomize_bn(m: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d) and mod.affine:
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen))
    return m.eval()


@pytest.mark.parametrize("bn", [True, False])
def test_masks_attach_anywhere_and_match_pruning(bn):
    torch.manual_seed(0)
    m = _randomize_bn(Custom(bn=bn))
    x = torch.rand(2, 3, 8, 8)
    ref = m(x).detach()
    plain = state(m)
    masks = attach_masks(m)
    want = ["stem_bn", "blocks.0.inner.1"] if bn else ["stem", "blocks.0.0"]
    assert sorted(masks.masks) == sorted(want) and masks.kind == ("bn" if bn else "conv")
    assert torch.allclose(m(x), ref), "masks start at 1: the model computes the same function"
    # A 0/1 mask is exactly pruning: zeroing the masked channels' BN weight (or conv output).
    with torch.no_grad():
        for p in masks.parameters():
            p.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    masked = m(x).detach()
    values = masks.values()
    masks.remove()
    assert same_state(state(m), plain), "remove() gives the model back as it was"
    pruned = copy.deepcopy(m)
    assert prune(pruned, values, 0.5) == 2 * len(want)
    assert torch.allclose(pruned(x), masked, atol=1e-6)


def test_masks_need_conv_or_bn():
    with pytest.raises(BenchError):
        attach_masks(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


def test_batches_cover_every_image_without_tiny_batches():
    gen = torch.Generator().manual_seed(0)
    for n, bs, sizes in [(500, 128, {125}), (64, 128, {64}), (400, 128, {133, 134}), (130, 128, {130})]:
        parts = batches(n, bs, gen)
        assert {len(p) for p in parts} == sizes
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))


def test_unlearning_stops_at_threshold(model, sets):
    r = RNP(stop_check="step", batch_size=32, unlearn_lr=0.05)
    assert accuracy(model, sets[1]) > r.clean_threshold
    un = r.unlearn(copy.deepcopy(model), sets[1], ctx(), torch.Generator().manual_seed(0))
    hist = un["history"]
    assert un["reached"] and len(hist) == un["steps"] >= 2
    assert hist[-1] <= r.clean_threshold < hist[-2]
    assert all(a > r.clean_threshold for a in hist[:-1])

    ep = RNP(stop_check="epoch", batch_size=32, unlearn_lr=0.05).unlearn(copy.deepcopy(model), sets[1], ctx(), torch.Generator().manual_seed(0))
    assert ep["steps"] == 2 * ep["epochs"] and len(ep["history"]) == ep["epochs"]
    assert ep["history"][-1] <= 0.2 and all(a > 0.2 for a in ep["history"][:-1])


def test_unlearning_that_never_reaches_is_recorded(model, sets):
    res = RNP(unlearn_lr=0.0, unlearn_epochs=1, recover_epochs=1)(copy.deepcopy(model), sets[1], ctx())
    assert res.info["unlearn_reached"] is False and res.info["unlearn_epochs"] == 1


def test_rnp_leaves_original_alone_and_prunes_exactly_the_chosen_channels(model, rnp_run):
    before, res = rnp_run
    assert same_state(state(model), before), "unlearning and recovering work on copies"
    info, after = res.info, state(res.model)
    thr = info["threshold"]
    assert info["mask_kind"] == "bn" and thr == 0.2
    masks = info["masks"]
    assert all(0.0 <= v <= 1.0 for vs in masks.values() for v in vs)
    assert any(v < 0.999 for vs in masks.values() for v in vs), "recovering moved the masks"
    assert info["channels_total"] == sum(len(v) for v in masks.values())
    zeroed = assert_pruned_by_masks(before, after, masks, thr)
    assert zeroed == info["channels_pruned"] > 0


def test_rnp_sweep_is_the_official_grid(model, rnp_run):
    _, res = rnp_run
    assert SWEEP == tuple(round(0.05 * i, 2) for i in range(19))
    points = list(res.sweep())
    assert [p[0] for p in points] == list(SWEEP)
    counts = [sum(int((m.get_submodule(n).weight == 0).sum()) for n in res.info["masks"]) for _, m, _ in points]
    assert counts == [facts["channels_pruned"] for *_, facts in points]
    assert counts == sorted(counts) and counts[SWEEP.index(0.2)] == res.info["channels_pruned"]


def test_pruning_sweep_builds_one_model_per_distinct_channel_set():
    masks = {"a": torch.tensor([0.25, 0.0625, 0.875]), "b": torch.tensor([0.375, 1.0])}
    built: list[float] = []

    def pruned_at(t):
        built.append(t)
        return nn.Identity(), sum(int((m <= t).sum()) for m in masks.values())

    thresholds = (0.07, 0.1, 0.25, 0.3, 0.375, 0.5)
    points = list(pruning_sweep(thresholds, masks, pruned_at))
    # Pruned sets (mask <= t, as prune()): {a1}, {a1}, {a0, a1}, {a0, a1}, {a0, a1, b0}, {a0, a1, b0}.
    assert built == [0.07, 0.25, 0.375]
    assert [t for t, *_ in points] == list(thresholds)
    assert [f["channels_pruned"] for *_, f in points] == [1, 1, 2, 2, 3, 3]
    models = [m for _, m, _ in points]
    assert models[0] is models[1] and models[2] is models[3] and models[4] is models[5]
    assert len({id(m) for m in models}) == 3


@pytest.mark.parametrize("measure", ["accuracy", "probability"])
def test_rnp_auto_uses_only_the_defense_data(model, sets, monkeypatch, measure):
    r = RNP(select="auto", select_measure=measure, **FAST_RNP)
    first = r(copy.deepcopy(model), sets[1], ctx())
    # Other data existing, the global RNG moved on, dataset loading forbidden: same choice.
    other, _ = DATASETS.get("synthetic")(n_train=50, n_test=10, seed=7).load()
    torch.rand(100)
    monkeypatch.setattr(bench.data.Dataset, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    second = r(copy.deepcopy(model), sets[1], ctx())
    info = first.info
    assert json.dumps(info, sort_keys=True) == json.dumps(second.info, sort_keys=True)
    assert info["select"] == "auto" and info["threshold"] in SWEEP and info["holdout_images"] == 13
    assert info["auto_measure"] == measure and all(0 <= v <= 1 for v in info["auto_values"].values())
    # The documented rule: the largest sweep value up to which the held-out measure stays within the bound.
    ok = [a >= info["auto_base"] - r.max_acc_drop - TOL for a in info["auto_values"].values()]
    n_ok = ok.index(False) if False in ok else len(ok)
    assert info["threshold"] == SWEEP[max(n_ok - 1, 0)]


def test_true_class_probability_is_the_mean_softmax_of_the_label(model, sets):
    from bench.train import accuracy, to_input, true_class_probability

    data = sets[1]
    with torch.no_grad():
        p = model.eval()(to_input(data.x)).float().softmax(1)
    want = p[torch.arange(len(data)), data.y].mean().item()
    got = true_class_probability(model, data, bf16=False, batch_size=7)  # batches of 7: the mean is over images
    assert got == pytest.approx(want, abs=1e-5)
    assert got != pytest.approx(accuracy(model, data, bf16=False), abs=1e-3)


def test_recalibrate_bn_reestimates_the_statistics_of_the_data(model, sets):
    m = _randomize_bn(copy.deepcopy(model))
    weights = {k: v for k, v in state(m).items() if "running" not in k and "num_batches" not in k}
    data = sets[1]
    recalibrate_bn(m, data, batch_size=len(data))  # one batch: the statistics of the whole set
    assert not m.training and all(b.momentum == 0.1 for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert all(torch.equal(state(m)[k], v) for k, v in weights.items()), "only BN buffers change"
    seen = {}
    hooks = [b.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0]))
             for n, b in m.named_modules() if isinstance(b, nn.BatchNorm2d)]
    with torch.no_grad():
        m(to_input(data.x))  # eval mode: each BN sees the inputs it was recalibrated on
    for h in hooks:
        h.remove()
    assert len(seen) == 6
    for name, x in seen.items():
        bn = m.get_submodule(name)
        torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(bn.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-3, rtol=1e-2)


def test_rnp_recalibrate_bn_changes_only_the_pruned_models_statistics(model, sets, rnp_run):
    _, plain = rnp_run
    res = RNP(recalibrate_bn=True, **FAST_RNP)(copy.deepcopy(model), sets[1], ctx())
    assert res.info["masks"] == plain.info["masks"] and res.info["channels_pruned"] == plain.info["channels_pruned"]
    expect = copy.deepcopy(plain.model)
    recalibrate_bn(expect, sets[1], FAST_RNP["batch_size"])
    a, b, p = state(res.model), state(expect), state(plain.model)
    assert same_state(a, b)
    assert any(not torch.equal(a[k], p[k]) for k in a if "running_mean" in k), "statistics were re-estimated"
    _, swept, _ = next(pt for pt in res.sweep() if pt[0] == res.info["threshold"])
    assert same_state(state(swept), a), "the oracle sweep shows the same post-processing"


def test_rnp_reestimates_each_pruned_set_once_with_the_same_numbers(model, sets, monkeypatch):
    """Selection, result and sweep share the re-estimated statistics per pruned set; each equals a fresh re-estimate."""
    calls = []
    real = defenses.rnp.recalibrate_bn

    def counted(m, data, batch_size=128):
        calls.append(tuple(int((b.weight == 0).sum()) for b in m.modules() if isinstance(b, nn.BatchNorm2d)))
        real(m, data, batch_size)

    monkeypatch.setattr(defenses.rnp, "recalibrate_bn", counted)
    res = RNP(recalibrate_bn=True, select="auto", **FAST_RNP)(copy.deepcopy(model), sets[1], ctx())
    points = list(res.sweep())
    masks = {k: torch.tensor(v) for k, v in res.info["masks"].items()}
    distinct = {tuple(tuple(defenses.masks.pruned_channels(m, t).tolist()) for m in masks.values()) for t, _, _ in points}
    assert len(distinct) > 1, "the sweep should cross several pruned sets for this test to say anything"
    assert len(calls) == len(set(calls)) == len(distinct), "each pruned set re-estimated exactly once"
    train_share, _ = split_holdout(sets[1], RNP().holdout, torch.Generator().manual_seed(ctx().seed), "rnp")
    for t, swept, _ in points:
        expect = copy.deepcopy(model)
        prune(expect, masks, t)
        real(expect, train_share, FAST_RNP["batch_size"])
        assert same_state(state(swept), state(expect)), f"threshold {t}"


@pytest.mark.parametrize("kw", [dict(threshold=1.5), dict(threshold=-0.1), dict(clean_threshold=1.2),
                                dict(clean_threshold=-0.5), dict(select="oracle"), dict(stop_check="batch"),
                                dict(select="auto", holdout=0.0)])
def test_rnp_bad_settings(kw):
    with pytest.raises(BenchError):
        RNP(**kw)


def test_bad_settings_from_strings():
    with pytest.raises(BenchError):
        build(RNP, {"select": "best"})
    with pytest.raises(BenchError):
        build(FinePruning, {"acc_ratio": "2"})


# ---------------------------------------------------------------- FP


def test_fp_prunes_lowest_activation_first_and_stops_at_the_bound(model, sets):
    clean = sets[1]
    fp = FinePruning(finetune_epochs=0, acc_ratio=0.1, prune_step=0.05)
    _, head = last_linear(model, "test")
    means = head_features(model, head, clean, ctx()).float().mean(0)
    res = fp(copy.deepcopy(model), clean, ctx())
    info = res.info
    k, pruned = info["channels_pruned"], info["pruned_channels"]
    assert info["layer"] == "net.23" and info["channels_total"] == 32 and len(pruned) == k
    # Lowest mean activation first: every pruned channel is at most every kept one.
    kept = [c for c in range(32) if c not in pruned]
    if pruned and kept:
        assert means[pruned].max() <= means[kept].min()
    assert torch.equal(means[pruned], means[pruned].sort().values) or len(pruned) < 2
    # Exactly those input columns of the last Linear are zero.
    w = last_linear(res.model, "test")[1].weight
    assert sorted((w == 0).all(0).nonzero().flatten().tolist()) == sorted(pruned)
    # Stop rule: every kept step is within the bound, the step after the last one is not.
    acc0, curve = info["acc_before"], info["prune_curve"]
    chosen = [a for n, a in curve if n == k][0]
    assert all(acc0 - a < 0.1 * acc0 for n, a in curve if n <= k)
    if curve[-1][0] > k:
        assert acc0 - curve[-1][1] >= 0.1 * acc0 - 1e-4
    # The search ran on cached features; the pruned model itself gives the same accuracy.
    assert info["acc_after_prune"] == pytest.approx(chosen, abs=1e-4)
    assert info["acc_before"] == pytest.approx(accuracy(model, clean), abs=1e-6)


def test_fp_finetune_keeps_pruned_columns_zero(model, sets):
    res = FinePruning(finetune_epochs=2, acc_ratio=0.5)(copy.deepcopy(model), sets[1], ctx())
    w = last_linear(res.model, "test")[1].weight
    assert res.info["channels_pruned"] > 0
    assert sorted((w == 0).all(0).nonzero().flatten().tolist()) == sorted(res.info["pruned_channels"])
    assert not any("weight_orig" in k or "weight_mask" in k for k in res.model.state_dict())


@pytest.fixture(scope="module")
def plain_model(sets) -> nn.Module:
    """A model without any BatchNorm (vgg, bn=False), briefly trained."""
    m = MODELS.get("vgg")(width=4, bn=False).build(10, 3, SYN.mean, SYN.std, seed=0)
    train(m, sets[0], TrainConfig(epochs=1, batch_size=50, lr=0.05), SYN.augmentation, seed=0)
    return m.eval()


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_handles_a_model_without_batchnorm_or_says_why_on_one_line(name, plain_model, sets):
    try:
        res = DEFENSES.get(name)(**CHEAP.get(name, {}))(copy.deepcopy(plain_model), sets[1], ctx())
    except BenchError as exc:
        msg = str(exc)
        assert "\n" not in msg and "BatchNorm" in msg, msg  # names what the defense needs
        return
    x = sets[1].x[:4].float() / 255
    assert res.model(x).shape == (4, 10)
    json.dumps(res.info)


@pytest.mark.parametrize("name", ["rnp", "anp"])
def test_select_auto_holds_its_share_out_of_every_stage_that_learns(name, model, sets, monkeypatch):
    """Spies on the images each stage sees: unlearning and recovering (RNP) or the mask optimisation (ANP)
    see the same 80 % of the defense data; the threshold is chosen on the other 20 %, which no stage saw."""
    import defenses.anp as anp_mod
    import defenses.rnp as rnp_mod

    rows = lambda s: {bytes(r.numpy().tobytes()) for r in s.x.cpu().flatten(1)}  # noqa: E731
    seen: dict[str, set] = {}

    def spy(cls, method, stage):
        real = getattr(cls, method)

        def wrapper(self, m, data, *a, **k):
            seen[stage] = rows(data)
            return real(self, m, data, *a, **k)

        monkeypatch.setattr(cls, method, wrapper)

    module = rnp_mod if name == "rnp" else anp_mod
    real_choose = module.choose_threshold

    def choose(candidates, m, pruned_at, held, *a, **k):
        seen["held out"] = rows(held)
        return real_choose(candidates, m, pruned_at, held, *a, **k)

    monkeypatch.setattr(module, "choose_threshold", choose)
    monkeypatch.setattr(rnp_mod, "_UNLEARNED", {})
    if name == "rnp":
        spy(RNP, "unlearn", "unlearning")
        spy(RNP, "recover", "recovering")
        defense = RNP(select="auto", **FAST_RNP)
    else:
        spy(anp_mod.ANP, "optimize", "masks")
        defense = anp_mod.ANP(select="auto", max_epochs=2)
    defense(copy.deepcopy(model), sets[1], ctx())
    everything = rows(sets[1])
    held = seen.pop("held out")
    assert len(held) == round(0.2 * len(everything)) and held <= everything
    for stage, images in seen.items():
        assert images == everything - held, f"{stage} saw held-out images, or not all of the rest"
    assert set(seen) == ({"unlearning", "recovering"} if name == "rnp" else {"masks"})
