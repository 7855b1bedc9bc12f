"""TrojanNN (``trojan``) and label-consistent (``lc``): the two attacks that compute their poison on
the clean reference model.

Tiny synthetic data and tiny models only. The references are written here independently of the
code under test: the neuron rule from the classifier's weights, the activations through a hook of
the test's own, the square's pixels from the numbers in the module docstring, the corner pattern
from the official ``all-corners`` coordinate table (MadryLab/label-consistent-backdoor-code,
``poison_attack.py``) typed as coordinates.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attacks  # noqa: F401  (registers the built-in attacks)
from attacks import ATTACKS
from attacks.lc import LabelConsistent
from attacks.trojan import TrojanNN
from bench.data import Augmentation, ImageSet
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, predict, train

K = 10


def random_set(n: int = 64, c: int = 3, s: int = 32, seed: int = 100) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, c, s, s), generator=gen, dtype=torch.uint8), torch.arange(n) % K)


def tiny_model(c: int = 3, seed: int = 0) -> nn.Module:
    return MODELS.get("smallcnn")(width=4).build(K, c, (0.5,) * c, (0.29,) * c, seed=seed).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in model.state_dict().items()}


def untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return (all(torch.equal(before[k], t) for k, t in model.state_dict().items())
            and all(p.grad is None for p in model.parameters()) and not model.training)


def blob_classes(n: int, seed: int, c: int = 3, s: int = 32) -> ImageSet:
    """Class k: grey 0.5 plus 0.05 times a fixed smooth random pattern of its own, plus pixel noise.

    Faint enough that an 8/255 perturbation can cross the tiny model's decision boundary (at 0.15 it
    cannot), strong enough that the model classifies held-out images perfectly."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.interpolate(torch.randn(K, c, 4, 4, generator=torch.Generator().manual_seed(7)),
                                             size=s, mode="bilinear", align_corners=True)
    protos = protos / protos.flatten(1).std(1)[:, None, None, None]
    y = torch.arange(n) % K
    img = 0.5 + 0.05 * protos[y] + 0.05 * torch.randn(n, c, s, s, generator=gen)
    return ImageSet((img.clamp(0, 1) * 255).round().to(torch.uint8), y)


def trained_model(data: ImageSet) -> nn.Module:
    ref = MODELS.get("smallcnn")(width=4).build(K, 3, (0.5,) * 3, (0.29,) * 3, seed=0)
    train(ref, data, TrainConfig(epochs=4, batch_size=32, bf16=False), Augmentation(pad=0, flip=False), seed=0)
    ref.zero_grad(set_to_none=True)  # so that any gradient found later was left by the attack
    return ref.eval()


# ---------------------------------------------------------------- TrojanNN


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s classifier (SmallCNN: the last module of its Sequential), by a hook of our own."""
    head = model.net[-1]
    assert isinstance(head, nn.Linear)
    seen = {}
    handle = head.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"]


def expected_square(size: int) -> torch.Tensor:
    # the docstring's numbers: 8x8, 3 px from the bottom/right edges at 32; 7x7, 3 px at 28
    side, gap = {32: (8, 3), 28: (7, 3)}[size]
    m = torch.zeros(size, size, dtype=torch.bool)
    m[size - gap - side:size - gap, size - gap - side:size - gap] = True
    return m


@pytest.mark.parametrize("c,s", [(3, 32), (1, 28)])
def test_trojan_pastes_the_trigger_inside_the_square_only(c, s):
    atk = TrojanNN(trigger_steps=20)
    atk.prepare(K, c, s, random_set(c=c, s=s), 0, reference=tiny_model(c))
    mask = expected_square(s)
    assert torch.equal(atk.state["mask"].bool(), mask)
    x = random_set(n=16, c=c, s=s, seed=3).x
    out = atk.trigger(x)
    changed = (out != x).any(1)  # [B, H, W]
    assert not changed[:, ~mask].any(), "no pixel outside the mask changes"
    assert changed[:, mask].float().mean() > 0.9
    trig = atk.state["trigger"]
    assert trig.shape == (c, s, s) and trig.dtype == torch.uint8
    assert torch.equal(out[:, :, mask], trig[:, mask].expand(16, -1, -1)), "inside the mask: the trigger, whatever x is"
    assert (trig[:, ~mask] == 0).all()


def test_trojan_neurons_are_the_most_connected_to_the_classifier():
    ref = tiny_model()
    head = ref.net[-1]
    with torch.no_grad():
        head.weight.uniform_(-0.1, 0.1)
        head.weight[:, 11] = 0.5  # column sums: 11 largest, then 5 (negative weights count by magnitude)
        head.weight[:, 5] = -0.4
    atk = TrojanNN(trigger_steps=0)
    atk.prepare(K, 3, 32, random_set(), 0, reference=ref)
    assert atk.state["neurons"].tolist() == [11, 5]
    three = TrojanNN(neurons=3, trigger_steps=0)
    three.prepare(K, 3, 32, random_set(), 0, reference=ref)
    sums = [float(head.weight.detach()[:, j].abs().sum()) for j in range(head.weight.shape[1])]
    third = max((j for j in range(len(sums)) if j not in (11, 5)), key=lambda j: sums[j])
    assert three.state["neurons"].tolist() == [11, 5, third]


def test_trojan_optimised_trigger_raises_the_selected_neurons():
    ref = tiny_model()
    before = snapshot(ref)
    atk = TrojanNN(trigger_steps=100)
    atk.prepare(K, 3, 32, random_set(), 0, reference=ref)
    assert untouched(ref, before), "the reference model is used, never changed"
    mask = atk.state["mask"].bool()
    neurons = atk.state["neurons"]
    black = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    start = black.clone()
    start[..., mask] = 255  # the white square the optimisation starts from
    end = atk.trigger(black)  # the optimised trigger on black, as it was optimised
    a0 = penultimate(ref, start.float() / 255)[0, neurons]
    a1 = penultimate(ref, end.float() / 255)[0, neurons]
    assert (a1 > a0).all() and float((a1 - 100).pow(2).sum()) < float((a0 - 100).pow(2).sum()), (a0, a1)
    assert torch.allclose(a1, atk.state["activation_end"], atol=1e-5)
    assert torch.allclose(a0, atk.state["activation_start"], atol=1e-5)
    # BackdoorBench's L_inf ball: every mask pixel stays within 0.3 of white, i.e. >= round(0.7 * 255)
    trig = atk.state["trigger"][:, mask]
    assert int(trig.min()) >= 178 and (trig < 255).any(), "moved, but only within the ball"
    wide = TrojanNN(trigger_steps=100, trigger_eps=1.0)
    wide.prepare(K, 3, 32, random_set(), 0, reference=ref)
    assert (wide.state["activation_end"] > a1).all(), "a wider ball reaches higher activations"


def test_trojan_is_deterministic_and_needs_the_reference():
    a, b = TrojanNN(trigger_steps=10), TrojanNN(trigger_steps=10)
    a.prepare(K, 3, 32, random_set(), 0, reference=tiny_model())
    b.prepare(K, 3, 32, random_set(), 5, reference=tiny_model())
    assert torch.equal(a.state["trigger"], b.state["trigger"]), "nothing random: the start is the white square"
    c = TrojanNN(trigger_steps=10)
    c.prepare(K, 3, 32, random_set(), 0, reference=tiny_model(seed=1))
    assert not torch.equal(a.state["trigger"], c.state["trigger"]), "the trigger depends on the reference model"
    with pytest.raises(BenchError, match="trojan needs a clean reference model"):
        TrojanNN().prepare(K, 3, 32, random_set(), 0)


def test_trojan_dirty_label_poisoning():
    atk = TrojanNN(trigger_steps=5, target=1, poison_rate=0.25)
    data = random_set()
    atk.prepare(K, 3, 32, data, 0, reference=tiny_model())
    p = atk.poison(data, seed=2)
    assert len(p.poison_idx) == 16 and (data.y[p.poison_idx] != 1).all() and (p.data.y[p.poison_idx] == 1).all()
    assert torch.equal(p.data.x[p.poison_idx], atk.trigger(data.x[p.poison_idx]))


def test_trojan_refuses_a_model_without_a_linear_classifier():
    conv_only = nn.Sequential(nn.Conv2d(3, K, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(BenchError, match="nn.Linear") as err:
        TrojanNN(trigger_steps=1).prepare(K, 3, 32, random_set(), 0, reference=conv_only)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields,match", [
    ({"mask_area": 0.0}, r"trojan.mask_area=0.0 is out of range; allowed: \(0, 1\]"),
    ({"trigger_eps": 2.0}, r"trojan.trigger_eps=2.0 is out of range; allowed: \(0, 1\]"),
    ({"trigger_step": 0.0}, r"trojan.trigger_step=0.0 is out of range"),
    ({"mask_margin": 1.0}, r"trojan.mask_margin=1.0 is out of range; allowed: \[0, 1\)"),
    ({"neurons": 0}, r"trojan.neurons=0 is out of range"),
])
def test_trojan_bad_settings_are_one_line(fields, match):
    with pytest.raises(BenchError, match=match) as err:
        TrojanNN(**fields)
    assert "\n" not in str(err.value)


def test_trojan_square_that_does_not_fit_and_too_many_neurons_are_refused():
    with pytest.raises(BenchError, match="does not fit a 32x32 image"):
        TrojanNN(mask_area=0.9, mask_margin=0.2).prepare(K, 3, 32, random_set(), 0, reference=tiny_model())
    with pytest.raises(BenchError, match=r"trojan.neurons=17 is more than the 16 features"):
        TrojanNN(neurons=17).prepare(K, 3, 32, random_set(), 0, reference=tiny_model())


# ---------------------------------------------------------------- label-consistent

# The official all-corners table: ((row, col), sign), negative indices from the bottom/right.
OFFICIAL_ALL_CORNERS = [
    ((0, 0), 1), ((0, 1), -1), ((0, 2), -1), ((1, 0), -1), ((1, 1), 1), ((1, 2), -1), ((2, 0), 1), ((2, 1), -1), ((2, 2), 1),
    ((-1, 0), 1), ((-1, 1), -1), ((-1, 2), 1), ((-2, 0), -1), ((-2, 1), 1), ((-2, 2), -1), ((-3, 0), 1), ((-3, 1), -1),
    ((-3, 2), -1),
    ((0, -1), 1), ((0, -2), -1), ((0, -3), -1), ((1, -1), -1), ((1, -2), 1), ((1, -3), -1), ((2, -1), 1), ((2, -2), -1),
    ((2, -3), 1),
    ((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1), ((-2, -3), -1), ((-3, -1), 1),
    ((-3, -2), -1), ((-3, -3), -1),
]


def official_signs(s: int) -> torch.Tensor:
    p = torch.zeros(s, s, dtype=torch.int16)
    for (r, c), v in OFFICIAL_ALL_CORNERS:
        p[r % s, c % s] = v
    return p


def unbalanced_set(n: int = 200, target_count: int = 13, target: int = 3, c: int = 3, s: int = 32, seed: int = 1) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    others = torch.tensor([k for k in range(K) if k != target])
    y = others[torch.arange(n) % len(others)]
    y[torch.randperm(n, generator=gen)[:target_count]] = target
    return ImageSet(torch.randint(0, 256, (n, c, s, s), generator=gen, dtype=torch.uint8), y)


def lc_prepared(data: ImageSet, c: int = 3, s: int = 32, reference: nn.Module | None = None, **fields) -> LabelConsistent:
    atk = LabelConsistent(**{"pgd_steps": 10, **fields})
    atk.prepare(K, c, s, data, 0, reference=reference if reference is not None else tiny_model(c))
    return atk


@pytest.mark.parametrize("c,s", [(3, 32), (1, 28)])
def test_lc_corner_patterns_reduced_in_training_full_at_test(c, s):
    atk = lc_prepared(unbalanced_set(c=c, s=s), c, s, target=3, amplitude=32 / 255)  # the paper's reduced amplitude
    grey = torch.full((2, c, s, s), 128, dtype=torch.uint8)
    signs = official_signs(s)
    assert int((signs != 0).sum()) == 36
    d_train = atk.train_trigger(grey).to(torch.int16) - 128
    assert torch.equal(d_train, (32 * signs).expand_as(d_train)), "training: +-32 on the 36 corner pixels, every channel"
    test = atk.trigger(grey)
    want = torch.full((s, s), 128, dtype=torch.uint8)
    want[signs > 0], want[signs < 0] = 255, 0
    assert torch.equal(test, want.expand_as(test)), "test: the official full-amplitude trigger (255 / 0)"
    # the documented amplitudes are fields: at 16/255 in training the corners move by 16; clipping at the range ends
    atk16 = lc_prepared(unbalanced_set(c=c, s=s), c, s, target=3, amplitude=16 / 255, test_amplitude=16 / 255)
    assert torch.equal(atk16.train_trigger(grey), atk16.trigger(grey))
    assert int((atk16.trigger(grey).to(torch.int16) - 128).abs().max()) == 16
    white = torch.full((1, c, s, s), 250, dtype=torch.uint8)
    assert int(atk.train_trigger(white).max()) == 255 and int(atk.train_trigger(white).min()) == 250 - 32


def test_lc_poisons_only_target_images_keeps_labels_and_stamps_the_perturbed_image():
    data = unbalanced_set()  # 200 images, 13 of the target class 3
    atk = lc_prepared(data, target=3, poison_rate=0.05)
    p = atk.poison(data, seed=4)
    idx = p.poison_idx
    assert len(idx) == 10 and (data.y[idx] == 3).all() and torch.equal(p.data.y, data.y)
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(p.data.x[rest], data.x[rest]), "nothing else changes"
    corners = official_signs(32) != 0
    diff = p.data.x[idx].to(torch.int16) - data.x[idx].to(torch.int16)
    assert int(diff[..., ~corners].abs().max()) <= 8, "outside the corners: the PGD perturbation, within 8/255"
    assert (diff[..., ~corners] != 0).any(), "and there is one"
    adv = atk.adversarial(data, idx)
    assert torch.equal(p.data.x[idx], atk.train_trigger(adv)), "the stamp goes on the perturbed image"
    assert not torch.equal(p.data.x[idx], atk.trigger(data.x[idx]))
    for rate, count in ((0.0, 0), (0.01, 2), (0.1, 13), (1.0, 13)):  # min(round(rate * 200), 13)
        q = LabelConsistent(target=3, poison_rate=rate, pgd_steps=2)
        q.prepare(K, 3, 32, data, 0, reference=tiny_model())
        assert len(q.poison(data, seed=4).poison_idx) == count


def test_lc_pgd_respects_the_bound_and_lowers_the_reference_accuracy():
    data = blob_classes(600, 0)
    ref = trained_model(data)
    before = snapshot(ref)
    target = 3
    pool = (data.y == target).nonzero().flatten()
    clean_acc = float((predict(ref, data.x[pool], bf16=False) == target).float().mean())
    assert clean_acc > 0.9, clean_acc
    atk = LabelConsistent(target=target)  # the defaults: eps 8/255, step 1.5/255, 100 steps
    atk.prepare(K, 3, 32, data, 0, reference=ref)
    assert untouched(ref, before), "the reference model is used, never changed"
    adv = atk.adversarial(data, pool)
    d = adv.to(torch.int16) - data.x[pool].to(torch.int16)
    assert int(d.abs().max()) == 8, "L_inf: at most 8 levels, and PGD uses the whole ball"
    adv_acc = float((predict(ref, adv, bf16=False) == target).float().mean())
    assert adv_acc < clean_acc - 0.5, (clean_acc, adv_acc)
    small = LabelConsistent(target=target, eps=2 / 255)
    small.prepare(K, 3, 32, data, 0, reference=ref)
    d2 = small.adversarial(data, pool).to(torch.int16) - data.x[pool].to(torch.int16)
    assert int(d2.abs().max()) == 2
    zero = LabelConsistent(target=target, pgd_steps=0)
    zero.prepare(K, 3, 32, data, 0, reference=ref)
    assert torch.equal(zero.adversarial(data, pool), data.x[pool])


def test_lc_is_deterministic_and_needs_the_reference_before_poisoning():
    data = unbalanced_set()
    a, b = lc_prepared(data, target=3), lc_prepared(data, target=3)
    assert torch.equal(a.poison(data, 1).data.x, b.poison(data, 1).data.x)
    with pytest.raises(BenchError, match="lc needs a clean reference model"):
        LabelConsistent(target=3).prepare(K, 3, 32, data, 0)
    fresh = LabelConsistent(target=3)
    fresh.load_state(a.state)  # a stored attack: the test trigger works, poisoning needs prepare()
    assert torch.equal(fresh.trigger(data.x), a.trigger(data.x))
    with pytest.raises(BenchError, match=r"lc: poison\(\) needs the perturbed images"):
        fresh.poison(data, 1)
    with pytest.raises(BenchError, match="another training set"):
        a.poison(unbalanced_set(seed=2), 1)


def test_lc_target_without_images_is_refused_before_any_work():
    with pytest.raises(BenchError, match="lc.target=3 has no training images") as err:
        LabelConsistent(target=3).prepare(K, 3, 32, unbalanced_set(target_count=0), 0, reference=tiny_model())
    assert "\n" not in str(err.value)


def test_lc_test_set_is_non_target_images_with_the_full_trigger():
    atk = lc_prepared(unbalanced_set(), target=3)
    test = unbalanced_set(seed=2)
    ts = atk.test_set(test)
    keep = test.y != 3
    assert len(ts) == int(keep.sum()) == 187 and (ts.y_target == 3).all() and torch.equal(ts.y_true, test.y[keep])
    assert torch.equal(ts.x, atk.trigger(test.x[keep]))




def test_both_are_registered_with_the_clean_model_flag():
    assert ATTACKS.get("trojan") is TrojanNN and ATTACKS.get("lc") is LabelConsistent
    assert TrojanNN.needs_clean_model and LabelConsistent.needs_clean_model
    assert LabelConsistent.clean_label and not TrojanNN.clean_label
    assert math.isclose(LabelConsistent().eps, 8 / 255) and TrojanNN().trigger_steps == 1000
