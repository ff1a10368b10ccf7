"""DPO settings and recipe stage lists: validated before any model loads, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import DPO_LOSS_TYPES, ConfigError, DPOConfig, from_dict
from rlhf.pipeline import plan

ROOT = Path(__file__).resolve().parents[2]
TINY_DPO = ROOT / "pipelines" / "tiny-dpo.yaml"


def test_loss_types_are_those_trl_exposes():
    import dataclasses

    from trl import DPOConfig as TRLDPOConfig

    trl_help = next(f for f in dataclasses.fields(TRLDPOConfig) if f.name == "loss_type").metadata["help"]
    for name in DPO_LOSS_TYPES:
        assert f"'{name}'" in trl_help, name
    assert from_dict(DPOConfig, {"loss_type": "ipo", "beta": 0.5}, prefix="dpo").loss_type == "ipo"


@pytest.mark.parametrize("data, needle", [
    ({"loss_type": "dpo"}, "dpo.loss_type: must be one of"),
    ({"beta": 0}, "dpo.beta must be > 0"),
    ({"beta": float("nan")}, "dpo.beta must be a finite number"),
    ({"label_smoothing": 0.5}, r"dpo.label_smoothing must be in \[0, 0.5\)"),
    ({"eval_temperature": 0.0}, "dpo.eval_temperature must be > 0"),
    ({"eval_batch_size": 0}, "dpo.eval_batch_size must be > 0"),
    ({"betta": 0.1}, "unknown key dpo.betta"),
    ({"train": {"per_device_train_batch_size": 0}}, "dpo.train.per_device_train_batch_size must be > 0"),
])
def test_bad_dpo_settings_are_named(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(DPOConfig, data, prefix="dpo")


def test_tiny_dpo_recipe_wires_sft_into_dpo(tmp_path):
    p = plan(TINY_DPO, tmp_path / "run", check_inputs=False)
    assert p.stages == ("sft", "dpo")
    assert p.dpo.sft_adapter == str(tmp_path / "run" / "sft" / "adapter")
    assert p.dpo.reward_adapter == ""  # no reward stage before DPO: no RM score
    assert p.dpo.dataset == p.task_files["pairs"] and p.dpo.eval_prompts == p.task_files["eval_prompts"]
    # sampled like PPO's evaluation, so the two compare
    assert (p.dpo.eval_response_length, p.dpo.eval_temperature, p.dpo.eval_batch_size, p.dpo.eval_max_prompt_length) == (
        p.ppo.response_length, p.ppo.temperature, p.ppo.rollout_batch_size, p.ppo.max_prompt_length)
    both = plan(TINY_DPO, tmp_path / "run", ["stages=[sft,reward,ppo,dpo]"], check_inputs=False)
    assert both.dpo.reward_adapter == str(tmp_path / "run" / "reward" / "adapter")


@pytest.mark.parametrize("recipe", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda r: r.name)
def test_every_recipe_validates_with_dpo_beside_ppo(recipe, tmp_path):
    p = plan(recipe, tmp_path / "run", ["stages=[sft,reward,ppo,dpo]"], check_inputs=False)
    assert p.dpo.dataset, "a recipe that can run DPO names its preference data"
    assert p.dpo.model == p.sft.model and p.dpo.seed == p.sft.seed
    assert p.dpo.eval_prompts == p.ppo.eval_prompts  # both policies are evaluated on the same prompts


def test_stages_without_ppo_need_no_ppo_inputs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("{}\n")
    p = plan(TINY_DPO, tmp_path / "run", ["task.enabled=false", f"sft.dataset={sft}", f"dpo.dataset={pairs}"])
    assert p.stages == ("sft", "dpo") and p.ppo.prompts == ""
    with pytest.raises(ConfigError, match="dpo.dataset: required"):
        plan(TINY_DPO, tmp_path / "run", ["task.enabled=false", f"sft.dataset={sft}"])


@pytest.mark.parametrize("stages, needle", [
    ("[sft,rlhf]", r"stages\[1\]: unknown stage 'rlhf'"),
    ("[sft,dpo,dpo]", r"stages\[2\]: 'dpo' is listed twice"),
    ("[dpo]", r"stages\[0\]: 'dpo' needs sft"),
    ("[sft,ppo]", r"stages: ppo scores with the reward model .* reward must be listed before ppo"),
    ("[]", "stages: empty"),
])
def test_bad_stage_lists_are_named(tmp_path, stages, needle):
    with pytest.raises(ConfigError, match=needle):
        plan(TINY_DPO, tmp_path / "run", [f"stages={stages}"], check_inputs=False)


def test_pipeline_wired_dpo_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="sft_adapter: set by the pipeline"):
        plan(TINY_DPO, tmp_path / "run", ["dpo.sft_adapter=x"], check_inputs=False)
    with pytest.raises(ConfigError, match="dpo.seed: set it at the top level"):
        plan(TINY_DPO, tmp_path / "run", ["dpo.seed=1"], check_inputs=False)


def test_tiny_kto_recipe_wires_sft_into_kto(tmp_path):
    """KTO is wired like DPO: the task's pairs (each split into a desirable and an undesirable
    completion by the stage), its eval prompts, the SFT adapter, and PPO's evaluation settings."""
    p = plan(ROOT / "pipelines" / "tiny-kto.yaml", tmp_path / "run", check_inputs=False)
    assert p.stages == ("sft", "kto")
    assert p.kto.sft_adapter == str(tmp_path / "run" / "sft" / "adapter") and p.kto.reward_adapter == ""
    assert p.kto.dataset == p.task_files["pairs"] and p.kto.eval_prompts == p.task_files["eval_prompts"]
    assert (p.kto.eval_response_length, p.kto.eval_temperature) == (p.ppo.response_length, p.ppo.temperature)
    both = plan(ROOT / "pipelines" / "tiny-kto.yaml", tmp_path / "run", ["stages=[sft,reward,dpo,kto]"],
                check_inputs=False)
    assert both.kto.reward_adapter == str(tmp_path / "run" / "reward" / "adapter")
    with pytest.raises(ConfigError, match=r"'kto' needs sft"):
        plan(ROOT / "pipelines" / "tiny-kto.yaml", tmp_path / "run", ["stages=[kto]"], check_inputs=False)
