"""Every reduction in plain sight: a cell's departures from the official settings in its record and reports,
the one fine-tuning rule, settings that cannot work refused at planning, and `--compare`'s protocol note."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.official import describe
from bench.report.compare import compare_markdown
from bench.report.grid import DEPARTURE_MARK, build_tables
from bench.report.html import summary_html
from bench.report.tables import csv_rows, latex_table, markdown_table
from bench.run.cells import departures
from bench.run.execute import run_grid
from bench.run.plan import GridSpec

from test_folder_dataset import write_folder
from test_report import md_cells, rec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"synthetic": {"n_train": "300", "n_test": "100"}, "smallcnn": {"width": "4"}, "train": {"epochs": "1", "batch_size": "64"},
        "run": {"defense_data": "40", "sweep": "false"}}


def plan(defenses, preset="demo", **overrides):
    ov = {**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in overrides.items()}}
    return GridSpec(attacks=["badnets"], defenses=defenses, preset=preset, overrides=ov).plan().defense_cells


# ---------------------------------------------------------------- the record and the report


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """A tiny demo grid: none, ANP (the demo caps its iterations, a declared departure) and CLP (official)."""
    cells = plan(["none", "anp", "clp"], anp={"iterations": "3"})
    return run_grid(cells, tmp_path_factory.mktemp("run") / "run", preset="demo", progress=False, log=lambda m: None)


def test_a_preset_reduction_is_in_the_record_with_its_official_value(records):
    by = {r["defense"]: r for r in records}
    assert all(r["status"] == "ok" for r in records), [r["error"] for r in records]
    anp = {d["field"]: d for d in by["anp"]["departures"]}
    assert anp["anp.max_epochs"]["value"] == 25.0 and anp["anp.max_epochs"]["official"] == 0.0  # the demo's cap
    assert anp["anp.max_epochs"]["kind"] == "defense" and "ANP_backdoor" in anp["anp.max_epochs"]["source"]
    assert anp["anp.iterations"]["value"] == 3 and anp["anp.iterations"]["official"] == 2000  # --set
    # The defense data: 40 images against the official 1 % of the 300 training images (3).
    assert anp["anp.defense_data"]["official"].startswith("3 images")
    # The recipe against the paper protocol's, the same in every cell of the model.
    for r in records:
        train = {d["field"]: d for d in r["departures"] if d["kind"] == "train"}
        assert train["train.epochs"]["value"] == 1 and train["train.epochs"]["official"] == 60
    # CLP is data-free and at its official u: only the recipe and the model's own fields depart; none draws no data.
    assert {d["kind"] for d in by["clp"]["departures"]} <= {"train", "dataset", "model"}
    assert by["none"]["info"]["defense_images"] == 0 and by["clp"]["info"]["defense_images"] == 0


def test_the_rendered_tables_mark_departing_cells_and_list_what_departs(records):
    md = markdown_table(records)
    cells = md_cells(md)
    assert cells[("badnets", "anp CA")].endswith(DEPARTURE_MARK) and not cells[("badnets", "anp ASR")].endswith(DEPARTURE_MARK)
    assert "defense anp: " in md and "anp.max_epochs 25 (official 0)" in md and "every cell: " in md
    assert "train.epochs 1 (official 60)" in md.split("every cell: ")[1].splitlines()[0]
    html = summary_html(build_tables(records))
    assert f"{DEPARTURE_MARK}</td>" in html and "anp.max_epochs 25 (official 0)" in html
    assert r"$^\ddagger$" in latex_table(records)
    row = {r["defense"]: r for r in csv_rows(records) if r["attack"] == "badnets"}
    assert "anp.max_epochs 25 (official 0)" in row["anp"]["departures"] and "anp." not in (row["clp"]["departures"] or "")


def test_a_cell_at_official_settings_carries_no_mark():
    recs = [rec("badnets", "none", 0, 0.95, 1.0, 0.0), rec("badnets", "clp", 0, 0.9, 0.1, 0.8)]
    for r in recs:
        r["departures"] = []
    md = markdown_table(recs)
    assert DEPARTURE_MARK not in md and "official" not in md
    recs[1]["departures"] = [{"field": "clp.u", "value": 2.0, "official": 3.0, "kind": "defense", "source": "s"}]
    md = markdown_table(recs)
    cells = md_cells(md)
    assert cells[("badnets", "clp CA")].endswith(DEPARTURE_MARK) and not cells[("badnets", "none CA")].endswith(DEPARTURE_MARK)
    assert "clp.u 2 (official 3)" in md


# ---------------------------------------------------------------- the fine-tuning rule


def test_the_fine_tuning_rule_scales_every_official_rate_to_the_recipe_in_one_place():
    cells = {c.defense.name: c for c in plan(["ft", "fp", "nad", "nc", "fst", "ibau"])}  # the demo trains at lr 0.2
    assert cells["ft"].defense.lr == pytest.approx(0.2) and cells["fp"].defense.lr == pytest.approx(0.2)  # 0.01 x 0.2 / 0.01
    assert cells["nc"].defense.unlearn_lr == pytest.approx(0.2)
    assert cells["nad"].defense.lr == pytest.approx(0.2)  # 0.1 x 0.2 / 0.1
    assert cells["fst"].defense.lr == pytest.approx(0.02)  # 0.01 x 0.2 / 0.1
    assert cells["ibau"].defense.lr == pytest.approx(1e-3)  # Adam-trained reference: kept
    assert cells["ft"].finetune["scale"] == pytest.approx(20) and cells["ibau"].finetune["scale"] == 1
    ft = {d["field"]: d for d in departures(cells["ft"])}
    assert "fine-tuning rule: x20" in describe(ft["ft.lr"]) and ft["ft.lr"]["official"] == 0.01
    # --set wins over the rule; run.finetune_lr=official keeps the official constants; another recipe, another scale.
    assert plan(["ft"], ft={"lr": "0.05"})[0].defense.lr == 0.05
    official = {c.defense.name: c.defense for c in plan(["ft", "nad"], run={"finetune_lr": "official"})}
    assert official["ft"].lr == 0.01 and official["nad"].lr == 0.1
    assert plan(["ft"], train={"lr": "0.05"})[0].defense.lr == pytest.approx(0.05)


def test_a_user_plugin_without_a_table_has_no_departures_and_no_rule():
    from bench import finetune

    @dataclasses.dataclass(frozen=True)
    class Mine:
        lr: float = 0.5

    assert finetune.apply(Mine(), 0.1, "recipe", set()) == (Mine(), None)


# ---------------------------------------------------------------- settings that cannot work: before any work


def test_a_folder_too_small_for_the_defense_data_fails_at_planning_and_none_needs_none(tmp_path, monkeypatch):
    import bench.run.cells as cells

    root = write_folder(tmp_path / "signs", n_train=60, n_test=10)  # 180 training images, 3 classes
    trained = []
    monkeypatch.setattr(cells, "train", lambda *a, **k: trained.append(1))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", "--attack", "badnets", "--defense", "rnp", "--dataset", f"folder:{root}",
                                    "--preset", "demo", "--out", str(out)])
    assert res.exit_code == 2, res.output
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ") and "run.defense_data=1000" in last and "180 training images" in last, last
    assert "--set run.defense_data=162" in last and "badnets relabels 18" in last, last
    assert not trained and not out.exists()
    # The baseline alone asks for no clean data: the same grid with --defense none plans without complaint.
    cells_none = GridSpec(attacks=["badnets"], defenses=["none"], datasets=[f"folder:{root}"], preset="demo").plan()
    assert [c.defense.name for c in cells_none.defense_cells] == ["none"]


def test_defense_data_larger_than_the_synthetic_set_is_refused_with_the_fix():
    with pytest.raises(Exception, match=r"run.defense_data=400 asks for 400 clean training images, but synthetic has 300"):
        plan(["ft"], run={"defense_data": "400"})


# ---------------------------------------------------------------- --compare names the protocol's differences


def _gtsrb(attack, defense, ca, asr, model, train, images):
    r = rec(attack, defense, 0, ca, asr, 1 - asr)
    r.update(dataset="gtsrb", model=model["name"], info={"defense_images": images},
             config={"model": model, "train": train})
    return r


def test_compare_says_where_the_protocol_differs_from_the_leaderboards():
    quick = ({"name": "resnet18", "width": 16}, {"epochs": 4, "lr": 0.1, "schedule": "onecycle", "batch_size": 128}, 500)
    md = compare_markdown([_gtsrb("badnets", "none", 0.97, 1.0, *quick), _gtsrb("badnets", "ft", 0.96, 0.02, *quick)])
    assert "The protocols differ in model, recipe, defense data" in md
    assert "| defense data | 1% of the training set (500 images) | 5% of the training set |" in md
    bb = ({"name": "preactresnet18", "width": 64}, {"epochs": 50, "lr": 0.01, "schedule": "cosine", "batch_size": 128}, 1960)
    md = compare_markdown([_gtsrb("badnets", "none", 0.97, 1.0, *bb), _gtsrb("badnets", "ft", 0.96, 0.02, *bb)])
    assert "| model | preactresnet18, width 64 | preactresnet18, width 64 |" in md
    assert "The protocols differ" not in md  # BackdoorBench's model, recipe and 5 % (1,960 of 39,209 images)
