"""Recipe and config validation: errors name the key or file, before any model is loaded."""

from __future__ import annotations

import dataclasses
import typing
import warnings
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # every recipe speaks the current vocabulary
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
        ("ppo.rollout_batch_size=30", "num_mini_batches"),
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
    with pytest.raises(ConfigError, match="num_ppo_epochs: expected an integer"):
        from_dict(PPOConfig, {"num_ppo_epochs": 1.5})
    with pytest.raises(ConfigError, match="model.trust_remote_code: expected true or false"):
        from_dict(SFTConfig, {"model": {"trust_remote_code": "yes"}})


def test_trust_remote_code_is_off_by_default():
    assert SFTConfig().model.trust_remote_code is False


def test_cli_reports_config_errors(tmp_path, capsys):
    from rlhf.cli import main

    assert main(["run", str(_recipe(tmp_path)), "--output-dir", str(tmp_path / "r"), "ppo.nope=1", "--validate-only"]) == 2
    assert "unknown key ppo.nope" in capsys.readouterr().err
    assert main(["run", str(_recipe(tmp_path)), "--output-dir", str(tmp_path / "r"), "--validate-only"]) == 0


def _other_value(cls, key: str):
    """A valid value of dotted ``key`` in config class ``cls`` that differs from its default."""
    *path, name = key.split(".")
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    tp = typing.get_type_hints(cls)[name]
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != default)
    if tp is bool:
        return not default
    if tp in (int, float):
        return default * 2 if default else tp(2)
    return f"other-{default}"


def _deprecated_cases():
    from rlhf.config import deprecated_keys
    from rlhf.stages import STAGES

    return [(stage, old, new) for stage, row in STAGES.items() for old, new in deprecated_keys(row.config)]


@pytest.mark.parametrize("stage, old, new", _deprecated_cases(), ids=lambda v: str(v))
def test_each_deprecated_key_maps_to_its_new_key_with_a_future_warning(stage, old, new):
    from rlhf.stages import STAGES

    cls = STAGES[stage].config
    value = _other_value(cls, new)
    with pytest.warns(FutureWarning, match=rf"^{stage}\.{old} is deprecated: use {stage}\.{new}$"):
        cfg = from_dict(cls, apply_overrides({}, [f"{old}={value}"]), prefix=stage)
    for part in new.split("."):
        cfg = getattr(cfg, part)
    assert cfg == value
    with pytest.raises(ConfigError, match=rf"{stage}\.{old} and {stage}\.{new} are both set"):
        from_dict(cls, apply_overrides({}, [f"{old}={value}", f"{new}={value}"]), prefix=stage)


def test_the_vocabulary_uses_the_transformers_and_trl_names():
    """One name per meaning across the stages (issue 28): the held-out share, epochs, batch sizes,
    checkpoint and evaluation intervals."""
    from rlhf.config import TrainArgs
    from rlhf.stages import STAGES

    names = {stage: {f.name for f in dataclasses.fields(row.config)} for stage, row in STAGES.items()}
    assert all("eval_fraction" in keys and "test_fraction" not in keys for keys in names.values())
    train = {f.name for f in dataclasses.fields(TrainArgs)}
    assert {"num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type",
            "save_steps", "eval_steps", "logging_steps", "max_length", "learning_rate"} <= train
    assert {"num_ppo_epochs", "num_mini_batches", "per_device_train_batch_size", "save_steps", "eval_steps",
            "save_total_limit", "lr_scheduler_type", "adam_epsilon", "num_generations"} <= names["ppo"]


def test_deprecated_names_work_in_a_recipe_and_in_overrides(tmp_path):
    data = yaml.safe_load((ROOT / "pipelines" / "tiny.yaml").read_text())
    data["sft"]["train"]["epochs"] = data["sft"]["train"].pop("num_train_epochs")
    data["reward"]["test_fraction"] = data["reward"].pop("eval_fraction")
    del data["ppo"]["save_steps"]  # set by the override below, under its old name
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump(data))
    with pytest.warns(FutureWarning) as record:
        old = plan(recipe, tmp_path / "run", ["ppo.save_every=8"], check_inputs=False)
    assert sorted(str(w.message) for w in record) == [
        "ppo.save_every is deprecated: use ppo.save_steps", "reward.test_fraction is deprecated: use reward.eval_fraction",
        "sft.train.epochs is deprecated: use sft.train.num_train_epochs"]
    new = plan(ROOT / "pipelines" / "tiny.yaml", tmp_path / "run", ["ppo.save_steps=8"], check_inputs=False)
    assert old.configs == new.configs and old.ppo.save_steps == 8
    with pytest.raises(ConfigError, match="ppo.save_every and ppo.save_steps are both set"):
        plan(ROOT / "pipelines" / "tiny.yaml", tmp_path / "run", ["ppo.save_every=8"], check_inputs=False)


def test_the_example_recipe_uses_no_deprecated_key(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        plan(ROOT / "examples" / "my_task.yaml", tmp_path / "run", check_inputs=False)
