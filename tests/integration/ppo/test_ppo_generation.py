"""Sampling engines (rlhf/generation.py): static and merged sample what HF generate samples.

fp32, tiny model, the policy perturbed away from sft so that a role mix-up would show. For
one seed every engine must draw the same tokens (same fp32 logits, same multinomial calls),
and the rollout logprobs must equal both the logits the engine sampled from and the
training forward (ppo.md test 4) within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.generation import (HFEngine, MergedEngine, StaticEngine, bucket_width, make_engine, resolve_compile,
                             resolve_engine)
from rlhf.generation import encode_prompts, generation_config, left_pad
from rlhf.scoring import response_logprobs, score_rollout


def _perturb_policy(model, seed: int = 7, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if ".policy." in n and "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def _prompts(tok, cfg, n=8, start=0):
    from rlhf.data import load_prompts

    ids = encode_prompts(tok, load_prompts(cfg.prompts)[start:start + n], cfg.max_prompt_length)
    return left_pad(ids, tok.pad_token_id, "cpu")


def _engines(model, tok, cfg, response_length: int):
    stop, pad = tok.eos_token_id, tok.pad_token_id
    gen_cfg = generation_config(cfg, stop, pad)
    gen_cfg.max_new_tokens = response_length
    hf = HFEngine(model, gen_cfg, stop, pad, response_length)
    static = StaticEngine(model, cfg.temperature, stop, pad, response_length, compile=False)
    return hf, static


def _sample(engine, ids, mask, seed):
    torch.manual_seed(seed)
    return engine.sample(ids, mask)


def test_engine_choice():
    assert resolve_engine("auto", "cpu") == "hf" and resolve_engine("auto", "cuda") == "static"
    assert resolve_engine("merged", "cpu") == "merged"
    assert resolve_compile("auto", "cpu") is False and resolve_compile("auto", "cuda") is True
    assert resolve_compile("on", "cpu") is True and resolve_compile("off", "cuda") is False
    with pytest.raises(ValueError, match="ppo.generation"):
        resolve_engine("sglang", "cpu")
    assert resolve_engine("vllm", "cpu") == "vllm"
    assert [bucket_width(w) for w in (1, 64, 65, 200)] == [64, 64, 128, 256]


def test_static_samples_the_hf_tokens_and_logprobs_match_training(role_model):
    model, tok, cfg = role_model
    _perturb_policy(model)
    model.train()  # the engine samples in eval mode and must hand back train mode
    T = 12  # rows stop (the tiny base emits <eos>) at different steps: padding after the stop
    hf, static = _engines(model, tok, cfg, T)
    ids, mask = _prompts(tok, cfg)
    assert (mask == 0).any(), "want left padding"
    seen_logits = []
    draw = static._draw
    static._draw = lambda logits: (seen_logits.append(logits.clone()), draw(logits))[1]
    for seed in (0, 1):
        seen_logits.clear()  # keep the logits of the last sample only
        a, b = _sample(hf, ids, mask, seed), _sample(static, ids, mask, seed)
        assert torch.equal(a.response_ids, b.response_ids), f"seed {seed}"
        assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.has_stop, b.has_stop)
    lengths = b.response_mask.sum(1)
    assert b.has_stop.any() and len(set(lengths.tolist())) > 1, "want stopped rows of different lengths"
    assert model.training and model.active_role == "policy"  # the engine restored mode and role

    # the rollout's logprobs = the logits the static engine sampled from = the training forward
    batch = score_rollout(model, b, cfg, chunk=3)
    m = batch.response_mask.bool()
    steps = torch.stack(seen_logits, dim=1)  # the last sample's logits, (B, steps drawn, V)
    m = m[:, : steps.shape[1]]  # steps after every row stopped were not drawn (all padding)
    assert batch.response_mask[:, steps.shape[1]:].sum() == 0
    sampled_lp = torch.log_softmax(steps.float() / cfg.temperature, -1).gather(-1, b.response_ids[:, : steps.shape[1], None])[..., 0]
    assert (sampled_lp - batch.logprobs[:, : steps.shape[1]])[m].abs().max() < 1e-5
    m = batch.response_mask.bool()
    lp, _ = response_logprobs(model, "policy", batch, cfg.temperature)
    assert lp.requires_grad and (lp.detach() - batch.logprobs)[m].abs().max() < 1e-5
    # sharp: the sft role's logprobs are far from the policy's
    assert (batch.ref_logprobs - batch.logprobs)[m].abs().max() > 1e-2


def test_widths_share_a_bucket_and_a_cache(role_model):
    model, tok, cfg = role_model
    _, static = _engines(model, tok, cfg, 4)
    for start in (0, 8, 16):  # different prompt widths, one bucket
        ids, mask = _prompts(tok, cfg, start=start)
        _sample(static, ids, mask, 0)
    assert len({w for _, w in static.shapes_seen}) == 1 and len(static._caches) == 1


def test_merged_copy_samples_the_policy_and_leaves_the_base_alone(role_model):
    model, tok, cfg = role_model
    T = 12
    stop, pad = tok.eos_token_id, tok.pad_token_id
    base_before = {k: v.clone() for k, v in model.base_lm.state_dict().items() if "lora_" not in k}
    merged = MergedEngine(model, cfg.temperature, stop, pad, T, compile=False)
    _, static = _engines(model, tok, cfg, T)
    ids, mask = _prompts(tok, cfg)
    for round_ in range(2):  # the second round follows a policy change: the copy must follow
        a, b = _sample(static, ids, mask, round_), _sample(merged, ids, mask, round_)
        assert torch.equal(a.response_ids, b.response_ids), f"round {round_}"
        _perturb_policy(model, seed=round_ + 3, scale=0.2)
    after = model.base_lm.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # never merged in place


def test_stage_setup_builds_the_configured_engine(ppo_config):
    from rlhf.stages.ppo import setup

    assert type(setup(ppo_config()).engine) is HFEngine  # auto on a CPU
    s = setup(ppo_config(generation="static"))
    assert type(s.engine) is StaticEngine and s.engine.compile is False
    assert type(make_engine("merged", s.model, s.gen_cfg, temperature=0.7, stop_ids=s.stop_ids, pad_id=s.pad_id,
                            response_length=4)) is MergedEngine


@pytest.mark.slow
def test_compiled_static_engine_samples_the_hf_tokens(role_model):
    """torch.compile on a CPU (needs a C compiler; a minute or more on 2 cores)."""
    model, tok, cfg = role_model
    _perturb_policy(model)
    hf, _ = _engines(model, tok, cfg, 8)
    compiled = StaticEngine(model, cfg.temperature, tok.eos_token_id, tok.pad_token_id, 8, compile=True)
    ids, mask = _prompts(tok, cfg)
    a, b = _sample(hf, ids, mask, 0), _sample(compiled, ids, mask, 0)
    assert torch.equal(a.response_ids, b.response_ids)


def test_engines_stop_at_any_of_several_stop_tokens(role_model):
    """A stop list (Qwen2.5 ships two EOS ids): the static engine stops a row at the first of
    any stop token, exactly where HF generate stops it."""
    model, tok, cfg = role_model
    _perturb_policy(model)
    T = 12
    ids, mask = _prompts(tok, cfg)
    hf, _ = _engines(model, tok, cfg, T)
    first = _sample(hf, ids, mask, 0)
    row = int(first.response_mask.sum(1).argmax())  # the longest row: its token 2 is not a stop
    other = int(first.response_ids[row, 1])
    assert other != tok.eos_token_id
    stops = [tok.eos_token_id, other]
    gen_cfg = generation_config(cfg, stops, tok.pad_token_id)
    gen_cfg.max_new_tokens = T
    hf2 = HFEngine(model, gen_cfg, stops, tok.pad_token_id, T)
    static2 = StaticEngine(model, cfg.temperature, stops, tok.pad_token_id, T, compile=False)
    a, b = _sample(hf2, ids, mask, 0), _sample(static2, ids, mask, 0)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.has_stop, b.has_stop)
    # the row stops at the second stop token, at the latest at position 2
    assert b.has_stop[row] and b.response_mask[row].sum() <= 2
    assert int(b.response_ids[row, int(b.response_mask[row].sum()) - 1]) in stops


def test_static_engine_ends_the_loop_once_every_row_hit_any_stop_token(role_model):
    """The decode loop ends at the first check after every row stopped, whichever of the
    stop tokens each row drew (here every row stops at its first token)."""
    model, tok, cfg = role_model
    T = 12
    ids, mask = _prompts(tok, cfg)
    hf, _ = _engines(model, tok, cfg, T)
    first = _sample(hf, ids, mask, 0)
    stops = sorted({tok.eos_token_id, *first.response_ids[:, 0].tolist()})
    static = StaticEngine(model, cfg.temperature, stops, tok.pad_token_id, T, compile=False, stop_check_every=4)
    draws = []
    draw = static._draw
    static._draw = lambda logits: (draws.append(1), draw(logits))[1]
    b = _sample(static, ids, mask, 0)
    assert b.has_stop.all() and (b.response_mask.sum(1) == 1).all()
    assert len(draws) == 4  # the first check, not the length limit
