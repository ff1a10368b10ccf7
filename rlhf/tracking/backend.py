"""What every tracker backend is given and what it must do (one class per backend).

A backend is constructed with the stage's :class:`RunInfo` and then receives the stage's
numbers through three calls. Construction fails with ImportError, naming the package to
install, when the backend's package is missing; after that a backend never stops a
training run (remote trackers warn and carry on without themselves).

Adding a tracker (MLflow, say) is one module with one such class plus its line in
``rlhf.tracking.BACKENDS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence


@dataclass(frozen=True)
class RunInfo:
    """The stage a backend records."""

    run_dir: Path  # the pipeline run directory
    stage_dir: Path  # <run_dir>/<stage>: where the local files go
    stage: str  # "sft", "reward", "ppo", ...: the remote run's name / job type
    group: str  # the pipeline run name: one remote group per pipeline run
    config: dict[str, Any]  # the stage's resolved config plus refs, stage and rlhf version


class Backend(Protocol):
    """One tracker: local files, wandb, TensorBoard, trackio."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """One step's finite-or-not scalar metrics (already cleaned to floats)."""

    def log_samples(self, key: str, columns: Sequence[str], records: list[dict[str, Any]], step: int) -> None:
        """Sample completions generated at ``step``: ``records`` hold ``columns`` (``key`` is
        ``samples/step_<step>``, a new table per call so earlier ones stay visible)."""

    def finish(self) -> None:
        """Close files and remote runs."""


def json_number(value: float) -> float | None:
    """``value``, or None when it is not finite (JSON has no NaN/Infinity and browsers'
    JSON.parse rejects them; a null keeps the row)."""
    return value if math.isfinite(value) else None


def markdown_table(columns: Sequence[str], rows: list[list[Any]]) -> str:
    """Rows as a Markdown table (TensorBoard's text plugin renders Markdown)."""

    def cell(value: Any) -> str:
        return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
