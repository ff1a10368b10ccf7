"""What a PPO run holds besides its rollouts: the setup built before the first update, and
the optimization state a checkpoint saves. Containers only (the PPO stage,
``rlhf/stages/ppo.py``, builds and uses them), kept here so that the libraries the stage
calls (:mod:`rlhf.watchdog`, :mod:`rlhf.reward_sources`) name these types without
importing the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from rlhf.adapters import RoleModel

__all__ = ["Optimization", "PPOSetup"]


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
    prompts: list = field(default_factory=list)  # the training prompts' message lists (reward sources read them)
    sources: list = field(default_factory=list)  # (RewardSource, batch function or None) of ppo.rewards; [] : the RM alone
    eval_prompts: list = field(default_factory=list)  # the held-out prompts' message lists
    prompt_metadata: list = field(default_factory=list)  # each training prompt row's other columns (dict)
    eval_metadata: list = field(default_factory=list)  # the same for the held-out prompts


@dataclass
class Optimization:
    """The trainable state a checkpoint holds besides the adapters."""

    params: list  # policy (+ value) LoRA and value-head parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: object  # F.FixedKLController or F.AdaptiveKLController
    length_streak: list[int] = field(default_factory=lambda: [0])  # the length guard's count of updates in a row
