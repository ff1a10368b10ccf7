"""Fake pipeline runs for the dashboard tests (tests/integration/dashboard/).

The fake runs log what the real stages log (TRL's keys for SFT and the reward model, the
PPO stage's rollout, update and evaluation keys, ``*_se`` beside evaluation means, per-sample
rows at each evaluation). The expected page layout (which section a metric belongs to,
which values are constants, which series are error bands) is written out here by hand, not
derived with the code under test.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from pathlib import Path


REPO = Path(__file__).resolve().parents[3]


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
