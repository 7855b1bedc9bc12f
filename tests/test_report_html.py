"""index.html: self-contained, escaped, readable without JavaScript; and in a real browser (headless Chromium
through selenium): every figure loads, no console error, one summary row per attack, a header click sorts."""

import json
import os
import re
import shutil

import pytest
import torch

from bench.report import write_reports
from bench.store import save_tensors

EVIL = '<img src=x onerror="alert(1)">&co'


def rec(attack, defense, seed, ca, asr, ra, backdoor=None):
    return {"cell": f"synthetic-smallcnn-{attack}-{defense}-s{seed}", "dataset": "synthetic", "model": "smallcnn",
            "attack": attack, "defense": defense, "seed": seed, "status": "ok", "error": None,
            "metrics": {"ca": ca, "asr": asr, "ra": ra}, "backdoor": backdoor, "info": {},
            "seconds": {"train": 10.0 + seed, "defense": 2.0, "eval": 0.5}, "config": {"preset": "demo"},
            "versions": {"torch": torch.__version__, "python": "3.11.2"}, "git": "0123abc",
            "device": {"type": "cpu", "name": "Test CPU <x>", "threads": 2}}


def grid_records(attacks=("badnets", "blend")):
    """2 attacks x (none + 2 defenses) x 2 seeds; rnp's ASR is high on the first attack and low on the second."""
    out = []
    for i, attack in enumerate(attacks):
        for seed in (0, 1):
            bd = {"ca": 0.95, "asr": 0.99, "ra": 0.01}
            out.append(rec(attack, "none", seed, **bd))
            out.append(rec(attack, "rnp", seed, 0.93, 0.60 - 0.5 * i + 0.01 * seed, 0.3, backdoor=bd))
            out.append(rec(attack, "fp", seed, 0.90, 0.20 + 0.01 * seed, 0.6, backdoor=bd))
    return out


def make_run(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    g = torch.Generator().manual_seed(0)
    for attack in ("badnets", "blend"):
        clean = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
        trig = clean.clone()
        trig[:, -4:-1, -4:-1] = 255
        save_tensors(run / "examples" / f"synthetic-{attack}.safetensors", {"clean": clean, "triggered": trig})
    return run


def test_page_is_self_contained_escaped_and_plain_without_javascript(tmp_path):
    run = make_run(tmp_path, grid_records(attacks=("badnets", EVIL)))
    out = write_reports(run)
    page = out["index.html"].read_text(encoding="utf-8")
    assert EVIL not in page and "onerror=" not in page.replace("onerror=&quot;", "")  # escaped everywhere
    assert html_escaped(EVIL) in page
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in srcs)  # plots and gallery, inline
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing fetched: no URL, no external script or sheet
    assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page
    assert '<div id="filters" hidden>' in page  # the controls appear only with JavaScript on
    for section in ("summary", "ranking", "pairs", "cells", "plots", "gallery", "provenance"):
        assert f'<section id="{section}">' in page
    assert "Test CPU &lt;x&gt;" in page and "0123abc" in page  # provenance from the records


def html_escaped(s):
    import html

    return html.escape(s, quote=True)


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not chromium or not driver:
        msg = ("the browser test needs chromium, chromedriver and selenium: apt-get install -y chromium chromium-driver; "
               "pip install selenium (the test extra)")
        if os.environ.get("CI") or os.environ.get("BENCH_DATA_DIR"):
            pytest.fail(msg)  # in CI a missing browser is a failure, never a skip
        pytest.skip(msg)
    return chromium, driver


@pytest.mark.browser
def test_index_html_in_headless_chromium(tmp_path):
    chromium, driver_path = _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run = make_run(tmp_path, grid_records())
    page = write_reports(run)["index.html"]
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(page.resolve().as_uri())
        widths = driver.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) >= 3 and all(w > 0 for w in widths), widths  # every figure decoded
        severe = [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]
        assert not severe, severe

        table = driver.find_element(By.ID, "summary-0")
        rows = lambda: table.find_elements(By.CSS_SELECTOR, "tbody tr")  # noqa: E731
        assert [r.get_attribute("data-attack") for r in rows()] == ["badnets", "blend"]  # one row per attack
        head = table.find_element(By.CSS_SELECTOR, 'th[data-defense="rnp"][data-metric="asr"]')
        col = driver.execute_script("return arguments[0].cellIndex", head)

        def asr_column():
            return [float(r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-sort")) for r in rows()]

        assert asr_column() == sorted(asr_column(), reverse=True)  # badnets (60 %) above blend (10 %) as written
        head.click()
        assert asr_column() == sorted(asr_column()) and [r.get_attribute("data-attack") for r in rows()] == ["blend", "badnets"]
        assert head.get_attribute("aria-sort") == "ascending"
        head.click()
        assert asr_column() == sorted(asr_column(), reverse=True)
        assert table.find_element(By.CSS_SELECTOR, "tfoot td").text == "Average"  # the Average row stays at the foot

        Select(driver.find_element(By.CSS_SELECTOR, '#filters select[name="attack"]')).select_by_value("blend")
        assert [r.get_attribute("data-attack") for r in rows() if r.is_displayed()] == ["blend"]
        box = driver.find_element(By.ID, "filter-text")
        Select(driver.find_element(By.CSS_SELECTOR, '#filters select[name="attack"]')).select_by_value("")
        box.send_keys("badnets")
        assert [r.get_attribute("data-attack") for r in rows() if r.is_displayed()] == ["badnets"]
        assert not [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]
    finally:
        driver.quit()
