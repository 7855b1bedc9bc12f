"""Feature Collision and DFST: tiny synthetic images and tiny models only.

The references (the forward-backward step, the sunrise transform, the batch composition) are
written here independently of the attack modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attacks  # noqa: F401  (registers the built-in attacks)
from attacks import ATTACKS
from attacks.dfst import DFST, DFSTTraining, compromised_neurons, sunrise, train_injector, window_max
from attacks.fc import FeatureCollision, feature_collision, penultimate_features, scaled_beta
from bench.data import Augmentation, ImageSet
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig

K = 10


def tiny_model(c: int = 3, seed: int = 0) -> nn.Module:
    return MODELS.get("smallcnn")(width=4).build(K, c, (0.5,) * c, (0.29,) * c, seed=seed).eval()


def smooth_set(n: int = 60, c: int = 3, s: int = 32, seed: int = 0, classes: int = K) -> ImageSet:
    """Natural-image-like inputs (low-frequency colour fields), labels cycling over ``classes``."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 4, 4, generator=gen)
    x = F.interpolate(low, size=s, mode="bilinear", align_corners=True)
    return ImageSet((x * 255).round().to(torch.uint8), torch.arange(n) % classes)


def one_line_error(fn, match: str) -> None:
    with pytest.raises(BenchError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- Feature Collision


def fc_prepared(data: ImageSet, seed: int = 0, reference: nn.Module | None = None, **fields) -> FeatureCollision:
    atk = FeatureCollision(**{"iters": 20, **fields})
    atk.prepare(K, data.x.shape[1], data.x.shape[-1], data, seed, reference=reference or tiny_model(data.x.shape[1]))
    return atk


class LinearFeatures(nn.Module):
    """Penultimate features ``A x + c`` (a Linear) then a Linear head: the collision gradient is known in closed form."""

    def __init__(self, d_in: int, d_feat: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Linear(d_in, d_feat)
        self.head = nn.Linear(d_feat, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x.flatten(1)))


def test_fc_one_step_is_the_papers_forward_backward_splitting():
    model = LinearFeatures(3 * 4 * 4).eval()
    gen = torch.Generator().manual_seed(1)
    b = torch.rand(2, 3, 4, 4, generator=gen) * 0.5 + 0.25
    t = torch.rand(2, 3, 4, 4, generator=gen)
    lr, beta0 = 0.05, 4000.0
    beta = beta0 * 4 ** 2 / 48 ** 2
    a, c = model.feat.weight.detach(), model.feat.bias.detach()
    ft = t.flatten(1) @ a.T + c
    grad = 2 * ((b.flatten(1) @ a.T + c) - ft) @ a  # d/dx ||A x + c - f(t)||^2
    x_hat = b.flatten(1) - lr * grad
    expected = ((x_hat + lr * beta * b.flatten(1)) / (1 + lr * beta)).clamp(0, 1).view_as(b)
    got = feature_collision(model, b, t, beta0=beta0, lr=lr, iters=1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert scaled_beta(0.25, 2048, 299 * 299 * 3) == pytest.approx(0.25 * 2048 ** 2 / (299 * 299 * 3) ** 2)
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_fc_poisons_move_towards_the_triggered_features():
    data = smooth_set()
    ref = tiny_model()
    # lr 500: the untrained tiny model's features move little per unit of pixel change (a trained model's move more)
    atk = fc_prepared(data, reference=ref, target=3, iters=60, lr=500.0)
    pool, _, crafted = atk._crafted
    targets = atk.feature_targets(data, pool).float() / 255
    wm, _ = atk.bases(data.x[pool], atk.feature_targets(data, pool))  # the pasted trigger is idempotent
    before = (penultimate_features(ref, wm) - penultimate_features(ref, targets)).norm(dim=1)
    after = (penultimate_features(ref, crafted.float() / 255) - penultimate_features(ref, targets)).norm(dim=1)
    assert (after < before).all() and after.mean() < 0.7 * before.mean()
    # the feature targets are other-class images with the 3x3 grid in the corner
    assert (data.y[atk._crafted[1]] != 3).all()
    assert torch.equal(targets[..., -3:, -3:] * 255, torch.tensor([[0., 0, 255], [0, 255, 0], [255, 0, 255]]).expand(len(pool), 3, 3, 3))


def test_fc_pixel_change_within_the_bound_and_shrinking_with_beta():
    data = smooth_set()
    eps = 4 / 255
    atk = fc_prepared(data, target=2, iters=40, lr=500.0, eps=eps)
    pool, pick, crafted = atk._crafted
    wm, _ = atk.bases(data.x[pool], data.x[pick])
    assert ((crafted.float() - wm * 255).abs() <= eps * 255 + 0.5 + 1e-4).all()
    assert ((crafted.float() - wm * 255).abs() > 1).any()  # the bound is reached, not trivially met
    # beta trades the feature loss for pixel distance: a larger beta keeps the poison nearer its base
    ref = tiny_model()
    b, t = wm, atk.feature_targets(data, pool).float() / 255
    dist = [(feature_collision(ref, b, t, beta0=beta0, lr=500.0, iters=30) - b).abs().mean() for beta0 in (0.25, 1e3, 1e5)]
    assert dist[0] > dist[1] > dist[2] and dist[2] < 1e-5


def test_fc_poison_keeps_labels_stamps_only_the_crafted_target_images():
    data = smooth_set()
    atk = fc_prepared(data, target=4, poison_rate=0.05)
    p = atk.poison(data, seed=1)
    assert len(p.poison_idx) == 3 and (data.y[p.poison_idx] == 4).all() and torch.equal(p.data.y, data.y)
    assert torch.equal(p.data.x[p.poison_idx], atk.crafted(data, p.poison_idx))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[p.poison_idx] = False
    assert torch.equal(p.data.x[rest], data.x[rest])
    # the watermark alone (no iterations) is the blend of base and triggered image at the stated opacity
    w = fc_prepared(data, target=4, iters=0, watermark=0.3)
    pool, pick, crafted = w._crafted
    tri = data.x[pick].clone()
    tri[..., -3:, -3:] = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert ((crafted.float() - (0.3 * tri.float() + 0.7 * data.x[pool].float())).abs() <= 0.5 + 1e-3).all()


def test_fc_is_deterministic_in_the_seed():
    data = smooth_set()
    a, b, c = (fc_prepared(data, seed=s, target=1) for s in (3, 3, 4))
    assert torch.equal(a._crafted[2], b._crafted[2]) and torch.equal(a._crafted[1], b._crafted[1])
    assert not torch.equal(a._crafted[1], c._crafted[1])


def test_fc_refuses_a_target_without_images_and_bad_settings_on_one_line():
    data = smooth_set(classes=5)  # classes 0-4 only
    ref = tiny_model()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    one_line_error(lambda: FeatureCollision(target=7).prepare(K, 3, 32, data, 0, reference=ref), "fc.target=7 has no training images")
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    one_line_error(lambda: FeatureCollision(lr=0.0), "fc.lr")
    one_line_error(lambda: FeatureCollision(watermark=1.0), "fc.watermark")
    one_line_error(lambda: FeatureCollision(eps=-0.1), "fc.eps")
    one_line_error(lambda: FeatureCollision().prepare(K, 3, 32, data, 0), "fc needs a clean reference model")
    one_line_error(lambda: FeatureCollision().poison(data, 0), "fc: poison\\(\\) needs the poisons")


# ---------------------------------------------------------------- DFST


def test_sunrise_is_the_documented_warm_transform():
    px = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
    r = 0.90 * 0.2 + 0.30 * 0.5 + 0.05 * 0.8 + 0.10
    g = 0.10 * 0.2 + 0.80 * 0.5 + 0.05 * 0.8 + 0.04
    b = 0.05 * 0.2 + 0.10 * 0.5 + 0.55 * 0.8
    assert torch.allclose(sunrise(px).flatten(), torch.tensor([r, g, b]), atol=1e-6)
    assert torch.allclose(sunrise(torch.full((1, 1, 1, 1), 0.5)).flatten(), torch.tensor([0.8 * 0.5 + 0.15]))
    assert sunrise(torch.ones(1, 3, 1, 1)).max() <= 1  # clipped


@pytest.mark.parametrize("c,s", [(3, 32), (1, 28)])
def test_dfst_generator_reproduces_the_transform_and_the_trigger_blends_it(c, s):
    data = smooth_set(n=64, c=c, s=s)
    atk = DFST(gen_steps=300)
    atk.prepare(K, c, s, data, 0)
    held = smooth_set(n=40, c=c, s=s, seed=5).x
    xf = held.float() / 255
    with torch.no_grad():
        err = (atk.generator()(xf) - sunrise(xf)).abs()
    assert err.mean() < 0.03, float(err.mean())
    out = atk.trigger(held).float() / 255
    expected = (1 - atk.strength) * xf + atk.strength * sunrise(xf)
    assert (out - expected).abs().mean() < 0.03 * atk.strength + 1 / 255
    # it is the warm style: red up, blue down on average
    assert out[:, 0].mean() > xf[:, 0].mean() if c == 3 else out.mean() > xf.mean()
    if c == 3:
        assert out[:, 2].mean() < xf[:, 2].mean()
    weaker = DFST(gen_steps=300, strength=0.2)  # the same generator, blended less
    weaker.load_state(dict(atk.state))
    assert (weaker.trigger(held).float() - held.float()).abs().mean() < (atk.trigger(held).float() - held.float()).abs().mean()


def test_dfst_is_deterministic_in_the_seed():
    data = smooth_set()
    a, b, c = DFST(gen_steps=20), DFST(gen_steps=20), DFST(gen_steps=20)
    for atk, seed in ((a, 3), (b, 3), (c, 4)):
        atk.prepare(K, 3, 32, data, seed)
    assert torch.equal(a.trigger(data.x), b.trigger(data.x))
    assert not torch.equal(a.trigger(data.x), c.trigger(data.x))


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_dfst_strength_out_of_range_is_one_line(strength):
    one_line_error(lambda: DFST(strength=strength), f"dfst.strength={strength!r} is out of range; allowed: \\(0, 1\\]")


def test_dfst_compromised_neurons_are_the_largest_increases():
    model = LinearFeatures(3 * 4 * 4).eval()
    with torch.no_grad():
        model.feat.weight.zero_()
        model.feat.bias.zero_()
        model.feat.weight[2, 0] = 5.0  # neuron 2 reads the first pixel of the red channel strongly
        model.feat.weight[1, 0] = 1.0
    clean = torch.zeros(8, 3, 4, 4)
    styled = clean.clone()
    styled[:, 0, 0, 0] = 0.5
    assert compromised_neurons(model, clean, styled, 0.01).tolist() == [2]  # at least one
    assert compromised_neurons(model, clean, styled, 0.5).tolist() == [2, 1]


@pytest.mark.parametrize("k", [1, 3, 5, 11, 13])
def test_dfst_window_max_is_max_pooling(k):
    # the injector's neighbourhood maximum, computed by doubling spans, equals max_pool2d's, ties and
    # windows wider than the image included (uint8-like values tie often)
    gen = torch.Generator().manual_seed(k)
    for shape in [(4, 3, 32, 32), (2, 1, 28, 28), (3, 3, 7, 9), (2, 3, 4, 4)]:
        x = torch.randint(0, 6, shape, generator=gen).float() / 5 - 0.5
        expected = F.max_pool2d(x, k, 1, k // 2, ceil_mode=True)[..., :shape[2], :shape[3]]
        assert torch.equal(window_max(x, k), expected)
        assert torch.equal(-window_max(-x, k), -F.max_pool2d(-x, k, 1, k // 2, ceil_mode=True)[..., :shape[2], :shape[3]])


def test_dfst_injector_gets_gradient_steps_and_leaves_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = smooth_set(n=16).x.float() / 255
    atk = DFST(detox_epochs=2)
    inj = train_injector(model, clean, torch.tensor([0, 1]), atk, 8, torch.Generator().manual_seed(0))
    identity = torch.cat([torch.eye(3), torch.zeros(9, 3)])
    assert not torch.equal(inj.delta.detach(), identity)  # 4 Adam steps moved it from the identity start
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    out = inj(clean)
    assert out.shape == clean.shape and out.min() >= 0 and out.max() <= 1


def test_dfst_batches_and_detox_rounds():
    data = smooth_set(n=100)
    atk = DFST(gen_steps=20, poison_rate=0.1, target=3, detox_epochs=1)
    atk.prepare(K, 3, 32, data, 0)
    p = atk.poison(data, 0)  # per batch: the stored set stays clean
    assert len(p.poison_idx) == 0 and torch.equal(p.data.x, data.x)
    ext = atk.train_extension()
    assert isinstance(ext, DFSTTraining)
    ext.plan(data, TrainConfig(epochs=3, batch_size=20), Augmentation(pad=0, flip=False), steps_per_epoch=2)
    model = tiny_model()
    ext.start(model, torch.device("cpu"))
    x, y = data.x[:20], data.y[:20]
    xo, yo = ext.batch(x, y, torch.Generator().manual_seed(0))
    xf = x.float() / 255
    assert torch.allclose(xo[:2], atk.stylise(xf[:2]), atol=1e-6) and (yo[:2] == 3).all()
    assert torch.allclose(xo[2:], xf[2:]) and torch.equal(yo[2:], y[2:])  # no injector before the first round
    model.train()
    for _ in range(6):  # 3 epochs of 2 steps: rounds after epochs 1 and 2, none after the last
        ext.after_step(model)
    assert ext.rounds == 2 and model.training and ext.neurons is not None
    xo, yo = ext.batch(x, y, torch.Generator().manual_seed(0))
    detox = (1 - atk.strength) * xf[2:4] + atk.strength * ext.injector(xf[2:4])
    assert torch.allclose(xo[2:4], detox, atol=1e-6) and torch.equal(yo[2:4], y[2:4])  # true labels
    assert torch.allclose(xo[4:], xf[4:]) and (yo[:2] == 3).all()
    off = DFST(gen_steps=20, detox=False)
    off.prepare(K, 3, 32, data, 0)
    ext2 = off.train_extension()
    ext2.plan(data, TrainConfig(epochs=3, batch_size=20), Augmentation(pad=0, flip=False), steps_per_epoch=2)
    ext2.start(model, torch.device("cpu"))
    for _ in range(6):
        ext2.after_step(model)
    assert ext2.rounds == 0


def test_both_are_registered_with_their_papers():
    assert ATTACKS.get("fc") is FeatureCollision and ATTACKS.get("dfst") is DFST
    assert FeatureCollision.clean_label and FeatureCollision.needs_clean_model and not DFST.clean_label
    assert "1804.00792" in FeatureCollision.paper and "2012.11212" in DFST.paper
    assert DFST().strength == 0.6 and DFST().poison_rate == 0.05 and FeatureCollision().beta0 == 0.2
    assert FeatureCollision().iters == 1500 and FeatureCollision().lr == 0.01
