"""MLflow: one run per stage (params, metrics, sample tables, the stage's log files as artifacts).

Where it writes: ``$MLFLOW_TRACKING_URI`` when set (a team's server, or any store MLflow
knows); without one, a local store inside the pipeline run directory,
``<run_dir>/mlflow/mlflow.db`` with artifacts under ``<run_dir>/mlflow/artifacts``, so a run
never writes into the current directory or a home-wide store by surprise. Browse it with
``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow/mlflow.db``. The experiment is
``$MLFLOW_EXPERIMENT_NAME``, else "rlhf"; runs are named ``<group>/<stage>`` and tagged
with the group and stage, as the wandb and trackio runs are grouped.

For teams on MLflow, :func:`register_adapters` also enters a pipeline's published adapters in
the same store's model registry (the pipeline calls it after each stage when ``report_to``
has mlflow and the run registers in our registry): the adapter's files are logged to the
stage's MLflow run under ``adapters/<name>``, and a new version of the registered model of the
same name as our registry entry (``tiny-policy``) points at them, tagged with our lineage.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhf.tracking.backend import RunInfo

# MLflow refuses longer parameter values; longer ones (a long list) are cut, and say so.
_PARAM_MAX = 6000


def local_store_uri(run_dir: Path) -> str:
    """The store used when no ``$MLFLOW_TRACKING_URI`` is set: inside the pipeline run directory."""
    return f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}"


def open_store(mlflow, run_dir: Path) -> tuple[Any, str]:
    """``(client, experiment id)`` of the store a pipeline run writes to (see the module doc):
    ``$MLFLOW_TRACKING_URI`` or the local store in ``run_dir``, experiment
    ``$MLFLOW_EXPERIMENT_NAME`` or "rlhf", created on first use. The model registry is the
    same store unless ``$MLFLOW_REGISTRY_URI`` names another."""
    server = os.environ.get("MLFLOW_TRACKING_URI")
    if not server:
        (run_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=server or local_store_uri(run_dir))
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rlhf"
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    # a local store keeps its artifacts beside its database, not in ./mlruns
    location = None if server else (run_dir / "mlflow" / "artifacts").resolve().as_uri()
    return client, client.create_experiment(name, artifact_location=location)


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
        self.client, experiment_id = open_store(self.mlflow, info.run_dir)
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


def lineage_tags(entry) -> dict[str, str]:
    """Our registry's lineage of ``entry`` (an :class:`rlhf.registry.Entry`) as MLflow tags:
    ``rlhf.ref`` and ``rlhf.role``, then one ``rlhf.lineage.<relation>`` tag per relation to its
    parents (``base``, ``parent``: the adapters and dataset it was trained from, ``run``: the
    registry run that produced it), each the comma-separated pinned refs."""
    tags = {"rlhf.ref": entry.ref, "rlhf.role": entry.role or ""}
    by_relation: dict[str, list[str]] = {}
    for parent in entry.parents:
        for relation in entry.relations.get(parent, ["parent"]):
            by_relation.setdefault(relation, []).append(parent)
    tags.update({f"rlhf.lineage.{relation}": ", ".join(refs) for relation, refs in sorted(by_relation.items())})
    return tags


def register_adapters(run_dir: Path, group: str, stage: str, published: Mapping[str, tuple[str, Any]]) -> list[str]:
    """Register a stage's published adapters in MLflow's model registry; returns
    ``"<model>/<version>"`` per adapter registered.

    ``published`` maps an artifact name (``adapter``, ``policy``, ``value``) to its directory and
    its entry in our registry. Each adapter's files go to the stage's MLflow run (the newest run
    tagged with ``group`` and ``stage``, which the stage's tracker made) under
    ``adapters/<name>``, and a new version of the registered model named like the registry entry
    points at them, tagged with :func:`lineage_tags`, the pipeline and the stage. Like every
    tracker it never stops a run: a failure is a warning.
    """
    try:
        mlflow = importlib.import_module("mlflow")
        client, experiment_id = open_store(mlflow, run_dir)
        runs = client.search_runs([experiment_id], filter_string=f"tags.`rlhf.group` = '{group}' and "
                                  f"tags.`rlhf.stage` = '{stage}'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if not runs:
            raise LookupError(f"no MLflow run tagged rlhf.group={group}, rlhf.stage={stage}")
        run = runs[0]
        registered = []
        for name, (path, entry) in published.items():
            client.log_artifacts(run.info.run_id, str(path), artifact_path=f"adapters/{name}")
            if not client.search_registered_models(filter_string=f"name = '{entry.name}'"):
                client.create_registered_model(entry.name, description="An rlhf adapter; its lineage in our "
                                               "registry is in each version's rlhf.* tags.")
            tags = {**lineage_tags(entry), "rlhf.group": group, "rlhf.stage": stage}
            version = client.create_model_version(entry.name, f"{run.info.artifact_uri}/adapters/{name}",
                                                  run_id=run.info.run_id, tags=tags)
            registered.append(f"{entry.name}/{version.version}")
        return registered
    except Exception as err:  # noqa: BLE001 - a tracker never stops a run
        warnings.warn(f"mlflow: the {stage} adapters were not registered in the model registry: "
                      f"{type(err).__name__}: {err}", stacklevel=2)
        return []
