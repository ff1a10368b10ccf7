"""TensorBoard: scalars and sample tables under ``<run_dir>/<stage>/tensorboard``."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from rlhf.tracking.backend import RunInfo, markdown_table


class TensorBoardTracker:
    def __init__(self, info: RunInfo) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch present but the tensorboard package is not
            raise ImportError(
                "report_to includes 'tensorboard' but the 'tensorboard' package is not installed; "
                "install it with: pip install 'rlhf[tensorboard]'"
            ) from err
        self.writer = SummaryWriter(log_dir=str(info.stage_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(info.config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, int(step))

    def log_samples(self, key: str, columns: Sequence[str], records: list[dict[str, Any]], step: int) -> None:
        rows = [[record.get(column) for column in columns] for record in records]
        self.writer.add_text(key, markdown_table(columns, rows), int(step))

    def finish(self) -> None:
        self.writer.close()
