"""``bench perf --driver``: the stub-task simulation of a grid records every cell once and a rerun runs nothing.

No timing is asserted; the figures are benchmarks (docs/performance.md).
"""

import json
import pickle

from click.testing import CliRunner

from bench.cli import main
from bench.perf_grid import GRID_ATTACKS, driver_perf, grid_spec
from bench.run.plan import reference_job


def test_driver_simulation_records_every_cell_once_and_a_rerun_runs_nothing(tmp_path):
    r = driver_perf([50], tmp_path)
    (s,) = r["sizes"]
    assert s["cells"] == 50 == len(set(s["planned_cells"]))
    # one file and one records.jsonl line per cell, in grid order; every cell run once, returned once
    assert s["jsonl_cells"] == s["planned_cells"]
    assert s["cell_files"] == s["defend_calls"] == s["returned"] == 50
    # 5 attacks x 1 seed, and one clean reference for the attacks that need one (trojan, lc, lf): each model once
    plan = grid_spec(50).plan()
    jobs = {c.job.key for c in plan.defense_cells}
    refs = {reference_job(c.job).key for c in plan.defense_cells if c.job.attack.needs_clean_model}
    assert s["models"] == len(jobs | refs) == 6
    # the rerun on the finished folder finds every cell done and calls no task body
    assert s["resume_calls"] == 0 and s["resume_returned"] == 50
    assert 2 <= s["record_kb"] <= 8  # real-sized records (base_record's shape with its departures, an oracle curve)
    assert r["ratio"] == 1.0 and s["driver_ms_per_cell"] > 0 and s["resume_s"] > 0


def test_grid_sizes_multiply_attacks_defenses_and_seeds():
    assert len(grid_spec(1000).plan().defense_cells) == 1000
    spec = grid_spec(10_000)
    assert spec.attacks == GRID_ATTACKS and len(spec.seeds) == 100


def test_a_train_jobs_memoised_key_is_not_pickled():
    """A worker computes the key from its own copy of the data; a pickled memo would hide a different copy."""
    job = grid_spec(1).plan().defense_cells[0].job
    key = job.key
    assert "_key" in job.__dict__
    again = pickle.loads(pickle.dumps(job))
    assert "_key" not in again.__dict__ and again == job and again.key == key


def test_cli_perf_driver_writes_the_figures(tmp_path):
    out = tmp_path / "perf.json"
    res = CliRunner().invoke(main, ["perf", "--driver", "--cells", "20,30", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert [s["cells"] for s in r["sizes"]] == [20, 30] and "ms/cell" in res.output and "resume s" in res.output
    assert all(s["resume_calls"] == 0 and s["cell_files"] == s["cells"] for s in r["sizes"])


def test_cli_perf_refuses_two_measurements():
    res = CliRunner().invoke(main, ["perf", "--driver", "--grid"])
    assert res.exit_code == 2 and "give one" in res.output
