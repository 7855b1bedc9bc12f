"""What each removal defense achieves, in seconds: it removes a planted backdoor, and a broken copy does not.

One tiny backdoored model (smallcnn width 8, BadNets target 3 at 20 %, test_nc's prototype classes,
where every defense's assumptions hold) and 200 clean defense images. A defense *works* here when
it takes the ASR at least 50 points below the control (``none``, the model as it is) and keeps
CA >= 80 %. Each defense is run as it is and as a deliberately broken copy (its masks ignored, or
its learning rate zero): the copy must not work, so the test fails if the defense silently stops
doing anything, not only in the 9-minute GTSRB test.

Measured with the settings below (2026-12-05, AVX2-only EPYC, fp32, one thread): backdoored CA 1.0,
ASR 0.89; every defense ASR <= 0.17 with CA >= 0.99, except RNP at its official settings (CA 0.80),
hence the demo preset's RNP settings for this small network (``bench/presets.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import defenses.anp
import defenses.rnp
from attacks import ATTACKS
from bench.data import Augmentation
from bench.metrics import evaluate
from bench.models import MODELS
from bench.train import TrainConfig, train
from defenses import DEFENSES, DefenseContext
from test_nc import K, NO_AUG, TARGET, prototypes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _no_pruning(model, masks, threshold):
    return 0  # the masks are ignored: nothing is pruned


# name: (settings that make it fast here, the broken copy: settings, or the module whose pruning is ignored)
CASES = {
    "rnp": ({"clean_threshold": 0.5, "select": "auto", "recalibrate_bn": True}, defenses.rnp),
    "anp": ({}, defenses.anp),
    "fp": ({"lr": 0.1}, {"acc_ratio": 0.0, "lr": 0.0}),
    "nad": ({}, {"lr": 0.0}),
    "ft": ({"lr": 0.1, "epochs": 30}, {"lr": 0.0}),
    "fst": ({"lr": 0.1}, {"lr": 0.0}),
    "ibau": ({"batch_size": 40}, {"lr": 0.0}),
    "nc": ({"epochs": 40, "batches_per_epoch": 2, "batch_size": 16}, {"unlearn_lr": 0.0}),
}


def test_the_cases_cover_every_removal_defense():
    assert set(CASES) == set(DEFENSES.names()) - {"none", "clp"}  # CLP is data-free: tested on planted outliers


@pytest.fixture(scope="module")
def planted():
    train_set = prototypes(1000, seed=1)
    atk = ATTACKS.get("badnets")(target=TARGET, poison_rate=0.2)
    atk.prepare(K, 3, 32, train_set, 0)
    model = MODELS.get("smallcnn")(width=8).build(K, 3, (0.5,) * 3, (0.29,) * 3, seed=0)
    train(model, atk.poison(train_set, 0).data, TrainConfig(epochs=8, batch_size=50, lr=0.1, bf16=False),
          Augmentation(pad=0, flip=False), seed=0)
    test = prototypes(300, seed=2)
    model.eval()
    control = evaluate(model, test, atk.test_set(test), bf16=False)
    assert control["asr"] > 0.8 and control["ca"] > 0.95, control  # the backdoor is planted
    return model, prototypes(200, seed=3), test, atk.test_set(test), control


def works(metrics: dict, control: dict) -> bool:
    return metrics["asr"] <= control["asr"] - 0.5 and metrics["ca"] >= 0.8


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_defense_removes_a_planted_backdoor_and_a_broken_copy_does_not(name, planted, monkeypatch):
    model, clean, test, triggered, control = planted
    settings, broken = CASES[name]
    ctx = DefenseContext(num_classes=K, augmentation=NO_AUG, seed=0, bf16=False)
    cls = DEFENSES.get(name)
    after = evaluate(cls(**settings)(copy.deepcopy(model), clean, ctx).model, test, triggered, bf16=False)
    assert works(after, control), (name, control, after)
    if isinstance(broken, dict):
        defense = cls(**{**settings, **broken})
    else:
        monkeypatch.setattr(broken, "prune", _no_pruning)
        defense = cls(**settings)
    still = evaluate(defense(copy.deepcopy(model), clean, ctx).model, test, triggered, bf16=False)
    assert not works(still, control), (name, "broken copy", control, still)
