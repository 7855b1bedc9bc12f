"""AWP (a bounded weight perturbation of the clean model) and LIRA (a learned bounded trigger generator)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attacks  # noqa: F401
from attacks import ATTACKS
from attacks.awp import perturbed_copy
from bench.data import Augmentation, ImageSet
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, train

K = 4


def toy(n: int = 256, seed: int = 0) -> ImageSet:
    """Four classes, each a constant colour quadrant on noise: a tiny model learns it in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = torch.randint(0, 60, (n, 3, 16, 16), generator=gen).to(torch.uint8)
    for c in range(K):
        r, q = divmod(c, 2)
        x[y == c, :, r * 8:(r + 1) * 8, q * 8:(q + 1) * 8] = 200
    return ImageSet(x, y)


def small_model(seed: int = 0):
    return MODELS.get("smallcnn")(width=4).build(K, 3, (0.5,) * 3, (0.29,) * 3, seed=seed)


CFG = TrainConfig(epochs=3, batch_size=32, lr=0.05, bf16=False, channels_last=False)


def aug() -> Augmentation:
    return Augmentation(pad=0, flip=False)


@pytest.fixture(scope="module")
def clean_model():
    data = toy()
    m = small_model()
    train(m, data, CFG, aug(), seed=0)
    return m.eval(), data


def asr(model, atk, data) -> float:
    keep = data.y != atk.target
    x = atk.trigger(data.x[keep]).float() / 255
    with torch.no_grad():
        return float((model(x).argmax(1) == atk.target).float().mean())


# ---------------------------------------------------------------- AWP


def awp(reference, data, seed=0, **kw):
    atk = ATTACKS.get("awp")(**{"poison_rate": 0.5, "epochs": 5, "patch_size": 4, **kw})
    atk.prepare(K, 3, 16, data, seed, reference=reference)
    return atk


def test_awp_defaults_and_bad_bound():
    atk = ATTACKS.get("awp")()
    assert (atk.eps, atk.lr, atk.epochs, atk.weight_reg, atk.patch_size, atk.poison_rate) == (0.005, 1e-3, 10, 5e-4, 10, 0.0256)
    assert (atk.target, atk.label_mode) == (1, "all2one")
    assert atk.needs_clean_model and atk.weight_attack
    for bad in (0.0, -0.01):
        with pytest.raises(BenchError, match="awp.eps") as e:
            ATTACKS.get("awp")(eps=bad)
        assert "\n" not in str(e.value)


def test_awp_stays_in_the_bound_and_implants(clean_model):
    reference, data = clean_model
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    atk = awp(reference, data, eps=0.02, target=0)  # class 0, as this toy check was sized (the default is the official 1)
    asr0 = asr(reference, atk, data)
    model, stats = perturbed_copy(atk, reference, data, seed=0)
    # the reference is untouched; every parameter moved by at most eps; buffers (BatchNorm statistics) unchanged
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before.items())
    params = dict(reference.named_parameters())
    moved = 0.0
    for k, v in model.state_dict().items():
        if k in params:
            d = float((v - before[k]).abs().max())
            assert d <= 0.02 + 1e-6
            moved = max(moved, d)
        else:
            assert torch.equal(v, before[k]), k
    assert moved > 0.01 and stats["weight_change_linf"] == pytest.approx(moved, abs=1e-6)
    assert asr(model, atk, data) > max(0.6, asr0 + 0.4)


def test_awp_deterministic_in_the_seed(clean_model):
    reference, data = clean_model
    a, _ = perturbed_copy(awp(reference, data, epochs=1), reference, data, seed=1)
    b, _ = perturbed_copy(awp(reference, data, epochs=1), reference, data, seed=1)
    c, _ = perturbed_copy(awp(reference, data, epochs=1), reference, data, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_awp_trigger_is_a_centred_mean_patch(clean_model):
    reference, data = clean_model
    atk = awp(reference, data, patch_size=4)
    x = torch.full((2, 3, 16, 16), 255, dtype=torch.uint8)
    out = atk.trigger(x)
    changed = (out != x).any(1)[0]
    expect = torch.zeros(16, 16, dtype=torch.bool)
    expect[6:10, 6:10] = True
    assert torch.equal(changed, expect)
    mean = data.x.float().mean(dim=(0, 2, 3)).round().to(torch.uint8)
    assert torch.equal(out[0, :, 7, 7], mean)


# ---------------------------------------------------------------- LIRA


def lira(data, seed=0, **kw):
    atk = ATTACKS.get("lira")(**{"gen_width": 4, **kw})
    atk.prepare(K, 3, 16, data, seed)
    return atk


def g_weights(atk) -> dict:
    return {k[2:]: v.clone() for k, v in atk.state.items() if k.startswith("G.") and "running" not in k and "num_batches" not in k}


def test_lira_defaults_and_bad_eps():
    atk = ATTACKS.get("lira")()
    assert (atk.eps, atk.alpha, atk.lr_atk, atk.poison_rate) == (0.01, 0.5, 1e-4, 1.0)
    assert (atk.target, atk.label_mode) == (0, "all2one")
    assert (atk.gen_width, atk.lookahead) == (64, True)
    assert atk.learned_trigger
    assert [atk.stage1_epochs_for(e) for e in (1, 4, 10, 60, 300)] == [1, 4, 10, 50, 50], "the official 50, run-capped"
    scaled = ATTACKS.get("lira")(stage1_epochs=0)
    assert [scaled.stage1_epochs_for(e) for e in (1, 4, 10, 300)] == [1, 1, 2, 50]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(BenchError, match="lira.eps") as e:
            ATTACKS.get("lira")(eps=bad)
        assert "\n" not in str(e.value)


def test_lira_perturbation_within_eps():
    data = toy(64)
    atk = lira(data, eps=0.05)
    g = atk.generator()
    for p in g.parameters():  # a larger generator output, to reach the tanh's range
        p.data.mul_(3)
    atk._store(g)
    out = atk.trigger(data.x)
    d = (out.int() - data.x.int()).abs()
    assert int(d.max()) <= round(0.05 * 255) + 1 and int(d.max()) >= 5


def test_lira_generator_steps_in_stage1_only():
    data = toy(128)
    atk = lira(data, stage1_epochs=1, lr_atk=1e-2)
    g0 = g_weights(atk)
    model = small_model()
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, bf16=False, channels_last=False)
    ext = atk.train_extension()
    seen = []

    class Spy:
        def plan(self, *a): pass
        def start(self, *a): pass
        def batch(self, x, y, gen): return x, y
        def loss(self, model, x, y, out, loss): return loss
        def after_step(self, model):
            seen.append((ext.step - 1 < ext.stage1_steps, {k: v.detach().clone() for k, v in ext.g.state_dict().items() if "running" not in k and "num_batches" not in k}))
        def end(self, model): pass

    train(model, data, cfg, aug(), seed=0, extensions=[ext, Spy()])
    # 4 steps per epoch: the generator changes at every stage-1 step and never after
    stage1 = [w for s, w in seen if s]
    stage2 = [w for s, w in seen if not s]
    assert len(stage1) == 4 and len(stage2) == 4
    chain = [g0] + stage1
    assert all(any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(chain, chain[1:]))
    assert all(all(torch.equal(stage1[-1][k], w[k]) for k in w) for w in stage2)
    stored = atk.generator().state_dict()
    assert all(torch.equal(stored[k], v) for k, v in stage1[-1].items())  # stored at the end


def test_lira_batch_and_loss():
    data = toy(64)
    atk = lira(data, poison_rate=0.5, alpha=0.25, target=2)
    ext = atk.train_extension()
    model = small_model()
    ext.stage1_steps = 0  # stage 2 directly: no generator step
    ext.start(model, torch.device("cpu"))
    x, y = data.x[:8], data.y[:8]
    xb, yb = ext.batch(x, y, torch.Generator().manual_seed(0))
    assert xb.shape[0] == 12 and torch.equal(yb[:8], y) and (yb[8:] == 2).all()
    assert torch.allclose(xb[8:], atk.trigger(x[:4]).float() / 255, atol=1 / 255 + 1e-6)
    out = torch.randn(12, K)
    loss = ext.loss(model, xb, yb, out, torch.tensor(0.0))
    assert float(loss) == pytest.approx(float(0.25 * F.cross_entropy(out[:8], yb[:8]) + 0.75 * F.cross_entropy(out[8:], yb[8:])), rel=1e-5)


def test_lira_runs_are_reproducible():
    data = toy(64)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, bf16=False, channels_last=False)
    results = []
    for _ in range(2):
        atk = lira(data, seed=3)
        model = small_model()
        train(model, data, cfg, aug(), seed=3, extensions=[atk.train_extension()])
        results.append((atk.trigger(data.x), model.state_dict()))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
