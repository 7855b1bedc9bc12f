"""Architectures of other libraries (``torchvision:NAME``, ``timm:NAME``), and every defense and detector
on two models unlike our own: torchvision's ResNet-18 (ImageNet stem, its own module names) and a VGG
without any BatchNorm. Tiny: 32x32 synthetic images, each method with settings that make it quick.
"""

from __future__ import annotations

import copy
import json
import pickle
import sys

import pytest
import torch
from torch import nn

import bench.train
import defenses.rnp as rnp_module
from bench.check import CHEAP
from bench.models import MODELS, Classifier, adapt_in_channels
from bench.registry import BenchError
from bench.run.plan import GridSpec
from bench.train import TrainConfig, train
from defenses import DEFENSES, DefenseResult
from detectors import DETECTORS, Detection

from defense_fixtures import SYN, ctx, sets  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

try:
    import timm  # noqa: F401

    HAVE_TIMM = True
except ImportError:
    HAVE_TIMM = False


def one_line_error(fn) -> str:
    with pytest.raises(BenchError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- torchvision:NAME


def test_torchvision_models_are_built_from_scratch_inside_our_classifier():
    spec = MODELS.get("torchvision:resnet18")()
    assert type(spec).name == "torchvision:resnet18" and "torchvision:resnet18" in MODELS
    net = spec.build(7, 3, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), seed=0)
    assert isinstance(net, Classifier) and net.net.fc.out_features == 7
    assert torch.equal(net.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    x = torch.rand(3, 3, 32, 32)
    # Inputs in [0, 1], normalised inside: the wrapper computes net((x - mean) / std).
    net.eval()
    assert torch.allclose(net(x), net.net((x - net.mean) / net.std))
    assert net(x).shape == (3, 7)
    # Same seed, same weights; another seed, others (weights=None: the model's own initialisation).
    again = spec.build(7, 3, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), seed=0)
    other = spec.build(7, 3, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5), seed=1)
    assert torch.equal(again.net.conv1.weight, net.net.conv1.weight)
    assert not torch.equal(other.net.conv1.weight, net.net.conv1.weight)


def test_a_one_channel_dataset_gets_the_stem_built_for_one_channel():
    spec = MODELS.get("torchvision:resnet18")()
    rgb = spec.build(10, 3, (0.5,) * 3, (0.25,) * 3, seed=0)
    grey = spec.build(10, 1, (0.5,), (0.25,), seed=0)
    conv, ref = grey.net.conv1, rgb.net.conv1
    assert conv.in_channels == 1 and (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (64, (7, 7), (2, 2), (3, 3))
    assert torch.equal(conv.weight, ref.weight[:, :1]), "the model's own initialisation, cut to one channel"
    assert grey.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    spec.check(grey, 10, 1, 28, "mnist")
    # Four channels: the built weight tiled; a network without a 3-channel Conv2d is refused on one line.
    four = adapt_in_channels(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 1)), 4)
    assert four[0].in_channels == 4 and torch.equal(four[0].weight[:, 3], four[0].weight[:, 0])
    assert "Conv2d taking 3 channels" in one_line_error(lambda: adapt_in_channels(nn.Sequential(nn.Linear(3, 2)), 1))


def test_an_unknown_torchvision_name_fails_on_one_line_with_close_matches():
    msg = one_line_error(lambda: MODELS.get("torchvision:resnet81"))
    assert "resnet81" in msg and "torchvision:resnet18" in msg
    assert "torchvision:resnet81" not in MODELS
    one_line_error(lambda: MODELS.get("torchvision:"))


def test_googlenet_returns_logits_in_training_mode():
    """Built without auxiliary heads: the trainer gets a tensor, not GoogLeNetOutputs."""
    spec = MODELS.get("torchvision:googlenet")()
    net = spec.build(10, 3, (0.5,) * 3, (0.25,) * 3)
    spec.check(net, 10, 3, 32)
    assert net.net.aux1 is None


def test_a_model_that_cannot_take_the_images_fails_at_plan_time_on_one_line(monkeypatch):
    monkeypatch.setattr(bench.train, "train", lambda *a, **k: pytest.fail("planning must not train"))
    # AlexNet's third max-pool meets a 1x1 map at 32x32 (torchvision's AlexNet is for 224x224).
    msg = one_line_error(lambda: GridSpec(attacks=["badnets"], defenses=["none"], models=["torchvision:alexnet"]).plan())
    assert "torchvision:alexnet" in msg and "3x32x32" in msg and "synthetic" in msg
    (cell,) = GridSpec(attacks=["badnets"], defenses=["none"], models=["torchvision:resnet18"]).plan().defense_cells
    assert cell.job.model.name == "torchvision:resnet18" and "torchvision:resnet18" in cell.id


def test_the_dry_forward_pass_checks_the_output_and_leaves_the_rng_alone():
    class Twice(nn.Module):
        def forward(self, x):
            return torch.nn.functional.dropout(x.mean((2, 3)), 0.5, self.training), x

    spec = MODELS.get("smallcnn")(width=2)
    net = Classifier(Twice(), (0.5,) * 3, (0.25,) * 3)
    rng = torch.get_rng_state()
    assert "tuple" in one_line_error(lambda: spec.check(net, 10, 3, 32))
    assert torch.equal(torch.get_rng_state(), rng)
    assert "(2, 3)" in one_line_error(lambda: spec.check(Classifier(nn.Flatten(2), (0.5,) * 3, (0.25,) * 3), 3, 3, 4))


@pytest.mark.parametrize("model", ["resnet18", "preactresnet18"])
def test_a_width_whose_strided_1x1_shortcut_crashes_torch_is_refused_at_plan_time(model, monkeypatch):
    """ResNet widths below 8 give a shortcut (a strided 1x1 convolution) 2-7 input channels, and
    torch's CPU backward of that in channels_last aborted the process (double free) on an AVX2 EPYC."""
    monkeypatch.setattr(bench.train, "train", lambda *a, **k: pytest.fail("planning must not train"))
    msg = one_line_error(lambda: GridSpec(attacks=["badnets"], defenses=["none"], models=[model],
                                          overrides={model: {"width": "4"}}).plan())
    assert model in msg and "4 channels" in msg and "at least 8" in msg
    for ok in ("8", "9"):  # 8 or more input channels everywhere do not crash (width 1 meets 2 at stage 3)
        GridSpec(attacks=["badnets"], defenses=["none"], models=[model], overrides={model: {"width": ok}}).plan()


def test_a_family_spec_pickles_by_name():
    spec = MODELS.get("torchvision:resnet18")()
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and type(back) is type(spec) and back.to_dict() == {}


# ---------------------------------------------------------------- timm:NAME


def test_without_timm_a_timm_name_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    msg = one_line_error(lambda: MODELS.get("timm:mobilenetv3_small_050"))
    assert "pip install 'bdbench[timm]'" in msg
    assert "timm:mobilenetv3_small_050" not in MODELS


@pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (pip install 'bdbench[timm]')")
def test_timm_models_are_built_from_scratch_with_the_datasets_channels():
    spec = MODELS.get("timm:resnet18")()
    grey = spec.build(10, 1, (0.5,), (0.25,), seed=0)
    assert isinstance(grey, Classifier) and grey.net.conv1.in_channels == 1 and grey.net.fc.out_features == 10
    spec.check(grey, 10, 1, 28, "mnist")
    assert grey.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    msg = one_line_error(lambda: MODELS.get("timm:resnet81"))
    assert "timm:resnet18" in msg
    assert pickle.loads(pickle.dumps(spec)) == spec


# ---------------------------------------------------------------- every defense and detector on foreign models

# Settings that make each method quick here (the contract checks' budgets, bench.check.CHEAP); the point is
# that it runs (or refuses) on these models.
QUICK = {**CHEAP, **{n: {**CHEAP[n], "unlearn_lr": 0.05} for n in ("rnp", "rnp_label", "rnp_samples", "rnp_trigger")}}
# The refusals these models earn, and a word their one-line message must hold (what the model lacks).
REFUSALS = {("clp", "vgg_nobn"): "BatchNorm"}
# What each method must find in these models by its rule (its docstring): masks on BatchNorm, else on conv
# outputs (ResNet-18: 4800 BN channels; the VGG: 264 conv channels), NAD's stages at the official maps' sizes
# (the VGG's first three stage ends, 32/16/8) or, where there are none (torchvision's stem quarters the input),
# the last three larger than 1x1 (layer1-3: 8/4/2), the last nn.Linear.
FACTS = {
    ("rnp", "tv_resnet18"): {"mask_kind": "bn", "channels_total": 4800},
    ("anp", "tv_resnet18"): {"mask_kind": "bn", "channels_total": 4800},
    ("rnp", "vgg_nobn"): {"mask_kind": "conv", "channels_total": 264},
    ("anp", "vgg_nobn"): {"mask_kind": "conv", "channels_total": 264},
    ("nad", "tv_resnet18"): {"layers": ["net.layer1", "net.layer2", "net.layer3"], "map_sizes": [[8, 8], [4, 4], [2, 2]],
                             "official_sizes": False},
    ("nad", "vgg_nobn"): {"layers": ["net.3", "net.8", "net.15"], "map_sizes": [[32, 32], [16, 16], [8, 8]], "official_sizes": True},
    ("fst", "tv_resnet18"): {"head": "net.fc"}, ("fp", "tv_resnet18"): {"layer": "net.fc", "channels_total": 512},
    ("fst", "vgg_nobn"): {"head": "net.33"}, ("fp", "vgg_nobn"): {"layer": "net.33", "channels_total": 32},
}
FOREIGN = {"tv_resnet18": ("torchvision:resnet18", {}), "vgg_nobn": ("vgg", {"width": 4, "bn": False})}


@pytest.fixture(scope="module")
def foreign(sets) -> dict[str, nn.Module]:
    """The two models, each briefly trained (one epoch) on the synthetic images."""
    out = {}
    for key, (name, kw) in FOREIGN.items():
        spec = MODELS.get(name)(**kw)
        m = spec.build(10, 3, SYN.mean, SYN.std, seed=0)
        spec.check(m, 10, 3, 32)
        train(m, sets[0], TrainConfig(epochs=1, batch_size=50, lr=0.05), SYN.augmentation, seed=0)
        out[key] = m.eval()
    return out


def run_or_refuse(method: str, key: str, call) -> object | None:
    """The result, or None after a refusal that is expected and says why on one line; nothing else passes."""
    try:
        res = call()
    except BenchError as exc:
        msg = str(exc)
        assert "\n" not in msg, msg
        assert (method, key) in REFUSALS, f"{method} refused {key}: {msg}"
        assert REFUSALS[method, key] in msg, msg
        return None
    assert (method, key) not in REFUSALS, f"{method} was expected to refuse {key}"
    return res


@pytest.mark.parametrize("key", list(FOREIGN))
@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_runs_or_refuses_on_one_line_on_foreign_models(name, key, foreign, sets, monkeypatch):
    monkeypatch.setattr(rnp_module, "_UNLEARNED", {})
    model = foreign[key]
    defense = DEFENSES.get(name)(**QUICK.get(name, {}))
    defense.check(model)
    res = run_or_refuse(name, key, lambda: defense(copy.deepcopy(model), sets[1], ctx()))
    if res is None:
        return
    x = sets[1].x[:5].float() / 255
    assert isinstance(res, DefenseResult) and res.model(x).shape == (5, 10)
    json.dumps(res.info)
    for fact, want in FACTS.get((name, key), {}).items():
        assert res.info[fact] == want, (fact, res.info[fact])


@pytest.mark.parametrize("key", list(FOREIGN))
@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_runs_or_refuses_on_one_line_on_foreign_models(name, key, foreign, sets, monkeypatch):
    monkeypatch.setattr(rnp_module, "_UNLEARNED", {})
    model = foreign[key]
    cls = DETECTORS.get(name)
    detector = cls(**QUICK.get(name, {}))
    detector.check(model)
    inputs = sets[0].subset(torch.arange(40))
    extra = () if cls.level == "model" else (inputs,)
    res = run_or_refuse(name, key, lambda: detector(copy.deepcopy(model), sets[1], ctx(), *extra))
    if res is None:
        return
    assert isinstance(res, Detection)
    json.dumps(res.info)
    if cls.level == "model":
        assert (res.label is None or 0 <= res.label < 10) and isinstance(res.score, float) and res.score == res.score
    else:
        assert res.scores.shape == (40,) and torch.isfinite(res.scores).all()
