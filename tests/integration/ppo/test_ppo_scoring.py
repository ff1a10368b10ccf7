"""Scoring (rlhf.scoring.score_rollout): one forward per role and chunk, or the frozen roles
(sft reference, reward) in one mixed-adapter batch (``ppo.mixed_adapter_scoring``, on CUDA by
default) that equals scoring them apart."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo.rollout import Sampled
from rlhf.scoring import frozen_role_scores, resolve_mixed_scoring, score_rollout
from rlhf.stages.ppo import _build_model


def _forward_rows(model) -> tuple[list[int], object]:
    """Record the row count of every decoder forward."""
    rows: list[int] = []
    handle = model.base_lm.get_decoder().register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return rows, handle


def scoring_forward_rows(model, batch, cfg, chunk: int) -> list[int]:
    """Row counts of the decoder forwards that score_rollout runs over ``batch``'s samples."""
    rows, handle = _forward_rows(model)
    try:
        score_rollout(model, Sampled(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                                     batch.has_stop), cfg, chunk=chunk)
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize("sft_adapter", [True, False], ids=["sft-adapter", "full-sft-base"])
def test_mixed_frozen_batch_equals_separate_scoring(ppo_config, make_rollout, sft_adapter):
    cfg = ppo_config() if sft_adapter else ppo_config(sft_adapter="")
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    assert model.has_sft_adapter is sft_adapter
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # policy != sft, so the reference half must really run the sft role
        for n, p in model.peft.named_parameters():
            if ".policy." in n and "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    batch = make_rollout(model, tok, cfg, n=6)
    model.eval()
    ref_mixed, scores_mixed = frozen_role_scores(model, batch, cfg.temperature, mixed=True)
    ref_apart, scores_apart = frozen_role_scores(model, batch, cfg.temperature, mixed=False)
    m = batch.response_mask.bool()
    assert (ref_mixed - ref_apart)[m].abs().max() < 1e-5
    assert (scores_mixed - scores_apart).abs().max() < 1e-5
    # sharp: each half really ran its own adapter (reference != policy, reward head on reward hidden)
    assert (ref_apart - batch.logprobs)[m].abs().max() > 1e-2
    with model.role("policy"):
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    wrong = model.values("reward", hidden[:, -1])
    assert (wrong - scores_apart).abs().max() > 1e-3
    # the batch's stored numbers are these
    assert (batch.ref_logprobs - ref_apart)[m].abs().max() < 1e-5 and (batch.scores - scores_apart).abs().max() < 1e-5


@pytest.mark.parametrize("estimator,passes", [("gae", 3), ("rloo", 2)])
@pytest.mark.parametrize("setting", ["on", "auto"])
def test_one_forward_per_role_and_chunk(ppo_config, make_rollout, estimator, passes, setting):
    cfg = ppo_config(advantage_estimator=estimator, num_generations=2, mixed_adapter_scoring=setting)
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    batch = make_rollout(model, tok, cfg, n=4)
    model.train()  # _build_model leaves eval mode; scoring must restore whichever mode it found
    rows = scoring_forward_rows(model, batch, cfg, chunk=2)
    if setting == "on":
        # per chunk of 2: policy (2 rows), value (2, with a critic), sft+reward together (4 rows)
        assert len(rows) == 2 * passes and rows.count(4) == 2 and sum(rows) == 2 * (2 * (passes - 1) + 4)
    else:
        # auto on a CPU: one forward per role, sft and reward apart (2 rows each)
        assert rows == [2] * (2 * (passes + 1))
    assert model.training  # scoring ran in eval mode and restored train mode


def test_mixed_frozen_batch_scores_at_the_score_suffix(ppo_config, make_rollout):
    """With a score suffix (ChatML writes a newline after <|im_end|>), the mixed batch scores
    where last_token_scores does: the suffix's last token for rows that stopped, the last
    real token otherwise; and its reference half (right-padded to the wider scored inputs)
    keeps the reference logprobs of scoring apart."""
    from rlhf import ppo as F
    from rlhf.scoring import last_token_scores, response_logprobs

    cfg = ppo_config()
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    batch = make_rollout(model, tok, cfg, n=6)
    ids = batch.response_ids.clone()
    other = next(t for t in range(10, 100) if t not in (tok.eos_token_id, tok.pad_token_id))
    ids[3:] = torch.where(ids[3:] == tok.eos_token_id, torch.full_like(ids[3:], other), ids[3:])
    ids[:3, 2] = tok.eos_token_id  # half the rows stop at token 3, the others run to the limit
    ids, mask, has_stop = F.first_stop_truncate(ids, tok.eos_token_id, tok.pad_token_id)
    assert has_stop[:3].all() and not has_stop[3:].any()
    sampled = Sampled(batch.prompt_ids, batch.prompt_mask, ids, mask.float(), has_stop)
    suffix = [5, 9]
    model.eval()
    with torch.no_grad():
        ref_mixed, scores_mixed = frozen_role_scores(model, sampled, cfg.temperature, suffix, mixed=True)
        ref_apart, _ = response_logprobs(model, "sft", sampled, cfg.temperature)
        scores_apart = last_token_scores(model, "reward", sampled, suffix)
        scores_no_suffix = last_token_scores(model, "reward", sampled)
    m = sampled.response_mask.bool()
    assert (ref_mixed - ref_apart)[m].abs().max() < 1e-5
    assert (scores_mixed - scores_apart).abs().max() < 1e-5
    # sharp: the suffix moves the score of the rows that stopped, and only theirs
    assert (scores_mixed - scores_no_suffix)[has_stop].abs().min() > 1e-4
    assert (scores_mixed - scores_no_suffix)[~has_stop].abs().max() < 1e-5


def test_mixed_scoring_setting_resolves_by_device():
    assert resolve_mixed_scoring("auto", "cuda") and not resolve_mixed_scoring("auto", "cpu")
    assert resolve_mixed_scoring("on", "cpu") and not resolve_mixed_scoring("off", "cuda")
    with pytest.raises(ValueError, match="mixed_adapter_scoring"):
        resolve_mixed_scoring("yes", "cpu")


def test_score_rollout_gives_the_same_numbers_either_way(ppo_config, make_rollout):
    """The whole scored rollout (policy, reference, values, scores) with the frozen roles mixed
    and apart: the setting changes the speed, not the numbers."""
    cfg_on, cfg_off = ppo_config(mixed_adapter_scoring="on"), ppo_config(mixed_adapter_scoring="off")
    model, tok, _ = _build_model(cfg_on, torch.device("cpu"))
    batch = make_rollout(model, tok, cfg_on, n=6)
    sampled = Sampled(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, batch.has_stop)
    mixed = score_rollout(model, sampled, cfg_on, chunk=4)
    apart = score_rollout(model, sampled, cfg_off, chunk=4)
    m = batch.response_mask.bool()
    for name in ("logprobs", "ref_logprobs", "values"):
        assert (getattr(mixed, name) - getattr(apart, name))[m].abs().max() < 1e-5, name
    assert (mixed.scores - apart.scores).abs().max() < 1e-5
