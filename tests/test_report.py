"""Reports: the table builder, its Markdown/CSV/LaTeX forms, the plots, bad input, references."""

import csv
import io
import json
import math
import re

import pytest
import torch

from bench.registry import BenchError
from bench.report import (
    build_tables,
    compare_markdown,
    csv_rows,
    latex_table,
    load_records,
    markdown_table,
    reference_names,
    reference_table,
    write_reports,
)
from bench.store import save_tensors

PNG = b"\x89PNG\r\n\x1a\n"


def rec(attack, defense, seed, ca=None, asr=None, ra=None, *, status="ok", backdoor=None, info=None,
        dataset="synthetic", model="smallcnn"):
    failed = status != "ok"
    return {
        "cell": f"{dataset}-{model}-{attack}-{defense}-s{seed}", "dataset": dataset, "model": model, "attack": attack,
        "defense": defense, "seed": seed, "status": status, "error": "ValueError: boom" if failed else None,
        "metrics": None if failed else {"ca": ca, "asr": asr, "ra": ra},
        "backdoor": backdoor, "seconds": {"train": 1.0, "defense": 0.5, "eval": 0.1}, "info": info or {},
        "config": {"preset": "demo"}, "versions": {"torch": torch.__version__}, "git": "abc123",
    }


def hand_records():
    """rnp appears before none and fp: the columns must still read none, rnp, fp."""
    return [
        rec("badnets", "rnp", 0, 0.90, 0.10, 0.80),
        rec("badnets", "rnp", 1, 0.94, 0.02, 0.84),
        rec("badnets", "none", 0, 0.95, 1.00, 0.00),
        rec("badnets", "none", 1, 0.97, 0.98, 0.01),
        rec("badnets", "fp", 0, 0.91, 0.30, 0.60),
        rec("badnets", "fp", 1, status="failed"),
        rec("blend", "rnp", 0, 0.80, 0.20, 0.50),
        rec("blend", "fp", 0, status="failed"),
    ]


def write_run(tmp_path, records, lines=None):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) if lines is None else lines
    (run / "records.jsonl").write_text(text)
    return run


def md_cells(md):
    """{(attack, 'defense METRIC'): text} from the Markdown table."""
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for ln in rows[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out.update({(cells[0].strip("*"), h): c for h, c in zip(head[1:], cells[1:])})
    return out


def test_table_means_stds_failed_missing_average_and_column_order():
    (t,) = build_tables(hand_records())
    assert t.defenses == ["none", "rnp", "fp"]
    assert t.attacks == ["badnets", "blend"]
    c = md_cells(markdown_table(hand_records()))
    # rnp on badnets: CA 90 and 94 -> mean 92, sample std sqrt(8) = 2.83
    assert c[("badnets", "rnp CA")] == f"92.00 ± {math.sqrt(8):.2f}"
    assert c[("badnets", "rnp ASR")] == "6.00 ± 5.66"
    assert c[("blend", "rnp CA")] == "80.00"                  # one seed: the plain value
    assert c[("blend", "fp ASR")] == "failed"                 # every seed failed
    assert c[("badnets", "fp CA")] == "91.00*"                # one of two seeds failed
    assert c[("blend", "none CA")] == "-"                     # missing (no backdoor metrics either)
    # Average: the mean over attacks of the cell means, marked when an attack is missing
    assert c[("Average", "rnp CA")] == "86.00"                # (92 + 80) / 2
    assert c[("Average", "rnp RA")] == f"{(82 + 50) / 2:.2f}"
    assert c[("Average", "none CA")] == "96.00†"              # blend has no none cell
    assert c[("Average", "fp ASR")] == "30.00†"               # blend/fp failed
    md = markdown_table(hand_records())
    assert "some seeds of this cell failed" in md and "average over fewer attacks" in md
    assert "failed: blend / fp: ValueError: boom" in md


def test_none_column_is_filled_from_backdoor_metrics_and_dataset_model_split():
    bd = {"ca": 0.96, "asr": 0.99, "ra": 0.01}
    records = [rec("badnets", "rnp", 0, 0.9, 0.1, 0.8, backdoor=bd),
               rec("badnets", "fp", 0, 0.9, 0.2, 0.7, backdoor=bd),
               rec("badnets", "rnp", 0, 0.5, 0.5, 0.5, model="resnet18", backdoor=None)]
    t1, t2 = build_tables(records)
    assert (t1.model, t1.defenses) == ("smallcnn", ["none", "rnp", "fp"])
    assert t1.cell("badnets", "none").n_ok == 1  # once per seed, not once per defense
    assert (t2.model, t2.defenses) == ("resnet18", ["rnp"])
    c = md_cells(markdown_table(records).split("### ")[1])
    assert c[("badnets", "none ASR")] == "99.00"
    assert "the backdoored model before any defense" in markdown_table(records)


def test_later_record_of_a_cell_replaces_the_earlier(tmp_path):
    run = write_run(tmp_path, [rec("badnets", "rnp", 0, status="failed"), rec("badnets", "rnp", 0, 0.9, 0.1, 0.8)])
    (r,) = load_records(run)
    assert r["status"] == "ok"


def test_csv_tex_md_files_exist_and_agree(tmp_path):
    run = write_run(tmp_path, hand_records())
    out = write_reports(run)
    for name in ("table.md", "table.csv", "table.tex"):
        assert out[name].is_file() and out[name].parent == run / "report"
    md = md_cells(out["table.md"].read_text())
    rows = list(csv.DictReader(io.StringIO(out["table.csv"].read_text())))
    assert rows == [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in csv_rows(hand_records())]
    tex = {}
    for ln in out["table.tex"].read_text().splitlines():
        cells = [c.strip() for c in ln.removesuffix(r"\\").split("&")]
        if len(cells) == 10 and cells[0] not in ("", "Attack"):
            tex[cells[0]] = cells[1:]
    defenses = ["none", "rnp", "fp"]
    assert len(rows) == 3 * 2 - 1 + 3  # 5 cells (blend/none missing) + 3 Average rows
    for r in rows:
        for i, m in enumerate(("ca", "asr", "ra")):
            col = 3 * defenses.index(r["defense"]) + i
            text_md, text_tex = md[(r["attack"], f"{r['defense']} {m.upper()}")], tex[r["attack"]][col]
            if r[f"{m}_mean"] == "":
                assert text_md == text_tex == "failed"
                continue
            mean = f"{float(r[f'{m}_mean']):.2f}"
            assert text_md.startswith(mean) and text_tex.startswith(mean)
            if r[f"{m}_std"]:
                std = f"{float(r[f'{m}_std']):.2f}"
                assert text_md.startswith(f"{mean} ± {std}") and text_tex.startswith(rf"{mean} $\pm$ {std}")
    assert tex["blend"][0] == "--" and md[("blend", "none CA")] == "-"
    assert r"\multicolumn{3}{c}{rnp}" in out["table.tex"].read_text()
    assert r"\cmidrule(lr){8-10}" in out["table.tex"].read_text()


def test_latex_escapes_names():
    text = latex_table([rec("bad_nets&co", "my%def", 0, 0.9, 0.1, 0.8)])
    assert r"bad\_nets\&co" in text and r"my\%def" in text


def full_records():
    bd = {"ca": 0.95, "asr": 0.99, "ra": 0.01}
    curve = [{"threshold": t / 20, "channels_pruned": t, "ca": 0.95 - t / 40, "asr": max(0.0, 1 - t / 5), "ra": min(0.9, t / 5)}
             for t in range(19)]
    out = []
    for attack in ("badnets", "blend"):
        for seed in (0, 1):
            out.append(rec(attack, "rnp", seed, 0.9, 0.05, 0.8, backdoor=bd, info={"threshold": 0.2, "oracle_curve": curve}))
            out.append(rec(attack, "fp", seed, 0.92, 0.3, 0.6, backdoor=bd))
    return out


def write_examples(run):
    g = torch.Generator().manual_seed(0)
    for name, c in (("synthetic-badnets", 3), ("synthetic-blend", 3), ("mnist-badnets", 1)):
        clean = torch.randint(0, 256, (c, 32, 32), dtype=torch.uint8, generator=g)
        trig = clean.clone()
        trig[:, -4:-1, -4:-1] = 255
        save_tensors(run / "examples" / f"{name}.safetensors", {"clean": clean, "triggered": trig})


def test_every_plot_is_written_when_it_has_data(tmp_path):
    run = write_run(tmp_path, full_records())
    write_examples(run)
    out = write_reports(run)
    for name in ("ca_vs_asr.png", "asr_before_after.png", "rnp_curve.png", "gallery.png"):
        assert out[name] == run / "report" / name
        assert out[name].read_bytes()[:8] == PNG


def test_plots_without_data_are_skipped_and_stale_ones_removed(tmp_path):
    run = write_run(tmp_path, full_records())
    write_examples(run)
    write_reports(run)
    # now: no oracle curves, no examples, every cell failed and no backdoor metrics
    for f in (run / "examples").iterdir():
        f.unlink()
    write_run(tmp_path, [rec("badnets", "rnp", 0, status="failed"), rec("blend", "fp", 0, status="failed")])
    out = write_reports(run)
    assert set(out) == {"table.md", "table.csv", "table.tex", "index.html"}
    assert sorted(p.name for p in (run / "report").iterdir()) == ["index.html", "table.csv", "table.md", "table.tex"]
    assert md_cells(out["table.md"].read_text())[("badnets", "rnp CA")] == "failed"
    assert md_cells(out["table.md"].read_text())[("Average", "fp CA")] == "failed"


def test_a_corrupt_example_is_skipped_with_a_warning(tmp_path):
    run = write_run(tmp_path, full_records())
    (run / "examples").mkdir()
    (run / "examples" / "synthetic-badnets.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="gallery: skipping"):
        out = write_reports(run)
    assert "gallery.png" not in out and "ca_vs_asr.png" in out


@pytest.mark.parametrize("text, match", [
    (None, "no records at .*records.jsonl"),
    ("", "records.jsonl holds no records"),
    ("\n\n", "records.jsonl holds no records"),
    ('{"x": 1}\n', "line 1 lacks dataset, model, attack, defense, seed, status"),
    ("OK\n", "line 2 is not valid JSON"),
    ("[1, 2]\n", "line 2 is not a JSON object"),
])
def test_bad_records_file_is_a_bench_error(tmp_path, text, match):
    run = tmp_path / "run"
    run.mkdir()
    if text is not None:
        good = json.dumps(rec("badnets", "rnp", 0, 0.9, 0.1, 0.8)) + "\n"
        (run / "records.jsonl").write_text(text if "line 1" in match or "no records" in match else good + text)
    with pytest.raises(BenchError, match=match):
        write_reports(run)


def test_reference_tables_keep_their_source_and_compare_with_ours():
    assert {"backdoorbench_leaderboard_cifar10_preactresnet18_p0.1", "rnp_official_log_badnets_cifar10"} <= set(reference_names())
    lb = reference_table("backdoorbench_leaderboard_cifar10_preactresnet18_p0.1")
    assert lb.source[0].startswith("Source: backdoorbench.github.io")
    assert lb.columns == ["attack", "defense", "ca_pct", "asr_pct"]
    assert {"attack": "BadNets", "defense": "none", "ca_pct": "91.32", "asr_pct": "95.03"} in lb.rows
    assert "> Source:" in lb.markdown()
    with pytest.raises(BenchError, match="no reference table 'nope'.*known: backdoorbench"):
        reference_table("nope")
    curve = [{"threshold": 0.2, "channels_pruned": 30, "ca": 0.9, "asr": 0.05, "ra": 0.8}]
    records = [rec("badnets", "rnp", 0, 0.9, 0.05, 0.8, dataset="cifar10", model="resnet18",
                   backdoor={"ca": 0.93, "asr": 1.0, "ra": 0.0}, info={"threshold": 0.2, "oracle_curve": curve})]
    cmp = compare_markdown(records)
    assert "| resnet18 | badnets | none | 93.00 | 91.32 | 100.00 | 95.03 |" in cmp
    assert "| resnet18 s0 | 0.20 | 30 | 24 | 90.00 | 92.80 | 5.00 | 6.61 |" in cmp
    assert compare_markdown(hand_records()) == ""


def test_compare_gives_each_sides_direction_on_gtsrb():
    # BackdoorBench GTSRB (PreAct-ResNet18, 10 %): FT removes BadNets (ASR 5.09) but not Blended (100.00);
    # NC removes both (0.01, 8.03). Ours: FT removes BadNets and not Blend (agree, agree); NC keeps Blend (disagree).
    recs = [rec("badnets", "ft", 0, 0.95, 0.03, 0.9, dataset="gtsrb", model="resnet18"),
            rec("blend", "ft", 0, 0.95, 0.90, 0.05, dataset="gtsrb", model="resnet18"),
            rec("blend", "nc", 0, 0.95, 0.60, 0.3, dataset="gtsrb", model="resnet18"),
            rec("blend", "rnp", 0, 0.95, 0.01, 0.3, dataset="gtsrb", model="resnet18")]  # not on the leaderboard
    cmp = compare_markdown(recs)
    assert "### Against the BackdoorBench leaderboard (gtsrb)" in cmp
    assert "| resnet18 | badnets | ft | 95.00 | 98.73 | 3.00 | 5.09 | removes | removes | yes |" in cmp
    assert "| resnet18 | blend | ft | 95.00 | 98.57 | 90.00 | 100.00 | keeps | keeps | yes |" in cmp
    assert "| resnet18 | blend | nc | 95.00 | 97.76 | 60.00 | 8.03 | keeps | removes | no |" in cmp
    assert "| blend | rnp |" not in cmp
    assert "agrees with the published one in 2 of 3 defended cells" in cmp


def test_compare_marks_an_attack_that_did_not_implant_and_leaves_it_out_of_the_count():
    # Our WaNet model never learnt its backdoor (ASR 15 % before any defense): FT's 1 % afterwards is not a
    # removal, so the cell reads "not implanted" and does not count; BadNets (implanted) still does.
    recs = [rec("wanet", "none", 0, 0.95, 0.15, 0.8, dataset="gtsrb", model="resnet18"),
            rec("wanet", "ft", 0, 0.95, 0.01, 0.9, dataset="gtsrb", model="resnet18"),
            rec("badnets", "none", 0, 0.95, 1.0, 0.0, dataset="gtsrb", model="resnet18"),
            rec("badnets", "ft", 0, 0.95, 0.03, 0.9, dataset="gtsrb", model="resnet18")]
    cmp = compare_markdown(recs)
    assert "| resnet18 | wanet | ft | 95.00 | 98.54 | 1.00 | 0.29 | not implanted | removes | - |" in cmp
    assert "| resnet18 | wanet | none | 95.00 | 97.74 | 15.00 | 94.25 | not implanted | - | - |" in cmp
    assert "| resnet18 | badnets | ft | 95.00 | 98.73 | 3.00 | 5.09 | removes | removes | yes |" in cmp
    assert "agrees with the published one in 1 of 1 defended cells" in cmp


def test_table_has_each_defenses_median_seconds_and_ratio_to_training():
    recs = [rec("badnets", d, s, 0.9, 0.1, 0.5) for d in ("none", "ft") for s in (0, 1, 2)]
    for r, (train_s, ft_s) in zip([r for r in recs if r["defense"] == "ft"], [(100.0, 20.0), (80.0, 40.0), (90.0, 9.0)]):
        r["seconds"].update(train=train_s, defense=ft_s)
    md = markdown_table(recs)
    timing = md[md.index("### Seconds"):]
    assert "| ft | 3 | 20.0 | 0.20 | 0.50 |" in timing  # times 9, 20, 40 s; ratios 0.1, 0.2, 0.5
    assert "median 90 s over 3 models (min 80 s, max 100 s)" in timing


# ---------------------------------------------------------------- statistics over seeds, DER, paired comparisons

T_975_1 = 12.706204736174698  # Student's t, 97.5 % quantile, 1 degree of freedom (two seeds)


def csv_by_cell(records):
    return {(r["attack"], r["defense"]): r for r in csv_rows(records)}


def test_csv_has_the_95_interval_and_der_per_cell_and_the_average_der_and_rank():
    rows = csv_by_cell(hand_records())
    rnp = rows[("badnets", "rnp")]
    # CA 90 and 94: mean 92, std sqrt(8), half-width t * std / sqrt(2) = 12.7062 * 2
    assert rnp["ca_mean"] == 92.0 and rnp["ca_std"] == pytest.approx(math.sqrt(8), abs=1e-4)
    assert rnp["ca_ci_low"] == pytest.approx(92 - 2 * T_975_1, abs=1e-4)
    assert rnp["ca_ci_high"] == pytest.approx(92 + 2 * T_975_1, abs=1e-4)
    # DER per seed against that seed's none record: s0 (0.90 - 0.05 + 1) / 2 = 0.925, s1 (0.96 - 0.03 + 1) / 2 = 0.965
    assert rnp["der_mean"] == pytest.approx(0.945, abs=1e-4)
    assert rnp["der_std"] == pytest.approx(math.sqrt(2 * 0.02 ** 2), abs=1e-4)
    assert rnp["der_ci_low"] == pytest.approx(0.945 - T_975_1 * 0.02, abs=1e-4)
    fp = rows[("badnets", "fp")]  # one finished seed: (0.70 - 0.04 + 1) / 2; no std, no interval
    assert (fp["der_mean"], fp["der_std"], fp["der_ci_low"], fp["ca_ci_low"]) == (pytest.approx(0.83), None, None, None)
    assert rows[("badnets", "none")]["der_mean"] is None     # the baseline has no DER
    assert rows[("blend", "rnp")]["der_mean"] is None        # no model before the defense to compare with
    avg = {r["defense"]: r for r in csv_rows(hand_records()) if r["attack"] == "Average"}
    assert avg["rnp"]["der_mean"] == pytest.approx(0.945, abs=1e-4)  # blend has no DER: the mean over badnets
    assert (avg["rnp"]["der_mean_rank"], avg["fp"]["der_mean_rank"]) == (1.0, 2.0)


def test_der_uses_backdoor_metrics_without_a_none_record_and_ties_share_a_rank():
    bd = {"ca": 0.90, "asr": 1.0, "ra": 0.0}
    recs = [rec("badnets", "ft", 0, 0.80, 0.00, 0.9, backdoor=bd),    # (1.0 - 0.10 + 1) / 2 = 0.95
            rec("badnets", "fp", 0, 0.95, 0.10, 0.8, backdoor=bd),    # CA went up: no cost, (0.90 + 1) / 2 = 0.95
            rec("badnets", "rnp", 0, 0.90, 0.60, 0.3, backdoor=bd),   # (0.40 + 1) / 2 = 0.70
            rec("blend", "ft", 0, 0.90, 0.50, 0.3, backdoor=bd),      # 0.75
            rec("blend", "fp", 0, 0.90, 0.90, 0.1, backdoor=bd),      # 0.55
            rec("blend", "rnp", 0, 0.90, 0.00, 0.9, backdoor=bd),     # 1.0
            rec("clean", "ft", 0, 0.90, None, None)]                  # no ASR: no DER, not ranked
    rows = csv_by_cell(recs)
    assert [rows[("badnets", d)]["der_mean"] for d in ("ft", "fp", "rnp")] == [pytest.approx(x) for x in (0.95, 0.95, 0.70)]
    assert rows[("clean", "ft")]["der_mean"] is None
    (t,) = build_tables(recs)
    # badnets: ft and fp tie for 1-2 (1.5 each), rnp 3; blend: rnp 1, ft 2, fp 3
    assert t.ranks() == {"ft": (1.75, 2), "fp": (2.25, 2), "rnp": (2.0, 2)}
    md = markdown_table(recs)
    assert "| ft | 0.950 | 0.750 | 0.850 | 1.75 |" in md and "arXiv:2206.12654" in md
    tex = latex_table(recs)
    assert r"ft & 0.950 & 0.750 & 0.850 & 1.75 \\" in tex


def test_markdown_points_to_the_intervals_only_with_several_seeds():
    assert "95 % confidence intervals" in markdown_table(hand_records())
    assert "95 % confidence intervals" not in markdown_table([rec("badnets", "rnp", 0, 0.9, 0.1, 0.8)])


def pair_records():
    """rnp and anp on five comparable models, one where anp failed, and the clean model (no ASR)."""
    pairs = {0: ((0.90, 0.05), (0.91, 0.10)), 1: ((0.92, 0.02), (0.92, 0.30)), 2: ((0.88, 0.20), (0.90, 0.10)),
             3: ((0.93, 0.01), (0.89, 0.04))}
    out = []
    for seed, ((ca_r, asr_r), (ca_a, asr_a)) in pairs.items():
        out += [rec("badnets", "rnp", seed, ca_r, asr_r, 0.5), rec("badnets", "anp", seed, ca_a, asr_a, 0.5)]
    out += [rec("blend", "rnp", 0, 0.85, 0.15, 0.5), rec("blend", "anp", 0, 0.88, 0.15, 0.5),
            rec("badnets", "rnp", 4, 0.90, 0.03, 0.5), rec("badnets", "anp", 4, status="failed"),
            rec("clean", "rnp", 0, 0.95, None, None), rec("clean", "anp", 0, 0.94, None, None),
            rec("badnets", "fp", 0, 0.9, 0.5, 0.4)]
    return out


def test_compare_defenses_counts_and_wilcoxon_against_a_hand_computation(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    run = write_run(tmp_path, pair_records())
    res = CliRunner().invoke(main, ["report", str(run), "--compare-defenses", "rnp,anp"])
    assert res.exit_code == 0, res.output
    # 5 models (badnets s0-s3, blend s0). ASR, lower is better: rnp wins s0, s1, s3, anp s2, blend ties.
    # Signed differences 0.05, 0.28, -0.10, 0.03 (tie dropped): ranks 2, 4, 3, 1, W- = 3; exact two-sided
    # p = 2 * #{subsets of {1,2,3,4} with sum <= 3} / 16 = 2 * 5 / 16.
    assert "rnp vs anp on 5 models" in res.output
    assert "ASR (lower is better): rnp better on 3, anp better on 1, ties 1; Wilcoxon signed-rank p = 0.625" in res.output
    # CA: differences -0.01, 0 (s1 ties), -0.02, +0.04, -0.03: W+ = 4, p = 2 * 7 / 16
    assert "CA (higher is better): rnp better on 1, anp better on 3, ties 1; Wilcoxon signed-rank p = 0.875" in res.output
    assert (run / "report" / "index.html").is_file()


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, args, match", [
    ("no records", [], r"no records at .*records\.jsonl"),
    ("torn line", [], r"line 2 is not valid JSON"),
    ("foreign line", [], r"line 2 is not a record of this benchmark \(dataset, seed of the wrong type\)"),
    ("foreign keys", [], r"line 1 lacks dataset, model, attack, defense, seed, status"),
    ("missing defense", ["--compare-defenses", "rnp,nad"], r"this run has no nad; its defenses: rnp, anp, fp"),
    ("one defense", ["--compare-defenses", "rnp"], r"needs two defenses or more.*this run has: rnp, anp, fp"),
])
def test_report_bad_input_is_one_line_exit_2_and_changes_nothing(tmp_path, case, args, match):
    from click.testing import CliRunner

    from bench.cli import main

    good = "".join(json.dumps(r) + "\n" for r in pair_records())
    first = good.splitlines(keepends=True)[0]
    text = {"no records": None, "torn line": first + good[: len(good) // 3].splitlines()[-1],
            "foreign line": first + json.dumps({**json.loads(first), "dataset": 7, "seed": "0"}) + "\n",
            "foreign keys": '{"model_key": "abc", "bytes": 12}\n' + good}.get(case, good)
    run = tmp_path / "run"
    run.mkdir()
    if text is not None:
        (run / "records.jsonl").write_text(text)
    before = snapshot(run)
    res = CliRunner().invoke(main, ["report", str(run), *args])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and re.search(match, res.output), res.output
    assert snapshot(run) == before and not (run / "report").exists()


def test_a_torn_detections_file_fails_before_any_report_file_is_written(tmp_path):
    run = write_run(tmp_path, hand_records())
    (run / "detections.jsonl").write_text('{"dataset": "synthetic", "model": "m", "attack": "badnets", "detector": "nc", "seed": 0, "status": "ok"}\n{"data')
    with pytest.raises(BenchError, match=r"detections\.jsonl: line 2 is not valid JSON"):
        write_reports(run)
    assert not (run / "report").exists()
