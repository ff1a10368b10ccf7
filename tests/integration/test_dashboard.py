"""The local dashboard and the HTML report, over fake run directories with known numbers.

The fake runs log what the real stages log (TRL's keys for SFT and the reward model, the
PPO stage's rollout, update and evaluation keys, ``*_se`` beside evaluation means, per-sample
rows at each evaluation). The expected page layout (which section a metric belongs to,
which values are constants, which series are error bands) is written out here by hand, not
derived with the code under test.

Browser tests drive Debian's chromium headless through the Chrome DevTools protocol over
``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on fds 3 and 4), so no
websocket package is needed. They read the plotted points back from plotly's graph divs
and the page's tables, and compare them with what the fake run logged. They skip when
/usr/bin/chromium is absent (install it with ``apt-get install -y chromium``).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import queue
import re
import shutil
import stat
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
from rlhf.dashboard.metrics import ema
from rlhf.dashboard.render import plotly_js
from rlhf.dashboard.server import make_server

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

EVAL_STEPS = (0, 5, 10, 15)
PPO_TRAIN = (
    "reward/score_mean",
    "kl/mean",
    "entropy/mean",
    "response/length_mean",
    "loss/value",
    "loss/policy",
    "policy/clipfrac",
    "value/vf_clipfrac",
    "value/explained_variance",
    "lr",
    "episodes_per_s",
    "time/generate_s",
)
PPO_EVALS = ("gold", "score", "kl", "win_rate")
ROLLOUT_BATCH = 8

# Where each charted metric must appear: (stage, metric) -> section id.
SECTION = {
    ("sft", "loss"): "training",
    ("sft", "eval_loss"): "evaluation",
    ("sft", "learning_rate"): "optimization",
    ("sft", "grad_norm"): "optimization",
    ("reward", "loss"): "training",
    ("reward", "accuracy"): "training",
    ("reward", "eval_accuracy"): "evaluation",
    ("reward", "eval_margin"): "evaluation",
    ("ppo", "reward/score_mean"): "reward",
    ("ppo", "kl/mean"): "kl",
    ("ppo", "entropy/mean"): "policy",
    ("ppo", "loss/policy"): "policy",
    ("ppo", "policy/clipfrac"): "policy",
    ("ppo", "loss/value"): "value",
    ("ppo", "value/vf_clipfrac"): "value",
    ("ppo", "value/explained_variance"): "value",
    ("ppo", "response/length_mean"): "lengths",
    ("ppo", "lr"): "optimization",
    ("ppo", "episodes_per_s"): "throughput",
    ("ppo", "time/generate_s"): "throughput",
    **{("ppo", f"eval/{name}_mean"): "evaluation" for name in PPO_EVALS},
}
SECTION_TITLES = {
    "reward": "Reward",
    "kl": "KL",
    "policy": "Policy",
    "value": "Value",
    "lengths": "Lengths",
    "training": "Training loss and accuracy",
    "optimization": "Optimization",
    "throughput": "Throughput",
    "evaluation": "Evaluation",
}
# Logged but never changing (or logged once): shown as numbers, never as charts.
CONSTANT_KEYS = {("sft", "train_runtime"), ("ppo", "kl/coef"), ("ppo", "optimizer_steps")}
# Histograms at each evaluation: one chart per per-sample field.
HISTOGRAMS = ("score", "gold", "length")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if key in row]
    return [s for s, _ in points], [v for _, v in points]


def make_run(root: Path, key: str, offset: float, *, registry_home: str | None = None, finished: bool = True) -> dict:
    """Write a fake pipeline run and return what it logged.

    Returns:
        ``{"curves": {(stage, metric): (steps, values)}, "se": {(stage, metric): [se]},
        "constants": {(stage, metric): value}, "samples": [row], "refs": {...}}`` exactly
        as written to the run directory.
    """
    run_dir = root / key
    curves: dict[tuple[str, str], tuple[list, list]] = {}
    se: dict[tuple[str, str], list] = {}
    constants: dict[tuple[str, str], float] = {}

    # SFT as TRL logs it: train rows every step (with epoch), an eval row every 4th step, the
    # final eval twice at the same step, one train-summary row at the end.
    rows = []
    for step in range(1, 13):
        rows.append({"step": step, "time": 1.7e9 + step, "loss": 3.0 / step + offset, "learning_rate": 1e-4 * (1 - step / 13),
                     "grad_norm": 1.0 + 0.1 * step + offset, "epoch": step / 6})
        if step % 4 == 0:
            rows.append({"step": step, "time": 1.7e9 + step, "eval_loss": 2.5 / step + offset, "epoch": step / 6})
    rows.append({"step": 12, "time": 1.7e9 + 13, "eval_loss": 2.5 / 12 + offset})
    rows.append({"step": 12, "time": 1.7e9 + 13, "train_runtime": 5.25, "epoch": 2.0})
    _write_jsonl(run_dir / "sft" / "metrics.jsonl", rows)
    for metric in ("loss", "learning_rate", "grad_norm"):
        curves[("sft", metric)] = _curve(rows, metric)
    steps, values = _curve(rows, "eval_loss")
    curves[("sft", "eval_loss")] = (steps[:-1], values[:-1])  # the repeated final eval counts once
    constants[("sft", "train_runtime")] = 5.25
    (run_dir / "sft" / "config.yaml").write_text("lr: 0.0001\nlora_r: 8\n")

    rows = []
    for step in range(2, 22, 2):
        row = {"step": step, "time": 1.7e9, "loss": 0.7 - 0.02 * step, "accuracy": 0.5 + 0.01 * step}
        if step % 4 == 0:
            row.update(eval_accuracy=round(0.5 + 0.02 * step + offset, 6), eval_margin=0.1 * step)
        rows.append(row)
    _write_jsonl(run_dir / "reward" / "metrics.jsonl", rows)
    for metric in ("loss", "accuracy", "eval_accuracy", "eval_margin"):
        curves[("reward", metric)] = _curve(rows, metric)
    rm_accuracy = curves[("reward", "eval_accuracy")][1][-1]

    # PPO: evaluation at updates 0, 5, 10, 15 (mean and standard error per quantity), one
    # row of rollout/update statistics after every update, samples at every evaluation.
    rows, samples = [], []
    for step in range(16):
        if step in EVAL_STEPS:
            ev = {"step": step, "time": 1.7e9}
            for index, name in enumerate(PPO_EVALS):
                ev[f"eval/{name}_mean"] = 0.0 if (name == "kl" and step == 0) else round(0.1 * index + offset + 0.02 * step, 6)
                ev[f"eval/{name}_se"] = 0.0 if (name == "kl" and step == 0) else round(0.01 * (index + 1) + 0.001 * step, 6)
            rows.append(ev)
            for i in range(3):
                samples.append({"step": step, "prompt": f"<p{i}> & count", "completion": "word " * (2 + i + step % 3),
                                "score": round(0.1 * step + 0.3 * i + offset, 4), "gold": round(0.05 * step - 0.1 * i, 4),
                                "length": 3 + i + step})
        if step == 0:
            continue
        row = {"step": step, "time": 1.7e9 + step, "kl/coef": 0.1, "optimizer_steps": 16.0}
        for index, metric in enumerate(PPO_TRAIN):
            row[metric] = round(math.sin(step / 3 + index) + offset, 6)
        rows.append(row)
    if not finished:
        rows = [r for r in rows if r["step"] <= 10]
        samples = [r for r in samples if r["step"] <= 10]
    _write_jsonl(run_dir / "ppo" / "metrics.jsonl", rows)
    _write_jsonl(run_dir / "ppo" / "samples.jsonl", samples)
    for metric in PPO_TRAIN:
        curves[("ppo", metric)] = _curve(rows, metric)
    for name in PPO_EVALS:
        curves[("ppo", f"eval/{name}_mean")] = _curve(rows, f"eval/{name}_mean")
        se[("ppo", f"eval/{name}_mean")] = _curve(rows, f"eval/{name}_se")[1]
    constants[("ppo", "kl/coef")] = 0.1
    constants[("ppo", "optimizer_steps")] = 16.0
    (run_dir / "ppo" / "config.yaml").write_text(f"rollout_batch_size: {ROLLOUT_BATCH}\ntotal_episodes: 256\n")
    world = 2 if key == "alpha" else 1
    (run_dir / "ppo" / "tracker.json").write_text(json.dumps({"stage": "ppo", "world_size": world}))

    ppo_metrics = {}
    if finished:
        for name in PPO_EVALS:
            for stat_name in ("mean", "se"):
                series = _curve(rows, f"eval/{name}_{stat_name}")[1]
                ppo_metrics[f"initial/eval/{name}_{stat_name}"] = series[0]
                ppo_metrics[f"final/eval/{name}_{stat_name}"] = series[-1]
    refs = {
        "base": "tiny-base:1",
        "sft": f"{key}-sft:1",
        "reward": f"{key}-reward:1",
        "pairs": "pairs:1",
        "policy": f"{key}-policy:1",
        "value": f"{key}-value:1",
    }
    stages = {
        # Keys sorted, as the pipeline's write_json stores them: the page restores stage order.
        "ppo": {
            "status": "completed" if finished else "running",
            "inputs": {"base": refs["base"], "sft": refs["sft"], "reward": refs["reward"]},
            "outputs": {"policy": refs["policy"], "value": refs["value"]} if finished else {},
            "metrics": ppo_metrics,
            "run": "run-ppo:1",
        },
        "reward": {
            "status": "completed",
            "inputs": {"base": refs["base"], "sft": refs["sft"], "dataset": refs["pairs"]},
            "outputs": {"adapter": refs["reward"], "dataset": refs["pairs"]},
            "metrics": {"eval_accuracy": rm_accuracy, "gold_accuracy": 0.79},
            "run": "run-reward:1",
        },
        "sft": {
            "status": "completed",
            "inputs": {"base": refs["base"]},
            "outputs": {"adapter": refs["sft"]},
            "metrics": {"eval_loss": curves[("sft", "eval_loss")][1][-1]},
            "run": "run-sft:1",
        },
    }
    pipeline = {
        "name": f"{key}-name",
        "recipe": "pipelines/tiny.yaml",
        "created": f"2026-01-0{1 + len(key) % 8}T10:00:00",
        "stages": stages,
        "registry_home": registry_home,
    }
    (run_dir / "pipeline.json").write_text(json.dumps(pipeline, sort_keys=True), encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps({"rm_accuracy": rm_accuracy, "rm_accuracy_gold": 0.79}))
    return {"curves": curves, "se": se, "constants": constants, "samples": samples, "refs": refs,
            "world": world, "rm_accuracy": rm_accuracy}


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    logged = {"alpha": make_run(root, "alpha", 0.0), "beta": make_run(root, "beta", 0.5, finished=False)}
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


def _get(url: str, headers: dict | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8")


def _chart_specs(page: str) -> list[dict]:
    match = re.search(r'<script type="application/json" id="rlhf-charts">(.*?)</script>', page, re.S)
    assert match, "page has no chart data"
    return json.loads(match.group(1))


def _chart_divs(page: str) -> dict[str, tuple[str, str, str]]:
    """chart id -> (stage, section, metric key), from where each chart's div sits in the page."""
    out = {}
    for section in re.finditer(r'<section class="metrics" data-stage="([^"]+)" data-section="([^"]+)">(.*?)</section>', page, re.S):
        for div in re.finditer(r'<div class="chart" id="([^"]+)" data-key="([^"]+)">', section.group(3)):
            out[div.group(1)] = (section.group(1), section.group(2), div.group(2))
    return out


def _line(spec: dict, name: str) -> dict:
    (trace,) = [t for t in spec["figure"]["data"] if t["name"] == name]
    return trace


# ----------------------------------------------------------------------------- server, no browser


def test_api_lists_runs_and_returns_logged_curves(server, runs_root):
    _, logged = runs_root
    status, body = _get(server.url + "api/runs")
    assert status == 200
    runs = json.loads(body)
    assert sorted(r["key"] for r in runs) == ["alpha", "beta"]
    assert {r["key"]: r["stages"]["ppo"] for r in runs} == {"alpha": "completed", "beta": "running"}

    status, body = _get(server.url + "api/run/alpha")
    assert status == 200
    run = json.loads(body)
    stages = {s["name"]: s for s in run["stages"]}
    assert list(stages) == ["sft", "reward", "ppo"]  # pipeline order, though pipeline.json sorts its keys
    for (stage, metric), (steps, values) in logged["alpha"]["curves"].items():
        assert stages[stage]["series"][metric] == {"step": steps, "value": values}, (stage, metric)
    assert len(stages["ppo"]["samples"]) == 12
    assert stages["ppo"]["samples"][0]["length"] == 3  # extra per-sample fields are kept
    assert run["problems"] == []


def test_run_page_groups_charts_by_section(server, runs_root):
    _, logged = runs_root
    status, page = _get(server.url + "run/alpha")
    assert status == 200
    specs = {s["id"]: s for s in _chart_specs(page)}
    placed = _chart_divs(page)
    assert set(placed) == set(specs)
    charted = {(stage, key[len(stage) + 1 :]): section for stage, section, key in placed.values()}
    histograms = {k: v for k, v in charted.items() if k[1].startswith("hist-")}
    lines = {k: v for k, v in charted.items() if not k[1].startswith("hist-")}
    assert lines == SECTION
    assert histograms == {("ppo", f"hist-{name}"): "evaluation" for name in HISTOGRAMS}
    # Sections follow the fixed order within a stage, each with its title.
    for stage in ("sft", "reward", "ppo"):
        order = re.findall(rf'data-stage="{stage}" data-section="([a-z]+)"><h3>([^<]+)</h3>', page)
        assert [SECTION_TITLES[s] for s, _ in order] == [t for _, t in order]
        wanted = list(SECTION_TITLES)
        assert [s for s, _ in order] == sorted((s for s, _ in order), key=wanted.index)
    # Curves carry exactly the logged points; no *_se or constant series became a chart.
    by_key = {(stage, key[len(stage) + 1 :]): specs[cid] for cid, (stage, _, key) in placed.items()}
    for (stage, metric), (steps, values) in logged["alpha"]["curves"].items():
        trace = _line(by_key[(stage, metric)], "alpha-name")
        assert trace["x"] == steps and trace["y"] == values, (stage, metric)
    assert not any(key.endswith("_se") or key in ("kl/coef", "optimizer_steps", "epoch") for _, key in charted)
    assert "Value explained variance (1 - Var[returns - values] / Var[returns])" in page


def test_standard_errors_are_bands_on_their_means(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    specs = {s["id"]: s for s in _chart_specs(page)}
    by_key = {(stage, key[len(stage) + 1 :]): specs[cid] for cid, (stage, _, key) in _chart_divs(page).items()}
    for (stage, metric), errors in logged["alpha"]["se"].items():
        steps, means = logged["alpha"]["curves"][(stage, metric)]
        traces = {t["name"]: t for t in by_key[(stage, metric)]["figure"]["data"]}
        lower, upper = traces["alpha-name \u00b1 s.e. (lower)"], traces["alpha-name \u00b1 s.e. (upper)"]
        assert lower["x"] == steps and upper["x"] == steps
        assert lower["y"] == pytest.approx([m - e for m, e in zip(means, errors)])
        assert upper["y"] == pytest.approx([m + e for m, e in zip(means, errors)])
        assert upper["fill"] == "tonexty"


def test_constants_are_numbers_not_charts(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    shown = {}
    for section in re.finditer(r'<section class="metrics" data-stage="([^"]+)" data-section="([^"]+)">(.*?)</section>', page, re.S):
        for key, value in re.findall(r'<div class="constant" data-key="([^"]+)" data-value="([^"]+)"', section.group(3)):
            shown[(section.group(1), key)] = (section.group(2), float(value))
    sections = {("sft", "train_runtime"): "throughput", ("ppo", "kl/coef"): "kl", ("ppo", "optimizer_steps"): "optimization"}
    assert shown == {k: (sections[k], v) for k, v in logged["alpha"]["constants"].items()}
    assert "KL coefficient beta" in page and "Optimizer steps per update" in page


def test_summary_puts_sft_against_the_trained_policy(server, runs_root):
    _, logged = runs_root
    for key in ("alpha", "beta"):
        page = _get(server.url + f"run/{key}")[1]
        # The summary comes before any stage's charts.
        assert page.index('id="summary"') < page.index('class="metrics"')
        table = re.search(r'<table id="summary-policies">(.*?)</table>', page, re.S).group(1)
        rows = re.findall(r'<tr data-policy="([^"]+)">(.*?)</tr>', table, re.S)
        assert [name for name, _ in rows][0] == "SFT policy"
        assert rows[1][0].startswith("PPO policy") and (("still training" in rows[1][0]) == (key == "beta"))
        curves, errors = logged[key]["curves"], logged[key]["se"]
        for (name, cells), index in zip(rows, (0, -1)):
            found = dict(((m, (float(a), float(b))) for m, a, b in re.findall(
                r'data-metric="([a-z_]+)" data-mean="([^"]+)" data-se="([^"]+)"', cells)))
            assert list(found) == list(PPO_EVALS)  # gold (objective) first, then RM score, KL, win rate
            for metric, (mean, se) in found.items():
                assert mean == curves[("ppo", f"eval/{metric}_mean")][1][index], (key, name, metric)
                assert se == errors[("ppo", f"eval/{metric}_mean")][index], (key, name, metric)
        # The gold improvement in standard errors of the difference.
        gold, gold_se = curves[("ppo", "eval/gold_mean")][1], errors[("ppo", "eval/gold_mean")]
        diff = gold[-1] - gold[0]
        assert f"{diff / math.hypot(gold_se[0], gold_se[-1]):+.1f} s.e." in rows[1][1]
        models = dict(re.findall(r'<tr data-metric="([a-z_]+)"><th>[^<]+</th><td class="num">([^<]+)</td>', page))
        assert float(models["eval_accuracy"]) == pytest.approx(logged[key]["rm_accuracy"], abs=5e-5)
        assert models["gold_accuracy"] == "0.79"
    assert "Win rate vs SFT" in page and "Gold reward (objective)" in page


def test_summary_names_the_advantage_estimator(tmp_path):
    from rlhf.dashboard.data import policy_summary

    make_run(tmp_path / "runs", "gamma", 0.0)
    with (tmp_path / "runs" / "gamma" / "ppo" / "config.yaml").open("a") as handle:
        handle.write("advantage_estimator: rloo\n")
    policies = policy_summary(load_run(tmp_path / "runs" / "gamma"))["policies"]
    assert [(p["label"], p["ref"]) for p in policies] == [("SFT policy", "gamma-sft:1"), ("PPO policy (rloo)", "gamma-policy:1")]


def test_histograms_at_each_evaluation(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    specs = {s["id"]: s for s in _chart_specs(page)}
    hists = {key: specs[cid] for cid, (_, _, key) in _chart_divs(page).items() if "-hist-" in key}
    for field in HISTOGRAMS:
        traces = hists[f"ppo-hist-{field}"]["figure"]["data"]
        assert [t["type"] for t in traces] == ["histogram"] * len(EVAL_STEPS)
        for trace, step in zip(traces, EVAL_STEPS):
            assert trace["x"] == [row[field] for row in logged["alpha"]["samples"] if row["step"] == step]
            assert trace["name"] == f"update {step} (n=3)"
        # The first and the last evaluation are shown, the others one legend click away.
        assert [t["visible"] for t in traces] == [True, "legendonly", "legendonly", True]


def test_length_histogram_falls_back_to_words_without_token_counts(tmp_path):
    logged = make_run(tmp_path / "runs", "gamma", 0.0)
    path = tmp_path / "runs" / "gamma" / "ppo" / "samples.jsonl"
    _write_jsonl(path, [{k: v for k, v in row.items() if k != "length"} for row in logged["samples"]])
    out = tmp_path / "r.html"
    assert dashboard_main(["report", str(tmp_path / "runs" / "gamma"), "--out", str(out)]) == 0
    specs = _chart_specs(out.read_text())
    (spec,) = [s for s in specs if "hist-length" in s["id"]]
    assert "words" in spec["figure"]["layout"]["title"]["text"]
    assert spec["figure"]["data"][0]["x"] == [len(r["completion"].split()) for r in logged["samples"] if r["step"] == 0]


def test_second_x_axis_is_episodes_for_ppo_and_epochs_for_trl(server, runs_root):
    _, logged = runs_root
    for key in ("alpha", "beta"):
        specs = {s["id"]: s for s in _chart_specs(_get(server.url + f"run/{key}")[1])}
        (ppo,) = [s for cid, s in specs.items() if cid.endswith("ppo-kl-mean")]
        extra = [e for e in ppo["extra"] if e["role"] == "line"][0]
        steps = logged[key]["curves"][("ppo", "kl/mean")][0]
        assert ppo["x_alt_title"] == "episodes"
        assert extra["x_alt"] == [s * ROLLOUT_BATCH * logged[key]["world"] for s in steps]
        (sft,) = [s for cid, s in specs.items() if cid.endswith("sft-loss")]
        assert sft["x_alt_title"] == "epoch"
        assert [e for e in sft["extra"] if e["role"] == "line"][0]["x_alt"] == pytest.approx([s / 6 for s in range(1, 13)])


def test_ema_matches_hand_computed_values():
    # weight 0.5: a1 = 0.5*1 = 0.5 -> /(1-0.5) = 1; a2 = 0.25 + 0.5*3 = 1.75 -> /(1-0.25) = 2.333...
    # a gap stays a gap; a3 = 0.875 + 0.5*5 = 3.375 -> /(1-0.125) = 3.857...
    assert ema([1.0, 3.0, None, 5.0], 0.5) == pytest.approx([1.0, 7 / 3, None, 3.375 / 0.875])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_lineage_is_drawn_as_a_graph(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    svg = re.search(r"<svg class=\"lineage\".*?</svg>", page, re.S).group(0)
    nodes = set(re.findall(r'<g class="node node-[a-z]+" data-id="([^"]+)"', svg))
    refs = logged["alpha"]["refs"]
    assert nodes == {*refs.values(), "stage:sft", "stage:reward", "stage:ppo"}
    edges = set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', svg))
    assert edges == {
        (refs["base"], "stage:sft"), ("stage:sft", refs["sft"]),
        (refs["base"], "stage:reward"), (refs["sft"], "stage:reward"), (refs["pairs"], "stage:reward"),
        ("stage:reward", refs["reward"]),
        (refs["base"], "stage:ppo"), (refs["sft"], "stage:ppo"), (refs["reward"], "stage:ppo"),
        ("stage:ppo", refs["policy"]), ("stage:ppo", refs["value"]),
    }
    # Arrows point forward: every edge goes to a later column.
    columns = {n: float(x) for n, x in re.findall(r'data-id="([^"]+)" transform="translate\(([\d.]+),', svg)}
    assert all(columns[a] < columns[b] for a, b in edges)


def test_samples_table_lists_every_logged_sample_by_step(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    steps = re.findall(r'<tr data-step="(\d+)">', page)
    assert [int(s) for s in steps] == [row["step"] for row in logged["alpha"]["samples"]]
    options = re.findall(r'<option value="(\d+)"( selected)?>step', page)
    assert [(int(v), bool(sel)) for v, sel in options] == [(s, s == EVAL_STEPS[-1]) for s in EVAL_STEPS]
    assert "&lt;p0&gt; &amp; count" in page and "<p0>" not in page


def test_served_pages_need_no_network(server):
    page = _get(server.url + "run/alpha")[1]
    assert '<script src="/static/plotly.min.js"></script>' in page
    assert not re.search(r'(src|href)="https?://', page)
    status, js = _get(server.url + "static/plotly.min.js")
    assert status == 200 and "Plotly" in js[:5000]


def test_compare_overlays_one_trace_per_run(server, runs_root):
    _, logged = runs_root
    for query in ("runs=alpha,beta", "runs=alpha&runs=beta"):
        status, page = _get(server.url + "compare?" + query)
        assert status == 200
        specs = {s["id"]: s for s in _chart_specs(page)}
        placed = _chart_divs(page)
        (accuracy,) = [specs[cid] for cid, (_, _, key) in placed.items() if key == "reward-eval_accuracy"]
        assert [t["name"] for t in accuracy["figure"]["data"] if "s.e." not in t["name"] and "raw" not in t["name"]] == ["alpha", "beta"]
        assert _line(accuracy, "beta")["y"] == logged["beta"]["curves"][("reward", "eval_accuracy")][1]
        assert {(stage, section) for stage, section, _ in placed.values()} >= {("ppo", "kl"), ("ppo", "evaluation")}
        (gold,) = [specs[cid] for cid, (_, _, key) in placed.items() if key == "ppo-eval/gold_mean"]
        assert {t["name"] for t in gold["figure"]["data"]} >= {"alpha \u00b1 s.e. (upper)", "beta \u00b1 s.e. (upper)"}
        assert 'class="constants-table"' in page  # kl/coef, optimizer_steps: numbers per run


def test_unknown_runs_and_path_tricks_are_404(server):
    for path in ("run/nope", "run/..", "run/not-a-run", "api/run/%2e%2e", "compare?runs=alpha,nope", "elsewhere"):
        status, _ = _get(server.url + path)
        assert status == 404, path
    assert _get(server.url + "compare")[0] == 400


def _status_for_host(srv, host: str | None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    connection.putrequest("GET", "/api/runs", skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    connection.endheaders()
    status = connection.getresponse().status
    connection.close()
    return status


def test_host_header_is_checked_against_dns_rebinding(runs_root):
    root, _ = runs_root
    srv = make_server(root, "127.0.0.1", 0, allowed_hosts=["dash.example.org"])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST", "dash.example.org:80"):
            assert _status_for_host(srv, host) == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "", None):
            assert _status_for_host(srv, host) == 403, host
    finally:
        srv.shutdown()
        srv.server_close()
    anyone = make_server(root, "127.0.0.1", 0, allowed_hosts=["*"])  # explicitly configured
    threading.Thread(target=anyone.serve_forever, daemon=True).start()
    try:
        assert _status_for_host(anyone, "evil.example") == 200
    finally:
        anyone.shutdown()
        anyone.server_close()


def test_bad_lines_are_reported_not_fatal(runs_root, server):
    root, _ = runs_root
    metrics = root / "alpha" / "sft" / "metrics.jsonl"
    lines = len(metrics.read_text().splitlines())
    with metrics.open("a") as handle:
        handle.write("{broken\n")
        handle.write('{"loss": 1.0}\n')  # no step
        handle.write('{"step": 99, "loss": 0.1')  # still being written: ignored quietly
    run = load_run(root / "alpha")
    assert any(f"metrics.jsonl line {lines + 1}: not valid JSON" in p for p in run.problems), run.problems
    assert any(f"line {lines + 2}: field 'step'" in p for p in run.problems), run.problems
    assert len(run.problems) == 2
    assert 99 not in run.stages[0].series["loss"]["step"]
    status, page = _get(server.url + "run/alpha")
    assert status == 200 and "not valid JSON" in page


def test_a_metric_that_is_never_finite_is_shown_not_dropped(tmp_path):
    run_dir = tmp_path / "runs" / "diverged"
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "diverged", "stages": {"sft": {"status": "failed"}}}))
    _write_jsonl(run_dir / "sft" / "metrics.jsonl", [{"step": s, "loss": None, "grad_norm": 1.0 + s} for s in (1, 2, 3)])
    out = tmp_path / "r.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert re.search(r'<div class="constant" data-key="loss" data-value="" title="NaN or infinite at all 3 logged steps">'
                     r'Training loss: <span class="value">not finite</span>', page)


def test_a_step_logged_again_keeps_its_last_value(tmp_path):
    run_dir = tmp_path / "runs" / "resumed"
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "resumed", "stages": {"ppo": {"status": "completed"}}}))
    # Updates 1-3 logged, the run resumed from its checkpoint at update 2 and logged 3-4 again.
    _write_jsonl(run_dir / "ppo" / "metrics.jsonl",
                 [{"step": s, "kl/mean": float(s)} for s in (1, 2, 3)] + [{"step": s, "kl/mean": 10.0 + s} for s in (3, 4)])
    (stage,) = load_run(run_dir).stages
    assert stage.series["kl/mean"] == {"step": [1, 2, 3, 4], "value": [1.0, 2.0, 13.0, 14.0]}


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
            if ref == "pairs:1":
                raise KeyError(ref)
            # The base model came from a hub snapshot the run itself does not name.
            return {"ref": ref, "kind": "adapter", "ancestors": [
                {"relation": "base", "ref": "tiny-base:1", "kind": "base",
                 "ancestors": [{"relation": "parent", "ref": "hub-snapshot:3", "kind": "base", "ancestors": []}]}]}

    monkeypatch.setitem(sys.modules, "rlhf.registry", types.SimpleNamespace(Registry=FakeRegistry))
    run = load_run(tmp_path / "runs" / "gamma")
    assert calls == [("open", str(home))]
    assert run.lineage["gamma-policy:1"]["ancestors"][0]["ref"] == "tiny-base:1"
    assert "pairs:1" not in run.lineage and "pairs:1" in run.lineage_note
    out = tmp_path / "r.html"
    assert dashboard_main(["report", str(tmp_path / "runs" / "gamma"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "lineage of <code>gamma-policy:1</code>" in page  # raw records, folded under the graph
    edges = set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)" data-relation="([^"]+)"', page))
    assert ("hub-snapshot:3", "tiny-base:1", "parent") in edges  # an ancestor the run does not name
    assert ("tiny-base:1", "gamma-policy:1", "base") not in edges  # already drawn through the stages


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
    specs = {s["id"]: s for s in _chart_specs(page)}
    (eval_loss,) = [specs[c] for c, (_, _, k) in _chart_divs(page).items() if k == "sft-eval_loss"]
    assert _line(eval_loss, "beta-name")["y"] == logged["beta"]["curves"][("sft", "eval_loss")][1]
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left
    assert dashboard_main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "pipeline.json not found" in capsys.readouterr().err
    assert dashboard_main(["report", str(root / "beta"), "--out", str(out.parent)]) == 1
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_report_follows_the_umask(runs_root, tmp_path, umask):
    root, _ = runs_root
    out = tmp_path / f"report-{umask:o}.html"
    old = os.umask(umask)
    try:
        assert dashboard_main(["report", str(root / "alpha"), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_usage_lines_match_the_command_typed(capsys):
    from rlhf.cli import main as rlhf_main

    for argv, usage in ((["dashboard", "--help"], "usage: rlhf dashboard "), (["report", "--help"], "usage: rlhf report ")):
        try:  # the CLI returns argparse's exit status (0 for --help) instead of raising it
            code = rlhf_main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 0
        out = capsys.readouterr().out
        assert out.startswith(usage), out
        assert "--runs-root" in out if argv[0] == "dashboard" else "--out" in out


def test_cli_serve_subprocess(runs_root):
    root, _ = runs_root
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "dashboard", "serve", "--port", "0", "--runs-root", str(root)],
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


def test_dashboard_reads_what_the_tracker_writes(tmp_path):
    from rlhf.tracking import Tracker

    run_dir = tmp_path / "runs" / "tracked"
    run_dir.mkdir(parents=True)
    (run_dir / "pipeline.json").write_text(json.dumps({"name": "tracked", "stages": {"ppo": {"status": "running"}}}))
    tracker = Tracker(run_dir, "ppo", config={"rollout_batch_size": 4}, group="tracked")
    for step in range(4):
        tracker.log({"reward/score_mean": step / 2, "kl/mean": float("nan") if step == 2 else 0.1 * step}, step=step)
    tracker.log_samples(3, [{"prompt": "q", "completion": "a", "score": 0.5, "gold": 1.0, "length": 7}])
    tracker.finish()
    (run_dir / "ppo" / "config.yaml").write_text("rollout_batch_size: 4\n")
    (stage,) = load_run(run_dir).stages
    assert stage.series["reward/score_mean"] == {"step": [0, 1, 2, 3], "value": [0.0, 0.5, 1.0, 1.5]}
    assert stage.series["kl/mean"]["value"] == [0.0, 0.1, None, pytest.approx(0.3)]  # NaN is a gap, not an error
    assert stage.samples == [{"step": 3, "prompt": "q", "completion": "a", "score": 0.5, "gold": 1.0, "length": 7.0}]
    assert stage.info["world_size"] == 1
    page = tmp_path / "r.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(page)]) == 0
    text = page.read_text()
    assert '<meta http-equiv="refresh"' not in text  # the shared file never reloads
    (hist,) = [s for s in _chart_specs(text) if "hist-length" in s["id"]]
    assert hist["figure"]["data"][0]["x"] == [7.0] and "tokens" in hist["figure"]["layout"]["title"]["text"]


def test_a_real_ppo_run_fills_every_section(ppo_config, ppo_assets, tmp_path):
    """The PPO stage's own logging (not a fake): what it logs lands where the page promises."""
    from rlhf.dashboard.data import policy_summary
    from rlhf.dashboard.metrics import plan_stage
    from rlhf.stages.ppo import run_ppo

    run_dir = tmp_path / "runs" / "real"
    cfg = ppo_config(output_dir=str(run_dir / "ppo"), eval_prompts=str(ppo_assets.eval_prompts), total_episodes=12,
                     rollout_batch_size=4, eval_every=1, num_samples_logged=4)
    calls = iter(range(10_000))  # a gold reward that rises with every call, so it is never constant
    # the stage logs under its output_dir (run_dir/ppo), as inside a pipeline run
    metrics = run_ppo(cfg, group="real", gold_fn=lambda prompt, response: float(next(calls))).metrics
    (run_dir / "pipeline.json").write_text(json.dumps(
        {"name": "real", "stages": {"ppo": {"status": "completed", "metrics": metrics}}}))
    run = load_run(run_dir)
    (stage,) = run.stages
    plan = plan_stage(stage.series)
    assert {"reward", "kl", "policy", "value", "lengths", "optimization", "throughput", "evaluation"} <= set(plan.charts)
    assert plan.constants["kl"]["kl/coef"]["value"] == cfg.kl_coef  # fixed controller: a number
    assert "optimizer_steps" in plan.constants["optimization"]
    evals = {chart.key: chart.se_key for chart in plan.charts["evaluation"]}
    assert evals["eval/gold_mean"] == "eval/gold_se"
    # A tiny policy may answer the fixed-seed evaluation identically each time: an unchanged
    # mean is a number with its standard error, a changing one a chart with its band.
    for name in ("score", "kl", "length", "entropy"):
        key = f"eval/{name}_mean"
        constant = plan.constants.get("evaluation", {}).get(key)
        assert evals.get(key) == f"eval/{name}_se" or (constant and constant["se"] is not None), key
    assert not any(chart.key.endswith("_se") for charts in plan.charts.values() for chart in charts)
    summary = policy_summary(run)
    sft, ppo = summary["policies"]
    for name in ("gold", "score", "kl", "length"):
        assert sft["values"][name] == (metrics[f"initial/eval/{name}_mean"], metrics[f"initial/eval/{name}_se"])
        assert ppo["values"][name] == (metrics[f"final/eval/{name}_mean"], metrics[f"final/eval/{name}_se"])
    out = tmp_path / "real.html"
    assert dashboard_main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    specs = {s["id"]: s for s in _chart_specs(page)}
    placed = _chart_divs(page)
    (score_hist,) = [specs[c] for c, (_, _, k) in placed.items() if k == "ppo-hist-score"]
    logged = [row for row in stage.samples]
    assert [t["x"] for t in score_hist["figure"]["data"]] == [
        [r["score"] for r in logged if r["step"] == step] for step in (0, 1, 2, 3)]
    (kl,) = [specs[c] for c, (_, _, k) in placed.items() if k == "ppo-kl/mean"]
    assert [e for e in kl["extra"] if e["role"] == "line"][0]["x_alt"] == [4 * s for s in (1, 2, 3)]


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
    page = out.read_text()
    assert f"lineage of <code>{base.ref}</code>" in page
    assert (base.ref, "stage:sft") in set(re.findall(r'data-from="([^"]+)" data-to="([^"]+)"', page))


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


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    chrome = Chromium(tmp_path / "chrome-profile")
    yield chrome
    chrome.close()


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


def test_every_stage_status_has_a_styled_badge():
    from rlhf.dashboard import render

    statuses = set(re.findall(r'"(completed|running|failed|interrupted|killed|blocked)"',
                              (Path(render.__file__).parents[1] / "pipeline.py").read_text()
                              + (Path(render.__file__).parents[1] / "runs.py").read_text()))
    assert {"interrupted", "killed"} <= statuses <= set(render.STAGE_STATUSES)
    for status in render.STAGE_STATUSES:
        rule = re.search(rf"\.status-{status}\b[^{{]*\{{([^}}]*)\}}", render._CSS)
        assert rule and "background" in rule.group(1), status
        assert f'class="status status-{status}"' in render._status(status)
