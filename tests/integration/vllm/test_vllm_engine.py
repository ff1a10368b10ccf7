"""The vllm engine against the hf engine on the tiny Llama (2 layers, 2 heads of 32), fp32."""

from __future__ import annotations

import pytest
import torch

from rlhf.stages.ppo import encode_prompts, generation_config, left_pad


def _prompts(tok, cfg, n=8, start=0):
    from rlhf.data import load_prompts

    ids = encode_prompts(tok, load_prompts(cfg.prompts)[start:start + n], cfg.max_prompt_length)
    return left_pad(ids, tok.pad_token_id, "cpu")


def _perturb_policy(model, seed: int = 7, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if ".policy." in n and "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _vllm(model, cfg, tok, temperature, stop_ids=None, response_length=None):
    from rlhf.generation_vllm import VLLMEngine

    return VLLMEngine(model, cfg.model.name_or_path, temperature=temperature,
                      stop_ids=stop_ids if stop_ids is not None else [tok.eos_token_id], pad_id=tok.pad_token_id,
                      response_length=response_length or cfg.response_length, max_prompt_length=cfg.max_prompt_length,
                      max_num_seqs=16, dtype=torch.float32, lora_rank=cfg.lora.r)


def _hf_greedy(model, tok, cfg, stop_ids, response_length):
    from rlhf.generation import HFEngine

    gen_cfg = generation_config(cfg, stop_ids, tok.pad_token_id)
    gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p = False, None, None, None
    gen_cfg.max_new_tokens = response_length
    return HFEngine(model, gen_cfg, stop_ids, tok.pad_token_id, response_length)


def test_greedy_vllm_tokens_equal_hf_tokens_with_the_policy_lora(role_model):
    model, tok, cfg = role_model
    _perturb_policy(model)  # the policy differs from sft: sampling the wrong adapter would show
    ids, mask = _prompts(tok, cfg, n=8)
    T = 12
    hf = _hf_greedy(model, tok, cfg, [tok.eos_token_id], T).sample(ids, mask)
    engine = _vllm(model, cfg, tok, temperature=0.0, response_length=T)
    out = engine.sample(ids, mask)
    assert torch.equal(out.response_ids, hf.response_ids)
    assert torch.equal(out.response_mask, hf.response_mask)
    assert torch.equal(out.has_stop, hf.has_stop)
