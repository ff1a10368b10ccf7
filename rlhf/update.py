"""The PPO update below the stage's recipe: the optimisation epochs over one rollout
(:func:`_ppo_update`, with each role's forward and backward in :func:`_policy_backward` and
:func:`_value_backward`), the rollout's statistics and the guards' exception.

``rlhf/stages/ppo.py`` calls these in its step 6 and 7; the pure loss math is in ``rlhf/ppo/``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from rlhf import ppo as F
from rlhf.estimators import uses_critic
from rlhf.fsdp import even_share, gather_rollout, is_sharded
from rlhf.ppo.masked import AllReduce
from rlhf.ppo.rollout import ScoredRollout
from rlhf.scoring import response_logprobs, response_values, train_mode

if TYPE_CHECKING:
    from rlhf.config import PPOConfig


class GuardTripped(RuntimeError):
    """A watched metric left its allowed range; the run stops, checkpoints stay intact."""

    def __init__(self, metric: str, value: float, limit: str):
        super().__init__(f"PPO stopped: {metric} = {value:.6g} ({limit}); the last good checkpoint is kept")
        self.metric, self.value = metric, value


# ---------------------------------------------------------------------------------------
# step 4 (each building block is used by the loop below and by the tests)


def _check_finite(batch: ScoredRollout) -> None:
    for name, t in (("reward/score", batch.scores), ("logprobs/policy", batch.logprobs),
                    ("logprobs/reference", batch.ref_logprobs), ("value", batch.values)):
        if not torch.isfinite(t).all():
            raise GuardTripped(name, float(t[~torch.isfinite(t)][0]), "not finite")


def rollout_statistics(batch: ScoredRollout, scores, kl, rewards, adv, kl_coef: float) -> dict:
    """Statistics of the global batch (rows gathered from every process), so that the KL
    controller and the guards take the same decision on every rank."""
    from rlhf import distributed as dist

    mask = batch.response_mask
    scores_all = dist.gather_rows(scores)
    kl_per_response = dist.gather_rows(F.masked_sum(kl, mask, dim=1))
    return {
        "reward/score_mean": float(scores_all.mean()),
        "reward/score_std": float(scores_all.std()) if scores_all.numel() > 1 else 0.0,
        "reward/shaped_mean": float(dist.gather_rows((rewards * mask).sum(1)).mean()),
        "kl/mean": float(kl_per_response.mean()),
        "kl/per_token": float(F.kl_per_unit(kl, mask, "token", all_reduce=dist.all_reduce_sum)),
        "kl/coef": kl_coef,
        "entropy/mean": float(F.masked_mean(batch.entropy, mask, all_reduce=dist.all_reduce_sum)),
        "response/length_mean": float(dist.gather_rows(mask.sum(1)).mean()),
        "response/stop_rate": float(dist.gather_rows(batch.has_stop.float()).mean()),
        "value/mean": float(F.masked_mean(batch.values, mask, all_reduce=dist.all_reduce_sum)),
        "advantage/mean": float(F.masked_mean(adv, mask, all_reduce=dist.all_reduce_sum)),
    }


def rollout_mismatch(batch: ScoredRollout, cfg: PPOConfig) -> tuple[dict, torch.Tensor | None]:
    """``rollout/logprob_diff_mean`` and ``_max`` (|trainer - sampler| logprobs of the sampled
    tokens, over every process's real tokens), and the truncated importance weights (B, T) of
    ``ppo.rollout_is_cap`` (None when off, or when no engine drew the batch)."""
    from rlhf import distributed as dist

    if batch.sampler_logprobs is None:
        return {}, None
    mask = batch.response_mask
    diff = (batch.logprobs.float() - batch.sampler_logprobs.float()).abs() * mask
    n = dist.all_reduce_sum(mask.sum()).clamp(min=1.0)
    stats = {"rollout/logprob_diff_mean": float(dist.all_reduce_sum(diff.sum()) / n),
             "rollout/logprob_diff_max": float(dist.gather_rows(diff.amax(dim=1, keepdim=True)).max())}
    weights = None
    if cfg.rollout_is_cap is not None:
        weights = F.truncated_is_weights(batch.logprobs, batch.sampler_logprobs, mask, cfg.rollout_is_cap)
        stats["rollout/is_weight_mean"] = float(F.masked_mean(weights, mask, all_reduce=dist.all_reduce_sum))
    return stats, weights


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       all_reduce: AllReduce | None = None) -> dict:
    """``{"value/explained_variance": 1 - Var[returns - values] / Var[returns]}`` over the
    response tokens (values, returns, mask: (B, T)); 1 is a perfect critic, 0 no better than
    a constant, negative worse. Empty when the returns do not vary (the ratio is undefined)."""
    var_returns = float(F.masked_var(returns, mask, unbiased=False, all_reduce=all_reduce))
    if var_returns <= 0.0:
        return {}
    var_error = float(F.masked_var(returns - values, mask, unbiased=False, all_reduce=all_reduce))
    return {"value/explained_variance": 1.0 - var_error / var_returns}


#: Above this fraction of first-rollout responses without a stop token, PPO warns.
CUT_OFF_WARNING = 0.2


def warn_if_cut_off(stop_rate: float, cfg: PPOConfig, stop_tokens: list[str]) -> bool:
    """Warn when more than a fifth of the first rollout's responses hit ``response_length``
    without a stop token: their score is then the missing-stop penalty, not the reward
    model's, and PPO learns from almost no reward signal (measured on SmolLM2 with a
    32-token cap: 31.2 tokens on average, score -0.92 at step 0). Returns whether it warned."""
    if 1.0 - stop_rate <= CUT_OFF_WARNING:
        return False
    import warnings

    warnings.warn(f"{1.0 - stop_rate:.0%} of the first rollout's responses reached ppo.response_length="
                  f"{cfg.response_length} without a stop token ({', '.join(stop_tokens)}); their score is "
                  f"ppo.missing_stop_penalty ({cfg.missing_stop_penalty}), not the reward model's. Raise "
                  "response_length, or check ppo.stop_token against the chat template", stacklevel=2)
    return True


def _ppo_update(model, optimizer, scheduler, batch: ScoredRollout, adv, returns, cfg: PPOConfig, beta: float,
                update: int, rank: int = 0, world: int = 1, is_weights: torch.Tensor | None = None,
                on_step: Callable[[str], None] | None = None, loss_mask: torch.Tensor | None = None) -> dict:
    """PPO epochs over shuffled minibatches of the rollout (train mode); returns mean statistics.

    With ``world`` processes, ``batch`` is this rank's slice ``[rank*B, (rank+1)*B)`` of the
    global batch of ``world*B`` rows. Every rank draws the same permutation of the global
    rows (same seed) and trains on its own rows of each global minibatch; losses are
    normalised by the global minibatch token count and gradients summed over ranks before
    the step, so each step equals the single-process step on the same global batch (the
    number of rows a rank holds in a minibatch varies; a rank may hold none).
    ``is_weights`` (B, T), when given, multiply each token's policy loss (``ppo.rollout_is_cap``).

    Each role's forward *and backward* run inside that role: gradient checkpointing
    recomputes a layer's forward during backward with whichever adapter is active then.
    Statistics stay on the device; the host reads them once per minibatch, before the
    optimizer step, which is skipped (GuardTripped) when a loss or the gradient is not finite.

    ``loss_mask`` (B, T) (default: the response mask) selects the tokens of the policy loss
    and its normalisation (``ppo.mask_truncated_completions`` leaves cut-off responses out); the value
    loss keeps every real token.
    """
    from rlhf import distributed as dist

    B_local = batch.response_ids.shape[0]
    B = B_local * world
    lo = rank * B_local
    device = batch.response_ids.device
    sharded = world > 1 and is_sharded(model)
    masked = loss_mask is not None
    loss_mask = batch.response_mask if loss_mask is None else loss_mask
    if sharded:  # FSDP: forwards are collectives, so every rank takes an equal share of each minibatch
        batch, adv, returns, loss_mask = gather_rollout(batch, adv, returns, loss_mask)
        if is_weights is not None:
            is_weights = dist.gather_rows(is_weights)
    group_size = cfg.num_generations if cfg.minibatch_whole_groups else 1
    gen = torch.Generator().manual_seed(cfg.seed * 104_729 + update)
    sums: dict[str, float] = {}
    count = 0
    use_critic = uses_critic(cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with train_mode(model, True):
        for _epoch in range(cfg.num_ppo_epochs):
            for mb_idx in F.ppo_minibatch_indices(B, cfg.num_mini_batches, gen, group_size=group_size):
                if sharded:  # an equal share of the gathered rows (selected on the CPU)
                    mb_idx = even_share(mb_idx, rank, world)
                elif world > 1:  # this rank's rows, selected on the CPU (no device sync)
                    mb_idx = mb_idx[(mb_idx >= lo) & (mb_idx < lo + B_local)] - lo
                mb_idx = mb_idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                n_tokens = dist.all_reduce_sum(loss_mask[mb_idx].sum()).clamp(min=1.0)
                rows = (loss_mask[mb_idx].sum(1) > 0).sum().float() if masked else float(mb_idx.numel())
                n_seqs = dist.all_reduce_sum(torch.as_tensor(rows, device=device)).clamp(min=1.0)
                n_value_tokens = (dist.all_reduce_sum(batch.response_mask[mb_idx].sum()).clamp(min=1.0)
                                  if masked else n_tokens)
                acc: dict[str, torch.Tensor] = {}
                for micro in (mb_idx.split(cfg.per_device_train_batch_size) if mb_idx.numel() else ()):
                    mb = batch.index(micro)
                    w = loss_mask[micro].sum() / n_tokens  # this micro-batch's share of the minibatch
                    # per-token loss weights from the whole minibatch's counts: the micro-batch
                    # losses add up to the minibatch loss exactly, for every aggregation
                    weights = F.aggregation_weights(loss_mask[micro], cfg.loss_aggregation, n_tokens, n_seqs,
                                                    cfg.response_length)
                    pg_weights = weights if is_weights is None else weights * is_weights[micro]
                    for k, v in _policy_backward(model, mb, adv[micro], cfg, beta, weights, w, pg_weights,
                                                 loss_mask[micro]).items():
                        acc[k] = acc.get(k, 0.0) + v
                    if use_critic:
                        w_value = mb.response_mask.sum() / n_value_tokens
                        for k, v in _value_backward(model, mb, returns[micro], cfg, n_value_tokens, w_value).items():
                            acc[k] = acc.get(k, 0.0) + v
                dist.sum_gradients(params)  # no-op in one process
                if cfg.max_grad_norm > 0:
                    acc["grad_norm"] = dist.clip_grad_norm(params, cfg.max_grad_norm)
                names = list(acc)
                values = torch.stack([torch.as_tensor(acc[k], device=device).float() for k in names]).tolist() if names else []
                host = dict(zip(names, values))  # the one host sync of this minibatch
                for k in ("loss/policy", "loss/value", "grad_norm"):
                    if k in host and not math.isfinite(host[k]):
                        raise GuardTripped(k, host[k], "not finite")
                optimizer.step()
                scheduler.step()
                for k, v in host.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                if on_step is not None:
                    on_step(f"optimizer step {count}/{cfg.num_ppo_epochs * cfg.num_mini_batches}")
    if world > 1:  # per-rank partial sums add up to the global minibatch statistics
        parts = dist.gather_objects(sums)
        norm = sums.get("grad_norm")  # computed after the gradient sum: equal on every rank
        sums = {k: sum(p.get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p})}
        if norm is not None:
            sums["grad_norm"] = norm
    return {k: v / count for k, v in sums.items()} | {"optimizer_steps": float(count)}


def _policy_backward(model, mb: ScoredRollout, adv: torch.Tensor, cfg: PPOConfig, beta: float,
                     weights: torch.Tensor, w: torch.Tensor, pg_weights: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Policy loss of one micro-batch (clipped surrogate, + KL loss, - entropy bonus), each
    per-token term aggregated with ``weights`` (B, T) (:func:`rlhf.ppo.aggregation_weights`),
    the surrogate with ``pg_weights`` instead when given (``weights`` times the truncated
    importance weights), over the tokens of ``mask`` (B, T) (default: the response mask),
    forward and backward under the policy role; returns detached statistics (on device)."""
    mask = mb.response_mask if mask is None else mask
    with model.role("policy"):
        lp, ent = response_logprobs(model, "policy", mb, cfg.temperature, with_entropy=cfg.entropy_coef > 0)
        pg, pg_stats = F.policy_loss(lp, mb.logprobs, adv, mask, cfg.clip_low,
                                     weights=weights if pg_weights is None else pg_weights,
                                     clip_high=cfg.clip_high, ratio_level=cfg.importance_ratio)
        loss = pg
        # a micro-batch without loss tokens (every response cut off, ppo.mask_truncated_completions) has
        # no statistics (0/0) and no share (w = 0) of the minibatch's
        stats = {"loss/policy": pg.detach()} | {f"policy/{k}": torch.where(w > 0, v * w, 0.0)
                                                for k, v in pg_stats.items()}
        if not cfg.kl_in_reward:
            # k3 or k2 (the config refuses k1): their gradients are those of a KL, while k1's
            # gradient is d logp alone, whose expectation is 0 (the reference drops out)
            kl_loss = (F.kl_penalty(lp, mb.ref_logprobs, cfg.kl_estimator) * weights).sum()
            loss = loss + beta * kl_loss
            stats["loss/kl"] = kl_loss.detach()
        if cfg.entropy_coef > 0:  # a bonus: maximising entropy lowers the loss
            ent_mean = (ent * weights).sum()
            loss = loss - cfg.entropy_coef * ent_mean
            stats["loss/entropy"] = ent_mean.detach()
        loss.backward()
    return stats


def _value_backward(model, mb: ScoredRollout, returns: torch.Tensor, cfg: PPOConfig, n_tokens: torch.Tensor,
                    w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clipped value loss of one micro-batch, forward and backward under the value role."""
    with model.role("value"):
        v = response_values(model, mb)
        vf, vf_stats = F.value_loss(v, mb.values, returns, mb.response_mask, cfg.cliprange_value, normalizer=n_tokens)
        (cfg.vf_coef * vf).backward()
    return {"loss/value": vf.detach()} | {f"value/{k}": val * w for k, val in vf_stats.items()}
