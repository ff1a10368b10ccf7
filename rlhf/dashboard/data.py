"""Read pipeline run directories into plain data the dashboard pages and JSON API show.

A run directory is what ``rlhf run`` writes (see :mod:`rlhf.tracking` for the per-stage
files)::

    <run_dir>/pipeline.json          run name, recipe, stage statuses, registry refs
    <run_dir>/summary.json           final numbers
    <run_dir>/<stage>/config.yaml    resolved stage config
    <run_dir>/<stage>/metrics.jsonl  curves
    <run_dir>/<stage>/samples.jsonl  sample completions over training

Runs may still be training while they are read, so a last line without its newline is taken
as "being written" and skipped quietly; any other unreadable line is skipped and reported in
``RunData.problems`` (file, line, field) so the page shows it instead of failing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf import summary

__all__ = [
    "RunData",
    "StageData",
    "alternate_x",
    "find_run",
    "list_runs",
    "load_run",
    "policy_summary",
    "run_refs",
    "run_summary",
    "to_jsonable",
]

# Known metrics first, in the order a reader scans a stage; anything else follows sorted.
PREFERRED_METRIC_ORDER = (
    "loss",
    "eval_loss",
    "eval_accuracy",
    "eval_margin",
    "accuracy",
    "margin",
    "reward/score_mean",
    "eval/gold_mean",
    "eval/score_mean",
    "kl/mean",
    "eval/kl_mean",
    "entropy/mean",
    "eval/entropy_mean",
    "response/length_mean",
    "eval/length_mean",
    "loss/value",
    "loss/policy",
    "policy/clipfrac",
    "value/clipfrac",
    "learning_rate",
    "grad_norm",
)
STAGE_ORDER = ("sft", "reward", "ppo")


@dataclass
class StageData:
    """One stage of a run: status, refs, curves and samples."""

    name: str = field(metadata={"help": "stage name, e.g. 'sft'"})
    status: str = field(default="unknown", metadata={"help": "completed | running | failed | pending | unknown"})
    inputs: dict[str, Any] = field(default_factory=dict, metadata={"help": "registry refs the stage read"})
    outputs: dict[str, Any] = field(default_factory=dict, metadata={"help": "registry refs the stage wrote"})
    run: str | None = field(default=None, metadata={"help": "registry ref of the stage's run record, if any"})
    final_metrics: dict[str, Any] = field(default_factory=dict, metadata={"help": "final numbers from pipeline.json"})
    series: dict[str, dict[str, list]] = field(
        default_factory=dict,
        metadata={"help": "metric -> {'step': [int], 'value': [float|None]} in file order"},
    )
    samples: list[dict[str, Any]] = field(default_factory=list, metadata={"help": "rows of samples.jsonl"})
    config_text: str | None = field(default=None, metadata={"help": "contents of config.yaml, if present"})
    config: dict[str, Any] = field(default_factory=dict, metadata={"help": "config.yaml parsed (empty if absent)"})
    info: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "tracker.json: world_size, refs, trackers (see rlhf.tracking)"}
    )


@dataclass
class RunData:
    """A pipeline run as the dashboard shows it."""

    key: str = field(metadata={"help": "directory name under the runs root; the id in URLs"})
    path: Path = field(metadata={"help": "the run directory"})
    name: str = field(metadata={"help": "run name from pipeline.json"})
    recipe: str | None = field(default=None, metadata={"help": "recipe path from pipeline.json"})
    created: str | None = field(default=None, metadata={"help": "creation time (ISO 8601)"})
    registry_home: str | None = field(default=None, metadata={"help": "registry home named in pipeline.json"})
    stages: list[StageData] = field(default_factory=list, metadata={"help": "stages in pipeline order"})
    summary: dict[str, Any] = field(default_factory=dict, metadata={"help": "summary.json"})
    lineage: dict[str, Any] = field(default_factory=dict, metadata={"help": "registry ref -> lineage (JSON-able)"})
    lineage_note: str | None = field(default=None, metadata={"help": "why lineage is missing or partial"})
    problems: list[str] = field(default_factory=list, metadata={"help": "unreadable input found while loading"})

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the ``/api/run/<key>`` payload)."""
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


def _read_json(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        problems.append(f"{path}: not readable as JSON ({err})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
        return {}
    return data


def _read_jsonl(path: Path, problems: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) pairs; bad lines go to ``problems``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{path}: not readable ({err})")
        return []
    lines = text.split("\n")
    # The writer appends whole lines; a trailing fragment is a line still being written.
    complete = lines[:-1] if not text.endswith("\n") else lines
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            problems.append(f"{path} line {number}: not valid JSON ({err.__class__.__name__}: {err})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
            continue
        rows.append((number, obj))
    return rows


def _number(value: Any) -> float | None | bool:
    """float for a finite number, None for null/non-finite, False when not numeric at all."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(value) if math.isfinite(value) else None


def _load_series(path: Path, problems: list[str]) -> dict[str, dict[str, list]]:
    """Curves of one metrics.jsonl, each sorted by step.

    A step logged twice keeps its last value: TRL logs a final evaluation twice at the same
    step, and a resumed stage logs again the updates after its checkpoint; the later line is
    the one the finished run stands on.
    """
    by_step: dict[str, dict[int, float | None]] = {}
    for number, row in _read_jsonl(path, problems):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            problems.append(f"{path} line {number}: field 'step' is missing or not a number ({step!r})")
            continue
        for key, value in row.items():
            if key in ("step", "time"):
                continue
            number_value = _number(value)
            if number_value is False:
                continue  # strings and nested values are not curves
            by_step.setdefault(key, {})[int(step)] = number_value
    series = {
        key: {"step": sorted(points), "value": [points[s] for s in sorted(points)]} for key, points in by_step.items()
    }
    return _sorted_metrics(series)


def _sorted_metrics(series: dict[str, Any]) -> dict[str, Any]:
    rank = {name: index for index, name in enumerate(PREFERRED_METRIC_ORDER)}
    return dict(sorted(series.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _finite_or_as_is(value: Any) -> Any:
    """A number as a finite float or None (NaN, infinity); anything else unchanged."""
    number = _number(value)
    return value if number is False else number


def _load_samples(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    """Rows of samples.jsonl: step, prompt, completion, score, gold, plus any other numeric
    field the stage logged per sample (e.g. ``length`` in tokens, ``kl``)."""
    samples = []
    for number, row in _read_jsonl(path, problems):
        missing = [name for name in ("step", "prompt", "completion") if name not in row]
        if missing:
            problems.append(f"{path} line {number}: missing field(s) {', '.join(missing)}")
            continue
        step = _number(row["step"])
        if not isinstance(step, float):  # NaN, infinite or not a number: no step to show it under
            problems.append(f"{path} line {number}: step {str(row['step'])[:40]} is not a finite number")
            continue
        # a NaN score or gold (Python's json writes and reads NaN) shows as missing, as in the
        # curves; it would otherwise reach the charts' JSON, which has no NaN
        sample = {
            "step": int(step) if step.is_integer() else step,
            "prompt": str(row["prompt"]),
            "completion": str(row["completion"]),
            "score": _finite_or_as_is(row.get("score")),
            "gold": _finite_or_as_is(row.get("gold")),
        }
        for key, value in row.items():
            if key not in sample and key != "time" and _number(value) is not False:
                sample[key] = _number(value)
        samples.append(sample)
    return samples


def _read_config(path: Path, problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    """config.yaml as text (shown on the page) and as data (read for batch sizes)."""
    if not path.is_file():
        return None, {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"{path}: not readable ({err})")
        return None, {}
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception as err:  # yaml raises several types; the page still shows the text
        problems.append(f"{path}: not valid YAML ({type(err).__name__}: {err})")
        return text, {}
    return text, data if isinstance(data, dict) else {}


def _stage_names(run_dir: Path, declared: dict[str, Any], planned: list[str] = ()) -> list[str]:
    """Stages in pipeline order: the recipe's (``planned``, also those still to come), then
    any others in :data:`STAGE_ORDER`, then as found.

    pipeline.json may store its stages in any key order (it is written with sorted keys);
    stages that logged but are not (yet) in pipeline.json are shown too.
    """
    names = list(dict.fromkeys([*planned, *declared]))
    names += [
        child.name
        for child in sorted(run_dir.iterdir())
        if child.is_dir() and child.name not in names and (child / "metrics.jsonl").is_file()
    ]
    order = [*planned, *(name for name in STAGE_ORDER if name not in planned)]
    rank = {name: index for index, name in enumerate(order)}
    return sorted(names, key=lambda name: rank.get(name, len(rank)))


def _planned(pipeline: dict[str, Any]) -> list[str]:
    """The recipe's stages in pipeline order, from pipeline.json (empty for older runs)."""
    planned = pipeline.get("planned_stages")
    return [name for name in planned if isinstance(name, str)] if isinstance(planned, list) else []


def _status(info: Any, planned: list[str], name: str) -> str:
    """A stage's status; a stage of the recipe that has not started yet is ``pending``."""
    if isinstance(info, dict) and info.get("status"):
        return str(info["status"])
    return "pending" if name in planned else "unknown"


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The cheap part of a run (pipeline.json + summary.json) for the run list."""
    problems: list[str] = []
    pipeline = _read_json(run_dir / "pipeline.json", problems)
    stages = pipeline.get("stages") if isinstance(pipeline.get("stages"), dict) else {}
    planned = _planned(pipeline)
    return {
        "key": run_dir.name,
        "name": str(pipeline.get("name") or run_dir.name),
        "recipe": pipeline.get("recipe"),
        "created": pipeline.get("created"),
        # pipeline order (pipeline.json is written with sorted keys: ppo, reward, sft), those to come too
        "stages": {name: _status(stages.get(name), planned, name)
                   for name in _stage_names(run_dir, stages, planned)},
        "summary": _read_json(run_dir / "summary.json", problems),
        "problems": problems,
    }


def list_runs(runs_root: str | Path) -> list[dict[str, Any]]:
    """Summaries of every subdirectory of ``runs_root`` that has a pipeline.json, newest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [run_summary(child) for child in root.iterdir() if (child / "pipeline.json").is_file()]
    runs.sort(key=lambda run: (str(run["created"] or ""), run["key"]), reverse=True)
    return runs


def find_run(runs_root: str | Path, key: str) -> Path | None:
    """The run directory for URL id ``key``, or None; never leaves ``runs_root``."""
    if not key or key in (".", "..") or "/" in key or "\\" in key or "\x00" in key:
        return None
    candidate = Path(runs_root) / key
    return candidate if (candidate / "pipeline.json").is_file() else None


def load_run(run_dir: str | Path, *, with_lineage: bool = True) -> RunData:
    """Load everything the run page shows.

    Args:
        run_dir: A pipeline run directory (must hold pipeline.json).
        with_lineage: Ask the model registry for the lineage of the run's refs.

    Raises:
        FileNotFoundError: if ``run_dir/pipeline.json`` does not exist.
    """
    run_dir = Path(run_dir)
    pipeline_path = run_dir / "pipeline.json"
    if not pipeline_path.is_file():
        raise FileNotFoundError(f"{pipeline_path}: not found; is {run_dir} a pipeline run directory?")
    problems: list[str] = []
    pipeline = _read_json(pipeline_path, problems)
    declared = pipeline.get("stages") or {}
    if not isinstance(declared, dict):
        problems.append(f"{pipeline_path}: field 'stages' should be an object, got {type(declared).__name__}")
        declared = {}
    run = RunData(
        key=run_dir.name,
        path=run_dir,
        name=str(pipeline.get("name") or run_dir.name),
        recipe=pipeline.get("recipe"),
        created=pipeline.get("created"),
        registry_home=pipeline.get("registry_home"),
        summary=_read_json(run_dir / "summary.json", problems),
        problems=problems,
    )
    planned = _planned(pipeline)
    for name in _stage_names(run_dir, declared, planned):
        info = declared.get(name) or {}
        stage_dir = run_dir / name
        config_text, config = _read_config(stage_dir / "config.yaml", problems)
        run.stages.append(
            StageData(
                name=name,
                status=_status(info, planned, name),
                inputs=dict(info.get("inputs") or {}),
                outputs=dict(info.get("outputs") or {}),
                run=info.get("run") if isinstance(info.get("run"), str) else None,
                final_metrics=dict(info.get("metrics") or {}),
                series=_load_series(stage_dir / "metrics.jsonl", problems),
                samples=_load_samples(stage_dir / "samples.jsonl", problems),
                config_text=config_text,
                config=config,
                info=_read_json(stage_dir / "tracker.json", problems),
            )
        )
    if with_lineage:
        _attach_lineage(run)
    return run


def run_refs(run: RunData) -> list[str]:
    """Every registry ref a run's stages name (inputs and outputs), first-seen order."""
    refs: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            if value not in refs:
                refs.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for stage in run.stages:
        collect(stage.inputs)
        collect(stage.outputs)
    return refs


def to_jsonable(value: Any, depth: int = 0) -> Any:
    """Best-effort conversion of registry objects (dataclasses, records) to JSON data."""
    if depth > 12:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, depth + 1) for v in value]
    if isinstance(value, Path):
        return str(value)
    for method in ("to_dict", "as_dict", "_asdict"):
        fn = getattr(value, method, None)
        if callable(fn):
            try:
                return to_jsonable(fn(), depth + 1)
            except Exception:  # an odd record type must not break the page
                break
    return str(value)


def _attach_lineage(run: RunData) -> None:
    refs = run_refs(run)
    if not refs:
        return
    if not run.registry_home:
        run.lineage_note = "pipeline.json names no registry_home; showing the refs as recorded"
        return
    if not Path(run.registry_home).expanduser().exists():
        run.lineage_note = f"registry home {run.registry_home} does not exist here; showing the refs as recorded"
        return
    try:
        # Imported lazily: the dashboard must work (without lineage) where the registry cannot load.
        from rlhf.registry import Registry

        registry = Registry.open(home=run.registry_home)
    except Exception as err:
        run.lineage_note = f"model registry unavailable ({type(err).__name__}: {err}); showing the refs as recorded"
        return
    failures = []
    for ref in refs:
        try:
            run.lineage[ref] = to_jsonable(registry.lineage(ref))
        except Exception as err:  # one unknown ref should not hide the others
            failures.append(f"{ref}: {type(err).__name__}: {err}")
    close = getattr(registry, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            pass
    if failures:
        run.lineage_note = "lineage not found for " + "; ".join(failures)


def alternate_x(stage: StageData) -> tuple[str, dict[int, float]] | None:
    """The second x-axis of a stage's charts: episodes for PPO, epochs for TRL stages.

    Returns ``(axis title, {step: x})`` or None when the stage logged nothing to derive it.
    PPO: a logged ``episodes`` counter if there is one, else ``step * rollout_batch_size *
    world_size`` (config.yaml and tracker.json), since each update consumes that many
    episodes. TRL stages log ``epoch`` with their rows; steps without one are interpolated
    linearly (TRL's epoch is linear in the step).
    """
    steps = sorted({s for entry in stage.series.values() for s in entry["step"]})
    if not steps:
        return None
    counter = stage.series.get("episodes")
    if counter and any(v is not None for v in counter["value"]):
        return "episodes", _interpolate(counter["step"], counter["value"], steps)
    batch = stage.config.get("rollout_batch_size")
    if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0:
        world = stage.info.get("world_size", 1)
        world = world if isinstance(world, int) and not isinstance(world, bool) and world > 0 else 1
        return "episodes", {s: float(s * batch * world) for s in steps}
    epoch = stage.series.get("epoch")
    if epoch and any(v is not None for v in epoch["value"]):
        return "epoch", _interpolate(epoch["step"], epoch["value"], steps)
    return None


def _interpolate(xs: list[int], ys: list, at: list[int]) -> dict[int, float]:
    """Values of a counter (episodes, epoch) at the steps ``at``, from the steps it was logged
    at: linear between logged points, and along the line through the first and last logged
    points (through the origin when only one was logged) outside them."""
    known = sorted((x, float(y)) for x, y in zip(xs, ys) if y is not None)
    (x_first, y_first), (x_last, y_last) = known[0], known[-1]
    if x_last != x_first:
        slope = (y_last - y_first) / (x_last - x_first)
    else:
        slope = y_first / x_first if x_first else 0.0
    out: dict[int, float] = {}
    for step in at:
        out[step] = y_first + slope * (step - x_first)
        for (x0, y0), (x1, y1) in zip(known, known[1:]):
            if x0 <= step <= x1:
                out[step] = y0 + (y1 - y0) * (step - x0) / (x1 - x0) if x1 != x0 else y1
                break
    return out


# Per-policy evaluation numbers the summary shows, in column order: the stages log them as
# eval/<name>_mean and eval/<name>_se at every evaluation, and report the first and last as
# initial/eval/* and final/eval/* (the convention of rlhf.summary).
SUMMARY_EVALS = ("gold", "score", "kl", "win_rate", "length")


def _eval_names(stage: StageData) -> list[str]:
    names = set()
    for key in list(stage.series) + list(stage.final_metrics):
        for prefix in ("", "initial/", "final/"):
            if key.startswith(prefix + "eval/") and key.endswith("_mean"):
                names.add(key[len(prefix) + len("eval/") : -len("_mean")])
    return sorted(names, key=lambda n: (SUMMARY_EVALS.index(n) if n in SUMMARY_EVALS else len(SUMMARY_EVALS), n))


def _eval_at(stage: StageData, name: str, where: str) -> tuple[float | None, float | None, int | None]:
    """(mean, se, step) of eval/<name> at the first or last evaluation of a stage.

    pipeline.json's ``initial/`` and ``final/`` numbers win (the stage wrote them when it
    finished); a stage still running falls back to its curves.
    """
    prefix = "initial/" if where == "first" else "final/"
    mean = stage.final_metrics.get(f"{prefix}eval/{name}_mean")
    if isinstance(mean, (int, float)) and not isinstance(mean, bool):
        se = stage.final_metrics.get(f"{prefix}eval/{name}_se")
        curve = stage.series.get(f"eval/{name}_mean")
        step = (curve["step"][0 if where == "first" else -1]) if curve else None
        return float(mean), se if isinstance(se, (int, float)) and not isinstance(se, bool) else None, step
    curve = stage.series.get(f"eval/{name}_mean")
    if not curve:
        return None, None, None
    points = [(s, v) for s, v in zip(curve["step"], curve["value"]) if v is not None]
    if not points:
        return None, None, None
    step, value = points[0] if where == "first" else points[-1]
    se_curve = stage.series.get(f"eval/{name}_se", {"step": [], "value": []})
    se = dict(zip(se_curve["step"], se_curve["value"])).get(step)
    return value, se, step


def policy_summary(run: RunData) -> dict[str, Any]:
    """What the run achieved, for the top of the page.

    Returns:
        ``{"columns": [eval name], "policies": [row], "reward_model": {key: number},
        "sft": {key: number}}``. Each row is ``{"label", "stage", "step", "ref", "values":
        {name: (mean, se)}}``: first the SFT policy (the first evaluation of the first stage
        that evaluates policies, before any update), then the trained policy of every stage
        that evaluates one (its last evaluation).
    """
    policies: list[dict[str, Any]] = []
    columns: list[str] = []
    for stage in run.stages:
        names = _eval_names(stage)
        if not names:
            continue
        columns += [n for n in names if n not in columns]
        if not policies:
            # the SFT policy's own win rate over itself is no number to show (rlhf.summary)
            first = {n: _eval_at(stage, n, "first") for n in names if not summary.is_win_rate(n)}
            step = next((s for _, _, s in first.values() if s is not None), None)
            policies.append(
                {
                    "label": "SFT policy",
                    "stage": stage.name,
                    "step": step,
                    "ref": _ref_of(run, "sft"),
                    "values": {n: (m, se) for n, (m, se, _) in first.items() if m is not None},
                }
            )
        last = {n: _eval_at(stage, n, "last") for n in names}
        step = max((s for _, _, s in last.values() if s is not None), default=None)
        still = stage.status == "running"
        policies.append(
            {
                "label": _policy_label(stage) + (f" (update {step}, still training)" if still else ""),
                "stage": stage.name,
                "step": step,
                "ref": stage.outputs.get("policy") if isinstance(stage.outputs.get("policy"), str) else None,
                "values": {n: (m, se) for n, (m, se, _) in last.items() if m is not None},
            }
        )
    reward_model: dict[str, float] = {}
    sft: dict[str, float] = {}
    for stage in run.stages:
        if stage.name == "reward" or "eval_accuracy" in stage.series or "eval_accuracy" in stage.final_metrics:
            for key in ("eval_accuracy", "gold_accuracy", "eval_margin"):
                value = _final_or_last(stage, key)
                if value is not None:
                    reward_model.setdefault(key, value)
        if stage.name == "sft":
            for key in ("eval_loss", "eval_mean_token_accuracy"):
                value = _final_or_last(stage, key)
                if value is not None:
                    sft[key] = value
    if "gold_accuracy" not in reward_model and isinstance(run.summary.get("rm_accuracy_gold"), (int, float)):
        reward_model["gold_accuracy"] = float(run.summary["rm_accuracy_gold"])
    return {"columns": columns, "policies": policies, "reward_model": reward_model, "sft": sft}


def _policy_label(stage: StageData) -> str:
    """"PPO policy", or "PPO policy (rloo)" when the stage ran another advantage estimator."""
    estimator = stage.config.get("advantage_estimator")
    suffix = f" ({estimator})" if isinstance(estimator, str) and estimator != "gae" else ""
    return f"{stage.name.upper()} policy{suffix}"


def _final_or_last(stage: StageData, key: str) -> float | None:
    value = stage.final_metrics.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    curve = stage.series.get(key)
    if curve:
        values = [v for v in curve["value"] if v is not None]
        if values:
            return values[-1]
    return None


def _ref_of(run: RunData, stage_name: str) -> str | None:
    for stage in run.stages:
        if stage.name == stage_name:
            ref = stage.outputs.get("adapter")
            return ref if isinstance(ref, str) else None
    return None
