"""Stage 3: PPO of the SFT policy against the reward model, on one base with LoRA roles.

One update, top to bottom (each default's source is cited at its field in ``rlhf/config.py``):

  1. sample a rollout batch of prompts (deterministic in seed and update number)
  2. generate responses with the policy role through the ``ppo.generation`` engine
     (rlhf/generation.py; T=0.7, top_k 0, top_p 1, nothing from the model's
     generation_config leaks); truncate each after its first stop token
  3. score: policy and reference (sft role) logprobs, values (value role), and the reward
     model's score on the last real token (reward role); sft and reward in one mixed-adapter batch
  4. per-token rewards = -beta * KL_t, plus the score on the last real token
  5. advantages with GAE (or a critic-free estimator: reinforce++, rloo, grpo), whitened
     over the whole batch (grpo: already normalised within each prompt's group)
  6. PPO epochs over shuffled minibatches; micro-batches accumulate gradients that equal
     the unaccumulated ones (per-token loss weights come from counts of the whole minibatch,
     for each ``loss_aggregation``)
  7. KL controller update, metrics, guards, evaluation and checkpoints

``run_ppo`` reads as these steps: :func:`setup` (model, prompts), :func:`build_optimization`,
:func:`load_checkpoint` (resume), then per update :func:`train_update` (steps 1-7, with
:func:`sample`, :func:`score_rollout`, :func:`shaped_rewards`, :func:`advantages_and_returns`
and ``_ppo_update``), :func:`evaluate_and_log` and :func:`save_checkpoint`. The rollout
types (:class:`rlhf.ppo.rollout.Sampled`, :class:`rlhf.ppo.rollout.ScoredRollout`) live in
``rlhf/ppo/``.

Critic-free estimators build no value role at all (no LoRA, head or optimizer state).

Resume: a checkpoint holds the policy and value adapters (+ value head), optimizer,
scheduler, KL controller and RNG states and the update number; prompts and minibatch
shuffles are derived from (seed, update), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from rlhf import ppo as F
from rlhf.atomic import write_json
from rlhf.config import ConfigError, PPOConfig, save_yaml, to_dict
from rlhf.estimators import advantages_and_returns, uses_critic
from rlhf.fsdp import even_share, full_params_for_generation, full_state, gather_rollout, is_sharded, shard_model
from rlhf.ppo.masked import AllReduce
from rlhf.ppo.rollout import Sampled, ScoredRollout
from rlhf.stages import StageResult

if TYPE_CHECKING:
    from rlhf.adapters import RoleModel


class GuardTripped(RuntimeError):
    """A watched metric left its allowed range; the run stops, checkpoints stay intact."""

    def __init__(self, metric: str, value: float, limit: str):
        super().__init__(f"PPO stopped: {metric} = {value:.6g} ({limit}); the last good checkpoint is kept")
        self.metric, self.value = metric, value


# ---------------------------------------------------------------------------------------
# building blocks (each used by the loop below and by the tests)


def _render_prompt(tok, msgs: list[dict]) -> list[int]:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def encode_prompts(tok, prompts: list[list[dict]], max_len: int) -> list[list[int]]:
    """Chat-template each prompt (with the generation prompt), at most ``max_len`` tokens.

    A longer prompt loses whole early turns, never part of a message: the system turn (if
    any) and the last turn stay, and the kept turns start with a user turn. Only when the
    system turn and the last turn alone are too long is the prompt cut from the left (its
    last ``max_len`` tokens). Both counts are reported in one warning.
    """
    out, dropped_turns, cut = [], 0, 0
    for msgs in prompts:
        ids = _render_prompt(tok, msgs)
        if len(ids) > max_len:
            system = list(msgs[:1]) if msgs and msgs[0].get("role") == "system" else []
            rest = list(msgs[len(system):])
            while len(ids) > max_len and len(rest) > 1:
                rest = rest[1:]
                while len(rest) > 1 and rest[0].get("role") != "user":
                    rest = rest[1:]
                ids = _render_prompt(tok, system + rest)
            dropped_turns += 1
            if len(ids) > max_len:
                cut += 1
                ids = ids[-max_len:]
        out.append(ids)
    if dropped_turns:
        import warnings

        warnings.warn(f"{dropped_turns} of {len(prompts)} prompts are longer than max_prompt_length={max_len} tokens: "
                      f"{dropped_turns - cut} lost early turns (the system turn kept), {cut} were cut from the left "
                      "inside a message (the last turn alone is too long); raise max_prompt_length to keep them whole",
                      stacklevel=2)
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


def generation_config(cfg: PPOConfig, stop_ids: int | list[int], pad_id: int):
    """A complete sampling config: every knob set, so the model's generation_config.json
    (e.g. a baked-in top_k or repetition penalty) cannot leak into PPO sampling. Generation
    ends at any of ``stop_ids``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=cfg.response_length, min_new_tokens=0,
        eos_token_id=_as_list(stop_ids), pad_token_id=pad_id, bos_token_id=None, num_beams=1, use_cache=True,
        suppress_tokens=None, begin_suppress_tokens=None, bad_words_ids=None, forced_eos_token_id=None,
    )


def _as_list(ids: int | list[int]) -> list[int]:
    return [ids] if isinstance(ids, int) else list(ids)


@contextmanager
def _mode(model, training: bool):
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


def generate(model, prompt_ids, prompt_mask, gen_cfg, stop_ids: int | list[int], pad_id: int,
             response_length: int) -> Sampled:
    """Sample responses with the policy role (eval mode) through HF ``generate`` (the ``hf``
    engine of :mod:`rlhf.generation`); truncate each after its first stop token (any of
    ``stop_ids``) and pad to exactly ``response_length``."""
    from rlhf.generation import HFEngine

    return HFEngine(model, gen_cfg, stop_ids, pad_id, response_length).sample(prompt_ids, prompt_mask)


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


def score_suffix(tok, stop_ids: list[int]) -> list[int]:
    """Tokens the chat template writes after an assistant turn's stop token.

    TRL's RewardTrainer scores the last token of the chat-templated conversation; for
    ChatML that is the newline after ``<|im_end|>``, not the stop token. PPO appends these
    tokens after a response's stop token before scoring, so the reward model scores where
    it was trained to. Empty when the template ends the turn with the stop token."""
    sentinel = "rlhfscoresentinel"
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": sentinel}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    tail = tok(text[text.rindex(sentinel) + len(sentinel):], add_special_tokens=False).input_ids
    while tail and tail[0] not in stop_ids:  # whitespace the template puts before the stop token
        tail = tail[1:]
    return [t for t in tail[1:]] if tail else []


def _score_inputs(batch: Sampled | ScoredRollout, suffix: list[int] | tuple = ()):
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
    input_ids, attention_mask, pos = _score_inputs(batch, suffix)
    with model.role(role):
        hidden = model.hidden_states(input_ids, attention_mask)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
    return model.values(role, picked)


def frozen_role_scores(model, batch: Sampled | ScoredRollout, temperature: float, suffix: list[int] | tuple = (),
                       mixed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (sft role) logprobs (B, T) and reward scores (B,) of ``batch``; the logprobs
    as :func:`response_logprobs` computes them, the scores at :func:`last_token_scores`'
    position (``suffix`` included).

    With ``mixed`` (and a model in eval mode), both frozen roles run as one forward over the
    batch stacked twice, each half under its own adapter (peft's mixed-adapter batches,
    ``adapter_names``; the sft role of a full-SFT base is ``__base__``): one pass of 2B rows
    instead of two passes of B, fewer kernel launches and better-filled matrix units. The
    reference half is right-padded (mask 0) to the width of the scored inputs, which
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
    if not mixed or hooks is None or model.training or not same_rounding:
        ref, _ = response_logprobs(model, "sft", batch, temperature)
        return ref, last_token_scores(model, "reward", batch, suffix)
    P = batch.prompt_ids.shape[1]
    B, T = batch.response_ids.shape
    score_ids, score_mask, pos = _score_inputs(batch, suffix)
    extra = score_ids.shape[1] - batch.input_ids.shape[1]
    ref_ids = torch.nn.functional.pad(batch.input_ids, (0, extra), value=0)
    ref_mask = torch.nn.functional.pad(batch.attention_mask, (0, extra), value=0)
    names = [model.adapter_name("sft")] * B + [model.adapter_name("reward")] * B
    with hooks(adapter_names=names):
        hidden = model.hidden_states(torch.cat([ref_ids, score_ids]), torch.cat([ref_mask, score_mask]))
    ref, _ = model.token_logprobs(hidden[:B, P - 1: P - 1 + T], batch.response_ids, temperature)
    scores = model.values("reward", hidden[B:][torch.arange(B, device=hidden.device), pos])
    return ref, scores


@torch.no_grad()
def score_rollout(model, batch: Sampled, cfg: PPOConfig, chunk: int, suffix: list[int] | tuple = ()) -> ScoredRollout:
    """Policy and reference logprobs, entropy, values and reward scores of ``batch``,
    computed ``chunk`` rows at a time, in eval mode (which also allows mixed-adapter
    batches); ``suffix`` as in :func:`last_token_scores`.

    Each role's forward runs once per chunk: policy (logprobs and entropy together), value
    (only with a critic), and the two frozen roles together (:func:`frozen_role_scores`).
    """
    parts: dict[str, list] = {k: [] for k in ("logprobs", "ref_logprobs", "entropy", "values", "scores")}
    with _mode(model, False):
        for s in range(0, batch.response_ids.shape[0], chunk):
            mb = batch.index(torch.arange(s, min(s + chunk, batch.response_ids.shape[0]), device=batch.response_ids.device))
            lp, ent = response_logprobs(model, "policy", mb, cfg.temperature, with_entropy=True)
            ref, scores = frozen_role_scores(model, mb, cfg.temperature, suffix)
            parts["logprobs"].append(lp)
            parts["entropy"].append(ent)
            parts["ref_logprobs"].append(ref)
            parts["values"].append(response_values(model, mb) if uses_critic(cfg) else torch.zeros_like(lp))
            parts["scores"].append(scores)
    return ScoredRollout.from_sampled(batch, **{k: torch.cat(v) for k, v in parts.items()})


def shaped_rewards(batch: ScoredRollout, cfg: PPOConfig, kl_coef: float,
                   all_reduce: AllReduce | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores after the stop-token penalty and clipping, per-token KL, per-token rewards.

    Returns:
        ``scores`` (B,), ``kl`` (B, T) (0 on padding) and ``rewards`` (B, T).
        ``all_reduce`` (several processes) makes reward whitening use global statistics.
    """
    scores = F.apply_missing_stop_penalty(batch.scores, batch.has_stop, cfg.missing_stop_penalty, cfg.missing_stop_value)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
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
    model = RoleModel(base, cfg.sft_adapter or None, cfg.reward_adapter,
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


def check_engine_supported(config_name: str = "ppo") -> None:
    """Refuse PPO under DeepSpeed ZeRO-3.

    PPO samples from the policy role between updates, which needs the sharded weights
    gathered; this loop does that with FSDP2 (``rlhf/fsdp.py``), not with DeepSpeed.
    Supported: one process, DDP, FSDP2 and ZeRO-1/2 configs (the LoRA loop then runs data
    parallel with summed gradients; LoRA optimizer state is small, so sharding it would
    save little).

    Raises:
        rlhf.config.ConfigError: naming the engine and what is supported.
    """
    from rlhf.distributed import engine

    eng = engine()
    if eng == "deepspeed-zero3":
        raise ConfigError(
            f"{config_name}: PPO is not supported under {eng} (the policy samples between updates and this loop "
            "gathers sharded weights for generation only under FSDP2). To shard the base, launch PPO with "
            "pipelines/accelerate/fsdp2.yaml (or ddp.yaml / deepspeed_zero2.yaml if it fits on one device); "
            "SFT and reward run under every config in pipelines/accelerate/."
        )


def _stop_ids(tok, cfg: PPOConfig, lm=None) -> list[int]:
    """Token ids that end a response: ``ppo.stop_token`` (one token or a list), or by default
    :func:`rlhf.models.stop_token_ids`: the tokenizer's EOS, every EOS id of the model's
    generation config (Qwen2.5 Instruct ships two: ``<|im_end|>`` and ``<|endoftext|>``) and
    the chat template's end-of-turn token (``<|im_end|>`` on Qwen2.5 base, whose EOS is
    ``<|endoftext|>``)."""
    from rlhf.models import stop_token_ids

    if cfg.stop_token is None:
        ids = stop_token_ids(tok, lm)
    else:
        ids = []
        for name in cfg.stop_token if isinstance(cfg.stop_token, list) else [cfg.stop_token]:
            i = tok.convert_tokens_to_ids(name)
            if i is None or i == tok.unk_token_id:
                raise ValueError(f"ppo.stop_token {name!r} is not a single token of the tokenizer")
            ids.append(i)
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if tok.pad_token_id in ids:
        raise ValueError(f"ppo.stop_token: the pad token {tok.pad_token!r} cannot also be a stop token")
    return ids


def _decode(tok, batch: Sampled | ScoredRollout) -> list[str]:
    texts = []
    for ids, m in zip(batch.response_ids, batch.response_mask):
        n = int(m.sum())
        texts.append(tok.decode(ids[:n].tolist(), skip_special_tokens=True))
    return texts


def split_eval_prompts(prompts: list, eval_prompts: list, cfg: PPOConfig) -> tuple[list, list]:
    """``(train, eval)`` prompts. Without ``eval_prompts`` a seeded ``cfg.eval_fraction`` of
    the prompts is held out (never trained on), at least ``cfg.eval_min_prompts`` (with a
    warning) and at most half of them; a single prompt is both trained on and evaluated."""
    if eval_prompts:
        return prompts, eval_prompts
    n = int(len(prompts) * cfg.eval_fraction)
    if n < cfg.eval_min_prompts:
        import warnings

        want = min(cfg.eval_min_prompts, len(prompts) // 2)
        warnings.warn(f"ppo: no eval_prompts and eval_fraction {cfg.eval_fraction} of {len(prompts)} prompts is {n}; "
                      f"holding out {max(want, 1)} of the training prompts for evaluation (ppo.eval_min_prompts)",
                      stacklevel=2)
        n = want
    if n == 0:
        return prompts, prompts[:1]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + 7)).tolist()
    held = set(order[:n])
    return [p for i, p in enumerate(prompts) if i not in held], [prompts[i] for i in sorted(held)]


def mean_se(vals: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0


def win_rates(rows: list[dict], reference: list[dict], key: str) -> list[float]:
    """Per prompt, 1 when ``rows[i][key]`` beats ``reference[i][key]`` (same prompt), 0.5 on
    a tie, 0 otherwise; prompts without a value on either side are skipped."""
    out = []
    for r, ref in zip(rows, reference):
        a, b = r.get(key), ref.get(key)
        if a is None or b is None:
            continue
        out.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return out


@torch.no_grad()
def evaluate(model, tok, eval_ids: list[list[int]], eval_texts: list[str], cfg: PPOConfig, gen_cfg,
             stop_ids: int | list[int], pad_id: int, device, gold_fn: Callable[[str, str], float] | None, seed: int,
             suffix: list[int] | tuple = (), engine=None, reference: list[dict] | None = None,
             on_batch: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Sample once per held-out prompt with ``engine`` (default: the hf engine), from a fixed
    seed so that every evaluation sees the same random stream, and report score, KL to the
    reference, entropy, length, and gold reward if known.
    With ``reference`` (the SFT policy's rows on the same prompts, in order) also the win
    rate over it by the reward model (``eval/win_rate_*``) and by the gold reward
    (``eval/gold_win_rate_*``). Means come with standard errors over prompts.
    ``on_batch(n)`` is called after each batch of ``n`` prompts (progress)."""
    torch.manual_seed(seed)
    rows, per = [], {k: [] for k in ("score", "kl", "entropy", "length", "gold")}
    for s in range(0, len(eval_ids), cfg.rollout_batch_size):
        ids, mask = left_pad(eval_ids[s: s + cfg.rollout_batch_size], pad_id, device)
        batch = (engine.sample(ids, mask) if engine is not None
                 else generate(model, ids, mask, gen_cfg, stop_ids, pad_id, cfg.response_length))
        batch = score_rollout(model, batch, cfg, chunk=cfg.micro_batch_size * 2, suffix=suffix)
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
                         "gold": gold, "length": per["length"][-1], "kl": per["kl"][-1]})
        if on_batch is not None:
            on_batch(len(texts))
    if reference:
        per["win_rate"] = win_rates(rows, reference, "score")
        per["gold_win_rate"] = win_rates(rows, reference, "gold")
    out = {"eval/prompts": float(len(rows))}
    for k, vals in per.items():
        if vals:
            out[f"eval/{k}_mean"], out[f"eval/{k}_se"] = mean_se(vals)
    return out, rows


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


@dataclass
class PPOSetup:
    """What one PPO run builds before its first update (the same on every process)."""

    model: "RoleModel"  # one frozen base with sft/policy/reward/value roles
    tok: object  # the tokenizer
    base_path: str  # the resolved base model
    stop_ids: list[int]  # any of them ends a response
    score_suffix: list[int]  # tokens the chat template writes after the stop token (score_suffix)
    pad_id: int
    gen_cfg: object  # transformers GenerationConfig, every sampling knob set
    engine: object  # the sampling engine of ppo.generation (rlhf.generation)
    prompt_ids: list[list[int]]  # encoded training prompts
    eval_ids: list[list[int]]  # encoded held-out prompts (may be empty)
    eval_texts: list[str]  # their last user turns, passed to the gold reward
    device: torch.device
    rank: int
    world: int  # number of processes
    per_rollout_prompts: int  # distinct prompts per rollout batch of one process
    global_batch: int  # episodes per update over all processes
    num_updates: int


@dataclass
class Optimization:
    """The trainable state a checkpoint holds besides the adapters."""

    params: list  # policy (+ value) LoRA and value-head parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: object  # F.FixedKLController or F.AdaptiveKLController
    length_streak: list[int] = field(default_factory=lambda: [0])  # the length guard's count of updates in a row


def generation_engine(name: str, device, sharded: bool) -> str:
    """The generation engine to build: ``name`` resolved for ``device``.

    Under FSDP2 only ``hf`` has been run inside the weight-gathering context; ``static``
    (compiled graphs over a static cache) and ``merged`` (a merged copy of base + policy)
    would hold or bake full weights outside it. ``auto`` therefore falls back to ``hf`` on a
    sharded model, and an explicit ``static``/``merged`` is refused.

    Raises:
        ConfigError: naming ``ppo.generation`` when the engine cannot run on a sharded model.
    """
    from rlhf.generation import resolve_engine

    resolved = resolve_engine(name, device)
    if resolved == "vllm":
        from rlhf import distributed as dist

        if dist.is_distributed():
            raise ConfigError("ppo.generation: 'vllm' runs in one process only (one engine beside one trainer); "
                              "use 'hf' or 'auto' under accelerate launch")
        return resolved
    if sharded and resolved != "hf":
        if name != "auto":
            raise ConfigError(f"ppo.generation: {name!r} is not supported under FSDP2 (sharded weights); use 'hf' or 'auto'")
        return "hf"
    return resolved


def setup(cfg: PPOConfig) -> PPOSetup:
    """Build the role model, tokenizer, sampling config and encoded prompts."""
    from rlhf import distributed as dist
    from rlhf.data import load_prompts

    device = dist.device()
    world, rank = dist.world_size(), dist.rank()
    model, tok, base_path = _build_model(cfg, device)
    stop_ids, pad_id = _stop_ids(tok, cfg, model.base_lm), tok.pad_token_id
    prompts, eval_prompts = split_eval_prompts(
        load_prompts(cfg.prompts), load_prompts(cfg.eval_prompts, split="test") if cfg.eval_prompts else [], cfg)
    # Several processes (accelerate launch): each generates rollout_batch_size episodes per
    # update, so the global batch is rollout_batch_size * world.
    global_batch = cfg.rollout_batch_size * world
    from rlhf.generation import make_engine

    gen_cfg = generation_config(cfg, stop_ids, pad_id)
    engine_name = generation_engine(cfg.generation, device, sharded=is_sharded(model))
    if engine_name == "vllm":
        from rlhf.generation_vllm import make_vllm_engine

        engine = make_vllm_engine(model, cfg, base_path, stop_ids, pad_id, device)
    else:
        engine = make_engine(engine_name, model, gen_cfg, temperature=cfg.temperature, stop_ids=stop_ids,
                             pad_id=pad_id, response_length=cfg.response_length, compile=cfg.compile, device=device)
    return PPOSetup(
        model=model, tok=tok, base_path=base_path, stop_ids=stop_ids, score_suffix=score_suffix(tok, stop_ids),
        pad_id=pad_id, gen_cfg=gen_cfg, engine=engine,
        prompt_ids=encode_prompts(tok, prompts, cfg.max_prompt_length),
        eval_ids=encode_prompts(tok, eval_prompts, cfg.max_prompt_length),
        eval_texts=[p[-1]["content"] for p in eval_prompts],
        device=device, rank=rank, world=world,
        per_rollout_prompts=cfg.rollout_batch_size // cfg.samples_per_prompt,
        global_batch=global_batch, num_updates=max(1, cfg.total_episodes // global_batch),
    )


def build_optimization(model, cfg: PPOConfig, num_updates: int) -> Optimization:
    """Adam over the trainable roles, the learning-rate schedule and the KL controller."""
    from rlhf import distributed as dist

    params = model.trainable_parameters("policy") + (
        model.trainable_parameters("value") if uses_critic(cfg) else [])
    dist.broadcast_parameters(params)  # every rank starts from rank 0's weights
    optimizer = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_eps)
    total_steps = num_updates * cfg.ppo_epochs * cfg.num_minibatches
    schedule = (lambda step: 1.0) if cfg.lr_schedule == "constant" else (lambda step: max(0.0, 1.0 - step / total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    kl_ctl = (F.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_controller == "adaptive"
              else F.FixedKLController(cfg.kl_coef))
    return Optimization(params, optimizer, scheduler, kl_ctl)


def _trained_roles(cfg: PPOConfig) -> tuple[str, ...]:
    return ("policy", "value") if uses_critic(cfg) else ("policy",)


def save_checkpoint(ckpt_root: Path, model, opt: Optimization, cfg: PPOConfig, update: int) -> None:
    """Write ``ckpt_root/update-N`` atomically (trained roles + optimizer, scheduler, KL
    controller and RNG states) and keep the newest ``cfg.keep_checkpoints``. Rank 0 only:
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
    if cfg.keep_checkpoints > 0:  # 0 keeps every checkpoint
        for _, old in complete_checkpoints(ckpt_root, "update")[: -cfg.keep_checkpoints]:
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
                     step: int, limit: int | None = None, reference_file: Path | None = None) -> dict:
    """Evaluate on the held-out prompts (rank 0), log the metrics and samples at ``step``,
    and return the metrics on every rank ({} without held-out prompts).

    ``limit`` evaluates only the first ``limit`` prompts (periodic evaluations, to bound
    their cost). ``reference_file`` holds the SFT policy's per-prompt rows: the evaluation
    at step 0 (the policy is still the SFT policy) writes it, later ones compute win rates
    over it on the same prompts.
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
            if reference_file is not None and step == 0:
                write_json(reference_file, {"rows": [{"score": r["score"], "gold": r["gold"]} for r in rows]})
            tracker.log(ev, step=step)
            tracker.log_samples(step, [dict(r, step=step) for r in rows[: cfg.num_samples_logged]])
    return dist.broadcast_object(ev)


def sample(s: PPOSetup, cfg: PPOConfig, update: int) -> tuple[Sampled, torch.Tensor | None]:
    """Steps 1 and 2 of an update: this rank's prompts of rollout ``update`` and the
    policy's responses (``samples_per_prompt`` of each prompt, adjacent); returns the batch
    and each row's prompt group (B,) (None with one sample per prompt)."""
    from rlhf import distributed as dist

    # the prompts are a pure function of (seed, update); several processes: the global
    # batch's prompts, of which this rank takes a disjoint slice
    idx = _prompt_order(len(s.prompt_ids), cfg.seed, update, s.per_rollout_prompts * s.world)
    lo, hi = dist.shard_bounds(len(idx), s.rank, s.world)
    rows = [s.prompt_ids[i] for i in idx[lo:hi]]
    group_ids = None
    if cfg.samples_per_prompt > 1:
        k = cfg.samples_per_prompt
        rows = [r for r in rows for _ in range(k)]
        group_ids = torch.arange(s.per_rollout_prompts, device=s.device).repeat_interleave(k)
    ids, mask = left_pad(rows, s.pad_id, s.device)
    torch.manual_seed(dist.rank_seed(cfg.seed * 1_000_003 + update, s.rank))  # ranks sample differently
    with full_params_for_generation(s.model):  # FSDP: ranks decode different numbers of steps
        return s.engine.sample(ids, mask), group_ids


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
    batch = score_rollout(s.model, sampled, cfg, chunk=cfg.micro_batch_size * 2, suffix=s.score_suffix)
    _sync(s.device)
    t_score = time.time() - t0 - t_gen
    _check_finite(batch)

    # the train/inference mismatch: the sampler's logprobs against the trainer's (rlhf/ppo/mismatch.py)
    mismatch, is_weights = rollout_mismatch(batch, cfg)

    # 4. per-token rewards with the KL penalty
    beta = float(opt.kl_ctl.value)
    scores, kl, rewards = shaped_rewards(batch, cfg, beta, all_reduce=dist.all_reduce_sum)

    # 5. advantages, whitened over the whole rollout batch (of all processes)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, beta, group_ids,
                                          all_reduce=dist.all_reduce_sum)

    # 6. PPO epochs x minibatches, micro-batches accumulate exact minibatch gradients
    stats = _ppo_update(s.model, opt.optimizer, opt.scheduler, batch, adv, returns, cfg, beta, update,
                        rank=s.rank, world=s.world, is_weights=is_weights, on_step=say)
    _sync(s.device)
    t_update = time.time() - t0 - t_gen - t_score

    # 7. KL controller, metrics, guards
    step_stats = rollout_statistics(batch, scores, kl, rewards, adv, beta) | mismatch
    opt.kl_ctl.update(step_stats["kl/mean"], s.global_batch)
    step_stats["episodes"] = (update + 1) * s.global_batch
    if uses_critic(cfg):
        step_stats.update(explained_variance(batch.values, returns, batch.response_mask, dist.all_reduce_sum))
    else:  # no critic: no value metrics (a constant 0 would show up as a value section in the dashboard)
        del step_stats["value/mean"]
    step_stats = {
        **step_stats, "lr": float(opt.scheduler.get_last_lr()[0]),
        "time/generate_s": t_gen, "time/score_s": t_score, "time/update_s": t_update,
        "episodes_per_s": s.global_batch / max(time.time() - t0, 1e-9),
        **stats,
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
    if not cfg.reward_adapter:
        raise ConfigError("ppo.reward_adapter: required")
    torch.manual_seed(cfg.seed)

    # 0. one base, four roles; prompts; optimizer; resume from the newest complete checkpoint
    s = setup(cfg)
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
    initial_eval = (evaluate_and_log(s, cfg, tracker, gold_fn, 0, reference_file=sft_rows) if start == 0
                    else _read_json(out / "initial_eval.json"))
    if start == 0 and main:
        write_json(out / "initial_eval.json", initial_eval)

    # 1-7. updates, with evaluation and checkpoints between them
    metrics: dict = {}
    bar = StageProgress("ppo", s.num_updates, unit="update", initial=start, enabled=main)
    for update in range(start, s.num_updates):
        if stop_after is not None and update >= stop_after:
            break
        metrics = train_update(s, opt, cfg, update, phase=bar.phase)
        if update == start and main:
            warn_if_cut_off(metrics["response/stop_rate"], cfg, [s.tok.convert_ids_to_tokens(i) for i in s.stop_ids])
        tracker.log(metrics, step=update + 1)
        bar.update(1, {"score": metrics["reward/score_mean"], "kl": metrics["kl/mean"]})
        done = update + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < s.num_updates:
            evaluate_and_log(s, cfg, tracker, gold_fn, done, limit=cfg.eval_max_prompts, reference_file=sft_rows)
        if cfg.save_every and (done % cfg.save_every == 0 or done == s.num_updates):
            with full_state(s.model, opt.optimizer):  # FSDP: gathered on every rank, written by rank 0
                if main:
                    save_checkpoint(ckpt_root, s.model, opt, cfg, done)
    bar.close()

    # final evaluation and the published adapters
    finished = (stop_after is None) or stop_after >= s.num_updates
    final_eval = evaluate_and_log(s, cfg, tracker, gold_fn, s.num_updates, reference_file=sft_rows) if finished else {}
    tracker.finish()
    result_metrics = {**{f"train/{k}": v for k, v in metrics.items()},
                      **{f"initial/{k}": v for k, v in initial_eval.items()},
                      **{f"final/{k}": v for k, v in final_eval.items()}}
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


def _ppo_update(model, optimizer, scheduler, batch: ScoredRollout, adv, returns, cfg: PPOConfig, beta: float,
                update: int, rank: int = 0, world: int = 1, is_weights: torch.Tensor | None = None,
                on_step: Callable[[str], None] | None = None) -> dict:
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
    """
    from rlhf import distributed as dist

    B_local = batch.response_ids.shape[0]
    B = B_local * world
    lo = rank * B_local
    device = batch.response_ids.device
    sharded = world > 1 and is_sharded(model)
    if sharded:  # FSDP: forwards are collectives, so every rank takes an equal share of each minibatch
        batch, adv, returns = gather_rollout(batch, adv, returns)
        if is_weights is not None:
            is_weights = dist.gather_rows(is_weights)
    gen = torch.Generator().manual_seed(cfg.seed * 104_729 + update)
    sums: dict[str, float] = {}
    count = 0
    use_critic = uses_critic(cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with _mode(model, True):
        for _epoch in range(cfg.ppo_epochs):
            for mb_idx in F.ppo_minibatch_indices(B, cfg.num_minibatches, gen):
                if sharded:  # an equal share of the gathered rows (selected on the CPU)
                    mb_idx = even_share(mb_idx, rank, world)
                elif world > 1:  # this rank's rows, selected on the CPU (no device sync)
                    mb_idx = mb_idx[(mb_idx >= lo) & (mb_idx < lo + B_local)] - lo
                mb_idx = mb_idx.to(device)
                optimizer.zero_grad(set_to_none=True)
                n_tokens = dist.all_reduce_sum(batch.response_mask[mb_idx].sum()).clamp(min=1.0)
                n_seqs = dist.all_reduce_sum(torch.tensor(float(mb_idx.numel()), device=device)).clamp(min=1.0)
                acc: dict[str, torch.Tensor] = {}
                for micro in (mb_idx.split(cfg.micro_batch_size) if mb_idx.numel() else ()):
                    mb = batch.index(micro)
                    w = mb.response_mask.sum() / n_tokens  # this micro-batch's share of the minibatch
                    # per-token loss weights from the whole minibatch's counts: the micro-batch
                    # losses add up to the minibatch loss exactly, for every aggregation
                    weights = F.aggregation_weights(mb.response_mask, cfg.loss_aggregation, n_tokens, n_seqs,
                                                    cfg.response_length)
                    pg_weights = weights if is_weights is None else weights * is_weights[micro]
                    for k, v in _policy_backward(model, mb, adv[micro], cfg, beta, weights, w, pg_weights).items():
                        acc[k] = acc.get(k, 0.0) + v
                    if use_critic:
                        for k, v in _value_backward(model, mb, returns[micro], cfg, n_tokens, w).items():
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
                    on_step(f"optimizer step {count}/{cfg.ppo_epochs * cfg.num_minibatches}")
    if world > 1:  # per-rank partial sums add up to the global minibatch statistics
        parts = dist.gather_objects(sums)
        norm = sums.get("grad_norm")  # computed after the gradient sum: equal on every rank
        sums = {k: sum(p.get(k, 0.0) for p in parts) for k in sorted({k for p in parts for k in p})}
        if norm is not None:
            sums["grad_norm"] = norm
    return {k: v / count for k, v in sums.items()} | {"optimizer_steps": float(count)}


def _policy_backward(model, mb: ScoredRollout, adv: torch.Tensor, cfg: PPOConfig, beta: float,
                     weights: torch.Tensor, w: torch.Tensor, pg_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Policy loss of one micro-batch (clipped surrogate, + KL loss, - entropy bonus), each
    per-token term aggregated with ``weights`` (B, T) (:func:`rlhf.ppo.aggregation_weights`),
    the surrogate with ``pg_weights`` instead when given (``weights`` times the truncated
    importance weights), forward and backward under the policy role; returns detached
    statistics (on device)."""
    with model.role("policy"):
        lp, ent = response_logprobs(model, "policy", mb, cfg.temperature, with_entropy=cfg.entropy_coef > 0)
        pg, pg_stats = F.policy_loss(lp, mb.logprobs, adv, mb.response_mask, cfg.cliprange,
                                     weights=weights if pg_weights is None else pg_weights)
        loss = pg
        stats = {"loss/policy": pg.detach()} | {f"policy/{k}": v * w for k, v in pg_stats.items()}
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
