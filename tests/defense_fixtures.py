"""Fixtures shared by the defense tests: one tiny synthetic set and one briefly trained smallcnn.

Import them into a test module (``from defense_fixtures import SYN, ctx, model, sets, state``);
pytest finds fixtures by name in the module that uses them.
"""

import pytest
import torch
from torch import nn

from bench.data import DATASETS, ImageSet
from bench.models import MODELS
from bench.train import TrainConfig, train
from defenses import DefenseContext

SYN = DATASETS.get("synthetic")(n_train=600, n_test=10)




@pytest.fixture(scope="module")
def sets() -> tuple[ImageSet, ImageSet]:
    """(training images, clean defense images) from one synthetic draw."""
    train_set, _ = SYN.load()
    return train_set.subset(torch.arange(500)), train_set.subset(torch.arange(500, 564))


@pytest.fixture(scope="module")
def model(sets) -> nn.Module:
    m = MODELS.get("smallcnn")(width=8).build(10, 3, SYN.mean, SYN.std, seed=0)
    train(m, sets[0], TrainConfig(epochs=4, batch_size=50, lr=0.1), SYN.augmentation, seed=0)
    return m.eval()


def ctx(seed: int = 0) -> DefenseContext:
    return DefenseContext(num_classes=10, augmentation=SYN.augmentation, seed=seed)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_pruned_by_masks(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], masks: dict, thr: float) -> int:
    """The pruning rule of a mask defense (RNP, ANP): a BatchNorm weight is zeroed exactly where its
    channel's mask is <= ``thr``, every other tensor is unchanged. Returns the number of zeroed channels."""
    zeroed = 0
    for key, t in before.items():
        layer, _, leaf = key.rpartition(".")
        if layer in masks and leaf == "weight":
            m = torch.tensor(masks[layer])
            cut = after[key] == 0
            clear = (m - thr).abs() > 1e-4  # info masks are rounded; skip values at the threshold
            assert torch.equal(cut[clear], (m <= thr)[clear])
            assert torch.equal(after[key][~cut], t[~cut])
            zeroed += int(cut.sum())
        else:
            assert torch.equal(after[key], t), f"{key} changed"
    return zeroed
