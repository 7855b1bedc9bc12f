"""On the CPU the per-step random draws, and so every result, are those of the code before the
GPU work: crops and flips, the trainer's shuffle, RNP's and ANP's batches and random starts, BPP's
negatives, and evaluation. Each is compared, bit for bit, with a frozen copy of the old code (the
``old_*`` functions below, as they were at commit 6a38eb7) or an independent restatement of its
draw order. The GPU paths (generators on the device) cannot run here; ``step_generator`` and
``synchronize`` are checked for what they do on the CPU and what they ask of CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bench.train
from attacks import ATTACKS
from bench.data import Augmentation, ImageSet, augment, step_generator
from bench.models import MODELS
from bench.train import TrainConfig, TrainExtension, predict, synchronize, to_device, to_input, train, true_class_probability
from defenses import DefenseContext
from defenses.anp import ANP
from defenses.masks import MaskSet
from defenses.rnp import RNP

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- frozen copies of the old code


def old_augment(x: torch.Tensor, aug: Augmentation, gen: torch.Generator) -> torch.Tensor:
    b, c, h, w = x.shape
    if aug.pad > 0:
        p = aug.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        off = torch.randint(0, 2 * p + 1, (2, b), generator=gen).to(x.device)
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)
        x = windows[torch.arange(b, device=x.device), :, off[0], off[1]]
    if aug.flip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x


@torch.no_grad()
def old_reset_noise(self: MaskSet, eps: float, gen: torch.Generator | None = None) -> None:
    for p in self.noise_parameters():
        r = torch.rand(p.shape, generator=gen) if gen is not None else torch.zeros(p.shape)
        p.copy_(((2 * r - 1) * eps).to(p.device, p.dtype))


def old_bpp_hook(atk, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    bs = len(x)
    num_bd, num_neg = atk.batch_counts(bs, gen)
    if num_bd + num_neg == 0:
        return x, y
    shift = torch.randint(1, bs, (num_neg,), generator=gen) if num_neg else torch.zeros(0, dtype=torch.long)
    src = ((torch.arange(num_bd, num_bd + num_neg) + shift) % bs).to(x.device)
    squeezed = atk.trigger(torch.cat([x[:num_bd], x[src]]))
    residual = squeezed[num_bd:].short() - x[src].short()
    out, y = x.clone(), y.clone()
    out[:num_bd] = squeezed[:num_bd]
    y[:num_bd] = atk.target_labels(y[:num_bd])
    neg = slice(num_bd, num_bd + num_neg)
    out[neg] = (x[neg].short() + residual).clamp_(0, 255).to(torch.uint8)
    return out, y


def images(n: int, seed: int, size: int = 12) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g))


def tiny_model(seed: int = 0) -> nn.Module:
    return MODELS.get("smallcnn")(width=4).build(4, 3, (0.5,) * 3, (0.25,) * 3, seed=seed)


# ---------------------------------------------------------------- the generator helpers


def test_step_generator_is_the_cpu_stream_itself_on_the_cpu():
    gen = torch.Generator().manual_seed(3)
    assert step_generator(gen, "cpu") is gen and step_generator(gen, torch.device("cpu"), 3) is gen


def test_step_generator_elsewhere_is_seeded_from_the_seed_or_one_cpu_draw(monkeypatch):
    made = []

    class FakeGen:  # stands in for torch.Generator(device="cuda"), which needs a GPU
        def __init__(self, device):
            self.device = device

        def manual_seed(self, seed):
            made.append((self.device, seed))
            return self

    real = torch.Generator
    gen = real().manual_seed(0)
    monkeypatch.setattr(torch, "Generator", FakeGen)
    before = gen.get_state()
    g = step_generator(gen, "cuda", 7)
    assert isinstance(g, FakeGen) and made == [(torch.device("cuda"), 7)]
    assert torch.equal(gen.get_state(), before), "a given seed costs the CPU stream nothing"
    step_generator(gen, "cuda:1")
    want = int(torch.randint(0, 2**62, (), generator=real().manual_seed(0)))
    assert made[1] == (torch.device("cuda:1"), want), "no seed: one draw of the CPU stream seeds it"


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize("cpu")
    assert calls == []
    synchronize("cuda:0")
    assert calls == [torch.device("cuda:0")]


def test_to_device_on_the_cpu_is_no_copy():
    x = torch.arange(6, dtype=torch.uint8)
    assert to_device(x, "cpu") is x


# ---------------------------------------------------------------- bit-identical CPU draws


@pytest.mark.parametrize("aug", [Augmentation(4, True), Augmentation(2, False), Augmentation(0, True), Augmentation(0, False)])
def test_augment_on_the_cpu_is_the_old_augment_bit_for_bit(aug):
    x = images(33, seed=1).x
    g_new, g_old = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):  # the stream continues identically from call to call
        assert torch.equal(augment(x, aug, g_new), old_augment(x, aug, g_old))
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_trainer_batches_on_the_cpu_are_the_old_draws():
    """What the trainer hands its extensions, step by step, restated from the old loop's draw order:
    one CPU generator seeded with ``seed``, per epoch ``randperm(n)``, per step the old augment."""
    data, aug, seed = images(70, seed=2), Augmentation(2, True), 9
    seen = []

    class Record(TrainExtension):
        def batch(self, x, y, gen):
            seen.append((x.clone(), y.clone(), gen.get_state()))
            return x, y

    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01)
    train(tiny_model(), data, cfg, aug, seed=seed, extensions=[Record()])
    gen, want = torch.Generator().manual_seed(seed), []
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(len(data) // cfg.batch_size):
            idx = perm[i * 16:(i + 1) * 16]
            want.append((old_augment(data.x[idx], aug, gen), data.y[idx], gen.get_state()))
    assert len(seen) == len(want) == 8
    for (x, y, state), (wx, wy, wstate) in zip(seen, want):
        assert torch.equal(x, wx) and torch.equal(y, wy)
        assert torch.equal(state, wstate), "the extensions' generator is the same CPU stream as before"


def test_rnp_epochs_on_the_cpu_are_the_old_draws():
    data, aug = images(50, seed=3), Augmentation(4, True)
    ctx = DefenseContext(num_classes=4, augmentation=aug, seed=0)
    rnp = RNP(batch_size=16)
    g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(2):
        got = list(rnp.epoch(data, ctx, g_new))
        perm = torch.randperm(len(data), generator=g_old)
        want = [(to_input(old_augment(data.x[i], aug, g_old)), data.y[i]) for i in torch.tensor_split(perm, round(50 / 16))]
        assert len(got) == len(want) == 3
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want))


def test_anp_mask_optimisation_on_the_cpu_is_the_old_loop(monkeypatch):
    """Masks after ANP's optimisation (random starts on) against the old loop, restated: batch indices
    ``randint`` on the CPU stream, the old augment, and the old random start."""
    data, aug = images(40, seed=4), Augmentation(2, True)
    ctx = DefenseContext(num_classes=4, augmentation=aug, seed=0, bf16=False)
    anp = ANP(iterations=6, batch_size=8, eps=0.4, steps=1)
    new_masks, facts = anp.optimize(tiny_model(), data, ctx, step_generator(torch.Generator().manual_seed(1), "cpu", 1))

    monkeypatch.setattr(MaskSet, "reset_noise", old_reset_noise)
    model, gen = tiny_model(), torch.Generator().manual_seed(1)
    masks, opt = anp.start(model)
    correct = 0
    for it in range(6):
        idx = torch.randint(len(data), (8,), generator=gen)
        x, y = to_input(old_augment(data.x[idx], aug, gen)), data.y[idx]
        out = anp.step(model, masks, opt, x, y, ctx, gen)
        correct += int((out.argmax(1) == y).sum())
    old = masks.values()
    assert set(new_masks.values()) == set(old) and old
    assert all(torch.equal(new_masks.values()[k], old[k]) for k in old)
    assert facts["train_acc"] == correct / 48  # PRINT_EVERY covers all six iterations


def test_reset_noise_on_the_cpu_is_the_old_draw():
    model = tiny_model()
    from defenses.masks import attach_masks

    masks = attach_masks(model, perturb=True)
    masks.reset_noise(0.3, torch.Generator().manual_seed(2))
    new = [p.detach().clone() for p in masks.noise_parameters()]
    old_reset_noise(masks, 0.3, torch.Generator().manual_seed(2))
    assert new and all(torch.equal(a, p) for a, p in zip(new, masks.noise_parameters()))
    assert any(a.abs().sum() > 0 for a in new)


@pytest.mark.parametrize("kw", [dict(neg_ratio=0.2), dict(poison_rate=0.004, neg_ratio=0.1), dict(neg_ratio=0.0)])
def test_bpp_hook_on_the_cpu_is_the_old_hook(kw):
    atk = ATTACKS.get("bpp")(**kw)
    data = images(64, seed=6)
    hook = atk.train_extension().batch
    g_new, g_old = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(4):
        (xa, ya), (xb, yb) = hook(data.x, data.y, g_new), old_bpp_hook(atk, data.x, data.y, g_old)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_evaluation_on_the_cpu_is_the_old_per_batch_evaluation():
    model, data = tiny_model(), images(300, seed=7)
    model.eval()
    with torch.no_grad():
        logits = [model(to_input(data.x[i:i + 256])).float() for i in range(0, 300, 256)]
    assert torch.equal(predict(model, data.x, bf16=False), torch.cat([z.argmax(1) for z in logits]))
    old_tcp = sum(float(z.softmax(1).gather(1, data.y[i * 256:(i + 1) * 256][:, None]).sum()) for i, z in enumerate(logits)) / 300
    assert true_class_probability(model, data, bf16=False) == old_tcp
    assert bench.train.predict(model, data.x[:0]).shape == (0,)


def test_rnp_unlearning_on_the_cpu_is_the_old_loop():
    """The unlearning stage (epoch stop checks), against the old loop restated: the same weights, history and
    per-epoch label histograms (counted on the host with ``bincount`` there, on the device here)."""
    import torch.nn.functional as F

    data, aug = images(60, seed=8), Augmentation(2, True)
    ctx = DefenseContext(num_classes=4, augmentation=aug, seed=0, bf16=False)
    rnp = RNP(batch_size=16, unlearn_epochs=3, clean_threshold=0.0, unlearn_lr=0.05, stop_check="epoch", unlearn_milestones=())
    new_model = tiny_model(2)
    facts = rnp.unlearn(new_model, data, ctx, torch.Generator().manual_seed(4))

    model, gen, k = tiny_model(2), torch.Generator().manual_seed(4), 4
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=rnp.unlearn_lr, momentum=rnp.momentum, weight_decay=rnp.weight_decay)
    history, hists = [], []
    for _ in range(3):
        correct, counts = 0, torch.zeros(k, dtype=torch.long)
        perm = torch.randperm(len(data), generator=gen)
        for idx in torch.tensor_split(perm, round(60 / 16)):
            x, y = to_input(old_augment(data.x[idx], aug, gen)), data.y[idx]
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            (-loss).backward()
            opt.step()
            pred = out.detach().argmax(1)
            correct += int((pred == y).sum())
            counts += torch.bincount(pred.cpu(), minlength=k)[:k]
        history.append(correct / len(data))
        hists.append(counts.tolist())
    assert facts["history"] == history and facts["predictions"] == hists and facts["epochs"] == 3
    assert all(sum(h) == 60 for h in hists)
    assert all(torch.equal(a, b) for a, b in zip(new_model.state_dict().values(), model.state_dict().values()))
