"""Input references resolve in one place: bases, adapters, data and preference data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reward_data
from rlhf.config import ConfigError, DPOConfig, PPOConfig, RewardConfig, from_dict
from rlhf.resolve import (
    check_input,
    resolve_adapter,
    resolve_base,
    resolve_data,
    resolve_inputs,
    resolve_preferences,
)


def _resolve(cfg):
    """resolve_inputs with the inputs of the stage-table row whose config ``cfg`` is."""
    from rlhf.stages import STAGES

    (stage,) = [name for name, row in STAGES.items() if isinstance(cfg, row.config)]
    return resolve_inputs(cfg, STAGES[stage].inputs, stage)


def _pairs(path: Path, n: int = 20) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) + "\n")
    return path


def test_base_references(tiny_assets, tmp_path):
    assert resolve_base(str(tiny_assets.base)) == str(tiny_assets.base)
    assert resolve_base("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # hub id: passed on
    with pytest.raises(ConfigError, match="not a model directory"):
        resolve_base(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown builtin"):
        resolve_base("builtin:huge")


def test_builtin_tiny_is_built_once_per_seed(monkeypatch, tmp_path):
    from rlhf.tasks import synthetic

    built = []

    def fake_build(out, seed=0):  # the real build pretrains for 300 steps
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        built.append(seed)
        return Path(out)

    monkeypatch.setattr(synthetic, "build_tiny_base", fake_build)
    a = resolve_base("builtin:tiny", seed=0)
    assert resolve_base("builtin:tiny", seed=0) == a
    b = resolve_base("builtin:tiny", seed=1)
    assert built == [0, 1] and a != b
    assert Path(a).parent == tmp_path / "rlhf_home" / "builtin"  # under $RLHF_HOME (tests/conftest.py)


def test_adapter_path_or_registry_reference(tiny_assets):
    from rlhf.registry import Registry

    assert resolve_adapter("ppo.sft_adapter", str(tiny_assets.sft_adapter)) == str(tiny_assets.sft_adapter)
    reg = Registry.open()
    base = reg.register_base("tiny", str(tiny_assets.base)).ref
    entry = reg.register_adapter("rm", "reward", str(tiny_assets.reward_adapter), base=base)
    assert resolve_adapter("ppo.reward_adapter", "rm") == str(entry.path)
    assert resolve_adapter("ppo.reward_adapter", "rm:1") == str(entry.path)
    with pytest.raises(ConfigError, match="ppo.reward_adapter: 'nope' is neither"):
        resolve_adapter("ppo.reward_adapter", "nope")
    with pytest.raises(ConfigError, match="ppo.sft_adapter: registry entry .* is a base"):
        resolve_adapter("ppo.sft_adapter", "tiny")


def test_data_references(tmp_path):
    path = _pairs(tmp_path / "p.jsonl")
    assert resolve_data("ppo.prompts", str(path)) == str(path)
    assert resolve_data("sft.dataset", "owner/dataset") == "owner/dataset"  # hub id: not checkable offline
    reward_data.ingest([path], "prompts")
    reward_data.ingest([path], "prompts", test_fraction=0.5)
    assert resolve_data("ppo.prompts", "prompts") == "prompts:2"  # pinned to today's newest
    assert resolve_data("ppo.prompts", "prompts:1") == "prompts:1"
    with pytest.raises(ConfigError, match="ppo.prompts: .*not in the data store"):
        resolve_data("ppo.prompts", "absent")
    with pytest.raises(ConfigError, match="sft.dataset: file not found"):
        check_input("sft.dataset", str(tmp_path / "missing.jsonl"))


def test_preference_files_are_ingested_once(tmp_path):
    path = _pairs(tmp_path / "pairs.jsonl")
    assert resolve_preferences("reward.dataset", str(path), None, 0.1) == "pairs:1"
    assert resolve_preferences("reward.dataset", str(path), None, 0.1) == "pairs:1"  # identical bytes: reused
    assert resolve_preferences("reward.dataset", str(path), None, 0.2) == "pairs:2"  # other options: new version
    _pairs(path, n=21)
    assert resolve_preferences("reward.dataset", str(path), None, 0.2) == "pairs:3"  # other bytes: new version
    assert resolve_preferences("reward.dataset", "pairs:1", None, 0.1) == "pairs:1"
    with pytest.raises(ConfigError, match="reward.dataset: 'nothing' is neither a file"):
        resolve_preferences("reward.dataset", "nothing", None, 0.1)


def test_resolve_inputs_resolves_every_reference_of_a_stage(tiny_assets, tmp_path):
    from rlhf.registry import Registry

    reg = Registry.open()
    base = reg.register_base("tiny", str(tiny_assets.base)).ref
    rm = reg.register_adapter("rm", "reward", str(tiny_assets.reward_adapter), base=base)
    prompts = _pairs(tmp_path / "prompts.jsonl")
    reward_data.ingest([prompts], "evalset")
    cfg = from_dict(PPOConfig, {"model": {"name_or_path": str(tiny_assets.base)}, "sft_adapter": str(tiny_assets.sft_adapter),
                                "reward_adapter": "rm:1", "prompts": str(prompts), "eval_prompts": "evalset"})
    got = _resolve(cfg)
    assert (got.reward_adapter, got.eval_prompts, got.prompts) == (str(rm.path), "evalset:1", str(prompts))
    assert cfg.reward_adapter == "rm:1"  # the caller's config is not modified

    pairs = _pairs(tmp_path / "prefs.jsonl")
    rcfg = from_dict(RewardConfig, {"model": {"name_or_path": str(tiny_assets.base)}, "dataset": str(pairs)})
    assert _resolve(rcfg).dataset == "prefs:1"


def test_dpo_resolves_its_pairs_like_the_reward_stage(tiny_assets, tmp_path):
    """DPO's preference file goes through the same store entry as the reward model's (one
    version for the same bytes and options); its adapters and eval prompts resolve too."""
    from rlhf.registry import Registry

    reg = Registry.open()
    base = reg.register_base("tiny", str(tiny_assets.base)).ref
    sft = reg.register_adapter("sft", "sft", str(tiny_assets.sft_adapter), base=base)
    pairs = _pairs(tmp_path / "prefs.jsonl")
    rcfg = from_dict(RewardConfig, {"model": {"name_or_path": str(tiny_assets.base)}, "dataset": str(pairs)})
    assert _resolve(rcfg).dataset == "prefs:1"
    reward_data.ingest([pairs], "evalset")
    got = _resolve(from_dict(DPOConfig, {
        "model": {"name_or_path": str(tiny_assets.base)}, "dataset": str(pairs), "sft_adapter": "sft:1",
        "reward_adapter": str(tiny_assets.reward_adapter), "eval_prompts": "evalset"}, prefix="dpo"))
    assert (got.dataset, got.sft_adapter, got.reward_adapter, got.eval_prompts) == (
        "prefs:1", str(sft.path), str(tiny_assets.reward_adapter), "evalset:1")

    def dpo(**kw) -> DPOConfig:
        return from_dict(DPOConfig, {"model": {"name_or_path": str(tiny_assets.base)}, **kw}, prefix="dpo")

    assert _resolve(dpo(dataset=str(pairs), eval_fraction=0.5)).dataset == "prefs:2"  # other options
    assert _resolve(dpo(dataset="prefs:1")).sft_adapter == ""  # optional: the base is the SFT model
    with pytest.raises(ConfigError, match="dpo.dataset: 'nothing' is neither a file"):
        _resolve(dpo(dataset="nothing"))
    with pytest.raises(ConfigError, match="dpo.sft_adapter: 'nope' is neither"):
        _resolve(dpo(dataset="prefs:1", sft_adapter="nope"))
