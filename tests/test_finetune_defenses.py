"""The fine-tuning defenses: NAD, FT and FST.

Tiny and fast: smallcnn models of width 4-8 on synthetic 32x32 images. The registry-wide
contract (determinism, no global RNG, only the clean data) is in ``test_defenses.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import defenses.fst as fst_module
import defenses.nad as nad_module
from attacks import ATTACKS
from bench.config import build
from bench.data import DATASETS, Augmentation, ImageSet
from bench.run.plan import GridSpec
from bench.metrics import evaluate
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, TrainExtension, to_input, train
from defenses import DefenseContext
from defenses.fst import FST, HeadShift
from defenses.ft import FineTuning
from defenses.nad import NAD, AttentionDistillation, attention_loss, attention_map

SYN = DATASETS.get("synthetic")(n_train=1064, n_test=300)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)



def ctx(seed: int = 0) -> DefenseContext:
    """fp32 throughout: the same numbers on CPUs with and without native bf16."""
    return DefenseContext(num_classes=10, augmentation=SYN.augmentation, seed=seed, bf16=False)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def tiny(width: int = 4, seed: int = 0) -> nn.Module:
    return MODELS.get("smallcnn")(width=width).build(10, 3, SYN.mean, SYN.std, seed=seed)


@pytest.fixture(scope="module")
def planted():
    """A smallcnn (width 8) with a BadNets backdoor, its test sets and 64 clean images.

    5 % poisoning, trained without augmentation so the corner patch implants in 12 short epochs:
    CA 0.997, ASR 0.73 (measured; over model seeds 0-2, CA >= 0.99 and ASR 0.55-0.73). A weaker
    backdoor than a real run's on purpose: at 20 % poisoning (ASR 0.97) 100 steps of FT on 64
    images only brought ASR to 0.79, the known weakness of plain fine-tuning (the trigger's neurons
    are dormant on clean data), which a test of a few seconds cannot wait out.
    """
    train_set, test_set = SYN.load()
    attack = ATTACKS.get("badnets")(poison_rate=0.05)
    attack.prepare(10, 3, 32, train_set.subset(torch.arange(1000)), 0)
    poisoned = attack.poison(train_set.subset(torch.arange(1000)), 0)
    model = tiny(width=8)
    train(model, poisoned.data, TrainConfig(epochs=12, batch_size=50, lr=0.1, bf16=False), Augmentation(pad=0, flip=False), seed=0)
    clean = train_set.subset(torch.arange(1000, 1064))
    return model.eval(), clean, test_set, attack.test_set(test_set)


# ---------------------------------------------------------------- NAD: layers


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
@pytest.mark.parametrize("name,kw", [(n, {}) for n in MODELS.names()] + [("vgg", {"bn": False})])
def test_nad_automatic_layers_are_maps_larger_than_1x1(name, kw, channels, size):
    model = MODELS.get(name)(width=4, **kw).build(10, channels, (0.5,) * channels, (0.25,) * channels)
    x = torch.rand(1, channels, size, size)
    layers = NAD().choose_layers(model, x)
    shapes = dict(nad_module.probe_outputs(model, x))
    assert len(layers) == len(set(layers)) == 3
    sizes = [shapes[n][-2:] for n in layers]
    assert all(len(shapes[n]) == 4 and h * w > 1 for n, (h, w) in zip(layers, sizes)), sizes
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3, "three depths, shallow to deep"
    assert sizes == [(size // 2**j, size // 2**j) for j in range(3)], "the official maps' sizes: the input's, half, quarter"
    if "resnet" in name:
        assert layers == ["net.layer1", "net.layer2", "net.layer3"]


def test_nad_automatic_layers_of_smallcnn_are_stage_ends():
    """The ends of the conv stages at 32x32, 16x16 and 8x8 (not the pooling that starts the next stage)."""
    assert NAD().choose_layers(tiny(), torch.rand(1, 3, 32, 32)) == ["net.5", "net.12", "net.19"]
    assert NAD(betas=(1.0, 1.0)).choose_layers(tiny(), torch.rand(1, 3, 32, 32)) == ["net.5", "net.12"]


def test_nad_falls_back_to_the_last_maps_larger_than_1x1_without_the_official_sizes():
    """An ImageNet stem quarters a 32x32 input before its first stage: no 32x32 map, so the last three stages
    larger than 1x1 are distilled, and the record says they are not the official sizes."""
    model = MODELS.get("smallcnn")(width=4).build(10, 3, (0.5,) * 3, (0.25,) * 3)
    x = torch.rand(1, 3, 32, 32)
    stem = torch.nn.Sequential(torch.nn.AvgPool2d(2), model)  # the model now sees 16x16 inputs through a 32x32 door
    layers, official = nad_module.auto_layers(stem, x, 3)
    shapes = dict(nad_module.probe_outputs(stem, x))
    assert not official and [shapes[n][-2:] for n in layers] == [(8, 8), (4, 4), (2, 2)]


def test_nad_explicit_layers_must_be_maps_larger_than_1x1():
    x = torch.rand(1, 3, 32, 32)
    assert NAD(layers=("net.5", "net.20"), betas=(1.0, 1.0)).choose_layers(tiny(), x) == ["net.5", "net.20"]
    for bad in ("net.21", "net.23"):  # the 1x1 pooled map, the Linear head
        with pytest.raises(BenchError, match="larger than 1x1"):
            NAD(layers=(bad,), betas=(1.0,)).choose_layers(tiny(), x)


def test_nad_unknown_layer_fails_at_check_and_in_the_grid():
    with pytest.raises(BenchError, match="no module 'foo'") as err:
        NAD(layers=("foo",), betas=(1.0,)).check(tiny())
    assert "\n" not in str(err.value)
    NAD(layers=("net.12",), betas=(1.0,)).check(tiny())
    with pytest.raises(BenchError, match="nosuch"):  # one layer, three default betas: the count fails first
        GridSpec(attacks=["badnets"], defenses=["nad"], preset="demo", overrides={"nad": {"layers": "nosuch"}}).plan().defense_cells
    with pytest.raises(BenchError, match="no module 'nosuch'"):
        GridSpec(attacks=["badnets"], defenses=["nad"], preset="demo", overrides={"nad": {"layers": "nosuch", "betas": "1000"}}).plan().defense_cells
    cells = GridSpec(attacks=["badnets"], defenses=["nad"], preset="demo",
                     overrides={"nad": {"layers": "net.12,net.19", "betas": "500,1000"}}).plan().defense_cells
    assert cells[0].defense.layers == ("net.12", "net.19")


def test_nad_area_scaling_gives_each_depth_the_official_weight():
    assert NAD().effective_betas([(16, 16), (8, 8), (4, 4)], (32, 32)) == [500.0, 1000.0, 1000.0]  # off: the official loss
    nad = NAD(area_scaled=True)
    # The official maps (WRN-16-1 on 32x32): full, half, quarter resolution -> the official betas.
    assert nad.effective_betas([(32, 32), (16, 16), (8, 8)], (32, 32)) == [500.0, 1000.0, 1000.0]
    # Our ResNet-18s' and smallcnn's last three stages: a quarter of the positions each.
    assert nad.effective_betas([(16, 16), (8, 8), (4, 4)], (32, 32)) == [125.0, 250.0, 250.0]
    assert nad.effective_betas([(14, 14), (7, 7), (3, 3)], (28, 28)) == pytest.approx([125.0, 250.0, 1000 * 9 / 49])
    assert NAD(area_scaled=False).effective_betas([(16, 16), (8, 8), (4, 4)], (32, 32)) == [500.0, 1000.0, 1000.0]


# ---------------------------------------------------------------- NAD: the attention loss


def test_attention_map_and_loss_follow_the_official_definition():
    fm = torch.rand(2, 5, 4, 4)
    am = attention_map(fm)
    want = fm.pow(2).sum(1).flatten(1)
    torch.testing.assert_close(am, want / (want.norm(dim=1, keepdim=True) + 1e-6))
    # Mean squared error over batch and positions, not the norm of the difference:
    # maps [1, 0] and [0, 1] differ by 1 at each of 2 positions -> MSE 1 (the norm would be sqrt 2).
    s, t = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    assert attention_loss(s, t).item() == pytest.approx(1.0, abs=1e-5)


def test_attention_loss_is_zero_for_identical_maps_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 6, 6, generator=gen), torch.randn(4, 8, 6, 6, generator=gen)
    assert attention_loss(a, a.clone()).item() == 0.0
    assert attention_loss(a, 3 * a).item() < 1e-10, "maps are normalised: the scale of the features does not matter"
    assert attention_loss(a, b).item() > 1e-4


def test_nad_gradient_reaches_the_student_only():
    student, teacher = tiny(seed=0), tiny(seed=1)
    layers = ["net.12", "net.19", "net.20"]
    ext = AttentionDistillation(teacher, layers, [500.0, 1000.0, 1000.0], 2.0)
    before = state(teacher)
    ext.start(student, torch.device("cpu"))
    assert not teacher.training and not any(q.requires_grad for q in teacher.parameters())
    x = torch.rand(8, 3, 32, 32)
    out = student(x)
    total = ext.loss(student, x, torch.zeros(8, dtype=torch.long), out, torch.zeros(()))
    assert total.item() > 0 and len(ext.last_terms) == 3
    total.backward()
    assert student.net[0].weight.grad is not None and student.net[0].weight.grad.abs().sum() > 0
    assert all(q.grad is None for q in teacher.parameters())
    ext.end(student)
    assert all(not m._forward_hooks for m in [*student.modules(), *teacher.modules()]), "hooks removed"
    # Through the trainer: the teacher stays exactly as it was, the student moves.
    s_before = state(student)
    data = ImageSet((torch.rand(32, 3, 32, 32) * 255).to(torch.uint8), torch.arange(32) % 10)
    ext = AttentionDistillation(teacher, layers, [500.0, 1000.0, 1000.0], 2.0)
    train(student, data, TrainConfig(epochs=1, batch_size=16, lr=0.01), SYN.augmentation, seed=0, extensions=[ext])
    after = state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights and BN statistics unchanged"
    assert any(not torch.equal(s_before[k], v) for k, v in state(student).items())


def test_nad_runs_teacher_then_student_through_the_shared_trainer(planted, monkeypatch):
    model, clean, *_ = planted
    calls = []
    real = nad_module.train

    def spy(m, data, cfg, aug, **kw):
        calls.append((cfg, [type(e).__name__ for e in kw.get("extensions", ())], kw.get("keep_ragged")))
        return real(m, data, cfg, aug, **kw)

    monkeypatch.setattr(nad_module, "train", spy)
    nad = NAD(epochs=2, teacher_epochs=1)
    res = nad(copy.deepcopy(model), clean, ctx())
    assert [c[0].epochs for c in calls] == [1, 2] and [c[1] for c in calls] == [[], ["AttentionDistillation"]]
    cfg = calls[1][0]
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov, cfg.batch_size) == (0.1, 0.9, 1e-4, True, 64)
    assert cfg.schedule == "multistep" and cfg.milestones == (2,) and cfg.gamma == 0.1
    assert all(c[2] for c in calls), "teacher and student keep the ragged last batch, as the official DataLoader"
    info = res.info
    assert info["layers"] == ["net.5", "net.12", "net.19"] and info["map_sizes"] == [[32, 32], [16, 16], [8, 8]]
    assert info["official_sizes"] and info["betas_effective"] == [500.0, 1000.0, 1000.0]
    assert all(not m._forward_hooks for m in res.model.modules())


# ---------------------------------------------------------------- FT


def test_ft_at_default_settings_lowers_the_asr(planted):
    model, clean, test_set, triggered = planted
    before = evaluate(model, test_set, triggered, bf16=False)
    assert before["asr"] > 0.5 and before["ca"] > 0.9, before
    res = FineTuning()(copy.deepcopy(model), clean, ctx())
    after = evaluate(res.model, test_set, triggered, bf16=False)
    # Measured: 0.73 -> 0.26 on a CPU with AVX-512; 0.93 -> 0.81 on an AVX2-only one (2026-12-03), whose
    # fp32 kernels plant a stronger backdoor in the same fixture, and plain fine-tuning removes strong
    # backdoors slowly (the fixture's note). Seeds 1 and 2 there: 0.78 -> 0.42, 0.14 -> 0.02.
    assert after["asr"] < before["asr"] - 0.05, (before, after)
    assert after["ca"] > before["ca"] - 0.08, (before, after)  # measured: 0.997 -> 0.967
    assert res.info["steps"] == 100 and res.info["epochs"] == 100
    # The control: the same run without learning (only BN statistics move) leaves most of the backdoor.
    still = evaluate(FineTuning(lr=0.0)(copy.deepcopy(model), clean, ctx()).model, test_set, triggered, bf16=False)
    # Measured: 0.62 against 0.26 (AVX-512 CPU); 0.93 against 0.81 (AVX2-only CPU, the stronger backdoor).
    assert still["asr"] > after["asr"] + 0.1, (still, after)


# ---------------------------------------------------------------- FST


class Recorder(TrainExtension):
    """Records FST's head at the start, at each loss and after each step (runs after HeadShift)."""

    def __init__(self, head: nn.Linear, shift: HeadShift) -> None:
        self.head, self.shift = head, shift
        self.start_weight = self.start_bias = None
        self.norms: list[float] = []
        self.penalties: list[tuple[float, float]] = []

    def start(self, model, device):
        self.start_weight, self.start_bias = self.head.weight.detach().clone(), self.head.bias.detach().clone()

    def loss(self, model, x, y, out, loss):
        ce = nn.functional.cross_entropy(out.float(), y)
        self.penalties.append(((loss - ce).item(), (self.head.weight * self.shift.original).sum().item()))
        return loss

    def after_step(self, model):
        self.norms.append(self.head.weight.norm().item())


def test_fst_reinitialises_the_head_holds_its_norm_and_penalises_the_original(planted, monkeypatch):
    model, clean, *_ = planted
    head0 = copy.deepcopy(model.net[-1])
    w0, norm0 = head0.weight.detach().clone(), head0.weight.norm().item()
    recorders = []
    real = fst_module.train

    def spy(m, data, cfg, aug, **kw):
        (shift,) = kw["extensions"]
        recorders.append(Recorder(shift.head, shift))
        assert cfg.nesterov is False and cfg.weight_decay == 0.0 and cfg.schedule == "cosine" and cfg.lr == 0.01
        assert cfg.epochs == 10 and cfg.batch_size == 128 and cfg.momentum == 0.9 and kw["keep_ragged"]
        return real(m, data, cfg, aug, **{**kw, "extensions": [shift, recorders[-1]]})

    monkeypatch.setattr(fst_module, "train", spy)
    fst = FST(alpha=0.2)
    res = fst(copy.deepcopy(model), clean, ctx())
    rec = recorders[0]
    # Re-initialised: uniform within 1/sqrt(fan_in), far from the original, before the first step.
    bound = 1 / head0.in_features ** 0.5
    assert rec.start_weight.abs().max() <= bound and rec.start_bias.abs().max() <= bound
    assert not torch.allclose(rec.start_weight, w0) and not torch.allclose(rec.start_bias, head0.bias)
    # The penalty is alpha * <W, W_original> with the ORIGINAL weights, at every step.
    assert torch.equal(rec.shift.original, w0)
    assert len(rec.penalties) == 10 == len(rec.norms)  # 10 epochs x 1 step (64 images, batch 128)
    for extra, inner in rec.penalties:
        assert extra == pytest.approx(0.2 * inner, rel=1e-4, abs=1e-5)
    # After every step the head's norm is the original norm.
    assert rec.norms == pytest.approx([norm0] * 10, rel=1e-5)
    w = res.model.net[-1].weight.detach()
    assert w.norm().item() == pytest.approx(norm0, rel=1e-5) and not torch.allclose(w, w0)
    assert res.info["inner_product_after"] < res.info["inner_product_before"], "the head moved away from the original"
    assert res.info["head"] == "net.23" and res.info["head_norm"] == pytest.approx(norm0)


def test_fst_penalty_gradient_is_alpha_times_the_original_weight():
    head = nn.Linear(4, 3)
    original = torch.randn(3, 4)
    shift = HeadShift(head, original, alpha=0.5, norm=2.0)
    shift.loss(head, None, None, None, torch.zeros(())).backward()
    torch.testing.assert_close(head.weight.grad, 0.5 * original)
    shift.after_step(head)
    assert head.weight.norm().item() == pytest.approx(2.0)


def test_fst_needs_a_linear_head():
    conv_only = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    data = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(BenchError, match="fst needs"):
        FST()(conv_only, data, ctx())


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("cls,kw", [
    (NAD, dict(epochs=-1)), (NAD, dict(teacher_epochs=0)), (NAD, dict(lr=-0.1)), (NAD, dict(p=0.0)),
    (NAD, dict(betas=())), (NAD, dict(betas=(-1.0, 1.0, 1.0))), (NAD, dict(layers=("net.12",))),
    (NAD, dict(layers=("a", "b"), betas=(1.0, 1.0, 1.0))), (NAD, dict(gamma=2.0)),
    (FineTuning, dict(epochs=0)), (FineTuning, dict(epochs=-3)), (FineTuning, dict(lr=-1.0)), (FineTuning, dict(momentum=1.5)),
    (FST, dict(epochs=-1)), (FST, dict(lr=-0.01)), (FST, dict(alpha=-0.2)), (FST, dict(batch_size=0)),
])
def test_bad_settings(cls, kw):
    with pytest.raises(BenchError):
        cls(**kw)


def test_bad_settings_from_strings():
    with pytest.raises(BenchError, match="one beta per layer"):
        build(NAD, {"layers": "net.12,net.19", "betas": "1,2,3"})
    with pytest.raises(BenchError):
        build(NAD, {"betas": "1,x"})
    with pytest.raises(BenchError):
        build(FST, {"alpha": "-1"})
    assert build(NAD, {"layers": ""}).layers == ()
