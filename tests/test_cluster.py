"""The grid on a real Dask cluster: a `dask scheduler` and `dask worker` processes on 127.0.0.1, started here.

What must hold: the same records in-process, with local processes and on the cluster; a worker
killed while it trains, or the driver killed mid-grid, loses nothing and doubles nothing; workers
with their own caches get the models shipped; a task whose worker dies every time is recorded as
failed with the reason while the rest finish; bad cluster input fails on one line before any work.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")  # the test extra installs it; CI always has it

from bench.run.execute import DaskCluster, InProcess, LocalProcesses, gpu_slot, make_executor, run_grid  # noqa: E402
from bench.run.plan import GridSpec  # noqa: E402
from bench.registry import BenchError  # noqa: E402

TINY = {"synthetic": {"n_train": "300", "n_test": "100"}, "smallcnn": {"width": "4"}, "train": {"epochs": "1", "batch_size": "64"},
        "run": {"defense_data": "40"}}
SETS = [f"--set={c}.{k}={v}" for c, kv in TINY.items() for k, v in kv.items()]
DASK = str(Path(sys.executable).parent / "dask")
QUIET = {"preset": "demo", "progress": False, "log": lambda m: None}


class Cluster:
    """A scheduler and one `dask worker` process per entry of ``worker_env`` (each with its own extra environment)."""

    def __init__(self, tmp: Path, worker_env: list[dict[str, str]]) -> None:
        self.file = tmp / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.logs = tmp
        self.procs.append(self._start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                       "--scheduler-file", str(self.file)], {}, "scheduler"))
        for _ in range(100):
            if self.file.exists():
                break
            time.sleep(0.2)
        self.workers = [self._start(["worker", "--scheduler-file", str(self.file), "--nthreads", "1", "--no-dashboard",
                                     "--name", f"w{i}"], env, f"worker{i}") for i, env in enumerate(worker_env)]
        self.procs += self.workers
        from distributed import Client

        with Client(scheduler_file=str(self.file), timeout=30) as c:
            c.wait_for_workers(len(worker_env), timeout=120)
            self.address = c.scheduler.address

    def _start(self, args: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        return subprocess.Popen([DASK, *args], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def close(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module: two workers, each with its own model cache (``w0``, ``w1``); a grid that
    shares the driver's cache points them at it per task, a shipping grid leaves them their own."""
    tmp = tmp_path_factory.mktemp("cluster")
    c = Cluster(tmp, [{"BENCH_CACHE_DIR": str(tmp / "w0")}, {"BENCH_CACHE_DIR": str(tmp / "w1")}])
    c.tmp = tmp
    yield c
    c.close()


def _cells(attacks=("badnets", "blend"), defenses=("none", "ft"), detectors=("strip",)):
    return GridSpec(attacks=list(attacks), defenses=list(defenses), detectors=list(detectors), preset="demo",
                    overrides=TINY).plan()


def _comparable(recs: list[dict]) -> list[tuple]:
    """What must not depend on where a cell ran: the cell, its status, metrics, the model's metrics, the
    detection, and the defense's facts (not its timings)."""
    def facts(info: dict) -> dict:
        return {k: v for k, v in info.items() if "second" not in k and k != "tensors_file"}

    return sorted((r["cell"], r["status"], json.dumps(r.get("metrics")), json.dumps(r.get("backdoor")),
                   json.dumps(r.get("detection"), sort_keys=True), json.dumps(facts(r["info"]), sort_keys=True)) for r in recs)


def _all_records(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    recs += [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    return recs


@pytest.mark.slow
def test_in_process_local_processes_and_a_dask_cluster_give_identical_records(tmp_path, cluster, monkeypatch):
    cells, det = _cells()
    c = cluster
    outs = {}
    for name, make in [("inproc", lambda: InProcess(threads=1)), ("local", lambda: LocalProcesses(2, threads=1)),
                       ("dask", lambda: DaskCluster(c.address, threads=1))]:
        monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / f"cache-{name}"))  # every model trained anew by each
        ex = make()
        try:
            run_grid(cells, tmp_path / name, executor=ex, detect=det, **QUIET)
        finally:
            ex.close()
        outs[name] = _comparable(_all_records(tmp_path / name))
    assert len(outs["inproc"]) == 6 and all(r[1] == "ok" for r in outs["inproc"])
    assert outs["local"] == outs["inproc"]
    assert outs["dask"] == outs["inproc"]


def _run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


GRID = ["--attack", "badnets,blend", "--defense", "none,ft", "--preset", "demo", "--quiet", *SETS]


@pytest.mark.slow
def test_a_worker_killed_while_it_trains_loses_nothing(tmp_path, cluster):
    """One worker SIGKILLs itself as it starts a training (once, whichever worker gets there first; the
    driver's BENCH_FAULT reaches the workers); Dask reruns the task elsewhere: the grid completes, every
    cell once, metrics equal to an undisturbed run."""
    once = tmp_path / "killed-once"
    c = cluster
    res = _run([*GRID, "--scheduler", c.address, "--out", str(tmp_path / "run")],
               env={"BENCH_CACHE_DIR": str(tmp_path / "cache"), "BENCH_FAULT": "kill:train_started", "BENCH_FAULT_ONCE": str(once)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert once.exists(), "a worker was killed"
    quiet = _run([*GRID, "--jobs", "2", "--out", str(tmp_path / "ref")], env={"BENCH_CACHE_DIR": str(tmp_path / "cache-ref")})
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in recs) == sorted({r["cell"] for r in recs}) and len(recs) == 4
    ref = [json.loads(line) for line in (tmp_path / "ref" / "records.jsonl").read_text().splitlines()]
    assert _comparable(recs) == _comparable(ref)


@pytest.mark.slow
def test_the_driver_killed_mid_grid_resumes_on_the_same_cluster(tmp_path, cluster):
    from bench.store import FAULT_EXIT

    c = cluster
    args = [*GRID, "--scheduler-file", str(c.file), "--out", str(tmp_path / "run")]
    env = {"BENCH_CACHE_DIR": str(tmp_path / "cache")}
    killed = _run(args, env={**env, "BENCH_FAULT": "after:cell_written:2"})
    assert killed.returncode == FAULT_EXIT, killed.stderr[-3000:]
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").glob("*.json")}
    assert len(first) == 2
    done = _run(args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 2 of 4 cells already finished" in done.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").glob("*.json")}
    assert len(after) == 4 and all(after[n] == t for n, t in first.items()), "finished cells are not recomputed"
    recs = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert sorted(r["cell"] for r in recs) == sorted(n[:-5] for n in after) and len(recs) == 4
    assert all(r["status"] == "ok" for r in recs)
    leftovers = [p for p in (tmp_path / "run").rglob(".*") if p.name != ".lock"]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_workers_with_their_own_caches_get_the_models_shipped(tmp_path, cluster):
    c = cluster
    driver_cache = tmp_path / "driver"
    res = _run(["--attack", "badnets,lc", "--defense", "none,ft", "--preset", "demo", "--quiet", *SETS,
                "--scheduler", c.address, "--cache", "ship", "--out", str(tmp_path / "run")], env={"BENCH_CACHE_DIR": str(driver_cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "models shipped as bytes" in res.stdout
    held = sorted(p.name.split("-")[2] for p in (driver_cache / "models").iterdir() if (p / "meta.json").exists())
    assert held == ["badnets", "clean", "lc"], "the driver's cache holds every model, LC's clean reference included"
    trained_by_workers = {p.name for w in ("w0", "w1") for p in (c.tmp / w / "models").glob("*")}
    assert {p.name for p in (driver_cache / "models").iterdir()} <= trained_by_workers
    recs = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)


@pytest.mark.slow
def test_a_task_whose_worker_dies_every_time_fails_alone_with_the_reason(tmp_path, cluster):
    c = cluster  # every try at training blend kills its worker (BENCH_FAULT reaches the workers)
    res = _run([*GRID, "--scheduler", c.address, "--out", str(tmp_path / "run")],
               env={"BENCH_CACHE_DIR": str(tmp_path / "cache"), "BENCH_FAULT": "kill:train_started@/blend/"}, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    recs = {r["defense"] + "/" + r["attack"]: r for r in
            (json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines())}
    assert [recs[k]["status"] for k in ("none/badnets", "ft/badnets")] == ["ok", "ok"]
    for k in ("none/blend", "ft/blend"):
        assert recs[k]["status"] == "failed" and "KilledWorker" in recs[k]["error"], recs[k]["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "tcp://127.0.0.1:{port}"], "cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 10 s"),
    (["--scheduler-file", "{tmp}/nosuch.json"], "--scheduler-file {tmp}/nosuch.json does not exist"),
    (["--scheduler", "tcp://127.0.0.1:{port}", "--jobs", "2"], "--jobs 2 with a Dask scheduler"),
    (["--cache", "ship"], "--cache ship is for Dask workers"),
])
def test_bad_cluster_input_fails_on_one_line_before_any_work(tmp_path, args, message):
    port = _free_port()
    fill = lambda s: s.format(port=port, tmp=tmp_path)  # noqa: E731
    t0 = time.monotonic()
    res = _run([*GRID, "--out", str(tmp_path / "run"), *map(fill, args)], env={"BENCH_CACHE_DIR": str(tmp_path / "cache")}, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and fill(message) in lines[0], res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "models").exists(), "nothing was started"
    assert time.monotonic() - t0 < 60  # no hang (the subprocess timeout would raise first)


@pytest.mark.slow
def test_cuda_without_a_gpu_worker_is_refused_before_any_work(tmp_path, cluster):
    c = cluster
    res = _run([*GRID, "--scheduler", c.address, "--device", "cuda", "--out", str(tmp_path / "run")],
               env={"BENCH_CACHE_DIR": str(tmp_path / "cache")}, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --device cuda but no Dask worker offers a GPU; start workers with `dask worker ... --resources GPU=1`")
    assert not (tmp_path / "run").exists()


def test_without_dask_the_scheduler_option_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(BenchError, match=r"pip install 'bdbench\[dask\]'"):
        make_executor(scheduler="tcp://127.0.0.1:1")


def _claim(n: int, folder: str, q) -> None:
    try:
        q.put((gpu_slot(n, folder), os.environ.get("CUDA_VISIBLE_DEVICES")))
    except RuntimeError as exc:
        q.put(("refused", str(exc)))
    time.sleep(3)  # hold the slot while the others claim theirs


def test_each_local_worker_pins_its_own_gpu(tmp_path):
    """--device cuda --jobs N: each worker process claims one GPU slot for its lifetime and pins it with
    CUDA_VISIBLE_DEVICES; no two share one, and a worker beyond the GPUs is refused."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(2, str(tmp_path), q)) for _ in range(3)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=60) for _ in procs), key=lambda t: (t[0] == "refused", str(t)))
    for p in procs:
        p.join(timeout=30)
    assert got[:2] == [(0, "0"), (1, "1")] and got[2][0] == "refused", got


_FAULTS = """
import resource, sys, torch
from bench.run.execute import in_worker

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        x = torch.ones(1 << 20)  # 4 MiB, above a frozen 128 KiB mmap threshold, below 32 MiB
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()  # warm-up: torch's first allocations
raw = faults()
tuned = in_worker(faults, None, {}, None)
print(raw, tuned)
"""


def test_a_worker_started_with_dasks_malloc_trim_setting_reuses_large_blocks_again():
    """Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_ set, which makes glibc mmap and fault in every
    large tensor anew (training ran at half speed on Dask workers); a task undoes that in its process."""
    import dask.config

    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")  # the premise
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True).stdout
    raw, tuned = map(int, out.split())
    assert raw > 30 * 500  # each 4 MiB tensor faulted in page by page (1,024 pages)
    assert tuned * 10 < raw, (raw, tuned)
    env.pop("MALLOC_TRIM_THRESHOLD_")
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True).stdout
    raw, tuned = map(int, out.split())
    assert raw * 10 < 30 * 1024  # without the variable glibc reuses the block: the premise of the fix
