"""Sampling in PPO: only the PPO config decides how responses are sampled (nothing leaks
from the model's generation_config.json), the temperature is 0.7 by default, responses
are cut at the configured stop token, and a missing stop token costs the set penalty."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from rlhf.config import PPOConfig
from rlhf.ppo.rollout import Sampled
from rlhf.generation import encode_prompts, generate, generation_config, left_pad, stop_token_ids
from rlhf.scoring import score_rollout
from rlhf.stages.ppo import _build_model, shaped_rewards

# Everything a checkpoint's generation_config.json can say that would change sampling.
LEAKY = dict(do_sample=False, top_k=1, top_p=0.1, min_p=0.9, temperature=0.01, typical_p=0.2,
             epsilon_cutoff=0.1, repetition_penalty=5.0, no_repeat_ngram_size=1, min_length=200,
             min_new_tokens=4, suppress_tokens=[1], bad_words_ids=[[10]])


@pytest.fixture
def leaky_model(ppo_assets, ppo_config, tmp_path):
    """The PPO model on a copy of the base whose generation_config.json is greedy-ish.

    The copy's final norm is scaled up (logits x 4): the briefly pretrained base predicts
    nearly uniform words, under which every temperature samples alike."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "leaky_base"
    shutil.copytree(ppo_assets.base, base)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 4.0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    gc_path = base / "generation_config.json"
    gc_path.write_text(json.dumps({**json.loads(gc_path.read_text()), **LEAKY}))
    cfg = ppo_config(model={"name_or_path": str(base)}, response_length=4)
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    assert model.base_lm.generation_config.top_k == 1  # the premise
    return model, tok, cfg


def _prompt_batch(tok, cfg, n: int):
    ids = encode_prompts(tok, [[{"role": "user", "content": "write a note about cats"}]] * n, cfg.max_prompt_length)
    return left_pad(ids, tok.pad_token_id, "cpu")


def test_model_generation_config_does_not_leak(leaky_model):
    model, tok, cfg = leaky_model
    ids, mask = _prompt_batch(tok, cfg, 16)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    batch = generate(model, ids, mask, generation_config(cfg, eos, pad), eos, pad, cfg.response_length)
    distinct = {tuple(r.tolist()) for r in batch.response_ids}
    assert len(distinct) >= 8  # sampling, not greedy / top_k=1 / min_p=0.9
    assert batch.has_stop.any()  # suppress_tokens / min_length would forbid <eos>
    # control: the model's own defaults, had they leaked, give one response for all rows
    with model.role("policy"):
        greedy = model.base_lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert len({tuple(r.tolist()) for r in greedy[:, ids.shape[1]:]}) == 1


def test_sampling_temperature_is_0_7_by_default(leaky_model):
    """The first sampled token follows softmax(logits / 0.7): the mean log-likelihood
    ratio log p_0.7(x) - log p_1(x) of the samples is near its expectation under T = 0.7
    (and far from its expectation under T = 1)."""
    model, tok, cfg = leaky_model
    assert PPOConfig().temperature == 0.7 and cfg.temperature == 0.7
    gen_cfg = generation_config(cfg, tok.eos_token_id, tok.pad_token_id)
    assert (gen_cfg.temperature, gen_cfg.top_k, gen_cfg.top_p) == (0.7, 0, 1.0)

    n = 2048
    ids, mask = _prompt_batch(tok, cfg, n)
    torch.manual_seed(1)
    batch = generate(model, ids, mask, gen_cfg, tok.eos_token_id, tok.pad_token_id, 1)
    with torch.no_grad(), model.role("policy"):
        logits = model.lm_logits(model.hidden_states(ids[:1], mask[:1]))[0, -1]
    lp07, lp1 = torch.log_softmax(logits / 0.7, -1), torch.log_softmax(logits, -1)
    llr = (lp07 - lp1)[batch.response_ids[:, 0]]
    expect07 = float((lp07.exp() * (lp07 - lp1)).sum())
    expect1 = float((lp1.exp() * (lp07 - lp1)).sum())
    se = float(llr.std()) / n ** 0.5
    assert expect07 - expect1 > 10 * se, "the test base is too flat to tell temperatures apart"
    assert abs(float(llr.mean()) - expect07) < 4 * se


def test_responses_stop_at_the_configured_stop_token(role_model, ppo_config):
    """With ``stop_token`` set, truncation and has_stop use that token, not EOS."""
    model, tok, _ = role_model
    with pytest.raises(ValueError, match="stop_token"):
        stop_token_ids(tok, ppo_config(stop_token="not-a-token"))
    cfg = ppo_config(stop_token="the", response_length=8)
    (stop,) = stop_token_ids(tok, cfg)
    assert stop == tok.convert_tokens_to_ids("the") != tok.eos_token_id
    ids, mask = _prompt_batch(tok, cfg, 32)
    torch.manual_seed(0)
    batch = generate(model, ids, mask, generation_config(cfg, stop, tok.pad_token_id), stop, tok.pad_token_id, 8)
    assert batch.has_stop.any() and not batch.has_stop.all()
    for row, m, has in zip(batch.response_ids.tolist(), batch.response_mask, batch.has_stop):
        n = int(m.sum())
        assert bool(has) == (stop in row)
        if has:
            assert row.index(stop) == n - 1 and set(row[n:]) <= {tok.pad_token_id}
        else:
            assert n == 8


@pytest.mark.parametrize("mode, value", [("replace", -1.0), ("subtract", 0.5), ("none", 0.0)])
def test_missing_stop_token_penalty(mode, value, role_model):
    """Rows cut at the length limit get the configured penalty on their score (and so on
    their last token's reward); rows that stopped keep the reward model's score."""
    model, tok, cfg = role_model
    cfg = replace(cfg, missing_stop_penalty=mode, missing_stop_value=value, response_length=4)
    ids, mask = _prompt_batch(tok, cfg, 2)
    words = [tok.convert_tokens_to_ids(w) for w in ("warm", "kind", "calm", "soft")]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    responses = torch.tensor([[words[0], words[1], eos, pad], words])
    resp_mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    batch = score_rollout(model, Sampled(ids, mask, responses, resp_mask, torch.tensor([True, False])), cfg, 2)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    raw = batch.scores
    expected_missing = {"replace": torch.tensor(-1.0), "subtract": raw[1] - 0.5, "none": raw[1]}[mode]
    assert scores[0] == raw[0]
    assert scores[1] == pytest.approx(float(expected_missing), abs=1e-6)
    assert rewards[1, 3] == pytest.approx(float(expected_missing), abs=1e-6)  # KL is 0 at step 0
    assert rewards[0, 2] == pytest.approx(float(raw[0]), abs=1e-6)
