"""Clean-label poisoning (attacks.base.CleanLabelAttack) and its two attacks, SIG and CTRL.

Tiny synthetic tensors only. The references here are written independently of the code
under test: the sinusoid from ``math.sin`` per column, the DCT from its textbook sum, the
YUV matrices typed from kornia 0.6.5.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import attacks  # noqa: F401  (registers the built-in attacks)
from attacks import ATTACKS
from attacks.ctrl import block_dct, block_idct, dct_matrix
from bench.cli import main
from bench.data import ImageSet
from bench.registry import BenchError
from reference_math import naive_dct_matrix

K = 10
# Attacks that need a clean reference model (LC) prepare only with one; tests/test_trojan_lc.py checks them.
CLEAN = [n for n in ATTACKS.names() if ATTACKS.get(n).clean_label and not ATTACKS.get(n).needs_clean_model]
KORNIA_YUV_TO_RGB = torch.tensor([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]], dtype=torch.float64)


def unbalanced_set(n: int = 200, target_count: int = 13, target: int = 3, c: int = 3, s: int = 32, seed: int = 1) -> ImageSet:
    """``n`` random images; exactly ``target_count`` of class ``target``, the rest spread over the others."""
    gen = torch.Generator().manual_seed(seed)
    others = torch.tensor([k for k in range(K) if k != target])
    y = others[torch.arange(n) % len(others)]
    y[torch.randperm(n, generator=gen)[:target_count]] = target
    x = torch.randint(0, 256, (n, c, s, s), generator=gen, dtype=torch.uint8)
    return ImageSet(x, y)


def test_sig_and_ctrl_are_clean_label_and_the_others_are_not():
    assert {"sig", "ctrl"} <= set(CLEAN)
    assert not {"badnets", "blend", "wanet"} & set(CLEAN)


# ---------------------------------------------------------------- clean-label poisoning


@pytest.mark.parametrize("name", CLEAN)
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.065, 0.1, 1.0])
def test_poison_count_and_labels(name, rate):
    train = unbalanced_set()  # 200 images, 13 of the target class 3
    atk = ATTACKS.get(name)(target=3, poison_rate=rate)
    atk.prepare(K, 3, 32, train, 0)
    p = atk.poison(train, seed=4)
    idx = p.poison_idx
    assert len(idx) == min(round(rate * 200), 13) and len(idx.unique()) == len(idx)
    assert (train.y[idx] == 3).all(), "only target-class images are poisoned"
    assert torch.equal(p.data.y, train.y), "every label is kept"
    assert torch.equal(p.data.x[idx], atk.trigger(train.x[idx]))
    rest = torch.ones(200, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(p.data.x[rest], train.x[rest])
    if 0 < len(idx) < 13:  # a real choice: it depends on the seed and stays in the target class
        other = atk.poison(train, seed=5).poison_idx
        assert not torch.equal(other, idx) and (train.y[other] == 3).all()


@pytest.mark.parametrize("name", CLEAN)
def test_target_without_images_is_refused_before_training(name):
    train = unbalanced_set(target_count=0)  # no image of class 3
    atk = ATTACKS.get(name)(target=3)
    with pytest.raises(BenchError) as err:
        atk.prepare(K, 3, 32, train, 0)  # bench.run.cells.train_model calls prepare before training
    msg = str(err.value)
    assert "\n" not in msg and f"{name}.target=3" in msg and "allowed" in msg and "no training images" in msg
    ok = ATTACKS.get(name)(target=3)
    ok.prepare(K, 3, 32, unbalanced_set(), 0)
    with pytest.raises(BenchError, match="no training images"):  # poison checks again on the set it is given
        ok.poison(train, seed=0)


@pytest.mark.parametrize("name", CLEAN)
def test_test_set_is_non_target_images_with_target_label(name):
    test = unbalanced_set(seed=2)
    atk = ATTACKS.get(name)(target=3)
    atk.prepare(K, 3, 32, unbalanced_set(), 0)
    ts = atk.test_set(test)
    keep = test.y != 3
    assert len(ts) == int(keep.sum()) == 187
    assert torch.equal(ts.x, atk.trigger(test.x[keep])) and torch.equal(ts.y_true, test.y[keep]) and (ts.y_target == 3).all()


def test_dirty_label_poisoning_is_unchanged():
    # the pre-clean-label selection, written out: non-target pool, round(rate * N), randperm of the seed, relabelled
    train = unbalanced_set()
    atk = ATTACKS.get("badnets")(target=3, poison_rate=0.1)
    atk.prepare(K, 3, 32, train, 0)
    p = atk.poison(train, seed=9)
    pool = (train.y != 3).nonzero().flatten()
    want = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(9))[:20]].sort().values
    assert torch.equal(p.poison_idx, want) and (p.data.y[want] == 3).all()
    assert torch.equal(p.data.x[want], atk.trigger(train.x[want]))


def test_list_fields_says_what_poison_rate_means():
    res = CliRunner().invoke(main, ["list", "attacks", "--fields"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    for name, rate in (("sig", 0.1), ("ctrl", 0.01)):
        line = next(l for l in lines if f"{name}.poison_rate (float) = {rate}" in l)
        assert "WHOLE training set" in line and "target-class images only" in line and "capped" in line
    assert "badnets.poison_rate (float) = 0.1  fraction of the training set poisoned" in res.output


@pytest.mark.parametrize("name", CLEAN + ["badnets"])
def test_defense_data_keeps_clean_label_targets_and_drops_relabelled_images(name):
    """Fails if the defense data's classes reveal a clean-label attack's target (the pool used to
    drop every poisoned index, which emptied the target class), or if relabelled images get in."""
    from bench.data import defense_subset
    from bench.run.cells import defense_data

    train = unbalanced_set()  # 200 images, 13 of the target class 3
    atk = ATTACKS.get(name)(target=3, poison_rate=1.0 if ATTACKS.get(name).clean_label else 0.3)
    atk.prepare(K, 3, 32, train, 0)
    idx = atk.poison(train, seed=4).poison_idx
    got = defense_data(train, atk, idx, 100, seed=2)
    assert len(got) == 100
    if atk.clean_label:
        assert len(idx) == 13, "every target-class image is poisoned"
        assert torch.equal(got.x, defense_subset(train, 100, seed=2).x), "drawn as if nothing were poisoned"
        assert (got.y == 3).sum() >= 3, "the target class is in the defense data at about its share"
    else:
        assert torch.equal(got.x, defense_subset(train, 100, seed=2, exclude=idx).x)
        drawn = {bytes(r.numpy().tobytes()) for r in got.x.flatten(1)}
        assert not drawn & {bytes(r.numpy().tobytes()) for r in train.x[idx].flatten(1)}, "no relabelled image"


# ---------------------------------------------------------------- SIG


@pytest.mark.parametrize("c,s", [(3, 32), (1, 28)])
def test_sig_adds_exactly_the_column_sinusoid(c, s):
    atk = ATTACKS.get("sig")()
    atk.prepare(K, c, s, unbalanced_set(c=c, s=s), 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(41, 215, (5, c, s, s), generator=gen, dtype=torch.uint8)  # x +- 40 never clamps
    diff = atk.trigger(x).to(torch.int16) - x.to(torch.int16)
    wave = torch.tensor([round(40 * math.sin(2 * math.pi * j * 6 / s)) for j in range(s)], dtype=torch.int16)
    assert torch.equal(diff, wave.expand_as(diff)), "the same sinusoid on every image, channel and row"
    assert wave.abs().max() >= 39 and len(wave.unique()) > 5, "it varies along the columns"
    lo, hi = torch.zeros(1, c, s, s, dtype=torch.uint8), torch.full((1, c, s, s), 255, dtype=torch.uint8)
    assert torch.equal(atk.trigger(lo)[0, 0, 0], wave.clamp(min=0).to(torch.uint8))
    assert torch.equal(atk.trigger(hi)[0, 0, 0], (255 + wave).clamp(max=255).to(torch.uint8))


def test_sig_parameters_change_the_wave():
    atk = ATTACKS.get("sig")(delta=10.0, f=2.0)
    x = torch.full((1, 1, 28, 28), 100, dtype=torch.uint8)
    row = atk.trigger(x)[0, 0, 7].to(torch.int16) - 100
    assert torch.equal(row, torch.tensor([round(10 * math.sin(2 * math.pi * j * 2 / 28)) for j in range(28)], dtype=torch.int16))




# ---------------------------------------------------------------- CTRL


@pytest.mark.parametrize("n", [8, 28, 32])
def test_dct_matrix_is_the_orthonormal_dct(n):
    d = dct_matrix(n)
    assert torch.allclose(d, naive_dct_matrix(n), atol=1e-12)
    assert torch.allclose(d @ d.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(2, 3, 2 * n, 2 * n, dtype=torch.float64)
    assert torch.allclose(block_idct(block_dct(x, n), n), x, atol=1e-9)
    blk = x[1, 2, n:, :n]  # block (1, 0) of image 1, channel 2
    assert torch.allclose(block_dct(x, n)[1, 2, n:, :n], naive_dct_matrix(n) @ blk @ naive_dct_matrix(n).T, atol=1e-9)


def yuv_coefficients(diff: torch.Tensor, block: int) -> torch.Tensor:
    """An RGB (or grayscale) difference ``[B, C, H, W]`` back in YUV and in the DCT of every block (naive DCT)."""
    diff = diff.double()
    if diff.shape[1] == 3:
        diff = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(KORNIA_YUV_TO_RGB), diff)
    d = naive_dct_matrix(block)
    b, c, h, w = diff.shape
    blocks = diff.reshape(b, c, h // block, block, w // block, block).transpose(3, 4)
    return d @ blocks @ d.T  # [B, C, rows of blocks, columns of blocks, block, block]


@pytest.mark.parametrize("c,s,block,pos,fields", [
    (3, 32, 32, (15, 31), {}),  # the official CIFAR setting: one block, (15, 15) and (31, 31) of U and V
    (3, 64, 32, (15, 31), {}),  # 2x2 blocks, the same bump in each
    (3, 32, 16, (7, 15), {"window": 16, "positions": (7, 15)}),
    (3, 32, 32, (15, 31), {"channels": (2,), "magnitude": 60.0}),
    (1, 28, 28, (13, 27), {}),  # grayscale: the single channel, positions scaled to the 28-pixel block
])
def test_ctrl_energy_sits_in_the_chosen_coefficients(c, s, block, pos, fields):
    atk = ATTACKS.get("ctrl")(**fields)
    atk.prepare(K, c, s, unbalanced_set(c=c, s=s), 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(70, 186, (3, c, s, s), generator=gen, dtype=torch.uint8)  # the pattern (|v| < 25) never clamps
    coef = yuv_coefficients(atk.trigger(x).double() - x.double(), block)
    want = torch.zeros_like(coef)
    carriers = ([0] if c == 1 else list(fields.get("channels", (1, 2))))
    for p in pos:
        want[:, carriers, :, :, p, p] = fields.get("magnitude", 100.0)
    # before rounding the pattern is exactly the bump; rounding to uint8 moves any coefficient by a few units at most
    exact = yuv_coefficients(atk.state["pattern"][None], block)
    assert torch.allclose(exact, want[:1], atol=1e-3)
    assert (coef - want).abs().max() < 3, "rounding to uint8 leaves under 3 (of 100) in any coefficient"
    # the rest is rounding noise, about H * W * C / 12 per image: under 5% of the bump's energy here
    assert (coef - want).pow(2).sum() < 0.05 * want.pow(2).sum(), "over 95% of the energy is in the chosen coefficients"


def test_ctrl_is_one_fixed_additive_pattern():
    atk = ATTACKS.get("ctrl")()
    atk.prepare(K, 3, 32, unbalanced_set(), 0)
    x = torch.randint(70, 186, (4, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    diff = atk.trigger(x).float() - x.float()
    assert (diff - atk.state["pattern"]).abs().max() <= 0.5 + 1e-5
    assert 15 < atk.state["pattern"].abs().max() < 25  # 100 on four coefficients, spread over 32x32 pixels


def test_ctrl_window_must_tile_the_image():
    atk = ATTACKS.get("ctrl")(window=24, positions=(11, 23))
    with pytest.raises(BenchError, match="ctrl.window=24 does not tile 32x32"):
        atk.prepare(K, 3, 32, unbalanced_set(), 0)
