"""HTML pages for the dashboard: run list, one run, several runs overlaid.

A run page reads top to bottom as a reader asks questions of a run:

1. **Summary**: the SFT policy against each trained policy (gold reward when the task has
   one, RM score, KL to SFT, win rate when logged, response length, each with its standard
   error), the reward model's accuracy, and the registry refs the run produced.
2. **One part per stage**: charts grouped by section (reward, KL, policy, value, lengths,
   training, optimization, throughput, evaluation); standard errors drawn as bands on their
   means; metrics that never changed shown as numbers; at every evaluation the histograms of
   the logged samples' scores and lengths; the samples themselves, filterable by step.
3. **Lineage**: a graph of the registry refs and stages (inline SVG).

Charts are drawn by plotly.js from figure JSON embedded in the page. The served pages load
plotly.js from the dashboard server itself and the shareable report inlines it, so neither
needs a network. A smoothing slider (exponential moving average, training curves only) and an
x-axis choice (update/step, or episodes for PPO and epochs for the TRL stages) restyle the
drawn charts in place. After every chart is drawn the page sets
``document.body.dataset.rendered`` (number of charts) and ``document.body.dataset.points``
(points per trace, read back from plotly's graph divs), which the browser tests compare with
the logged metrics.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from typing import Any, Iterable, Sequence

from rlhf.dashboard.data import RunData, StageData, alternate_x, policy_summary
from rlhf.dashboard.lineage import lineage_graph, render_svg
from rlhf.dashboard.metrics import SECTIONS, label, plan_stage

__all__ = ["render_compare", "render_index", "render_run", "plotly_js"]

PLOTLY_URL = "/static/plotly.min.js"

# Line colours, one per run on the compare page (plotly's default cycle, spelled out so a
# band can take its line's colour).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

# Short column headings of the summary's policy table, by evaluation name (eval/<name>_mean).
SUMMARY_COLUMNS = {
    "gold": "Gold reward (objective)",
    "score": "RM score",
    "kl": "KL to SFT per response",
    "win_rate": "Win rate vs SFT (RM)",
    "gold_win_rate": "Win rate vs SFT (objective)",
    "length": "Response length (tokens)",
    "entropy": "Entropy per token",
    "disagreement": "RM members' disagreement (std)",
}

#: Every status a stage can have (rlhf.pipeline, rlhf.runs), each with a badge colour in _CSS.
STAGE_STATUSES = ("completed", "running", "failed", "killed", "interrupted", "blocked", "pending", "unknown")

# Per-sample fields drawn as histograms at each evaluation, with their axis titles.
HISTOGRAM_FIELDS = (("score", "RM score"), ("gold", "Gold reward (objective)"), ("length", "Response length (tokens)"))

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 110rem; }
h1 { font-size: 1.4rem; margin-bottom: .3rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05rem; margin: 1.2rem 0 .4rem; } h4 { font-size: .95rem; margin: .8rem 0 .3rem; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 40rem; font-family: ui-monospace, monospace; font-size: .85rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); gap: .75rem; }
.chart { height: 18rem; border: 1px solid #eee; }
.status { padding: .05rem .4rem; border-radius: .3rem; font-size: .85rem; }
.status-completed { background: #d8f3dc; } .status-running { background: #fff3bf; }
.status-failed, .status-killed { background: #ffd6d6; } .status-interrupted, .status-blocked { background: #ffe0b3; }
.status-pending, .status-unknown { background: #eee; }
.problems { background: #fff4e5; border: 1px solid #f0c36d; padding: .5rem 1rem; }
.provisional { background: #fff3bf; border: 1px solid #e6c200; padding: .5rem 1rem; }
.muted { color: #777; } pre { background: #f8f8f8; padding: .5rem; overflow-x: auto; }
code.key { color: #777; font-size: .8rem; }
nav a { margin-right: 1rem; }
.controls { position: sticky; top: 0; background: #fff; padding: .4rem 0; border-bottom: 1px solid #eee; z-index: 10; }
.controls label { margin-right: 1.5rem; }
.constants { display: flex; flex-wrap: wrap; gap: .4rem 1.5rem; margin: .3rem 0 .6rem; }
.constant { border: 1px solid #e4e4e4; border-radius: .3rem; padding: .2rem .5rem; }
.constant .value { font-weight: 600; font-variant-numeric: tabular-nums; }
.lineage-wrap { overflow-x: auto; }
"""

# Draws every chart listed in #rlhf-charts, wires the smoothing and x-axis controls, and
# records what plotly holds once all are drawn. Smoothing is the bias-corrected exponential
# moving average of rlhf.dashboard.metrics.ema (the tests compute it there).
_CHARTS_JS = """
(function () {
  var specs = JSON.parse(document.getElementById("rlhf-charts").textContent);
  var config = {responsive: true, displaylogo: false};
  specs.forEach(function (s) {
    s.extra.forEach(function (x, i) {
      x.raw = s.figure.data[i].y ? s.figure.data[i].y.slice() : null;
      x.x_step = s.figure.data[i].x.slice();
    });
  });
  function ema(values, w) {
    var out = [], last = 0, n = 0;
    values.forEach(function (v) {
      if (v === null) { out.push(null); return; }
      n += 1; last = last * w + (1 - w) * v;
      out.push(w > 0 ? last / (1 - Math.pow(w, n)) : v);
    });
    return out;
  }
  function smooth(w) {
    specs.forEach(function (s) {
      if (!s.smooth) { return; }
      s.extra.forEach(function (x, i) {
        if (x.role === "line" || x.role === "band") {
          Plotly.restyle(s.id, {y: [ema(x.raw, w)]}, [i]);
        } else if (x.role === "raw") {
          Plotly.restyle(s.id, {visible: w > 0}, [i]);
        }
      });
    });
  }
  function xaxis(which) {
    specs.forEach(function (s) {
      if (!s.x_alt_title) { return; }
      s.extra.forEach(function (x, i) {
        if (x.x_alt) { Plotly.restyle(s.id, {x: [which === "alt" ? x.x_alt : x.x_step]}, [i]); }
      });
      Plotly.relayout(s.id, {"xaxis.title.text": which === "alt" ? s.x_alt_title : s.x_title});
    });
  }
  Promise.all(specs.map(function (s) {
    return Plotly.newPlot(s.id, s.figure.data, s.figure.layout, config);
  })).then(function (divs) {
    var points = {};
    divs.forEach(function (gd) {
      points[gd.id] = gd.data.map(function (t) { return [t.name, t.x.length]; });
    });
    document.body.dataset.points = JSON.stringify(points);
    var slider = document.getElementById("smoothing");
    if (slider) {
      slider.addEventListener("input", function () {
        document.getElementById("smoothing-value").textContent = Number(slider.value).toFixed(2);
        smooth(Number(slider.value));
      });
    }
    var axis = document.getElementById("x-axis");
    if (axis) { axis.addEventListener("change", function () { xaxis(axis.value); }); }
    document.body.dataset.rendered = String(divs.length);
  }).catch(function (err) {
    document.body.dataset.rendered = "error";
    console.error("rlhf dashboard: drawing charts failed:", err);
  });
})();
"""

# Shows the sample rows of the chosen step (and containing the typed text).
_SAMPLES_JS = """
(function () {
  document.querySelectorAll("[data-samples]").forEach(function (box) {
    var select = box.querySelector("select"), search = box.querySelector("input");
    function apply() {
      var step = select.value, text = search.value.toLowerCase(), shown = 0;
      box.querySelectorAll("tbody tr").forEach(function (row) {
        var ok = (step === "all" || row.dataset.step === step) &&
                 (!text || row.textContent.toLowerCase().indexOf(text) >= 0);
        row.hidden = !ok;
        if (ok) { shown += 1; }
      });
      box.querySelector(".shown").textContent = String(shown);
    }
    select.addEventListener("change", apply);
    search.addEventListener("input", apply);
    apply();
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



def _pm(mean: Any, se: Any) -> str:
    """``mean ± se`` for a table cell, the mean rounded to the precision its error supports.

    Two significant digits of the standard error set the decimals of both (0.160 ± 0.015);
    without a usable error the mean gets four significant digits.
    """
    if mean is None:
        return '<span class="muted">-</span>'
    mean = float(mean)
    if isinstance(se, (int, float)) and not isinstance(se, bool) and math.isfinite(se) and math.isfinite(mean):
        if se > 0:
            decimals = max(0, 1 - math.floor(math.log10(se)))
            return f"{mean:.{decimals}f} \u00b1 {se:.{decimals}f}"
        return f"{_fmt(mean)} \u00b1 0"
    return _fmt(mean)


def _key(key: str) -> str:
    """The raw metric key, small, beside its label: what to search for in wandb or the JSONL."""
    return f'<code class="key">{_e(key)}</code>'


class _Charts:
    """Collects the figures of one page; each gets a div id and goes into #rlhf-charts."""

    def __init__(self) -> None:
        self.specs: list[dict[str, Any]] = []

    def add(self, key: str, spec: dict[str, Any]) -> str:
        chart_id = f"chart-{len(self.specs)}-{_slug(key)}"
        spec = {"id": chart_id, **spec}
        self.specs.append(spec)
        return f'<div class="chart" id="{_e(chart_id)}" data-key="{_e(key)}"></div>'


def _layout(title: str, x_title: str, *, legend: bool) -> dict[str, Any]:
    return {
        # Left-aligned so the title does not sit under plotly's mode bar (top right).
        "title": {"text": title, "font": {"size": 13}, "x": 0.01, "xanchor": "left"},
        "margin": {"l": 55, "r": 15, "t": 40, "b": 80 if legend else 40},
        "xaxis": {"title": {"text": x_title}},
        "showlegend": legend,
        "legend": {"orientation": "h", "y": -0.3, "yanchor": "top"},
        "hovermode": "x unified",
    }


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


class _Curve:
    """One run's curve on a chart: steps, values, optional standard errors and second x-axis."""

    def __init__(self, name: str, steps: list, values: list, se: list | None, alt: dict[int, float] | None) -> None:
        self.name, self.steps, self.values, self.se, self.alt = name, steps, values, se, alt

    def x_alt(self, steps: list) -> list | None:
        return None if self.alt is None else [self.alt.get(s) for s in steps]


def _line_spec(title: str, curves: Sequence[_Curve], *, x_title: str, x_alt_title: str | None, smooth: bool) -> dict[str, Any]:
    """A chart of one metric: per curve a line, a faint raw copy for smoothing, a s.e. band.

    ``extra`` (index-aligned with the traces) keeps what the page's controls need besides the
    trace itself: its role and the second x-axis. The page copies each trace's logged x and
    y before drawing, to smooth and switch axes from (not sent twice).
    """
    data: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    for index, curve in enumerate(curves):
        color = PALETTE[index % len(PALETTE)]
        steps, values = list(curve.steps), list(curve.values)
        alt = curve.x_alt(steps)
        if curve.se is not None:
            lower = [None if v is None or e is None else v - e for v, e in zip(values, curve.se)]
            upper = [None if v is None or e is None else v + e for v, e in zip(values, curve.se)]
            for edge, ys in (("lower", lower), ("upper", upper)):
                data.append(
                    {
                        "type": "scatter",
                        "mode": "lines",
                        "name": f"{curve.name} \u00b1 s.e. ({edge})",
                        "x": steps,
                        "y": ys,
                        "line": {"width": 0, "color": color},
                        "fill": "tonexty" if edge == "upper" else "none",
                        "fillcolor": _rgba(color, 0.2),
                        "showlegend": False,
                        "hoverinfo": "skip",
                    }
                )
                extra.append({"role": "band", "edge": edge, "x_alt": alt})
        if smooth:
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": f"{curve.name} (raw)",
                    "x": steps,
                    "y": values,
                    "line": {"width": 1, "color": color},
                    "opacity": 0.3,
                    "visible": False,
                    "showlegend": False,
                    "hoverinfo": "skip",
                }
            )
            extra.append({"role": "raw", "x_alt": alt})
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers" if len(steps) <= 60 else "lines",
                "name": curve.name,
                "x": steps,
                "y": values,
                "line": {"color": color},
                "connectgaps": False,
            }
        )
        extra.append({"role": "line", "x_alt": alt})
    legend = len(curves) > 1
    return {
        "figure": {"data": data, "layout": _layout(title, x_title, legend=legend)},
        "extra": extra,
        "smooth": smooth,
        "x_title": x_title,
        "x_alt_title": x_alt_title if any(c.alt is not None for c in curves) else None,
    }


def _hist_spec(title: str, step_word: str, groups: list[tuple[Any, list[float]]]) -> dict[str, Any]:
    """Overlaid histograms, one per evaluation step; first and last shown, the rest a click away."""
    data = []
    for index, (step, values) in enumerate(groups):
        data.append(
            {
                "type": "histogram",
                "name": f"{step_word} {step} (n={len(values)})",
                "x": values,
                "opacity": 0.55,
                "visible": True if index in (0, len(groups) - 1) else "legendonly",
                "marker": {"color": PALETTE[index % len(PALETTE)]},
            }
        )
    # The chart title names the quantity; an x-axis title would collide with the legend.
    layout = _layout(title, "", legend=True)
    layout.update(barmode="overlay", hovermode="closest")
    layout["legend"]["y"] = -0.15
    layout["yaxis"] = {"title": {"text": "samples"}}
    return {"figure": {"data": data, "layout": layout}, "extra": [{"role": "hist"} for _ in data], "smooth": False}


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
        f"<style>{_CSS}</style>{plotly_tag}</head>\n<body>{nav}\n{body}\n"
        f"<script>{_SAMPLES_JS}</script>{chart_tags}</body></html>\n"
    )


def _controls(x_alt_titles: Iterable[str]) -> str:
    titles = sorted(set(x_alt_titles))
    axis = ""
    if titles:
        axis = (
            '<label>x-axis <select id="x-axis"><option value="step">update / step</option>'
            f'<option value="alt">{_e(" / ".join(titles))}</option></select></label>'
        )
    return (
        '<div class="controls"><label>smoothing (training curves) <input type="range" id="smoothing" '
        'min="0" max="0.99" step="0.01" value="0"> <span id="smoothing-value">0.00</span></label>'
        f"{axis}</div>"
    )


def _status(status: str) -> str:
    return f'<span class="status status-{_slug(status)}">{_e(status)}</span>'


def _problems(problems: Iterable[str]) -> str:
    problems = list(problems)
    if not problems:
        return ""
    items = "".join(f"<li>{_e(p)}</li>" for p in problems)
    return f'<div class="problems"><strong>Some input could not be read:</strong><ul>{items}</ul></div>'


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
        if run["summary"].get("provisional") or any(status != "completed" for status in run["stages"].values()):
            summary = f'<span class="provisional">provisional</span> {summary}'
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


def _stages_to_come(run: RunData) -> list[str]:
    """The run's stages that have not completed, in pipeline order."""
    return [stage.name for stage in run.stages if stage.status != "completed"]


def _provisional_html(run: RunData) -> str:
    """A note over the summary of a run under way, interrupted or failed: its numbers are the
    run's so far, not its final ones."""
    to_come = _stages_to_come(run)
    if not to_come and not run.summary.get("provisional"):
        return ""
    return ('<p class="provisional" id="provisional"><strong>Provisional:</strong> the run has not finished; '
            f"still to come: {_e(', '.join(to_come))}. The numbers below are the run's so far.</p>")


def _summary_html(run: RunData) -> str:
    """The top of a run page: policies side by side, the reward model, what was produced."""
    summary = policy_summary(run)
    alts = {stage.name: alternate_x(stage) for stage in run.stages}
    for policy in summary["policies"]:
        alt = alts.get(policy["stage"])
        policy["step_word"] = "update" if alt and alt[0] == "episodes" else "step"
    parts = ['<h2 id="summary">Summary</h2>', _provisional_html(run)]
    policies, columns = summary["policies"], summary["columns"]
    if policies:
        head = "".join(
            f'<th title="eval/{_e(c)}_mean">{_e(SUMMARY_COLUMNS.get(c, c))}</th>' for c in columns
        )
        has_gold = "gold" in columns and len(policies) > 1
        if has_gold:
            head += "<th>Gold reward vs SFT</th>"
        rows = []
        sft = policies[0]
        for policy in policies:
            cells = []
            for column in columns:
                mean, se = policy["values"].get(column, (None, None))
                cells.append(
                    f'<td class="num" data-metric="{_e(column)}" data-mean="{_e(mean)}" data-se="{_e(se)}">'
                    f"{_pm(mean, se)}</td>"
                )
            if has_gold:
                cells.append(f'<td class="num">{_improvement(sft, policy)}</td>')
            where = f"{policy['step_word']} {policy['step']} of {policy['stage']}" if policy["step"] is not None else policy["stage"]
            ref = f"<br><code>{_e(policy['ref'])}</code>" if policy["ref"] else ""
            rows.append(
                f'<tr data-policy="{_e(policy["label"])}"><th>{_e(policy["label"])}'
                f' <span class="muted">({_e(where)})</span>{ref}</th>{"".join(cells)}</tr>'
            )
        parts.append(
            '<table id="summary-policies"><thead><tr><th>policy</th>' + head + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>"
            '<p class="muted">Mean over the held-out evaluation prompts \u00b1 its standard error. '
            "The SFT policy is the first evaluation, before any update.</p>"
        )
    else:
        parts.append('<p class="muted">No policy evaluation logged yet (eval/&lt;name&gt;_mean).</p>')
    facts = [(key, value) for key, value in summary["reward_model"].items()]
    facts += [(key, value) for key, value in summary["sft"].items()]
    if facts:
        labels = {
            "eval_accuracy": "Reward model accuracy, held-out pairs (labels as given)",
            "gold_accuracy": "Reward model accuracy vs the noiseless gold preference",
            "eval_margin": "Reward model margin, chosen - rejected, held-out pairs",
            "eval_loss": "SFT eval loss",
            "eval_mean_token_accuracy": "SFT next-token accuracy, held-out",
        }
        rows = "".join(
            f'<tr data-metric="{_e(key)}"><th>{_e(labels.get(key, label(key)))}</th>'
            f'<td class="num">{_fmt(value)}</td></tr>'
            for key, value in facts
        )
        parts.append(f'<table id="summary-models">{rows}</table>')
    produced = [
        f"<tr><td>{_e(stage.name)}</td><td>{_e(role)}</td><td><code>{_e(ref)}</code></td></tr>"
        for stage in run.stages
        for role, ref in stage.outputs.items()
        if isinstance(ref, str)
    ]
    if produced:
        parts.append(
            '<h3>Registered artifacts</h3><table id="summary-refs"><tr><th>stage</th><th>role</th>'
            "<th>registry ref</th></tr>" + "".join(produced) + "</table>"
        )
    final = [(f"summary.json", run.summary)] + [(f"{s.name} (pipeline.json)", s.final_metrics) for s in run.stages]
    blocks = "".join(
        f"<h4>{_e(where)}</h4><table>"
        + "".join(
            f"<tr><th>{_e(label(k))}</th><td class=\"num\">{_fmt(v)}</td><td>{_key(k)}</td></tr>"
            for k, v in values.items()
        )
        + "</table>"
        for where, values in final
        if values
    )
    if blocks:
        parts.append(f"<details><summary>All final numbers</summary>{blocks}</details>")
    return "".join(parts)


def _improvement(sft: dict[str, Any], policy: dict[str, Any]) -> str:
    if policy is sft:
        return ""
    base, base_se = sft["values"].get("gold", (None, None))
    mean, se = policy["values"].get("gold", (None, None))
    if base is None or mean is None:
        return '<span class="muted">-</span>'
    diff = mean - base
    text = f"{diff:+.4g}"
    if isinstance(se, (int, float)) and isinstance(base_se, (int, float)) and math.hypot(se, base_se) > 0:
        text += f" ({diff / math.hypot(se, base_se):+.1f} s.e.)"
    return text


def _constants_html(constants: dict[str, dict[str, Any]], step_word: str) -> str:
    items = []
    for key, info in constants.items():
        steps = info["steps"]
        if info["value"] is None:
            value = "not finite"
            when = f"NaN or infinite at all {len(steps)} logged {step_word}s"
        else:
            value = _pm(info["value"], info["se"])
            when = f"logged once, at {step_word} {steps[0]}" if len(steps) == 1 else f"same at all {len(steps)} logged {step_word}s"
        items.append(
            f'<div class="constant" data-key="{_e(key)}" data-value="{_e(info["value"])}" title="{_e(when)}">'
            f'{_e(label(key))}: <span class="value">{value}</span> {_key(key)}</div>'
        )
    return f'<div class="constants">{"".join(items)}</div>' if items else ""


def _histograms(stage: StageData, charts: _Charts, step_word: str) -> list[str]:
    """Score and length histograms of the logged samples, one trace per evaluation step."""
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for row in stage.samples:
        by_step.setdefault(row["step"], []).append(row)
    divs = []
    for field_name, title in HISTOGRAM_FIELDS:
        groups = []
        for step, rows in by_step.items():
            values = [r[field_name] for r in rows if isinstance(r.get(field_name), (int, float))]
            if values:
                groups.append((step, values))
        if field_name == "length" and not groups:
            # Token counts are not in this run's samples; count words of the completion instead.
            groups = [(step, [float(len(r["completion"].split())) for r in rows]) for step, rows in by_step.items()]
            title = "Response length (words; samples carry no token count)"
        if groups:
            divs.append(
                charts.add(f"{stage.name}-hist-{field_name}", _hist_spec(f"{title}, by evaluation", step_word, groups))
            )
    return divs


def _stage_html(run: RunData, stage: StageData, charts: _Charts) -> str:
    parts = [f'<h2 id="stage-{_e(_slug(stage.name))}">{_e(stage.name)} {_status(stage.status)}</h2>']
    plan = plan_stage(stage.series)
    alt = alternate_x(stage)
    step_word = "update" if alt and alt[0] == "episodes" else "step"
    if not stage.series:
        parts.append('<p class="muted">No metrics logged yet.</p>')
    for section, title in SECTIONS:
        section_charts = plan.charts.get(section, [])
        constants = plan.constants.get(section, {})
        hist_divs = _histograms(stage, charts, step_word) if section == "evaluation" and stage.samples else []
        if not (section_charts or constants or hist_divs):
            continue
        divs = []
        for chart in section_charts:
            entry = stage.series[chart.key]
            se = None
            if chart.se_key:
                se_by_step = dict(zip(stage.series[chart.se_key]["step"], stage.series[chart.se_key]["value"]))
                se = [se_by_step.get(s) for s in entry["step"]]
            curve = _Curve(run.name, entry["step"], entry["value"], se, alt[1] if alt else None)
            spec = _line_spec(
                label(chart.key),
                [curve],
                x_title=step_word,
                x_alt_title=alt[0] if alt else None,
                smooth=section != "evaluation",
            )
            divs.append(charts.add(f"{stage.name}-{chart.key}", spec))
        divs += hist_divs  # after the evaluation curves: one histogram per field, all evaluations
        parts.append(
            f'<section class="metrics" data-stage="{_e(stage.name)}" data-section="{_e(section)}">'
            f"<h3>{_e(title)}</h3>{_constants_html(constants, step_word)}"
            + (f'<div class="charts">{"".join(divs)}</div>' if divs else "")
            + _value_note(stage, section)
            + "</section>"
        )
    parts.append(_samples_html(stage))
    if stage.config_text is not None:
        parts.append(f"<details><summary>config.yaml</summary><pre>{_e(stage.config_text)}</pre></details>")
    return "".join(parts)


def _value_note(stage: StageData, section: str) -> str:
    if section != "value" or any("explained_var" in key for key in stage.series):
        return ""
    return (
        '<p class="muted">Value explained variance is not logged by this run '
        "(the PPO stage would log it as <code>value/explained_variance</code>).</p>"
    )


def _samples_html(stage: StageData) -> str:
    if not stage.samples:
        return ""
    steps = list(dict.fromkeys(row["step"] for row in stage.samples))
    extra = [k for k in dict.fromkeys(k for row in stage.samples for k in row) if k not in ("step", "prompt", "completion")]
    options = '<option value="all">all steps</option>' + "".join(
        f'<option value="{_e(s)}"{" selected" if s == steps[-1] else ""}>step {_e(s)}</option>' for s in steps
    )
    rows = "".join(
        f'<tr data-step="{_e(r["step"])}"><td class="num">{_e(r["step"])}</td><td class="text">{_e(r["prompt"])}</td>'
        f'<td class="text">{_e(r["completion"])}</td>'
        + "".join(f'<td class="num">{_fmt(r.get(k))}</td>' for k in extra)
        + "</tr>"
        for r in stage.samples
    )
    return (
        f'<div class="samples" data-samples="{_e(stage.name)}"><h3>Sample completions</h3>'
        f'<p><label>step <select aria-label="samples of step">{options}</select></label> '
        '<label>containing <input type="search" aria-label="filter samples by text"></label> '
        f'<span class="muted">showing <span class="shown">{len(stage.samples)}</span> of {len(stage.samples)} '
        f"samples logged at {len(steps)} steps</span></p>"
        "<table><thead><tr><th>step</th><th>prompt</th><th>completion</th>"
        + "".join(f"<th>{_e(k)}</th>" for k in extra)
        + f"</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _value_html(value: Any) -> str:
    """Nested registry data as nested lists/tables (the raw records under the graph)."""
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
    svg = render_svg(lineage_graph(run))
    if not svg:
        return '<h2 id="lineage">Lineage</h2><p class="muted">This run records no registry references.</p>'
    parts = ['<h2 id="lineage">Lineage</h2>', f'<div class="lineage-wrap">{svg}</div>']
    if run.lineage_note:
        parts.append(f'<p class="muted">{_e(run.lineage_note)}</p>')
    records = "".join(
        f"<h4>lineage of <code>{_e(ref)}</code></h4>{_value_html(record)}" for ref, record in run.lineage.items()
    )
    if records:
        parts.append(f"<details><summary>Registry lineage records</summary>{records}</details>")
    return "".join(parts)


def render_run(run: RunData, *, standalone: bool = False) -> str:
    """One run: summary, stages with grouped curves, histograms and samples, lineage graph.

    Args:
        run: Loaded run data.
        standalone: True for the shareable report: plotly.js inlined, no links to the server.
    """
    charts = _Charts()
    header = (
        f"<h1>{_e(run.name)}</h1><p class=\"muted\">"
        + " ".join(f'<a href="#stage-{_e(_slug(s.name))}">{_e(s.name)}</a> {_status(s.status)}' for s in run.stages)
        + f" &middot; created {_e(run.created)} &middot; recipe <code>{_e(run.recipe)}</code>"
        f" &middot; <code>{_e(run.path)}</code></p>"
    )
    alts = [alt[0] for alt in (alternate_x(stage) for stage in run.stages) if alt]
    body = [header, _problems(run.problems), _summary_html(run), _controls(alts)]
    body += [_stage_html(run, stage, charts) for stage in run.stages]
    body.append(_lineage_html(run))
    running = any(stage.status == "running" for stage in run.stages)
    return _page(f"rlhf run {run.name}", "".join(body), charts, standalone=standalone, refresh=running)


def render_compare(runs: list[RunData]) -> str:
    """Several runs overlaid: per stage and section, one chart per metric, one line per run."""
    charts = _Charts()
    stage_names: list[str] = []
    for run in runs:
        for stage in run.stages:
            if stage.name not in stage_names:
                stage_names.append(stage.name)
    names = ", ".join(f'<a href="/run/{_e(run.key)}">{_e(run.name)}</a>' for run in runs)
    body = [f"<h1>Comparing {len(runs)} runs</h1><p>{names}</p>", _problems(p for run in runs for p in run.problems)]
    alts: list[str] = []
    for stage_name in stage_names:
        per_run = [(run, stage) for run in runs for stage in run.stages if stage.name == stage_name]
        plans = [(run, stage, plan_stage(stage.series), alternate_x(stage)) for run, stage in per_run]
        alts += [alt[0] for _, _, _, alt in plans if alt]
        body.append(f'<h2 id="stage-{_e(_slug(stage_name))}">{_e(stage_name)}</h2>')
        any_section = False
        for section, title in SECTIONS:
            # A metric is charted if any run charts it; constants stay numbers, one per run.
            chart_keys: dict[str, str | None] = {}
            constant_keys: list[str] = []
            for _, _, plan, _ in plans:
                for chart in plan.charts.get(section, []):
                    chart_keys.setdefault(chart.key, chart.se_key)
                constant_keys += [k for k in plan.constants.get(section, {}) if k not in constant_keys]
            constant_keys = [k for k in constant_keys if k not in chart_keys]
            if not chart_keys and not constant_keys:
                continue
            any_section = True
            divs = []
            for key, se_key in chart_keys.items():
                curves = []
                for run, stage, _, alt in plans:
                    if key not in stage.series:
                        continue
                    entry = stage.series[key]
                    se = None
                    if se_key and se_key in stage.series:
                        se_by_step = dict(zip(stage.series[se_key]["step"], stage.series[se_key]["value"]))
                        se = [se_by_step.get(s) for s in entry["step"]]
                    curves.append(_Curve(run.key, entry["step"], entry["value"], se, alt[1] if alt else None))
                x_alt_title = next((alt[0] for _, _, _, alt in plans if alt), None)
                step_word = "update" if x_alt_title == "episodes" else "step"
                spec = _line_spec(label(key), curves, x_title=step_word, x_alt_title=x_alt_title, smooth=section != "evaluation")
                divs.append(charts.add(f"{stage_name}-{key}", spec))
            table = ""
            if constant_keys:
                head = "".join(f"<th>{_e(run.key)}</th>" for run, _, _, _ in plans)
                rows = ""
                for key in constant_keys:
                    cells = ""
                    for _, _, plan, _ in plans:
                        info = plan.constants.get(section, {}).get(key)
                        cells += f'<td class="num">{_pm(info["value"], info["se"]) if info else "-"}</td>'
                    rows += f"<tr><th>{_e(label(key))} {_key(key)}</th>{cells}</tr>"
                table = f'<table class="constants-table"><tr><th>unchanged during the run</th>{head}</tr>{rows}</table>'
            body.append(
                f'<section class="metrics" data-stage="{_e(stage_name)}" data-section="{_e(section)}">'
                f"<h3>{_e(title)}</h3>{table}" + (f'<div class="charts">{"".join(divs)}</div>' if divs else "") + "</section>"
            )
        if not any_section:
            body.append('<p class="muted">No metrics logged.</p>')
    body.insert(2, _controls(alts))
    return _page("rlhf compare", "".join(body), charts, standalone=False)
