"""trackio: one run per stage, grouped by the pipeline run, in the project "rlhf"."""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

from rlhf.tracking.backend import RunInfo


class TrackioTracker:
    def __init__(self, info: RunInfo) -> None:
        try:
            self.trackio = importlib.import_module("trackio")
        except ImportError as err:
            raise ImportError(
                "report_to includes 'trackio' but the 'trackio' package is not installed; "
                "install it with: pip install trackio"
            ) from err
        self.run = self.trackio.init(project="rlhf", name=f"{info.group}/{info.stage}", group=info.group,
                                     config=info.config)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.trackio.log(dict(metrics), step=int(step))

    def log_samples(self, key: str, columns: Sequence[str], records: list[dict[str, Any]], step: int) -> None:
        if hasattr(self.trackio, "Table"):
            rows = [[record.get(column) for column in columns] for record in records]
            self.trackio.log({key: self.trackio.Table(columns=list(columns), data=rows)}, step=int(step))

    def finish(self) -> None:
        self.trackio.finish()
