"""A minimal headless-chromium harness for the dashboard's browser tests.

Browser tests drive Debian's chromium headless through the Chrome DevTools protocol over
``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on fds 3 and 4), so no
websocket package is needed. They read the plotted points back from plotly's graph divs
and the page's tables, and compare them with what the fake run logged. They skip when
/usr/bin/chromium is absent (install it with ``apt-get install -y chromium``).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fake_runs import CHROMIUM, SECTION, SECTION_TITLES, HISTOGRAMS


class Chromium:
    """Minimal Chrome DevTools protocol client over --remote-debugging-pipe."""

    def __init__(self, user_data_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ]
        # The protocol expects its pipe on fds 3 (commands in) and 4 (replies out); bash, not
        # dash, because dash cannot redirect from fds above 9.
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', str(CHROMIUM), *args],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session: str | None = None

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
                else:
                    self._events.put(message)

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 600) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next_id not in self._replies:
                left = deadline - time.monotonic()
                assert left > 0, f"chromium did not answer {method}"
                self._cond.wait(left)
            reply = self._replies.pop(self._next_id)
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(domain)
        self.call("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def console_errors(self) -> list[str]:
        errors = []
        while not self._events.empty():
            event = self._events.get()
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                errors.append(f"log: {entry.get('text')} ({entry.get('url')})")
        return errors

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)


# Every plotted trace as plotly holds it, read from the graph divs after drawing.
_READ_CHARTS = """JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (gd) {
  var section = gd.closest('section.metrics');
  return {id: gd.id, key: gd.dataset.key, title: gd.layout.title.text, xtitle: gd.layout.xaxis.title.text,
          stage: section && section.dataset.stage, section: section && section.dataset.section,
          traces: gd.data.map(function (t) {
            return {name: t.name, type: t.type, visible: t.visible === undefined ? true : t.visible,
                    x: Array.from(t.x), y: t.y ? Array.from(t.y) : null}; })};
}))"""


# What a reader sees in the page's tables and section headings.
_READ_PAGE = """JSON.stringify({
  sections: Array.from(document.querySelectorAll('section.metrics')).map(function (s) {
    return [s.dataset.stage, s.dataset.section, s.querySelector('h3').textContent,
            s.getBoundingClientRect().height > 0]; }),
  policies: Array.from(document.querySelectorAll('#summary-policies tbody tr')).map(function (r) {
    return [r.dataset.policy, Array.from(r.querySelectorAll('td')).map(function (c) { return c.textContent; })]; }),
  constants: Array.from(document.querySelectorAll('.constant')).map(function (c) {
    return [c.closest('section').dataset.stage, c.dataset.key, c.querySelector('.value').textContent]; }),
  lineageNodes: document.querySelectorAll('svg.lineage g.node').length,
  lineageEdges: document.querySelectorAll('svg.lineage path.edge').length,
  lineageWidth: document.querySelector('svg.lineage') ? document.querySelector('svg.lineage').getBoundingClientRect().width : 0
})"""


def _load_and_read(browser: Chromium, url: str) -> tuple[int, list[dict], dict]:
    browser.open(url)
    rendered = browser.wait_for("document.readyState === 'complete' && document.body.dataset.rendered")
    assert rendered != "error", browser.console_errors()
    charts = json.loads(browser.evaluate(_READ_CHARTS))
    points = json.loads(browser.evaluate("document.body.dataset.points"))
    time.sleep(0.3)  # let late console messages arrive
    errors = browser.console_errors()
    assert errors == [], errors
    return int(rendered), charts, points


def _trace(chart: dict, name: str) -> dict:
    (trace,) = [t for t in chart["traces"] if t["name"] == name]
    return trace


def _check_run_page(browser: Chromium, url: str, logged: dict, name: str) -> list[dict]:
    """Every section, chart, band, histogram, constant and summary cell shows the logged numbers."""
    rendered, charts, points = _load_and_read(browser, url)
    lines = {(c["stage"], c["key"][len(c["stage"]) + 1 :]): c for c in charts if "-hist-" not in c["key"]}
    hists = {c["key"]: c for c in charts if "-hist-" in c["key"]}
    assert rendered == len(charts) == len(lines) + len(hists)
    assert {k: c["section"] for k, c in lines.items()} == SECTION
    for key, (steps, values) in logged["curves"].items():
        chart = lines[key]
        trace = _trace(chart, name)
        assert trace["x"] == steps and trace["y"] == pytest.approx(values), key
        assert [name, len(steps)] in points[chart["id"]]
        assert chart["xtitle"] == ("update" if key[0] == "ppo" else "step")
        if key in logged["se"]:
            upper = _trace(chart, f"{name} \u00b1 s.e. (upper)")
            assert upper["y"] == pytest.approx([m + e for m, e in zip(values, logged["se"][key])]), key
    for field in HISTOGRAMS:
        traces = hists[f"ppo-hist-{field}"]["traces"]
        expected = [[r[field] for r in logged["samples"] if r["step"] == s] for s in sorted({r["step"] for r in logged["samples"]})]
        assert [t["x"] for t in traces] == expected
    page = json.loads(browser.evaluate(_READ_PAGE))
    assert all(visible and SECTION_TITLES[section] == title for _, section, title, visible in page["sections"])
    assert {(stage, key): float(value) for stage, key, value in page["constants"]} == logged["constants"]
    (sft_name, sft_cells), (ppo_name, ppo_cells) = page["policies"]
    assert sft_name == "SFT policy" and ppo_name.startswith("PPO policy")
    for cells, index in ((sft_cells, 0), (ppo_cells, -1)):
        gold = logged["curves"][("ppo", "eval/gold_mean")][1][index]
        gold_se = logged["se"][("ppo", "eval/gold_mean")][index]
        mean_text, se_text = cells[0].split(" \u00b1 ")
        assert float(mean_text) == pytest.approx(gold, abs=0.6 * 10 ** -len(mean_text.split(".")[1]))
        assert float(se_text) == pytest.approx(gold_se, abs=0.6 * 10 ** -len(se_text.split(".")[1]))
    assert page["lineageNodes"] == (9 if ppo_name == "PPO policy" else 7) and page["lineageWidth"] > 0
    return charts
