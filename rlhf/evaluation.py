"""Policy evaluation: sample once per held-out prompt and report what the summary shows.

For each prompt: the reward model's score, the task's gold objective, KL to the SFT policy,
entropy and length, and, given the SFT policy's rows on the same prompts, the win rate over
it by the reward model and by the objective; each as a mean with its standard error over
prompts. One module for every caller, so their numbers compare: the PPO stage (before,
during and after training), DPO's and KTO's evaluation of their policy against SFT
(:func:`evaluate_against_sft`), and ``rlhf eval``, ``rlhf generate`` and ``rlhf chat``, which
sample a loaded policy with :func:`sample_completions` (the same engines, prompt encoding and
stop handling) and report :func:`statistic` and :func:`win_rate` (:func:`compare_policies`).
The names the numbers are reported under follow :mod:`rlhf.summary`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlhf import ppo as F
from rlhf.generation import decode_responses, encode_prompts, generate, left_pad
from rlhf.scoring import score_rollout

if TYPE_CHECKING:
    from rlhf.config import PPOConfig

__all__ = ["compare_policies", "completion_texts", "evaluate", "evaluate_against_sft", "mean_se", "sample_completions",
           "split_eval_prompts", "statistic", "win_rate", "win_rates"]


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


def statistic(vals: list[float]) -> dict:
    """``{"mean", "se", "n"}`` of ``vals`` (:func:`mean_se`; None for no values): how ``rlhf
    eval`` reports a number."""
    if not vals:
        return {"mean": None, "se": None, "n": 0}
    mean, se = mean_se(vals)
    return {"mean": mean, "se": se, "n": len(vals)}


def win_rate(a: list[float], b: list[float]) -> dict:
    """The :func:`statistic` of ``a``'s wins over ``b`` item by item (:func:`win_rates`: 1 a
    win, 0.5 a tie, 0 a loss), as PPO's and DPO's win rates over SFT."""
    return statistic(win_rates([{"v": x} for x in a], [{"v": y} for y in b], "v"))


def compare_policies(judged: dict[str, dict[str, list[float]]], baseline: str, wins: dict[str, str]) -> dict[str, dict]:
    """Per policy, each of its per-prompt numbers (``judged[policy][name]``, the prompts in the
    same order for every policy) as a :func:`statistic`; for every policy but ``baseline`` also
    its :func:`win_rate` over ``baseline`` by each number ``name`` of ``wins``, under ``wins[name]``."""
    out = {}
    for policy, numbers in judged.items():
        entry = {name: statistic(vals) for name, vals in numbers.items()}
        if policy != baseline:
            entry.update({key: win_rate(numbers[name], judged[baseline][name]) for name, key in wins.items()
                          if name in numbers})
        out[policy] = entry
    return out


def completion_texts(tok, batch) -> list[str]:
    """Each response of ``batch`` (a :class:`rlhf.ppo.rollout.Sampled`) as text: its tokens up to
    the first stop token (not included), special tokens dropped, surrounding space stripped."""
    texts = []
    for ids, m, stopped in zip(batch.response_ids, batch.response_mask, batch.has_stop):
        n = int(m.sum()) - int(stopped)
        texts.append(tok.decode(ids[:n].tolist(), skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def sample_completions(engine, tok, prompts: list[list[dict]], *, max_prompt_length: int, batch_size: int, seed: int,
                       device) -> list[str]:
    """One completion (text) per prompt (a message list) from ``engine`` (:mod:`rlhf.generation`),
    from seed ``seed``: prompts encoded as PPO encodes them, ``batch_size`` at a time, responses
    cut after their first stop token (:func:`completion_texts`). The sampler of ``rlhf
    generate``, ``rlhf chat`` and ``rlhf eval``."""
    torch.manual_seed(seed)
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(encode_prompts(tok, prompts[s: s + batch_size], max_prompt_length), tok.pad_token_id,
                             device)
        out += completion_texts(tok, engine.sample(ids, mask))
    return out


@torch.no_grad()
def evaluate(model, tok, eval_ids: list[list[int]], eval_texts: list[str], cfg: PPOConfig, gen_cfg,
             stop_ids: int | list[int], pad_id: int, device, gold_fn: Callable[[str, str], float] | None, seed: int,
             suffix: list[int] | tuple = (), engine=None, reference: list[dict] | None = None,
             on_batch: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Sample once per held-out prompt with ``engine`` (default: the hf engine), from a fixed
    seed so that every evaluation sees the same random stream, and report score, KL to the
    reference, entropy, length, gold reward if known, and with a reward-model ensemble its
    members' disagreement (``eval/disagreement_mean``: their standard deviation per response).
    With ``reference`` (the SFT policy's rows on the same prompts, in order) also the win
    rate over it by the reward model (``eval/win_rate_*``) and by the gold reward
    (``eval/gold_win_rate_*``). Means come with standard errors over prompts.
    ``on_batch(n)`` is called after each batch of ``n`` prompts (progress)."""
    torch.manual_seed(seed)
    rows, per = [], {k: [] for k in ("score", "kl", "entropy", "length", "gold", "disagreement")}
    for s in range(0, len(eval_ids), cfg.rollout_batch_size):
        ids, mask = left_pad(eval_ids[s: s + cfg.rollout_batch_size], pad_id, device)
        batch = (engine.sample(ids, mask) if engine is not None
                 else generate(model, ids, mask, gen_cfg, stop_ids, pad_id, cfg.response_length))
        batch = score_rollout(model, batch, cfg, chunk=cfg.per_device_train_batch_size * 2, suffix=suffix)
        scores = F.apply_missing_stop_penalty(batch.scores, batch.has_stop, cfg.missing_stop_penalty, cfg.missing_stop_value)
        kl = F.masked_sum(F.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1"), batch.response_mask, dim=1)
        ent = F.masked_mean(batch.entropy, batch.response_mask, dim=1)
        texts = decode_responses(tok, batch)
        # a reward-model ensemble's disagreement on each response: its members' standard deviation
        spread = None if batch.member_scores is None else batch.member_scores.std(1, unbiased=False).tolist()
        for i, text in enumerate(texts):
            prompt = eval_texts[s + i]
            if model.has_reward:
                per["score"].append(float(scores[i]))
            if spread is not None:
                per["disagreement"].append(spread[i])
            per["kl"].append(float(kl[i]))
            per["entropy"].append(float(ent[i]))
            per["length"].append(float(batch.response_mask[i].sum()))
            gold = gold_fn(prompt, text) if gold_fn is not None else None
            if gold is not None:
                per["gold"].append(gold)
            rows.append({"prompt": prompt, "completion": text, "score": float(scores[i]) if model.has_reward else None,
                         "gold": gold, "length": per["length"][-1], "kl": per["kl"][-1],
                         "stopped": bool(batch.has_stop[i])})
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


def evaluate_against_sft(cfg, policy_adapter: str,
                         gold_fn: Callable[[str, str], float] | None) -> tuple[dict, dict, dict[str, list[dict]]]:
    """Sample the SFT policy and a policy trained offline from it (DPO, KTO) once per held-out
    prompt and compare them.

    ``cfg`` is the stage's config (model, sft_adapter, reward_adapter, eval_prompts, seed and
    the eval_* sampling keys). Reuses PPO's roles and :func:`evaluate` (same sampler, stop
    handling, KL and standard errors, same evaluation seed), so the numbers compare with PPO's:
    a RoleModel whose policy role holds first the SFT weights, then ``policy_adapter``. Win
    rates count a prompt where the policy's response scores higher than SFT's as 1, a tie as 1/2.

    Returns:
        ``(sft, policy, rows)``: each policy's ``eval/*`` numbers (score when a reward adapter is
        given, gold when ``gold_fn`` is, kl to SFT, entropy, length; means and standard errors),
        the trained policy's with its win rates over SFT, ``eval/win_rate_*`` (by the RM) and
        ``eval/gold_win_rate_*``, as PPO's evaluation reports them (see :mod:`rlhf.summary`);
        ``rows`` holds each policy's samples (``"sft"``, ``"policy"``: one row per prompt with
        ``prompt``, ``completion``, ``score``, ``gold``), as :func:`evaluate` returns them.
    """
    from peft import set_peft_model_state_dict

    from rlhf import distributed as dist
    from rlhf.adapters import RoleModel, read_lora_weights
    from rlhf.data import load_prompts
    from rlhf.config import PPOConfig
    from rlhf.generation import encode_prompts, generation_config, score_suffix, stop_token_ids
    from rlhf.models import load_causal_lm, tokenizer_for

    # the PPO stage's evaluation settings, from the stage's eval_* keys; a critic-free estimator, so
    # that scoring skips the value role (evaluation uses no values)
    pcfg = PPOConfig(model=cfg.model, response_length=cfg.eval_response_length, temperature=cfg.eval_temperature,
                     max_prompt_length=cfg.eval_max_prompt_length, rollout_batch_size=cfg.eval_batch_size,
                     num_mini_batches=1, per_device_train_batch_size=min(16, cfg.eval_batch_size), seed=cfg.seed,
                     advantage_estimator="reinforce++")
    base_path = cfg.model.name_or_path
    tok = tokenizer_for(cfg.model)  # model.chat_template included, as in training
    base = load_causal_lm(base_path, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                          trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    policy_state, policy_cfg = read_lora_weights(policy_adapter)
    model = RoleModel(base, cfg.sft_adapter or None, cfg.reward_adapter or None,
                      policy_lora={k: policy_cfg[k] for k in ("r", "lora_alpha", "target_modules")}, with_value=False)
    device = dist.device()
    model.to(device).eval()
    prompts = load_prompts(cfg.eval_prompts, split="test")
    eval_ids = encode_prompts(tok, prompts, pcfg.max_prompt_length)
    eval_texts = [p[-1]["content"] for p in prompts]
    stop_ids, pad_id = stop_token_ids(tok, pcfg, model.base_lm), tok.pad_token_id
    gen_cfg = generation_config(pcfg, stop_ids, pad_id)
    suffix = score_suffix(tok, stop_ids)  # the reward model scores where it was trained to, as in PPO
    engine = None  # the hf engine
    if getattr(cfg, "eval_generation", "hf") == "vllm":  # samples the policy role: first the SFT weights, then the policy's
        from rlhf.generation_vllm import check_vllm, make_vllm_engine

        check_vllm(f"{type(cfg).__name__.removesuffix('Config').lower()}.eval_generation: vllm")
        engine = make_vllm_engine(model, pcfg, base_path, stop_ids, pad_id, device, lora_rank=policy_cfg["r"])
    seed = cfg.seed + 1_000_003  # the PPO stage's evaluation seed: same random stream for both methods

    out: dict[str, dict] = {}
    rows = {}
    for name in ("sft", "policy"):
        if name == "policy":
            result = set_peft_model_state_dict(model.peft, policy_state, adapter_name="policy")
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ValueError(f"{policy_adapter}: does not fit the SFT adapter's shape: unexpected keys {bad[:3]}")
        # the trained policy's rows are compared with the SFT policy's on the same prompts (its
        # win rates over SFT, by the reward model and by the gold reward)
        out[name], rows[name] = evaluate(model, tok, eval_ids, eval_texts, pcfg, gen_cfg, stop_ids, pad_id, device,
                                         gold_fn, seed=seed, suffix=suffix, engine=engine, reference=rows.get("sft"))
    return out["sft"], out["policy"], rows
