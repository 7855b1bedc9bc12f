"""ANP and CLP: the rules each paper states, checked on tiny synthetic models in seconds."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import defenses.anp
import defenses.rnp
import defenses.select
from bench.cli import main
from bench.config import build
from bench.data import DATASETS, ImageSet
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, train
from defenses import DefenseContext
from defenses.anp import ANP
from defenses.clp import CLP, SWEEP as U_SWEEP, channel_lipschitz, conv_bn_pairs
from defenses.masks import MaskSet
from defenses.rnp import RNP, SWEEP

from defense_fixtures import SYN, assert_pruned_by_masks, ctx, model, sets, state  # noqa: F401  (fixtures)
from reference_math import anp_official_iteration

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


FAST_ANP = dict(iterations=15, batch_size=32, threshold=0.6)  # 15 steps on a clean model: a few masks reach 0.6


@pytest.fixture(scope="module")
def anp_run(model, sets):
    before = state(model)
    return before, ANP(**FAST_ANP)(model, sets[1], ctx())


# ---------------------------------------------------------------- ANP


def _record_perturbed(monkeypatch) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record (noise, masks) each time the model computes with its perturbations switched on."""
    seen: list = []
    original = MaskSet.perturbed

    def spy(self):
        seen.append(([p.detach().clone() for p in self.noise_parameters()], [m.detach().clone() for m in self.parameters()]))
        return original(self)

    monkeypatch.setattr(MaskSet, "perturbed", spy)
    return seen


@pytest.mark.parametrize("steps", [1, 2])
def test_anp_perturbation_stays_within_eps_and_masks_within_unit_interval(model, sets, monkeypatch, steps):
    seen = _record_perturbed(monkeypatch)
    eps, iters = 0.4, 6
    ANP(iterations=iters, batch_size=32, eps=eps, steps=steps, project_noise=True)(copy.deepcopy(model), sets[1], ctx())
    assert len(seen) == iters * (steps + 1), "steps ascent passes and one mask pass per iteration"
    for noise, masks in seen:
        assert all(n.abs().max() <= eps + 1e-6 for n in noise)
        assert all(0.0 <= m.min() and m.max() <= 1.0 for m in masks)
    # The ascent moved the noise: the mask pass does not see the random start.
    assert any(not torch.equal(a, b) for a, b in zip(seen[0][0], seen[steps][0]))


@pytest.mark.parametrize("steps", [1, 2])
def test_anp_official_step_is_signed_of_size_eps_over_steps(model, sets, monkeypatch, steps):
    """project_noise=False is the official code: signed steps of eps / steps from a uniform start, unprojected."""
    seen = _record_perturbed(monkeypatch)
    eps = 0.4
    ANP(iterations=2, batch_size=32, eps=eps, steps=steps, project_noise=False)(copy.deepcopy(model), sets[1], ctx())
    start, stepped = torch.cat(seen[0][0]), torch.cat(seen[1][0])
    moved = (stepped - start).abs()
    assert start.abs().max() <= eps and (moved > 0).any()
    assert torch.all((moved < 1e-6) | ((moved - eps / steps).abs() < 1e-6))
    if steps == 1:
        assert stepped.abs().max() > eps, "unprojected, the official step leaves the eps ball"


class TinyBN(nn.Module):
    """conv-BN-ReLU twice, mean pool, linear: the net ``reference_math.tiny_bn_net`` writes out."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.linear = nn.Linear(6, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            for bn in (self.bn1, self.bn2):  # BN biases away from 0, so their perturbation matters
                bn.weight.add_(1.0)
                bn.bias.add_(torch.sign(bn.bias) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.linear(h.mean(dim=(2, 3)))


def test_anp_iterations_follow_the_official_algorithm(monkeypatch):
    """project_noise=False, two iterations on fixed batches against ``reference_math.anp_official_iteration``
    (the official ``mask_train`` restated): the noise after the signed ascent step and the masks after
    the momentum-SGD step and the clip agree to float32 rounding. The lr is raised from 0.2 so that
    masks leave [0, 1] on both sides and the clip matters."""
    seen = _record_perturbed(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    net = TinyBN(gen)
    w = {k: v.detach().clone() for k, v in net.state_dict().items()}
    batches = [(torch.rand(24, 3, 8, 8, generator=gen), torch.randint(3, (24,), generator=gen)) for _ in range(2)]
    anp = ANP(eps=0.4, steps=1, alpha=0.2, lr=25.0, momentum=0.9, project_noise=False)
    c = DefenseContext(num_classes=3, augmentation=SYN.augmentation, bf16=False)

    masks, opt = anp.start(net.eval())  # step() itself puts the model in train mode (BN batch statistics)
    ref_masks, buf = {k: torch.ones_like(m) for k, m in masks.masks.items()}, None
    clipped = set()
    for i, (x, y) in enumerate(batches):
        anp.step(net, masks, opt, x, y, c, gen)
        start, stepped = seen[2 * i][0], seen[2 * i + 1][0]  # the ascent pass, then the mask pass
        assert all(t.abs().max() <= anp.eps for t in start) and all(t.std() > 0.1 for t in start)
        noise0 = {k: start[2 * j: 2 * j + 2] for j, k in enumerate(masks.noise)}  # per BN: (weight, bias)
        noise, ref_masks, buf = anp_official_iteration(w, x, y, ref_masks, noise0, buf, eps=anp.eps, steps=anp.steps,
                                                       alpha=anp.alpha, lr=anp.lr, momentum=anp.momentum)
        for j, k in enumerate(masks.noise):
            torch.testing.assert_close(stepped[2 * j], noise[k][0], rtol=0, atol=1e-6)
            torch.testing.assert_close(stepped[2 * j + 1], noise[k][1], rtol=0, atol=1e-6)
            torch.testing.assert_close(masks.masks[k].detach(), ref_masks[k], rtol=0, atol=1e-5)
        clipped |= {float(v) for m in ref_masks.values() for v in m if v in (0.0, 1.0)}
    assert clipped == {0.0, 1.0}, "some masks were clipped at each end"
    assert any(((m > 0) & (m < 1)).any() for m in ref_masks.values())
    assert max(float(t.abs().max()) for t in stepped) > anp.eps, "the official step is not projected"


def test_anp_eps_zero_never_perturbs(model, sets, monkeypatch):
    seen = _record_perturbed(monkeypatch)
    assert ANP(iterations=3, batch_size=32, eps=0.0)(copy.deepcopy(model), sets[1], ctx()).info["iterations"] == 3
    assert seen == []


def test_anp_prunes_exactly_the_channels_at_or_below_the_threshold(model, anp_run):
    before, res = anp_run
    assert all(torch.equal(v, before[k]) for k, v in state(model).items()), "masks are learnt on a copy"
    info, after = res.info, state(res.model)
    thr, masks = info["threshold"], info["masks"]
    assert thr == 0.6 and info["select"] == "fixed" and info["mask_kind"] == "bn"
    assert all(0.0 <= v <= 1.0 for vs in masks.values() for v in vs)
    zeroed = assert_pruned_by_masks(before, after, masks, thr)
    assert zeroed == info["channels_pruned"] > 0
    assert info["channels_total"] == sum(len(v) for v in masks.values()) == 112


def test_anp_pruned_zeroes_planted_masks_and_sweeps_the_official_grid(model, anp_run):
    planted = {"net.1": torch.tensor([0.0, 0.2, 0.21, 1.0, 0.5, 0.05, 0.9, 0.2])}
    pruned, n = ANP().pruned(model, planted, 0.2)
    w = pruned.get_submodule("net.1").weight
    assert n == 4 and (w == 0).nonzero().flatten().tolist() == [0, 1, 5, 7]
    _, res = anp_run
    points = list(res.sweep())
    assert [p[0] for p in points] == list(SWEEP)
    counts = [sum(int((m.get_submodule(k).weight == 0).sum()) for k in res.info["masks"]) for _, m, _ in points]
    assert counts == [f["channels_pruned"] for *_, f in points] == sorted(counts)
    assert counts[SWEEP.index(0.6)] == res.info["channels_pruned"]


def test_select_auto_is_the_shared_helper_in_rnp_and_anp(model, sets, monkeypatch):
    for name in ("split_holdout", "choose_threshold"):
        shared = getattr(defenses.select, name)
        assert getattr(defenses.anp, name) is shared and getattr(defenses.rnp, name) is shared
    calls: list[tuple[str, str]] = []
    for mod in (defenses.anp, defenses.rnp):
        for name in ("split_holdout", "choose_threshold"):
            real = getattr(defenses.select, name)
            monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name, _m=mod.__name__, **k: (calls.append((_m, _n)), _r(*a, **k))[1])
    RNP(select="auto", batch_size=32, unlearn_lr=0.05, recover_epochs=2)(copy.deepcopy(model), sets[1], ctx())
    res = ANP(select="auto", **FAST_ANP)(copy.deepcopy(model), sets[1], ctx())
    assert sorted(calls) == sorted((m, n) for m in ("defenses.anp", "defenses.rnp") for n in ("split_holdout", "choose_threshold"))
    info = res.info
    assert info["select"] == "auto" and info["holdout_images"] == 13 and info["threshold"] in SWEEP
    # The documented rule: the largest sweep value up to which held-out accuracy stays within the bound,
    # evaluated in order and stopped at the first failure.
    accs = list(info["auto_values"].values())
    ok = [a >= info["auto_base"] - ANP().max_acc_drop - defenses.select.TOL for a in accs]
    n_ok = ok.index(False) if False in ok else len(ok)
    assert len(accs) == (n_ok + 1 if n_ok < len(ok) else len(SWEEP)), "tried in order, stopped at the first failure"
    assert info["threshold"] == SWEEP[max(n_ok - 1, 0)]


def test_largest_within_keeps_a_drop_of_exactly_the_bound():
    """95 of 100 held-out images right is a drop of exactly 5 points from 100 %; as a float32 fraction
    it reads 0.949999988 and must still pass (it failed before: RNP then fell back to t = 0)."""
    f32 = lambda k: float(torch.tensor(k / 100, dtype=torch.float32))  # noqa: E731
    accs = {0.0: f32(100), 0.05: f32(95), 0.1: f32(94), 0.15: f32(99)}
    chosen, tried = defenses.select.largest_within(list(accs), accs.get, 1.0, 0.05)
    assert chosen == 0.05 and tried == [accs[0.0], accs[0.05], accs[0.1]]  # stops at the first failure
    assert defenses.select.largest_within(list(accs), accs.get, 1.0, 0.04)[0] == 0.0


def test_anp_without_batchnorm_masks_conv_channels(sets):
    m = MODELS.get("vgg")(width=2, bn=False).build(10, 3, SYN.mean, SYN.std, seed=0).eval()
    before = state(m)
    res = ANP(iterations=3, batch_size=16, threshold=1.0)(m, sets[1], ctx())
    info = res.info
    assert info["mask_kind"] == "conv" and info["channels_pruned"] == info["channels_total"] > 0
    x = sets[1].x[:4].float() / 255
    assert torch.all(res.model(x) == res.model(x)[0]), "every conv channel pruned: a constant output"
    assert all(torch.equal(v, before[k]) for k, v in state(m).items())


def test_anp_settings_are_checked():
    for kw in (dict(eps=-1), dict(alpha=1.5), dict(steps=0), dict(iterations=0), dict(threshold=1.2),
               dict(select="best"), dict(select="auto", holdout=0.0), dict(max_epochs=-1)):
        with pytest.raises(BenchError):
            ANP(**kw)
    with pytest.raises(BenchError, match=r"anp.eps=-1.0 is out of range"):
        build(ANP, {"eps": "-1"})
    # The budget: the official 2000 iterations, capped at max_epochs passes over the defense data.
    assert ANP().iterations == 2000 and ANP(max_epochs=0).n_iterations(64) == 2000
    assert ANP(max_epochs=10).n_iterations(500) == 40 and ANP(max_epochs=10, iterations=20).n_iterations(500) == 20
    assert ANP().n_iterations(500) == 2000, "the official budget by default"
    assert ANP(max_epochs=25).n_iterations(500) == 98 and ANP(max_epochs=0.01).n_iterations(10) == 1


def test_bad_settings_fail_on_the_command_line_before_any_work(tmp_path):
    for setting, message in (("anp.eps=-1", "anp.eps=-1.0 is out of range"), ("clp.u=-0.5", "clp.u=-0.5 is out of range")):
        out = tmp_path / setting
        res = CliRunner().invoke(main, ["run", "--preset", "demo", "--defense", "anp,clp", "--out", str(out), "--set", setting])
        assert res.exit_code == 2 and message in res.output and not out.exists(), res.output


# ---------------------------------------------------------------- CLP


def _names(pairs):
    return [(c.removeprefix("net."), b.removeprefix("net.")) for c, b in pairs]


def test_clp_pairs_resnet18_from_the_graph():
    m = MODELS.get("resnet18")(width=4).build(10, 3, SYN.mean, SYN.std)
    pairs, unpaired = conv_bn_pairs(m)
    want = [("conv1", "bn1")]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            want += [(p + "conv1", p + "bn1"), (p + "conv2", p + "bn2")]
            if layer > 1 and block == 0:
                want.append((p + "shortcut.0", p + "shortcut.1"))
    assert _names(pairs) == want and unpaired == []


def test_clp_pairs_preactresnet18_from_the_graph_not_module_order():
    m = MODELS.get("preactresnet18")(width=4).build(10, 3, SYN.mean, SYN.std)
    pairs, unpaired = conv_bn_pairs(m)
    # The stem conv feeds layer1.0.bn1; inside every block conv1 feeds bn2. Every other block.bn1 and
    # bn_final read a residual sum, not a conv. (Module order would pair layer2.0.bn1 with layer1.1.conv2.)
    want = [("conv1", "layer1.0.bn1")] + [(f"layer{l}.{b}.conv1", f"layer{l}.{b}.bn2") for l in range(1, 5) for b in range(2)]
    assert sorted(_names(pairs)) == sorted(want)
    assert sorted(u.removeprefix("net.") for u in unpaired) == sorted(
        [f"layer{l}.{b}.bn1" for l in range(1, 5) for b in range(2) if (l, b) != (1, 0)] + ["bn_final"])


def test_clp_pairs_vgg_with_bn_and_refuses_vgg_without(sets):
    m = MODELS.get("vgg")(width=2).build(10, 3, SYN.mean, SYN.std)
    pairs, unpaired = conv_bn_pairs(m)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(pairs) == 13 and [c for c, _ in pairs] == convs and unpaired == []
    assert all(int(b.rsplit(".", 1)[1]) == int(c.rsplit(".", 1)[1]) + 1 for c, b in pairs)
    plain = MODELS.get("vgg")(width=2, bn=False).build(10, 3, SYN.mean, SYN.std)
    with pytest.raises(BenchError, match=r"clp: .*13 Conv2d, 0 BatchNorm2d.*needs such pairs") as err:
        CLP()(plain, sets[1], ctx())
    assert "\n" not in str(err.value)


class Reordered(nn.Module):
    """Registered conv_a, bn, conv_b, but the BN reads conv_b; a ReLU sits between conv_a and bn2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv_b(x)) + self.bn2(torch.relu(self.conv_a(x)))


def test_clp_pairs_by_dataflow_and_refuses_untraceable_models():
    pairs, unpaired = conv_bn_pairs(Reordered())
    assert pairs == [("conv_b", "bn")] and unpaired == ["bn2"]

    class Dynamic(Reordered):
        def forward(self, x):
            return self.bn(self.conv_b(x)) if x.sum() > 0 else x

    with pytest.raises(BenchError, match="cannot trace Dynamic"):
        conv_bn_pairs(Dynamic())


def _planted(kind: str) -> nn.Module:
    """A smallcnn whose channel 5 of the third conv->BN pair has a huge Lipschitz bound."""
    m = MODELS.get("smallcnn")(width=8).build(10, 3, SYN.mean, SYN.std, seed=1).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
        if kind == "conv":
            m.net[7].weight[5] *= 50
        else:  # the BN scale: a tiny running variance
            m.net[8].running_var[5] = 1e-4
    return m


@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_clp_zeroes_exactly_the_outlying_channels(sets, kind):
    m = _planted(kind)
    before = state(m)
    res = CLP()(m, sets[1], ctx())
    info, after = res.info, state(res.model)
    assert info["u"] == 3.0 and info["pruned"]["net.8"] >= 1 and info["channels_total"] == 112
    for conv, bn in conv_bn_pairs(m)[0]:
        c, b = m.get_submodule(conv), m.get_submodule(bn)
        # Independent per-channel computation, as the official loop: svd of each filter x |gamma / sigma|.
        sigma = (b.running_var + b.eps).sqrt()
        lips = torch.stack([torch.linalg.svdvals(c.weight[k].reshape(c.weight.shape[1], -1) * (b.weight[k] / sigma[k]).abs()).max()
                            for k in range(c.out_channels)]).detach()
        torch.testing.assert_close(channel_lipschitz(c, b), lips, rtol=1e-4, atol=1e-6)
        expect = (lips > lips.mean() + 3 * lips.std()).nonzero().flatten().tolist()
        cut = ((after[bn + ".weight"] == 0) & (after[bn + ".bias"] == 0)).nonzero().flatten().tolist()
        assert cut == expect and info["pruned"][bn] == len(expect)
        if bn == "net.8":
            assert expect == [5], "the planted channel is the one pruned"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {k for _, bn in conv_bn_pairs(m)[0] for k in (bn + ".weight", bn + ".bias")}
    assert all(torch.equal(v, before[k]) for k, v in state(m).items()), "the model passed in is untouched"


def test_clp_sweep_and_u(sets):
    m = _planted("conv")
    res = CLP(u=1.0)(m, sets[1], ctx())
    points = list(res.sweep())
    assert [p[0] for p in points] == list(U_SWEEP) == [0.5 * i for i in range(21)]
    counts = [f["channels_pruned"] for *_, f in points]
    assert counts == sorted(counts, reverse=True) and counts[U_SWEEP.index(1.0)] == res.info["channels_pruned"]
    assert res.info["channels_pruned"] > CLP()(m, sets[1], ctx()).info["channels_pruned"]
    with pytest.raises(BenchError):
        CLP(u=-1)
    with pytest.raises(BenchError):
        build(CLP, {"u": "many"})


@pytest.mark.parametrize("field, want", [(True, {True}), (False, {False})])
def test_anp_bf16_false_runs_the_masks_in_fp32_as_the_official_code(model, sets, monkeypatch, field, want):
    """With a context that asks for bf16, anp.bf16=false (the default, the official code's fp32) turns the
    autocast off in every pass; anp.bf16=true follows the context."""
    import contextlib

    seen = set()
    monkeypatch.setattr(defenses.anp, "autocast", lambda device, enabled=True: seen.add(enabled) or contextlib.nullcontext())
    c = DefenseContext(num_classes=10, augmentation=SYN.augmentation, seed=0, bf16=True)
    ANP(max_epochs=1, bf16=field)(copy.deepcopy(model), sets[1], c)
    assert seen == want
