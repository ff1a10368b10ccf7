"""Stage 3: PPO of the SFT policy against the reward model, on one base with LoRA roles.

One update, top to bottom (each default's source is cited at its field in ``rlhf/config.py``):

  1. sample a rollout batch of prompts (deterministic in seed and update number)
  2. generate responses with the policy role through the ``ppo.generation`` engine
     (rlhf/generation.py; T=0.7, top_k 0, top_p 1, nothing from the model's
     generation_config leaks); truncate each after its first stop token
  3. score: policy and reference (sft role) logprobs, values (value role), and the reward
     model's score on the last real token (reward role; with an ensemble, every member's, and
     mean - ensemble_k * std over them); sft and the reward members in one mixed-adapter batch
     on CUDA, one forward each on a CPU (``ppo.mixed_adapter_scoring``)
  4. per-token rewards = -beta * KL_t, plus the score on the last real token
  5. advantages with GAE (or a critic-free estimator: reinforce++, rloo, grpo), whitened
     over the whole batch (grpo: already normalised within each prompt's group)
  6. PPO epochs over shuffled minibatches; micro-batches accumulate gradients that equal
     the unaccumulated ones (per-token loss weights come from counts of the whole minibatch,
     for each ``loss_aggregation``)
  7. KL controller update, metrics, guards, evaluation and checkpoints

``run_ppo`` reads as these steps: :func:`setup` (model, prompts, sampling engine),
:func:`build_optimization`, :func:`load_checkpoint` (resume), then per update
:func:`train_update` (steps 1-7, with :func:`sample`, ``score_rollout``, :func:`shaped_rewards`,
``advantages_and_returns`` and ``_ppo_update``), :func:`evaluate_and_log` and
:func:`save_checkpoint`. The libraries it calls live below the stage: sampling and the engines
in :mod:`rlhf.generation`, the roles' forward passes in :mod:`rlhf.scoring`, the advantage
estimators in :mod:`rlhf.estimators`, policy evaluation in :mod:`rlhf.evaluation`, the pure
tensor math and the rollout types (:class:`rlhf.ppo.rollout.Sampled`,
:class:`rlhf.ppo.rollout.ScoredRollout`) in ``rlhf/ppo/``.

Critic-free estimators build no value role at all (no LoRA, head or optimizer state).

Resume: a checkpoint holds the policy and value adapters (+ value head), optimizer,
scheduler, KL controller and RNG states and the update number; prompts and minibatch
shuffles are derived from (seed, update), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from rlhf import ppo as F, summary
from rlhf.atomic import write_json
from rlhf.config import ConfigError, PPOConfig, save_yaml, to_dict
from rlhf.estimators import advantages_and_returns, uses_critic
from rlhf.evaluation import evaluate, split_eval_prompts
from rlhf.fsdp import check_engine_supported, full_params_for_generation, full_state, is_sharded, shard_model
from rlhf.generation import (build_engine, decode_responses, encode_prompts, generation_config, left_pad, score_suffix,
                             stop_token_ids)
from rlhf.ppo.masked import AllReduce
from rlhf.ppo.rollout import Sampled, ScoredRollout
from rlhf.ppo.state import Optimization, PPOSetup
from rlhf.scoring import score_rollout
from rlhf.stages.common import StageResult
from rlhf.reward_sources import reward_members, reward_sources, score_with_sources, source_statistics, uses_reward_model
from rlhf.update import (GuardTripped, _check_finite, _ppo_update, explained_variance, rollout_mismatch,
                         rollout_statistics, warn_if_cut_off)
from rlhf.watchdog import Watchdog, _restore, _watch, watch_metrics, watchdog_judge


def final_scores(batch: ScoredRollout, cfg: PPOConfig) -> torch.Tensor:
    """Scores (B,) after the missing-stop penalty, clipping and the overlong length term."""
    scores = F.apply_missing_stop_penalty(batch.scores, batch.has_stop, cfg.missing_stop_penalty, cfg.missing_stop_value)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.overlong_buffer:  # DAPO's soft overlong punishment, a length term next to the score
        scores = scores + F.overlong_penalty(batch.response_mask.sum(1), cfg.response_length, cfg.overlong_buffer,
                                             cfg.overlong_penalty)
    return scores


def shaped_rewards(batch: ScoredRollout, cfg: PPOConfig, kl_coef: float,
                   all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores after the stop-token penalty and clipping, per-token KL, per-token rewards.

    Returns:
        ``scores`` (B,), ``kl`` (B, T) (0 on padding) and ``rewards`` (B, T).
        ``all_reduce`` (several processes) makes reward whitening use global statistics.
    """
    scores = final_scores(batch, cfg)
    kl = torch.where(batch.response_mask.bool(), F.kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator), 0.0)
    rewards = F.per_token_rewards(scores, kl if cfg.kl_in_reward else torch.zeros_like(kl), batch.response_mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = F.masked_whiten(rewards, batch.response_mask, shift_mean=False, all_reduce=all_reduce)
    return scores, kl, rewards


# ---------------------------------------------------------------------------------------
# the stage


def _prompt_order(n_prompts: int, seed: int, update: int, batch: int) -> list[int]:
    """Prompt indices of rollout ``update``: epochs over the prompts, each a fresh seeded
    permutation, so the data position is a pure function of (seed, update)."""
    start = update * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.extend(perm[offset: offset + batch - len(out)])
    return out


def _build_model(cfg: PPOConfig, device):
    from rlhf import distributed as dist
    from rlhf.adapters import RoleModel
    from rlhf.models import disable_dropout, load_causal_lm, tokenizer_for

    base_path = cfg.model.name_or_path
    tok = tokenizer_for(cfg.model)
    base = load_causal_lm(base_path, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                          trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    disable_dropout(base)
    model = RoleModel(base, cfg.sft_adapter or None, reward_members(cfg) or None,
                      policy_lora={"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                                   "target_modules": cfg.lora.target_modules},
                      with_value=uses_critic(cfg))
    model.to(device)
    if dist.engine() == "fsdp" and dist.is_distributed():
        shard_model(model)  # base and LoRA roles sharded over the processes (rlhf/fsdp.py)
    if cfg.gradient_checkpointing:
        # non-reentrant: the frozen base's inputs need no grad; each role's backward runs
        # inside that role (_ppo_update), so the recomputed forwards use the right adapter
        model.base_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # rollouts run in eval mode; _ppo_update switches to train mode
    return model, tok, base_path


def _check_guards(stats: dict, cfg: PPOConfig, length_streak: list[int]) -> None:
    """Raise :class:`GuardTripped` when a watched metric left its range. ``length_streak``
    ([n]) counts consecutive updates above the length limit, across calls."""
    for k, v in stats.items():
        if not math.isfinite(v):
            raise GuardTripped(k, v, "not finite")
    if stats["kl/mean"] > cfg.guard_max_kl:
        raise GuardTripped("kl/mean", stats["kl/mean"], f"above guard_max_kl={cfg.guard_max_kl}")
    if stats["entropy/mean"] < cfg.guard_min_entropy:
        raise GuardTripped("entropy/mean", stats["entropy/mean"], f"below guard_min_entropy={cfg.guard_min_entropy}")
    if stats["response/length_mean"] < cfg.guard_min_length:
        raise GuardTripped("response/length_mean", stats["response/length_mean"], f"below guard_min_length={cfg.guard_min_length}")
    # Length blow-up: off by default, since an SFT policy that often writes up to the limit
    # is healthy; when set it trips only on a sustained excess, not on one long batch.
    if cfg.guard_max_length_fraction is not None:
        limit = cfg.guard_max_length_fraction * cfg.response_length
        length_streak[0] = length_streak[0] + 1 if stats["response/length_mean"] > limit else 0
        if length_streak[0] >= cfg.guard_length_patience:
            raise GuardTripped("response/length_mean", stats["response/length_mean"],
                               f"above {limit:.1f} tokens for {length_streak[0]} updates in a row")


def setup(cfg: PPOConfig, task_evaluate: Callable[[str, str], float] | None = None) -> PPOSetup:
    """Build the role model, tokenizer, sampling config, encoded prompts and the reward
    sources of ``ppo.rewards`` (``task_evaluate`` serves ``{fn: task}``)."""
    from rlhf import distributed as dist
    from rlhf.data import load_prompt_rows

    device = dist.device()
    world, rank = dist.world_size(), dist.rank()
    model, tok, base_path = _build_model(cfg, device)
    stop_ids, pad_id = stop_token_ids(tok, cfg, model.base_lm), tok.pad_token_id
    train_rows, eval_rows = split_eval_prompts(  # (messages, the row's other columns) pairs
        load_prompt_rows(cfg.prompts), load_prompt_rows(cfg.eval_prompts, split="test") if cfg.eval_prompts else [],
        cfg)
    prompts, eval_prompts = [m for m, _ in train_rows], [m for m, _ in eval_rows]
    # Several processes (accelerate launch): each generates rollout_batch_size episodes per
    # update, so the global batch is rollout_batch_size * world.
    global_batch = cfg.rollout_batch_size * world
    gen_cfg = generation_config(cfg, stop_ids, pad_id)
    engine = build_engine(cfg, model, gen_cfg=gen_cfg, stop_ids=stop_ids, pad_id=pad_id, device=device,
                          base_path=base_path, sharded=is_sharded(model))
    return PPOSetup(
        model=model, tok=tok, base_path=base_path, stop_ids=stop_ids, score_suffix=score_suffix(tok, stop_ids),
        pad_id=pad_id, gen_cfg=gen_cfg, engine=engine,
        prompt_ids=encode_prompts(tok, prompts, cfg.max_prompt_length), prompts=prompts,
        sources=reward_sources(cfg, task_evaluate, ensemble=len(model.reward_roles) > 1), eval_prompts=eval_prompts,
        prompt_metadata=[d for _, d in train_rows], eval_metadata=[d for _, d in eval_rows],
        eval_ids=encode_prompts(tok, eval_prompts, cfg.max_prompt_length),
        eval_texts=[p[-1]["content"] for p in eval_prompts],
        device=device, rank=rank, world=world,
        per_rollout_prompts=cfg.rollout_batch_size // cfg.num_generations,
        global_batch=global_batch, num_updates=max(1, cfg.total_episodes // global_batch),
    )


def build_optimization(model, cfg: PPOConfig, num_updates: int) -> Optimization:
    """Adam over the trainable roles, the learning-rate schedule and the KL controller."""
    from rlhf import distributed as dist

    params = model.trainable_parameters("policy") + (
        model.trainable_parameters("value") if uses_critic(cfg) else [])
    dist.broadcast_parameters(params)  # every rank starts from rank 0's weights
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
    total_steps = num_updates * cfg.num_ppo_epochs * cfg.num_mini_batches
    schedule = (lambda step: 1.0) if cfg.lr_scheduler_type == "constant" else (lambda step: max(0.0, 1.0 - step / total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    target = cfg.kl_target_per_token if cfg.kl_unit == "token" else cfg.kl_target
    kl_ctl = (F.AdaptiveKLController(cfg.kl_coef, target, cfg.kl_horizon, unit=cfg.kl_unit)
              if cfg.kl_controller == "adaptive" else F.FixedKLController(cfg.kl_coef))
    return Optimization(params, optimizer, scheduler, kl_ctl)


def _trained_roles(cfg: PPOConfig) -> tuple[str, ...]:
    return ("policy", "value") if uses_critic(cfg) else ("policy",)


def save_checkpoint(ckpt_root: Path, model, opt: Optimization, cfg: PPOConfig, update: int) -> None:
    """Write ``ckpt_root/update-N`` atomically (trained roles + optimizer, scheduler, KL
    controller and RNG states) and keep the newest ``cfg.save_total_limit``. Rank 0 only:
    ranks hold identical weights and optimizer states."""
    import shutil

    from rlhf.checkpoint import complete_checkpoints, rng_state, save_state, write_checkpoint_dir

    def writer(tmp: Path):
        for role in _trained_roles(cfg):
            model.save_role(role, tmp / role)
        save_state({"optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
                    "kl_controller": opt.kl_ctl.state_dict(), "rng": rng_state(), "update": update,
                    "length_streak": opt.length_streak[0]}, tmp, "state")

    write_checkpoint_dir(ckpt_root, f"update-{update}", writer)
    if cfg.save_total_limit > 0:  # 0 keeps every checkpoint
        for _, old in complete_checkpoints(ckpt_root, "update")[: -cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_root: Path, model, opt: Optimization) -> tuple[int, Path] | None:
    """Restore the newest complete checkpoint under ``ckpt_root`` into ``model`` and ``opt``
    (and the RNG states); returns ``(update, directory)``, or None when there is none."""
    from rlhf.checkpoint import complete_checkpoints, load_state, set_rng_state

    found = complete_checkpoints(ckpt_root, "update")
    if not found:
        return None
    n, d = found[-1]
    for role in ("policy", "value"):
        if (d / role).exists():
            model.load_role(role, d / role)
    state = load_state(d, "state", device="cpu")
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    opt.kl_ctl.load_state_dict(state["kl_controller"])
    opt.length_streak[0] = int(state.get("length_streak", 0))
    set_rng_state(state["rng"])
    return n, d


def evaluate_and_log(s: PPOSetup, cfg: PPOConfig, tracker, gold_fn: Callable[[str, str], float] | None,
                     step: int, limit: int | None = None, reference_file: Path | None = None,
                     judge: Callable | None = None) -> dict:
    """Evaluate on the held-out prompts (rank 0), log the metrics and samples at ``step``,
    and return the metrics on every rank ({} without held-out prompts).

    ``limit`` evaluates only the first ``limit`` prompts (periodic evaluations, to bound
    their cost). ``reference_file`` holds the SFT policy's per-prompt rows: the evaluation
    at step 0 (the policy is still the SFT policy) writes it, later ones compute win rates
    over it on the same prompts.

    ``judge`` (the watchdog's judge, :func:`watchdog_judge`) adds ``watchdog/reward`` and
    ``watchdog/judge``: the training reward and the judge, on the first ``eval_max_prompts``
    prompts (the periodic evaluations' subset, so every evaluation compares the same prompts).
    """
    from rlhf import distributed as dist
    from rlhf.tracking import StageProgress

    if not s.eval_ids:
        return {}
    # Rank 0 evaluates alone (same prompts and seed as a single-process run, so numbers
    # compare across launches); the model has no collectives, the others just wait. Under
    # FSDP its forwards are collectives, so every rank evaluates the same prompts with the
    # same seed (identical results) with the policy gathered; rank 0 logs.
    ev = {}
    with full_params_for_generation(s.model):
        if dist.is_main() or is_sharded(s.model):
            n = len(s.eval_ids) if limit is None else min(limit, len(s.eval_ids))
            reference = None
            if reference_file is not None and step > 0 and reference_file.exists():
                reference = _read_json(reference_file).get("rows", [])[:n]
            # the first evaluation covers every held-out prompt: minutes on a CPU, so it shows progress
            bar = StageProgress("ppo eval", n, unit="prompt", enabled=dist.is_main())
            ev, rows = evaluate(s.model, s.tok, s.eval_ids[:n], s.eval_texts[:n], cfg, s.gen_cfg, s.stop_ids, s.pad_id,
                                s.device, gold_fn, seed=cfg.seed + 1_000_003, suffix=s.score_suffix, engine=s.engine,
                                reference=reference, on_batch=bar.update)
            bar.close()
        if dist.is_main():
            if judge is not None:
                ev.update(watch_metrics(s, cfg, rows[: cfg.eval_max_prompts], judge))
            if reference_file is not None and step == 0:
                write_json(reference_file, {"rows": [{"score": r["score"], "gold": r["gold"]} for r in rows]})
            tracker.log(ev, step=step)
            tracker.log_samples(step, [dict(r, step=step) for r in rows[: cfg.num_samples_logged]])
    return dist.broadcast_object(ev)


def prompt_indices(s: PPOSetup, cfg: PPOConfig, update: int, draw: int = 0) -> list[int]:
    """The training prompt of each row of this rank's rollout ``update`` (``draw`` as in
    :func:`sample`): a pure function of (seed, update, draw), ``num_generations`` adjacent
    rows per prompt. Several processes: the global batch's prompts, of which this rank takes
    a disjoint slice."""
    from rlhf import distributed as dist

    idx = _prompt_order(len(s.prompt_ids), cfg.seed + 7_919 * draw, update, s.per_rollout_prompts * s.world)
    lo, hi = dist.shard_bounds(len(idx), s.rank, s.world)
    return [i for i in idx[lo:hi] for _ in range(cfg.num_generations)]


def sample(s: PPOSetup, cfg: PPOConfig, update: int, draw: int = 0) -> tuple[Sampled, torch.Tensor | None]:
    """Steps 1 and 2 of an update: this rank's prompts of rollout ``update`` and the
    policy's responses (``num_generations`` of each prompt, adjacent); returns the batch
    and each row's prompt group (B,) (None with one sample per prompt). ``draw`` > 0 takes
    further prompts for the same update (dynamic sampling), from another seeded order."""
    from rlhf import distributed as dist

    rows = [s.prompt_ids[i] for i in prompt_indices(s, cfg, update, draw)]
    group_ids = None
    if cfg.num_generations > 1:
        group_ids = torch.arange(s.per_rollout_prompts, device=s.device).repeat_interleave(cfg.num_generations)
    ids, mask = left_pad(rows, s.pad_id, s.device)
    torch.manual_seed(dist.rank_seed(cfg.seed * 1_000_003 + update + 104_723 * draw, s.rank))  # ranks sample differently
    with full_params_for_generation(s.model):  # FSDP: ranks decode different numbers of steps
        return s.engine.sample(ids, mask), group_ids


def dynamic_sampling(s: PPOSetup, cfg: PPOConfig, update: int, batch: ScoredRollout, group_ids: torch.Tensor,
                     source_values: dict[str, torch.Tensor] | None = None) -> tuple[ScoredRollout, torch.Tensor, dict]:
    """DAPO's dynamic sampling (arXiv 2503.14476; ``ppo.dynamic_sampling``): the scored
    rollout with the groups whose final scores are all equal (no group-relative signal)
    replaced by further prompts, sampled and scored until this process holds a full batch
    of informative groups or ``dynamic_sampling_max_rounds`` rollouts were drawn. A batch
    still short is filled with dropped groups, in the order drawn (counted as filler).

    Returns the batch (as many rows as ``batch``, groups adjacent), its group ids (B,) and
    the metrics ``dynamic_sampling/*`` (counts over every process). Every process draws as
    many rounds as the one that needs most: generation under FSDP is collective. The
    reward sources' raw values of further draws are appended to ``source_values`` in place.
    """
    from rlhf import distributed as dist
    from rlhf.ppo.rollout import concat_rows

    k = cfg.num_generations
    need = batch.response_ids.shape[0] // k
    source_values = {} if source_values is None else source_values
    parts: list[ScoredRollout] = []
    good: list[tuple[int, int]] = []  # (part, group within the part) of informative groups
    bad: list[tuple[int, int]] = []
    while True:
        ok = F.informative_groups(final_scores(batch, cfg), group_ids).view(-1, k)[:, 0].tolist()
        good += [(len(parts), g) for g, o in enumerate(ok) if o]
        bad += [(len(parts), g) for g, o in enumerate(ok) if not o]
        parts.append(batch)
        short = float(dist.all_reduce_sum(torch.tensor(float(max(need - len(good), 0)), device=s.device)))
        if short == 0 or len(parts) >= cfg.dynamic_sampling_max_rounds:
            break
        draw = len(parts)
        sampled, group_ids = sample(s, cfg, update, draw=draw)
        batch = score_rollout(s.model, sampled, cfg, chunk=cfg.per_device_train_batch_size * 2, suffix=s.score_suffix,
                              with_values=uses_critic(cfg))
        batch, values = score_with_sources(s, cfg, batch, prompt_indices(s, cfg, update, draw))
        for name, v in values.items():
            source_values[name] = torch.cat([source_values[name], v])
        _check_finite(batch)
    chosen = good[:need]
    filler = bad[: need - len(chosen)]
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.response_ids.shape[0])
    rows = torch.tensor([starts[p] + g * k + j for p, g in chosen + filler for j in range(k)], device=s.device)
    counts = dist.all_reduce_sum(torch.tensor([float(len(bad)), float(len(filler)), float(len(good))], device=s.device))
    stats = {"dynamic_sampling/rounds": float(len(parts)), "dynamic_sampling/dropped_groups": float(counts[0]),
             "dynamic_sampling/filler_groups": float(counts[1]), "dynamic_sampling/informative_groups": float(counts[2])}
    return concat_rows(parts).index(rows), torch.arange(need, device=s.device).repeat_interleave(k), stats


def train_update(s: PPOSetup, opt: Optimization, cfg: PPOConfig, update: int,
                 phase: Callable[[str], None] | None = None) -> dict:
    """One PPO update (steps 1-7 of the module docstring); returns its metrics.

    ``phase(text)`` hears what the update is doing ("generating", "minibatch 3/8"), for the
    progress bar: one update can take minutes on a CPU.
    """
    from rlhf import distributed as dist

    def say(text: str) -> None:
        if phase is not None:
            phase(f"update {update + 1}: {text}")

    t0 = time.time()
    # 1-2. this update's prompts; generate with the policy role
    say("generating")
    sampled, group_ids = sample(s, cfg, update)
    _sync(s.device)
    t_gen = time.time() - t0

    # 3. score: logprobs (policy, reference), values, reward on the last real token
    say("scoring")
    batch = score_rollout(s.model, sampled, cfg, chunk=cfg.per_device_train_batch_size * 2, suffix=s.score_suffix,
                          with_values=uses_critic(cfg))
    # the reward sources of ppo.rewards (functions, HTTP, the RM) make the score
    batch, source_values = score_with_sources(s, cfg, batch, prompt_indices(s, cfg, update))
    _sync(s.device)
    t_score = time.time() - t0 - t_gen
    _check_finite(batch)
    sampling_stats: dict = {}
    if cfg.dynamic_sampling:  # drop prompts whose samples all score alike, sample more (DAPO)
        batch, group_ids, sampling_stats = dynamic_sampling(s, cfg, update, batch, group_ids, source_values)
    sampling_stats.update(source_statistics(s, source_values))

    # the train/inference mismatch: the sampler's logprobs against the trainer's (rlhf/ppo/mismatch.py)
    mismatch, is_weights = rollout_mismatch(batch, cfg)

    # 4. per-token rewards with the KL penalty
    beta = float(opt.kl_ctl.value)
    scores, kl, rewards = shaped_rewards(batch, cfg, beta, all_reduce=dist.all_reduce_sum)

    # 5. advantages, whitened over the whole rollout batch (of all processes)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, beta, group_ids,
                                          all_reduce=dist.all_reduce_sum)

    # 6. PPO epochs x minibatches, micro-batches accumulate exact minibatch gradients
    loss_mask = F.truncated_loss_mask(batch.response_mask, batch.has_stop) if cfg.mask_truncated_completions else None
    stats = _ppo_update(s.model, opt.optimizer, opt.scheduler, batch, adv, returns, cfg, beta, update,
                        rank=s.rank, world=s.world, is_weights=is_weights, on_step=say, loss_mask=loss_mask)
    _sync(s.device)
    t_update = time.time() - t0 - t_gen - t_score

    # 7. KL controller, metrics, guards
    step_stats = rollout_statistics(batch, scores, kl, rewards, adv, beta) | mismatch
    opt.kl_ctl.update(step_stats["kl/per_token" if cfg.kl_unit == "token" else "kl/mean"], s.global_batch)
    step_stats["episodes"] = (update + 1) * s.global_batch
    if uses_critic(cfg):
        step_stats.update(explained_variance(batch.values, returns, batch.response_mask, dist.all_reduce_sum))
    else:  # no critic: no value metrics (a constant 0 would show up as a value section in the dashboard)
        del step_stats["value/mean"]
    step_stats = {
        **step_stats, "lr": float(opt.scheduler.get_last_lr()[0]),
        "time/generate_s": t_gen, "time/score_s": t_score, "time/update_s": t_update,
        "episodes_per_s": s.global_batch / max(time.time() - t0, 1e-9),
        **stats, **sampling_stats,
    }
    _check_guards(step_stats, cfg, opt.length_streak)
    return step_stats


def run_ppo(cfg: PPOConfig, *, group: str | None = None, resume: bool = False,
            gold_fn: Callable[[str, str], float] | None = None, stop_after: int | None = None,
            registration=None) -> StageResult:
    """Run PPO; its artifacts are ``policy`` (and ``value`` with a critic).

    Inputs arrive resolved (:func:`rlhf.resolve.resolve_inputs`): a base directory or hub id,
    adapter directories, and prompt files or pinned data-store references.

    Args:
        gold_fn: optional ``(prompt, response) -> float`` used for evaluation only (the
            synthetic task's gold reward); it never enters training.
        stop_after: stop after this many updates (tests of resume); checkpoints as usual.
        registration: where :func:`rlhf.stages.common.publish` registers the adapters (rank 0).
    """
    from rlhf import distributed as dist
    from rlhf.stages.common import publish
    from rlhf.tracking import StageProgress, Tracker

    check_engine_supported()
    if cfg.generation == "vllm":  # before any model loads: vLLM importable, transformers in its range
        from rlhf.generation_vllm import check_vllm

        check_vllm()
    main = dist.is_main()  # only rank 0 writes files
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), out / "config.yaml")
    if not cfg.reward_adapter and uses_reward_model(cfg):
        raise ConfigError("ppo.reward_adapter: required (ppo.rewards scores with the reward model: {rm: reward})")
    torch.manual_seed(cfg.seed)

    # 0. one base, four roles; prompts; optimizer; resume from the newest complete checkpoint
    s = setup(cfg, task_evaluate=gold_fn)
    opt = build_optimization(s.model, cfg, s.num_updates)
    ckpt_root = out / "checkpoints"
    start = 0
    with full_state(s.model, opt.optimizer):  # FSDP: every rank loads full tensors, keeps its shard
        found = load_checkpoint(ckpt_root, s.model, opt) if resume else None
    if found:
        start, d = found
        if main:
            print(f"[ppo] resumed from {d} (update {start} of {s.num_updates})")
    tracker = Tracker(out.parent, out.name, config=to_dict(cfg),
                      report_to=cfg.report_to, group=group,
                      refs={"base": s.base_path, "sft_adapter": cfg.sft_adapter, "reward_adapter": cfg.reward_adapter},
                      is_main_process=main)
    sft_rows = out / "initial_eval_rows.json"  # the SFT policy's per-prompt results, for win rates
    # the over-optimisation watchdog: training reward vs a held-out judge at each evaluation
    # (rlhf/watchdog.py); a resumed run starts watching at its first evaluation
    judge = watchdog_judge(cfg, gold_fn, s)
    watchdog = Watchdog(cfg.watchdog_patience) if judge is not None and s.eval_ids else None
    best_weights: list[torch.Tensor] = []  # the trainable roles at the judge's best evaluation
    initial_eval = (evaluate_and_log(s, cfg, tracker, gold_fn, 0, reference_file=sft_rows, judge=judge) if start == 0
                    else _read_json(out / "initial_eval.json"))
    if watchdog is not None and start == 0:
        _watch(watchdog, initial_eval, 0, opt, best_weights)
    if start == 0 and main:
        write_json(out / "initial_eval.json", initial_eval)

    # 1-7. updates, with evaluation and checkpoints between them
    metrics: dict = {}
    bar = StageProgress("ppo", s.num_updates, unit="update", initial=start, enabled=main)
    tripped = False
    for update in range(start, s.num_updates):
        if stop_after is not None and update >= stop_after or tripped:
            break
        metrics = train_update(s, opt, cfg, update, phase=bar.phase)
        if update == start and main:
            warn_if_cut_off(metrics["response/stop_rate"], cfg, [s.tok.convert_ids_to_tokens(i) for i in s.stop_ids])
        tracker.log(metrics, step=update + 1)
        bar.update(1, {"score": metrics["reward/score_mean"], "kl": metrics["kl/mean"]})
        done = update + 1
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done < s.num_updates:
            ev = evaluate_and_log(s, cfg, tracker, gold_fn, done, limit=cfg.eval_max_prompts, reference_file=sft_rows,
                                  judge=judge)
            tripped = watchdog is not None and _watch(watchdog, ev, done, opt, best_weights)
        if cfg.save_steps and (done % cfg.save_steps == 0 or done == s.num_updates):
            with full_state(s.model, opt.optimizer):  # FSDP: gathered on every rank, written by rank 0
                if main:
                    save_checkpoint(ckpt_root, s.model, opt, cfg, done)
    bar.close()

    # final evaluation and the published adapters
    finished = (stop_after is None) or stop_after >= s.num_updates or tripped
    final_eval = {}
    if finished and not tripped:
        final_eval = evaluate_and_log(s, cfg, tracker, gold_fn, s.num_updates, reference_file=sft_rows, judge=judge)
        tripped = watchdog is not None and _watch(watchdog, final_eval, s.num_updates, opt, best_weights,
                                                  final=True)
    if tripped:  # publish the policy the judge liked best, evaluated again in full
        _restore(opt, best_weights)
        if main:
            print(f"[ppo] watchdog: {watchdog.reason()}; stopped, and the published policy is the one of update "
                  f"{watchdog.best_step}, the judge's best ({watchdog.best_judge:.4g})", flush=True)
        final_eval = evaluate_and_log(s, cfg, tracker, gold_fn, s.num_updates, reference_file=sft_rows, judge=judge)
    tracker.finish()
    result_metrics = {**(watchdog.summary() if watchdog is not None else {}),
                      **{f"train/{k}": v for k, v in metrics.items()},
                      **summary.prefixed(summary.REFERENCE, initial_eval),
                      **summary.prefixed(summary.TRAINED, final_eval)}
    roles = _trained_roles(cfg)
    with full_state(s.model):  # FSDP: the full adapters, gathered on every rank
        if finished and main:
            for role in roles:
                publish(out, role, lambda tmp, role=role: _save_role(s, role, tmp), role=role, base=s.base_path,
                        config=to_dict(cfg), registration=registration)
            write_json(out / "metrics.json", result_metrics)
    dist.barrier()  # the other ranks return once rank 0 has published the adapters
    return StageResult(stage="ppo", output_dir=str(out), base=s.base_path,
                       artifacts={role: str(out / role) for role in roles} if finished else {},
                       metrics=result_metrics, finished=finished)


def _save_role(s: PPOSetup, role: str, out: Path) -> None:
    """One trained role's adapter (LoRA weights, head) with the tokenizer PPO used beside it."""
    from rlhf.models import save_tokenizer

    s.model.save_role(role, out)
    save_tokenizer(s.tok, out)


def _sync(device) -> None:
    """Wait for queued GPU work so that phase timings bill each phase its own kernels."""
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}
