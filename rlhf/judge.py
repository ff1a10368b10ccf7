"""The judge a run has when it names none: the policy's agreement with held-out preference pairs.

The watchdog (:mod:`rlhf.watchdog`) needs a judge that training does not optimise. A task's
objective or a user's function is the best one; a user who has neither still has what the
reward model was measured on: the preference pairs the reward stage held out by prompt (its
test split, never trained on). Why these, scored this way (issue 30):

* Scoring the held-out pairs with the reward model tells nothing about the policy: the reward
  model is frozen during PPO, so its held-out accuracy is one number for the whole run.
* Scoring the policy's samples needs a second scorer of samples; without an objective, a
  function or an ensemble member kept out of training (issue 26) there is none.
* The policy itself can be scored on the pairs. PPO changes the policy's log-probabilities;
  the change on a held-out pair, ``d(y) = log pi(y|x) - log pi_sft(y|x)`` for its chosen and
  rejected responses, is the policy's implicit reward (the quantity DPO trains, Rafailov et
  al. 2023, arXiv 2305.18290). The judge is the fraction of held-out pairs whose chosen
  response gained more than the rejected one (ties count one half, so the SFT policy scores
  exactly 0.5), and the mean margin ``d(chosen) - d(rejected)`` is logged beside it.
  A policy that learned what the labellers prefer moves towards their chosen responses on
  prompts it never trained on; a policy that found the reward model's mistakes (responses
  far from any pair, where the reward model extrapolates) does not, and its agreement stops
  rising or falls while the training reward keeps rising: the watchdog's signal.

What it cannot see: a bias the labellers share. The held-out pairs come from the same
labellers as the training pairs, so a habit of theirs (the weak task's taste for filler
words, rlhf/tasks/synthetic.py) is in both; a policy that learns the habit agrees with the
held-out pairs more, not less. Only a judge from outside the preference data (an objective,
a function, a person) catches that; the summary says which judge a run had.

Cost: the sft role's log-probabilities are computed once; each evaluation runs the policy
role over ``2 * judge_max_pairs`` short sequences, no sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["PairJudge", "agreement", "heldout_pairs"]


def heldout_pairs(reward_adapter: str, limit: int) -> list[dict]:
    """The first ``limit`` held-out pairs of the data the reward adapter was trained on: the
    test split (by prompt hash) of the store version in its ``config.yaml`` (``dataset``),
    ties left out. [] when the adapter records no store dataset.

    Raises:
        ValueError: naming the adapter and the row of a pair without chosen or rejected.
    """
    import yaml

    import reward_data
    from rlhf.resolve import is_store_ref

    if not reward_adapter:
        return []
    config = Path(reward_adapter) / "config.yaml"
    dataset = (yaml.safe_load(config.read_text()) or {}).get("dataset", "") if config.exists() else ""
    if not dataset or not is_store_ref(dataset):
        return []
    pairs = []
    for i, rec in enumerate(reward_data.read_split(dataset, "test")):
        if rec.get("tie"):
            continue
        if not rec.get("chosen") or not rec.get("rejected"):
            raise ValueError(f"{dataset} (reward adapter {reward_adapter}): test row {i}: no chosen or rejected")
        pairs.append({"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]})
        if len(pairs) == limit:
            break
    return pairs


def agreement(margins: torch.Tensor) -> float:
    """Fraction of pairs whose chosen response gained more than the rejected one; a tie (the
    SFT policy itself: every margin 0) counts one half.

    Args:
        margins: (N,) ``d(chosen) - d(rejected)`` per pair.
    """
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


@dataclass
class PairJudge:
    """The held-out pairs, encoded once, and the sft role's log-probabilities of them.

    Attributes:
        batches: ``(chosen, rejected)`` :class:`rlhf.ppo.rollout.Sampled` pairs of chunks,
            row i of each the same pair.
        temperature: the policy's sampling temperature (log-probabilities as PPO's KL sees them).
        sft: per chunk, (chosen, rejected) summed sft-role log-probabilities (N_chunk,),
            filled on the first call.
    """

    batches: list
    temperature: float
    sft: list = field(default_factory=list)

    @classmethod
    def build(cls, tok, pairs: list[dict], max_prompt_length: int, response_length: int, temperature: float,
              device, chunk: int = 64) -> "PairJudge":
        """Encode ``pairs`` as the policy sees prompts (chat template, ``max_prompt_length``) and
        responses (their first ``response_length`` tokens, stop token included)."""
        from rlhf.generation import encode_prompts, left_pad
        from rlhf.ppo.rollout import Sampled

        prompt_ids = encode_prompts(tok, [p["prompt"] for p in pairs], max_prompt_length)

        def response(p: dict, key: str) -> list[int]:
            full = tok.apply_chat_template(p["prompt"] + p[key], tokenize=False)
            head = tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True)
            text = full[len(head):] if full.startswith(head) else p[key][-1]["content"]
            return tok(text, add_special_tokens=False).input_ids[:response_length] or [tok.eos_token_id]

        batches = []
        for lo in range(0, len(pairs), chunk):
            ids, mask = left_pad(prompt_ids[lo: lo + chunk], tok.pad_token_id, device)
            two = []
            for key in ("chosen", "rejected"):
                rows = [response(p, key) for p in pairs[lo: lo + chunk]]
                width = max(len(r) for r in rows)
                resp = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
                rmask = torch.zeros((len(rows), width))
                for i, r in enumerate(rows):
                    resp[i, : len(r)] = torch.tensor(r)
                    rmask[i, : len(r)] = 1.0
                two.append(Sampled(ids, mask, resp.to(device), rmask.to(device),
                                   torch.ones(len(rows), dtype=torch.bool, device=device)))
            batches.append(tuple(two))
        return cls(batches, temperature)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        """``judge/pairs_agreement`` (:func:`agreement`) and ``judge/pairs_margin`` (the mean
        margin, nats) of the policy role against the sft role."""
        from rlhf.scoring import response_logprobs

        def summed(role: str, b) -> torch.Tensor:
            lp, _ = response_logprobs(model, role, b, self.temperature)
            return (lp * b.response_mask).sum(1)

        if not self.sft:
            self.sft = [(summed("sft", c), summed("sft", r)) for c, r in self.batches]
        margins = torch.cat([(summed("policy", c) - sc) - (summed("policy", r) - sr)
                             for (c, r), (sc, sr) in zip(self.batches, self.sft)])
        return {"judge/pairs_agreement": agreement(margins), "judge/pairs_margin": float(margins.mean()),
                "judge/pairs": float(margins.numel())}
