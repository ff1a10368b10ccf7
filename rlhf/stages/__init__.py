"""The stages and their one dispatch table, shared by ``rlhf <stage>`` and ``rlhf run``.

Each stage is a plain function ``run(cfg, *, group, resume, task) -> StageResult`` in its own
module; :func:`run_stage` resolves the config's input references first
(:func:`rlhf.resolve.resolve_inputs`), so a stage only reads what it is given and writes only
under ``cfg.output_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf.config import DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig

if TYPE_CHECKING:
    from rlhf.stages.common import Registration
    from rlhf.tasks import Task


@dataclass(frozen=True)
class StageResult:
    """What a stage produced; the same shape for every stage."""

    stage: str  # a name in STAGES: "sft", "reward", "ppo", "dpo" or "kto"
    output_dir: str  # everything the stage wrote is under here
    base: str  # the resolved base model (directory or hub id)
    artifacts: dict[str, str]  # published directory per artifact, e.g. {"adapter": ...} or {"policy": ..., "value": ...}
    metrics: dict[str, float]  # final numbers
    inputs: dict[str, str] = field(default_factory=dict)  # resolved data references read, e.g. {"dataset": "pairs:1"}
    finished: bool = True  # False when stopped early (PPO's stop_after); nothing was published then


@dataclass(frozen=True)
class Stage:
    """One row of the dispatch table."""

    config: type  # the stage's config dataclass
    run: Callable[..., StageResult]  # run(cfg, *, group, resume, task, registration)
    requires: tuple[str, ...] = ()  # stages whose artifacts it consumes: a recipe lists them before it


def _sft(cfg: SFTConfig, *, group: str | None, resume: bool, task: Task | None,
         registration: Registration | None) -> StageResult:
    from rlhf.stages.sft import run_sft

    return run_sft(cfg, group=group, resume=resume, registration=registration)


def _reward(cfg: RewardConfig, *, group: str | None, resume: bool, task: Task | None,
            registration: Registration | None) -> StageResult:
    from rlhf.stages.reward import run_reward

    return run_reward(cfg, group=group, resume=resume, registration=registration)


def _ppo(cfg: PPOConfig, *, group: str | None, resume: bool, task: Task | None,
         registration: Registration | None) -> StageResult:
    from rlhf.stages.ppo import run_ppo

    # the task's gold reward is reported by PPO's evaluation; it never enters training
    return run_ppo(cfg, group=group, resume=resume, gold_fn=task.evaluate if task is not None else None,
                   registration=registration)


def _dpo(cfg: DPOConfig, *, group: str | None, resume: bool, task: Task | None,
         registration: Registration | None) -> StageResult:
    from rlhf.stages.dpo import run_dpo

    # as for PPO: the gold reward judges the sampled evaluation only, DPO trains on the pairs
    return run_dpo(cfg, group=group, resume=resume, gold_fn=task.evaluate if task is not None else None,
                   registration=registration)


def _kto(cfg: KTOConfig, *, group: str | None, resume: bool, task: Task | None,
         registration: Registration | None) -> StageResult:
    from rlhf.stages.kto import run_kto

    # as for DPO: the gold reward judges the sampled evaluation only
    return run_kto(cfg, group=group, resume=resume, gold_fn=task.evaluate if task is not None else None,
                   registration=registration)


STAGES: dict[str, Stage] = {
    "sft": Stage(SFTConfig, _sft),
    "reward": Stage(RewardConfig, _reward, requires=("sft",)),
    "ppo": Stage(PPOConfig, _ppo, requires=("sft", "reward")),
    "dpo": Stage(DPOConfig, _dpo, requires=("sft",)),
    "kto": Stage(KTOConfig, _kto, requires=("sft",)),
}


#: Torch's CPU threads unless ``$RLHF_NUM_THREADS`` says otherwise (``0``: torch's default,
#: all cores). Float sums depend on how work is split over threads, so a run reproduces its
#: numbers only on the same thread count (and library versions); 2 is what the README's
#: numbers were measured with, and what any CPU has.
DEFAULT_NUM_THREADS = 2


def make_reproducible() -> int:
    """Fix what makes two runs with the same seed differ: the CPU thread count, and
    nondeterministic kernels (torch's deterministic variants where it has them; a warning,
    not an error, for the few it has not). Seeds and data order are each stage's own (its
    ``seed``). Returns the thread count in use.

    Raises:
        ConfigError: ``$RLHF_NUM_THREADS`` is not a whole number >= 0.
    """
    import torch

    from rlhf.config import ConfigError

    text = os.environ.get("RLHF_NUM_THREADS", str(DEFAULT_NUM_THREADS)).strip()
    if not text.isdigit():
        raise ConfigError(f"$RLHF_NUM_THREADS: {text!r} is not a whole number (0: torch's default)")
    if int(text) > 0:
        torch.set_num_threads(int(text))
    # cuBLAS needs this for deterministic matrix products; it must be set before the first one
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.get_num_threads()


def run_stage(name: str, cfg, *, group: str | None = None, resume: bool = False,
              task: Task | None = None, registration: Registration | None = None) -> StageResult:
    """Resolve ``cfg``'s inputs, then run stage ``name`` on it.

    The stage's step logs are trimmed first: a resumed stage logs again every step after
    the checkpoint it resumes from, a stage started afresh every step, so no row repeats.
    With a ``registration`` (rank 0 of a pipeline), publishing registers the artifacts.
    """
    from rlhf import distributed as dist
    from rlhf.resolve import resolve_inputs
    from rlhf.runs import resume_step, trim_logs

    make_reproducible()
    resolved = resolve_inputs(cfg)  # may build the tiny base: after the thread count is fixed
    if dist.is_main():
        trim_logs(cfg.output_dir, resume_step(cfg.output_dir) if resume else None)
    return STAGES[name].run(resolved, group=group, resume=resume, task=task, registration=registration)
