"""Every kind of spectune report opened in headless Chromium: images decode, tables render, nothing is fetched.

Chromium and its driver are Debian packages (``chromium``, ``chromium-driver``),
installed by ``make test``'s set-up. A screenshot of each report is kept under
``test-artifacts/`` (or ``$SPECTUNE_TEST_ARTIFACTS``) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="Debian chromium + chromium-driver not installed (make test installs them as root)",
)
ARTIFACTS = Path(os.environ.get("SPECTUNE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):  # type: ignore[no-untyped-def]
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # the machine has no network: background services would only spam refused connections
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


PAGE_CHECK = """
const imgs = Array.from(document.images);
const tables = Array.from(document.querySelectorAll('table'));
return {
  images: imgs.length,
  broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt),
  external: imgs.filter(i => !i.src.startsWith('data:')).map(i => i.src)
      .concat(Array.from(document.querySelectorAll('link[href],script[src]')).map(e => e.href || e.src)),
  tables: tables.length,
  empty_tables: tables.filter(t => t.rows.length < 2 || t.getBoundingClientRect().height < 10).length,
  cells: tables.reduce((n, t) => n + t.querySelectorAll('td').length, 0),
  title: document.title,
};
"""


def _open(browser, path: Path, name: str) -> dict:  # type: ignore[no-untyped-def]
    browser.get(path.resolve().as_uri())
    info = browser.execute_script(PAGE_CHECK)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    assert info["broken"] == [], f"{name}: images that do not decode: {info['broken']}"
    assert info["external"] == [], f"{name}: the page fetches {info['external']}"
    assert info["tables"] > 0 and info["empty_tables"] == 0 and info["cells"] > 0, info
    return info


def test_comparison_report_renders(browser, tmp_path):  # type: ignore[no-untyped-def]
    from spectune.compare import load_compare_config
    from spectune.compare.report import write_report

    cfg = load_compare_config({"name": "browser", "tasks": {"trec": {"data": {"name": "trec"}}},
                               "methods": {"full": {}, "phased": {"plan": {"policy": "phased"}}, "lora": {"method": {"kind": "lora"}}},
                               "seeds": [0, 1, 2, 3], "output_dir": str(tmp_path)})
    rng = np.random.default_rng(0)
    rows = [{"task": "trec", "method": m, "seed": s, "status": "ok", "task_type": "classification",
             "test_accuracy": 0.8 + 0.02 * i + rng.normal(0, 0.01), "validation_accuracy": 0.8, "gap_accuracy": 0.1,
             "trainable_parameters": [2.2e7, 2.2e7, 1.5e5][i], "wall_time_s": 30.0, "peak_memory_mb": 900.0}
            for i, m in enumerate(cfg.methods) for s in cfg.seeds]
    info = _open(browser, write_report(pd.DataFrame(rows), cfg, tmp_path), "compare-report")
    assert info["images"] >= 4 and info["title"] == "spectune comparison: browser"


def test_analysis_and_plan_reports_render(browser, tmp_path):  # type: ignore[no-untyped-def]
    import spectune
    from spectune.analyze.report import write_report
    from spectune.plan.report import write_plan_report
    from tests.conftest import tiny_model

    torch.manual_seed(0)
    result = spectune.analyze(tiny_model("llama"), progress=False, device="cpu")
    info = _open(browser, write_report(result, tmp_path / "analysis"), "analysis-report")
    assert info["images"] >= 5
    p = spectune.plan(result, "phased")
    info = _open(browser, write_plan_report(p, result, tmp_path / "plan.html"), "plan-report")
    assert info["images"] >= 1
