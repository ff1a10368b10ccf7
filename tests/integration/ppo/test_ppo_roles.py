"""Role switching (rlhf.adapters.RoleModel.activate/role) in constant time, and correct.

Work per switch is counted as Python function calls (sys.setprofile) and must be the same
for a 2-layer and a 16-layer model; peft's set_adapter walks every module (the old switch
cost 35 ms at 24 layers and 104 ms at 64). Each role must still compute its own function,
checked against peft's mixed-adapter batches (an independent path through the adapters).
"""

from __future__ import annotations

import sys

import pytest
import torch

from rlhf.adapters import ROLES, RoleModel


def _role_model(tmp_path, layers: int, sft: bool) -> RoleModel:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.adapters import linear_target_modules, save_head

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dirs = {}
    for i, name in enumerate(("sft", "reward")):
        base = LlamaForCausalLM(cfg)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=linear_target_modules(base), task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lora)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        out = tmp_path / f"{name}-{layers}"
        peft_model.save_pretrained(str(out))
        save_head(torch.nn.Linear(32, 1), out)
        dirs[name] = str(out)
    torch.manual_seed(0)
    model = RoleModel(LlamaForCausalLM(cfg), dirs["sft"] if sft else None, dirs["reward"],
                      policy_lora={"r": 4, "lora_alpha": 8, "target_modules": None})
    model.eval()
    return model


def _calls_per_switch(model: RoleModel) -> int:
    calls = 0

    def prof(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(prof)
    try:
        for role in ROLES:
            model.activate(role)
        with model.role("reward"):
            pass
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("sft", [True, False], ids=["sft-adapter", "full-sft-base"])
def test_switch_work_does_not_grow_with_depth(tmp_path, sft):
    shallow, deep = _role_model(tmp_path, 2, sft), _role_model(tmp_path, 16, sft)
    assert len(deep._lora_layers) == 8 * len(shallow._lora_layers)
    assert _calls_per_switch(shallow) == _calls_per_switch(deep) < 150  # 6 switches


@pytest.mark.parametrize("sft", [True, False], ids=["sft-adapter", "full-sft-base"])
def test_each_role_computes_its_adapter(tmp_path, sft):
    model = _role_model(tmp_path, 2, sft)
    with torch.no_grad():  # policy != sft
        for n, p in model.peft.named_parameters():
            if ".policy." in n and "lora_" in n:
                p.add_(0.1)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    hooks = model.peft.base_model._enable_peft_forward_hooks
    outs = {}
    for role in ("policy", "sft", "reward", "value", "policy"):  # switch back and forth
        model.activate(role)
        got = model.hidden_states(ids, mask)
        with hooks(adapter_names=[model.adapter_name(role)] * 2):
            want = model.hidden_states(ids, mask)
        assert torch.allclose(got, want, atol=1e-6), role
        outs[role] = got
    assert not torch.allclose(outs["policy"], outs["sft"], atol=1e-3)
    assert not torch.allclose(outs["sft"], outs["reward"], atol=1e-3)
    # trainable flags do not depend on the active role
    for role in ROLES:
        model.activate(role)
        for n, p in model.peft.named_parameters():
            if "lora_" in n:
                assert p.requires_grad == any(f".{r}." in n for r in ("policy", "value")), n
    if not sft:  # the sft role of a full-SFT base is the base itself
        # (peft's disable_adapter resets trainable flags on exit: used here as the reference only)
        with model.peft.disable_adapter():
            assert torch.allclose(outs["sft"], model.hidden_states(ids, mask), atol=1e-6)
