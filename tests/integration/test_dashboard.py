"""The local dashboard and the HTML report, over fake run directories with known numbers.

Browser tests drive Debian's chromium headless through the Chrome DevTools protocol over
``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on fds 3 and 4), so no
websocket package is needed. They read the plotted points back from plotly's graph divs
and compare them with what the fake run logged. They skip when /usr/bin/chromium is absent
(install it with ``apt-get install -y chromium``).
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rlhf.dashboard.cli import main as dashboard_main
from rlhf.dashboard.data import load_run
from rlhf.dashboard.render import plotly_js
from rlhf.dashboard.server import make_server

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

SFT_METRICS = ("loss", "eval_loss", "learning_rate", "grad_norm")
REWARD_METRICS = ("loss", "eval_accuracy", "eval_margin")
PPO_METRICS = (
    "reward/score_mean",
    "kl/mean",
    "entropy/mean",
    "response/length_mean",
    "loss/value",
    "loss/policy",
    "policy/clipfrac",
    "value/clipfrac",
)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_run(root: Path, key: str, offset: float, *, registry_home: str | None = None) -> dict:
    """Write a complete fake pipeline run and return the curves it logged.

    Returns:
        {stage: {metric: (steps, values)}} exactly as written to metrics.jsonl.
    """
    run_dir = root / key
    logged: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    stages = {
        "sft": {
            "status": "completed",
            "inputs": {"base": "base/tiny-llama:v1", "dataset": "data/sft-synth:v1"},
            "outputs": {"adapter": f"adapter/{key}-sft:v1"},
            "metrics": {"eval_loss": 1.25 + offset},
        },
        "reward": {
            "status": "completed",
            "inputs": {"base": "base/tiny-llama:v1", "dataset": "data/prefs:v2"},
            "outputs": {"adapter": f"adapter/{key}-reward:v1"},
            "metrics": {"eval_accuracy": 0.8},
        },
        "ppo": {
            "status": "completed",
            "inputs": {"sft": f"adapter/{key}-sft:v1", "reward": f"adapter/{key}-reward:v1"},
            "outputs": {"policy": f"adapter/{key}-policy:v1", "value": f"adapter/{key}-value:v1"},
            "metrics": {"eval/score_mean": 0.6},
        },
    }
    pipeline = {
        "name": f"{key}-name",
        "recipe": "pipelines/tiny.yaml",
        "created": f"2026-01-0{1 + len(key) % 8}T10:00:00",
        "stages": stages,
        "registry_home": registry_home,
    }
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps(pipeline), encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps({"ppo/eval_score": 0.6 + offset, "sft/eval_loss": 1.2}))

    # SFT: train metrics every step, eval every 4th step on its own line (as TRL logs them).
    rows, sft = [], {m: ([], []) for m in SFT_METRICS}
    for step in range(1, 13):
        row = {"step": step, "time": 1.7e9 + step, "loss": 3.0 / step + offset, "learning_rate": 1e-4 * (1 - step / 13), "grad_norm": 1.0 + 0.1 * step}
        rows.append(row)
        if step % 4 == 0:
            rows.append({"step": step, "time": 1.7e9 + step, "eval_loss": 2.5 / step + offset})
    for row in rows:
        for metric in SFT_METRICS:
            if metric in row:
                sft[metric][0].append(row["step"])
                sft[metric][1].append(row[metric])
    _write_jsonl(run_dir / "sft" / "metrics.jsonl", rows)
    (run_dir / "sft" / "config.yaml").write_text("lr: 0.0001\nlora_r: 8\n")
    logged["sft"] = sft

    rows, reward = [], {m: ([], []) for m in REWARD_METRICS}
    for step in range(0, 20, 2):
        row = {"step": step, "time": 1.7e9, "loss": 0.7 - 0.02 * step, "eval_accuracy": 0.5 + 0.02 * step + offset, "eval_margin": 0.1 * step}
        rows.append(row)
        for metric in REWARD_METRICS:
            reward[metric][0].append(step)
            reward[metric][1].append(row[metric])
    _write_jsonl(run_dir / "reward" / "metrics.jsonl", rows)
    logged["reward"] = reward

    rows, ppo, samples = [], {m: ([], []) for m in PPO_METRICS}, []
    for step in range(15):
        row = {"step": step, "time": 1.7e9}
        for index, metric in enumerate(PPO_METRICS):
            row[metric] = round(math.sin(step / 3 + index) + offset, 6)
            ppo[metric][0].append(step)
            ppo[metric][1].append(row[metric])
        rows.append(row)
        if step % 5 == 0:
            for i in range(2):
                samples.append({"step": step, "prompt": f"<p{i}> & count", "completion": f"answer {step}-{i}", "score": 0.1 * step, "gold": None})
    _write_jsonl(run_dir / "ppo" / "metrics.jsonl", rows)
    _write_jsonl(run_dir / "ppo" / "samples.jsonl", samples)
    logged["ppo"] = ppo
    return logged


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    logged = {"alpha": make_run(root, "alpha", 0.0), "beta": make_run(root, "beta", 0.5)}
    (root / "not-a-run").mkdir()  # folders without pipeline.json are not listed
    return root, logged


@pytest.fixture
def server(runs_root):
    root, _ = runs_root
    srv = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


def _chart_specs(page: str) -> list[dict]:
    match = re.search(r'<script type="application/json" id="rlhf-charts">(.*?)</script>', page, re.S)
    assert match, "page has no chart data"
    return json.loads(match.group(1))


def _specs_by_title(specs: list[dict], stage_prefix: str) -> dict[str, dict]:
    return {s["figure"]["layout"]["title"]["text"]: s for s in specs if re.match(rf"chart-\d+-{stage_prefix}-", s["id"])}


# ----------------------------------------------------------------------------- server, no browser


def test_api_lists_runs_and_returns_logged_curves(server, runs_root):
    _, logged = runs_root
    status, body = _get(server.url + "api/runs")
    assert status == 200
    runs = json.loads(body)
    assert sorted(r["key"] for r in runs) == ["alpha", "beta"]
    assert runs[0]["stages"] == {"sft": "completed", "reward": "completed", "ppo": "completed"}

    status, body = _get(server.url + "api/run/alpha")
    assert status == 200
    run = json.loads(body)
    stages = {s["name"]: s for s in run["stages"]}
    assert list(stages) == ["sft", "reward", "ppo"]
    for stage, metrics in logged["alpha"].items():
        for metric, (steps, values) in metrics.items():
            assert stages[stage]["series"][metric] == {"step": steps, "value": values}, (stage, metric)
    assert len(stages["ppo"]["samples"]) == 6
    assert run["problems"] == []


def test_run_page_has_every_curve_samples_and_refs(server, runs_root):
    _, logged = runs_root
    status, page = _get(server.url + "run/alpha")
    assert status == 200
    specs = _chart_specs(page)
    assert len(specs) == len(SFT_METRICS) + len(REWARD_METRICS) + len(PPO_METRICS)
    ppo = _specs_by_title(specs, "ppo")
    steps, values = logged["alpha"]["ppo"]["kl/mean"]
    assert ppo["kl/mean"]["figure"]["data"][0]["x"] == steps
    assert ppo["kl/mean"]["figure"]["data"][0]["y"] == values
    # Samples grouped by step, with HTML escaped.
    assert [int(s) for s in re.findall(r'<details class="samples" data-step="(\d+)"', page)] == [0, 5, 10]
    assert "&lt;p0&gt; &amp; count" in page and "<p0>" not in page
    # Lineage falls back to the refs recorded in pipeline.json.
    assert "adapter/alpha-policy:v1" in page and "base/tiny-llama:v1" in page
    # Served pages load plotly.js from the server itself, never from the network.
    assert '<script src="/static/plotly.min.js"></script>' in page
    assert not re.search(r'(src|href)="https?://', page)
    status, js = _get(server.url + "static/plotly.min.js")
    assert status == 200 and "Plotly" in js[:5000]


def test_compare_overlays_one_trace_per_run(server, runs_root):
    _, logged = runs_root
    for query in ("runs=alpha,beta", "runs=alpha&runs=beta"):
        status, page = _get(server.url + "compare?" + query)
        assert status == 200
        reward = _specs_by_title(_chart_specs(page), "reward")
        traces = reward["eval_accuracy"]["figure"]["data"]
        assert [t["name"] for t in traces] == ["alpha", "beta"]
        assert traces[1]["y"] == logged["beta"]["reward"]["eval_accuracy"][1]


def test_unknown_runs_and_path_tricks_are_404(server):
    for path in ("run/nope", "run/..", "run/not-a-run", "api/run/%2e%2e", "compare?runs=alpha,nope", "elsewhere"):
        status, _ = _get(server.url + path)
        assert status == 404, path
    assert _get(server.url + "compare")[0] == 400


def test_bad_lines_are_reported_not_fatal(runs_root, server):
    root, _ = runs_root
    metrics = root / "alpha" / "sft" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write("{broken\n")
        handle.write('{"loss": 1.0}\n')  # no step
        handle.write('{"step": 99, "loss": 0.1')  # still being written: ignored quietly
    run = load_run(root / "alpha")
    assert any("metrics.jsonl line 16: not valid JSON" in p for p in run.problems), run.problems
    assert any("line 17: field 'step'" in p for p in run.problems), run.problems
    assert len(run.problems) == 2
    assert 99 not in run.stages[0].series["loss"]["step"]
    status, page = _get(server.url + "run/alpha")
    assert status == 200 and "not valid JSON" in page


def test_lineage_comes_from_the_registry_when_available(tmp_path, monkeypatch):
    home = tmp_path / "reg"
    home.mkdir()
    make_run(tmp_path / "runs", "gamma", 0.0, registry_home=str(home))
    calls = []

    class FakeRegistry:
        @classmethod
        def open(cls, home=None):
            calls.append(("open", home))
            return cls()

        def lineage(self, ref):
            if ref == "data/prefs:v2":
                raise KeyError(ref)
            return [{"ref": ref, "kind": "adapter"}, {"ref": "base/tiny-llama:v1", "kind": "base"}]

    monkeypatch.setitem(sys.modules, "rlhf.registry", types.SimpleNamespace(Registry=FakeRegistry))
    run = load_run(tmp_path / "runs" / "gamma")
    assert calls == [("open", str(home))]
    assert run.lineage["adapter/gamma-policy:v1"][0] == {"ref": "adapter/gamma-policy:v1", "kind": "adapter"}
    assert "data/prefs:v2" not in run.lineage and "data/prefs:v2" in run.lineage_note
    out = tmp_path / "r.html"
    assert dashboard_main(["report", str(tmp_path / "runs" / "gamma"), "--out", str(out)]) == 0
    assert "lineage of <code>adapter/gamma-policy:v1</code>" in out.read_text()


def test_report_is_one_self_contained_file(runs_root, tmp_path, capsys):
    root, logged = runs_root
    out = tmp_path / "share" / "report.html"
    assert dashboard_main(["report", str(root / "beta"), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert f"<script>{plotly_js()}</script>" in page  # plotly.js is inlined, whole
    # Outside the plotly bundle (whose own strings name its website) nothing points elsewhere.
    own = page.replace(plotly_js(), "")
    assert "<script src=" not in own and not re.search(r'(src|href)="https?://', own)
    assert "/static/" not in own and 'href="/"' not in own
    sft = _specs_by_title(_chart_specs(page), "sft")
    assert sft["eval_loss"]["figure"]["data"][0]["y"] == logged["beta"]["sft"]["eval_loss"][1]
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    assert dashboard_main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "pipeline.json not found" in capsys.readouterr().err


def test_cli_serve_subprocess(runs_root):
    root, _ = runs_root
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.dashboard", "serve", "--port", "0", "--runs-root", str(root)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert "2 run(s)" in line
        status, body = _get(match.group(1) + "api/runs")
        assert status == 200 and len(json.loads(body)) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- headless browser


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

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 60) -> dict:
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

    def wait_for(self, expression: str, timeout: float = 90):
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


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    chrome = Chromium(tmp_path / "chrome-profile")
    yield chrome
    chrome.close()


# Every plotted trace as plotly holds it, read from the graph divs after drawing.
_READ_CHARTS = """JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (gd) {
  return {id: gd.id, title: gd.layout.title.text,
          traces: gd.data.map(function (t) { return {name: t.name, x: Array.from(t.x), y: Array.from(t.y)}; })};
}))"""


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


def _check_run_charts(charts: list[dict], points: dict, logged: dict, trace_name: str) -> None:
    expected = {(stage, metric): curve for stage, metrics in logged.items() for metric, curve in metrics.items()}
    assert len(charts) == len(expected)
    seen = set()
    for chart in charts:
        stage = re.match(r"chart-\d+-([a-z]+)-", chart["id"]).group(1)
        steps, values = expected[(stage, chart["title"])]
        (trace,) = chart["traces"]
        assert trace["name"] == trace_name
        assert trace["x"] == steps and trace["y"] == pytest.approx(values), (stage, chart["title"])
        assert points[chart["id"]] == [[trace_name, len(steps)]]
        seen.add((stage, chart["title"]))
    assert seen == set(expected)


@pytest.mark.browser
def test_browser_run_page_draws_logged_points(browser, server, runs_root):
    _, logged = runs_root
    rendered, charts, points = _load_and_read(browser, server.url + "run/alpha")
    assert rendered == 15
    _check_run_charts(charts, points, logged["alpha"], "alpha-name")
    assert browser.evaluate("document.querySelectorAll('details.samples').length") == 3


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
    assert len(charts) == 15
    kl = next(c for c in charts if c["title"] == "kl/mean")
    assert [t["name"] for t in kl["traces"]] == ["alpha", "beta"]
    for trace in kl["traces"]:
        assert trace["y"] == pytest.approx(logged[trace["name"]]["ppo"]["kl/mean"][1])


@pytest.mark.browser
def test_browser_report_file_works_offline(browser, runs_root, tmp_path):
    root, logged = runs_root
    out = tmp_path / "report.html"
    assert dashboard_main(["report", str(root / "beta"), "--out", str(out)]) == 0
    rendered, charts, points = _load_and_read(browser, out.as_uri())
    assert rendered == 15
    _check_run_charts(charts, points, logged["beta"], "beta-name")


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


def test_dashboard_reads_what_the_tracker_writes(tmp_path):
    from rlhf.tracking import Tracker

    run_dir = tmp_path / "runs" / "tracked"
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "tracked", "stages": {"ppo": {"status": "running"}}}))
    tracker = Tracker(run_dir, "ppo", config={}, group="tracked")
    for step in range(4):
        tracker.log({"reward/score_mean": step / 2, "kl/mean": float("nan") if step == 2 else 0.1}, step=step)
    tracker.log_samples(3, [{"prompt": "q", "completion": "a", "score": 0.5, "gold": 1.0}])
    tracker.finish()
    (stage,) = load_run(run_dir).stages
    assert stage.series["reward/score_mean"] == {"step": [0, 1, 2, 3], "value": [0.0, 0.5, 1.0, 1.5]}
    assert stage.series["kl/mean"]["value"] == [0.1, 0.1, None, 0.1]  # NaN is a gap, not an error
    assert stage.samples == [{"step": 3, "prompt": "q", "completion": "a", "score": 0.5, "gold": 1.0}]
    page = (tmp_path / "r.html")
    assert dashboard_main(["report", str(run_dir), "--out", str(page)]) == 0
    assert '<meta http-equiv="refresh"' not in page.read_text()  # the shared file never reloads


def test_lineage_from_the_real_registry(tmp_path):
    registry_module = pytest.importorskip("rlhf.registry")
    from safetensors.torch import save_file
    import torch

    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file({"w": torch.zeros(2)}, str(base_dir / "model.safetensors"))
    (base_dir / "config.json").write_text("{}")
    home = tmp_path / "home"
    registry = registry_module.Registry.open(home=home)
    base = registry.register_base("tiny", str(base_dir))
    run_ref = registry.start_run("sft", {"lr": 1e-4}, inputs=[base.ref])
    registry.finish_run(run_ref, "completed", {"loss": 1.0})
    registry.close()

    run_dir = tmp_path / "runs" / "real"
    run_dir.mkdir(parents=True)
    stages = {"sft": {"status": "completed", "inputs": {"base": base.ref}, "outputs": {"run": run_ref}}}
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "real", "registry_home": str(home), "stages": stages}))
    run = load_run(run_dir)
    assert run.lineage_note is None
    descendants = run.lineage[base.ref]["descendants"]
    assert [node["ref"] for node in descendants] == [run_ref]
    out = tmp_path / "real.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(out)]) == 0
    assert f"lineage of <code>{base.ref}</code>" in out.read_text()
