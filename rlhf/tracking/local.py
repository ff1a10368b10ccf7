"""The local files every stage writes, always (no network): the dashboard's and the report's source.

    <run_dir>/<stage>/metrics.jsonl   {"step": int, "time": float, "<metric>": float, ...} per line
    <run_dir>/<stage>/samples.jsonl   one sample row per line (see ``Tracker.log_samples``)
    <run_dir>/<stage>/log.txt         one text line per logged step and per note()
    <run_dir>/<stage>/tracker.json    {"stage", "group", "world_size", "refs", "report_to", "rlhf_version", "started"}
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from rlhf.atomic import write_text
from rlhf.tracking.backend import RunInfo, json_number


def metric_text(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


class LocalFiles:
    """metrics.jsonl, samples.jsonl and log.txt, appended line by line (a resumed stage
    continues its curves instead of erasing them); every step also to stderr when ``verbose``."""

    def __init__(self, info: RunInfo, *, verbose: bool = False) -> None:
        self.info = info
        self.verbose = verbose
        info.stage_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = info.stage_dir / "metrics.jsonl"
        self.samples_path = info.stage_dir / "samples.jsonl"
        self.log_path = info.stage_dir / "log.txt"
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        self._samples_file = open(self.samples_path, "a", encoding="utf-8")
        self._log_file = open(self.log_path, "a", encoding="utf-8")

    def write_info(self, info: dict[str, Any]) -> None:
        """tracker.json: what the dashboard needs besides the curves (e.g. the number of
        processes, which turns PPO updates into episodes), written atomically."""
        write_text(self.info.stage_dir / "tracker.json", json.dumps(info, indent=2) + "\n")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({key: json_number(value) for key, value in metrics.items()})
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        text = f"{self.info.stage} step {int(step)}: {metric_text(metrics)}"
        self.note(text)
        if self.verbose:
            tqdm.write(text, file=sys.stderr)  # above any progress bar, not through it

    def log_samples(self, key: str, columns: Sequence[str], records: list[dict[str, Any]], step: int) -> None:
        for record in records:
            self._samples_file.write(json.dumps(record) + "\n")
        self._samples_file.flush()

    def note(self, message: str) -> None:
        self._log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
        self._log_file.flush()

    def finish(self) -> None:
        self._metrics_file.close()
        self._samples_file.close()
        self._log_file.close()
