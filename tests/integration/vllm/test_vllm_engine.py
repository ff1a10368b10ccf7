"""The vllm engine against the trainer on the tiny Llama (2 layers, 2 heads of 32), fp32.

One engine serves the whole module (starting one costs seconds of the suite's budget); each
test points it at its own role model and sampling settings.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf.estimators import advantages_and_returns
from rlhf.generation import encode_prompts, generation_config, left_pad
from rlhf.scoring import score_rollout
from rlhf.stages.ppo import _ppo_update, shaped_rewards

T = 12  # response tokens of these tests


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


@pytest.fixture(scope="module")
def engine(ppo_assets):
    from rlhf.config import PPOConfig
    from rlhf.generation_vllm import VLLMEngine

    cfg = PPOConfig()
    return VLLMEngine(None, str(ppo_assets.base), temperature=0.0, stop_ids=[0], pad_id=0, response_length=T,
                      max_prompt_length=cfg.max_prompt_length, max_num_seqs=16, dtype=torch.float32,
                      lora_rank=cfg.lora.r)


def _use(engine, model, tok, temperature: float, stop_ids: list[int] | None = None):
    engine.model, engine.temperature = model, temperature
    engine.stop_ids, engine.pad_id = stop_ids or [tok.eos_token_id], tok.pad_token_id
    return engine


def _hf_greedy(model, tok, cfg, stop_ids):
    from rlhf.generation import HFEngine

    gen_cfg = generation_config(cfg, stop_ids, tok.pad_token_id)
    gen_cfg.do_sample, gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p = False, None, None, None
    gen_cfg.max_new_tokens = T
    return HFEngine(model, gen_cfg, stop_ids, tok.pad_token_id, T)


def test_greedy_vllm_tokens_equal_hf_tokens_with_the_policy_lora(engine, role_model):
    model, tok, cfg = role_model
    _perturb_policy(model)  # the policy differs from sft: sampling the wrong adapter would show
    ids, mask = _prompts(tok, cfg, n=8)
    hf = _hf_greedy(model, tok, cfg, [tok.eos_token_id]).sample(ids, mask)
    out = _use(engine, model, tok, 0.0).sample(ids, mask)
    assert torch.equal(out.response_ids, hf.response_ids)
    assert torch.equal(out.response_mask, hf.response_mask)
    assert torch.equal(out.has_stop, hf.has_stop)
    assert 0 < int(hf.has_stop.sum()) < 8 or int(hf.response_mask.sum()) < 8 * T  # stops occur: the test sees them


def test_stop_lists_and_eos_like_hf(engine, role_model):
    """A stop list of two tokens ends a response at either; EOS outside the list does not stop
    it (the list is the authority, as for HF generate with eos_token_id = the list)."""
    model, tok, cfg = role_model
    _perturb_policy(model, seed=3)
    ids, mask = _prompts(tok, cfg, n=8, start=8)
    free = _hf_greedy(model, tok, cfg, [tok.pad_token_id + 10_000]).sample(ids, mask)  # a stop that never occurs
    # two tokens the greedy responses write somewhere after their first token
    seen = [t for t in free.response_ids[:, 1:].flatten().tolist() if t not in (tok.eos_token_id, tok.pad_token_id)]
    stops = sorted(set(seen), key=seen.index)[:2]
    assert len(stops) == 2
    for stop_ids in (stops, [stops[0], tok.eos_token_id], [stops[1]]):
        hf = _hf_greedy(model, tok, cfg, stop_ids).sample(ids, mask)
        out = _use(engine, model, tok, 0.0, stop_ids).sample(ids, mask)
        assert torch.equal(out.response_ids, hf.response_ids), stop_ids
        assert torch.equal(out.has_stop, hf.has_stop), stop_ids
    assert tok.eos_token_id not in [stops[1]] and bool(out.has_stop.any())


def _policy_state(model):
    return {n: p.detach().clone() for n, p in model.peft.named_parameters() if ".policy." in n}


def _logprobs_with(model, state, batch, cfg):
    """Trainer logprobs of ``batch`` with the policy LoRA set to ``state`` (then restored)."""
    params = dict(model.peft.named_parameters())
    now = _policy_state(model)
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)
        lp = score_rollout(model, batch, cfg, chunk=8).logprobs
        for n, v in now.items():
            params[n].copy_(v)
    return lp


def test_after_an_update_vllm_samples_the_updated_policy(engine, role_model):
    """Sample, update the policy (a large step), sample again: vLLM's logprobs of the new
    tokens are the trainer's current policy's (fp32 tolerance), far from the old policy's.
    The reference and reward roles and the base weights stay exactly as they were."""
    model, tok, cfg = role_model
    cfg = replace(cfg, response_length=T, learning_rate=0.5, num_ppo_epochs=2, num_mini_batches=1, per_device_train_batch_size=8)
    frozen = {n: p.detach().clone() for n, p in model.peft.named_parameters() if ".policy." not in n and ".value." not in n}
    frozen |= {f"head.{r}.{n}": p.detach().clone() for r, h in model.heads.items() if r != "value" for n, p in h.named_parameters()}
    eng = _use(engine, model, tok, cfg.temperature)
    ids, mask = _prompts(tok, cfg, n=8)

    torch.manual_seed(0)
    first = score_rollout(model, eng.sample(ids, mask), cfg, chunk=8)
    real = first.response_mask.bool()
    assert (first.logprobs - first.sampler_logprobs)[real].abs().max() < 1e-3

    old = _policy_state(model)
    scores, kl, rewards = shaped_rewards(first, cfg, 0.05)
    adv, returns = advantages_and_returns(first, rewards, scores, kl, cfg, 0.05, None)
    opt = torch.optim.SGD(model.trainable_parameters("policy") + model.trainable_parameters("value"), lr=cfg.learning_rate)
    _ppo_update(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), first, adv, returns, cfg, 0.05, 0)

    torch.manual_seed(1)
    second = eng.sample(ids, mask)
    real = second.response_mask.bool()
    new_lp = score_rollout(model, second, cfg, chunk=8).logprobs
    old_lp = _logprobs_with(model, old, second, cfg)
    to_new = (new_lp - second.sampler_logprobs)[real].abs()
    to_old = (old_lp - second.sampler_logprobs)[real].abs()
    assert to_new.max() < 1e-3, float(to_new.max())
    assert to_old.mean() > 50 * to_new.mean() and to_old.max() > 1e-2, (float(to_old.mean()), float(to_new.mean()))

    after = {n: p for n, p in model.peft.named_parameters() if n in frozen}
    after |= {f"head.{r}.{n}": p for r, h in model.heads.items() if r != "value" for n, p in h.named_parameters()}
    assert after.keys() == frozen.keys()
    for n, v in frozen.items():
        assert torch.equal(after[n], v), n


def test_ppo_run_on_vllm(engine, ppo_config):
    """A PPO run with ``ppo.generation: vllm`` (its own engine, sized from the config): every
    rollout logs the sampler/trainer gap, small in fp32, and the policy is published."""
    import json
    from pathlib import Path

    from rlhf.stages.ppo import run_ppo

    cfg = ppo_config(generation="vllm", total_episodes=8, rollout_batch_size=4, response_length=6, rollout_is_cap=2.0)
    result = run_ppo(cfg)
    assert result.finished and (Path(cfg.output_dir) / "policy" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/logprob_diff_max" in r]
    assert len(rows) == 2
    for r in rows:
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1e-3, r
        assert r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_rlhf_generate_with_vllm_equals_hf(engine, role_model, tmp_path):
    """``rlhf generate --engine vllm`` of a published policy adapter: greedy, the same texts as
    the hf path (base folder + the adapter folder as a LoRA)."""
    from peft import PeftModel

    from rlhf.data import load_prompts
    from rlhf.generate import Policy, sample
    from rlhf.models import load_causal_lm

    model, tok, cfg = role_model
    _perturb_policy(model, seed=11)
    adapter = tmp_path / "policy"
    model.save_role("policy", adapter)
    base = cfg.model.name_or_path
    policy = Policy(PeftModel.from_pretrained(load_causal_lm(base, tok), str(adapter)).eval(), tok, str(adapter), base,
                    adapter)
    prompts = load_prompts(cfg.prompts)[:6]
    hf = sample(policy, prompts, max_new_tokens=10, temperature=0.0)
    vl = sample(policy, prompts, max_new_tokens=10, temperature=0.0, engine="vllm")
    assert vl == hf and any(hf)


def test_dpo_evaluation_on_vllm(ppo_assets, tmp_path):
    """DPO's evaluation with ``dpo.eval_generation: vllm`` runs PPO's evaluate on the vllm
    engine (smoke: the SFT adapter stands in for the DPO adapter, so KL to SFT is 0)."""
    from rlhf.config import DPOConfig, from_dict
    from rlhf.evaluation import evaluate_against_sft

    cfg = from_dict(DPOConfig, dict(model={"name_or_path": str(ppo_assets.base)}, sft_adapter=str(ppo_assets.sft_adapter),
                                    reward_adapter=str(ppo_assets.reward_adapter), eval_prompts=str(ppo_assets.eval_prompts),
                                    eval_response_length=6, eval_batch_size=4, eval_generation="vllm",
                                    output_dir=str(tmp_path / "dpo")))
    sft, dpo, _ = evaluate_against_sft(cfg, str(ppo_assets.sft_adapter), None)
    assert dpo["eval/kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert sft["eval/length_mean"] > 0 and dpo["eval/win_rate_mean"] == pytest.approx(0.5)
