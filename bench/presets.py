"""Presets: dataset, model, training recipe and defense-data size for a whole grid.

``--set component.field=value`` overrides any of these afterwards; the evidence
behind each choice is written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.train import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str
    model: str
    train: TrainConfig
    defense_data: float  # a fraction of the training set if < 1, else a count of images
    # Preset-level field values per component, e.g. {"synthetic": {"n_train": 5000}, "resnet18": {"width": 16}}.
    fields: dict[str, dict] = field(default_factory=dict)
    # `bench run`'s default --jobs for this preset: a count, or "auto" (one worker process per CPU
    # core, one torch thread each; 1 on CUDA).
    jobs: int | str = 1


# Attack strength on the demo's synthetic set. Ten easy shape classes, 500 images each, 10 epochs:
# a trigger that competes with the shape for the target label needs more there than on real data.
# Backdoored CA / ASR in %, seed 0, smallcnn width 16 (`bench run --attack X --defense none --preset
# demo --set ...`, 2026-11-22, 2-core EPYC with native bf16, bf16 on, 1-2 threads; ASRs near 80 % move by
# up to ~15 points with the thread count and dtype, see the README):
#   sig at its defaults (0.1 = all 500 target images, delta 40):  90.0 / 65.0 (clean disks lost)
#       delta 60: 90.0 / 74.1;  rate 0.05, delta 60: 99.9 / 41.4;  rate 0.08, delta 80: 100 / 68.7
#       rate 0.09, delta 100:                                       99.8 / 82.1
#       2026-12-02, seeds 0 / 1 / 2 (2 threads): delta 100: 99.8 / 82.1, 100 / 95.6, 99.9 / 96.9;
#       delta 120 (this preset): 100 / 88.7, 99.9 / 97.6, 99.6 / 99.4 (fp32, instruction set limited to
#       AVX2, seed 0: delta 100 78.7, delta 120 81.3)
#   wanet at its defaults (s 0.5), seeds 0 / 1 / 2 (2026-12-02, 2 threads): 99.9 / 81.3, 100 / 66.3, 100 / 83.6
#       s 1.0 (this preset): 100 / 89.1, 100 / 81.2, 100 / 86.0;  s 1.5: 100 / 87.8, 100 / 68.6, 100 / 87.6
#       (fp32 under AVX2, seed 0: s 0.5 74.0, s 1.0 88.4)
#   lf at its defaults (amplitude 0.2), seeds 0 / 1 / 2: 99.3 / 81.9, 99.3 / 91.2, 99.6 / 79.4 (kept);
#       amplitude 0.3: 97.7 / 84.1, 97.0 / 85.9, 98.1 / 82.3 (CA 2 points lower)
#   bpp at its defaults (8 levels, 10 % of each batch):            99.9 / 22.6 (27.0 in another run)
#       20 %: 99.9 / 48.1;  official code's 20 % + 20 % negatives: 100 / 39.2;  30 %: 99.8 / 70.0
#       4 levels: 100 / 49.4;  4 levels and 20 % (this preset):     100 / 88.3
#   adaptive_blend at its defaults (0.3 % + 0.3 % = 15 + 15 images): 100 / 1.4
#       3 % + 3 % (150 images, the count the paper's 0.3 % gives on 50,000): 100 / 51.8
#       5 % + 5 %: 99.8 / 51.8;  5 % + 2 %: 99.9 / 64.0;  10 % + 5 %: 100 / 67.9
#   2026-12-02 (2 threads, seeds 0 / 1 / 2), stronger blending, training alpha / test alpha:
#       3 % + 3 % at the paper's 0.15 / 0.2: 99.8 / 52.9, 100 / 18.1, 99.9 / 52.2;  0.15 / 0.3: seed 0 65.8
#       0.2 / 0.3: 68.9;  0.25 / 0.3: 66.8;  0.3 / 0.4: 87.1, 83.9, 80.0;  0.35 / 0.45: 91.3, 87.2, 89.8
#       5 % + 3 % at 0.3 / 0.4 (this preset): 100 / 95.3, 100 / 99.4, 99.9 / 93.1
#   iad at its defaults (10 % of each batch backdoored, 10 % cross):  100 / 35.7; 5 mask epochs: 100 / 40.7
#       (and 131 s instead of 35 s); with gen_width 16: 100 / 23.2
#       30 % of each batch (as the quick preset; 2026-12-02, 2-core EPYC): bf16 98.9 / 83.2, fp32
#       (instruction set limited to AVX2) 100 / 96.6
#   Since IAD's generators run under the trainer's bf16 autocast and channels_last (attacks/iad.py, 2.3x
#   faster), seeds 0 / 1 / 2 (2026-12-02, bf16, 1-2 threads):
#       30 %: 99.8 / 62.3, 99.4 / 81.1, 99.6 / 94.3 (the generators in fp32 channels_last: 98.4 / 84.1,
#       100 / 87.1, 99.4 / 65.6: the same spread);  40 % (this preset): 96.0 / 92.6, 99.2 / 84.6, 99.5 / 98.2
#       (seed 0 with 2 threads, the README's first command: 97.8 / 69.9)
#       gen_width 16 at 30 %: seed 0 98.9 / 79.8
#       gen_width 16 at 40 % (this preset; 2026-12-02, bf16, 2 threads, seeds 1-2 beside other jobs): 99.9 / 98.1,
#       99.2 / 95.0, 98.5 / 90.7, and the model trains in 28 s instead of 52 s (idle, seed 0)
#   ctrl at its defaults (5 %, magnitude 100): 100 / 0.0; rate 0.1: 100 / 0.0; magnitude 300: 100 / 34.9
#       (rate 0.1: 90.0 / 63.9); rate 0.09 with magnitude 400 / 600: 100 / 50.3, 99.9 / 66.8
#       rate 0.09 (450 of the 500 target images) with magnitude 1000 (this preset; 2026-12-02, 2 threads,
#       seeds 0 / 1 / 2): 100 / 85.3, 99.8 / 85.2, 99.8 / 87.8;  magnitude 1500: 99.8 / 93.6, 100 / 84.7, 99.9 / 87.8.
#       Ten times the official bump: each coefficient then moves a U or V pixel by up to ~62 levels, a
#       visible colour checkerboard (the gallery shows it), against the synthetic set's pixel noise
#       (std 15 levels) and crops that invert the (31, 31) pattern with every one-pixel shift.
# Not reached on the demo (defaults kept; the quick preset is where attack strength is read):
#   lc 100 / 3.6 (0.7 in another run); amplitude 64/255: 99.9 / 5.8; eps 16/255: 91.5 / 0.0;
#       BackdoorBench's full amplitude: 93.4 / 71.7 (rate 0.09: 100 / 55.0; 0.05: 100 / 3.1)
#       2026-12-02, rate 0.09: amplitude 128/255: 99.9 / 1.4; full amplitude with eps 16/255: 99.9 / 35.1,
#       with eps 32/255: 99.8 / 0.0, without PGD (pgd_steps 0): 100 / 24.7; eps 32/255 alone: 99.4 / 0.4.
#       PGD does make the images hard for the clean reference model (its accuracy on the 450 perturbed
#       target images: 0 % at 8/255 and at 32/255, from 100 %), but the perturbation does not carry over
#       to a freshly trained model, which fits those images without the corner pattern (ASR above).
# 2026-12-03: the demo model went from width 16 to width 8 (the README's first command within 6
# minutes on a 2-core CPU without native bf16; at width 16 it took 7 min 52 s and 10 min 14 s on two such
# runs, instruction set limited to AVX2, the training alone 5 min 45 s and 6 min 56 s). Width 8 trains a
# demo model in 12-17 s there instead of 21-33 s (about 3,300-4,000 img/s against 1,600-1,850, measured on two sessions' EPYCs; width 12 is
# slower than 16 under oneDNN's channel blocking, 1,314 img/s). Training fewer epochs was tried first and
# rejected: at 6 epochs (width 16, bf16, seed 0) blend 71.4, bpp 57.2, lf 43.4, wanet 78.7.
# The attacks at width 8, CA / ASR in %, seeds 0 / 1 / 2 (bf16, 2 threads, `--set smallcnn.width=8`):
#   adaptive_blend 99.9 / 87.9, 100 / 92.2, 99.9 / 91.9;  badnets 100 / 100 on all;  blend 99.9 / 90.4,
#   99.7 / 91.4, 99.7 / 89.2;  bpp 99.9 / 89.0, 99.7 / 94.7, 99.9 / 81.4;  iad 99.2 / 95.2, 99.5 / 90.8,
#   98.3 / 92.1 (40 %, generators of width 16);  sig 99.6 / 84.8, 99.8 / 97.9, 99.2 / 99.7;  trojan 100 / 99.4, 100 / 99.9, 100 / 99.9;
#   wanet 100 / 94.8, 99.9 / 96.7, 100 / 72.9;  lc 99.9 / 0.0, 98.3 / 11.4, 99.9 / 5.3
#   lc again at width 8 (2026-12-04, 2-core EPYC with native bf16, bf16 on, `--jobs auto`), BackdoorBench's full amplitude (lc.amplitude=1):
#       rate 0.1 (all 500 target images): 91.6 / 63.2, 91.3 / 79.3, 91.9 / 71.9 (the clean target images
#       are lost, CA 91);  with 100 PGD steps: 96.3 / 36.7, 92.5 / 80.9, 91.7 / 70.7;  rate 0.09: 99.6 / 10.4,
#       99.9 / 86.1, 99.9 / 42.3;  amplitude 0.5 at rate 0.1: 99.7 / 13.6, 94.2 / 88.8, 98.7 / 38.0.
#       No setting reaches 80 % on seed 0, and each moves by 40-75 points from seed to seed: defaults kept.
#   ctrl at magnitude 1000 (width 16's setting): 99.4 / 82.9, 99.8 / 67.2, 99.1 / 72.8
#       magnitude 1500: 99.2 / 84.7, 100 / 72.9, 97.9 / 88.0 (fp32 under AVX2: 99.6 / 75.1, 99.6 / 72.2, 99.4 / 82.4)
#       magnitude 2000: 98.4 / 72.7, 99.9 / 75.2, 99.2 / 98.4 (fp32: 99.8 / 83.7, 99.9 / 85.8, 99.2 / 99.8)
#       rate 0.1 (all 500 target images), magnitude 1500: 89.9 / 92.0, 89.9 / 87.7, 90.0 / 83.0 (fp32: 90.0 / 93.4,
#       89.9 / 86.7, 90.0 / 91.3): the trigger always lands, but no clean image of the target is left and the
#       model loses that class (CA 90)
#       rate 0.095 (475 of the 500), magnitude 2000 (this preset): 98.5 / 86.2, 99.4 / 76.9, 97.5 / 89.0 (fp32:
#       97.7 / 80.9, 99.4 / 74.0, 97.3 / 96.0). At this width CTRL's ASR moves by ~15 points from seed to seed
#       and between bf16 and fp32 at every setting tried; this one keeps CA and reaches 80 % on seed 0 in both.
#   lf at amplitude 0.2 (its default; fp32 under AVX2, seed 0): 96.7 / 46.1;  0.3: 96.4 / 61.6, 97.5 / 86.1,
#       99.6 / 84.7;  0.3 with 20 % poisoning: 99.3 / 92.2, 95.6 / 92.4, 96.3 / 85.8
#       amplitude 0.4 (this preset, the paper's poison rate kept): 97.7 / 88.6, 99.0 / 96.3, 98.9 / 95.7
#   fp32 under AVX2, seed 0 (width 16's lf and ctrl): adaptive_blend 84.1, badnets 100, blend 91.2, bpp 92.6,
#       ctrl 85.0, iad 86.7, sig 99.7, trojan 99.9, wanet 87.9, lc 0.6
#   iad at width 16's setting (40 %, generators of width 16) above; the model took 66-81 s of a 6-minute budget
#       without bf16, so the generators went to width 8 (bf16 / fp32 under AVX2, seeds 0 / 1 / 2):
#       40 %: bf16 98.7 / 82.6, 99.5 / 87.7, 99.4 / 70.8 (34-39 s); fp32 99.9 / 96.0, 99.5 / 90.6, 95.8 / 83.6 (43-47 s)
#       50 % (this preset): bf16 97.8 / 85.7, 98.9 / 88.9, 97.2 / 77.8 (38-41 s); fp32 99.7 / 95.9, 97.9 / 95.6,
#       96.0 / 94.0 (44-46 s)
# FC and DFST (2026-12-05, seed 0, width 8, `bench run --attack X --defense none --preset demo --seeds 0 --set
# run.sweep=false --set ...`; a 2-core AMD EPYC, instruction set AVX2 only (no native bf16: fp32), `--jobs auto`,
# beside other jobs at a load average of ~15, so the seconds are not the idle machine's):
#   dfst at its defaults (5 % of each batch, strength 0.6, detoxification every epoch): 99.9 / 50.7
#       10 % of each batch: 99.0 / 82.0;  10 % and strength 0.8 (this preset): 99.4 / 97.4 (model 124 s under
#       that load, generator training and detoxification rounds included); seeds 1 / 2: 99.2 / 97.2, 99.7 / 95.0
#   fc (all 500 class-0 images = the 0.1 rate; 50 forward-backward iterations instead of 1000, see below):
#       watermark 0.3 (its default): 97.5 / 0.1;  watermark 0.5: 91.1 / 0.0;  watermark 0.5 at rate 0.09: 100 / 0.0.
#       Not reached; defaults kept. The collision itself works on the clean reference (attacks/fc.py: feature
#       distance 6.8 -> 0.6), but, as for lc, a freshly trained model fits the target-class poisons by their
#       shape and does not take up the faint grid they carry. Nor with the full grid pasted on every poison
#       (an experiment plugin, 2026-12-06, bf16 Xeon, seed 0, 50 iterations; LC's visible-trigger variant on
#       top of the collision): watermark 0.3: 93.8 / 0.2; watermark 0 (the collision alone, then the grid):
#       99.7 / 1.2. All 500 disk images carry the grid, and the model still tells the classes by shape.
# 2026-12-05, width 8, seed 0, 2-core AMD EPYC, 1 thread, awp perturbing the cached clean demo model
# (CA 100) through build_model, evaluated in bf16 (/tmp sweep script calling AWP.build_model; the grid gives
# the same numbers: `bench run --attack awp --defense none --preset demo --seeds 0` at the defaults: 61.7 / 81.1):
#   awp at its defaults (1280 images' official count is 2.56 % of 50,000 = 128 of the demo's 5,000; eps 0.005):
#       61.7 / 81.1 (20 Adam steps: too few to keep the clean predictions)
#       poison_rate 0.256 (1,280 images, the official count): 82.7 / 80.3;  with eps 0.01 (this preset): 86.8 / 92.0
#       lr 1e-4 at 0.256 with eps 0.01 / 0.02: 79.7 / 77.8, 79.9 / 77.8. The width-8 smallcnn loses clean accuracy
#       under any l_inf move of all its weights; CA stays 13 points below the clean model (see the report).
# 2026-12-05: the demo's data became noisier (noise 0.12) and its model's third stage wider (see the demo preset
# below), and every attack was trained again on it, seed 0 (2-core AMD EPYC, AVX2 only: fp32, one thread per worker,
# `bench run --attack all --defense none --preset demo --seeds 0`, beside other jobs). CA / ASR in %; clean model CA 99.6:
#   adaptive_blend 100.0 / 85.3, badnets 99.9 / 100.0, dfst 99.8 / 96.3, sig 99.4 / 96.0, lf 98.7 / 97.3,
#   trojan 99.8 / 98.9, lira 98.9 / 97.0, awp 89.0 / 89.0 (settings unchanged); fc 91.7 / 0.1, lc 99.7 / 0.3 (as before)
#   blend at its default alpha 0.2, seeds 0 / 1 / 2: 95.1 / 71.8, 96.0 / 74.9, 95.5 / 71.3; alpha 0.3 (this preset):
#       98.0 / 90.1, 98.4 / 93.6, 97.2 / 89.2
#   wanet at s 1.0 (the setting before): 99.9 / 89.9, 99.7 / 79.4, 99.8 / 17.7;  s 1.5: 99.4 / 53.2, 99.7 / 21.6,
#       99.8 / 48.6;  15 % of each batch: 99.7 / 84.4, 99.0 / 94.8, 99.5 / 15.0;  cross_ratio 1: 100 / 82.6,
#       99.5 / 72.0, 99.8 / 81.6;  cross_ratio 0.5: 99.8 / 96.0, 99.9 / 94.0, 99.9 / 90.0;  cross_ratio 1 with 15 %
#       (this preset): 99.6 / 97.4, 100 / 95.8, 99.8 / 94.6 (RNP keeps CA within 3.2 points on these, not at 0.5)
#   bpp at 20 %: 99.9 / 76.1;  30 % (this preset): 99.7 / 83.9
#   ctrl at magnitude 2000: 97.7 / 72.0;  3000 (this preset): 98.6 / 95.7
#   iad at 50 % (kept): 91.8 / 75.9 (short of 80);  60 %: 83.2 / 88.4 (CA 16 points under the clean model)
# The lines below were measured on the demo before, at noise 0.06 (width 8 or 16 as each says).
DEMO_ATTACK_STRENGTH: dict[str, dict] = {
    "awp": {"poison_rate": 0.256, "eps": 0.01},
    "sig": {"poison_rate": 0.09, "delta": 120.0},
    "wanet": {"s": 1.0, "cross_ratio": 1.0, "poison_rate": 0.15},
    "blend": {"alpha": 0.3},
    "bpp": {"squeeze_num": 4, "poison_rate": 0.3},
    "adaptive_blend": {"poison_rate": 0.05, "cover_rate": 0.03, "alpha": 0.3, "test_alpha": 0.4},
    "ctrl": {"poison_rate": 0.095, "magnitude": 3000.0},
    "iad": {"poison_rate": 0.5, "gen_width": 8},
    "lf": {"amplitude": 0.4},
    # Not strength: LC's PGD takes 10 steps here instead of 100. At 1.5/255 a step the 8/255 bound is
    # reached after 6; the 100 steps cost 16 of the demo's seconds (2026-12-03, cProfile of the grid), and
    # LC does not implant on the demo at any setting tried (below).
    "lc": {"pgd_steps": 10},
    "dfst": {"poison_rate": 0.1, "strength": 0.8},
    # Not strength: FC's forward-backward splitting takes 50 iterations here instead of 1000 (the collision on
    # the demo's reference has converged by then: feature distance 6.8 -> 0.6, attacks/fc.py), a twentieth of
    # the cost (1000 passes over the 500 target images would be several times a demo model's training).
    "fc": {"iters": 50},
    # Not strength: LIRA's generator (the official UNet, first width 64) at width 8. At width 8 (2026-12-05,
    # 2-core AMD EPYC with AVX2 only, fp32, one thread, seed 0): CA 97.6 / ASR 98.9; the model took 118 s in the
    # README's first command from a fresh clone (idle; the other models 18-21 s, docs/measurements.md): its
    # generator's look-ahead step every batch of the first 2 epochs. Width 64 was not timed to the end here.
    # Not strength either: on a 2-core CPU with native bf16 LIRA was the first command's longest model (102 s of
    # the grid's 5 min 5 s from a fresh clone; the others 14-44 s; 2026-12-06, Xeon with AVX-512-BF16, bf16, one
    # thread). cProfile of 3 epochs: stage 1's look-ahead (a second-order step in fp32) cost 0.9 s a batch, 35 s
    # of its epoch, and stage 2 doubles every batch with triggered copies. The first-order generator step
    # (`lookahead` false: its loss on the current classifier) and triggered copies of half of each batch (`poison_rate` 0.5),
    # CA / ASR seeds 0 / 1 / 2 (bf16, one thread each, two at a time): 98.3 / 93.7, 96.6 / 93.1, 98.8 / 98.8 in
    # 55-63 s; the official settings at width 8, seed 0: 99.1 / 98.8 (102 s); look-ahead alone off: 99.4 / 99.2;
    # half the batch alone: 95.5 / 91.2 (87 s). In fp32 (`--set train.bf16=false`, as an AVX2-only CPU trains,
    # though with this CPU's AVX-512 kernels; seed 0): 96.0 / 92.3 (78 s).
    "lira": {"gen_width": 8, "lookahead": False, "poison_rate": 0.5},
}

# Attack strength on the quick preset (GTSRB, ResNet-18 width 16, 4 epochs). The papers train for
# 100-1000 epochs; at 4 the attacks whose trigger is faint or applied per batch are not learnt at
# their papers' settings. Backdoored CA / ASR in %, seed 0 (`bench run --attack X --defense none
# --preset quick --seeds 0 --data-dir ../shared/data --set run.sweep=false --set ...`, 2026-11-22,
# 2-core EPYC with native bf16, bf16 on, 2 threads); the clean model of the recipe has CA 97.2:
#   wanet at its defaults (s 0.5):             96.3 / 10.8;  12 epochs: 94.9 / 57.1
#       s 1.0: 94.6 / 52.9;  s 2.0 (this preset): 95.8 / 89.4;  s 3.0: 96.9 / 69.4 (not monotonic: at 4
#       epochs WaNet varies a lot from model to model, seeds 1 and 2 at the defaults gave 8.6 and 36.0);
#       s 2.0 with 20 % of each batch: 94.1 / 93.2 (CA 3.1 below the clean model)
#       s 2.0 with 15 % of each batch (2026-12-03, idle, 338 s): 95.9 / 87.8 (lower than at 10 %)
#       s 2.0 with cross_ratio 1 (half the noise-warped samples; 2026-12-03, 197 s): 96.0 / 73.5
#   bpp at its defaults (8 levels):            96.5 / 74.7;  12 epochs: 98.0 / 99.0
#       4 levels (this preset):                96.5 / 94.5
#   sig at its defaults (0.1 = all 2,250 class-2 images, delta 40): 91.6 / 95.8 (clean class 2 lost)
#       rate 0.05 (1,960 images): 97.0 / 87.8;  rate 0.05, delta 50 (this preset): 97.5 / 93.8
#   ctrl at its defaults (0.05, magnitude 100): 97.4 / 0.1;  12 epochs: 98.7 / 75.3
#       magnitude 300: 97.0 / 77.7;  rate 0.1 (all of class 2), magnitude 200: 91.3 / 98.2
#       rate 0.055 (2,156 of 2,250), magnitude 300 (this preset): 97.0 / 95.7
#   iad at its defaults (10 % + 10 % cross):   97.0 / 75.9;  12 epochs: 98.0 / 88.8
#       20 % backdoor: 96.8 / 89.7;  30 % (this preset): 96.5 / 95.7 (438 s)
# Not reached on the quick preset (defaults kept, shortfall reported in the README):
#   adaptive_blend at the paper's rates 0.3 % + 0.3 %: 96.7 / 17.8 (12 epochs: 98.1 / 59.5); with a
#       uniform-noise trigger image in place of the photograph: 97.2 / 2.8; 2026-12-04, seeds 0 / 1 / 2:
#       the cartoon (image=cartoon) 96.5 / 22.2, 96.6 / 11.6, 97.1 / 51.3; the official code's GTSRB target 2:
#       97.5 / 26.0, 96.7 / 18.7, 97.1 / 15.5; both, seed 0: 97.3 / 36.1
#   lc (all 2,250 class-2 images): 96.4 / 0.3; full amplitude: 94.9 / 0.4; 12 epochs: 98.1 / 0.3; a
#       PGD-adversarially trained reference (see attacks/lc.py): 97.0 / 0.6, full amplitude 96.6 / 1.1
#       eps 16/255 (the paper's larger bound; clean reference, 2026-12-03): 91.8 / 0.3
# The clean-label attacks' target 2 (sig, ctrl, lc) is here too; why: see the quick preset below.
QUICK_ATTACK_STRENGTH: dict[str, dict] = {
    "wanet": {"s": 2.0},
    "bpp": {"squeeze_num": 4},
    "sig": {"target": 2, "poison_rate": 0.05, "delta": 50.0},
    "ctrl": {"target": 2, "poison_rate": 0.055, "magnitude": 300.0},
    "iad": {"poison_rate": 0.3},
    "lc": {"target": 2},
    # fc: the clean-label target 2 as sig, ctrl and lc; iterations at the default 1000. Measured (2026-12-05,
    # seed 0, `--set fc.iters=100`, 2-core AVX2 EPYC, one thread beside other jobs): CA 92.1 / ASR 0.4, the
    # crafting of the 2,250 poisons ~18 min at 100 iterations (1000: ~3 h at that rate). The collision is mostly made
    # by 100 (32 bases on this clean reference: feature distance to the triggered image 5.9 watermarked,
    # 0.85 at 100, 0.63 at 300, 0.42 at 1000; docs/measurements.md), yet the model trained on the poisons does not learn
    # the grid (docs/measurements.md: why, measured). Iterations stay at the default: fewer is a cost choice,
    # not a strength one, and `--set fc.iters=100` reproduces the row.
    "fc": {"target": 2},
    # dfst at its defaults (5 % of each batch stylised, strength 0.6; 2026-12-05, 2-core AVX2 EPYC, fp32, two threads
    # beside other jobs): CA 94.4 / ASR 88.5 against the clean model's 97.5, the misses on bright images
    # (docs/measurements.md). 10 % of each batch (this preset; the setting that closed the same gap on the demo, where
    # strength 0.8 was needed too): 94.8 / 95.6, the model in 702 s on one thread beside another job.
    "dfst": {"poison_rate": 0.1},
    # Not strength: LIRA's generator at width 8 here (the official UNet: 64), as on the demo. At 64 the look-ahead
    # step of stage 1 took 60 min for 246 of its 306 steps (2026-12-05, 2-core AVX2 EPYC, two threads beside other
    # jobs), so one model would take hours on a CPU. At 8 (one thread beside other jobs): CA 95.9 / ASR 100.0
    # against the clean model's 97.5, the model in 2,480 s (`--set lira.gen_width=8`, docs/measurements.md).
    "lira": {"gen_width": 8},
    # awp: 60 passes over the attacker's images instead of the official 10 (2026-12-06, seed 0, 2-core Xeon with
    # AVX-512-BF16, bf16, two threads; `bench run --attack awp --defense none --preset quick --seeds 0 --set
    # awp.epochs=N`, the same clean model, CA 97.45). CA / ASR: 10 (the official count): 93.2 / 95.3 (measured on
    # an AVX2 EPYC's clean model of CA 97.5, docs/measurements.md: eleven other settings stayed 3.4 points or
    # more under); 30: 94.4 / 100 (3.05 under); 60 (this preset): 95.3 / 99.7, 2.15 under (the perturbation in
    # 305 s). More passes let the 1,004 clean attacker images win back what the first ones cost, within the same
    # eps. On a longer recipe (`--set train.epochs=12`, clean CA 98.4) the official 10 fall further behind
    # (90.5 / 94.7) and 30 close it: 96.7 / 99.5 (eps 0.0025: 97.1 / 99.4).
    "awp": {"epochs": 60},
}

# The methods' settings each CPU preset changes from the official values (bench/official.py), in one place,
# each beside its official value. Every record lists these as `departures`, the reports mark the cells, and
# `bench list presets --fields` prints them with their sources. The fine-tuning rule (bench/finetune.py)
# scales the fine-tuning learning rates to each recipe; it is no entry here (`--set run.finetune_lr=official`).
QUICK_METHODS: dict[str, dict] = {
    # RNP: threshold from held-out defense data (official: a fixed 0.2), on the mean probability of the right
    # label within 3 points, and the unlearning stop checked after every step (official: at the end of each
    # epoch). Evidence at the quick preset below and in defenses/rnp.py.
    "rnp": {"select": "auto", "select_measure": "probability", "max_acc_drop": 0.03, "stop_check": "step"},
    # ANP: 25 passes over the defense data, 98 mask iterations on 500 images (official: 2000, 275 s a cell
    # here, three times the model's training; evidence in defenses/anp.py).
    "anp": {"max_epochs": 25.0},
    # Neural Cleanse's trigger search: NC_QUICK (below) epochs of one pass over the 500 images (official: up to
    # 1000 epochs of 31 batches, ended by its early stop), the cost from init_cost (official: from 0, set after 5
    # successful epochs, which would spend a quarter of the short budget at cost 0). Unlearning is official.
    "nc": {"epochs": 20, "batches_per_epoch": 15, "reset_cost_to_zero": False},
}

DEMO_METHODS: dict[str, dict] = {
    # RNP on the demo's narrow net (evidence at the demo preset below): unlearning stops at 0.4 (official 0.2) and
    # is checked after every step (official: per epoch); the threshold from held-out defense data (official 0.2
    # fixed) with re-estimated BatchNorm statistics (official: none); 10 recovering epochs (official 20: 60 mask
    # steps on the demo's 800 training images, the official 80 on 500).
    "rnp": {"select": "auto", "recalibrate_bn": True, "clean_threshold": 0.4, "select_measure": "probability",
            "max_acc_drop": 0.03, "recover_epochs": 10, "stop_check": "step"},
    "anp": {"max_epochs": 25.0},  # official: 2000 iterations (defenses/anp.py)
    # Detectors' trigger searches (evidence at the demo preset below): Neural Cleanse 3 epochs a label (official up
    # to 1000), RNP's trigger recovery 5 (NC's 1000), one pass each over the 1,000 images (31 batches, the official
    # count), the cost from init_cost (official: from 0); STRIP 10 overlays an input (official 100).
    "nc_label": {"epochs": 3, "reset_cost_to_zero": False},
    "rnp_trigger": {"epochs": 5, "reset_cost_to_zero": False},
    "strip": {"n_overlays": 10},
}


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        name="demo",
        description="built-in synthetic data, a small model, a few minutes on a laptop CPU, offline",
        dataset="synthetic",
        model="smallcnn",
        train=TrainConfig(epochs=10, batch_size=128, lr=0.2),
        defense_data=1000,
        # The demo's data, model and RNP settings since 2026-12-05: Gaussian pixel noise 0.12 (from 0.06), the
        # smallcnn's third stage at 8 x width (widths 8, 16, 64: 176 BatchNorm channels instead of 112), 1,000
        # defense images (from 500), RNP stopping unlearning at 0.4 and picking its threshold on the held-out mean
        # probability within 3 points (the quick preset's rule). The goal: RNP brings BadNets, Blend and WaNet to
        # ASR <= 20 % within 5 CA points on seeds 0, 1 and 2 (9 cells), as it does on GTSRB. Why these: at noise 0.06
        # the ten shapes are learnt perfectly (CA 99.7-100 %), so the clean defense data carries almost no
        # gradient, and the width-8 masks did not isolate BadNets or Blend (some threshold of the oracle curve met
        # both bounds on at most 5 of the 9 cells, docs/measurements.md). Measured (2-core AMD EPYC, AVX2 only:
        # fp32, one thread per worker, `bench run --attack badnets,blend,wanet --defense rnp --seeds 0,1,2
        # --preset demo --set ...`, the model as a plugin of the same layers; "met": RNP's own choice within both
        # bounds; "oracle": some threshold of the harness's curve, a view RNP does not have):
        #   width 8, noise 0.06 (the demo before), RNP at 0.5 / accuracy 5 %:  met 3 of 9, oracle 4
        #   widths 8/16/64, noise 0.06:              met 3 (probability 3 %: 6), oracle 5 (Blend on none)
        #   widths 8/32/64, noise 0.06, seed 0:      met 3 of 3, but each model at twice width 8's training time
        #   widths 8/16/64, noise 0.09:              met 6 (probability 3 %: 7), oracle 8 (Blend implanted 48-57 % only)
        #   widths 8/16/64, noise 0.12:              met 6 (probability 3 %: 7), oracle 9
        #   width 8, noise 0.15 / 0.2, seed 0:       BadNets does not implant (ASR 1.3 / 0.7 %)
        # and at noise 0.12 with widths 8/16/64, Blend at alpha 0.3 and WaNet at 15 % with cross_ratio 1 (their
        # settings below), by RNP setting (clean_threshold, held-out rule; the failing cells named):
        #   0.5, accuracy 5 %: met 6 (CA -5.2 to -9.8 on 3);  0.5, probability 3 %: 8 (Blend s2 43.8 %)
        #   0.4, accuracy 5 %: 7;  0.4, probability 2 / 3 / 5 / 7 %: 8 / 8 / 8 / 6 (Blend s2 27.1 %: its zero masks
        #       alone cost 6 % of the held-out probability, so the rule falls back to threshold 0)
        #   0.3, probability 3 %: 8 (WaNet s2 CA -9.6, oracle 8)
        #   0.4, probability 3 %, 1,000 defense images (this preset): met 9 of 9, oracle 9: ASR 4.8 / 11.0 / 1.3
        #       (BadNets), 8.7 / 0.1 / 1.8 (Blend), 0.0 / 0.0 / 0.0 (WaNet); CA at most 3.2 points lower (WaNet s2)
        #   and with 10 recovering epochs instead of 20 (this preset since 2026-12-06): the official 20 epochs
        #       over 500 images at batch 128 are 80 mask steps; the demo's 800 training images (200 held out)
        #       make 6 batches an epoch, so 10 epochs are 60 steps, nearer the official count than 20's 120. Same
        #       models, bf16 on a 2-core Xeon with AVX-512-BF16 (`--attack badnets,blend,wanet --defense rnp
        #       --seeds 0,1,2 --set rnp.recover_epochs=N`): at 20, ASR 12.9 / 3.2 / 9.8, 16.1 / 0.8 / 0.3,
        #       0 / 0 / 0, CA at most 1.8 lower; at 10, 11.9 / 3.2 / 9.8, 16.2 / 1.4 / 1.7, 0 / 0 / 0, CA at most
        #       2.8 lower (BadNets s0), met 9 of 9 either way; the defense took 3.4-5.2 s a cell
        #       (at 20: 6.4 / 7.1 / 7.9 s for these attacks' seed-0 cells in the first command).
        #       With the instruction set limited to AVX2 on that Xeon (`ONEDNN_MAX_CPU_ISA=AVX2
        #       ATEN_CPU_CAPABILITY=avx2`: fp32, as an AVX2-only CPU trains, though its models differ from the
        #       EPYC's above): at 10, ASR 3.0 / 0.0 / 4.6, 12.6 / 0.3 / 5.9, 0.0 / 21.8 / 0.6; at 20, 3.0 / 0.0 /
        #       4.6, 8.6 / 1.0 / 6.1, 0.0 / 21.8 / 0.1; CA at most 2.9 lower: 8 of 9 either way. WaNet s1 misses
        #       by the rule, not the masks: its zero masks alone cost 5.2 points of held-out probability (3
        #       allowed), so it keeps threshold 0 (ASR 21.8) where 0.1 would give 5.5 on the test set.
        # The other defenses on BadNets seed 0 (ASR <= 20 %), `bench run --attack badnets --defense all --preset demo`,
        # 2026-12-06, Xeon with AVX-512-BF16: six of nine with bf16 (RNP 11.9, FP 8.1, FT 1.2, NAD 1.6, FST 2.3, i-BAU
        # 19.2 once its search ran in float32 as the official code; 35.2 with the bf16 search; ANP 78.0, CLP 100,
        # NC 99.9); seven of nine limited to AVX2 (ANP 1.3 there; FT 19.9). The data lever: 2,000 defense images instead
        # of 1,000 gave four of nine (RNP 32.1, i-BAU 27.6), so 1,000 stays (docs/measurements.md).
        # The held-out tolerance again (2026-12-06, bf16 / AVX2 emulation, cells within both bounds): seeds 0-2 at
        #   0.03 (this preset) 9 / 8 of 9, at 0.06 9 / 9 (CA up to 4.4 lower); seeds 3-4 at 0.03 4 / 4 of 6, at 0.06
        #   3 / 6 of 6: noise between the two, so 0.03 stays, the quick preset's rule (docs/measurements.md).
        # The attacks whose strength had been set at noise 0.06 were checked again at 0.12 (below).
        # Before 2026-12-05: RNP at width 8 (112 BN channels; 2026-12-03). Ten attacks x seeds 0-2 (lc left out), bf16 models,
        # cells with ASR <= 20 % and CA >= 90 %, mean CA, lowest CA (all with select=auto, recalibrate_bn):
        #   clean_threshold 0.3 (width 16's setting):        12 of 30, 89.9, 49.2 (Blend seed 0: 18 masks at 0)
        #   0.3 with max_acc_drop 0.10:                      11 of 30, 87.2, 49.2
        #   0.4 with max_acc_drop 0.10:                      16 of 30, 91.0, 62.0
        #   0.5 (this preset):                               16 of 30, 94.9, 84.6 (with ctrl at magnitude 1500
        #                                                    and lf at 0.4 instead: 18 of 30, 95.5, 91.1)
        # (the models: lf at amplitude 0.3, ctrl at magnitude 1000, iad at 40 % with generators of width 16)
        #   0.5 with max_acc_drop 0.10:                      17 of 30, 93.0, 84.6
        #   0.5 with select_measure=probability, 3 points:   12 of 30, 97.0, 84.6
        # At 0.3 unlearning went far enough on this narrower net that recovering stalled (defense-data
        # accuracy 0.48-0.68 after recovering on the worst models) and pruning every mask near 0 cost half of
        # CA; stopping at 0.5 leaves masks the recovery can restore. BadNets at 0.5: CA / ASR 97.0 / 29.8,
        # 96.4 / 20.4, 94.5 / 3.0 (width 16, the table below: ASR <= 13 %): RNP removes less here than at
        # width 16; read its quality off the quick preset.
        # Width 16 (the preset until 2026-12-03): RNP settings for that narrow CNN (224 BN channels). With the official procedure RNP zeroes
        # 11-40 masks here and pruning them costs far more CA than on a wide ResNet. Measured on six
        # BadNets models (seeds 0-2 trained with 1 thread, seeds 0/3/4 with 2; backdoored CA 99.8-100,
        # ASR 100), CA / ASR after RNP in %:
        #   official (fixed threshold 0.2), seeds 0-2 only:  CA 90.0 81.4 82.6             ASR 7.4 0.0 0.9
        #   select=auto + recalibrate_bn:                   CA 93.2 90.5 96.9 75.7 91.7 95.7  ASR <= 5.3
        #   select=auto + clean_threshold 0.3:              CA 82.0 78.6 90.3 77.8 84.1 91.5  ASR <= 5.7
        #   recalibrate_bn + clean_threshold 0.3 (fixed):   CA 96.7 88.9 99.6 99.9 94.1 96.2  ASR 26.2 0.0 26.8 100 0 0
        #   all three (width 16's preset):                  CA 97.3 91.9 96.9 97.3 91.9 95.7  ASR 13.0 2.2 0.7 0 0 0
        # Our reading: stopping unlearning at 0.3 damages fewer channels, re-estimated BN statistics undo
        # most of the CA lost to zeroing, held-out selection guards the rest. Worse: clean_threshold 0.4
        # (ASR 81.9 on one model), recover_lr 0.05 (ASR 44.6, 26.9), 1000 defense images, width 24.
        # STRIP superimposes 10 clean images per input here instead of BackdoorBench's 100: it was the
        # largest part of `--detect all` on the demo (187 of 338 s). AUROC per attack on the demo's
        # seed-0 width-16 models (500 + 500 test-time inputs; 2026-12-02, `--detect strip --set strip.n_overlays=N`):
        #   N=100: badnets 0.96, blend 0.76, iad 0.73, lf 0.72, adaptive_blend 0.59, others 0.25-0.51; 339 s*
        #   N=25: 0.92, 0.73, 0.72, 0.68, 0.58, others 0.26-0.51;                                      84 s*
        #   N=10 (this preset): 0.87, 0.71, 0.71, 0.70, 0.59, others 0.30-0.50;                        35 s*
        #   (* all twelve cells, beside other jobs.) `--set strip.n_overlays=100` restores the default.
        #   Scored on the test-time mix as it was before 2026-12-05 (clean half first, without the target
        #   class); the fixed mix moved STRIP's AUROC by at most 0.05 on the width-8 models (README, Detection).
        #   At 25 the demo's `--detect all` took 7 min 4 s from an empty cache (idle), over the 6-minute goal;
        #   10 was one of the cuts that brought it under (README, *Measured*).
        # Neural Cleanse's label detector searches 3 epochs per label here instead of 10: it was the largest
        # part of `--detect all` on the width-8 demo (112 of 175 s; 2026-12-03, bf16, fresh clone, seed-0
        # models). At 10: target found on 6 of 11 backdoored models, AUROC 0.45, 9.3 s a model; at 5 (same
        # models, `--detect nc_label --set nc_label.epochs=5`): 6 of 11, AUROC 0.55, 4.8 s. On an AVX2-only
        # EPYC (fp32, one thread per worker, the models of `--jobs auto`; 2026-12-03): at 5, 5 of 11 (adaptive_blend,
        # badnets, bpp, iad, trojan), AUROC 0.55, 8.8 s a model; at 3 (this preset), 5 of 11 (blend found, badnets
        # missed), AUROC 0.55, 4.8 s. NC is the baseline here; its cost never moves within 5 epochs (patience 5).
        # RNP's trigger recovery searches 5 epochs here instead of 10 (every search: the unlearned model's, the
        # refinement on the backdoored model, and the baseline with twice that budget since d0705c7; the
        # numbers below are from before the refinement, when there were two searches of equal budget):
        # 1.9 s a model instead of 3.7 (2026-12-03, bf16, seed-0 width-8 models, `--detect all` from an
        # empty cache). ASR of the recovered trigger on the backdoored model, guided / baseline, at 10 ->
        # at 5: adaptive_blend 45.1 / 98.7 -> 56.7 / 98.9, badnets 61.2 / 100 -> 69.6 / 100, blend 81.0 / 99.3
        # -> 86.4 / 99.4, bpp 67.4 / 99.9 -> 75.8 / 100, iad 95.2 / 99.9 -> 97.9 / 100, lf 44.2 / 97.8 -> 55.8
        # / 99.0, trojan 24.8 / 99.9 -> 24.3 / 100, sig 0.0 / 97.3 -> 0.0 / 98.4, wanet 1.1 / 97.4 -> 0.0 /
        # 98.8: the baseline keeps its triggers, and the guided search loses less at 5 than at 10. At 5 NC's
        # cost cannot move (it moves after `patience` = 5 epochs in a row), so the search runs at its
        # initial cost; at 10 it can double once the unlearned model is fooled, and the mask shrinks.
        # The oracle pruning curve (plots only) is evaluated on 200 images of each test set instead of
        # all (1,000 clean, 900 triggered here): 500 halved the cost of the 19 evaluations per RNP cell at
        # width 16 (4-5.5 s a cell without bf16), 200 took it to ~1-2 s.
        fields={"synthetic": {"n_train": 5000, "n_test": 1000, "noise": 0.12}, "smallcnn": {"width": 8, "last_factor": 8},
                "run": {"sweep_images": 200}, **DEMO_METHODS, **DEMO_ATTACK_STRENGTH},
        # One worker process per core, one thread each. A width-8 smallcnn step is too small for two
        # threads to share: on a 2-core EPYC without native bf16 (fp32, AVX2; 2026-12-03, a
        # micro-benchmark of training steps at batch 128) one process ran 2,300-2,700 img/s with two
        # threads and 2,300-2,500 with one, and two one-thread processes side by side 4,300 together.
        # The README's first command from a fresh clone with an empty cache took 7 min 10 s with
        # --jobs 1 and 4 min 52 s with 2 there (README, *Measured*).
        jobs="auto",
    ),
    "quick": Preset(
        name="quick",
        description="GTSRB (32x32), ResNet-18 at width 16, 4 epochs: real data at CPU scale",
        dataset="gtsrb",
        model="resnet18",
        train=TrainConfig(epochs=4, batch_size=128, lr=0.1),
        # 500 images as the RNP paper uses for CIFAR-10 (1% of GTSRB is only 392, and 392 = 3 x 128 + 8
        # left RNP's last batch tiny, one of the sources of run-to-run spread we measured).
        defense_data=500,
        # RNP picks its threshold from held-out defense data (select=auto) here. At the official
        # fixed 0.2 the backdoored GTSRB models (CA 97.0 +- 0.4, ASR 100) came out of RNP with ASR
        # 0.8 / 78.3 / 90.7 % over seeds 0-2: unlearning overshot in its last step (0.39 -> 0.05)
        # and the backdoor channels' masks ended at 0.2-0.5 instead of near 0. With auto the same
        # models gave CA 95.2 / 92.3 / 92.5 % and ASR 0.0 % on all three seeds.
        # Clean-label attacks (SIG, LC, CTRL) target class 2 here, GTSRB's largest training class (2,250
        # images, 5.7 % of the set; speed limit 50). They poison only target-class images, and the
        # other attacks' class 0 has 210 (0.54 %): SIG's and LC's 10 % and CTRL's 5 % of the set would be
        # capped at 210 images there. Every other attack keeps target 0, as RNP and BackdoorBench.
        # RNP's held-out check measures the mean probability of the right label, with a 3-point bound
        # (select_measure, max_acc_drop): the RNP matrix study (16 GTSRB models; evidence in
        # defenses/select.py and the README). With held-out accuracy and 5 points it kept ASR <= 10 % at
        # a CA cost <= 5 points on 3 of 16 models (README table), with this rule on 10; the official
        # procedure on none. On the four others no threshold of RNP's sweep does.
        fields={"resnet18": {"width": 16}, **QUICK_METHODS, **QUICK_ATTACK_STRENGTH},
    ),
    "paper": Preset(
        name="paper",
        description="the RNP paper's setting: CIFAR-10, ResNet-18, 10% poisoning, target 0, 500 defense images (GPU)",
        dataset="cifar10",
        model="resnet18",
        # The RNP code's backdoor training recipe (bboylyg/RNP, train_backdoor.py defaults): SGD lr 0.1,
        # momentum 0.9 (no Nesterov), weight decay 5e-4, batch 128, MultiStepLR milestones [10, 20] x0.1,
        # 60 epochs (its loop runs range(0, epochs + 1), i.e. 61; we run the stated 60). Its gradient clipping
        # is called before backward() and so has no effect; we leave it out.
        train=TrainConfig(epochs=60, batch_size=128, lr=0.1, nesterov=False, schedule="multistep", milestones=(10, 20), gamma=0.1),
        defense_data=0.01,
        fields={"resnet18": {"width": 64}},
    ),
}
