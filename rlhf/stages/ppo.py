"""Stage 3: PPO of the SFT policy against the reward model, on one base with LoRA roles.

One update, top to bottom (see ``../shared/docs/ppo.md`` for every default's source):

  1. sample a rollout batch of prompts (deterministic in seed and update number)
  2. generate responses with the policy role (T=0.7, top_k 0, top_p 1, nothing from the
     model's generation_config leaks); truncate each after its first stop token
  3. score: policy and reference (sft role) logprobs, values (value role), and the reward
     model's score on the last real token (reward role)
  4. per-token rewards = -beta * KL_t, plus the score on the last real token
  5. advantages with GAE (or a critic-free estimator), whitened over the whole batch
  6. PPO epochs over shuffled minibatches; micro-batches accumulate gradients that equal
     the unaccumulated ones (losses are normalised by the minibatch's token count)
  7. KL controller update, metrics, guards, evaluation and checkpoints

Resume: a checkpoint holds the policy and value adapters (+ value head), optimizer,
scheduler, KL controller and RNG states and the update number; prompts and minibatch
shuffles are derived from (seed, update), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf import ppo as F
from rlhf.config import PPOConfig, save_yaml, to_dict
from rlhf.stages.common import write_json


class GuardTripped(RuntimeError):
    """A watched metric left its allowed range; the run stops, checkpoints stay intact."""

    def __init__(self, metric: str, value: float, limit: str):
        super().__init__(f"PPO stopped: {metric} = {value:.6g} ({limit}); the last good checkpoint is kept")
        self.metric, self.value = metric, value


@dataclass
class Rollout:
    """One rollout batch. P = prompt length (left-padded), T = response length."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, T), pad after the first stop token
    response_mask: torch.Tensor  # (B, T) float, 1 up to and including the stop token
    has_stop: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor | None = None  # (B, T) policy, at temperature T
    ref_logprobs: torch.Tensor | None = None  # (B, T) sft role
    entropy: torch.Tensor | None = None  # (B, T)
    values: torch.Tensor | None = None  # (B, T) value of the state before each token
    scores: torch.Tensor | None = None  # (B,) reward model score on the last real token

    def index(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)


# ---------------------------------------------------------------------------------------
# building blocks (each used by the loop below and by the tests)


def encode_prompts(tok, prompts: list[list[dict]], max_len: int) -> list[list[int]]:
    """Chat-template each prompt (with the generation prompt) and keep its last ``max_len`` tokens."""
    out = []
    for msgs in prompts:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        out.append(ids[-max_len:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generation_config(cfg: PPOConfig, stop_id: int, pad_id: int):
    """A complete sampling config: every knob set, so the model's generation_config.json
    (e.g. a baked-in top_k or repetition penalty) cannot leak into PPO sampling."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=cfg.response_length, min_new_tokens=0,
        eos_token_id=stop_id, pad_token_id=pad_id, bos_token_id=None, num_beams=1, use_cache=True,
        suppress_tokens=None, begin_suppress_tokens=None, bad_words_ids=None, forced_eos_token_id=None,
    )


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, gen_cfg, stop_id: int, pad_id: int, response_length: int) -> Rollout:
    """Sample responses with the policy role; pad/truncate to exactly ``response_length``."""
    from transformers import GenerationConfig

    # transformers fills every field we leave unset (None) from the model's own
    # generation_config.json (min_p, min_length, suppress_tokens, bad_words_ids, ...), so the
    # model's defaults are swapped for neutral ones during the call: only ``gen_cfg`` counts.
    lm = model.base_lm
    saved, lm.generation_config = lm.generation_config, GenerationConfig()
    try:
        with model.role("policy"):
            out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    finally:
        lm.generation_config = saved
    resp = out[:, prompt_ids.shape[1]:]
    if resp.shape[1] < response_length:
        fill = torch.full((resp.shape[0], response_length - resp.shape[1]), pad_id, dtype=resp.dtype, device=resp.device)
        resp = torch.cat([resp, fill], dim=1)
    ids, mask, has_stop = F.first_stop_truncate(resp[:, :response_length], stop_id, pad_id)
    return Rollout(prompt_ids, prompt_mask, ids, mask.float(), has_stop)


def response_logprobs(model, role: str, batch: Rollout, temperature: float, with_entropy: bool = False):
    """Logprobs (B, T) of the response tokens under ``role`` at the sampling temperature;
    only the response positions' logits are materialised."""
    P = batch.prompt_ids.shape[1]
    T = batch.response_ids.shape[1]
    with model.role(role):
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    logits = model.lm_logits(hidden[:, P - 1: P - 1 + T])
    lp = F.logprobs_from_logits(logits, batch.response_ids, temperature)
    ent = F.entropy_from_logits(logits, temperature) if with_entropy else None
    return lp, ent


def response_values(model, batch: Rollout) -> torch.Tensor:
    """Value (B, T) of the state before each response token (value role)."""
    P = batch.prompt_ids.shape[1]
    T = batch.response_ids.shape[1]
    with model.role("value"):
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    return model.values("value", hidden[:, P - 1: P - 1 + T])


def last_token_scores(model, role: str, batch: Rollout) -> torch.Tensor:
    """Head score (B,) of ``role`` at the last real response token (the stop token when
    present), never at the padding after it (TRL 1.12 scored one position late: trl
    issues 1893, 3750)."""
    P = batch.prompt_ids.shape[1]
    with model.role(role):
        hidden = model.hidden_states(batch.input_ids, batch.attention_mask)
    pos = P + F.last_token_index(batch.response_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
    return model.values(role, picked)


@torch.no_grad()
def score_rollout(model, batch: Rollout, cfg: PPOConfig, chunk: int) -> Rollout:
    """Fill logprobs, ref_logprobs, entropy, values and scores, ``chunk`` rows at a time."""
    parts: dict[str, list] = {k: [] for k in ("logprobs", "ref_logprobs", "entropy", "values", "scores")}
    for s in range(0, batch.response_ids.shape[0], chunk):
        mb = batch.index(torch.arange(s, min(s + chunk, batch.response_ids.shape[0]), device=batch.response_ids.device))
        lp, ent = response_logprobs(model, "policy", mb, cfg.temperature, with_entropy=True)
        ref, _ = response_logprobs(model, "sft", mb, cfg.temperature)
        parts["logprobs"].append(lp)
        parts["entropy"].append(ent)
        parts["ref_logprobs"].append(ref)
        parts["values"].append(response_values(model, mb) if cfg.advantage_estimator == "gae" else torch.zeros_like(lp))
        # a model without a reward role (DPO's evaluation without a reward stage) has no score
        parts["scores"].append(last_token_scores(model, "reward", mb) if model.has_reward
                               else torch.full_like(lp[:, 0], float("nan")))
    for k, v in parts.items():
        setattr(batch, k, torch.cat(v))
    return batch


def shaped_rewards(batch: Rollout, cfg: PPOConfig, kl_coef: float,
                   whiten: Callable = F.masked_whiten) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores after the stop-token penalty and clipping, per-token KL, per-token rewards.

    ``whiten`` is ``rlhf.distributed.masked_whiten`` under several processes (global statistics)."""
    scores = F.apply_missing_stop_penalty(batch.scores, batch.has_stop, cfg.missing_stop_penalty, cfg.missing_stop_value)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    kl = torch.where(batch.response_mask.bool(), F.kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator), 0.0)
    rewards = F.per_token_rewards(scores, kl if cfg.kl_in_reward else torch.zeros_like(kl), batch.response_mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, batch.response_mask, shift_mean=False)
    return scores, kl, rewards


def advantages_and_returns(batch: Rollout, rewards: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor,
                           cfg: PPOConfig, kl_coef: float, group_ids: torch.Tensor | None,
                           whiten: Callable = F.masked_whiten):
    mask = batch.response_mask
    if cfg.advantage_estimator == "gae":
        adv, returns = F.compute_gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
    elif cfg.advantage_estimator == "reinforce++":
        returns = F.reinforce_pp_returns(rewards, mask, cfg.gamma)
        adv = returns
    else:  # rloo: sequence reward = score - beta * sum KL, leave-one-out baseline per prompt
        seq = scores - (kl_coef * (kl * mask).sum(1) if cfg.kl_in_reward else 0.0)
        adv = F.rloo_advantages(seq, group_ids)[:, None].expand_as(mask).contiguous()
        returns = adv
    return whiten(adv, mask) * mask, returns


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
    from rlhf.adapters import RoleModel, resolve_adapter
    from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer, resolve_base

    base_path = resolve_base(cfg.model.name_or_path, seed=cfg.seed)
    tok = load_tokenizer(base_path, cfg.model.revision, cfg.model.trust_remote_code)
    base = load_causal_lm(base_path, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                          trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    disable_dropout(base)
    model = RoleModel(base, resolve_adapter(cfg.sft_adapter) if cfg.sft_adapter else None, resolve_adapter(cfg.reward_adapter),
                      policy_lora={"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                                   "target_modules": cfg.lora.target_modules if cfg.lora.target_modules != "all-linear" else None})
    model.to(device)
    if cfg.gradient_checkpointing:
        model.base_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # dropout is 0 everywhere, so train mode is deterministic (ppo.md test 12)
    return model, tok, base_path


def _stop_id(tok, cfg: PPOConfig) -> int:
    if cfg.stop_token is None:
        return tok.eos_token_id
    ids = tok.convert_tokens_to_ids(cfg.stop_token)
    if ids is None or ids == tok.unk_token_id:
        raise ValueError(f"ppo.stop_token {cfg.stop_token!r} is not a single token of the tokenizer")
    return ids


def _decode(tok, batch: Rollout) -> list[str]:
    texts = []
    for ids, m in zip(batch.response_ids, batch.response_mask):
        n = int(m.sum())
        texts.append(tok.decode(ids[:n].tolist(), skip_special_tokens=True))
    return texts


@torch.no_grad()
def evaluate(model, tok, eval_ids: list[list[int]], eval_texts: list[str], cfg: PPOConfig, gen_cfg, stop_id: int,
             pad_id: int, device, gold_fn: Callable[[str, str], float] | None, seed: int) -> tuple[dict, list[dict]]:
    """Sample once per held-out prompt (fixed seed, so every evaluation sees the same random
    stream) and report score, KL to the reference, entropy, length, and gold reward if known.
    Means come with standard errors over prompts."""
    torch.manual_seed(seed)
    rows, per = [], {k: [] for k in ("score", "kl", "entropy", "length", "gold")}
    for s in range(0, len(eval_ids), cfg.rollout_batch_size):
        ids, mask = left_pad(eval_ids[s: s + cfg.rollout_batch_size], pad_id, device)
        batch = generate(model, ids, mask, gen_cfg, stop_id, pad_id, cfg.response_length)
        batch = score_rollout(model, batch, cfg, chunk=cfg.micro_batch_size * 2)
        scores = F.apply_missing_stop_penalty(batch.scores, batch.has_stop, cfg.missing_stop_penalty, cfg.missing_stop_value)
        kl = F.masked_sum(F.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1"), batch.response_mask, dim=1)
        ent = F.masked_mean(batch.entropy, batch.response_mask, dim=1)
        texts = _decode(tok, batch)
        for i, text in enumerate(texts):
            prompt = eval_texts[s + i]
            if model.has_reward:
                per["score"].append(float(scores[i]))
            per["kl"].append(float(kl[i]))
            per["entropy"].append(float(ent[i]))
            per["length"].append(float(batch.response_mask[i].sum()))
            gold = gold_fn(prompt, text) if gold_fn is not None else None
            if gold is not None:
                per["gold"].append(gold)
            rows.append({"prompt": prompt, "completion": text, "score": float(scores[i]) if model.has_reward else None,
                         "gold": gold})
    out = {}
    for k, vals in per.items():
        if vals:
            t = torch.tensor(vals, dtype=torch.float64)
            out[f"eval/{k}_mean"] = float(t.mean())
            out[f"eval/{k}_se"] = float(t.std(unbiased=True) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0
    return out, rows


def _check_guards(stats: dict, cfg: PPOConfig) -> None:
    for k, v in stats.items():
        if not math.isfinite(v):
            raise GuardTripped(k, v, "not finite")
    if stats["kl/mean"] > cfg.guard_max_kl:
        raise GuardTripped("kl/mean", stats["kl/mean"], f"above guard_max_kl={cfg.guard_max_kl}")
    if stats["entropy/mean"] < cfg.guard_min_entropy:
        raise GuardTripped("entropy/mean", stats["entropy/mean"], f"below guard_min_entropy={cfg.guard_min_entropy}")
    if stats["response/length_mean"] < cfg.guard_min_length:
        raise GuardTripped("response/length_mean", stats["response/length_mean"], f"below guard_min_length={cfg.guard_min_length}")
    limit = cfg.guard_max_length_fraction * cfg.response_length
    if stats["response/length_mean"] > limit:
        raise GuardTripped("response/length_mean", stats["response/length_mean"], f"above {limit:.1f} tokens")


def run_ppo(cfg: PPOConfig, *, run_dir: Path | None = None, stage_name: str = "ppo", group: str | None = None,
            resume: bool = False, gold_fn: Callable[[str, str], float] | None = None,
            stop_after: int | None = None) -> dict:
    """Run PPO and return ``{"policy": dir, "value": dir, "metrics": {...}}``.

    Args:
        gold_fn: optional ``(prompt, response) -> float`` used for evaluation only (the
            synthetic task's gold reward); it never enters training.
        stop_after: stop after this many updates (tests of resume); checkpoints as usual.
    """
    from rlhf import distributed as dist
    from rlhf.checkpoint import complete_checkpoints, load_state, rng_state, save_state, set_rng_state, write_checkpoint_dir
    from rlhf.data import load_prompts
    from rlhf.tracking import Tracker, progress

    # Several processes (accelerate launch): each generates rollout_batch_size episodes per
    # update, so the global batch is rollout_batch_size * world; only rank 0 writes files.
    dist.check_ppo_supported()
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), out / "config.yaml")
    if not cfg.reward_adapter:
        raise ValueError("ppo.reward_adapter is required")
    device = dist.device()
    torch.manual_seed(cfg.seed)

    # 0. one base, four roles; prompts
    with dist.main_first():  # the builtin base is materialised once, by rank 0
        model, tok, base_path = _build_model(cfg, device)
    stop_id, pad_id = _stop_id(tok, cfg), tok.pad_token_id
    prompts = load_prompts(cfg.prompts)
    eval_prompts = load_prompts(cfg.eval_prompts, split="test") if cfg.eval_prompts else []
    prompt_ids = encode_prompts(tok, prompts, cfg.max_prompt_length)
    prompt_texts = [p[-1]["content"] for p in prompts]
    eval_ids = encode_prompts(tok, eval_prompts, cfg.max_prompt_length)
    eval_texts = [p[-1]["content"] for p in eval_prompts]
    gen_cfg = generation_config(cfg, stop_id, pad_id)

    per_rollout_prompts = cfg.rollout_batch_size // (cfg.rloo_k if cfg.advantage_estimator == "rloo" else 1)
    global_batch = cfg.rollout_batch_size * world
    num_updates = max(1, cfg.total_episodes // global_batch)
    params = model.trainable_parameters("policy") + (
        model.trainable_parameters("value") if cfg.advantage_estimator == "gae" else [])
    dist.broadcast_parameters(params)  # every rank starts from rank 0's weights
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_eps)
    steps_per_update = cfg.ppo_epochs * cfg.num_minibatches
    total_steps = num_updates * steps_per_update
    schedule = (lambda step: 1.0) if cfg.lr_schedule == "constant" else (lambda step: max(0.0, 1.0 - step / total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    kl_ctl = (F.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_controller == "adaptive"
              else F.FixedKLController(cfg.kl_coef))

    # resume from the newest complete checkpoint
    ckpt_root = out / "checkpoints"
    start = 0
    if resume and (found := complete_checkpoints(ckpt_root, "update")):
        n, d = found[-1]
        _load_roles(model, d)
        state = load_state(d, "state", device="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_controller"])
        set_rng_state(state["rng"])
        start = n
        if main:
            print(f"[ppo] resumed from {d} (update {n} of {num_updates})")

    tracker = Tracker(run_dir or out.parent, stage_name if run_dir else out.name, config=to_dict(cfg), report_to=cfg.report_to, group=group,
                      refs={"base": base_path, "sft_adapter": cfg.sft_adapter, "reward_adapter": cfg.reward_adapter},
                      is_main_process=main)
    metrics: dict = {}

    def run_eval(update: int) -> dict:
        if not eval_ids:
            return {}
        # Rank 0 evaluates alone (same prompts and seed as a single-process run, so numbers
        # compare across launches); the model has no collectives, the others just wait.
        ev = {}
        if main:
            ev, rows = evaluate(model, tok, eval_ids, eval_texts, cfg, gen_cfg, stop_id, pad_id, device, gold_fn,
                                seed=cfg.seed + 1_000_003)
            tracker.log(ev, step=update)
            tracker.log_samples(update, [dict(r, step=update) for r in rows[: cfg.num_samples_logged]])
        return dist.broadcast_object(ev)

    def save_checkpoint(update: int) -> None:
        if not main:  # ranks hold identical weights and optimizer states; rank 0 writes them
            return

        def writer(tmp: Path):
            model.save_role("policy", tmp / "policy")
            if cfg.advantage_estimator == "gae":
                model.save_role("value", tmp / "value")
            save_state({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "kl_controller": kl_ctl.state_dict(), "rng": rng_state(), "update": update}, tmp, "state")
        write_checkpoint_dir(ckpt_root, f"update-{update}", writer)
        for _, old in complete_checkpoints(ckpt_root, "update")[: -cfg.keep_checkpoints]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)

    initial_eval = run_eval(0) if start == 0 else _read_json(out / "initial_eval.json")
    if start == 0 and main:
        write_json(out / "initial_eval.json", initial_eval)

    bar = progress(total=num_updates, initial=start, desc="ppo updates", disable=None if main else True)
    for update in range(start, num_updates):
        if stop_after is not None and update >= stop_after:
            break
        t0 = time.time()
        # 1. prompts of this update: a pure function of (seed, update)
        # (several processes: the global batch's prompts, of which this rank takes a disjoint slice)
        idx = _prompt_order(len(prompt_ids), cfg.seed, update, per_rollout_prompts * world)
        lo, hi = dist.shard_bounds(len(idx), rank, world)
        rows = [prompt_ids[i] for i in idx[lo:hi]]
        group_ids = None
        if cfg.advantage_estimator == "rloo":
            rows = [r for r in rows for _ in range(cfg.rloo_k)]
            group_ids = torch.arange(per_rollout_prompts, device=device).repeat_interleave(cfg.rloo_k)
        ids, mask = left_pad(rows, pad_id, device)

        # 2. generate with the policy role
        torch.manual_seed(dist.rank_seed(cfg.seed * 1_000_003 + update, rank))  # ranks sample differently
        batch = generate(model, ids, mask, gen_cfg, stop_id, pad_id, cfg.response_length)
        _sync(device)
        t_gen = time.time() - t0

        # 3. score: logprobs (policy, reference), values, reward on the last real token
        batch = score_rollout(model, batch, cfg, chunk=cfg.micro_batch_size * 2)
        _sync(device)
        t_score = time.time() - t0 - t_gen

        for name, t in (("reward/score", batch.scores), ("logprobs/policy", batch.logprobs),
                        ("logprobs/reference", batch.ref_logprobs), ("value", batch.values)):
            if not torch.isfinite(t).all():
                raise GuardTripped(name, float(t[~torch.isfinite(t)][0]), "not finite")

        # 4. per-token rewards with the KL penalty
        beta = float(kl_ctl.value)
        scores, kl, rewards = shaped_rewards(batch, cfg, beta, whiten=dist.masked_whiten)

        # 5. advantages, whitened over the whole rollout batch (of all processes)
        adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, beta, group_ids,
                                              whiten=dist.masked_whiten)

        # 6. PPO epochs x minibatches, micro-batches accumulate exact minibatch gradients
        stats = _ppo_update(model, optimizer, scheduler, batch, adv, returns, cfg, beta, update,
                            rank=rank, world=world)
        _sync(device)
        t_update = time.time() - t0 - t_gen - t_score

        # 7. KL controller, metrics, guards, evaluation, checkpoint
        mask_f = batch.response_mask
        # Statistics of the global batch (rows gathered from every process), so that the KL
        # controller and the guards take the same decision on every rank.
        scores_all = dist.gather_rows(scores)
        kl_per_response = dist.gather_rows(F.masked_sum(kl, mask_f, dim=1))
        kl_ctl.update(float(kl_per_response.mean()), global_batch)
        step_stats = {
            "reward/score_mean": float(scores_all.mean()),
            "reward/score_std": float(scores_all.std()) if scores_all.numel() > 1 else 0.0,
            "reward/shaped_mean": float(dist.gather_rows((rewards * mask_f).sum(1)).mean()),
            "kl/mean": float(kl_per_response.mean()),
            "kl/coef": beta,
            "entropy/mean": float(dist.masked_mean(batch.entropy, mask_f)),
            "response/length_mean": float(dist.gather_rows(mask_f.sum(1)).mean()),
            "response/stop_rate": float(dist.gather_rows(batch.has_stop.float()).mean()),
            "value/mean": float(dist.masked_mean(batch.values, mask_f)),
            "advantage/mean": float(dist.masked_mean(adv, mask_f)),
            "lr": float(scheduler.get_last_lr()[0]),
            "time/generate_s": t_gen, "time/score_s": t_score, "time/update_s": t_update,
            "episodes_per_s": global_batch / max(time.time() - t0, 1e-9),
            **stats,
        }
        _check_guards(step_stats, cfg)
        tracker.log(step_stats, step=update + 1)
        bar.update(1)
        bar.set_postfix(score=f"{step_stats['reward/score_mean']:.3f}", kl=f"{step_stats['kl/mean']:.3f}")
        metrics = step_stats
        done = update + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < num_updates:
            run_eval(done)
        if cfg.save_every and (done % cfg.save_every == 0 or done == num_updates):
            save_checkpoint(done)
    bar.close()
    finished = (stop_after is None) or stop_after >= num_updates
    final_eval = run_eval(num_updates) if finished else {}
    tracker.finish()

    result_metrics = {**{f"train/{k}": v for k, v in metrics.items()},
                      **{f"initial/{k}": v for k, v in initial_eval.items()},
                      **{f"final/{k}": v for k, v in final_eval.items()}}
    if finished and main:
        import tempfile

        from rlhf.stages.common import publish_dir

        for role in (("policy", "value") if cfg.advantage_estimator == "gae" else ("policy",)):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{role}-", dir=out))
            model.save_role(role, tmp)
            write_json(tmp / "rlhf_adapter.json", {"role": role, "base_path": base_path})
            publish_dir(tmp, out / role)
        write_json(out / "metrics.json", result_metrics)
    dist.barrier()  # the other ranks return once rank 0 has published the adapters
    return {"policy": str(out / "policy"), "value": str(out / "value"), "base": base_path,
            "metrics": result_metrics, "finished": finished}


def _sync(device) -> None:
    """Wait for queued GPU work so that phase timings bill each phase its own kernels."""
    if getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def _load_roles(model, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict

    from rlhf.adapters import read_head, read_lora_weights

    for role in ("policy", "value"):
        d = ckpt / role
        if not d.exists():
            continue
        state, _ = read_lora_weights(d)
        set_peft_model_state_dict(model.peft, state, adapter_name=role)
        if role in model.heads:
            head = read_head(d)
            with torch.no_grad():
                model.heads[role].weight.copy_(head["weight"])
                if "bias" in head and model.heads[role].bias is not None:
                    model.heads[role].bias.copy_(head["bias"])


def _ppo_update(model, optimizer, scheduler, batch: Rollout, adv, returns, cfg: PPOConfig, beta: float,
                update: int, rank: int = 0, world: int = 1) -> dict:
    """PPO epochs over shuffled minibatches of the rollout; returns mean statistics.

    With ``world`` processes, ``batch`` is this rank's slice ``[rank*B, (rank+1)*B)`` of the
    global batch of ``world*B`` rows. Every rank draws the same permutation of the global
    rows (same seed) and trains on its own rows of each global minibatch; losses are
    normalised by the global minibatch token count and gradients summed over ranks before
    the step, so each step equals the single-process step on the same global batch (the
    number of rows a rank holds in a minibatch varies; a rank may hold none).
    """
    from rlhf import distributed as dist

    B_local = batch.response_ids.shape[0]
    B = B_local * world
    lo = rank * B_local
    gen = torch.Generator().manual_seed(cfg.seed * 104_729 + update)
    sums: dict[str, float] = {}
    count = 0
    use_critic = cfg.advantage_estimator == "gae"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _epoch in range(cfg.ppo_epochs):
        for mb_idx in F.ppo_minibatch_indices(B, cfg.num_minibatches, gen):
            mb_idx = mb_idx.to(batch.response_ids.device)
            mb_idx = mb_idx[(mb_idx >= lo) & (mb_idx < lo + B_local)] - lo  # this rank's rows
            optimizer.zero_grad(set_to_none=True)
            n_tokens = dist.all_reduce_sum(batch.response_mask[mb_idx].sum()).clamp(min=1.0)
            acc: dict[str, float] = {}
            for micro in (mb_idx.split(cfg.micro_batch_size) if mb_idx.numel() else ()):
                mb = batch.index(micro)
                a, r = adv[micro], returns[micro]
                # policy: clipped surrogate (+ optional KL loss, entropy bonus)
                lp, ent = response_logprobs(model, "policy", mb, cfg.temperature, with_entropy=cfg.entropy_coef > 0)
                pg, pg_stats = F.policy_loss(lp, mb.logprobs, a, mb.response_mask, cfg.cliprange, normalizer=n_tokens)
                loss = pg
                if not cfg.kl_in_reward:
                    kl_tok = F.kl_penalty(lp, mb.ref_logprobs, cfg.kl_estimator)
                    loss = loss + beta * (kl_tok * mb.response_mask).sum() / n_tokens
                if cfg.entropy_coef > 0:
                    loss = loss - cfg.entropy_coef * (ent * mb.response_mask).sum() / n_tokens
                if not torch.isfinite(loss):
                    raise GuardTripped("loss/policy", float(loss), "not finite")
                loss.backward()
                w = float(mb.response_mask.sum() / n_tokens)
                acc["loss/policy"] = acc.get("loss/policy", 0.0) + float(pg.detach())
                for k, v in pg_stats.items():
                    acc[f"policy/{k}"] = acc.get(f"policy/{k}", 0.0) + float(v) * w
                # value: clipped value loss on the value role
                if use_critic:
                    v = response_values(model, mb)
                    vf, vf_stats = F.value_loss(v, mb.values, r, mb.response_mask, cfg.cliprange_value, normalizer=n_tokens)
                    if not torch.isfinite(vf):
                        raise GuardTripped("loss/value", float(vf), "not finite")
                    (cfg.vf_coef * vf).backward()
                    acc["loss/value"] = acc.get("loss/value", 0.0) + float(vf.detach())
                    for k, val in vf_stats.items():
                        acc[f"value/{k}"] = acc.get(f"value/{k}", 0.0) + float(val) * w
            dist.sum_gradients(params)  # no-op in one process
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                acc["grad_norm"] = float(norm)
            optimizer.step()
            scheduler.step()
            for k, v in acc.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    if world > 1:  # per-rank partial sums add up to the global minibatch statistics
        parts = dist.gather_objects(sums)
        norm = sums.get("grad_norm")  # computed after the gradient sum: equal on every rank
        sums = {k: sum(p.get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p})}
        if norm is not None:
            sums["grad_norm"] = norm
    return {k: v / count for k, v in sums.items()} | {"optimizer_steps": float(count)}
