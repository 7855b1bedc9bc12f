"""Attack tests on tiny synthetic images.

The contract tests run over every registered attack (``ATTACKS.names()``), so a new attack
is checked the moment it is registered; the attack-specific tests follow. An attack that needs
a clean model (``needs_clean_model``) gets a tiny seeded one; ``clean`` (``has_trigger = False``)
is held to its own contract: nothing changes and the triggered test set is empty.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attacks  # noqa: F401  (registers the built-in attacks)
from attacks import ATTACKS
from attacks.badnets import GRID_TRIGGER
from attacks.base import prepare_attack
from bench.data import ImageSet
from bench.models import MODELS
from bench.registry import BenchError
from bench.store import load_tensors, save_tensors

K = 10
NAMES = ATTACKS.names()
SHAPES = [(3, 32), (1, 28)]  # CIFAR-like RGB, MNIST-like grayscale
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_set(n: int = 64, c: int = 3, s: int = 32, seed: int = 100) -> ImageSet:
    # seed 100, not 0: blend draws its pattern from seed 0, and an image equal to it would not change
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, s, s), generator=gen, dtype=torch.uint8)
    y = torch.arange(n) % K
    return ImageSet(x, y[torch.randperm(n, generator=gen)])


def smooth_set(n: int = 16, c: int = 3, s: int = 32, seed: int = 0) -> torch.Tensor:
    """Natural-image-like inputs: low-frequency noise, where a small warp changes little."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 6, 6, generator=gen) * 255
    return F.interpolate(low, size=s, mode="bilinear", align_corners=True).round().to(torch.uint8)


FAST = {"lf": {"uap_steps": 5}, "trojan": {"trigger_steps": 5}, "lc": {"pgd_steps": 3}, "lira": {"gen_width": 4},
        "fc": {"iters": 3}, "dfst": {"gen_steps": 5}}  # the contract does not depend on the optimiser's budget


def reference_model(c: int = 3):
    """A tiny seeded clean model for attacks that need one (untrained: the contract needs none)."""
    return MODELS.get("smallcnn")(width=4).build(K, c, (0.5,) * c, (0.29,) * c, seed=0).eval()


def prepared(name: str, c: int = 3, size: int = 32, seed: int = 0, **fields):
    cls = ATTACKS.get(name)
    atk = cls(**{**FAST.get(name, {}), **fields})
    train = make_set(c=c, s=size)
    prepare_attack(atk, K, c, size, train, seed, reference_model(c) if cls.needs_clean_model else None)
    return atk, train


def on_the_fly(atk) -> bool:
    return atk.train_extension() is not None


# ---------------------------------------------------------------- contract, every attack


@pytest.mark.parametrize("name", NAMES)
def test_metadata(name):
    cls = ATTACKS.get(name)
    assert cls.description and "\n" not in cls.description
    assert cls.paper and "20" in cls.paper
    assert cls.__module__ and (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,s", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_trigger_contract(name, c, s, device):
    atk, train = prepared(name, c, s)
    for b in (64, 1, 0):
        x = train.x[:b].to(device)
        before = x.clone()
        out = atk.trigger(x)
        assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
        assert torch.equal(x, before), "trigger must not modify its input in place"
        if b and not atk.has_trigger:  # clean: no trigger, nothing changes
            assert torch.equal(out, x)
        elif b:
            assert (out != x).flatten(1).any(1).all(), "every image must change"


@pytest.mark.parametrize("c,s", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_trigger_deterministic(name, c, s):
    a, train = prepared(name, c, s, seed=3)
    b, _ = prepared(name, c, s, seed=3)
    assert torch.equal(a.trigger(train.x), b.trigger(train.x))


def refuses_all2all(name) -> bool:
    """Clean-label attacks are all-to-one only: asking for all-to-all is a one-line BenchError."""
    if not ATTACKS.get(name).clean_label:
        return False
    with pytest.raises(BenchError, match="label_mode='all2all' is not allowed"):
        ATTACKS.get(name)(label_mode="all2all")
    return True


@pytest.mark.parametrize("name", NAMES)
def test_apply_labels(name):
    atk, train = prepared(name, target=3)
    x, y = atk.apply(train.x, train.y)
    if not atk.has_trigger:  # clean: no trigger and no label map
        assert torch.equal(x, train.x) and torch.equal(y, train.y)
        return
    assert torch.equal(x, atk.trigger(train.x)) and (y == 3).all()
    if refuses_all2all(name):
        return
    atk2, _ = prepared(name, label_mode="all2all")
    _, y2 = atk2.apply(train.x, train.y)
    assert torch.equal(y2, (train.y + 1) % K)


@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
@pytest.mark.parametrize("name", NAMES)
def test_poison(name, label_mode):
    if label_mode == "all2all" and refuses_all2all(name):
        return
    if not ATTACKS.get(name).has_trigger:  # clean: poisons nothing, and any other rate is refused
        with pytest.raises(BenchError, match="poison_rate"):
            ATTACKS.get(name)(poison_rate=0.25)
        atk, train = prepared(name, label_mode=label_mode, target=2)
        p = atk.poison(train, seed=5)
        assert len(p.poison_idx) == 0 and p.poison_idx.dtype == torch.long
        assert torch.equal(p.data.x, train.x) and torch.equal(p.data.y, train.y)
        return
    atk, train = prepared(name, label_mode=label_mode, target=2, poison_rate=0.25)
    x0, y0 = train.x.clone(), train.y.clone()
    p = atk.poison(train, seed=5)
    assert torch.equal(train.x, x0) and torch.equal(train.y, y0), "poison must not modify the clean set"
    assert len(p.data) == len(train) and p.data.x.dtype == torch.uint8
    idx = p.poison_idx
    if on_the_fly(atk) or atk.weight_attack:  # poisoned per batch by the trainer hook, or no training (AWP): the stored set stays clean
        assert len(idx) == 0
        assert torch.equal(p.data.x, train.x) and torch.equal(p.data.y, train.y)
        return
    in_target = (train.y == 2).nonzero().flatten()
    if atk.clean_label:  # target-class images only, every label kept, capped at the class size (7 of 64 here)
        assert len(idx) == min(round(0.25 * len(train)), len(in_target)) and len(idx.unique()) == len(idx)
        assert (train.y[idx] == 2).all() and torch.equal(p.data.y, train.y)
    else:
        assert len(idx) == round(0.25 * len(train)) and len(idx.unique()) == len(idx)
        if label_mode == "all2one":
            assert (train.y[idx] != 2).all()
    if getattr(atk, "train_trigger", None) is None and not getattr(atk, "crafted_poisons", False):
        xt, yt = atk.apply(train.x[idx], train.y[idx])
        assert torch.equal(p.data.x[idx], xt) and torch.equal(p.data.y[idx], yt)
    else:  # a training trigger other than the test one (Adaptive-Blend's masked pieces, FC's crafted poisons; own tests)
        assert (p.data.x[idx] != train.x[idx]).flatten(1).any(1).all()
        assert torch.equal(p.data.y[idx], atk.target_labels(train.y[idx]))
    cover = getattr(p, "cover_idx", torch.zeros(0, dtype=torch.long))  # triggered but true-labelled (Adaptive-Blend)
    assert not set(cover.tolist()) & set(idx.tolist()) and torch.equal(p.data.y[cover], train.y[cover])
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[idx] = False
    rest[cover] = False
    assert torch.equal(p.data.x[rest], train.x[rest]) and torch.equal(p.data.y[rest], train.y[rest])
    q = atk.poison(train, seed=5)
    assert torch.equal(q.poison_idx, idx) and torch.equal(q.data.x, p.data.x) and torch.equal(q.data.y, p.data.y)
    if atk.clean_label and len(idx) == len(in_target):  # the whole target class: no choice left to the seed
        assert torch.equal(atk.poison(train, seed=6).poison_idx, in_target)
    else:
        assert not torch.equal(atk.poison(train, seed=6).poison_idx, idx)


@pytest.mark.parametrize("name", NAMES)
def test_test_set(name):
    atk, train = prepared(name, target=4)
    ts = atk.test_set(train)
    if not atk.has_trigger:  # clean: no triggered test set, so ASR and RA are undefined
        assert len(ts) == 0 and ts.x.shape == (0, *train.x.shape[1:]) and ts.x.dtype == torch.uint8
        assert len(ts.y_true) == len(ts.y_target) == 0
        return
    keep = train.y != 4
    assert len(ts) == int(keep.sum())
    assert torch.equal(ts.y_true, train.y[keep]) and (ts.y_target == 4).all()
    assert torch.equal(ts.x, atk.trigger(train.x[keep]))
    if refuses_all2all(name):
        return
    atk2, _ = prepared(name, label_mode="all2all")
    ts2 = atk2.test_set(train)
    assert len(ts2) == len(train) and torch.equal(ts2.y_target, (train.y + 1) % K)


@pytest.mark.parametrize("c,s", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_state_roundtrip(name, c, s, tmp_path):
    atk, train = prepared(name, c, s, seed=7)
    path = tmp_path / "state.safetensors"
    save_tensors(path, atk.state)
    fresh = ATTACKS.get(name)()
    fresh.load_state(load_tensors(path))
    assert fresh.num_classes == K
    assert torch.equal(fresh.trigger(train.x), atk.trigger(train.x))


@pytest.mark.parametrize("name", NAMES)
def test_bad_target_and_rate(name):
    atk = ATTACKS.get(name)(target=K)
    with pytest.raises(BenchError, match="target"):
        atk.prepare(K, 3, 32, make_set(), 0)
    for rate in (-0.1, 1.5):
        with pytest.raises(BenchError, match="poison_rate"):
            ATTACKS.get(name)(poison_rate=rate)


# ---------------------------------------------------------------- BadNets


@pytest.mark.parametrize("margin", [0, 2])
@pytest.mark.parametrize("c,s", SHAPES)
def test_badnets_patch(c, s, margin):
    atk, _ = prepared("badnets", c, s, margin=margin)
    x = torch.full((4, c, s, s), 128, dtype=torch.uint8)  # differs from every patch value
    out = atk.trigger(x)
    r1, c1 = s - margin, s - margin
    changed = (out != x).any(1)  # [B, H, W]
    expect = torch.zeros(s, s, dtype=torch.bool)
    expect[r1 - 3:r1, c1 - 3:c1] = True
    assert (changed == expect).all(), "exactly the 3x3 patch pixels change"
    patch = torch.tensor(GRID_TRIGGER, dtype=torch.uint8)
    assert (out[:, :, r1 - 3:r1, c1 - 3:c1] == patch).all()


def test_badnets_official_pattern():
    # RNP's _gridTriger: img[H-1][W-1] = 255, img[H-1][W-2] = 0, img[H-1][W-3] = 255, img[H-2][W-1] = 0, ...
    atk, _ = prepared("badnets")
    out = atk.trigger(torch.full((1, 3, 32, 32), 7, dtype=torch.uint8))[0, 0]
    assert out[31, 31] == 255 and out[31, 30] == 0 and out[31, 29] == 255
    assert out[30, 31] == 0 and out[30, 30] == 255 and out[30, 29] == 0
    assert out[29, 31] == 255 and out[29, 30] == 0 and out[29, 29] == 0


def test_badnets_margin_too_large():
    with pytest.raises(BenchError, match="margin"):
        prepared("badnets", 1, 28, margin=26)


# ---------------------------------------------------------------- Blend


@pytest.mark.parametrize("c,s", SHAPES)
def test_blend_formula(c, s):
    atk, train = prepared("blend", c, s)
    p = atk.state["pattern"]
    assert p.shape == (c, s, s) and p.dtype == torch.uint8
    # (4x + p) / 5 is a multiple of 0.2, never a .5 tie, so float64 rounding must agree exactly
    expect = (0.8 * train.x.double() + 0.2 * p.double()).round().to(torch.uint8)
    assert torch.equal(atk.trigger(train.x), expect)


def test_blend_pattern_seed_not_run_seed():
    a, train = prepared("blend", seed=0)
    b, _ = prepared("blend", seed=1)
    c, _ = prepared("blend", seed=0, pattern_seed=1)
    assert torch.equal(a.state["pattern"], b.state["pattern"])
    assert not torch.equal(a.state["pattern"], c.state["pattern"])
    assert a.state["pattern"].float().std() > 60  # uniform over 0..255


# ---------------------------------------------------------------- WaNet


def test_wanet_identity_when_s_is_zero():
    # grid orientation: with s = 0 the grid is the identity and the image must come back unchanged
    atk, train = prepared("wanet", s=0.0)
    assert torch.equal(atk.trigger(train.x), train.x)


def test_wanet_grid_official_construction():
    atk, _ = prepared("wanet", seed=11)
    gen = torch.Generator().manual_seed(11)
    ins = torch.rand(1, 2, 4, 4, generator=gen) * 2 - 1
    ins = ins / torch.mean(torch.abs(ins))
    noise = F.interpolate(ins, size=32, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    a = torch.linspace(-1, 1, steps=32)
    xx, yy = torch.meshgrid(a, a, indexing="ij")
    identity = torch.stack((yy, xx), 2)[None, ...]
    grid = torch.clamp((identity + 0.5 * noise / 32) * 1, -1, 1)
    assert torch.allclose(atk.grid(), grid)
    assert not torch.equal(prepared("wanet", seed=12)[0].grid(), grid), "the grid depends on the run seed"


@pytest.mark.parametrize("c,s", SHAPES)
def test_wanet_small_warp(c, s):
    atk, _ = prepared("wanet", c, s)
    shift = (atk.grid() - atk.state["identity_grid"]).abs().max() * (s - 1) / 2
    assert 0.05 < shift < 1.5, f"max displacement {shift:.2f} px"
    x = smooth_set(c=c, s=s)
    blend, _ = prepared("blend", c, s)
    d_wanet = (atk.trigger(x).float() - x.float()).abs().mean()
    d_blend = (blend.trigger(x).float() - x.float()).abs().mean()
    assert 0 < d_wanet < 0.5 * d_blend


@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
def test_wanet_hook(label_mode):
    atk, _ = prepared("wanet", label_mode=label_mode)
    hook = atk.train_extension().batch
    x = smooth_set(n=128)
    y = 1 + torch.arange(128) % (K - 1)  # no target-class image: relabelling is visible
    xo, yo = hook(x, y, torch.Generator().manual_seed(0))
    assert xo.shape == x.shape and xo.dtype == torch.uint8 and yo.dtype == y.dtype
    nb, nc = int(128 * 0.1), int(int(128 * 0.1) * 2)
    assert (nb, nc) == atk.batch_counts(128) == (12, 24)
    want = torch.zeros_like(y) if label_mode == "all2one" else (y + 1) % K
    assert torch.equal(yo[:nb], want[:nb])
    assert torch.equal(yo[nb:], y[nb:]), "cross (noise-mode) and clean samples keep their labels"
    assert torch.equal(xo[:nb], atk.trigger(x[:nb]))
    cross = xo[nb:nb + nc]
    assert (cross != x[nb:nb + nc]).flatten(1).any(1).all()
    assert not torch.equal(cross, atk.trigger(x[nb:nb + nc])), "cross samples get a random extra perturbation"
    assert torch.equal(xo[nb + nc:], x[nb + nc:])
    xo2, yo2 = hook(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(xo, xo2) and torch.equal(yo, yo2)
    xo3, _ = hook(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xo3[:nb], xo[:nb]) and not torch.equal(xo3[nb:nb + nc], cross)


def test_wanet_hook_relabels_target_class_too():
    # the official loop relabels the first num_bd images of the batch whatever their label
    atk, train = prepared("wanet", target=0)
    xo, yo = atk.train_extension().batch(train.x, train.y, torch.Generator().manual_seed(0))
    nb, _ = atk.batch_counts(len(train.y))
    assert (yo[:nb] == 0).all() and torch.equal(yo[nb:], train.y[nb:])


def test_wanet_rates_too_large():
    with pytest.raises(BenchError, match="cross_ratio"):
        ATTACKS.get("wanet")(poison_rate=0.5)
    ATTACKS.get("wanet")(poison_rate=0.5, cross_ratio=1.0)
