"""A full-weight policy on the vllm engine: a plain causal LM (no LoRA roles) is loaded into the
running engine at every rollout (vLLM's ``reload_weights``), so after an update the engine
samples the updated weights, not the ones it started from (the tiny Llama, 2 heads of 32, fp32).
"""

from __future__ import annotations

import torch

T = 12  # response tokens
TEMPERATURE = 0.7


def _trainer_logprobs(lm, sampled) -> torch.Tensor:
    """(B, T) the LM's logprobs of the sampled tokens at ``TEMPERATURE``, row by row without
    padding (0 after the stop), the quantity vLLM reports as ``processed_logprobs``."""
    out = torch.zeros_like(sampled.response_mask)
    with torch.no_grad():
        for i in range(sampled.response_ids.shape[0]):
            prompt = sampled.prompt_ids[i][sampled.prompt_mask[i].bool()]
            n = int(sampled.response_mask[i].sum())
            resp = sampled.response_ids[i, :n]
            logits = lm(torch.cat([prompt, resp])[None]).logits[0, len(prompt) - 1:len(prompt) - 1 + n].float()
            out[i, :n] = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, resp[:, None])[:, 0]
    return out


def test_full_weight_policy_is_loaded_into_the_engine_every_rollout(ppo_assets):
    from rlhf.config import PPOConfig
    from rlhf.data import load_prompts
    from rlhf.generation import encode_prompts, left_pad
    from rlhf.generation_vllm import VLLMEngine
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(ppo_assets.base))
    lm = load_causal_lm(str(ppo_assets.base), tok, dtype="float32").eval()
    cfg = PPOConfig()
    ids, mask = left_pad(encode_prompts(tok, load_prompts(str(ppo_assets.prompts))[:8], cfg.max_prompt_length),
                         tok.pad_token_id, "cpu")
    engine = VLLMEngine(lm, str(ppo_assets.base), temperature=TEMPERATURE, stop_ids=[tok.eos_token_id],
                        pad_id=tok.pad_token_id, response_length=T, max_prompt_length=cfg.max_prompt_length,
                        max_num_seqs=8, dtype=torch.float32)

    torch.manual_seed(0)
    first = engine.sample(ids, mask)
    real = first.response_mask.bool()
    assert (_trainer_logprobs(lm, first) - first.sampler_logprobs)[real].abs().max() < 1e-3

    # an update of every weight (embeddings, attention, MLP, norms): a large step, so that the
    # old and the new policy give clearly different logprobs
    old = {n: t.clone() for n, t in lm.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    torch.manual_seed(1)
    second = engine.sample(ids, mask)
    real = second.response_mask.bool()
    to_new = (_trainer_logprobs(lm, second) - second.sampler_logprobs)[real].abs()
    now = {n: t.clone() for n, t in lm.state_dict().items()}
    lm.load_state_dict(old)
    to_old = (_trainer_logprobs(lm, second) - second.sampler_logprobs)[real].abs()
    lm.load_state_dict(now)
    assert to_new.max() < 1e-3, float(to_new.max())
    assert to_old.mean() > 50 * to_new.mean() and to_old.max() > 1e-2, (float(to_old.mean()), float(to_new.mean()))
