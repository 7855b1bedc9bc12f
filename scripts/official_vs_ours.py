#!/usr/bin/env python
"""Official code beside ours, on the same model and the same defense images (issue 39, item 4).

For one method (``--method nad|ibau|nc|fst|fp``) this script runs the official loop and our defense
(built through the registry with the official values given explicitly) on the cached quick-preset
model of one attack (default: GTSRB, ResNet-18 width 16, BadNets, seed 0) and on the same clean
defense images the grid gives that model (``bench.run.cells.defense_data``, 500 images), and prints
one JSON line per side: CA / ASR / RA on the test sets, the method's main intermediate quantity,
and the wall time of the defense itself. Both sides run in float32 on the CPU, as the official codes.
Results and docs: ``docs/official-vs-ours.md``.

The official code is never a dependency of the package and nothing of it is copied here: the script
takes the path of a fetched copy of each repository (``--nad``, ``--ibau``, ``--nc``, ``--fst``,
``--bb``) and imports from there what is importable PyTorch, unmodified:

- NAD (bboylyg/NAD): ``at.AT``, ``main.train_step``, ``utils.util.adjust_learning_rate``,
  ``data_loader.Cutout`` and ``config.get_arguments`` (its defaults). The driver ``main.train``
  loads its models from files and evaluates on CUDA, so its loop (main.py:135-174) is restated
  around the imported ``train_step``.
- i-BAU (YiZeng623/I-BAU): ``hypergrad`` (``GradientDescent``, ``fixed_point``). The unlearning
  loop lives in the ``__main__`` block of ``defense.py`` (with literal ``'cuda'`` devices), so it is
  restated statement by statement (defense.py:166-243) around the imported hypergradient.
- FST (AISafety-HKUST/stable_backdoor_purification): ``utils.aggregate_block.fix_random``.
  ``fine_tune/ft.py`` is one ``main()`` that needs BackdoorBench's attack records; its tuning
  loop (ft.py:264-345) is restated.
- FP (SCLBD/BackdoorBench ``defense/fp.py``): ``utils.aggregate_block.fix_random`` and the settings
  of ``config/defense/fp/gtsrb.yaml``. ``FinePrune.defense`` needs the whole framework (attack
  records, its trainer); its loop (fp.py:294-426 and the trainer it calls) is restated.
- NC (bolunwang/backdoor) is Keras: its optimisation (``visualizer.py``), the GTSRB driver
  (``gtsrb_visualize_example.py``, whose settings are read from the file) and the MAD detection
  (``mad_outlier_detection.py``) are restated in PyTorch, one label at a time as the driver does.
  The repository has no unlearning; the mitigation is BackdoorBench's (``defense/nc.py:759-845``,
  ``config/defense/nc/gtsrb.yaml``), restated.

Every restated statement carries the file:line it mirrors. Where the official code cannot run
as it is (CUDA-only lines, a Keras model), the comment says what was changed.

Usage (the paths are fetched copies, outside this repository):

    python scripts/official_vs_ours.py --method nad --nad /tmp/official/nad [--data-dir ../shared/data]
    python scripts/official_vs_ours.py --method ibau --ibau /tmp/official/ibau
    python scripts/official_vs_ours.py --method fst --fst /tmp/official/fst
    python scripts/official_vs_ours.py --method fp --bb /tmp/official/bb
    python scripts/official_vs_ours.py --method nc --nc /tmp/official/nc --bb /tmp/official/bb --nc-labels 0,1,2

``--side official|ours|both`` picks the sides (default both); ``--threads`` the torch threads (1).
Progress goes to stderr, the JSON lines to stdout; nothing is written into the package.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import math
import os
import platform
import random
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from bench.data import ImageSet  # noqa: E402
from bench.metrics import TriggeredSet, evaluate  # noqa: E402
from bench.run import cells  # noqa: E402
from bench.run.plan import GridSpec  # noqa: E402
from defenses.base import DEFENSES, DefenseContext  # noqa: E402


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def cpu_name() -> str:
    name, bf16 = platform.processor() or "cpu", False
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        bf16 = " avx512_bf16" in info
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores{', AVX-512-BF16' if bf16 else ''}"


def seed_globals(seed: int) -> None:
    """Python's ``random``, NumPy's legacy global RNG and torch's global RNG (what the official codes draw from)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def official_path(path: str | None, flag: str):
    """``path`` first on ``sys.path`` while importing from a fetched official copy."""
    if not path:
        raise SystemExit(f"this method needs {flag} PATH: a fetched copy of the official repository")
    p = str(Path(path).resolve())
    if not Path(p).is_dir():
        raise SystemExit(f"{flag} {path}: not a folder")
    sys.path.insert(0, p)
    try:
        yield Path(p)
    finally:
        sys.path.remove(p)


def pct(v):
    return None if v is None else round(100 * v, 2)


# ------------------------------------------------------------------ the shared setup


class Setup:
    """The model, its data and the defense images, as the grid has them."""

    def __init__(self, args) -> None:
        torch.set_num_threads(args.threads)
        spec = GridSpec(attacks=[args.attack], defenses=["none"], preset=args.preset, seeds=[args.seed],
                        data_dir=args.data_dir, datasets=[args.dataset] if args.dataset else None)
        self.job = spec.plan().defense_cells[0].job
        model, attack, poison_idx, triggered = cells.load_model(self.job, "cpu")
        self.model, self.attack, self.triggered = model.eval(), attack, triggered
        train, self.test = self.job.dataset.load(self.job.data_dir)
        self.clean: ImageSet = cells.defense_data(train, attack, poison_idx, args.defense_size, self.job.seed)
        self.seed = args.seed
        # the seed of the defenses' own randomness (ours: DefenseContext.seed; official: the global RNGs)
        self.run_seed = args.seed if args.run_seed is None else args.run_seed
        self.ds = self.job.dataset
        self.num_classes = self.ds.num_classes
        self.target = int(getattr(attack, "target", 0))
        self.args = args

    def fresh(self) -> nn.Module:
        """A copy of the backdoored model (eval mode, contiguous, float32)."""
        return copy.deepcopy(self.model).float().eval()

    def ctx(self) -> DefenseContext:
        return DefenseContext(num_classes=self.num_classes, augmentation=self.ds.augmentation, seed=self.run_seed,
                              device=torch.device("cpu"), bf16=False)

    def evaluate(self, model: nn.Module) -> dict:
        t = time.perf_counter()
        r = evaluate(model.eval(), self.test, self.triggered, bf16=False)
        return {"ca": pct(r["ca"]), "asr": pct(r["asr"]), "ra": pct(r["ra"]), "eval_s": round(time.perf_counter() - t, 1)}

    def x01(self) -> torch.Tensor:
        """The defense images as float in [0, 1], NCHW, contiguous (what the official loops get)."""
        return self.clean.x.float() / 255


class PILSet(torch.utils.data.Dataset):
    """The uint8 defense images as PIL images through a torchvision transform (the official loaders' input)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        from PIL import Image

        self.imgs = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]
        self.y = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.imgs)

    def __getitem__(self, i):
        return self.transform(self.imgs[i]), self.y[i]


def bb_train_transform():
    """BackdoorBench's GTSRB train transform (dataset_and_transform_generate.py:134-146): Resize(32), RandomCrop(32,
    padding 4), no flip (flips only for cifar10), ToTensor, Normalize([0,0,0],[1,1,1]) (:93-94, the identity).
    Our model normalises inside its input stage, so the images stay in [0, 1] as there."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((32, 32)), transforms.RandomCrop((32, 32), padding=4), transforms.ToTensor()])


def jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def emit(method: str, side: str, result: dict, setup: Setup, extra: dict | None = None) -> None:
    line = {"method": method, "side": side, "run_seed": setup.run_seed, **result, **(extra or {}),
            "model": f"{setup.ds.name}-{setup.job.model.name}-{setup.job.attack.name}-s{setup.seed}",
            "defense_images": len(setup.clean), "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "torch": torch.__version__.split("+")[0]}
    print(json.dumps(jsonable(line)), flush=True)


def ragged_steps(n: int, batch_size: int) -> int:
    """Steps per epoch of our shared trainer with keep_ragged (bench/train.py): full batches, plus a rest of 2 or more."""
    bs = min(batch_size, n)
    return n // bs + (1 if n % bs > 1 else 0)


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, round(time.perf_counter() - t, 1)


# ================================================================== NAD


class ActivationNet(nn.Module):
    """Our model with the official WRN's interface: ``forward -> (activation1, activation2, activation3, logits)``.

    The activations are the outputs of ``layers`` (our ResNet-18's ``net.layer1/2/3``: 32x32, 16x16 and 8x8 maps, the
    official WRN-16-1's group sizes), captured with forward hooks.
    """

    def __init__(self, model: nn.Module, layers) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self._acts: dict = {}
        for n in self.layers:
            model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: self._acts.__setitem__(n, o))

    def forward(self, x):
        out = self.model(x)
        return (*[self._acts[n] for n in self.layers], out)


NAD_LAYERS = ("net.layer1", "net.layer2", "net.layer3")


def nad_official(S: Setup) -> dict:
    from torchvision import transforms  # (and torch's dynamo, which it imports) before the stub below

    stub = False
    try:
        import pandas  # noqa: F401
    except ImportError:  # utils/util.py and main.py import pandas for their CSV logs only (main.test, not called)
        sys.modules["pandas"], stub = types.ModuleType("pandas"), True
    try:
        with official_path(S.args.nad, "--nad"):
            import at as nad_at
            import main as nad_main
            from config import get_arguments
            from data_loader import Cutout
            from utils.util import adjust_learning_rate
    finally:
        if stub:  # gone again once imported (torch's dynamo looks for importable modules by their spec)
            del sys.modules["pandas"]

    def accuracy(output, target, topk=(1,)):
        """utils/util.py:52-65 with ``.reshape(-1)`` for its ``.view(-1)`` (line 63), which fails on the non-contiguous
        slice under current torch; train_step uses it for its prec@1/prec@5 log only."""
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0).mul_(100.0 / batch_size) for k in topk]

    nad_main.accuracy = accuracy
    opt = get_arguments().parse_args([])  # config.py: the official defaults
    opt.cuda = 0  # main.py:23-25 moves batches to CUDA when opt.cuda; this is a CPU run
    opt.print_freq = 10**9  # progress prints only
    seed_globals(S.run_seed)  # main.py never seeds (config.py's --seed is unused): we seed the global RNGs

    # data_loader.py:10-16 and :24: the official train transform and loader (batch 64, shuffled, ragged batch kept)
    aug = S.args.nad_aug
    tf_train = transforms.Compose([transforms.RandomCrop(32, padding=4)]
                                  + ([transforms.RandomHorizontalFlip()] if aug == "official" else [])
                                  + [transforms.ToTensor()] + ([Cutout(1, 3)] if aug != "crop" else []))
    loader = torch.utils.data.DataLoader(PILSet(S.clean.x, S.clean.y, tf_train), batch_size=opt.batch_size, shuffle=True)

    class RecordingAT(nad_at.AT):
        """at.AT, recording each value it returns (train_step calls it for layer 3, 2, 1 in turn, main.py:31-33)."""

        def __init__(self, p):
            super().__init__(p)
            self.values = []

        def forward(self, fm_s, fm_t):
            loss = super().forward(fm_s, fm_t)
            self.values.append(loss.item())
            return loss

    def run(student: nn.Module, teacher: nn.Module, betas, epochs: int) -> list:
        """main.py:119-174 (``train``) without the file loading, the CUDA test and the checkpoint."""
        o = copy.copy(opt)
        o.beta1, o.beta2, o.beta3 = betas
        snet, tnet = ActivationNet(student, NAD_LAYERS), ActivationNet(teacher, NAD_LAYERS)
        tnet.eval()  # main.py:135
        nets = {"snet": snet, "tnet": tnet}  # main.py:137
        for q in tnet.parameters():  # main.py:139-140
            q.requires_grad = False
        optimizer = torch.optim.SGD(snet.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                    nesterov=True)  # main.py:143-147
        criterionCls = nn.CrossEntropyLoss()  # main.py:154
        criterionAT = RecordingAT(o.p)  # main.py:155
        per_epoch = []
        for epoch in range(0, o.epochs):  # main.py:162
            with contextlib.redirect_stdout(sys.stderr):
                adjust_learning_rate(optimizer, epoch, o.lr)  # main.py:164 (utils/util.py:68-79)
                criterions = {"criterionCls": criterionCls, "criterionAT": criterionAT}  # main.py:167
                start = len(criterionAT.values)
                nad_main.train_step(o, loader, nets, optimizer, criterions, epoch + 1)  # main.py:174
            v = np.array(criterionAT.values[start:]).reshape(-1, 3)[:, ::-1]  # -> layer 1, 2, 3
            per_epoch.append(v * np.array(betas, dtype=float))
        return per_epoch

    t0 = time.perf_counter()
    # Teacher: README "How to get teacher model": the backdoored model fine-tuned on the same clean data with
    # main.py and every beta 0, 5-10 epochs (10 here, the upper end); the teacher net of that run only feeds a zero term.
    teacher = S.fresh()
    run(teacher, S.fresh(), (0, 0, 0), S.args.nad_teacher_epochs)
    teacher.eval()
    student = S.fresh()
    betas = (opt.beta1, opt.beta2, opt.beta3)
    terms = run(student, teacher, betas, opt.epochs)
    seconds = time.perf_counter() - t0
    return {"model": student.eval(), "teacher": teacher, "seconds": seconds, "terms": terms, "betas": betas,
            "settings": {"epochs": opt.epochs, "teacher_epochs": S.args.nad_teacher_epochs, "batch_size": opt.batch_size,
                         "lr": opt.lr, "lr_schedule": "utils/util.py adjust_learning_rate: lr for epochs 0-1, 0.01 from 2",
                         "momentum": opt.momentum, "weight_decay": opt.weight_decay, "nesterov": True, "p": opt.p,
                         "betas": list(betas), "layers": list(NAD_LAYERS),
                         "augmentation": {"official": "RandomCrop(32,4), HFlip, Cutout(1,3)", "no-flip": "RandomCrop(32,4), Cutout(1,3)",
                                          "crop": "RandomCrop(32,4)"}[aug],
                         "ragged_batch": "kept (500 = 7x64 + 52)"}}


def nad_ours(S: Setup) -> dict:
    import defenses.nad as nad_mod

    captured = []
    base = nad_mod.AttentionDistillation

    class Capture(base):
        """Records the teacher and every student step's weighted AT terms (the package is not changed)."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.steps = []
            captured.append(self)

        def loss(self, model, x, y, out, loss):
            r = super().loss(model, x, y, out, loss)
            self.steps.append(list(self.last_terms))
            return r

    defense = DEFENSES.get("nad")(betas=(500.0, 1000.0, 1000.0), area_scaled=False, layers=NAD_LAYERS, p=2.0, epochs=20,
                                  teacher_epochs=S.args.nad_teacher_epochs, lr=0.1, milestones=(2,), gamma=0.1,
                                  momentum=0.9, weight_decay=1e-4, nesterov=True, batch_size=64)
    nad_mod.AttentionDistillation = Capture
    try:
        res, seconds = timed(defense, S.fresh(), S.clean, S.ctx())
    finally:
        nad_mod.AttentionDistillation = base
    cap = captured[-1]
    steps = np.array(cap.steps)
    per_epoch = np.array_split(steps, defense.epochs)
    return {"model": res.model, "teacher": cap.teacher, "seconds": seconds, "terms": per_epoch, "betas": defense.betas,
            "info": res.info, "settings": {k: v for k, v in defense.to_dict().items()} | {"augmentation": "RandomCrop(32,4) (GTSRB: no flip)",
                                                                                           "ragged_batch": "kept (7x64 + 52)"}}


@torch.no_grad()
def at_loss_eval(student: nn.Module, teacher: nn.Module, clean: ImageSet, betas, p: float = 2.0) -> list:
    """beta_j x the official AT term (at.py's map: sum_c |a|^p / ||.||_2; MSE) between the two final models, eval mode,
    on the unaugmented defense images: the same measurement for both sides."""
    from defenses.nad import attention_map

    s, t = ActivationNet(copy.deepcopy(student).eval(), NAD_LAYERS), ActivationNet(copy.deepcopy(teacher).eval(), NAD_LAYERS)
    sums = np.zeros(3)
    x = clean.x.float() / 255
    for i in range(0, len(x), 250):
        a, b = s(x[i:i + 250]), t(x[i:i + 250])
        for j in range(3):
            sums[j] += F.mse_loss(attention_map(a[j], p), attention_map(b[j], p), reduction="sum").item() / a[j][0, 0].numel()
    return [round(float(b * v / len(x)), 5) for b, v in zip(betas, sums)]


def nad_summary(S: Setup, r: dict) -> dict:
    first = r["terms"][0][0]
    last = r["terms"][-1].mean(0)
    return {
        "at_terms_first_step": [round(float(v), 5) for v in first],
        "at_terms_last_epoch_mean": [round(float(v), 5) for v in last],
        "at_terms_final_eval": at_loss_eval(r["model"], r["teacher"], S.clean, r["betas"]),
        "steps": int(sum(len(e) for e in r["terms"])),
    }


def run_nad(S: Setup, sides) -> None:
    for side in sides:
        r = nad_official(S) if side == "official" else nad_ours(S)
        inter = nad_summary(S, r)
        teacher = S.evaluate(r["teacher"])
        inter["teacher_ca_asr"] = [teacher["ca"], teacher["asr"]]
        emit("nad", side, {**S.evaluate(r["model"]), "seconds": round(r["seconds"], 1), "intermediate": inter,
                           "settings": r["settings"]}, S)


# ================================================================== i-BAU


def ibau_order(S: Setup, batch_size: int) -> torch.Tensor:
    """The order in which our i-BAU batches the defense images (defenses/ibau.py: one seeded permutation)."""
    from defenses.base import batches

    return torch.cat(batches(len(S.clean), batch_size, torch.Generator().manual_seed(S.run_seed)))


@torch.no_grad()
def fooling(model: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict:
    """Share of the defense images whose prediction the universal perturbation changes, and its loss (as our info)."""
    clean_pred = model(x).argmax(1)
    out = model(x + delta)
    return {"fooling_rate": round(float((out.argmax(1) != clean_pred).float().mean()), 5),
            "pert_loss": round(float(F.cross_entropy(out, clean_pred)), 5)}


def ibau_official(S: Setup) -> dict:
    with official_path(S.args.ibau, "--ibau"):
        import hypergrad as hg

    device = "cpu"
    batch_size, lr, n_rounds, K = 100, 0.001, 5, 5  # defense.py:123 (--batch_size), :126 (--lr), :129 (--n_rounds), :130 (--K)
    seed_globals(S.run_seed)  # loss_outer draws from Python's global random (defense.py:197): seeded here
    order = ibau_order(S, batch_size)
    x, y = S.x01()[order], S.clean.y[order]
    passes = S.args.ibau_passes
    # unl_set: defense.py:105-110 takes 5,000 clean test images; here the 500 defense images, in our batching order, repeated
    # `passes` times (10: the official 50 perturbation steps and 50 outer steps per round; 1: one pass, 5 and 5).
    unl_set = torch.utils.data.TensorDataset(x.repeat(passes, 1, 1, 1), y.repeat(passes))
    unlloader = torch.utils.data.DataLoader(unl_set, batch_size=batch_size, shuffle=False)  # defense.py:162-163 (no workers)

    model = S.fresh()
    outer_opt = torch.optim.Adam(model.parameters(), lr=lr)  # defense.py:172-173 (--optim Adam)
    images_list, labels_list = [], []
    state = {"batchnum": 0}

    def loss_inner(perturb, model_params):  # defense.py:181-189
        images = images_list[0].to(device)
        labels = labels_list[0].long().to(device)
        per_img = images + perturb[0]
        per_logits = model.forward(per_img)
        loss = F.cross_entropy(per_logits, labels, reduction="none")
        loss_regu = torch.mean(-loss) + 0.001 * torch.pow(torch.norm(perturb[0]), 2)
        return loss_regu

    def loss_outer(perturb, model_params):  # defense.py:192-204
        portion = 0.01
        images, labels = images_list[state["batchnum"]].to(device), labels_list[state["batchnum"]].long().to(device)
        patching = torch.zeros_like(images, device=device)  # :195 has device='cuda'
        number = images.shape[0]
        rand_idx = random.sample(list(np.arange(number)), int(number * portion))
        patching[rand_idx] = perturb[0]
        unlearn_imgs = images + patching
        logits = model(unlearn_imgs)
        criterion = nn.CrossEntropyLoss()
        loss = criterion(logits, labels)
        return loss

    for index, (images, labels) in enumerate(unlloader):  # defense.py:206-209
        images_list.append(images)
        labels_list.append(labels)
    inner_opt = hg.GradientDescent(loss_inner, 0.1)  # defense.py:210

    t0 = time.perf_counter()
    model.eval()  # defense.py:216
    rounds = []
    for round_ in range(n_rounds):  # defense.py:220
        batch_pert = torch.zeros_like(x[:1], requires_grad=True, device=device)  # :221 has device='cuda'
        batch_opt = torch.optim.SGD(params=[batch_pert], lr=10)  # :222
        for images, labels in unlloader:  # :224-233
            images = images.to(device)
            ori_lab = torch.argmax(model.forward(images), axis=1).long()
            per_logits = model.forward(images + batch_pert)
            loss = F.cross_entropy(per_logits, ori_lab, reduction="mean")
            loss_regu = torch.mean(-loss) + 0.001 * torch.pow(torch.norm(batch_pert), 2)
            batch_opt.zero_grad()
            loss_regu.backward(retain_graph=True)
            batch_opt.step()
        pert = batch_pert  # :236-237 (the L2 ball, line 236, is commented out)
        facts = {"pert_norm": round(float(pert.detach().norm()), 5), **fooling(model, x, pert.detach())}
        for batchnum in range(len(images_list)):  # :240-243
            state["batchnum"] = batchnum
            outer_opt.zero_grad()
            hg.fixed_point(pert, list(model.parameters()), K, inner_opt, loss_outer)
            outer_opt.step()
        with torch.no_grad():
            facts["defense_acc"] = round(float((model(x).argmax(1) == y).float().mean()), 5)
        rounds.append(facts)
        log(f"ibau official round {round_}: {facts}")
    seconds = time.perf_counter() - t0
    return {"model": model.eval(), "seconds": seconds, "per_round": rounds,
            "settings": {"rounds": n_rounds, "K": K, "lr": lr, "batch_size": batch_size, "pert_lr": 10, "pert_bound": None,
                         "steps_per_round": len(images_list), "passes": passes}}


def ibau_ours(S: Setup) -> dict:
    cls = DEFENSES.get("ibau")
    fields = set(cls.__dataclass_fields__)
    # Unbounded delta (defense.py:236-237): pert_norm inf, min(1, inf / ||delta||) = 1.
    kw = dict(rounds=5, K=5, lr=1e-3, batch_size=100, pert_lr=10.0, pert_norm=math.inf, reg=1e-3, inner_lr=0.1, portion=0.01)
    steps = 5 * S.args.ibau_passes  # the official loop's steps per round on these images (5 batches a pass)
    missing = []
    for name in ("search_steps", "outer_steps"):
        if name in fields:
            kw[name] = steps
        elif S.args.ibau_passes != 1:
            missing.append(f"no field {name}: one pass over the 5 batches per round")
    defense = cls(**kw)
    res, seconds = timed(defense, S.fresh(), S.clean, S.ctx())
    return {"model": res.model, "seconds": seconds, "per_round": res.info.get("per_round"), "missing": missing,
            "settings": defense.to_dict()}


def run_ibau(S: Setup, sides) -> None:
    for side in sides:
        r = ibau_official(S) if side == "official" else ibau_ours(S)
        inter = {"per_round": r["per_round"]}
        extra = {"missing_fields": r["missing"]} if r.get("missing") else {}
        emit("ibau", side, {**S.evaluate(r["model"]), "seconds": round(r["seconds"], 1), "intermediate": inter,
                            "settings": r["settings"]}, S, extra)


# ================================================================== FST


def fst_official(S: Setup) -> dict:
    with official_path(S.args.fst, "--fst"):
        from utils.aggregate_block.fix_random import fix_random

    # README.md's CIFAR-10 command: --lr 0.01 --epochs 10 --ft_mode fst --alpha 0.1; ft.py:67 --batch_size 128
    lr, epochs, alpha, batch_size = 0.01, 10, 0.1, 128
    fix_random(S.run_seed)  # ft.py:97 (random, numpy and torch global RNGs; the official run then builds its model from the torch RNG)
    net = S.fresh()
    head_name = "linear"  # ft.py:81 --linear_name: our classifier is model.net.linear
    head = net.net.linear
    # ft.py:190-195: the clean split through the train transform, batch 128, shuffled, ragged batch kept
    train_data = torch.utils.data.DataLoader(PILSet(S.clean.x, S.clean.y, bb_train_transform()), batch_size=batch_size,
                                             shuffle=True, drop_last=False)
    t0 = time.perf_counter()
    original_linear_norm = torch.norm(head.weight)  # ft.py:264
    weight_mat_ori = head.weight.data.clone().detach()  # ft.py:265
    param_list = []
    for name, param in net.named_parameters():  # ft.py:267-294 (init True for fst, ft.py:111-113)
        if head_name in name:
            if "weight" in name:
                std = 1 / math.sqrt(param.size(-1))
                param.data.uniform_(-std, std)
            else:
                param.data.uniform_(-std, std)
        param.requires_grad = True  # ft.py:285-287 (ft_mode fst: every parameter)
        param_list.append(param)
    ip_before = float((head.weight.detach() * weight_mat_ori).sum())
    optimizer = torch.optim.SGD(param_list, lr=lr, momentum=0.9)  # ft.py:297
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)  # ft.py:298
    per_step = S.args.fst_schedule == "step"
    if per_step:  # variant: the cosine stepped per optimiser step, as our trainer (bench/train.py lr_lambda)
        total = epochs * len(train_data)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    criterion = nn.CrossEntropyLoss()  # ft.py:299
    steps = 0
    for epoch in range(epochs):  # ft.py:301
        net.train()  # ft.py:309
        for batch_idx, (x, labels) in enumerate(train_data):  # ft.py:311
            log_probs = net(x)  # ft.py:315
            loss = torch.sum(head.weight * weight_mat_ori) * alpha + criterion(log_probs, labels.long())  # ft.py:319-320
            loss.backward()  # ft.py:323
            optimizer.step()  # ft.py:326
            optimizer.zero_grad()  # ft.py:327
            head.weight.data = head.weight.data * original_linear_norm / torch.norm(head.weight.data)  # ft.py:329-330
            steps += 1
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()  # ft.py:339
    seconds = time.perf_counter() - t0
    net.eval()
    return {"model": net, "seconds": seconds, "original": weight_mat_ori, "ip_before": ip_before, "steps": steps,
            "settings": {"epochs": epochs, "lr": lr, "alpha": alpha, "batch_size": batch_size, "momentum": 0.9,
                         "weight_decay": 0.0,
                         "schedule": "cosine per step (variant)" if per_step else "cosine per epoch (T_max = epochs)",
                         "augmentation": "RandomCrop(32,4)", "ragged_batch": "kept (500 = 3x128 + 116)"}}


def fst_ours(S: Setup) -> dict:
    defense = DEFENSES.get("fst")(epochs=10, lr=0.01, alpha=0.1, momentum=0.9, weight_decay=0.0, batch_size=128)
    model = S.fresh()
    original = model.net.linear.weight.detach().clone()
    res, seconds = timed(defense, model, S.clean, S.ctx())
    return {"model": res.model, "seconds": seconds, "original": original, "ip_before": res.info["inner_product_before"],
            "steps": defense.epochs * ragged_steps(len(S.clean), defense.batch_size), "settings": defense.to_dict()}


def run_fst(S: Setup, sides) -> None:
    for side in sides:
        r = fst_official(S) if side == "official" else fst_ours(S)
        w, w0 = r["model"].net.linear.weight.detach(), r["original"]
        inter = {"inner_product_before": round(r["ip_before"], 4),
                 "inner_product_after": round(float((w * w0).sum()), 4),
                 "cos_after": round(float(F.cosine_similarity(w.flatten(), w0.flatten(), dim=0)), 4),
                 "head_norm": [round(float(w.norm()), 4), round(float(w0.norm()), 4)], "steps": r["steps"]}
        emit("fst", side, {**S.evaluate(r["model"]), "seconds": round(r["seconds"], 1), "intermediate": inter,
                           "settings": r["settings"]}, S)


# ================================================================== FP


def bb_yaml(S: Setup, rel: str) -> dict:
    import yaml

    with official_path(S.args.bb, "--bb") as root:
        return yaml.safe_load((root / rel).read_text())


@torch.no_grad()
def head_inputs(net: nn.Module, head: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Inputs of ``head`` (the pooled features) for float images ``x`` in [0, 1], eval mode."""
    feats = []
    h = head.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    try:
        for i in range(0, len(x), batch):
            net(x[i:i + batch])
    finally:
        h.remove()
    return torch.cat(feats)


def bb_finetune(model: nn.Module, loader, epochs: int, cfg: dict) -> int:
    """BackdoorBench's fine-tuning as fp.py:398-426 runs it: argparser_opt_scheduler (train_settings_generate.py:35-39,
    66-67: SGD on the parameters that require grad, CosineAnnealingLR with T_max 100, stepped per epoch,
    trainer_cls.py:1767-1800) and one_forward_backward (trainer_cls.py:1149-1163: model.train(), cuda autocast and
    GradScaler, both disabled off CUDA, so float32 here). The per-epoch test passes (evaluation only) are left out."""
    model.train()  # fp.py:399
    model.requires_grad_()  # fp.py:400
    optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=cfg["lr"],
                                momentum=cfg["sgd_momentum"], weight_decay=cfg["wd"])
    assert cfg["lr_scheduler"] == "CosineAnnealingLR"
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    criterion = nn.CrossEntropyLoss()
    steps = 0
    for epoch in range(epochs):
        for x, labels in loader:
            model.train()
            log_probs = model(x)
            loss = criterion(log_probs, labels.long())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        scheduler.step()
    model.eval()
    return steps


def fp_official(S: Setup) -> dict:
    import torch.nn.utils.prune as prune

    cfg = bb_yaml(S, "config/defense/fp/gtsrb.yaml")
    with official_path(S.args.bb, "--bb"):
        from utils.aggregate_block.fix_random import fix_random
    fix_random(S.run_seed)  # fp.py:212 (yaml random_seed 0)
    model = S.fresh()
    netC = model.net  # BackdoorBench's network takes normalised images; ours normalises in model, then runs model.net
    netC.eval()  # fp.py:230
    netC.requires_grad_(False)  # fp.py:231
    # fp.py:254-255: the clean subset through the train transform, batch 256, shuffled
    dataset = PILSet(S.clean.x, S.clean.y, bb_train_transform())
    trainloader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], shuffle=True)
    # The clean and backdoor TEST sets of fp.py:257-270 (used for the stop rule: fp.py:352, :376): our test sets.
    test_x = S.test.x.float() / 255
    bd_x = S.triggered.x.float() / 255

    t0 = time.perf_counter()
    last_child_name, last_child = list(netC.named_children())[-1]  # fp.py:299 -> "linear"
    result_mid = {}
    hook = last_child.register_forward_hook(lambda m, i, o: result_mid.__setitem__("v", i[0]))  # fp.py:294-301
    with torch.no_grad():  # fp.py:304-313
        flag = 0
        for batch_idx, (inputs, *other) in enumerate(trainloader):
            _ = model(inputs)
            if flag == 0:
                activation = torch.zeros(result_mid["v"].size()[1])
                flag = 1
            activation += torch.sum(result_mid["v"], dim=[0]) / len(dataset)
    hook.remove()
    seq_sort = torch.argsort(activation)  # fp.py:315
    first_linear = next(m for _, m in last_child.named_modules() if isinstance(m, nn.Linear))  # fp.py:320-328
    prune_mask = torch.ones_like(first_linear.weight)  # fp.py:331
    # Pruning touches the head only, so the test accuracy of each step is computed from the head's inputs cached once
    # (the same predictions as fp.py:352-353's full forward passes, in a fraction of the time).
    f_test, f_bd = head_inputs(model, first_linear, test_x), head_inputs(model, first_linear, bd_x)
    y_stop = S.test.y
    if S.args.fp_stop_data == "defense":  # variant: the stop rule on the (unaugmented) defense images, as ours
        f_test, y_stop = head_inputs(model, first_linear, S.x01()), S.clean.y
    t_cache = time.perf_counter()

    def acc(f, y):
        with torch.no_grad():
            return float((first_linear(f).argmax(1) == y).float().mean())

    curve = []
    step = math.ceil(len(seq_sort) * cfg["once_prune_ratio"])
    for num_pruned in range(0, len(seq_sort), step):  # fp.py:339
        if num_pruned:  # fp.py:342-346
            pruned_channnel_index = seq_sort[0:num_pruned - 1]
            prune_mask[:, pruned_channnel_index] = torch.zeros_like(prune_mask[:, pruned_channnel_index])
            prune.custom_from_mask(first_linear, name="weight", mask=prune_mask)
        test_acc = acc(f_test, y_stop)  # fp.py:352
        test_asr = acc(f_bd, S.triggered.y_target)  # fp.py:353 (logged only)
        curve.append([num_pruned, int((prune_mask[0] == 0).sum()), round(test_acc, 4), round(test_asr, 4)])
        if num_pruned == 0:  # fp.py:372-375
            test_acc_cl_ori = test_acc
            last_index = 0
        if abs(test_acc - test_acc_cl_ori) / test_acc_cl_ori < cfg["acc_ratio"]:  # fp.py:376-380
            last_index = num_pruned
        else:
            break
    # last_net is netC itself (fp.py:340, 374, 377: no copy), so it keeps the mask of the step that broke the loop.
    pruned = int((prune_mask[0] == 0).sum())
    pruned_set = sorted(int(i) for i in torch.nonzero(prune_mask[0] == 0).flatten())
    prune_seconds = time.perf_counter() - t0 - (t_cache - t0)
    after_prune = S.evaluate(model)
    t1 = time.perf_counter()
    steps = bb_finetune(model, trainloader, cfg["epochs"], cfg)  # fp.py:398-426
    seconds = prune_seconds + (time.perf_counter() - t1)
    prune.remove(first_linear, "weight")
    return {"model": model, "seconds": seconds, "inter": {
        "channels_pruned": pruned, "channels_total": len(seq_sort), "pruned_channels": pruned_set,
        "last_index_within_bound": last_index,
        "stop_measure": "clean TEST accuracy (fp.py:352)" if S.args.fp_stop_data == "test" else "defense-data accuracy (variant)",
        "acc_unpruned": round(test_acc_cl_ori, 4), "prune_curve": curve, "after_prune": after_prune,
        "finetune_steps": steps},
        "settings": {k: cfg[k] for k in ("acc_ratio", "once_prune_ratio", "epochs", "batch_size", "lr", "lr_scheduler",
                                         "sgd_momentum", "wd")} | {"augmentation": "RandomCrop(32,4)",
                                                                    "ragged_batch": "kept (500 = 256 + 244)"}}


def fp_ours(S: Setup) -> dict:
    defense = DEFENSES.get("fp")(acc_ratio=0.1, prune_step=0.01, finetune_epochs=100, lr=0.01, momentum=0.9,
                                 weight_decay=5e-4, batch_size=256)
    res, seconds = timed(defense, S.fresh(), S.clean, S.ctx())
    info = res.info
    # CA / ASR right after pruning, for the table: the same channels zeroed on a fresh copy
    pruned_model = S.fresh()
    with torch.no_grad():
        pruned_model.net.linear.weight[:, info["pruned_channels"]] = 0
    return {"model": res.model, "seconds": seconds, "inter": {
        "channels_pruned": info["channels_pruned"], "channels_total": info["channels_total"],
        "pruned_channels": sorted(info["pruned_channels"]), "stop_measure": "defense-data accuracy",
        "acc_unpruned": round(info["acc_before"], 4), "acc_after_prune": round(info["acc_after_prune"], 4),
        "prune_curve": info["prune_curve"], "after_prune": S.evaluate(pruned_model),
        "finetune_steps": defense.finetune_epochs * ragged_steps(len(S.clean), defense.batch_size)},
        "settings": defense.to_dict()}


def run_fp(S: Setup, sides) -> None:
    for side in sides:
        r = fp_official(S) if side == "official" else fp_ours(S)
        emit("fp", side, {**S.evaluate(r["model"]), "seconds": round(r["seconds"], 1), "intermediate": r["inter"],
                          "settings": r["settings"]}, S)


# ================================================================== NC


def nc_driver_settings(root: Path) -> dict:
    """The module-level constants of gtsrb_visualize_example.py (lines 39-67), read from the file."""
    src = (root / "gtsrb_visualize_example.py").read_text()
    env: dict = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                env[node.targets[0].id] = eval(compile(ast.Expression(node.value), "<const>", "eval"), {"__builtins__": {}}, dict(env))
            except Exception:
                pass
    keys = ("BATCH_SIZE", "LR", "STEPS", "NB_SAMPLE", "MINI_BATCH", "INIT_COST", "REGULARIZATION", "ATTACK_SUCC_THRESHOLD",
            "PATIENCE", "COST_MULTIPLIER", "SAVE_LAST", "EARLY_STOP", "EARLY_STOP_THRESHOLD", "EARLY_STOP_PATIENCE",
            "UPSAMPLE_SIZE", "INTENSITY_RANGE", "Y_TARGET", "NUM_CLASSES")
    out = {k: env[k] for k in keys}
    vis = (root / "visualizer.py").read_text()
    out["RESET_COST_TO_ZERO"] = "RESET_COST_TO_ZERO = True" in vis  # visualizer.py:41 (the class default the driver keeps)
    return out


def keras_flow(n: int, batch_size: int):
    """ImageDataGenerator().flow(X, Y, batch_size) as gtsrb_visualize_example.py:105-111 builds it: keras_preprocessing
    1.0.2 (Keras 2.2.2's) Iterator._flow_index (image.py:1307-1323): a fresh np.random.permutation per pass, ragged last
    batch yielded, one endless stream shared by all labels (the generator is built once, :177); and
    get_random_transform's two flip draws per image (image.py:1077-1078), made even with flips off."""
    batch_index = 0
    while True:
        if batch_index == 0:
            index_array = np.random.permutation(n)  # image.py:1278-1281 (_set_index_array, shuffle=True)
        current_index = (batch_index * batch_size) % n
        if n > current_index + batch_size:
            batch_index += 1
        else:
            batch_index = 0
        idx = index_array[current_index:current_index + batch_size]
        np.random.random(2 * len(idx))  # the per-image flip draws of get_random_transform
        yield idx


class KerasAdam:
    """keras/optimizers.py Adam.get_updates (Keras 2.2.2, lines 472-500), amsgrad off, epsilon K.epsilon() = 1e-7."""

    def __init__(self, params, lr: float, beta_1: float, beta_2: float, epsilon: float = 1e-7) -> None:
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, beta_1, beta_2, epsilon
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        lr_t = self.lr * (math.sqrt(1.0 - self.b2 ** self.t) / (1.0 - self.b1 ** self.t))
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.mul_(self.b1).add_((1.0 - self.b1) * g)
            v.mul_(self.b2).add_((1.0 - self.b2) * g * g)
            p.sub_(lr_t * m / (v.sqrt() + self.eps))


def nc_reference_label(model: nn.Module, X: torch.Tensor, gen, y_target: int, c: dict, num_classes: int,
                       ce_mode: str, max_epochs: int) -> dict:
    """visualizer.py Visualizer.visualize (lines 320-466) for one label, with reset_state (269-299) and the graph of
    __init__ (128-257), in PyTorch. X: the images in the raw domain [0, 255], NCHW float32."""
    eps = 1e-7  # visualizer.py:61 EPSILON = K.epsilon()
    h, w = X.shape[-2:]
    # gtsrb_visualize_example.py:119-121: random initial pattern (raw) and mask, from NumPy's global RNG (seeded 123)
    pattern_init = np.random.random((h, w, 3)) * 255.0
    mask_init = np.random.random((h, w))
    # reset_state (visualizer.py:273-297)
    cost = 0.0 if c["RESET_COST_TO_ZERO"] else c["INIT_COST"]
    mask = np.expand_dims(np.clip(mask_init, 0, 1), axis=2)
    pattern = np.clip(pattern_init, 0, 255)
    mask_tanh = np.arctanh((mask - 0.5) * (2 - eps))
    pattern_tanh = np.arctanh((pattern / 255.0 - 0.5) * (2 - eps))
    mask_v = torch.tensor(mask_tanh, dtype=torch.float32).permute(2, 0, 1).contiguous()  # [1, H, W]
    pattern_v = torch.tensor(pattern_tanh, dtype=torch.float32).permute(2, 0, 1).contiguous()  # [3, H, W]
    mask_v.requires_grad_(True)
    pattern_v.requires_grad_(True)
    # visualizer.py:250-253: Adam(lr, beta_1=0.5, beta_2=0.9) on [pattern_tanh, mask_tanh]; reset_opt zeroes its state
    opt = KerasAdam([pattern_v, mask_v], c["LR"], 0.5, 0.9, eps)

    def squash_mask():  # visualizer.py:141-143 (mask_tensor_unrepeat)
        return torch.tanh(mask_v) / (2 - eps) + 0.5

    def squash_pattern():  # visualizer.py:209-211 (pattern_raw_tensor)
        return (torch.tanh(pattern_v) / (2 - eps) + 0.5) * 255.0

    target = torch.full((c["BATCH_SIZE"],), y_target, dtype=torch.long)
    mask_best, pattern_best, reg_best = None, None, float("inf")  # :327-330
    logs = []
    cost_set_counter = cost_up_counter = cost_down_counter = 0  # :333-336
    cost_up_flag = cost_down_flag = False  # :337-338
    early_stop_counter = 0  # :341
    early_stop_reg_best = reg_best  # :342
    epochs_run, stopped = 0, False
    for step in range(min(c["STEPS"], max_epochs)):  # :349
        loss_ce_list, loss_reg_list, loss_acc_list = [], [], []
        for idx in range(c["MINI_BATCH"]):  # :356
            xb = X[next(gen)]  # :357
            tgt = target[:len(xb)]  # :358-360
            m = squash_mask()
            p_raw = squash_pattern()
            x_adv_raw = (1 - m) * xb + m * p_raw  # :224-226 (mask operation in the raw domain; 'raw' preprocessing :163-164)
            logits = model(x_adv_raw / 255.0)  # the Keras model took raw pixels; ours takes [0, 1] and normalises inside
            if ce_mode == "keras":
                # :235 categorical_crossentropy(output_tensor, y_true_tensor): Keras' signature is (y_true, y_pred)
                # (keras/losses.py:68-69), so the softmax output is the "target" and the one-hot label the
                # "prediction", normalised and clipped to [1e-7, 1 - 1e-7] (tensorflow_backend.py:3214-3218):
                # -sum_k p_k log(clip(onehot_k)) = 16.12 (1 - p_t) + 1.2e-7 p_t
                probs = F.softmax(logits, dim=1)
                onehot = F.one_hot(tgt, num_classes).float()
                pred = (onehot / onehot.sum(-1, keepdim=True)).clamp(eps, 1.0 - eps)
                loss_ce = -(probs * torch.log(pred)).sum(-1)
            else:  # variant: the cross-entropy the code meant (log loss of the target label)
                loss_ce = F.cross_entropy(logits, tgt, reduction="none")
            loss_reg = m.abs().sum()  # :240-241: sum |mask repeated over 3 channels| / 3
            loss = loss_ce + loss_reg * cost  # :248 (per image)
            acc = (logits.argmax(1) == tgt).float()  # :233 categorical_accuracy
            # Keras' get_updates differentiates the per-image loss vector: tf.gradients sums it over the batch
            grads = torch.autograd.grad(loss.sum(), [pattern_v, mask_v])
            opt.step(grads)
            loss_ce_list.extend(loss_ce.detach().tolist())  # :365-368
            loss_reg_list.append(float(loss_reg.detach()))
            loss_acc_list.extend(acc.tolist())
        avg_loss_reg = float(np.mean(loss_reg_list))  # :370-373
        avg_loss_acc = float(np.mean(loss_acc_list))
        avg_loss_ce = float(np.mean(loss_ce_list))
        epochs_run += 1
        if avg_loss_acc >= c["ATTACK_SUCC_THRESHOLD"] and avg_loss_reg < reg_best:  # :376-382
            with torch.no_grad():
                mask_best = squash_mask()[0].clone()
                pattern_best = squash_pattern().clone()
            reg_best = avg_loss_reg
        logs.append((step, avg_loss_ce, avg_loss_reg, avg_loss_acc, reg_best, cost))  # :392-394
        if step % 50 == 0:
            log(f"  label {y_target} epoch {step}: cost {cost:.2e} acc {avg_loss_acc:.3f} reg {avg_loss_reg:.1f} best {reg_best:.1f}")
        if c["EARLY_STOP"]:  # :397-410
            if reg_best < float("inf"):
                if reg_best >= c["EARLY_STOP_THRESHOLD"] * early_stop_reg_best:
                    early_stop_counter += 1
                else:
                    early_stop_counter = 0
            early_stop_reg_best = min(reg_best, early_stop_reg_best)
            if cost_down_flag and cost_up_flag and early_stop_counter >= c["EARLY_STOP_PATIENCE"]:
                stopped = True
                break
        if cost == 0 and avg_loss_acc >= c["ATTACK_SUCC_THRESHOLD"]:  # :413-424
            cost_set_counter += 1
            if cost_set_counter >= c["PATIENCE"]:
                cost = c["INIT_COST"]
                cost_up_counter = 0
                cost_down_counter = 0
                cost_up_flag = False
                cost_down_flag = False
        else:
            cost_set_counter = 0
        if avg_loss_acc >= c["ATTACK_SUCC_THRESHOLD"]:  # :426-431
            cost_up_counter += 1
            cost_down_counter = 0
        else:
            cost_up_counter = 0
            cost_down_counter += 1
        if cost_up_counter >= c["PATIENCE"]:  # :433-441
            cost_up_counter = 0
            cost *= c["COST_MULTIPLIER"]
            cost_up_flag = True
        elif cost_down_counter >= c["PATIENCE"]:  # :442-450 (down multiple: cost_multiplier ** 1.5, :108)
            cost_down_counter = 0
            cost /= c["COST_MULTIPLIER"] ** 1.5
            cost_down_flag = True
    reached = mask_best is not None
    if mask_best is None or c["SAVE_LAST"]:  # :456-461
        with torch.no_grad():
            mask_best = squash_mask()[0].clone()
            pattern_best = squash_pattern().clone()
    return {"mask": mask_best, "pattern": pattern_best / 255.0, "norm": float(mask_best.abs().sum()),  # :132-133
            "reached": reached, "epochs": epochs_run, "early_stopped": stopped, "final_cost": cost,
            "last_acc": logs[-1][3], "reg_best": reg_best}


def png_quantise(mask: torch.Tensor) -> torch.Tensor:
    """What mad_outlier_detection.py:68-76 reads back: the mask saved as 8-bit PNG of mask x 255
    (gtsrb_visualize_example.py:159-161, utils_backdoor.dump_image -> array_to_img(scale=False), uint8), / 255."""
    return torch.from_numpy(np.asarray(mask.numpy() * 255).astype("uint8").astype("float32") / 255)


def mad_outlier(l1_norm_list, labels, threshold: float = 2.0) -> dict:
    """mad_outlier_detection.py:35-57."""
    l1 = np.asarray(l1_norm_list, dtype=float)
    consistency_constant = 1.4826
    median = np.median(l1)
    mad = consistency_constant * np.median(np.abs(l1 - median))
    min_mad = np.abs(np.min(l1) - median) / mad
    flag_list = []
    for i, y_label in enumerate(labels):
        if l1[i] > median:
            continue
        if np.abs(l1[i] - median) / mad > threshold:
            flag_list.append((y_label, l1[i]))
    flag_list = sorted(flag_list, key=lambda x: x[1])
    return {"median": round(float(median), 4), "mad": round(float(mad), 4), "anomaly_index": round(float(min_mad), 4),
            "anomaly_indices": [round(float(abs(v - median) / mad), 4) for v in l1],
            "flagged": [int(y) for y, _ in flag_list]}


def save_image_normalised(t: torch.Tensor) -> np.ndarray:
    """torchvision.utils.save_image(t, normalize=True) then matplotlib's imread of the PNG: a [C, H, W] tensor in any
    range -> HxWx3 float32 in [0, 1], min-max scaled and quantised to 8 bits (a 1-channel image is repeated to RGB)."""
    t = t.detach().float().clone()
    if t.dim() == 3 and t.size(0) == 1:
        t = torch.cat((t, t, t), 0)
    lo, hi = float(t.min()), float(t.max())
    t = t.clamp(lo, hi).sub_(lo).div_(max(hi - lo, 1e-5))
    arr = t.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    return arr.astype(np.float32) / 255.0


def bb_nc_unlearn(S: Setup, model: nn.Module, triggers: dict, flagged: list, cfg: dict) -> dict:
    """BackdoorBench defense/nc.py:759-845 (mitigation, d.), restated: the first 80 % of the clean subset kept, the last
    20 % stamped once with each flagged trigger as read back from its PNGs (save_result_to_dir, :215-233,
    save_image(normalize=True)), true labels kept; then 100 epochs of BackdoorBench's trainer."""
    n = len(S.clean)
    cut = int(n * (1 - cfg["unlearning_ratio"]))  # :780-781
    imgs = S.clean.x.permute(0, 2, 3, 1).numpy()  # HWC uint8, as data_set_o.wrapped_dataset[ii][0] (PIL images)
    x_new = [imgs[i] for i in range(cut)]  # :786-790
    y_new = [int(S.clean.y[i]) for i in range(cut)]
    for label in flagged:  # :792-816
        mask_image = save_image_normalised(triggers[label]["mask"][None])  # :793-795 (cv2.resize to 32x32: identity here)
        signal_mask = save_image_normalised(triggers[label]["pattern"] * triggers[label]["mask"][None]) * 255  # :796-798
        for ii in range(cut, n):
            x_np = np.array(imgs[ii]) * (1 - np.array(mask_image)) + np.array(signal_mask)  # :808
            x_np = np.clip(x_np.astype("uint8"), 0, 255)  # :809
            x_new.append(x_np)
            y_new.append(int(S.clean.y[ii]))
    x_t = torch.from_numpy(np.stack(x_new)).permute(0, 3, 1, 2).contiguous()
    y_t = torch.tensor(y_new)
    loader = torch.utils.data.DataLoader(PILSet(x_t, y_t, bb_train_transform()), batch_size=cfg["batch_size"],
                                         shuffle=True, drop_last=False)  # :825
    # :827-845 trains self.trainer's model: the backdoored model loaded at :600 (the model built at :760 and saved at
    # :848-852 is never trained; we evaluate the trained one). Optimiser and schedule: argparser_opt_scheduler (:603).
    steps = bb_finetune(model, loader, cfg["epochs"], cfg)
    return {"unlearn_images": len(x_t), "stamped": len(x_t) - cut, "steps": steps}


def nc_labels(S: Setup) -> list:
    if S.args.nc_labels == "all":
        return list(range(S.num_classes))
    labels = [int(v) for v in S.args.nc_labels.split(",")]
    return labels


def nc_official(S: Setup) -> dict:
    with official_path(S.args.nc, "--nc") as root:
        c = nc_driver_settings(root)
    cfg = bb_yaml(S, "config/defense/nc/gtsrb.yaml")
    labels = nc_labels(S)
    # gtsrb_visualize_example.py:200-202: the (known) target label is scanned first, then the rest in order
    order = [S.target] + [t for t in labels if t != S.target] if S.target in labels else labels
    random.seed(123)  # gtsrb_visualize_example.py:13-15 (TensorFlow's seed has no counterpart here)
    np.random.seed(123)
    torch.manual_seed(123)
    model = S.fresh()
    for q in model.parameters():
        q.requires_grad_(False)
    X = S.clean.x.float()  # raw [0, 255], as gtsrb_dataset_int.h5 (the official driver scans the 12,630 test images)
    gen = keras_flow(len(X), c["BATCH_SIZE"])  # :177
    t0 = time.perf_counter()
    results = {}
    for y_target in order:  # :203-211
        t = time.perf_counter()
        results[y_target] = nc_reference_label(model, X, gen, y_target, c, S.num_classes, S.args.nc_ce, S.args.nc_max_epochs)
        r = results[y_target]
        log(f"nc reference label {y_target}: norm {r['norm']:.2f} epochs {r['epochs']} reached {r['reached']} "
            f"early_stop {r['early_stopped']} cost {r['final_cost']:.2e} ({time.perf_counter() - t:.0f} s)")
    search_seconds = time.perf_counter() - t0
    norms_float = [results[t]["norm"] for t in labels]
    norms_png = [float(png_quantise(results[t]["mask"]).sum()) for t in labels]
    det = mad_outlier(norms_png, labels)  # mad_outlier_detection.py reads the masks back from 8-bit PNGs
    inter = {"labels": labels, "norms": [round(v, 2) for v in norms_float], "norms_png": [round(v, 2) for v in norms_png],
             **det, "epochs": [results[t]["epochs"] for t in labels], "reached": [results[t]["reached"] for t in labels],
             "final_cost": [results[t]["final_cost"] for t in labels], "search_seconds": round(search_seconds, 1),
             "ce": S.args.nc_ce}
    unlearn_model = model
    if det["flagged"] and not S.args.nc_detect_only:
        for q in unlearn_model.parameters():
            q.requires_grad_(True)
        seed_globals(S.run_seed)  # BackdoorBench nc.py:595 fix_random(random_seed) (yaml: 0, our default run seed)
        t1 = time.perf_counter()
        inter["unlearn"] = bb_nc_unlearn(S, unlearn_model, results, det["flagged"], cfg)
        inter["unlearn_seconds"] = round(time.perf_counter() - t1, 1)
    seconds = time.perf_counter() - t0
    return {"model": unlearn_model.eval(), "seconds": seconds, "inter": inter,
            "settings": {k: c[k] for k in ("BATCH_SIZE", "LR", "STEPS", "MINI_BATCH", "INIT_COST", "ATTACK_SUCC_THRESHOLD",
                                           "PATIENCE", "COST_MULTIPLIER", "EARLY_STOP_THRESHOLD", "EARLY_STOP_PATIENCE",
                                           "RESET_COST_TO_ZERO")} | {"max_epochs": S.args.nc_max_epochs,
                                                                     "unlearn": {k: cfg[k] for k in ("epochs", "batch_size", "lr", "sgd_momentum", "wd", "unlearning_ratio")}}}


def nc_ours(S: Setup) -> dict:
    from defenses.nc import anomaly_indices, flag_labels
    from defenses.trigger import reverse_triggers

    cls = DEFENSES.get("nc")
    fields = set(cls.__dataclass_fields__)
    kw = dict(epochs=min(1000, S.args.nc_max_epochs), batches_per_epoch=31, batch_size=32, lr=0.1, init_cost=1e-3,
              success_threshold=0.99, patience=5, cost_multiplier=2.0, early_stop_threshold=1.0, early_stop_patience=25,
              anomaly_threshold=2.0, unlearn_ratio=0.2, unlearn_epochs=100, unlearn_lr=0.01, unlearn_batch_size=256,
              momentum=0.9, weight_decay=5e-4)
    missing = []
    if "reset_cost_to_zero" in fields:
        kw["reset_cost_to_zero"] = True
    else:
        missing.append("no field for RESET_COST_TO_ZERO: the cost starts at init_cost")
    defense = cls(**kw)
    ctx = S.ctx()
    model = S.fresh()
    labels = nc_labels(S)
    t0 = time.perf_counter()
    if labels == list(range(S.num_classes)):
        res = defense(model, S.clean, ctx)
        info, out_model = res.info, res.model
        norms = torch.tensor(info["norms"])
    else:  # the defense's own steps (defenses/nc.py NeuralCleanse.__call__), on the label subset
        gen = torch.Generator().manual_seed(ctx.seed)
        trig = reverse_triggers(model, S.clean, labels, defense, gen=gen, device=ctx.device, bf16=ctx.bf16)
        idx, median, mad = anomaly_indices(trig.norms)
        is_flagged = flag_labels(trig.norms, defense.anomaly_threshold)
        flagged = sorted(torch.nonzero(is_flagged).flatten().tolist(), key=lambda i: (float(trig.norms[i]), i))
        norms = trig.norms
        below = trig.norms.double() <= median
        info = {"norms": [round(float(v), 4) for v in trig.norms], "median": round(median, 4), "mad": round(mad, 4),
                "anomaly_indices": [round(float(v), 4) for v in idx],
                "anomaly_index": round(float(idx[below].max()), 4) if below.any() else 0.0,
                "flagged": [int(trig.labels[i]) for i in flagged], "trigger_epochs": [int(v) for v in trig.epochs],
                "reached": [bool(v) for v in trig.reached], "trigger_steps": trig.steps}
        info["search_seconds"] = round(time.perf_counter() - t0, 1)
        if flagged and defense.unlearn_epochs > 0 and not S.args.nc_detect_only:
            t1 = time.perf_counter()
            defense.unlearn(model, S.clean, trig, torch.tensor(flagged), ctx)
            info["unlearn_seconds"] = round(time.perf_counter() - t1, 1)
        out_model = model
    seconds = time.perf_counter() - t0
    inter = {"labels": labels, "norms": [round(float(v), 2) for v in norms], "median": info["median"], "mad": info["mad"],
             "anomaly_index": info["anomaly_index"], "anomaly_indices": info["anomaly_indices"], "flagged": info["flagged"],
             "epochs": info.get("trigger_epochs"), "reached": info.get("reached"),
             "search_seconds": info.get("search_seconds"), "unlearn_seconds": info.get("unlearn_seconds")}
    return {"model": out_model.eval(), "seconds": seconds, "inter": inter, "missing": missing, "settings": defense.to_dict()}


def run_nc(S: Setup, sides) -> None:
    for side in sides:
        r = nc_official(S) if side == "official" else nc_ours(S)
        extra = {"missing_fields": r["missing"]} if r.get("missing") else {}
        emit("nc", side, {**S.evaluate(r["model"]), "seconds": round(r["seconds"], 1), "intermediate": r["inter"],
                          "settings": r["settings"]}, S, extra)


# ================================================================== main

RUNS = {"nad": run_nad, "ibau": run_ibau, "fst": run_fst, "fp": run_fp, "nc": run_nc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=sorted(RUNS))
    ap.add_argument("--side", default="both", choices=["official", "ours", "both"])
    ap.add_argument("--nad", help="fetched copy of github.com/bboylyg/NAD")
    ap.add_argument("--ibau", help="fetched copy of github.com/YiZeng623/I-BAU")
    ap.add_argument("--nc", help="fetched copy of github.com/bolunwang/backdoor")
    ap.add_argument("--fst", help="fetched copy of github.com/AISafety-HKUST/stable_backdoor_purification")
    ap.add_argument("--bb", help="fetched copy of github.com/SCLBD/BackdoorBench (FP; NC's unlearning)")
    ap.add_argument("--data-dir", default=os.environ.get("BENCH_DATA_DIR", "../shared/data"))
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--dataset", default=None, help="default: the preset's (quick: gtsrb)")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seed", type=int, default=0, help="the model's seed (the grid's), which also draws the defense images")
    ap.add_argument("--run-seed", type=int, default=None,
                    help="seed of the defenses' own randomness on both sides (default: --seed); the model and images stay")
    ap.add_argument("--defense-size", type=float, default=500, help="defense images (the grid's default 500)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-before", action="store_true", help="skip the line of the model before any defense")
    ap.add_argument("--nad-teacher-epochs", type=int, default=10, help="README: 5-10")
    ap.add_argument("--nad-aug", default="official", choices=["official", "no-flip", "crop"],
                    help="official NAD transform (crop, flip, Cutout); variants: without the flip; crop only (as ours on GTSRB)")
    ap.add_argument("--fst-schedule", default="epoch", choices=["epoch", "step"],
                    help="official FST cosine stepped per epoch (ft.py:339); variant: per step, as our trainer")
    ap.add_argument("--fp-stop-data", default="test", choices=["test", "defense"],
                    help="official FP stop rule on the clean test set (fp.py:352); variant: on the defense images, as ours")
    ap.add_argument("--ibau-passes", type=int, default=10,
                    help="official loader passes over the defense images per round (10: 50 steps, as 5,000 images; 1: 5)")
    ap.add_argument("--nc-labels", default="0", help="labels to reverse (comma list or 'all'); the target is scanned first")
    ap.add_argument("--nc-max-epochs", type=int, default=1000, help="cap on NC epochs per label (official STEPS = 1000)")
    ap.add_argument("--nc-ce", default="keras", choices=["keras", "log"],
                    help="reference loss: keras = the official call's swapped arguments (16.12 (1 - p_t)); log = cross-entropy")
    ap.add_argument("--nc-detect-only", action="store_true", help="skip the unlearning")
    args = ap.parse_args(argv)
    S = Setup(args)
    log(f"{S.job}\ndefense images: {len(S.clean)}; threads {torch.get_num_threads()}; {cpu_name()}")
    if not args.no_before:
        emit(args.method, "before", S.evaluate(S.model), S)
    sides = ["official", "ours"] if args.side == "both" else [args.side]
    RUNS[args.method](S, sides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
