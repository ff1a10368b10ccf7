"""trackio and MLflow with the real libraries, offline: what a stage logs can be read back."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": "tell me about cats", "completion": "cats warm", "score": 0.5, "gold": 0.25, "length": 2}]


def test_mlflow_writes_a_local_store_inside_the_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow import MlflowClient

    from rlhf.tracking.mlflow import local_store_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, "ppo", config={"lr": 0.1, "lora": {"r": 8}, "stages": ["sft", "ppo"]},
                      report_to=["mlflow"], group="g")
    tracker.log({"kl": 0.5, "loss": math.inf}, step=1)
    tracker.log({"kl": 0.25}, step=2)
    tracker.log_samples(2, ROWS)
    tracker.finish()

    assert list(cwd.iterdir()) == []  # no ./mlruns
    client = MlflowClient(tracking_uri=local_store_uri(run_dir))
    experiment = client.get_experiment_by_name("rlhf")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "g/ppo" and run.info.status == "FINISHED"
    assert run.data.tags["rlhf.group"] == "g" and run.data.tags["rlhf.stage"] == "ppo"
    assert run.data.params["lr"] == "0.1" and run.data.params["lora.r"] == "8"
    assert run.data.params["stages"] == '["sft", "ppo"]'
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "kl")] == [(1, 0.5), (2, 0.25)]
    assert client.get_metric_history(run.info.run_id, "loss") == []  # infinite: in the local files only
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(run_dir / "mlflow" / "artifacts")
    table = json.loads((artifacts / "samples" / "step_2.json").read_text())
    assert table["columns"][:3] == ["step", "prompt", "completion"] and table["data"][0][2] == "cats warm"
    assert (artifacts / "files" / "metrics.jsonl").read_text() == (run_dir / "ppo" / "metrics.jsonl").read_text()


def test_mlflow_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"pip install 'rlhf\[mlflow\]'"):
        Tracker(tmp_path, "sft", config={}, report_to=["mlflow"])


TRACKIO_CHILD = textwrap.dedent(
    """
    import json, sys
    from rlhf.tracking import Tracker
    from trackio.sqlite_storage import SQLiteStorage

    tracker = Tracker(sys.argv[1], "ppo", config={"lr": 0.1}, report_to=["trackio"], group="g")
    tracker.log({"kl": 0.5}, step=1)
    tracker.log({"kl": 0.25}, step=2)
    tracker.log_samples(2, json.loads(sys.argv[2]))
    tracker.finish()
    logs = SQLiteStorage.get_logs("rlhf", run="g/ppo")
    print(json.dumps({"runs": SQLiteStorage.get_runs("rlhf"), "logs": logs}, default=str))
    """
)


def test_trackio_logs_metrics_and_sample_tables_to_its_local_store(tmp_path):
    pytest.importorskip("trackio", reason="the trackio extra is not installed")
    # trackio reads its directory when imported: a child process with its own
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", TRACKIO_CHILD, str(tmp_path / "run"), json.dumps(ROWS)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["runs"] == ["g/ppo"]
    kl = [(row["step"], row["kl"]) for row in out["logs"] if "kl" in row]
    assert kl == [(1, 0.5), (2, 0.25)]
    tables = [row["samples/step_2"] for row in out["logs"] if "samples/step_2" in row]
    assert len(tables) == 1 and "cats warm" in json.dumps(tables[0])
    assert (tmp_path / "trackio").is_dir()
