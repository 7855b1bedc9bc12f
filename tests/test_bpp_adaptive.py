"""BppAttack and Adaptive-Blend tests on tiny synthetic images.

The registry contract (tests/test_attacks.py) already runs over both attacks; these check what
is specific to them: BPP's squeeze levels, its Floyd-Steinberg dithering and its batch rewrite;
Adaptive-Blend's masked pieces, its two alphas, its cover images and its rates.
"""

from __future__ import annotations

import math

import pytest
import torch

import attacks  # noqa: F401  (registers the built-in attacks)
from attacks import ATTACKS
from attacks.bpp import floyd_steinberg
from bench.config import build, parse_sets
from bench.data import ImageSet
from bench.registry import BenchError

K = 10
SHAPES = [(3, 32), (1, 28)]


def random_set(n: int = 64, c: int = 3, s: int = 32, seed: int = 100, labels: torch.Tensor | None = None) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, s, s), generator=gen, dtype=torch.uint8)
    y = torch.arange(n) % K if labels is None else labels
    return ImageSet(x, y[torch.randperm(n, generator=gen)])


def prepared(name: str, c: int = 3, s: int = 32, n: int = 64, seed: int = 0, **fields):
    atk = ATTACKS.get(name)(**fields)
    train = random_set(n, c, s)
    atk.prepare(K, c, s, train, seed)
    return atk, train


def levels(n: int) -> torch.Tensor:
    return torch.tensor([round(k * 255 / (n - 1)) for k in range(n)], dtype=torch.uint8)


def reference_dither(x: torch.Tensor, n: int) -> torch.Tensor:
    """Floyd-Steinberg in plain raster order, one pixel at a time (the official loop's arithmetic)."""
    img = x.to(torch.float64).clone()
    h, w = img.shape[-2:]
    for y in range(h):
        for col in range(w):
            old = img[:, :, y, col].clone()
            new = torch.round(old / 255.0 * (n - 1)) / (n - 1) * 255
            err = old - new
            img[:, :, y, col] = new
            if col + 1 < w:
                img[:, :, y, col + 1] += err * 0.4375
            if y + 1 < h and col + 1 < w:
                img[:, :, y + 1, col + 1] += err * 0.0625
            if y + 1 < h:
                img[:, :, y + 1, col] += err * 0.3125
            if y + 1 < h and col - 1 >= 0:
                img[:, :, y + 1, col - 1] += err * 0.1875
    return img.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- BppAttack


@pytest.mark.parametrize("n", [8, 4, 32])
@pytest.mark.parametrize("c,s", SHAPES)
def test_bpp_squeeze_levels(c, s, n):
    atk, train = prepared("bpp", c, s, squeeze_num=n)
    out = atk.trigger(train.x)
    allowed = levels(n)
    for ch in range(c):
        values = out[:, ch].unique()
        assert torch.equal(values, allowed), f"channel {ch}: {values.tolist()} instead of the {n} levels"
    # every value goes to its nearest level
    assert (out.float() - train.x.float()).abs().max() <= 255 / (2 * (n - 1)) + 0.5


@pytest.mark.parametrize("shape", [(2, 3, 6, 7), (3, 1, 9, 5), (1, 3, 32, 32)])
def test_bpp_dither_matches_sequential_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    for n in (8, 3):
        out = floyd_steinberg(x, n)
        assert torch.equal(out, reference_dither(x, n))
        assert set(out.unique().tolist()) <= set(levels(n).tolist())
    assert floyd_steinberg(x[:0], 8).shape == (0,) + shape[1:]


def test_bpp_dither_keeps_the_mean_colour():
    # a smooth horizontal gradient from 10 to 60: squeezing to 8 levels (0, 36, 73) bands it
    ramp = torch.linspace(10, 60, 32).round().to(torch.uint8)
    x = ramp.expand(2, 3, 32, 32).clone()
    plain, _ = prepared("bpp")
    dith, _ = prepared("bpp", dithering=True)
    xp, xd = plain.trigger(x).float(), dith.trigger(x).float()
    assert set(xd.unique().tolist()) <= set(levels(8).tolist())
    # per 8x8 block, the dithered mean stays near the original; the plain squeeze bands it
    def block_err(z):
        return (torch.nn.functional.avg_pool2d(z, 8) - torch.nn.functional.avg_pool2d(x.float(), 8)).abs().mean()
    assert block_err(xd) < 1.5 < 4 < block_err(xp)  # measured: 0.58 and 4.9
    assert abs(xd.mean() - x.float().mean()) < 0.5 < 1 < abs(xp.mean() - x.float().mean())  # 0.29 and 1.1


def test_bpp_batch_counts():
    gen = torch.Generator().manual_seed(0)
    assert prepared("bpp", poison_rate=0.1, neg_ratio=0.1)[0].batch_counts(128, gen) == (12, 12)
    assert prepared("bpp", poison_rate=0.2, neg_ratio=0.2)[0].batch_counts(128, gen) == (25, 25)
    assert prepared("bpp", poison_rate=0.29, neg_ratio=0.0)[0].batch_counts(100, gen) == (29, 0)
    # below one image per batch: one with probability bs * pc (BackdoorBench)
    low, _ = prepared("bpp", poison_rate=0.001)
    draws = [low.batch_counts(128, gen)[0] for _ in range(4000)]
    assert set(draws) == {0, 1} and abs(sum(draws) / len(draws) - 0.128) < 0.03


@pytest.mark.parametrize("dithering", [False, True])
@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
def test_bpp_hook(label_mode, dithering):
    atk, _ = prepared("bpp", label_mode=label_mode, dithering=dithering, target=0, poison_rate=0.1, neg_ratio=0.1)
    hook = atk.train_extension().batch
    bs = 128
    x = random_set(bs, seed=5).x
    y = 1 + torch.arange(bs) % (K - 1)  # no target-class image: relabelling is visible
    xo, yo = hook(x, y, torch.Generator().manual_seed(0))
    assert xo.shape == x.shape and xo.dtype == torch.uint8 and yo.dtype == y.dtype
    nb, nn = 12, 12
    want = torch.zeros_like(y) if label_mode == "all2one" else (y + 1) % K
    assert torch.equal(yo[:nb], want[:nb]), "poisoned images go to the target"
    assert torch.equal(yo[nb:], y[nb:]), "negative and clean images keep their labels"
    assert torch.equal(xo[:nb], atk.trigger(x[:nb]))
    assert torch.equal(xo[nb + nn:], x[nb + nn:]), "the rest of the batch is untouched"
    # each negative is its image plus the squeezing residual of another image of the batch
    residual = atk.trigger(x).short() - x.short()  # [bs, C, H, W]
    for i in range(nb, nb + nn):
        candidates = (x[i].short() + residual).clamp(0, 255).to(torch.uint8)
        match = (candidates == xo[i]).flatten(1).all(1).nonzero().flatten().tolist()
        assert match and i not in match, f"negative {i} is not another image's residual"
        assert not torch.equal(xo[i], x[i])
    xo2, yo2 = hook(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(xo, xo2) and torch.equal(yo, yo2), "deterministic in the generator"
    xo3, yo3 = hook(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xo3[:nb], xo[:nb]) and torch.equal(yo3, yo)
    assert not torch.equal(xo3[nb:nb + nn], xo[nb:nb + nn]), "the residual sources depend on the generator"


def test_bpp_hook_relabels_target_class_too():
    atk, train = prepared("bpp", target=0)
    xo, yo = atk.train_extension().batch(train.x, train.y, torch.Generator().manual_seed(0))
    nb = int(len(train.y) * atk.poison_rate)
    assert (yo[:nb] == 0).all() and torch.equal(yo[nb:], train.y[nb:])


def test_bpp_bad_values():
    with pytest.raises(BenchError, match="neg_ratio"):
        ATTACKS.get("bpp")(poison_rate=0.95)
    ATTACKS.get("bpp")(poison_rate=0.9, neg_ratio=0.1)
    for n in ("1", "256"):
        with pytest.raises(BenchError, match="squeeze_num"):
            build(ATTACKS.get("bpp"), {"squeeze_num": n})


# ---------------------------------------------------------------- Adaptive-Blend


def piece_regions(s: int, n: int = 4):
    edges = [i * s // n for i in range(n + 1)]
    return [(slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])) for r in range(n) for c in range(n)]


def blended(x: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * x.double() + alpha * pattern.double()


@pytest.mark.parametrize("c,s", SHAPES)
def test_adaptive_blend_half_the_pieces_at_alpha_015(c, s):
    atk, train = prepared("adaptive_blend", c, s, n=400, poison_rate=0.05, cover_rate=0.05)
    p = atk.poison(train, seed=1)
    pattern = atk.state["pattern"]
    assert len(p.poison_idx) == 20 and len(p.cover_idx) == 20
    masked_sets = set()
    for i in torch.cat([p.poison_idx, p.cover_idx]).tolist():
        masked = []
        for k, (rows, cols) in enumerate(piece_regions(s)):
            got, clean = p.data.x[i][:, rows, cols], train.x[i][:, rows, cols]
            if torch.equal(got, clean):
                masked.append(k)
                continue
            d15 = (got.double() - blended(clean, pattern[:, rows, cols], 0.15)).abs()
            d20 = (got.double() - blended(clean, pattern[:, rows, cols], 0.2)).abs()
            assert d15.max() <= 0.5 + 1e-6, "a kept piece carries the trigger at alpha 0.15"
            assert d20.mean() > 1
        assert len(masked) == 8, f"image {i}: {len(masked)} of 16 pieces masked"
        masked_sets.add(tuple(masked))
    assert len(masked_sets) > 30, "the masked pieces are drawn per image"


@pytest.mark.parametrize("c,s", SHAPES)
def test_adaptive_blend_full_trigger_at_alpha_02_for_test(c, s):
    atk, train = prepared("adaptive_blend", c, s)
    out = atk.trigger(train.x).double()
    pattern = atk.state["pattern"]
    assert (out - blended(train.x, pattern, 0.2)).abs().max() <= 0.5 + 1e-6, "every pixel at alpha 0.2"
    assert (out - blended(train.x, pattern, 0.15)).abs().mean() > 1
    ts = atk.test_set(train)
    assert torch.equal(ts.x, atk.trigger(train.x[train.y != 0]))


@pytest.mark.parametrize("image", ["photo", "cartoon"])
def test_adaptive_blend_trigger_is_the_sample_image(image):
    rgb, _ = prepared("adaptive_blend", 3, 32, image=image)
    gray, _ = prepared("adaptive_blend", 1, 32, image=image)
    p3, p1 = rgb.state["pattern"].float(), gray.state["pattern"].float()
    assert p3.shape == (3, 32, 32) and p1.shape == (1, 32, 32)
    assert (p1[0] - p3.mean(0)).abs().max() <= 1, "grayscale is the channel mean"
    assert p3.std() > 30 and (p3[0] - p3[2]).abs().mean() > 5, "a colour image, not a flat field"


def test_adaptive_blend_cartoon_on_white():
    photo, _ = prepared("adaptive_blend", 3, 32)
    cartoon, _ = prepared("adaptive_blend", 3, 32, image="cartoon")
    p, c = photo.state["pattern"], cartoon.state["pattern"]
    assert (p.float() - c.float()).abs().mean() > 30, "the option picks another image"
    # the clip-art's corners are transparent: composited on white, not black (RGBA read as floats in [0, 1])
    assert (c[:, 0, 0] == 255).all() and (c[:, 0, -1] == 255).all()
    # its box is blue: more blue than red on average
    assert c[2].float().mean() > c[0].float().mean() + 20
    with pytest.raises(BenchError, match=r"adaptive_blend\.image='kitty' is not allowed; choose one of: photo, cartoon"):
        build(ATTACKS.get("adaptive_blend"), parse_sets(["adaptive_blend.image=kitty"])["adaptive_blend"])


@pytest.mark.parametrize("label_mode", ["all2one", "all2all"])
def test_adaptive_blend_covers_and_rates(label_mode):
    atk, train = prepared("adaptive_blend", n=1000, target=3, label_mode=label_mode)
    p = atk.poison(train, seed=7)
    idx, cover = p.poison_idx, p.cover_idx
    assert len(idx) == 3 and len(cover) == 3, "0.3% poisoned and 0.3% cover images (backdoor-toolbox's defaults)"
    assert not set(idx.tolist()) & set(cover.tolist())
    want = torch.full_like(train.y[idx], 3) if label_mode == "all2one" else (train.y[idx] + 1) % K
    assert torch.equal(p.data.y[idx], want)
    if label_mode == "all2one":
        assert (train.y[idx] != 3).all() and (train.y[cover] != 3).all(), "covers are non-target images (paper)"
    assert torch.equal(p.data.y[cover], train.y[cover]), "cover images keep their true labels"
    assert (p.data.x[cover] != train.x[cover]).flatten(1).any(1).all(), "cover images carry the trigger"
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[idx], rest[cover] = False, False
    assert torch.equal(p.data.x[rest], train.x[rest]) and torch.equal(p.data.y[rest], train.y[rest])
    assert torch.equal(atk.state["cover_idx"], cover), "cover indices are kept in the state the grid stores"
    q = atk.poison(train, seed=7)
    assert torch.equal(q.cover_idx, cover) and torch.equal(q.data.x, p.data.x)
    r = atk.poison(train, seed=8)
    assert not (torch.equal(r.cover_idx, cover) and torch.equal(r.poison_idx, idx))
    many = ATTACKS.get("adaptive_blend")(poison_rate=0.1, cover_rate=0.2, label_mode=label_mode, target=3)
    many.prepare(K, 3, 32, train, 0)
    m = many.poison(train, seed=0)
    assert (len(m.poison_idx), len(m.cover_idx)) == (100, 200)


def test_adaptive_blend_pieces_checked():
    cls = ATTACKS.get("adaptive_blend")
    with pytest.raises(BenchError, match=r"adaptive_blend\.pieces=0 is out of range") as err:
        build(cls, parse_sets(["adaptive_blend.pieces=0"])["adaptive_blend"])
    assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match="perfect square"):
        cls(pieces=15)
    with pytest.raises(BenchError, match="cover_rate"):
        cls(poison_rate=0.6, cover_rate=0.5)
    with pytest.raises(BenchError, match="pieces"):
        cls(pieces=33 * 33).prepare(K, 3, 32, random_set(), 0)
    # 9 pieces on a 32x32 image: near-equal pieces, round(0.5 * 9) = 4 masked
    atk, train = prepared("adaptive_blend", pieces=9, poison_rate=0.5, cover_rate=0.0)
    p = atk.poison(train, seed=0)
    for i in p.poison_idx.tolist():
        same = [torch.equal(p.data.x[i][:, r, c], train.x[i][:, r, c]) for r, c in piece_regions(32, 3)]
        assert sum(same) == 4 == atk.masked_pieces and math.isqrt(atk.pieces) == 3
