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

__all__ = ["RunData", "StageData", "find_run", "list_runs", "load_run", "run_refs", "run_summary", "to_jsonable"]

# Known metrics first, in the order a reader scans a stage; anything else follows sorted.
PREFERRED_METRIC_ORDER = (
    "loss",
    "eval_loss",
    "eval_accuracy",
    "eval_margin",
    "accuracy",
    "margin",
    "reward/score_mean",
    "eval/score_mean",
    "eval/gold_mean",
    "kl/mean",
    "eval/kl",
    "entropy/mean",
    "eval/entropy",
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
    final_metrics: dict[str, Any] = field(default_factory=dict, metadata={"help": "final numbers from pipeline.json"})
    series: dict[str, dict[str, list]] = field(
        default_factory=dict,
        metadata={"help": "metric -> {'step': [int], 'value': [float|None]} in file order"},
    )
    samples: list[dict[str, Any]] = field(default_factory=list, metadata={"help": "rows of samples.jsonl"})
    config_text: str | None = field(default=None, metadata={"help": "contents of config.yaml, if present"})


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
    series: dict[str, dict[str, list]] = {}
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
            entry = series.setdefault(key, {"step": [], "value": []})
            entry["step"].append(int(step))
            entry["value"].append(number_value)
    return _sorted_metrics(series)


def _sorted_metrics(series: dict[str, Any]) -> dict[str, Any]:
    rank = {name: index for index, name in enumerate(PREFERRED_METRIC_ORDER)}
    return dict(sorted(series.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _load_samples(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    samples = []
    for number, row in _read_jsonl(path, problems):
        missing = [name for name in ("step", "prompt", "completion") if name not in row]
        if missing:
            problems.append(f"{path} line {number}: missing field(s) {', '.join(missing)}")
            continue
        samples.append(
            {
                "step": row["step"],
                "prompt": str(row["prompt"]),
                "completion": str(row["completion"]),
                "score": row.get("score"),
                "gold": row.get("gold"),
            }
        )
    return samples


def _stage_names(run_dir: Path, declared: dict[str, Any]) -> list[str]:
    names = list(declared)
    # Stages that logged but are not (yet) in pipeline.json still get shown.
    extra = [
        child.name
        for child in sorted(run_dir.iterdir())
        if child.is_dir() and child.name not in declared and (child / "metrics.jsonl").is_file()
    ]
    names += extra
    rank = {name: index for index, name in enumerate(STAGE_ORDER)}
    if not declared:
        names.sort(key=lambda name: (rank.get(name, len(rank)), name))
    return names


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The cheap part of a run (pipeline.json + summary.json) for the run list."""
    problems: list[str] = []
    pipeline = _read_json(run_dir / "pipeline.json", problems)
    stages = pipeline.get("stages") if isinstance(pipeline.get("stages"), dict) else {}
    return {
        "key": run_dir.name,
        "name": str(pipeline.get("name") or run_dir.name),
        "recipe": pipeline.get("recipe"),
        "created": pipeline.get("created"),
        "stages": {name: (info or {}).get("status", "unknown") for name, info in stages.items()},
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
    for name in _stage_names(run_dir, declared):
        info = declared.get(name) or {}
        stage_dir = run_dir / name
        config_path = stage_dir / "config.yaml"
        run.stages.append(
            StageData(
                name=name,
                status=str(info.get("status", "unknown")),
                inputs=dict(info.get("inputs") or {}),
                outputs=dict(info.get("outputs") or {}),
                final_metrics=dict(info.get("metrics") or {}),
                series=_load_series(stage_dir / "metrics.jsonl", problems),
                samples=_load_samples(stage_dir / "samples.jsonl", problems),
                config_text=config_path.read_text(encoding="utf-8") if config_path.is_file() else None,
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
