"""The run page's content over fake runs with known numbers: charts by section, error bands,
constants, the summary table, histograms, x axes, samples, comparison, and bad or odd logs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from rlhf.dashboard.cli import main as dashboard_main
from rlhf.dashboard.data import load_run
from rlhf.dashboard.metrics import ema

from fake_runs import EVAL_STEPS, PPO_EVALS, ROLLOUT_BATCH, SECTION, SECTION_TITLES, HISTOGRAMS, _write_jsonl, make_run, _get, _chart_specs, _chart_divs, _line


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
            # gold (objective) first, then RM score, KL, win rate; the SFT policy's win rate over
            # itself is no number to show (rlhf.summary), though the fake run logs one at step 0
            assert list(found) == [m for m in PPO_EVALS if index == -1 or m != "win_rate"]
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


def test_samples_table_lists_every_logged_sample_by_step(server, runs_root):
    _, logged = runs_root
    page = _get(server.url + "run/alpha")[1]
    steps = re.findall(r'<tr data-step="(\d+)">', page)
    assert [int(s) for s in steps] == [row["step"] for row in logged["alpha"]["samples"]]
    options = re.findall(r'<option value="(\d+)"( selected)?>step', page)
    assert [(int(v), bool(sel)) for v, sel in options] == [(s, s == EVAL_STEPS[-1]) for s in EVAL_STEPS]
    assert "&lt;p0&gt; &amp; count" in page and "<p0>" not in page


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


def test_every_evaluation_metric_has_a_readable_column_header():
    # the per-prompt metrics the held-out evaluation reports (rlhf/evaluation.py: per["..."])
    from rlhf.dashboard import render

    source = (Path(render.__file__).parents[1] / "evaluation.py").read_text()
    names = set(re.findall(r'per\["(\w+)"\]', source))
    assert {"gold", "gold_win_rate", "win_rate"} <= names
    for name in names:
        header = render.SUMMARY_COLUMNS.get(name)
        assert header and "_" not in header, name


def test_run_list_shows_stages_in_pipeline_order(tmp_path):
    from rlhf.dashboard.data import run_summary

    run = tmp_path / "r"
    run.mkdir()
    # written with sorted keys, as the pipeline writes it: ppo, reward, sft
    (run / "pipeline.json").write_text(json.dumps({"name": "r", "stages": {
        "ppo": {"status": "running"}, "reward": {"status": "completed"}, "sft": {"status": "completed"}}},
        sort_keys=True))
    assert list(run_summary(run)["stages"]) == ["sft", "reward", "ppo"]
