"""PPO on the tiny model: the numbers the loop relies on are the numbers it computes.

Logprob consistency, the frozen reference, the critic init, reward placement at model level
and no dropout, all in fp32 on one base with LoRA roles.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf.estimators import advantages_and_returns
from rlhf import ppo as F
from rlhf.ppo.rollout import Sampled, ScoredRollout
from rlhf.generation import generation_config
from rlhf.scoring import last_token_scores, response_logprobs, response_values, score_rollout
from rlhf.stages.ppo import _ppo_update, shaped_rewards


def _optimizer(model, cfg):
    params = model.trainable_parameters("policy") + model.trainable_parameters("value")
    opt = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _update(model, batch, cfg, update: int = 0, beta: float = 0.05):
    """One rollout's PPO update through the stage's own functions."""
    opt, sched = _optimizer(model, cfg)
    scores, kl, rewards = shaped_rewards(batch, cfg, beta)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, beta, None)
    return _ppo_update(model, opt, sched, batch, adv, returns, cfg, beta, update)


def _trim(batch: ScoredRollout, i: int) -> Sampled:
    """Row ``i`` alone, without any padding: its real prompt and its real response tokens."""
    p = batch.prompt_mask[i].bool()
    n = int(batch.response_mask[i].sum())
    return Sampled(batch.prompt_ids[i:i + 1, p], batch.prompt_mask[i:i + 1, p],
                   batch.response_ids[i:i + 1, :n], batch.response_mask[i:i + 1, :n], batch.has_stop[i:i + 1])


def _padded_rows(batch: ScoredRollout) -> list[int]:
    """Rows with left padding in the prompt and right padding after the stop token."""
    rows = [i for i in range(batch.prompt_ids.shape[0])
            if (batch.prompt_mask[i] == 0).any() and (batch.response_mask[i] == 0).any()]
    assert rows, "the rollout should contain rows padded on both sides"
    return rows


def _perturb(model, role: str, scale: float = 0.05, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if f".{role}." in n and "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


# --------------------------------------------------------------------------- test 4


def test_rollout_logprobs_match_sampling_and_training_forward(role_model):
    """Logprobs stored at rollout time equal (a) log_softmax(logits / T) of the very logits
    generate() sampled from, and (b) the training forward's logprobs, within 1e-5."""
    from rlhf.data import load_prompts
    from rlhf.generation import encode_prompts, left_pad

    model, tok, cfg = role_model
    _perturb(model, "policy")  # policy != sft, so a mix-up of the two roles would show
    ids = encode_prompts(tok, load_prompts(cfg.prompts)[:8], cfg.max_prompt_length)
    prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id, "cpu")
    gen_cfg = generation_config(cfg, tok.eos_token_id, tok.pad_token_id)
    gen_cfg.return_dict_in_generate, gen_cfg.output_logits = True, True
    torch.manual_seed(0)
    with model.role("policy"):
        out = model.base_lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    P = prompt_ids.shape[1]
    resp = out.sequences[:, P:]
    T = resp.shape[1]
    assert T <= cfg.response_length
    ids_, mask, has_stop = F.first_stop_truncate(resp, tok.eos_token_id, tok.pad_token_id)
    batch = score_rollout(model, Sampled(prompt_ids, prompt_mask, ids_, mask.float(), has_stop), cfg, chunk=3)
    m = batch.response_mask.bool()
    assert (~m).any() and (prompt_mask == 0).any(), "want padding on both sides"

    sampled_from = torch.log_softmax(torch.stack(out.logits, dim=1).float() / cfg.temperature, dim=-1)
    sampled_lp = sampled_from.gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    assert (sampled_lp - batch.logprobs)[m].abs().max() < 1e-5

    model.train()  # the update's mode, with grad
    lp, _ = response_logprobs(model, "policy", batch, cfg.temperature)
    assert lp.requires_grad
    assert (lp.detach() - batch.logprobs)[m].abs().max() < 1e-5
    # the comparison is sharp: another temperature or the reference role is far off
    lp_t1, _ = response_logprobs(model, "policy", batch, 1.0)
    assert (lp_t1.detach() - batch.logprobs)[m].abs().max() > 1e-2
    assert (batch.ref_logprobs - batch.logprobs)[m].abs().max() > 1e-2


def test_first_minibatch_of_first_epoch_is_on_policy(role_model, make_rollout, monkeypatch):
    """The first minibatch of the first epoch sees ratio == 1, clipfrac == 0, approxkl ~ 0;
    later minibatches (after optimizer steps) do not, so the check is not vacuous."""
    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=2, num_mini_batches=2, per_device_train_batch_size=2, learning_rate=1e-2)
    batch = make_rollout(model, tok, cfg)
    calls = _spy_policy_loss(monkeypatch)
    stats = _update(model, batch, cfg)
    assert stats["optimizer_steps"] == 4.0
    assert len(calls) == 8  # 2 epochs x 2 minibatches x 2 micro-batches
    for c in calls[:2]:  # the two micro-batches of the first minibatch
        assert c["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert c["clipfrac"] == 0.0
        assert c["approxkl"] < 1e-12
    assert max(abs(c["ratio_mean"] - 1.0) for c in calls[2:]) > 1e-4
    assert max(c["approxkl"] for c in calls[2:]) > 1e-8


def _spy_policy_loss(monkeypatch) -> list[dict]:
    """Record the statistics of every policy_loss call the update makes."""
    calls: list[dict] = []
    original = F.policy_loss

    def spy(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls.append({k: float(v) for k, v in stats.items()})
        return loss, stats

    monkeypatch.setattr(F, "policy_loss", spy)
    return calls


def test_left_padding_does_not_change_logprobs_values_or_scores(role_model, make_rollout):
    """A row padded among longer prompts (left) and shorter responses (right) gets the same
    logprobs, values and reward score as the same sequence alone without any padding."""
    model, tok, cfg = role_model
    _perturb(model, "policy")
    _perturb(model, "value", seed=8)
    batch = make_rollout(model, tok, cfg)
    for i in _padded_rows(batch):
        alone = score_rollout(model, _trim(batch, i), cfg, chunk=1)
        n = alone.response_ids.shape[1]
        for key in ("logprobs", "ref_logprobs", "entropy", "values"):
            got, want = getattr(batch, key)[i, :n], getattr(alone, key)[0]
            assert (got - want).abs().max() < 1e-5, (key, i)
        assert (batch.scores[i] - alone.scores[0]).abs() < 1e-5


# --------------------------------------------------------------------------- test 5


def test_reference_is_frozen_and_kl_starts_at_zero(role_model, make_rollout):
    """Policy updates never move the sft role (the reference) nor the reward role; the
    policy does move. At step 0 the policy is a copy of sft: KL is exactly 0."""
    model, tok, cfg = role_model
    cfg = replace(cfg, num_ppo_epochs=2, learning_rate=1e-2)
    batch = make_rollout(model, tok, cfg)
    assert torch.equal(batch.logprobs, batch.ref_logprobs)
    _, kl, _ = shaped_rewards(batch, cfg, 0.05)
    assert torch.count_nonzero(kl) == 0

    def logits(role):
        with torch.no_grad(), model.role(role):
            return model.lm_logits(model.hidden_states(batch.input_ids, batch.attention_mask))

    sft0, policy0 = logits("sft"), logits("policy")
    scores0 = last_token_scores(model, "reward", batch).detach()
    for update in range(2):
        _update(model, make_rollout(model, tok, cfg, seed=update), cfg, update=update)
    assert torch.equal(logits("sft"), sft0)
    assert torch.equal(last_token_scores(model, "reward", batch).detach(), scores0)
    assert (logits("policy") - policy0).abs().max() > 1e-3
    after = make_rollout(model, tok, cfg, seed=99)
    assert (after.logprobs - after.ref_logprobs).abs().max() > 1e-4


# --------------------------------------------------------------------------- test 6


def test_critic_starts_as_the_reward_model(role_model, make_rollout):
    """At step 0 the value role + value head on the hidden state of the last real token
    gives the reward model's score (1e-5); in fact the critic equals the reward model at
    every position. Training moves the value head, never the reward head."""
    model, tok, cfg = role_model
    batch = make_rollout(model, tok, cfg)
    with torch.no_grad():
        value_at_last = last_token_scores(model, "value", batch)
        assert (value_at_last - batch.scores).abs().max() < 1e-5
        P, T = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        with model.role("reward"):
            hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
        reward_everywhere = model.values("reward", hidden[:, P - 1:P - 1 + T])
        assert (response_values(model, batch) - reward_everywhere).abs().max() < 1e-5
        assert (batch.values - reward_everywhere).abs().max() < 1e-5
    reward_head = model.heads["reward"].weight.detach().clone()
    value_head = model.heads["value"].weight.detach().clone()
    _update(model, batch, replace(cfg, learning_rate=1e-2))
    assert torch.equal(model.heads["reward"].weight, reward_head)
    assert not torch.equal(model.heads["value"].weight, value_head)


# --------------------------------------------------------------------------- test 7


def test_score_lands_on_last_real_token(role_model, make_rollout):
    """[a, b, EOS, PAD, PAD]: the reward model's score is its head on the hidden state of
    EOS (a manual forward of the unpadded sequence), not of the pad after it; the shaped
    reward puts it on index 2 and the KL is 0 on the pads."""
    model, tok, cfg = role_model
    _perturb(model, "policy")  # non-zero KL on real tokens
    batch = make_rollout(model, tok, cfg)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    for i in _padded_rows(batch):
        seq = _trim(batch, i)
        with torch.no_grad(), model.role("reward"):
            hidden = model.hidden_states(seq.input_ids, seq.attention_mask)
            manual = model.values("reward", hidden[0, -1])
            # one position late (the first pad) is a different number: the check is sharp
            late_ids = torch.cat([seq.input_ids, torch.tensor([[tok.pad_token_id]])], dim=1)
            late = model.values("reward", model.hidden_states(late_ids, torch.ones_like(late_ids))[0, -1])
        assert (batch.scores[i] - manual).abs() < 1e-5
        assert (late - manual).abs() > 1e-3
        n = seq.response_ids.shape[1]
        assert torch.count_nonzero(kl[i, n:]) == 0 and torch.count_nonzero(rewards[i, n:]) == 0
        assert kl[i, :n].abs().sum() > 0
        expected_last = scores[i] - 0.05 * kl[i, n - 1]
        assert rewards[i, n - 1] == pytest.approx(float(expected_last), abs=1e-6)
        assert torch.allclose(rewards[i, :n - 1], -0.05 * kl[i, :n - 1])


# --------------------------------------------------------------------------- test 12


def test_train_mode_forwards_are_deterministic(role_model, make_rollout, ppo_assets):
    """The test base carries attention dropout 0.1 and the adapters LoRA dropout 0.1; in the
    PPO model every role's train-mode forward is nevertheless repeatable bit for bit."""
    from rlhf.models import load_causal_lm, load_tokenizer

    model, tok, cfg = role_model
    batch = make_rollout(model, tok, cfg)
    model.train()  # the update's mode
    for role in ("sft", "policy", "reward", "value"):
        with model.role(role):
            a = model.hidden_states(batch.input_ids, batch.attention_mask)
            b = model.hidden_states(batch.input_ids, batch.attention_mask)
        assert torch.equal(a, b), role
    lp1, _ = response_logprobs(model, "policy", batch, cfg.temperature)
    lp2, _ = response_logprobs(model, "policy", batch, cfg.temperature)
    assert torch.equal(lp1, lp2)
    # the premise: the same base loaded plainly does drop out in train mode
    raw = load_causal_lm(str(ppo_assets.base), load_tokenizer(str(ppo_assets.base))).train()
    assert raw.config.attention_dropout > 0
    assert not torch.equal(raw(batch.input_ids, attention_mask=batch.attention_mask).logits,
                           raw(batch.input_ids, attention_mask=batch.attention_mask).logits)


def test_generate_and_score_in_eval_mode_update_in_train_mode(role_model, make_rollout, monkeypatch):
    """Every forward of generation and scoring runs in eval mode (transformers 5.17 turns
    the KV cache off in train mode under gradient checkpointing); the update's in train
    mode; the model comes back in the mode it was in."""
    model, tok, cfg = role_model
    seen: list[tuple[str, bool]] = []
    phase = {"name": "rollout"}
    decoder = model.base_lm.get_decoder()
    original = type(decoder).forward

    def spy(self, *args, **kwargs):
        seen.append((phase["name"], self.training))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(decoder), "forward", spy)
    model.train()  # whatever mode the caller left it in
    batch = make_rollout(model, tok, cfg)
    assert model.training
    phase["name"] = "update"
    _update(model, batch, cfg)
    assert not any(training for name, training in seen if name == "rollout")
    assert all(training for name, training in seen if name == "update")
    assert {name for name, _ in seen} == {"rollout", "update"}
