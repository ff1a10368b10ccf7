"""MLflow: one run per stage (params, metrics, sample tables, the stage's log files as artifacts).

Where it writes: ``$MLFLOW_TRACKING_URI`` when set (a team's server, or any store MLflow
knows); without one, a local store inside the pipeline run directory,
``<run_dir>/mlflow/mlflow.db`` with artifacts under ``<run_dir>/mlflow/artifacts``, so a run
never writes into the current directory or a home-wide store by surprise. Browse it with
``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow/mlflow.db``. The experiment is
``$MLFLOW_EXPERIMENT_NAME``, else "rlhf"; runs are named ``<group>/<stage>`` and tagged
with the group and stage, as the wandb and trackio runs are grouped.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from rlhf.tracking.backend import RunInfo

# MLflow refuses longer parameter values; longer ones (a long list) are cut, and say so.
_PARAM_MAX = 6000


def local_store_uri(info: RunInfo) -> str:
    """The store used when no ``$MLFLOW_TRACKING_URI`` is set: inside the pipeline run directory."""
    return f"sqlite:///{(info.run_dir / 'mlflow' / 'mlflow.db').resolve()}"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 14] + "...(truncated)"
    return out


class MLflowTracker:
    def __init__(self, info: RunInfo) -> None:
        try:
            self.mlflow = importlib.import_module("mlflow")
            entities = importlib.import_module("mlflow.entities")
        except ImportError as err:
            raise ImportError(
                "report_to includes 'mlflow' but the 'mlflow' package is not installed; "
                "install it with: pip install 'rlhf[mlflow]'"
            ) from err
        self.Metric, self.Param, self.RunTag = entities.Metric, entities.Param, entities.RunTag
        self.info = info
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(info)
        if self.uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
            (info.run_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        self.client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlhf"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # a local store keeps its artifacts beside its database, not in ./mlruns
            location = (None if os.environ.get("MLFLOW_TRACKING_URI")
                        else (info.run_dir / "mlflow" / "artifacts").resolve().as_uri())
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        tags = {"rlhf.group": info.group, "rlhf.stage": info.stage, "mlflow.runName": f"{info.group}/{info.stage}"}
        self.run_id = self.client.create_run(experiment_id, run_name=f"{info.group}/{info.stage}", tags=tags).info.run_id
        params = [self.Param(k, v) for k, v in _flatten(info.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i: i + 100])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        # MLflow stores NaN but refuses infinities; non-finite values stay in the local files
        batch = [self.Metric(k, float(v), now, int(step)) for k, v in metrics.items() if math.isfinite(v)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i: i + 1000])

    def log_samples(self, key: str, columns: Sequence[str], records: list[dict[str, Any]], step: int) -> None:
        data = {column: [record.get(column) for record in records] for column in columns}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{key}.json")

    def finish(self) -> None:
        # the local files are complete now (they finish first): keep them with the run
        for name in ("config.yaml", "metrics.jsonl", "log.txt", "samples.jsonl"):
            path = self.info.stage_dir / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path="files")
        self.client.set_terminated(self.run_id, "FINISHED")
