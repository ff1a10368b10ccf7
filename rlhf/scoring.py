"""Role scoring: the forward passes of the LoRA roles over a sampled batch.

One frozen base holds four roles (:class:`rlhf.adapters.RoleModel`): ``policy`` and ``sft``
give response logprobs (and the policy its entropies), ``reward`` scores the response where
the reward model was trained to score (the last real token, or after the chat template's
end-of-turn suffix), ``value`` gives per-token values. :func:`score_rollout` turns a
:class:`~rlhf.ppo.rollout.Sampled` batch into a :class:`~rlhf.ppo.rollout.ScoredRollout`,
once per role and chunk; whether the value role runs is the advantage estimator's call
(``needs_critic`` in :mod:`rlhf.estimators`), not the caller's.

Used by the PPO stage (rollouts and the training forward), policy evaluation
(:mod:`rlhf.evaluation`), ``rlhf eval`` and the task module (gold reward-model accuracy).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from rlhf import ppo as F
from rlhf.config import on_for_device
from rlhf.estimators import uses_critic
from rlhf.ppo.rollout import Sampled, ScoredRollout

if TYPE_CHECKING:
    from rlhf.config import PPOConfig

__all__ = ["frozen_role_scores", "last_token_scores", "resolve_mixed_scoring", "response_logprobs", "response_values",
           "score_inputs", "score_rollout", "train_mode"]


@contextmanager
def train_mode(model, training: bool):
    """Train (``True``) or eval mode for the block, then the previous mode again.

    Generation and scoring run in eval mode: with gradient checkpointing on, transformers
    5.17 turns the KV cache off in train mode, and each token would be sampled without its
    context. The update runs in train mode (dropout is 0 everywhere, so both modes compute
    the same function; ppo.md test 12)."""
    previous = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(previous)


def response_logprobs(model, role: str, batch: Sampled | ScoredRollout, temperature: float, with_entropy: bool = False):
    """Logprobs (B, T) of the response tokens under ``role`` at the sampling temperature,
    from the logits the model samples from (its own post-processing included), and the
    entropies (B, T) when ``with_entropy``. No (B, T, vocab) logits are materialised.

    With gradient checkpointing, call ``backward`` on anything computed from these inside
    ``model.role(role)``: the recomputed forward uses whichever adapter is active then."""
    P = batch.prompt_ids.shape[1]
    T = batch.response_ids.shape[1]
    with model.role(role):
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    lp, ent = model.token_logprobs(hidden[:, P - 1: P - 1 + T], batch.response_ids, temperature)
    return lp, (ent if with_entropy else None)


def response_values(model, batch: Sampled | ScoredRollout) -> torch.Tensor:
    """Value (B, T) of the state before each response token (value role; backward inside
    ``model.role("value")``, as for :func:`response_logprobs`)."""
    P = batch.prompt_ids.shape[1]
    T = batch.response_ids.shape[1]
    with model.role("value"):
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    return model.values("value", hidden[:, P - 1: P - 1 + T])


def score_inputs(batch: Sampled | ScoredRollout, suffix: list[int] | tuple = ()):
    """Input ids and mask (B, P + T + len(suffix)) that a reward or value head scores, and
    the position (B,) it scores: the last real response token (the stop token when
    present), or, for rows that stopped, the last of ``suffix`` written after the stop
    token. Rows are right-padded (mask 0) to one width."""
    P = batch.prompt_ids.shape[1]
    ids, mask = batch.response_ids, batch.response_mask
    if len(suffix):
        B, T, k = ids.shape[0], ids.shape[1], len(suffix)
        ids = torch.cat([ids, ids.new_zeros(B, k)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(B, k)], dim=1)
        offset = torch.arange(T + k, device=ids.device)[None] - mask.sum(1).long()[:, None]
        inside = (offset >= 0) & (offset < k) & batch.has_stop[:, None]
        ids = torch.where(inside, torch.tensor(list(suffix), device=ids.device)[offset.clamp(0, k - 1)], ids)
        mask = torch.where(inside, torch.ones_like(mask), mask)
    input_ids = torch.cat([batch.prompt_ids, ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, mask.to(batch.prompt_mask.dtype)], dim=1)
    return input_ids, attention_mask, P + F.last_token_index(mask)


def last_token_scores(model, role: str, batch: Sampled | ScoredRollout, suffix: list[int] | tuple = ()) -> torch.Tensor:
    """Head score (B,) of ``role`` where the reward model was trained to score: the last
    real response token (the stop token when present), or, for rows that stopped, the last
    of ``suffix`` (:func:`score_suffix`) written after the stop token. Never at the padding
    (TRL 1.12 scored one position late: trl issues 1893, 3750)."""
    input_ids, attention_mask, pos = score_inputs(batch, suffix)
    with model.role(role):
        hidden = model.hidden_states(input_ids, attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
    return model.values(role, picked)


def frozen_role_scores(model, batch: Sampled | ScoredRollout, temperature: float, suffix: list[int] | tuple = (),
                       mixed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (sft role) logprobs (B, T) and reward scores of ``batch``; the logprobs
    as :func:`response_logprobs` computes them, the scores at :func:`last_token_scores`'
    position (``suffix`` included). The scores are (B,) with one reward model, and (B, N)
    with an ensemble of N (``model.reward_roles``), column j by member j.

    With ``mixed`` (and a model in eval mode), all frozen roles run as one forward over the
    batch stacked 1 + N times, each copy under its own adapter (peft's mixed-adapter batches,
    ``adapter_names``; the sft role of a full-SFT base is ``__base__``): one pass of (1 + N)B
    rows instead of 1 + N passes of B, fewer kernel launches and better-filled matrix units;
    the base weights are read once for the reference and every ensemble member. The
    reference copy is right-padded (mask 0) to the width of the scored inputs, which
    changes none of its earlier positions (causal attention). The trainable roles are not
    mixed in: their rollout numbers must come from exactly the computation the training
    forward repeats (ratio 1 on the first minibatch).
    """
    if not model.has_reward:  # no reward role (DPO's evaluation without a reward stage): no score, not a made-up one
        ref, _ = response_logprobs(model, "sft", batch, temperature)
        return ref, torch.full_like(ref[:, 0], float("nan"))
    hooks = getattr(model.peft.base_model, "_enable_peft_forward_hooks", None)
    # peft's mixed-batch LoRA forward rounds each adapter's output to the base dtype before
    # adding it, the plain forward adds in fp32 first: without autocast on a bf16/fp16 base
    # (a CPU run) the two differ by rounding, and the step-0 KL would no longer be exactly 0
    # (ppo.md test 5); there the frozen roles run apart. fp32, and bf16 under the CUDA
    # autocast of every role forward, add in the same dtype either way.
    device = batch.input_ids.device
    same_rounding = model._compute_dtype == torch.float32 or (device.type == "cuda" and model._compute_dtype == torch.bfloat16)
    members = model.reward_roles
    if not mixed or hooks is None or model.training or not same_rounding:
        ref, _ = response_logprobs(model, "sft", batch, temperature)
        scores = [last_token_scores(model, role, batch, suffix) for role in members]
        return ref, scores[0] if len(scores) == 1 else torch.stack(scores, dim=1)
    P = batch.prompt_ids.shape[1]
    B, T = batch.response_ids.shape
    N = len(members)
    score_ids, score_mask, pos = score_inputs(batch, suffix)
    extra = score_ids.shape[1] - batch.input_ids.shape[1]
    ref_ids = torch.nn.functional.pad(batch.input_ids, (0, extra), value=0)
    ref_mask = torch.nn.functional.pad(batch.attention_mask, (0, extra), value=0)
    names = [model.adapter_name("sft")] * B + [model.adapter_name(role) for role in members for _ in range(B)]
    with hooks(adapter_names=names):
        hidden = model.hidden_states(torch.cat([ref_ids] + [score_ids] * N), torch.cat([ref_mask] + [score_mask] * N))
    ref, _ = model.token_logprobs(hidden[:B, P - 1: P - 1 + T], batch.response_ids, temperature)
    rows = torch.arange(B, device=hidden.device)
    scores = [model.values(role, hidden[B * (1 + j):][rows, pos]) for j, role in enumerate(members)]
    return ref, scores[0] if N == 1 else torch.stack(scores, dim=1)


def resolve_mixed_scoring(setting: str, device) -> bool:
    """``ppo.mixed_adapter_scoring``: ``auto`` -> the mixed-adapter batch on CUDA only.

    On a CPU one forward per frozen role is faster than one over the stacked batch: peft's
    mixed-batch LoRA forward gathers and scatters each adapter's rows in every layer, and a
    CPU's matrix units are already full at one role's rows (``scripts/bench_scoring.py``)."""
    return on_for_device(setting, device, "ppo.mixed_adapter_scoring")


@torch.no_grad()
def score_rollout(model, batch: Sampled, cfg: PPOConfig, chunk: int, suffix: list[int] | tuple = (),
                  with_values: bool | None = None) -> ScoredRollout:
    """Policy and reference logprobs, entropy, values and reward scores of ``batch``,
    computed ``chunk`` rows at a time, in eval mode (which also allows mixed-adapter
    batches); ``suffix`` as in :func:`last_token_scores`; ``cfg.temperature`` is the
    sampling temperature.

    Each role's forward runs once per chunk: policy (logprobs and entropy together), value
    (``with_values``; by default when ``cfg.advantage_estimator`` needs a critic, else the
    values are zeros), and the frozen roles (:func:`frozen_role_scores`), in one mixed-adapter
    batch or apart as ``cfg.mixed_adapter_scoring`` says (:func:`resolve_mixed_scoring`). With an
    ensemble of reward models the score is :func:`rlhf.ppo.ensemble_score` of the members'
    scores with ``cfg.ensemble_k``, and the members' scores are kept (``member_scores``).
    """
    if with_values is None:
        with_values = uses_critic(cfg)
    mixed = resolve_mixed_scoring(cfg.mixed_adapter_scoring, batch.response_ids.device)
    parts: dict[str, list] = {k: [] for k in ("logprobs", "ref_logprobs", "entropy", "values", "scores")}
    ensemble = len(model.reward_roles) > 1
    with train_mode(model, False):
        for s in range(0, batch.response_ids.shape[0], chunk):
            mb = batch.index(torch.arange(s, min(s + chunk, batch.response_ids.shape[0]), device=batch.response_ids.device))
            lp, ent = response_logprobs(model, "policy", mb, cfg.temperature, with_entropy=True)
            ref, scores = frozen_role_scores(model, mb, cfg.temperature, suffix, mixed=mixed)
            parts["logprobs"].append(lp)
            parts["entropy"].append(ent)
            parts["ref_logprobs"].append(ref)
            parts["values"].append(response_values(model, mb) if with_values else torch.zeros_like(lp))
            parts["scores"].append(scores)
    joined = {k: torch.cat(v) for k, v in parts.items()}
    members = joined.pop("scores") if ensemble else None
    scores = F.ensemble_score(members, cfg.ensemble_k) if ensemble else joined.pop("scores")
    return ScoredRollout.from_sampled(batch, **joined, scores=scores, member_scores=members)
