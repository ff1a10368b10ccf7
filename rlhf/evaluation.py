"""Policy evaluation: sample once per held-out prompt and report what the summary shows.

For each prompt: the reward model's score, the task's gold objective, KL to the SFT policy,
entropy and length, and, given the SFT policy's rows on the same prompts, the win rate over
it by the reward model and by the objective; each as a mean with its standard error over
prompts. One module for every caller, so their numbers compare: the PPO stage (before,
during and after training), DPO's evaluation of its policy against SFT, ``rlhf eval`` and
``rlhf generate``. The names the numbers are reported under follow :mod:`rlhf.summary`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rlhf import ppo as F
from rlhf.generation import decode_responses, generate, left_pad
from rlhf.scoring import score_rollout

if TYPE_CHECKING:
    from rlhf.config import PPOConfig

__all__ = ["evaluate", "mean_se", "split_eval_prompts", "win_rates"]


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
        texts = decode_responses(tok, batch)
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
