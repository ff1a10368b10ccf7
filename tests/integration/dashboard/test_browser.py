"""The pages in headless chromium: every section drawn with the logged values, the smoothing
and x-axis controls, sample filters, index and comparison, the offline report file.
Skipped without /usr/bin/chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import json
import time

import pytest

from rlhf.dashboard.cli import main as dashboard_main
from rlhf.dashboard.metrics import ema

from chromium import _READ_CHARTS, _load_and_read, _trace, _check_run_page
from fake_runs import EVAL_STEPS, ROLLOUT_BATCH, SECTION


@pytest.mark.browser
def test_browser_run_page_shows_every_section_with_logged_values(browser, server, runs_root):
    _, logged = runs_root
    _check_run_page(browser, server.url + "run/alpha", logged["alpha"], "alpha-name")


@pytest.mark.browser
def test_browser_smoothing_and_x_axis_controls(browser, server, runs_root):
    _, logged = runs_root
    _load_and_read(browser, server.url + "run/alpha")
    browser.evaluate("var s = document.getElementById('smoothing'); s.value = '0.6'; s.dispatchEvent(new Event('input')); true")
    browser.wait_for("document.getElementById('smoothing-value').textContent === '0.60'")
    time.sleep(0.3)
    charts = {(c["stage"], c["key"][len(c["stage"]) + 1 :]): c for c in json.loads(browser.evaluate(_READ_CHARTS))}
    steps, values = logged["alpha"]["curves"][("ppo", "kl/mean")]
    kl = charts[("ppo", "kl/mean")]
    assert _trace(kl, "alpha-name")["y"] == pytest.approx(ema(values, 0.6))
    assert _trace(kl, "alpha-name (raw)")["y"] == pytest.approx(values)
    assert _trace(kl, "alpha-name (raw)")["visible"] is True
    # Evaluation curves are averages over held-out prompts already: not smoothed.
    gold_steps, gold = logged["alpha"]["curves"][("ppo", "eval/gold_mean")]
    assert _trace(charts[("ppo", "eval/gold_mean")], "alpha-name")["y"] == pytest.approx(gold)

    browser.evaluate("var a = document.getElementById('x-axis'); a.value = 'alt'; a.dispatchEvent(new Event('change')); true")
    browser.wait_for("document.querySelector('.js-plotly-plot').layout.xaxis.title.text !== 'step'")
    charts = {(c["stage"], c["key"][len(c["stage"]) + 1 :]): c for c in json.loads(browser.evaluate(_READ_CHARTS))}
    episodes_per_update = ROLLOUT_BATCH * logged["alpha"]["world"]
    assert charts[("ppo", "kl/mean")]["xtitle"] == "episodes"
    assert _trace(charts[("ppo", "kl/mean")], "alpha-name")["x"] == [s * episodes_per_update for s in steps]
    gold_chart = charts[("ppo", "eval/gold_mean")]
    assert _trace(gold_chart, "alpha-name \u00b1 s.e. (upper)")["x"] == [s * episodes_per_update for s in gold_steps]
    assert charts[("sft", "loss")]["xtitle"] == "epoch"
    assert _trace(charts[("sft", "loss")], "alpha-name")["x"] == pytest.approx([s / 6 for s in range(1, 13)])
    assert browser.console_errors() == []


@pytest.mark.browser
def test_browser_samples_filter_by_step_and_text(browser, server, runs_root):
    _, logged = runs_root
    _load_and_read(browser, server.url + "run/alpha")
    visible = "Array.from(document.querySelectorAll('[data-samples] tbody tr')).filter(function (r) { return !r.hidden; }).map(function (r) { return [r.dataset.step, r.cells[2].textContent]; })"
    samples = logged["alpha"]["samples"]

    def expect(step=None, text=""):
        return [[str(r["step"]), r["completion"]] for r in samples if (step is None or r["step"] == step) and text in r["completion"]]

    assert browser.evaluate(visible) == expect(EVAL_STEPS[-1])  # the latest evaluation first
    browser.evaluate("var s = document.querySelector('[data-samples] select'); s.value = '5'; s.dispatchEvent(new Event('change')); true")
    assert browser.evaluate(visible) == expect(5)
    assert browser.evaluate("document.querySelector('[data-samples] .shown').textContent") == str(len(expect(5)))
    browser.evaluate("var s = document.querySelector('[data-samples] select'); s.value = 'all'; s.dispatchEvent(new Event('change')); true")
    assert browser.evaluate(visible) == expect()
    browser.evaluate("var i = document.querySelector('[data-samples] input'); i.value = 'word word word word'; i.dispatchEvent(new Event('input')); true")
    assert browser.evaluate(visible) == expect(text="word word word word") != []


@pytest.mark.browser
def test_browser_index_and_compare(browser, server, runs_root):
    _, logged = runs_root
    browser.open(server.url)
    browser.wait_for("document.readyState === 'complete' && document.body.dataset.rendered === '0'")
    assert browser.evaluate("document.querySelectorAll('input[name=runs]').length") == 2
    # Tick both runs and submit the form, as a user would.
    browser.evaluate("document.querySelectorAll('input[name=runs]').forEach(function (c) { c.checked = true; }); document.forms[0].submit(); true")
    browser.wait_for("location.pathname === '/compare' && document.readyState === 'complete' && document.body.dataset.rendered")
    charts = json.loads(browser.evaluate(_READ_CHARTS))
    assert browser.console_errors() == []
    assert len(charts) == len(SECTION)
    kl = next(c for c in charts if c["key"] == "ppo-kl/mean")
    assert [t["name"] for t in kl["traces"] if t["visible"] is True] == ["alpha", "beta"]
    for run in ("alpha", "beta"):
        assert _trace(kl, run)["y"] == pytest.approx(logged[run]["curves"][("ppo", "kl/mean")][1])


@pytest.mark.browser
def test_browser_report_file_works_offline(browser, runs_root, tmp_path):
    root, logged = runs_root
    out = tmp_path / "report.html"
    assert dashboard_main(["report", str(root / "beta"), "--out", str(out)]) == 0
    _check_run_page(browser, out.as_uri(), logged["beta"], "beta-name")


@pytest.mark.browser
def test_browser_harness_sees_console_errors(browser, tmp_path):
    """Guards the checks above: a page with errors must not pass as clean."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><body><script src="missing.js"></script>'
        '<script>console.error("boom"); document.body.dataset.rendered = "1"; notDefined();</script></body></html>'
    )
    browser.open(page.as_uri())
    browser.wait_for("document.readyState === 'complete' && document.body.dataset.rendered")
    time.sleep(0.3)
    errors = browser.console_errors()
    assert any("missing.js" in e for e in errors), errors
    assert any("boom" in e for e in errors) and any("notDefined" in e for e in errors), errors
