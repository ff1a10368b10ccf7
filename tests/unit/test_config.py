"""Recipe and config validation: errors name the key or file, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf.config import ConfigError, PPOConfig, SFTConfig, apply_overrides, from_dict
from rlhf.pipeline import plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "pipelines").glob("*.yaml"))


def _recipe(tmp_path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    apply_overrides(data, [f"{k}={v}" for k, v in changes.items()])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_validates(recipe, tmp_path):
    p = plan(recipe, tmp_path / "run", check_inputs=False)
    assert p.sft.model == p.reward.model == p.ppo.model
    assert p.ppo.output_dir.startswith(str(tmp_path / "run"))
    assert recipe.read_text().startswith("#"), "each recipe opens with a comment: what, where, the command"


def test_there_is_a_real_model_recipe():
    names = [yaml.safe_load(r.read_text())["model"]["name_or_path"] for r in RECIPES]
    assert any(not n.startswith("builtin:") for n in names)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ppo.kl_coeff=0.1", "unknown key ppo.kl_coeff"),
        ("sft.train.learning_rate=fast", "learning_rate: expected a number"),
        ("ppo.rollout_batch_size=30", "num_minibatches"),
        ("ppo.kl_estimator=k9", "ppo.kl_estimator: must be one of"),
        ("bogus=1", "unknown key bogus"),
        ("sft.seed=3", "sft.seed: set it at the top level"),
        ("ppo.reward_adapter=x", "set by the pipeline"),
        ("task.enabled=false", "sft.dataset: required"),
        ("sft.finetune=full", "sft.finetune"),
        ("report_to=[comet]", "report_to"),
    ],
)
def test_bad_recipe_fails_naming_the_key(tmp_path, override, needle):
    key, value = override.split("=", 1)
    recipe = _recipe(tmp_path)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        plan(recipe, tmp_path / "run", [override])


def test_missing_files_are_named(tmp_path):
    recipe = _recipe(tmp_path)
    with pytest.raises(ConfigError, match="sft.dataset: file not found: /nope/sft.jsonl"):
        plan(recipe, tmp_path / "run", ["task.enabled=false", "sft.dataset=/nope/sft.jsonl",
                                         "reward.dataset=/nope/p.jsonl", "ppo.prompts=/nope/q.jsonl"])
    with pytest.raises(ConfigError, match="config file not found"):
        plan(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not in the data store"):
        plan(recipe, tmp_path / "run", ["task.enabled=false", f"sft.dataset={recipe}",
                                         "reward.dataset=no-such-data", f"ppo.prompts={recipe}"])
    with pytest.raises(ConfigError, match="not a model directory"):
        plan(recipe, tmp_path / "run", [f"model.name_or_path={tmp_path}"])


def test_from_dict_types_and_float_literals():
    cfg = from_dict(PPOConfig, {"learning_rate": "6e-4", "reward_clip": None, "lora": {"r": 8}})
    assert cfg.learning_rate == 6e-4 and cfg.lora.r == 8
    with pytest.raises(ConfigError, match="ppo_epochs: expected an integer"):
        from_dict(PPOConfig, {"ppo_epochs": 1.5})
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected true or false"):
        from_dict(SFTConfig, {"model": {"trust_remote_code": "yes"}})


def test_trust_remote_code_is_off_by_default():
    assert SFTConfig().model.trust_remote_code is False


def test_cli_reports_config_errors(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["run", str(_recipe(tmp_path)), "--output-dir", str(tmp_path / "r"), "ppo.nope=1", "--validate-only"]) == 2
    assert "unknown key ppo.nope" in capsys.readouterr().err
    assert main(["run", str(_recipe(tmp_path)), "--output-dir", str(tmp_path / "r"), "--validate-only"]) == 0
