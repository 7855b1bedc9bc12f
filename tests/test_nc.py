"""Neural Cleanse and the shared trigger optimiser, on tiny synthetic data (seconds each).

The planted-backdoor tests use "prototype" classes: each class is one random low-frequency
colour field plus pixel noise, so faking any clean class means repainting much of the image,
about equally for every class. Neural Cleanse's MAD test assumes exactly that (clean labels'
trigger norms close together). The benchmark's ``synthetic`` shapes do not fit it: a few pixels of
stripes or a ring fake their classes, and with 10 labels the clean norms spread from ~35 to ~300
(measured; the BadNets target's norm was 3-10, still the smallest, but its anomaly index ~1).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench.train
import defenses.nc
from attacks import ATTACKS
from bench.config import build
from bench.data import Augmentation, ImageSet
from bench.run.plan import GridSpec
from bench.metrics import evaluate
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, train
from defenses import DefenseContext
from defenses.nc import NeuralCleanse, anomaly_indices, flag_labels
from defenses.trigger import TriggerSearch, reverse_triggers, stamp

K, TARGET = 10, 3
NO_AUG = Augmentation(pad=0, flip=False)
FAST = dict(epochs=40, batches_per_epoch=2, batch_size=16)  # 80 steps: enough for the 3x3 patch here

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)



def prototypes(n: int, seed: int) -> ImageSet:
    """``n`` images of K prototype classes (fixed prototypes, noise drawn from ``seed``)."""
    protos = F.interpolate(torch.rand(K, 3, 4, 4, generator=torch.Generator().manual_seed(0)), size=32,
                           mode="bilinear", align_corners=True)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = protos[y] + 0.15 * torch.randn(n, 3, 32, 32, generator=gen)
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y)


@pytest.fixture(scope="module")
def planted():
    """(backdoored smallcnn w8, BadNets attack, clean defense set, clean test set): ASR ~1 after 8 epochs."""
    train_set = prototypes(600, seed=1)
    atk = ATTACKS.get("badnets")(target=TARGET, poison_rate=0.2)
    atk.prepare(K, 3, 32, train_set, 0)
    model = MODELS.get("smallcnn")(width=8).build(K, 3, (0.5,) * 3, (0.29,) * 3, seed=0)
    train(model, atk.poison(train_set, 0).data, TrainConfig(epochs=8, batch_size=50, lr=0.1), NO_AUG, seed=0)
    return model.eval(), atk, prototypes(64, seed=3), prototypes(200, seed=2)


def ctx(seed: int = 0) -> DefenseContext:
    return DefenseContext(num_classes=K, augmentation=NO_AUG, seed=seed, bf16=False)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------- the defense end to end


def test_nc_flags_the_target_recovers_the_patch_and_unlearns_it(planted):
    model, atk, clean, test = planted
    before = evaluate(model, test, atk.test_set(test))
    assert before["asr"] > 0.9 and before["ca"] > 0.9, "the backdoor is planted"
    res = NeuralCleanse(**FAST)(copy.deepcopy(model), clean, ctx())
    info = res.info
    json.dumps(info)
    assert info["flagged"][0] == TARGET, "the target is flagged, with the smallest norm"
    norms = torch.tensor(info["norms"])
    assert 3 <= norms[TARGET] <= 27, "about the 9 pixels of the 3x3 patch"
    assert norms[TARGET] * 5 < norms[torch.arange(K) != TARGET].min()
    # The reversed trigger is a working trigger on unseen images. (It need not sit on the corner:
    # this small CNN with global pooling reacts to the black/white checker wherever it is.)
    x = stamp(test.x, res.tensors["masks"][TARGET], res.tensors["patterns"][TARGET])
    assert (model(x).argmax(1) == TARGET).float().mean() > 0.9
    assert info["anomaly_index"] > 2 and info["unlearned"] and 0 < info["trigger_steps"] <= 80
    after = evaluate(res.model, test, atk.test_set(test))
    assert after["asr"] < 0.5 and after["ca"] > 0.9, (before, after)


def test_nothing_flagged_returns_the_model_unchanged(planted):
    model, _, clean, _ = planted
    before = state(model)
    res = NeuralCleanse(anomaly_threshold=1e9, epochs=2, batches_per_epoch=1)(copy.deepcopy(model), clean, ctx())
    assert res.info["flagged"] == [] and res.info["unlearned"] is False and "acc_after_unlearn" not in res.info
    after = state(res.model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_unlearning_batches_stamp_a_fifth_and_keep_labels(planted, monkeypatch):
    model, _, clean, _ = planted
    seen = {}

    kw_seen = {}

    def fake_train(m, data, cfg, aug, *, seed, device, extensions, **kw):
        kw_seen.update(kw)
        x, y = data.x[:50], data.y[:50]
        seen["out"] = extensions[0].batch(x, y, torch.Generator().manual_seed(0))
        seen["in"], seen["cfg"] = (x, y), cfg
        return {}

    monkeypatch.setattr(defenses.nc, "train", fake_train)
    nc = NeuralCleanse(epochs=2, batches_per_epoch=1)  # any triggers will do here
    trig = nc.reverse(model, clean, ctx())
    nc.unlearn(copy.deepcopy(model), clean, trig, torch.tensor([TARGET]), ctx())
    (x, y), (xo, yo) = seen["in"], seen["out"]
    assert torch.equal(yo, y), "true labels kept"
    want = stamp(x[:10], trig.masks[[TARGET] * 10], trig.patterns[[TARGET] * 10])
    torch.testing.assert_close(xo[:10], want)
    torch.testing.assert_close(xo[10:], x[10:].float() / 255)
    assert seen["cfg"].epochs == 100 and seen["cfg"].lr == 0.01 and seen["cfg"].batch_size == 256  # BackdoorBench's
    assert kw_seen["keep_ragged"] is True  # its DataLoader keeps the last, smaller batch


# ---------------------------------------------------------------- the optimiser


def test_one_forward_per_step_covers_every_label(planted):
    model, _, clean, _ = planted
    sizes: list[int] = []
    hook = model.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    try:
        r = reverse_triggers(model, clean, range(K), TriggerSearch(epochs=3, batches_per_epoch=2, batch_size=8),
                             gen=torch.Generator().manual_seed(0), bf16=False)
    finally:
        hook.remove()
    assert r.steps == 6 and sizes == [K * 8] * 6
    assert r.masks.shape == (K, 1, 32, 32) and r.patterns.shape == (K, 3, 32, 32)
    assert r.norms.shape == r.success.shape == (K,) and 0 <= r.masks.min() and r.masks.max() <= 1
    torch.testing.assert_close(r.norms, r.masks.flatten(1).sum(1))


def test_labels_are_independent_of_each_other(planted):
    """A label's trigger, cost control and early stop are the same alone, in pairs, or with all labels."""
    model, _, clean, _ = planted
    s = TriggerSearch(epochs=20, batches_per_epoch=1, batch_size=16, patience=1, early_stop_patience=2)
    run = lambda labels, **kw: reverse_triggers(model, clean, labels, s, gen=torch.Generator().manual_seed(5),  # noqa: E731
                                                bf16=False, **kw)
    together = run(range(K))
    assert len(set(together.epochs.tolist())) > 1, "some labels stop early, others go on"
    pair = run([7, TARGET], max_images=16)  # chunked: one forward pass per label
    alone = run([TARGET])
    for other, j, t in [(pair, 0, 7), (pair, 1, TARGET), (alone, 0, TARGET)]:
        assert other.epochs[j] == together.epochs[t] and other.reached[j] == together.reached[t]
        torch.testing.assert_close(other.masks[j], together.masks[t], atol=1e-4, rtol=0)
        torch.testing.assert_close(other.patterns[j], together.patterns[t], atol=1e-4, rtol=0)


def test_the_optimiser_uses_no_global_rng_and_leaves_the_model_alone(planted):
    model, _, clean, _ = planted
    before, rng = state(model), torch.get_rng_state()
    model.train()
    grads = [p.requires_grad for p in model.parameters()]
    a = reverse_triggers(model, clean, [1, 2], TriggerSearch(epochs=2, batches_per_epoch=1), gen=torch.Generator().manual_seed(0))
    assert model.training and grads == [p.requires_grad for p in model.parameters()]
    model.eval()
    b = reverse_triggers(model, clean, [1, 2], TriggerSearch(epochs=2, batches_per_epoch=1), gen=torch.Generator().manual_seed(0))
    after = state(model)
    assert torch.equal(torch.get_rng_state(), rng) and all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(a.masks, b.masks), "train or eval mode on entry: the same triggers (always run in eval mode)"


def test_a_given_start_replaces_the_random_one(planted):
    model, atk, clean, _ = planted
    true_m = torch.zeros(1, 1, 32, 32)
    true_m[..., -4:-1, -4:-1] = 0.99  # BadNets' 3x3 patch region (approximately), near-binary
    true_p = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    still = TriggerSearch(epochs=1, batches_per_epoch=1, lr=0.0)  # no step moves it: the result is the start
    r = reverse_triggers(model, clean, [TARGET], still, gen=torch.Generator().manual_seed(0), init=(true_m, true_p))
    torch.testing.assert_close(r.masks, true_m.clamp(1e-6, 1 - 1e-6), atol=1e-4, rtol=0)
    torch.testing.assert_close(r.patterns, true_p.clamp(1e-6, 1 - 1e-6), atol=1e-4, rtol=0)
    rand = reverse_triggers(model, clean, [TARGET], still, gen=torch.Generator().manual_seed(0))
    assert (rand.masks - true_m).abs().mean() > 0.2, "without init: the random uniform start"
    with pytest.raises(BenchError, match="init triggers"):
        reverse_triggers(model, clean, [TARGET, 1], still, gen=torch.Generator().manual_seed(0), init=(true_m, true_p))


# ---------------------------------------------------------------- MAD scoring and settings


def test_mad_matches_hand_computed_values():
    # sorted: 10 41 48 50 51 52 55 60 ... median of 10 values = mean of the 5th and 6th
    norms = torch.tensor([10.0, 50, 52, 55, 48, 60, 51, 200, 41, 58])
    # median (51 + 52) / 2 = 51.5; |dev| sorted 0.5 0.5 1.5 3.5 3.5 6.5 8.5 10.5 41.5 148.5 -> 5.0; MAD 7.413
    idx, median, mad = anomaly_indices(norms)
    assert median == pytest.approx(51.5) and mad == pytest.approx(1.4826 * 5.0)
    torch.testing.assert_close(idx, (norms.double() - 51.5).abs() / (1.4826 * 5.0))
    # 10: 5.60 flagged; 41: 10.5 / 7.413 = 1.42 not; 200: 20.0 but above the median, not flagged
    assert flag_labels(norms).nonzero().flatten().tolist() == [0]
    assert flag_labels(norms, threshold=1.4).nonzero().flatten().tolist() == [0, 8]
    assert flag_labels(torch.full((5,), 7.0)).sum() == 0, "equal norms: nothing flagged"
    # MAD 0: more than half equal; the one below the median is infinitely anomalous, the one above is not
    idx0, _, mad0 = anomaly_indices(torch.tensor([5.0, 5, 5, 1, 9]))
    assert mad0 == 0 and flag_labels(torch.tensor([5.0, 5, 5, 1, 9])).tolist() == [False, False, False, True, False]
    assert idx0[3] == float("inf") and idx0[0] == 0


def test_bad_settings_fail_at_config_build():
    with pytest.raises(BenchError):
        build(NeuralCleanse, {"epochs": "0"})
    with pytest.raises(BenchError):
        GridSpec(attacks=["badnets"], defenses=["nc"], overrides={"nc": {"epochs": "0"}}).plan().defense_cells
    for kw in [dict(batches_per_epoch=-1), dict(batch_size=0), dict(success_threshold=1.5), dict(unlearn_ratio=-0.1),
               dict(cost_multiplier=0.5), dict(unlearn_epochs=-1)]:
        with pytest.raises(BenchError):
            NeuralCleanse(**kw)
    nc = NeuralCleanse()
    assert (nc.init_cost, nc.success_threshold, nc.patience, nc.cost_multiplier, nc.lr) == (1e-3, 0.99, 5, 2.0, 0.1)
    assert NeuralCleanse.name == "nc" and "epochs" in nc.to_dict() and "unlearn_ratio" in nc.to_dict()


# ---------------------------------------------------------------- the official cost schedule and early stop


def test_the_cost_starts_at_zero_and_follows_the_official_schedule():
    """visualizer.py, epoch by epoch: at cost 0, ``patience`` successful epochs in a row set ``init_cost`` (and reset
    the up/down counters); then ``patience`` successes multiply the cost by 2, ``patience`` failures divide it by
    2 ** 1.5; a failure streak at cost 0 "divides" 0 and still sets the down flag, as the official code does."""
    from defenses.trigger import _Label

    s = TriggerSearch()
    m = p = torch.zeros(1)
    lab = _Label(cost=0.0)
    costs = []
    for acc in [1.0] * 4 + [1.0] + [1.0] * 5 + [0.0] * 5:
        lab.end_epoch(s, acc, reg=1.0, mask=m, pattern=p)
        costs.append(lab.cost)
    assert costs[:4] == [0.0] * 4 and costs[4] == 1e-3, "set to init_cost on the 5th success at cost 0"
    # The 5th success also counts as the first of the next streak: 4 more double the cost at epoch 9.
    assert costs[8] == 2e-3 and lab.up_flag
    assert costs[13] == 2e-3 and costs[14] == pytest.approx(2e-3 / 2 ** 1.5) and lab.down_flag  # the 5th failure
    zero = _Label(cost=0.0)
    for _ in range(5):
        zero.end_epoch(s, 0.0, reg=1.0, mask=m, pattern=p)
    assert zero.cost == 0.0 and zero.down_flag and not zero.up_flag


def test_early_stop_fires_at_the_official_budget_on_a_trigger_found_fast(planted):
    """At the defaults (up to 1000 epochs of 31 mini-batches) the planted patch is found within a few epochs; the
    cost then moves up and down, and 25 epochs without a smaller mask end the search long before 1000."""
    model, _, clean, _ = planted
    search = TriggerSearch(batch_size=16)  # the official budget and schedule; smaller batches only for speed
    assert (search.epochs, search.batches_per_epoch, search.reset_cost_to_zero) == (1000, 31, True)
    r = reverse_triggers(model, clean, [TARGET], search, gen=torch.Generator().manual_seed(0), bf16=False)
    assert bool(r.reached[0]) and 35 <= int(r.epochs[0]) < 1000, int(r.epochs[0])
    assert r.steps == int(r.epochs[0]) * 31
