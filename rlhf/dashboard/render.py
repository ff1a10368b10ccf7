"""HTML pages for the dashboard: run list, one run, several runs overlaid.

Charts are drawn by plotly.js from figure JSON embedded in the page. The served pages load
plotly.js from the dashboard server itself and the shareable report inlines it, so neither
needs a network. After every chart is drawn the page sets ``document.body.dataset.rendered``
(number of charts) and ``document.body.dataset.points`` (points per trace, read back from
plotly's graph divs), which the browser test compares with the logged metrics.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from typing import Any, Iterable, Sequence

from rlhf.dashboard.data import RunData, StageData, run_refs

__all__ = ["render_compare", "render_index", "render_run", "plotly_js"]

PLOTLY_URL = "/static/plotly.min.js"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.text { white-space: pre-wrap; max-width: 40rem; font-family: ui-monospace, monospace; font-size: .85rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); gap: .75rem; }
.chart { height: 18rem; border: 1px solid #eee; }
.status { padding: .05rem .4rem; border-radius: .3rem; font-size: .85rem; }
.status-completed { background: #d8f3dc; } .status-running { background: #fff3bf; }
.status-failed { background: #ffd6d6; } .status-pending, .status-unknown { background: #eee; }
.problems { background: #fff4e5; border: 1px solid #f0c36d; padding: .5rem 1rem; }
.muted { color: #777; } pre { background: #f8f8f8; padding: .5rem; overflow-x: auto; }
nav a { margin-right: 1rem; }
"""

# Draws every chart listed in #rlhf-charts and records what plotly holds once all are drawn.
_CHARTS_JS = """
(function () {
  var specs = JSON.parse(document.getElementById("rlhf-charts").textContent);
  var config = {responsive: true, displaylogo: false};
  Promise.all(specs.map(function (s) {
    return Plotly.newPlot(s.id, s.figure.data, s.figure.layout, config);
  })).then(function (divs) {
    var points = {};
    divs.forEach(function (gd) {
      points[gd.id] = gd.data.map(function (t) { return [t.name, t.x.length]; });
    });
    document.body.dataset.points = JSON.stringify(points);
    document.body.dataset.rendered = String(divs.length);
  }).catch(function (err) {
    document.body.dataset.rendered = "error";
    console.error("rlhf dashboard: drawing charts failed:", err);
  });
})();
"""


@functools.lru_cache(maxsize=1)
def plotly_js() -> str:
    """The plotly.js bundle shipped inside the plotly Python package (no CDN)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError as err:
        raise ImportError(
            "the dashboard draws charts with plotly; install it with: pip install 'rlhf[dashboard]'"
        ) from err
    return get_plotlyjs()


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return _e(value)


def _script_json(value: Any) -> str:
    # "</" inside a <script> would end it early; "<\/" is the same string to JSON.parse.
    return json.dumps(value, allow_nan=False).replace("</", "<\\/")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _figure(title: str, traces: Sequence[tuple[str, list, list]]) -> dict[str, Any]:
    """A plotly figure (as JSON data) with one line per (name, steps, values) trace."""
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers" if len(xs) <= 60 else "lines",
            "name": name,
            "x": list(xs),
            "y": list(ys),
            "connectgaps": False,
        }
        for name, xs, ys in traces
    ]
    layout = {
        # Left-aligned so the title does not sit under plotly's mode bar (top right).
        "title": {"text": title, "font": {"size": 14}, "x": 0.01, "xanchor": "left"},
        "margin": {"l": 50, "r": 15, "t": 40, "b": 70 if len(traces) > 1 else 35},
        "xaxis": {"title": {"text": "step"}},
        "showlegend": len(traces) > 1,
        "legend": {"orientation": "h", "y": -0.3, "yanchor": "top"},
        "hovermode": "x unified",
    }
    return {"data": data, "layout": layout}


class _Charts:
    """Collects the figures of one page; each gets a div id and goes into #rlhf-charts."""

    def __init__(self) -> None:
        self.specs: list[dict[str, Any]] = []

    def add(self, key: str, figure: dict[str, Any]) -> str:
        chart_id = f"chart-{len(self.specs)}-{_slug(key)}"
        self.specs.append({"id": chart_id, "figure": figure})
        return f'<div class="chart" id="{_e(chart_id)}"></div>'


def _page(title: str, body: str, charts: _Charts, *, standalone: bool, refresh: bool = False) -> str:
    if charts.specs:
        plotly_tag = (
            f"<script>{plotly_js()}</script>" if standalone else f'<script src="{PLOTLY_URL}"></script>'
        )
        chart_tags = (
            f'<script type="application/json" id="rlhf-charts">{_script_json(charts.specs)}</script>'
            f"<script>{_CHARTS_JS}</script>"
        )
    else:
        plotly_tag = ""
        chart_tags = "<script>document.body.dataset.points = '{}'; document.body.dataset.rendered = '0';</script>"
    nav = "" if standalone else '<nav><a href="/">all runs</a></nav>'
    meta_refresh = '<meta http-equiv="refresh" content="30">' if refresh and not standalone else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title>{meta_refresh}"
        # An empty icon stops the browser from asking for /favicon.ico (a 404 in the console).
        '<link rel="icon" href="data:,">'
        f"<style>{_CSS}</style>{plotly_tag}</head>\n<body>{nav}\n{body}\n{chart_tags}</body></html>\n"
    )


def _status(status: str) -> str:
    return f'<span class="status status-{_slug(status)}">{_e(status)}</span>'


def _problems(problems: Iterable[str]) -> str:
    problems = list(problems)
    if not problems:
        return ""
    items = "".join(f"<li>{_e(p)}</li>" for p in problems)
    return f'<div class="problems"><strong>Some input could not be read:</strong><ul>{items}</ul></div>'


def _kv_table(values: dict[str, Any]) -> str:
    if not values:
        return '<p class="muted">none</p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def render_index(runs: list[dict[str, Any]], runs_root: str) -> str:
    """The run list with checkboxes to overlay several runs."""
    charts = _Charts()
    if not runs:
        body = (
            f"<h1>rlhf runs</h1><p>No pipeline runs under <code>{_e(runs_root)}</code> "
            "(a run is a folder with a pipeline.json; start one with <code>rlhf run RECIPE</code>).</p>"
        )
        return _page("rlhf runs", body, charts, standalone=False)
    rows = []
    for run in runs:
        stages = " ".join(f"{_e(name)} {_status(status)}" for name, status in run["stages"].items())
        summary = ", ".join(f"{_e(k)}={_fmt(v)}" for k, v in list(run["summary"].items())[:6])
        rows.append(
            "<tr>"
            f'<td><input type="checkbox" name="runs" value="{_e(run["key"])}" aria-label="select {_e(run["key"])}"></td>'
            f'<td><a href="/run/{_e(run["key"])}">{_e(run["name"])}</a>'
            + (f' <span class="muted">({_e(run["key"])})</span>' if run["key"] != run["name"] else "")
            + f"</td><td>{_e(run['created'])}</td><td>{_e(run['recipe'])}</td><td>{stages}</td>"
            f"<td>{summary}</td></tr>"
        )
    problems = [p for run in runs for p in run["problems"]]
    body = (
        f"<h1>rlhf runs</h1><p class=\"muted\">{len(runs)} run(s) under <code>{_e(runs_root)}</code></p>"
        + _problems(problems)
        + '<form action="/compare" method="get"><table><tr><th></th><th>run</th><th>created</th>'
        "<th>recipe</th><th>stages</th><th>summary</th></tr>"
        + "".join(rows)
        + '</table><button type="submit">Overlay selected runs</button></form>'
    )
    running = any(status == "running" for run in runs for status in run["stages"].values())
    return _page("rlhf runs", body, charts, standalone=False, refresh=running)


def _samples_html(stage: StageData) -> str:
    if not stage.samples:
        return ""
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for row in stage.samples:
        by_step.setdefault(row["step"], []).append(row)
    steps = list(by_step)
    parts = [f"<h3>Sample completions ({len(stage.samples)} over {len(steps)} steps)</h3>"]
    for index, step in enumerate(steps):
        rows = by_step[step]
        scores = [r["score"] for r in rows if isinstance(r["score"], (int, float)) and not isinstance(r["score"], bool)]
        mean = f", mean score {_fmt(sum(scores) / len(scores))}" if scores else ""
        table_rows = "".join(
            f'<tr><td class="text">{_e(r["prompt"])}</td><td class="text">{_e(r["completion"])}</td>'
            f"<td>{_fmt(r['score'])}</td><td>{_fmt(r['gold'])}</td></tr>"
            for r in rows
        )
        is_open = " open" if index == len(steps) - 1 else ""
        parts.append(
            f'<details class="samples" data-step="{_e(step)}"{is_open}><summary>step {_e(step)}: '
            f"{len(rows)} sample(s){mean}</summary><table><tr><th>prompt</th><th>completion</th>"
            f"<th>score</th><th>gold</th></tr>{table_rows}</table></details>"
        )
    return "".join(parts)


def _value_html(value: Any) -> str:
    """Nested registry data as nested lists/tables."""
    if isinstance(value, dict):
        if not value:
            return '<span class="muted">{}</span>'
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, list):
        if not value:
            return '<span class="muted">[]</span>'
        return "<ol>" + "".join(f"<li>{_value_html(v)}</li>" for v in value) + "</ol>"
    return _fmt(value)


def _lineage_html(run: RunData) -> str:
    refs = run_refs(run)
    rows = []
    for stage in run.stages:
        for role, mapping in (("input", stage.inputs), ("output", stage.outputs)):
            for key, ref in mapping.items():
                rows.append(f"<tr><td>{_e(stage.name)}</td><td>{role}</td><td>{_e(key)}</td><td><code>{_e(ref)}</code></td></tr>")
    if not rows:
        return '<h2>Lineage</h2><p class="muted">This run records no registry references.</p>'
    parts = [
        "<h2>Lineage</h2>",
        '<table class="refs"><tr><th>stage</th><th>role</th><th>name</th><th>registry ref</th></tr>',
        *rows,
        "</table>",
    ]
    if run.lineage_note:
        parts.append(f'<p class="muted">{_e(run.lineage_note)}</p>')
    for ref in refs:
        if ref in run.lineage:
            parts.append(f"<h3>lineage of <code>{_e(ref)}</code></h3>{_value_html(run.lineage[ref])}")
    return "".join(parts)


def _stage_html(run: RunData, stage: StageData, charts: _Charts) -> str:
    parts = [f'<h2 id="stage-{_e(_slug(stage.name))}">{_e(stage.name)} {_status(stage.status)}</h2>']
    if stage.final_metrics:
        parts.append("<h3>Final metrics</h3>" + _kv_table(stage.final_metrics))
    if stage.series:
        divs = [
            charts.add(f"{stage.name}-{metric}", _figure(metric, [(run.name, s["step"], s["value"])]))
            for metric, s in stage.series.items()
        ]
        parts.append(f'<div class="charts" data-stage="{_e(stage.name)}">{"".join(divs)}</div>')
    else:
        parts.append('<p class="muted">No metrics logged yet.</p>')
    parts.append(_samples_html(stage))
    if stage.config_text is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{_e(stage.config_text)}</pre></details>")
    return "".join(parts)


def render_run(run: RunData, *, standalone: bool = False) -> str:
    """One run: stages with curves, samples and config, lineage, summary.

    Args:
        run: Loaded run data.
        standalone: True for the shareable report: plotly.js inlined, no links to the server.
    """
    charts = _Charts()
    header = (
        f"<h1>{_e(run.name)}</h1><table><tr><th>run directory</th><td><code>{_e(run.path)}</code></td></tr>"
        f"<tr><th>recipe</th><td>{_e(run.recipe)}</td></tr><tr><th>created</th><td>{_e(run.created)}</td></tr>"
        "<tr><th>stages</th><td>"
        + " ".join(f'<a href="#stage-{_e(_slug(s.name))}">{_e(s.name)}</a> {_status(s.status)}' for s in run.stages)
        + "</td></tr></table>"
    )
    body = [header, _problems(run.problems)]
    if run.summary:
        body.append("<h2>Summary</h2>" + _kv_table(run.summary))
    body += [_stage_html(run, stage, charts) for stage in run.stages]
    body.append(_lineage_html(run))
    running = any(stage.status == "running" for stage in run.stages)
    return _page(f"rlhf run {run.name}", "".join(body), charts, standalone=standalone, refresh=running)


def render_compare(runs: list[RunData]) -> str:
    """Several runs overlaid: one chart per (stage, metric), one line per run."""
    charts = _Charts()
    stage_names: list[str] = []
    for run in runs:
        for stage in run.stages:
            if stage.name not in stage_names:
                stage_names.append(stage.name)
    names = ", ".join(f'<a href="/run/{_e(run.key)}">{_e(run.name)}</a>' for run in runs)
    body = [f"<h1>Comparing {len(runs)} runs</h1><p>{names}</p>"]
    body.append(_problems(p for run in runs for p in run.problems))
    for stage_name in stage_names:
        metrics: list[str] = []
        per_run: list[tuple[RunData, StageData]] = []
        for run in runs:
            for stage in run.stages:
                if stage.name == stage_name:
                    per_run.append((run, stage))
                    metrics += [m for m in stage.series if m not in metrics]
        body.append(f"<h2>{_e(stage_name)}</h2>")
        divs = []
        for metric in metrics:
            traces = [
                (run.key, stage.series[metric]["step"], stage.series[metric]["value"])
                for run, stage in per_run
                if metric in stage.series
            ]
            divs.append(charts.add(f"{stage_name}-{metric}", _figure(metric, traces)))
        if divs:
            body.append(f'<div class="charts" data-stage="{_e(stage_name)}">{"".join(divs)}</div>')
        else:
            body.append('<p class="muted">No metrics logged.</p>')
    return _page("rlhf compare", "".join(body), charts, standalone=False)
