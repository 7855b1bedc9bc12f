"""The detection track: the DETECTORS registry, its detectors, and the harness that scores them.

Tiny and fast: the contract tests run every registered detector on a briefly trained smallcnn;
the planted tests use test_nc's prototype classes (where Neural Cleanse's assumptions hold) with
a BadNets patch whose target is 3, and a clean model of the same recipe as the negative case.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import defenses.rnp as rnp_module
from attacks import ATTACKS
from bench.detect import auroc, roc_points, truth
from bench.run.plan import DetectCell
from bench.run.plan import GridSpec
from bench.run.execute import run_grid
from bench.metrics import evaluate
from bench.models import MODELS
from bench.registry import BenchError
from bench.train import TrainConfig, train
from defenses import DefenseContext
from detectors import DETECTORS, Detection, Detector
from detectors.rnp_label import histogram_facts, unlearning_speed
from bench.data import ImageSet
from bench.presets import PRESETS
from test_nc import FAST, K, NO_AUG, TARGET, prototypes

DEMO_NOISE = PRESETS["demo"].fields["synthetic"]["noise"]  # the demo preset's data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

# Settings that make each detector quick on 64 images (the defaults run for minutes on real data).
QUICK = {"rnp_label": {"unlearn_lr": 0.05}, "rnp_samples": {"unlearn_lr": 0.05}, "nc_label": {**FAST, "unlearn_epochs": 0},
         "rnp_trigger": {"epochs": 10, "batches_per_epoch": 0, "reset_cost_to_zero": False}, "strip": {"n_overlays": 8}}


def ctx(seed: int = 0) -> DefenseContext:
    return DefenseContext(num_classes=K, augmentation=NO_AUG, seed=seed, bf16=False)


def make(name: str, **kw) -> Detector:
    return DETECTORS.get(name)(**{**QUICK.get(name, {}), **kw})


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """A BadNets model (target 3, 20 % poisoned) and a clean model, same data, recipe and seed."""
    train_set = prototypes(600, seed=1)
    atk = ATTACKS.get("badnets")(target=TARGET, poison_rate=0.2)
    atk.prepare(K, 3, 32, train_set, 0)
    out = {}
    for name, data in (("backdoored", atk.poison(train_set, 0).data), ("clean", train_set)):
        m = MODELS.get("smallcnn")(width=8).build(K, 3, (0.5,) * 3, (0.29,) * 3, seed=0)
        train(m, data, TrainConfig(epochs=8, batch_size=50, lr=0.1, bf16=False), NO_AUG, seed=0)
        out[name] = m.eval()
    return out


@pytest.fixture(scope="module")
def clean_data():
    return prototypes(64, seed=3)


@pytest.fixture(scope="module")
def poisoned_inputs():
    """600 training-like images of which 30 are BadNets-poisoned (target label, patch), and the truth.

    The poisoned are a minority of their label (30 beside its 60 clean images), as Spectral
    Signatures and Activation Clustering assume: both look for the odd part of a label."""
    x = prototypes(600, seed=5)
    atk = ATTACKS.get("badnets")(target=TARGET, poison_rate=0.05)
    atk.prepare(K, 3, 32, x, 0)
    p = atk.poison(x, 1)
    truth_mask = torch.zeros(len(x), dtype=torch.bool)
    truth_mask[p.poison_idx] = True
    return p.data, truth_mask


# ---------------------------------------------------------------- the registry's contract


@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_answers_in_range_deterministically_and_leaves_the_model_alone(name, models, clean_data, poisoned_inputs,
                                                                                    monkeypatch):
    cls = DETECTORS.get(name)
    assert cls.description and cls.paper and cls.level in ("model", "sample", "input")
    model = models["backdoored"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extra = () if cls.level == "model" else (poisoned_inputs[0],)
    runs = []
    for _ in range(2):  # two independent runs: RNP's stage-1 memo emptied before each
        monkeypatch.setattr(rnp_module, "_UNLEARNED", {})
        runs.append(make(name)(model, clean_data, ctx(), *extra))
    a, b = runs
    assert isinstance(a, Detection)
    json.dumps(a.info)  # goes into the record as it is
    if cls.level == "model":
        assert a.label is None or 0 <= a.label < K
        assert isinstance(a.score, float) and a.score == a.score  # a number, not NaN
        assert (a.label, a.score) == (b.label, b.score), "same seed, same answer"
    else:
        assert a.scores.shape == (len(poisoned_inputs[0]),) and torch.isfinite(a.scores).all()
        assert torch.equal(a.scores, b.scores), "same seed, same answer"
        with pytest.raises(BenchError, match="needs"):
            make(name)(model, clean_data, ctx())  # without inputs: one clear line
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the model passed in is untouched"


def test_rnp_samples_ranks_the_planted_poison_above_clean_images(models, clean_data, poisoned_inputs):
    """Measured: AUROC 1.0 here, where Spectral Signatures gave 0.62 and AC 0.73 on this tiny model's features."""
    x, truth_mask = poisoned_inputs
    scores = make("rnp_samples")(models["backdoored"], clean_data, ctx(), x).scores
    assert auroc(scores[truth_mask].tolist(), scores[~truth_mask].tolist()) > 0.95


def _pixels_are_features() -> nn.Module:
    """A 'model' whose feature vector (the last Linear's input) is the image itself, flattened."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, K)).eval()


def _patched_label() -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(120, 3, 32, 32, generator=gen) * 60).to(torch.uint8)
    y = torch.tensor([TARGET] * 90 + [1] * 30)
    x[:30, :, -6:, -6:] = 255  # 30 of label 3's 90 images carry a bright patch
    return ImageSet(x, y)


@pytest.mark.parametrize("name", ["spectral", "ac"])
def test_spectral_and_ac_score_a_minority_cluster_of_a_label_first(name, clean_data):
    det = make(name)(_pixels_are_features(), clean_data, ctx(), _patched_label())
    scores = det.scores
    if name == "ac":  # ART's relative-size rule: the patch cluster is 1/3 of label 3 (< 0.35); label 1 may add its own
        assert det.info["flagged"] >= 30
    assert set(torch.topk(scores[:90], 30).indices.tolist()) == set(range(30))


def test_ac_reduces_by_fastica_when_asked(clean_data):
    """ART's other reduction: a different projection (unit-variance independent components), repeatable."""
    inputs = _patched_label()
    pca, ica, again = (make("ac", **kw)(_pixels_are_features(), clean_data, ctx(), inputs).scores
                       for kw in ({}, {"reduce": "FastICA"}, {"reduce": "FastICA"}))
    assert torch.isfinite(ica).all() and torch.equal(ica, again)
    assert not torch.allclose(ica, pca)


def test_strip_scores_an_input_whose_trigger_fixes_the_prediction_above_clean_inputs(clean_data):
    class Gate(nn.Module):
        """Sure of TARGET when the bottom-right pixel is saturated; else unsure (a superimposed image
        blends two contents, which is why STRIP's entropy is high on clean inputs)."""

        def forward(self, x):
            hit = x[:, :, -1, -1].mean(1) > 0.999
            other = torch.nn.functional.one_hot((x.mean((1, 2, 3)) * 97).long() % K, K).float() * 2
            return torch.where(hit[:, None], torch.nn.functional.one_hot(torch.tensor(TARGET), K).float() * 20, other)

    gen = torch.Generator().manual_seed(1)
    dark = (torch.rand(40, 3, 32, 32, generator=gen) * 100).to(torch.uint8)
    triggered = dark.clone()
    triggered[:, :, -1, -1] = 255  # survives the saturating superimposition
    overlays = ImageSet((torch.rand(64, 3, 32, 32, generator=gen) * 100).to(torch.uint8), torch.zeros(64, dtype=torch.long))
    s = DETECTORS.get("strip")(n_overlays=16)
    det = s(Gate(), overlays, ctx(), ImageSet(torch.cat([dark, triggered]), torch.zeros(80, dtype=torch.long)))
    assert det.scores[40:].min() > det.scores[:40].max()  # -entropy: 0 bits for every triggered input
    assert det.info["flagged"] == 40


@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_is_listed_with_fields_and_takes_settings(name):
    from bench.config import describe

    assert describe(DETECTORS.get(name)), "bench list detectors --fields has something to print"
    with pytest.raises(BenchError, match="nosuch"):
        GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", detectors=[name],
                 overrides={name: {"nosuch": "1"}}).plan()


def test_registry_refuses_duplicates_and_lists_names_on_a_miss():
    with pytest.raises(BenchError, match="already registered"):
        DETECTORS.register("rnp_label")(type("X", (), {}))
    with pytest.raises(BenchError, match="known: ac, nc_label, rnp_label, rnp_samples, rnp_trigger, spectral, strip"):
        DETECTORS.get("nosuch")


# ---------------------------------------------------------------- on a planted backdoor


def test_rnp_label_finds_the_target_and_scores_the_backdoored_model_above_the_clean_one(models, clean_data):
    det = make("rnp_label")
    bd = det(models["backdoored"], clean_data, ctx())
    cl = det(models["clean"], clean_data, ctx())
    assert bd.label == TARGET
    # Measured here: the backdoored model falls to 0.2 accuracy within 10 steps, 61 of 64 images
    # then go to the target; the clean one is still accurate after the 20 steps allowed (its
    # histogram stays near uniform, 0.11), and forced on to 40 steps it spreads over 3 labels (0.59).
    assert bd.info["unlearn_reached"] and bd.info["unlearn_steps"] < cl.info["unlearn_steps"]
    # the default score is the unlearning speed: 1 - steps/budget when the threshold is reached, else 0
    budget = det.unlearn_epochs * max(1, round(len(clean_data) * (1 - det.holdout) / det.batch_size))
    assert bd.info["unlearn_budget"] == cl.info["unlearn_budget"] == budget
    assert bd.score == pytest.approx(1 - bd.info["unlearn_steps"] / budget) and bd.score >= 0.5  # 10 of 20 steps
    assert cl.score == (0.0 if not cl.info["unlearn_reached"] else pytest.approx(1 - cl.info["unlearn_steps"] / budget))
    assert bd.score > cl.score
    hist = bd.info["predictions"][-1]
    assert sum(hist) == len(clean_data) and hist[TARGET] == max(hist)
    # the alternative score: the detected label's share of the last histogram
    share = make("rnp_label", backdoor_score="share")(models["backdoored"], clean_data, ctx())
    assert share.label == TARGET and share.score == pytest.approx(hist[TARGET] / len(clean_data)) and share.score > 0.8


def test_unlearning_speed():
    assert unlearning_speed(15, 60, True) == 0.75
    assert unlearning_speed(60, 60, True) == 0.0
    assert unlearning_speed(10, 60, False) == 0.0  # never reached the threshold: the slowest
    with pytest.raises(BenchError, match="backdoor_score"):
        make("rnp_label", backdoor_score="nosuch")


def test_nc_label_names_the_smallest_trigger_and_its_anomaly_index(models, clean_data):
    det = make("nc_label")
    bd = det(models["backdoored"], clean_data, ctx())
    norms = torch.tensor(bd.info["norms"])
    assert bd.label == int(norms.argmin()) == TARGET and bd.info["flagged"]
    assert bd.score > 2  # the official outlier rule calls it backdoored
    assert set(bd.tensors) >= {"masks", "patterns", "norms"}


def test_rnp_trigger_recovers_a_working_trigger_for_the_detected_label(models, clean_data, monkeypatch):
    """The detected label is the target; the answer (the unlearned model's trigger, refined on the
    backdoored model) and the baseline (the backdoored model alone, same total budget) work on unseen
    images. Neither mask need sit on the corner here (test_nc says why). The refinement starts from the
    unlearned model's trigger, and ``refine=false`` answers with that trigger itself."""
    import defenses.trigger
    from bench.detect import trigger_scores
    from detectors import rnp_trigger

    calls = []
    real = defenses.trigger.reverse_triggers

    def spy(model, data, labels, search, **kw):
        calls.append((search.epochs, kw.get("init")))
        return real(model, data, labels, search, **kw)

    monkeypatch.setattr(rnp_trigger, "reverse_triggers", spy)
    det = make("rnp_trigger", unlearn_lr=0.05, **FAST)(models["backdoored"], clean_data, ctx())
    assert det.label == TARGET
    test = prototypes(200, seed=2)
    atk = ATTACKS.get("badnets")(target=TARGET)
    atk.prepare(K, 3, 32, test, 0)
    for prefix in ("", "baseline_"):
        got = trigger_scores(models["backdoored"], atk, test, det.tensors[f"{prefix}mask"], det.tensors[f"{prefix}pattern"],
                             TARGET, device="cpu", bf16=False)
        assert got["trigger_asr"] > 0.9, prefix
    e = FAST["epochs"]
    assert [c[0] for c in calls] == [e, e, 2 * e], "unlearned, refined, baseline (twice the budget: the same total)"
    assert calls[0][1] is None and calls[2][1] is None
    assert torch.equal(calls[1][1][0][0], det.tensors["unlearned_mask"]), "the refinement starts from the unlearned model's trigger"
    assert det.info["unlearned_norm"] > 0 and det.info["norm"] > 0

    calls.clear()
    literal = make("rnp_trigger", unlearn_lr=0.05, refine=False, **FAST)(models["backdoored"], clean_data, ctx())
    assert [c[0] for c in calls] == [e, e] and "unlearned_mask" not in literal.tensors
    torch.testing.assert_close(literal.tensors["mask"], det.tensors["unlearned_mask"])


def test_the_rnp_defense_reports_the_same_unlearned_label(models, clean_data):
    """rnp_label reuses the defense's own unlearning: same settings, same histogram."""
    from defenses.rnp import RNP

    info = RNP(unlearn_lr=0.05, recover_epochs=1)(copy.deepcopy(models["backdoored"]), clean_data, ctx()).info
    det = make("rnp_label")(models["backdoored"], clean_data, ctx())
    assert info["unlearn_predictions"] == det.info["predictions"] and info["unlearn_label"] == det.label


def test_stage1_is_shared_within_a_process_and_equals_a_fresh_one(models, clean_data, monkeypatch):
    """RNP.unlearned remembers its last results: the same model, data, seed and unlearning fields give
    the very model, facts and generator position a fresh unlearning gives, without unlearning again;
    anything stage 1 depends on (a weight, the seed, an unlearning field, the thread count) unlearns anew, and a field of
    the later stages (recover_lr) does not."""
    from defenses import rnp as rnp_mod
    from defenses.rnp import RNP

    calls = []
    real = RNP.unlearn
    monkeypatch.setattr(RNP, "unlearn", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(rnp_mod, "_UNLEARNED", {})
    model = copy.deepcopy(models["backdoored"])
    a = RNP(unlearn_lr=0.05)
    w1, f1, _, _, g1 = a.unlearned(model, clean_data, ctx())
    head = lambda m: [x for x in m.modules() if isinstance(x, nn.Linear)][-1]  # noqa: E731
    head(w1).weight.data.zero_()  # the caller owns what it got: later hits must not see this
    w2, f2, _, _, g2 = a.unlearned(model, clean_data, ctx())
    assert len(calls) == 1 and f1 == f2 and torch.equal(g1.get_state(), g2.get_state())
    monkeypatch.setattr(rnp_mod, "_UNLEARNED", {})
    w3, f3, _, _, g3 = a.unlearned(model, clean_data, ctx())  # fresh, memo emptied
    assert len(calls) == 2 and f3 == f2 and torch.equal(g3.get_state(), g2.get_state())
    assert all(torch.equal(x, y) for x, y in zip(w2.state_dict().values(), w3.state_dict().values()))
    assert not torch.equal(head(w2).weight, head(w1).weight)
    RNP(unlearn_lr=0.05, recover_lr=0.1).unlearned(model, clean_data, ctx())
    assert len(calls) == 2
    for again in (lambda: RNP(unlearn_lr=0.05).unlearned(model, clean_data, ctx(seed=1)),
                  lambda: RNP(unlearn_lr=0.05, clean_threshold=0.3).unlearned(model, clean_data, ctx())):
        again()
    with torch.no_grad():
        head(model).bias[0] += 1.0
    a.unlearned(model, clean_data, ctx())
    assert len(calls) == 5
    threads = torch.get_num_threads()  # CPU results depend on the thread count: another count unlearns anew
    torch.set_num_threads(threads + 1)
    try:
        a.unlearned(model, clean_data, ctx())
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 6


def test_trigger_scores_measure_a_recovered_trigger_against_the_true_patch(models):
    """The harness's scoring of a recovered trigger: the true BadNets patch as (mask, pattern) gives
    IoU 1 and the model's ASR; an empty mask gives IoU 0 and the clean predictions."""
    from bench.detect import trigger_scores, true_region

    test = prototypes(200, seed=2)
    atk = ATTACKS.get("badnets")(target=TARGET)
    atk.prepare(K, 3, 32, test, 0)
    region = true_region(atk, test)
    assert int(region.sum()) == 9 and region[-3:, -3:].all()  # the 3x3 bottom-right grid
    pattern = atk.trigger(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[0].float() / 255
    good = trigger_scores(models["backdoored"], atk, test, region[None].float(), pattern, TARGET, device="cpu", bf16=False)
    assert good["iou"] == 1.0 and good["trigger_asr"] > 0.9
    empty = torch.zeros(1, 32, 32)
    empty[0, :3, :3] = 1.0  # the wrong corner, with the same pattern values there
    bad = trigger_scores(models["backdoored"], atk, test, empty, pattern, TARGET, device="cpu", bf16=False)
    assert bad["iou"] == 0.0 and bad["trigger_asr"] < 0.2


def test_histogram_facts():
    f = histogram_facts([0, 6, 2, 0])
    assert f["label"] == 1 and f["top_share"] == 0.75
    assert histogram_facts([5, 5, 5, 5])["entropy"] == pytest.approx(1.0)
    assert histogram_facts([0, 9, 0, 0])["entropy"] == 0.0


def test_auroc_and_roc_points():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.9], [0.5]) == 0.75  # a tie counts half
    assert auroc([0.5], []) is None
    fpr, tpr = roc_points([0.9, 0.8], [0.85])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert tpr[1] == 0.5 and fpr[1] == 0.0  # the top score is a backdoored model


def _pairwise_auroc(pos, neg):
    """The definition (bench.detect's hand-written version before scikit-learn): the mean over every
    (positive, negative) pair of 1 if the positive scores higher, 1/2 on a tie."""
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def _threshold_roc(pos, neg):
    """The definition of the ROC points: (0, 0), then for every distinct score t, high to low, the shares of
    negatives and positives scoring at least t."""
    fpr, tpr = [0.0], [0.0]
    for t in sorted({*pos, *neg}, reverse=True):
        fpr.append(sum(s >= t for s in neg) / len(neg))
        tpr.append(sum(s >= t for s in pos) / len(pos))
    return fpr, tpr


@pytest.mark.parametrize("seed", range(5))
def test_auroc_and_roc_points_match_their_definitions_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 8, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).double() / 2
    neg = torch.randint(0, 6, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).double() / 2
    pos, neg = pos.tolist(), neg.tolist()  # few distinct values: many ties, within and across the sides
    assert auroc(pos, neg) == pytest.approx(_pairwise_auroc(pos, neg), abs=1e-12)
    fpr, tpr = roc_points(pos, neg)
    want_fpr, want_tpr = _threshold_roc(pos, neg)
    assert fpr == pytest.approx(want_fpr, abs=1e-12) and tpr == pytest.approx(want_tpr, abs=1e-12)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)


def test_auroc_and_roc_points_rank_infinite_scores_and_refuse_nan():
    pos, neg = [math.inf, 2.0, -math.inf], [2.0, -math.inf, 1.0]
    assert auroc(pos, neg) == pytest.approx(_pairwise_auroc(pos, neg))
    assert roc_points(pos, neg) == _threshold_roc(pos, neg)
    with pytest.raises(ValueError, match="NaN"):
        auroc([math.nan], [1.0])
    assert roc_points([], [1.0]) is None and auroc([1.0], []) is None


def test_auroc_needs_no_pairwise_matrix():
    """40,000 positives x 4,000 negatives (GTSRB's sample level is 39,209 x 3,921): a pairwise matrix of float64
    would take 1.28 GB. The child process's peak resident memory may grow by a tenth of that at most."""
    code = (
        "import resource, torch\n"
        "from bench.detect import auroc, roc_points\n"
        "auroc([0.0], [1.0]); roc_points([0.0], [1.0])  # libraries imported before the baseline\n"
        "g = torch.Generator().manual_seed(0)\n"
        "pos = (torch.randn(40_000, generator=g) + 1).round(decimals=2).tolist()\n"
        "neg = torch.randn(4_000, generator=g).round(decimals=2).tolist()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "a = auroc(pos, neg); fpr, tpr = roc_points(pos, neg)\n"
        "print(a, len(fpr), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    area, points, grown = float(out[0]), int(out[1]), int(out[2])
    assert 0.7 < area < 0.8  # Phi(1 / sqrt(2)) = 0.76, a real computation on the whole data
    assert points > 100
    assert grown < 40_000 * 4_000 * 8 / 10


def test_truth_is_defined_only_where_it_exists():
    assert truth(ATTACKS.get("badnets")(target=4)) == {"backdoored": True, "target": 4}
    assert truth(ATTACKS.get("badnets")(label_mode="all2all")) == {"backdoored": True, "target": None}
    assert truth(ATTACKS.get("clean")()) == {"backdoored": False, "target": None}


# ---------------------------------------------------------------- the harness

TINY = {"synthetic": {"n_train": "300", "n_test": "100"}, "smallcnn": {"width": "4"}, "train": {"epochs": "1", "batch_size": "64"},
        "run": {"defense_data": "40"}}
SEEN: list = []


@dataclasses.dataclass(frozen=True)
class SpyDetector(Detector):
    name = "spy_detector"
    description = "test-only: records what a detector receives, names label 1"
    paper = "-"

    def __call__(self, *args, **kwargs):
        SEEN.append((args, kwargs))
        model, clean, c = args
        return Detection(label=1, score=float(len(SEEN)), info={"n": len(clean)})


def grid(tmp_path, detectors, attacks=("clean", "badnets"), **kw):
    spec = GridSpec(attacks=list(attacks), defenses=["none"], preset="demo", overrides={**TINY, "badnets": {"target": "1"}},
                    detectors=[])
    cells, _ = spec.plan()
    det = [DetectCell(c.job, d, c.run) for c in cells for d in detectors]
    return cells, det


def test_the_harness_hands_a_detector_nothing_about_the_attack_and_scores_with_the_truth(tmp_path):
    """Fails if a detector is handed the target, the poison indices, the trigger or test data."""
    from bench.data import DATASETS
    from bench.run.cells import load_model

    SEEN.clear()
    cells, det = grid(tmp_path, [SpyDetector()])
    recs = run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda s: None, detect=det)
    assert all(r["status"] == "ok" for r in recs) and len(SEEN) == 2
    train_set, test_set = DATASETS.get("synthetic")(n_train=300, n_test=100, noise=DEMO_NOISE).load()
    for (args, kwargs), cell in zip(SEEN, [c for c in cells if c.job.attack.name in ("clean", "badnets")]):
        assert not kwargs and len(args) == 3
        model, clean, c = args
        assert isinstance(model, nn.Module) and isinstance(c, DefenseContext)
        assert set(vars(c)) == {"num_classes", "augmentation", "seed", "device", "bf16", "progress"}
        assert len(clean) == 40
    model, _, poison_idx, triggered = load_model(cells[1].job, "cpu")
    bd_asr = evaluate(model, test_set, triggered, bf16=cells[1].job.train.bf16)["asr"]  # the model's ASR, for the record
    assert len(poison_idx) > 0
    rows = lambda t: {bytes(r.numpy().tobytes()) for r in t.flatten(1)}  # noqa: E731
    seen_bd = rows(SEEN[1][0][1].x)
    clean_train = torch.ones(len(train_set), dtype=torch.bool)
    clean_train[poison_idx] = False
    assert seen_bd <= rows(train_set.x[clean_train]) and not seen_bd & rows(triggered.x)
    # Scored against the truth afterwards: the spy names label 1, the BadNets target here is 1.
    dets = [json.loads(line) for line in (tmp_path / "run" / "detections.jsonl").read_text().splitlines()]
    by_attack = {d["attack"]: d for d in dets}
    assert by_attack["badnets"]["truth"] == {"backdoored": True, "target": 1, "asr": pytest.approx(bd_asr)}
    assert by_attack["badnets"]["detection"]["label_correct"] is True
    assert by_attack["clean"]["truth"] == {"backdoored": False, "target": None, "asr": None}
    assert by_attack["clean"]["detection"]["label_correct"] is None


def test_detection_resumes_and_is_added_to_a_run_made_without_it(tmp_path):
    SEEN.clear()
    cells, det = grid(tmp_path, [SpyDetector()])
    out = tmp_path / "run"
    run_grid(cells, out, preset="demo", progress=False, log=lambda s: None)  # removal only
    assert not SEEN and not (out / "detections.jsonl").exists()
    logs: list[str] = []
    run_grid(cells, out, preset="demo", progress=False, log=logs.append, detect=det)
    assert len(SEEN) == 2 and any("2 of 2 cells already finished" in m for m in logs), "only the missing part ran"
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    none_recs = {r["attack"]: r for r in recs if r["defense"] == "none"}
    assert none_recs["badnets"]["detection"]["spy_detector"]["label_correct"] is True
    assert none_recs["clean"]["detection"]["spy_detector"]["label_correct"] is None
    run_grid(cells, out, preset="demo", progress=False, log=lambda s: None, detect=det)
    assert len(SEEN) == 2, "a finished detection cell is not run again"


def test_the_report_writes_the_detection_table_and_roc(tmp_path):
    from bench.report import write_reports

    cells, det = grid(tmp_path, [SpyDetector()])
    out = tmp_path / "run"
    run_grid(cells, out, preset="demo", progress=False, log=lambda s: None, detect=det)
    paths = write_reports(out)
    assert {"detection.md", "detection.csv", "detection.tex", "roc.png"} <= set(paths)
    md = paths["detection.md"].read_text()
    assert "| spy_detector | 100.0 (1/1) |" in md  # label right on the one backdoored model
    rows = paths["detection.csv"].read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("dataset,model,attack,detector")
    (out / "detections.jsonl").unlink()
    assert "detection.md" not in write_reports(out) and not (out / "report" / "detection.md").exists()


@dataclasses.dataclass(frozen=True)
class SpySamples(Detector):
    name = "spy_samples"
    description = "test-only: a sample-level detector that scores each input by its index"
    paper = "-"
    level = "sample"

    def __call__(self, model, clean, c, inputs=None):
        SEEN.append(inputs)
        return Detection(scores=torch.arange(len(inputs), dtype=torch.float32), info={})


@dataclasses.dataclass(frozen=True)
class SpyLabels(Detector):
    name = "spy_labels"
    description = "test-only: an input-level detector that scores each input by whether its label is the target (1)"
    paper = "-"
    level = "input"

    def __call__(self, model, clean, c, inputs=None):
        SEEN.append(inputs)
        return Detection(scores=(inputs.y == 1).float(), info={})


def test_sample_level_cells_score_the_rebuilt_training_set_a_test_mix_or_are_not_applicable(tmp_path):
    from bench.data import DATASETS, UNLABELLED
    from bench.detect import NOT_APPLICABLE

    SEEN.clear()
    cells, det = grid(tmp_path, [SpySamples(), SpyLabels()], attacks=("clean", "badnets", "wanet"))
    run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=lambda s: None, detect=det)
    dets = {(d["attack"], d["detector"]): d
            for d in map(json.loads, (tmp_path / "run" / "detections.jsonl").read_text().splitlines())}
    assert dets["clean", "spy_samples"]["status"] == NOT_APPLICABLE and "clean model" in dets["clean", "spy_samples"]["info"]["reason"]
    bd, wa = dets["badnets", "spy_samples"], dets["wanet", "spy_samples"]
    assert bd["status"] == wa["status"] == "ok"
    train_set, _ = DATASETS.get("synthetic")(n_train=300, n_test=100).load()
    assert bd["detection"]["source"] == "training set" and bd["detection"]["inputs"] == len(train_set)
    assert bd["detection"]["labelled"] is True and wa["detection"]["labelled"] is False
    assert wa["detection"]["source"] == "test-time mix" and wa["detection"]["poisoned"] == wa["detection"]["inputs"] // 2
    # Neither the position of an input in the mix nor its label gives the truth away: a scorer by
    # index, and one by "label == target", stay at chance (the mix of the old harness, clean first,
    # triggered images labelled with the target, gave both an AUROC of 1.0).
    assert abs(wa["detection"]["auroc"] - 0.5) < 0.2
    for attack in ("badnets", "wanet"):
        assert dets[attack, "spy_labels"]["detection"]["auroc"] == 0.5
    assert len(SEEN) == 4  # not called where nothing is to be found
    # The training-set inputs are the poisoned set as trained: labels of poisoned images are the target.
    sample_inputs = [x for x in SEEN if len(x) == len(train_set)]
    assert len(sample_inputs) == 1 and int((sample_inputs[0].y == 1).sum()) > int((train_set.y == 1).sum())
    assert all(bool((x.y == UNLABELLED).all()) for x in SEEN if len(x) != len(train_set)), "the mix carries no labels"
    logs: list[str] = []
    run_grid(cells, tmp_path / "run", preset="demo", progress=False, log=logs.append, detect=det)
    assert any("6 of 6 detection cells already finished" in m for m in logs), "a 'not applicable' cell counts as done"


def test_the_test_time_mix_is_shuffled_unlabelled_and_holds_clean_target_class_images():
    """The mix a detector scores: order and labels say nothing; the clean part has every class."""
    from bench.data import DATASETS
    from bench.detect import MIX_IMAGES, auroc, test_time_mix

    _, test = DATASETS.get("synthetic")(n_train=10, n_test=2000).load()
    atk = ATTACKS.get("badnets")(target=1)
    atk.prepare(10, 3, 32, test, 0)
    mix, truth_mask = test_time_mix(atk, test, atk.test_set(test), seed=3)
    assert len(mix) == 2 * MIX_IMAGES and int(truth_mask.sum()) == MIX_IMAGES and not mix.labelled
    pos = torch.arange(len(mix), dtype=torch.float64)
    assert abs(auroc(pos[truth_mask].tolist(), pos[~truth_mask].tolist()) - 0.5) < 0.06  # order: chance
    # The clean inputs are test images of every class, the target's included, each at most once.
    rows = {bytes(r.numpy().tobytes()): int(l) for r, l in zip(test.x.flatten(1), test.y)}
    clean_labels = [rows[bytes(r.numpy().tobytes())] for r in mix.x[~truth_mask].flatten(1)]
    assert set(clean_labels) == set(range(10)) and clean_labels.count(1) > 20
    assert len({bytes(r.numpy().tobytes()) for r in mix.x.flatten(1)}) == len(mix)
    # The triggered inputs carry the trigger (BadNets' corner patch), the clean ones do not.
    triggered_rows = {bytes(r.numpy().tobytes()) for r in atk.test_set(test).x.flatten(1)}
    assert all(bytes(r.numpy().tobytes()) in triggered_rows for r in mix.x[truth_mask].flatten(1))
    # Seeded: the same seed gives the same mix, another seed another order.
    again, t2 = test_time_mix(atk, test, atk.test_set(test), seed=3)
    assert torch.equal(again.x, mix.x) and torch.equal(t2, truth_mask)
    assert not torch.equal(test_time_mix(atk, test, atk.test_set(test), seed=4)[1], truth_mask)


def test_sample_level_detectors_group_unlabelled_inputs_by_the_models_prediction(models):
    """On the unlabelled mix, Spectral Signatures groups by predicted label: the same scores as when
    the inputs carry the model's predictions as labels (and not those of the all-UNLABELLED group)."""
    from bench.train import predict

    x = prototypes(200, seed=9).x
    pred = predict(models["backdoored"], x, bf16=False)
    det = make("spectral")
    by_pred = det(models["backdoored"], prototypes(8, seed=2), ctx(), ImageSet(x, pred)).scores
    unlabelled = det(models["backdoored"], prototypes(8, seed=2), ctx(), ImageSet.unlabelled(x)).scores
    assert torch.allclose(by_pred, unlabelled)
    assert not torch.allclose(unlabelled, det(models["backdoored"], prototypes(8, seed=2), ctx(),
                                              ImageSet(x, torch.zeros_like(pred))).scores)


def test_tpr_at_fpr_and_precision_at_k():
    from bench.detect import precision_at_k, tpr_at_fpr

    neg = [float(i) for i in range(100)]  # 0..99
    assert tpr_at_fpr([97.5, 50.0], neg, 0.05) == 0.5  # the threshold lets 5 negatives (95..99) through
    assert tpr_at_fpr([200.0], neg, 0.0) == 1.0
    assert precision_at_k(torch.tensor([0.9, 0.1, 0.8, 0.2]), torch.tensor([True, False, False, True])) == 0.5


def test_cli_detect_refuses_unknown_names_on_one_line(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    res = CliRunner().invoke(main, ["run", "--attack", "badnets", "--preset", "demo", "--detect", "nosuch",
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and "nosuch" in line and "rnp_label" in line and "nc_label" in line
    assert not (tmp_path / "r").exists()


def test_detectors_take_the_defense_settings_first(tmp_path):
    spec = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", detectors=["rnp_label"],
                    overrides={"rnp": {"unlearn_lr": "0.03"}})
    _, det = spec.plan()
    d = det[0].detector
    from defenses.rnp import RNP

    assert d.clean_threshold == PRESETS["demo"].fields["rnp"]["clean_threshold"] != RNP().clean_threshold, "the demo preset's rnp fields"
    assert d.select == "auto"
    assert d.unlearn_lr == 0.03, "--set rnp.* reaches the detector"
    spec.overrides["rnp_label"] = {"unlearn_lr": "0.07"}
    assert spec.plan()[1][0].detector.unlearn_lr == 0.07, "its own --set wins"


def test_a_preset_sets_detector_and_run_fields_and_set_overrides_them():
    """The demo preset's STRIP uses 10 overlays and its sweep 200 images; --set gives the defaults back."""
    spec = GridSpec(attacks=["badnets"], defenses=["none"], preset="demo", detectors=["strip"])
    cells, det = spec.plan()
    assert det[0].detector.n_overlays == 10 and cells[0].run.sweep_images == 200 and cells[0].run.defense_data == 1000
    assert GridSpec(attacks=["badnets"], defenses=["none"], preset="quick").plan().defense_cells[0].run.sweep_images == 2000
    spec.overrides["run"] = {"sweep_images": "0"}
    assert spec.plan()[0][0].run.sweep_images == 0
    assert GridSpec(attacks=["badnets"], defenses=["none"], preset="quick", detectors=["strip"]).plan()[1][0].detector.n_overlays == 100
    spec.overrides["strip"] = {"n_overlays": "100"}
    assert spec.plan()[1][0].detector.n_overlays == 100


def test_the_trigger_table_and_csv_carry_all_three_triggers():
    """The report's trigger-recovery rows: the answer, the unlearned model's trigger and the baseline,
    each as the record has it (means over seeds); a record without the unlearned stage shows "-"."""
    from bench.report.detection import detection_csv, detection_markdown

    def rec(attack, seed, **det):
        return {"dataset": "d", "model": "m", "attack": attack, "detector": "rnp_trigger", "level": "model", "seed": seed,
                "status": "ok", "truth": {"backdoored": True, "target": 0, "asr": 1.0}, "seconds": {"detect": 1.0},
                "detection": {"label": 0, "label_correct": True, "score": 0.5, **det}}

    dets = [rec("badnets", 0, trigger_asr=0.99, iou=0.6, unlearned_trigger_asr=0.8, unlearned_iou=0.2,
                baseline_trigger_asr=0.97, baseline_iou=0.4),
            rec("badnets", 1, trigger_asr=0.95, iou=0.4, unlearned_trigger_asr=0.6, unlearned_iou=0.0,
                baseline_trigger_asr=0.99, baseline_iou=0.2),
            rec("blend", 0, trigger_asr=0.5, baseline_trigger_asr=0.9)]
    md = detection_markdown(dets)
    assert "| rnp_trigger | badnets | 97.0 | 0.50 | 70.0 | 0.10 | 98.0 | 0.30 |" in md
    assert "| rnp_trigger | blend | 50.0 | - | - | - | 90.0 | - |" in md
    rows = list(csv.DictReader(io.StringIO(detection_csv(dets))))
    assert rows[0]["unlearned_trigger_asr"] == "0.8" and rows[2]["unlearned_iou"] == "" and rows[2]["baseline_trigger_asr"] == "0.9"
