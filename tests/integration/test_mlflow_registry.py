"""For teams on MLflow: a pipeline with report_to mlflow registers its published adapters in
MLflow's model registry (the local store inside the run directory), tagged with our lineage.

Real mlflow, offline; the stages are stand-ins that publish small adapters through the real
``publish`` (with the pipeline's registration) and log through the real tracker, so the test
takes seconds and checks the wiring the real stages use.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhf.config import to_dict
from rlhf.pipeline import Pipeline, plan
from rlhf.stages.common import StageResult, publish
from rlhf.tracking import Tracker

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 8


def _base(tmp_path: Path) -> Path:
    d = tmp_path / "base-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    save_file({"w": torch.arange(8, dtype=torch.float32)}, str(d / "model.safetensors"))
    return d


def _fake_stage(stage, cfg, *, group, registration, **_):
    """Log a metric, publish a LoRA-shaped adapter with the registration, like a stage's last steps."""
    out = Path(cfg.output_dir)
    tracker = Tracker(out.parent, stage, config=to_dict(cfg), report_to=cfg.report_to, group=group)
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()

    def write(tmp: Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
        weights = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(len(stage)))
        save_file({"base_model.model.layer.q_proj.lora_A.weight": weights}, str(tmp / "adapter_model.safetensors"))

    role = "sft" if stage == "sft" else "policy"
    path = publish(out, "adapter", write, role=role, base=cfg.model.name_or_path, config=to_dict(cfg),
                   registration=registration, entry=stage)
    return StageResult(stage, str(out), cfg.model.name_or_path, {"adapter": path}, {"loss": 1.0})


def test_published_adapters_are_registered_in_mlflow_with_our_lineage(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow import MlflowClient

    from rlhf.registry import Registry
    from rlhf.tracking.mlflow import local_store_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("rlhf.pipeline.run_stage", _fake_stage)
    run_dir = tmp_path / "run"
    overrides = [f"model.name_or_path={_base(tmp_path)}", "stages=[sft,dpo]", "report_to=[mlflow]", "name=t",
                 "task.num_sft=8", "task.num_pairs=8", "task.num_ppo_prompts=8", "task.num_eval_prompts=8"]
    Pipeline(plan(ROOT / "pipelines" / "tiny.yaml", run_dir, overrides)).run()

    assert not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=local_store_uri(run_dir))
    registry = Registry.open()
    try:
        sft, dpo = registry.resolve("t-sft"), registry.resolve("t-dpo")
    finally:
        registry.close()
    base_ref = next(p for p in sft.parents if sft.relations[p] == ["base"])
    run_ref = next(p for p in dpo.parents if dpo.relations[p] == ["run"])
    (version,) = client.search_model_versions("name = 't-dpo'")
    assert str(version.version) == "1" and version.tags["rlhf.ref"] == dpo.ref and version.tags["rlhf.role"] == "policy"
    assert version.tags["rlhf.lineage.base"] == base_ref and version.tags["rlhf.lineage.run"] == run_ref
    assert sft.ref in version.tags["rlhf.lineage.parent"].split(", ")  # DPO trained from the SFT adapter
    assert version.tags["rlhf.group"] == "t" and version.tags["rlhf.stage"] == "dpo"
    run = client.get_run(version.run_id)
    assert run.data.tags["rlhf.stage"] == "dpo" and run.info.run_name == "t/dpo"
    # the version's source holds the published files, inside the run directory's store
    source = Path(version.source.removeprefix("file://"))
    assert source.is_relative_to(run_dir / "mlflow" / "artifacts")
    published = run_dir / "dpo" / "adapter" / "adapter_model.safetensors"
    assert (source / "adapter_model.safetensors").read_bytes() == published.read_bytes()
    (sft_version,) = client.search_model_versions("name = 't-sft'")
    assert sft_version.tags["rlhf.ref"] == sft.ref and "rlhf.lineage.parent" not in sft_version.tags


def test_a_failed_mlflow_registration_warns_and_never_stops_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from rlhf.tracking.mlflow import register_adapters

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.warns(UserWarning, match="mlflow: the ppo adapters were not registered.*no MLflow run tagged"):
        assert register_adapters(tmp_path / "run", "g", "ppo", {"policy": (str(tmp_path), None)}) == []
