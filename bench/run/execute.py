"""Executing a run: three executors of one task graph, and the driver's loop over finished tasks.

The graph (``bench.run.plan.graph``) has a train task per model and a task per cell, each cell
after its own model only: no stage barrier on any executor. Every executor takes the graph and
yields ``(task, result)`` in completion order; a task whose execution failed for good (its
worker died too often, its dependency failed) yields a ``TaskFailed``.

- ``InProcess`` (``--jobs 1``): here, each model followed by its cells.
- ``LocalProcesses`` (``--jobs N``): N loky worker processes on this machine (loky's reusable
  executor, as joblib uses it), ``cores // N`` torch threads per task; with ``--device cuda``
  each worker pins one visible GPU (``CUDA_VISIBLE_DEVICES``) on its first task.
- ``DaskCluster`` (``--scheduler ADDRESS`` or ``--scheduler-file FILE``): ``Client.submit`` per
  task with its own key and its dependencies' futures as arguments (Dask moves results between
  workers and retries a task whose worker died, up to ``distributed.scheduler.allowed-failures``);
  ``resources={"GPU": 1}`` per task on CUDA. Workers share the driver's model cache when they see
  its folder (checked at start by a probe file), else each trained model ships back as bytes in its
  task result (``--cache ship``) into the cells that need it and into the driver's cache.

The driver (``run_grid``) is the only writer of the run folder: records come back as results.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from bench.data import cache_dir
from bench.detect import NOT_APPLICABLE
from bench.metrics import pct
from bench.registry import BenchError, slug
from bench.run.cells import defend_task, detect_task, failed_record, train_task
from bench.run.plan import DefenseCell, DetectCell, Task, TrainJob, graph, model_dir, train_key
from bench.run.rundir import RECORDS_EVERY, RunDir, is_done
from bench.store import load_tensors, save_tensors

WORKER_ENV = ("BENCH_CACHE_DIR", "BENCH_DATA_DIR")  # the driver's folders, which local workers must use
FAULT_ENV = ("BENCH_FAULT", "BENCH_FAULT_ONCE")  # fault injection (bench.store.fault_point) reaches the workers too


@dataclass(frozen=True)
class TaskFailed:
    """A task that did not run to its end: the worker died, or a task it needs failed."""

    reason: str


def cpu_cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells it, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def auto_jobs(device: str) -> int:
    """``--jobs auto``: one worker process per CPU core, or one per visible GPU on CUDA."""
    return max(1, torch.cuda.device_count()) if device == "cuda" else cpu_cores()


# ---------------------------------------------------------------- what runs in a worker

_OWN_ENV: dict[str, str | None] = {}  # this worker's own folders (and fault settings), before any task set them
_GPU_SLOT: list = []  # (the open lock file, the GPU index) this worker process holds for its lifetime


def gpu_slot(n_gpus: int, folder: str) -> int:
    """Claim one of ``n_gpus`` GPUs for this process, for its lifetime (a lock file per GPU under
    ``folder``), and pin it with ``CUDA_VISIBLE_DEVICES`` (before CUDA starts in this process)."""
    import fcntl

    if _GPU_SLOT:
        return _GPU_SLOT[0][1]
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_gpus):
        f = open(Path(folder) / f"gpu-{i}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        _GPU_SLOT.append((f, i))
        os.environ["CUDA_VISIBLE_DEVICES"] = str(i)
        return i
    raise RuntimeError(f"all {n_gpus} GPU slots under {folder} are taken by other workers")


# glibc's mallopt parameters (malloc.h) and the values its dynamic thresholds grow to on 64-bit Linux.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX
_MALLOC_TUNED: list[bool] = []


def undo_malloc_trim_env() -> bool:
    """Give glibc's allocator back its large-block reuse where ``MALLOC_TRIM_THRESHOLD_`` took it away.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its config
    ``distributed.nanny.pre-spawn-environ``), so that idle workers hand memory back to the OS. Setting
    that variable also freezes glibc's mmap threshold at 128 KiB: every activation and gradient
    tensor above it is then mmap'ed, zero-faulted page by page and unmapped again, each step.
    Measured on a 2-core EPYC (AVX2, fp32, one thread, the demo's width-8 smallcnn, 40 steps;
    ``bench perf --grid`` showed it first: Dask's models trained 2.1-2.3x slower than loky's):
    2,374 img/s without the variable, 1,283 with it (9x the page faults, system time 2.3 s against
    0.4 s), 2,777 with it and this call. Here the thresholds are set to where glibc's dynamic
    adjustment would take them (mmap 32 MiB, trim twice that); memory freed stays with the process,
    as in a loky worker. Once per process, only where the variable is set and libc is glibc;
    returns whether it changed anything.
    """
    if _MALLOC_TUNED or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    _MALLOC_TUNED.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to undo
        return False


def in_worker(fn: Callable, threads: int | None, env: dict[str, str | None], gpus: tuple[int, str] | None, *args) -> Any:
    """Run ``fn(*args)`` with the driver's folders, this task's thread count and (CUDA, local) a pinned GPU.

    Reused workers (loky's, Dask's) may have run another grid: the folders are set on every task,
    and a folder ``env`` does not name is the worker's own (as it started), not the last grid's.
    """
    if not _OWN_ENV:
        _OWN_ENV.update({k: os.environ.get(k) for k in (*WORKER_ENV, *FAULT_ENV)})
    for k in (*WORKER_ENV, *FAULT_ENV):
        v = env.get(k, _OWN_ENV[k])
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if gpus is not None:
        gpu_slot(*gpus)
    if threads:
        torch.set_num_threads(threads)
    undo_malloc_trim_env()
    return fn(*args)


@dataclass(frozen=True)
class Settings:
    """What every task of a run gets besides its item."""

    device: str
    preset: str
    ship: bool = False
    progress: bool = False  # a per-model training bar (in-process only)
    keep_models: bool = False  # defense cells return the defended weights (--save-defended)
    # kind -> a task body with the real one's signature, in its place (``bench.perf_grid``'s stubs);
    # a kind it does not name runs the real body (``TASKS``).
    tasks: Mapping[str, Callable] | None = None


TASKS: dict[str, Callable] = {"train": train_task, "defend": defend_task, "detect": detect_task}


def task_call(task: Task, s: Settings) -> tuple[Callable, tuple]:
    """The function and leading arguments of ``task`` (its dependencies' results follow them)."""
    fn = (s.tasks or TASKS).get(task.kind) or TASKS[task.kind]
    if task.kind == "train":
        return fn, (task.item, task.item.key, s.device, s.ship, s.progress)
    if task.kind == "defend":
        return fn, (task.item, s.device, s.preset, s.keep_models)
    return fn, (task.item, s.device, s.preset)


# ---------------------------------------------------------------- the three executors


class Executor:
    """Runs a task graph; ``run`` yields ``(task, result or TaskFailed)`` in completion order."""

    name = "executor"
    threads: int | None = None  # torch threads per task (None: leave as is)

    def run(self, tasks: list[Task], s: Settings) -> Iterator[tuple[Task, Any]]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def close(self) -> None:
        pass


def _children(tasks: list[Task]) -> dict[str, list[Task]]:
    out: dict[str, list[Task]] = collections.defaultdict(list)
    for t in tasks:
        for d in t.deps:
            out[d].append(t)
    return out


class InProcess(Executor):
    """Here, one task at a time: each model, then its cells (``threads``: None keeps this process's count)."""

    name = "in-process"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, tasks, s):
        children = _children(tasks)
        results: dict[str, Any] = {}
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            def one(t: Task):
                fn, args = task_call(t, s)
                results[t.key] = fn(*args, *[results[d] for d in t.deps])
                return t, results[t.key]

            for t in tasks:
                if t.kind == "train":
                    yield one(t)
                    for c in children[t.key]:
                        if c.kind != "train":
                            yield one(c)
                elif not t.deps:
                    yield one(t)
        finally:
            torch.set_num_threads(before)


class LocalProcesses(Executor):
    """``jobs`` loky worker processes on this machine, each task started once its dependencies finished."""

    name = "local processes"

    def __init__(self, jobs: int, device: str = "cpu", threads: int | None = None) -> None:
        self.jobs = jobs
        self.threads = threads or (max(1, cpu_cores() // jobs) if device != "cuda" else None)
        # On CUDA, one GPU per worker: each claims a slot on its first task (auto_jobs gives one worker per GPU).
        self.gpus = (torch.cuda.device_count(), str(cache_dir() / "gpu-slots")) if device == "cuda" else None

    def describe(self) -> str:
        return f"{self.jobs} local processes, {self.threads or 'default'} thread(s) each"

    def run(self, tasks, s):
        from concurrent.futures import FIRST_COMPLETED, wait

        from joblib.externals.loky import get_reusable_executor

        pool = get_reusable_executor(max_workers=self.jobs, timeout=300)
        env = {k: os.environ.get(k) for k in (*WORKER_ENV, *FAULT_ENV)}
        children = _children(tasks)
        waiting = {t.key: len(t.deps) for t in tasks}
        results: dict[str, Any] = {}
        running: dict[Any, Task] = {}
        failed: dict[str, str] = {}

        def submit(t: Task) -> None:
            fn, args = task_call(t, s)
            running[pool.submit(in_worker, fn, self.threads, env, self.gpus, *args, *[results[d] for d in t.deps])] = t

        ready = collections.deque(t for t in tasks if not t.deps)
        while ready or running:
            while ready:
                submit(ready.popleft())
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                t = running.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    failed[t.key] = f"{type(exc).__name__}: {exc}"
                    yield t, TaskFailed(failed[t.key])
                    yield from _fail_dependents(t, children, failed)
                    continue
                results[t.key] = fut.result()
                yield t, results[t.key]
                for c in children[t.key]:
                    waiting[c.key] -= 1
                    if waiting[c.key] == 0 and c.key not in failed:
                        ready.append(c)


def _fail_dependents(t: Task, children: dict[str, list[Task]], failed: dict[str, str]) -> Iterator[tuple[Task, TaskFailed]]:
    for c in children[t.key]:
        if c.key not in failed:
            failed[c.key] = f"a task it needs failed ({t.key}): {failed[t.key]}"
            yield c, TaskFailed(failed[c.key])
            yield from _fail_dependents(c, children, failed)


class DaskCluster(Executor):
    """Tasks on a Dask cluster (``distributed``); see the module docstring."""

    name = "dask"

    def __init__(self, address: str | None = None, scheduler_file: str | None = None, *, device: str = "cpu",
                 cache: str = "auto", timeout: float = 10.0, threads: int | None = None) -> None:
        try:
            import distributed
        except ImportError:
            raise BenchError("--scheduler needs Dask's distributed package; install it with: pip install 'bdbench[dask]'") from None
        if scheduler_file is not None and not Path(scheduler_file).expanduser().is_file():
            raise BenchError(f"--scheduler-file {scheduler_file} does not exist; `dask scheduler --scheduler-file FILE` writes it")
        if cache not in ("auto", "shared", "ship"):
            raise BenchError(f"--cache {cache!r} is not allowed; allowed: auto, shared, ship")
        where = address or f"the scheduler in {scheduler_file}"
        try:
            self.client = distributed.Client(address, scheduler_file=scheduler_file and str(Path(scheduler_file).expanduser()),
                                             timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise BenchError(f"cannot reach the Dask scheduler at {where} within {timeout:.0f} s ({type(exc).__name__}); "
                             "is `dask scheduler` running there?") from None
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except (OSError, TimeoutError):
            self.client.close()
            raise BenchError(f"the Dask scheduler at {where} has no worker after {timeout:.0f} s; start `dask worker` processes") from None
        info = self.client.scheduler_info(**({"n_workers": -1} if _takes_n_workers(self.client) else {}))["workers"]
        self.gpu = device == "cuda"
        if self.gpu and not any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in info.values()):
            self.client.close()
            raise BenchError("--device cuda but no Dask worker offers a GPU; start workers with `dask worker ... --resources GPU=1`")
        # One torch thread count for every task, so a result does not depend on which worker ran it:
        # the fewest cores per task slot over the workers (cores on the host / task slots on the host).
        cores = self.client.run(cpu_cores)
        slots: dict[str, int] = collections.Counter()
        for w in info.values():
            slots[w["host"]] += w["nthreads"]
        self.threads = threads or max(1, min(cores[a] // slots[w["host"]] for a, w in info.items()))
        self.ship = self._ship(cache)
        services = self.client.scheduler_info(**({"n_workers": 0} if _takes_n_workers(self.client) else {})).get("services", {})
        self.dashboard = self.client.dashboard_link if "dashboard" in services else None
        self.workers = len(info)

    def _ship(self, cache: str) -> bool:
        """Whether models travel as bytes: the workers do not see the driver's cache folder (a probe file)."""
        if cache == "ship":
            return True
        probe = cache_dir() / f".probe-{secrets.token_hex(8)}"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(probe.name)
        try:
            seen = self.client.run(_sees, str(probe.resolve()), probe.name)
        finally:
            probe.unlink(missing_ok=True)
        shared = all(seen.values())
        if cache == "shared" and not shared:
            blind = ", ".join(a for a, ok in seen.items() if not ok)
            raise BenchError(f"--cache shared but worker(s) {blind} do not see the driver's cache {cache_dir()}; "
                             "put BENCH_CACHE_DIR on a shared filesystem, or use --cache ship")
        return not shared

    def describe(self) -> str:
        return (f"Dask: {self.workers} worker(s), {self.threads} thread(s) per task, models "
                f"{'shipped as bytes' if self.ship else 'in the shared cache'}" + (f"; dashboard {self.dashboard}" if self.dashboard else ""))

    def run(self, tasks, s):
        from distributed import as_completed

        # Shared cache: the workers use the driver's folders. Shipping: their own cache, the driver's data setting.
        env = {"BENCH_CACHE_DIR": str(cache_dir().resolve())} if not self.ship else {}
        for k in ("BENCH_DATA_DIR", *FAULT_ENV):
            if os.environ.get(k):
                env[k] = os.environ[k]
        token = secrets.token_hex(4)  # a rerun's keys never meet a dead driver's on the same scheduler
        futures: dict[str, Any] = {}
        by_future: dict[str, Task] = {}
        for i, t in enumerate(tasks):
            fn, args = task_call(t, s)
            # The graph's order as priority (models first, a clean reference before the attacks that need it),
            # as LocalProcesses runs it: without one, Dask ran a ready cell before the clean reference and
            # the reference -> trojan -> cells chain finished last (bench perf --grid, 2026-12-05).
            fut = self.client.submit(in_worker, fn, self.threads, env, None, *args, *[futures[d] for d in t.deps],
                                     key=f"{t.key}-{token}", pure=False, resources={"GPU": 1} if self.gpu else None,
                                     priority=len(tasks) - i)
            futures[t.key] = fut
            by_future[fut.key] = t
        children = _children(tasks)
        failed: dict[str, str] = {}
        for fut in as_completed(list(futures.values()), loop=self.client.loop):
            t = by_future[fut.key]
            if t.key in failed:
                continue
            if fut.status == "finished":
                result = fut.result()
                fut.release()
                yield t, result
            else:
                exc = fut.exception()
                failed[t.key] = f"{type(exc).__name__}: {exc}"
                yield t, TaskFailed(failed[t.key])
                yield from _fail_dependents(t, children, failed)

    def close(self) -> None:
        self.client.close()


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _sees(path: str, text: str) -> bool:
    try:
        return Path(path).read_text() == text
    except OSError:
        return False


def make_executor(*, jobs: int = 1, scheduler: str | None = None, scheduler_file: str | None = None,
                  device: str = "cpu", cache: str = "auto") -> Executor:
    """The executor the command line asks for: in-process, local processes, or a Dask cluster."""
    if scheduler and scheduler_file:
        raise BenchError("--scheduler and --scheduler-file both given; give one")
    if scheduler or scheduler_file:
        return DaskCluster(scheduler, scheduler_file, device=device, cache=cache)
    if cache == "ship":
        raise BenchError("--cache ship needs a Dask cluster (--scheduler); local workers share this machine's cache")
    return LocalProcesses(jobs, device) if jobs > 1 else InProcess()


# ---------------------------------------------------------------- the driver


class Progress:
    """One bar for the whole grid: models trained and cells done of the total, failures counted."""

    def __init__(self, tasks: list[Task], enabled: bool) -> None:
        self.total = collections.Counter(t.kind == "train" for t in tasks)
        self.done = collections.Counter()
        self.failed = 0
        self.bar = None
        if enabled and tasks:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(tasks), desc="grid", unit="task", leave=True)
            self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"models {self.done[True]}/{self.total[True]}, cells {self.done[False]}/{self.total[False]}, "
                                 f"failed {self.failed}", refresh=False)

    def say(self, log: Callable[[str], None], message: str) -> None:
        """A log line above the bar, not through it."""
        if self.bar is None:
            log(message)
            return
        with self.bar.external_write_mode():
            log(message)

    def update(self, task: Task, ok: bool) -> None:
        self.done[task.kind == "train"] += 1
        self.failed += not ok
        if self.bar is not None:
            self._show()
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_grid(
    cells: list[DefenseCell],
    out: str | os.PathLike,
    *,
    preset: str,
    device: str = "cpu",
    jobs: int = 1,
    executor: Executor | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    detect: list[DetectCell] = (),
    save_defended: str | os.PathLike | None = None,
    tasks: Mapping[str, Callable] | None = None,
    command: str | None = None,
) -> list[dict]:
    """Run ``cells`` (and the detection cells ``detect``) into ``out``; return this grid's removal records.

    ``executor`` (default: ``make_executor(jobs=jobs, device=device)``) runs the task graph; the
    driver writes each record as its result arrives, so a kill at any moment loses no finished cell.
    ``save_defended``: a folder where the driver writes each defended model (``<cell>.safetensors``,
    atomically, before the cell's record); a finished cell whose file is missing there runs again.
    ``tasks`` replaces task bodies by kind (``Settings.tasks``). ``command``: the command line that
    started the run, kept in each record it writes (the report's provenance).
    """
    rd = RunDir(out)
    own = executor is None
    with rd.lock():
        try:
            # Load each dataset once up front (its digest keys the models): a missing one fails here,
            # before any training, and the decoded-tensor cache is warm before workers start.
            for ds, data_dir in {(c.job.dataset, c.job.data_dir) for c in [*cells, *detect]}:
                ds.load(data_dir)
            if own:
                executor = make_executor(jobs=jobs, device=device)
            return _drive(rd, cells, list(detect), executor, preset=preset, device=device, progress=progress, log=log,
                          save_defended=Path(save_defended) if save_defended else None, bodies=tasks,
                          command=command)
        finally:
            if own and executor is not None:
                executor.close()


def _drive(rd: RunDir, cells, detect, executor: Executor, *, preset, device, progress, log, save_defended=None,
           bodies=None, command=None) -> list[dict]:
    order = [c.id for c in cells]
    rd.load()
    todo = [c for c in cells if not is_done(rd.records.get(c.id), c)
            or (save_defended is not None and not (save_defended / f"{c.id}.safetensors").exists())]
    if len(todo) < len(cells):
        log(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already finished")
    todo_det = [c for c in detect if not is_done(rd.detections.get(c.id), c)]
    if len(todo_det) < len(detect):
        log(f"resuming: {len(detect) - len(todo_det)} of {len(detect)} detection cells already finished")
    tasks = graph(todo, todo_det)
    wanted = {train_key(c.job) for c in [*todo, *todo_det]}
    s = Settings(device, preset, ship=getattr(executor, "ship", False),
                 progress=progress and isinstance(executor, InProcess), keep_models=save_defended is not None,
                 tasks=bodies)
    bar = Progress(tasks, progress and not s.progress)
    rd.write_records(order)
    try:
        for task, result in executor.run(tasks, s):
            ok = _handle(rd, task, result, wanted, preset, lambda m: bar.say(log, m), save_defended, command)
            bar.update(task, ok)
            rd.write_records(order, every=RECORDS_EVERY)
    finally:
        bar.close()
    recs = rd.write_records(order)
    keep = set(order)
    return [r for r in recs if r["cell"] in keep]


def _handle(rd: RunDir, task: Task, result: Any, wanted: set[str], preset: str, log, save_defended: Path | None = None,
            command: str | None = None) -> bool:
    """Write what a finished task produced; return whether it succeeded."""
    if task.kind == "train":
        job: TrainJob = task.item
        what = "clean reference" if task.key not in wanted else "backdoored" if job.attack.has_trigger else "clean"
        err = result.reason if isinstance(result, TaskFailed) else result["error"]
        if err is not None:
            log(f"training {what} {job.label} failed: {err}")
            return False
        if result.get("files"):  # shipped: the driver keeps a copy in its own cache
            from bench.run.cells import install_model

            install_model(job, result["files"])
        meta = result["meta"]
        m = meta["metrics"]
        log(f"{what} {job.label}: CA {pct(m['ca'])}  ASR {pct(m['asr'])}  ({meta['train']['seconds']:.0f} s)")
        example = rd.path / "examples" / f"{slug(job.dataset.name)}-{job.attack.name}.safetensors"
        if task.key in wanted and not example.exists():
            save_tensors(example, load_tensors(model_dir(job) / "example.safetensors"))
        return True
    cell = task.item
    rec = failed_record(cell, preset, result.reason) if isinstance(result, TaskFailed) else result
    if command:
        rec["command"] = command
    defended = rec.pop("_defended", None)
    if defended is not None and save_defended is not None and rec["status"] == "ok":
        save_tensors(save_defended / f"{rec['cell']}.safetensors", defended,
                     metadata={"cell": rec["cell"], "defense": json.dumps(rec["config"]["defense"]),
                               "checkpoint": json.dumps(rec.get("checkpoint")), "format": "bench.models.Classifier state dict"})
    rd.save_cell_tensors(rec)
    (rd.write_cell if task.kind == "defend" else rd.write_detection)(rec)
    log(_line(rec))
    return rec["status"] in ("ok", NOT_APPLICABLE)


def _line(rec: dict) -> str:
    """A finished cell as one log line."""
    if rec["status"] == NOT_APPLICABLE:
        return f"{rec['cell']}: not applicable ({rec['info']['reason']})"
    if rec["status"] != "ok":
        return f"{rec['cell']}: FAILED {rec['error']}"
    if "defense" in rec:
        m = rec["metrics"]
        return f"{rec['cell']}: CA {pct(m['ca'])}  ASR {pct(m['asr'])}  RA {pct(m['ra'])}  (defense {rec['seconds']['defense']:.1f} s)"
    d = rec["detection"]
    if rec["level"] == "model":
        return (f"{rec['cell']}: label {d['label']}  score {d['score']:.3g}  "
                f"(truth: {'target ' + str(rec['truth']['target']) if rec['truth']['backdoored'] else 'clean'}; "
                f"{rec['seconds']['detect']:.1f} s)")
    return (f"{rec['cell']}: AUROC {d['auroc']:.3f}  TPR@5%FPR {d['tpr_at_5fpr']:.3f}  P@k {d['precision_at_k']:.3f}  "
            f"({d['poisoned']} of {d['inputs']} {d['source']} inputs poisoned; {rec['seconds']['detect']:.1f} s)")
