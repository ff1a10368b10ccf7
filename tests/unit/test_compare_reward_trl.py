"""scripts/compare_reward_trl.py: our side trains one reward model with the shared budget, as
the TRL side does (the stage's default is an ensemble of three)."""

from __future__ import annotations

import importlib.util
import types
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_reward_trl.py"


def test_our_side_is_one_reward_model_with_the_shared_budget(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_reward_trl", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import rlhf.stages

    seen = {}

    def fake_run_stage(name, cfg):
        seen["cfg"] = cfg
        metrics = {"eval_accuracy": 0.5, "train_pairs": 10, "train_pairs_too_long": 1, "heldout_accuracy": 0.6}
        return types.SimpleNamespace(metrics=metrics)

    monkeypatch.setattr(rlhf.stages, "run_stage", fake_run_stage)
    a = types.SimpleNamespace(seed=3, lora_r=8, epochs=2.0, batch_size=4, learning_rate=1e-4, max_length=64)
    out = script.run_ours(a, tmp_path / "base", "pairs:1", tmp_path)
    cfg = seen["cfg"]
    assert cfg.ensemble == 1 and cfg.keep_best is False and cfg.seed == 3
    assert (cfg.train.num_train_epochs, cfg.train.per_device_train_batch_size, cfg.train.max_length) == (2.0, 4, 64)
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 16)
    assert out["trained_pairs"] == 9 and out["heldout_accuracy"] == 0.6
