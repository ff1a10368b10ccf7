"""The one stage dispatch table: the CLI runs a stage through it, with inputs resolved first."""

from __future__ import annotations

import dataclasses
import json

from pathlib import Path

import pytest

from rlhf import stages
from rlhf.config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig
from rlhf.stages import STAGES, Stage, StageResult

ROOT = Path(__file__).resolve().parents[2]


def test_table_lists_the_stages_in_pipeline_order():
    assert list(STAGES) == ["sft", "reward", "ppo", "dpo", "kto"]
    assert [STAGES[s].config for s in STAGES] == [SFTConfig, RewardConfig, PPOConfig, DPOConfig, KTOConfig]
    # what a recipe's stage list must put before each stage
    assert {s: STAGES[s].requires for s in STAGES} == {"sft": (), "reward": ("sft",), "ppo": ("sft", "reward"),
                                                       "dpo": ("sft",), "kto": ("sft",)}
    from rlhf.cli import STAGE_NAMES

    assert STAGE_NAMES == tuple(STAGES)  # the CLI's copy (for a torch-free --help) is the table's


def test_cli_runs_a_stage_from_the_table_with_resolved_inputs(tiny_assets, tmp_path, monkeypatch, capsys):
    from rlhf.cli import main
    from rlhf.registry import Registry

    reg = Registry.open()
    base = reg.register_base("tiny", str(tiny_assets.base)).ref
    rm = reg.register_adapter("rm", "reward", str(tiny_assets.reward_adapter), base=base)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    seen = {}

    def fake_run(cfg, *, group, resume, task, registration):
        seen["cfg"] = cfg
        assert registration is None  # a stage run alone registers nothing
        return StageResult(stage="ppo", output_dir=cfg.output_dir, base=cfg.model.name_or_path,
                           artifacts={"policy": "p"}, metrics={"m": 1.0})

    monkeypatch.setitem(stages.STAGES, "ppo", Stage(PPOConfig, fake_run))
    assert main(["ppo", f"model.name_or_path={tiny_assets.base}", "reward_adapter=rm:1", f"prompts={prompts}",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    assert seen["cfg"].reward_adapter == str(rm.path)  # the registry reference arrived resolved
    printed = json.loads(capsys.readouterr().out)
    assert printed == dataclasses.asdict(StageResult(stage="ppo", output_dir=str(tmp_path / "out"),
                                                     base=str(tiny_assets.base), artifacts={"policy": "p"},
                                                     metrics={"m": 1.0}))


def test_an_unresolvable_input_stops_the_stage_before_it_runs(tmp_path, monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.setitem(stages.STAGES, "sft", Stage(SFTConfig, lambda *a, **k: pytest.fail("stage ran")))
    assert main(["sft", f"dataset={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "sft.dataset: file not found" in capsys.readouterr().err


def test_kto_summary_uses_the_dpo_keys_with_kto_in_their_place():
    """The KTO stage's numbers enter the pipeline summary under DPO's key names, ``kto`` for ``dpo``."""
    from rlhf.pipeline import _add_offline_summary

    m = {"eval_loss": 0.4, "eval_rewards_margins": 0.2, "sft/eval/gold_mean": -0.2, "sft/eval/gold_se": 0.03,
         "kto/eval/gold_mean": 0.1, "kto/eval/gold_se": 0.04, "kto/eval/kl_mean": 1.5, "kto/eval/kl_se": 0.1,
         "kto/win_rate_gold": 0.7, "kto/win_rate_gold_se": 0.02}
    out: dict = {}
    _add_offline_summary(out, "kto", m, has_gold=True)
    assert (out["kto_eval_loss"], out["kto_reward_margin"], out["kl_kto_sft"]) == (0.4, 0.2, 1.5)
    assert (out["gold_reward_sft"], out["gold_reward_kto"], out["gold_win_rate_kto_sft"]) == (-0.2, 0.1, 0.7)
    # (0.1 - -0.2) / hypot(0.03, 0.04) = 0.3 / 0.05
    assert out["gold_improvement_kto_in_se"] == pytest.approx(6.0)
    assert not any("dpo" in k for k in out)


def test_make_reproducible_fixes_threads_and_deterministic_kernels(monkeypatch):
    import torch

    from rlhf.config import ConfigError
    from rlhf.stages import DEFAULT_NUM_THREADS, make_reproducible

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        monkeypatch.delenv("RLHF_NUM_THREADS", raising=False)
        assert make_reproducible() == DEFAULT_NUM_THREADS == torch.get_num_threads() == 2
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("RLHF_NUM_THREADS", "1")
        assert make_reproducible() == 1
        monkeypatch.setenv("RLHF_NUM_THREADS", "0")  # torch's default: left as it is
        assert make_reproducible() == 1
        monkeypatch.setenv("RLHF_NUM_THREADS", "many")
        with pytest.raises(ConfigError, match=r"\$RLHF_NUM_THREADS: 'many' is not a whole number"):
            make_reproducible()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def test_pipeline_exports_its_thread_count_to_the_stages(tmp_path, monkeypatch):
    import os

    from rlhf.pipeline import Pipeline, plan

    monkeypatch.delenv("RLHF_NUM_THREADS", raising=False)
    p = plan(ROOT / "pipelines" / "tiny.yaml", tmp_path / "run", ["num_threads=3"], check_inputs=False)
    seen = {}
    monkeypatch.setattr(Pipeline, "_run", lambda self, *a: seen.setdefault("threads", os.environ["RLHF_NUM_THREADS"]))
    Pipeline(p).run()
    assert seen["threads"] == "3"
