"""RoleModel saving and loading of roles, the adapter layout, and publishing an artifact."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from rlhf.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    HEAD_FILE,
    METADATA_FILE,
    RoleModel,
    read_head,
    read_lora_weights,
)
from rlhf.stages.common import publish


def _role_model(assets) -> RoleModel:
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(assets.base))
    return RoleModel(load_causal_lm(str(assets.base), tok), str(assets.sft_adapter), str(assets.reward_adapter))


def _trainable(model: RoleModel) -> dict[str, torch.Tensor]:
    return {f"{role}:{i}": p.detach().clone()
            for role in ("policy", "value") for i, p in enumerate(model.trainable_parameters(role))}


def test_saved_roles_load_back_into_a_fresh_model(tiny_assets, tmp_path):
    """Perturb the trainable roles (LoRA and value head), save them, load them into a model
    built from the original adapters: every trainable tensor comes back exactly."""
    trained = _role_model(tiny_assets)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for role in ("policy", "value"):
            for p in trained.trainable_parameters(role):
                p.add_(torch.randn(p.shape, generator=gen))
    for role in ("policy", "value"):
        trained.save_role(role, tmp_path / role)

    fresh = _role_model(tiny_assets)
    want, before = _trainable(trained), _trainable(fresh)
    assert any(not torch.equal(want[k], before[k]) for k in want)
    for role in ("policy", "value"):
        fresh.load_role(role, tmp_path / role)
    got = _trainable(fresh)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # frozen roles are untouched by loading trained ones
    assert torch.equal(fresh.heads["reward"].weight, trained.heads["reward"].weight)


def test_role_directories_follow_the_layout(tiny_assets, tmp_path):
    model = _role_model(tiny_assets)
    model.save_role("policy", tmp_path / "policy")
    model.save_role("value", tmp_path / "value")
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert sorted(p.name for p in (tmp_path / "value").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_FILE])
    state, cfg = read_lora_weights(tmp_path / "policy")
    assert state and all("lora_" in k for k in state) and cfg["r"] == 4
    assert read_head(tmp_path / "value")["weight"].shape == (1, 64)


def test_bad_heads_and_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=HEAD_FILE):
        read_head(tmp_path)
    save_file({"weight": torch.zeros(2, 64)}, str(tmp_path / HEAD_FILE))
    with pytest.raises(ValueError, match=r"\(1, hidden\)"):
        read_head(tmp_path)
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        read_lora_weights(tmp_path)


def test_publish_writes_metadata_and_config_and_replaces_atomically(tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    path = publish(out, "adapter", lambda d: (d / "weights.bin").write_text("v1"), role="sft", base="/b",
                   config={"lr": 1.0}, dataset="pairs:1")
    assert path == str(out / "adapter")
    assert (out / "adapter" / "weights.bin").read_text() == "v1"
    assert json.loads((out / "adapter" / METADATA_FILE).read_text()) == {"role": "sft", "base_path": "/b",
                                                                         "dataset": "pairs:1"}
    assert yaml.safe_load((out / "adapter" / CONFIG_FILE).read_text()) == {"lr": 1.0}

    def broken(d):
        (d / "weights.bin").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        publish(out, "adapter", broken, role="sft", base="/b", config={})
    # the published artifact is untouched and no temporary directory is left behind
    assert (out / "adapter" / "weights.bin").read_text() == "v1"
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]
