"""The rollout types of PPO: what sampling produces, and what scoring adds to it.

Two types instead of one half-filled one (torchtune keeps its ``Trajectory`` apart from the
recipe the same way): :class:`Sampled` is built by generation, :class:`ScoredRollout` by
scoring a ``Sampled``. Every field of either is set when it is built and never changed
after; nothing is ``None`` waiting to be filled in.

Shapes: ``B`` rows, ``P`` prompt tokens (left-padded), ``T`` response tokens (padded after
the first stop token).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rlhf.ppo.rewards import first_stop_truncate

__all__ = ["Sampled", "ScoredRollout", "concat_rows", "finish_responses"]


def _rows(obj, idx: Tensor):
    """A copy of a rollout dataclass holding only the rows ``idx`` of every tensor field."""
    return type(obj)(**{f.name: None if getattr(obj, f.name) is None else getattr(obj, f.name)[idx]
                        for f in fields(obj)})


def _sequence(prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
              response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt and response side by side: ``input_ids`` and ``attention_mask``, each (B, P + T)."""
    return (torch.cat([prompt_ids, response_ids], dim=1),
            torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1))


class _Rows:
    """Row selection and the joined prompt + response tensors, shared by both batch types
    (each has ``prompt_ids``, ``prompt_mask``, ``response_ids`` and ``response_mask``)."""

    def index(self, idx: Tensor):
        """The rows ``idx`` (a 1-D index tensor) of every field, as the same type."""
        return _rows(self, idx)

    @property
    def input_ids(self) -> Tensor:
        """(B, P + T) prompt followed by response."""
        return _sequence(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)[0]

    @property
    def attention_mask(self) -> Tensor:
        """(B, P + T) prompt mask followed by response mask, in the prompt mask's dtype."""
        return _sequence(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)[1]


@dataclass(frozen=True)
class Sampled(_Rows):
    """Responses sampled from the policy for a batch of prompts.

    Attributes:
        prompt_ids: (B, P) prompt tokens, left-padded.
        prompt_mask: (B, P) 1 on real prompt tokens, 0 on left padding.
        response_ids: (B, T) response tokens, pad after the first stop token.
        response_mask: (B, T) float, 1 up to and including the stop token.
        has_stop: (B,) bool, whether the response ended with the stop token.
        sampler_logprobs: (B, T) the sampling engine's own logprobs of the drawn tokens at the
            sampling temperature (0 after the stop); every engine fills it. ``None`` only for
            batches that no engine drew (responses written by hand or by a task).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    has_stop: Tensor
    sampler_logprobs: Tensor | None = None


@dataclass(frozen=True)
class ScoredRollout(_Rows):
    """A sampled batch with everything PPO needs from the four roles, before the update.

    Attributes:
        prompt_ids, prompt_mask, response_ids, response_mask, has_stop: as in :class:`Sampled`.
        logprobs: (B, T) policy logprobs of the response tokens at the sampling temperature.
        ref_logprobs: (B, T) the same under the reference (sft) role.
        entropy: (B, T) policy entropy at each response position.
        values: (B, T) value of the state before each response token (zeros without a critic).
        scores: (B,) reward model score at the last real response token; with an ensemble of
            reward models, the ensemble's score (:func:`rlhf.ppo.ensemble_score` of ``member_scores``).
        member_scores: (B, N) each of the N >= 2 ensemble members' scores; None with one reward model.
        sampler_logprobs: as in :class:`Sampled` (the mismatch metrics compare it with ``logprobs``).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    has_stop: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    entropy: Tensor
    values: Tensor
    scores: Tensor
    sampler_logprobs: Tensor | None = None
    member_scores: Tensor | None = None

    @classmethod
    def from_sampled(cls, sampled: Sampled, *, logprobs: Tensor, ref_logprobs: Tensor, entropy: Tensor,
                     values: Tensor, scores: Tensor, member_scores: Tensor | None) -> "ScoredRollout":
        """``sampled`` plus its scores (every argument required, shapes as in the class doc)."""
        return cls(**{f.name: getattr(sampled, f.name) for f in fields(sampled)}, logprobs=logprobs,
                   ref_logprobs=ref_logprobs, entropy=entropy, values=values, scores=scores,
                   member_scores=member_scores)


def concat_rows(parts: list):
    """The rows of several batches of one type (:class:`Sampled` or :class:`ScoredRollout`)
    in order, as one batch. Prompts are left-padded (mask 0) to the widest prompt first:
    positions come from the attention mask, so the extra padding changes no forward.
    Responses share the configured response length already."""
    width = max(p.prompt_ids.shape[1] for p in parts)

    def field_of(p, name):
        t = getattr(p, name)
        if name in ("prompt_ids", "prompt_mask") and t.shape[1] < width:
            t = torch.nn.functional.pad(t, (width - t.shape[1], 0), value=0)
        return t

    def joined(name):  # an optional field (None) stays None unless every batch has it
        if any(getattr(p, name) is None for p in parts):
            return None
        return torch.cat([field_of(p, name) for p in parts])

    return type(parts[0])(**{f.name: joined(f.name) for f in fields(parts[0])})


def finish_responses(resp: torch.Tensor, stop_ids: list[int], pad_id: int, response_length: int, prompt_ids, prompt_mask,
            sampler_logprobs: torch.Tensor | None = None) -> Sampled:
    """The :class:`Sampled` batch of an engine's raw responses: pad ``resp`` (B, <=T) to
    ``response_length`` and truncate each row after its first
    stop token (any of ``stop_ids``); ``sampler_logprobs`` (B, <=T), the engine's logprobs of
    the drawn tokens, is padded alike and zeroed after the stop."""
    B, width = resp.shape
    if width < response_length:
        fill = torch.full((B, response_length - width), pad_id, dtype=resp.dtype, device=resp.device)
        resp = torch.cat([resp, fill], dim=1)
    ids, mask, has_stop = first_stop_truncate(resp[:, :response_length], stop_ids, pad_id)
    if sampler_logprobs is not None:
        lp = torch.zeros(B, response_length, dtype=torch.float32, device=resp.device)
        n = min(sampler_logprobs.shape[1], response_length)
        lp[:, :n] = sampler_logprobs[:, :n].float()
        sampler_logprobs = lp * mask
    return Sampled(prompt_ids, prompt_mask, ids, mask.float(), has_stop, sampler_logprobs)
