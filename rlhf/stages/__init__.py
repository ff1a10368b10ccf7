"""The stage table: every stage declares itself once, in its row of :data:`STAGES`.

A row says what the pipeline (``rlhf run``), the input resolution (:mod:`rlhf.resolve`) and
the CLI (``rlhf <stage>``) need to know about a stage, so none of them names a stage:

  * ``config``: the typed dataclass of its recipe section (``sft:``, ``ppo:``...) and of
    ``rlhf <stage> --config``;
  * ``run``: ``run(cfg, *, group, resume, task, registration) -> StageResult``, in the stage's
    own module (imported only when the stage runs; only this table imports stage modules);
  * ``requires``: the stages whose outputs it consumes; a recipe lists them before it, and
    their fingerprints are part of its own;
  * ``inputs``: the config keys that reference something (data, preferences, an adapter): each
    is resolved before the stage runs, and data keys are recipe-relative paths, checked when
    a recipe is validated and hashed into the fingerprint;
  * ``wired``: config keys the pipeline fills with an earlier stage's published artifact
    (``"sft/adapter"``: the ``adapter`` directory of the ``sft`` stage); ``wired_if_run`` the
    same, only when that stage runs before this one. A recipe must not set them;
  * ``task_files``: config keys a task's files fill (see :mod:`rlhf.tasks`);
  * ``inherits``: config keys whose default is another stage's value (DPO samples its
    evaluation like PPO);
  * ``outputs``: the artifacts it publishes (registry entries);
  * ``code_refs``: config keys holding code a recipe names (``file.py:name``, recipe-relative);
  * ``prepare``: an adjustment of its recipe section once the stage list is known (PPO drops
    the reward-model wiring when ``ppo.rewards`` has no reward model);
  * ``summary``, ``task_metric``, ``exports``: what it adds to the run's summary and to the
    lines ``rlhf run`` ends with (:mod:`rlhf.summary`).

A new stage is its module plus its row. The fingerprint of a stage is a hash of its resolved
config (less its output directory and wired paths), of its data inputs' contents and of the
fingerprints of the stages it consumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf import summary
from rlhf.config import ConfigError, DPOConfig, KTOConfig, PPOConfig, RewardConfig, SFTConfig, parse_reward_sources
from rlhf.stages.common import StageResult

if TYPE_CHECKING:
    from rlhf.stages.common import Registration
    from rlhf.tasks import Task

__all__ = ["STAGES", "Input", "Stage", "StageResult", "run_stage"]


@dataclass(frozen=True)
class Input:
    """A config key that references something outside the config."""

    kind: str  # "data" (a file, directory, hub dataset or store reference), "preferences" (ingested), "adapter"
    required: bool = True  # False: an empty value means "none"


@dataclass(frozen=True)
class Stage:
    """One row of the stage table (see the module doc)."""

    config: type
    run: Callable[..., StageResult]
    help: str  # the one line of `rlhf --help`
    requires: tuple[str, ...] = ()
    inputs: dict[str, Input] = field(default_factory=dict)
    wired: dict[str, str] = field(default_factory=dict)
    wired_if_run: dict[str, str] = field(default_factory=dict)
    task_files: dict[str, str] = field(default_factory=dict)  # config key -> task file name (rlhf.tasks.TASK_FILES)
    task_files_are_defaults: bool = False  # True: a recipe's own value wins; False: setting a task-supplied key is an error
    inherits: dict[str, str] = field(default_factory=dict)  # config key -> "stage.key"
    outputs: tuple[str, ...] = ()
    gated: bool = False  # the reward-model quality gate (recipe key reward_gate) runs before it
    check: Callable[[object], None] | None = None  # extra check of its config inside a pipeline
    # config key -> whether the file is part of the fingerprint (an edited reward function reruns
    # the stage); "list.key" is a key of each entry of a list
    code_refs: dict[str, bool] = field(default_factory=dict)
    # (its raw recipe section, the recipe's stage list) -> None, before the section is typed
    prepare: Callable[[dict, tuple[str, ...]], None] | None = None
    summary: summary.Contribution | None = None  # its keys of summary.json and lines of the printed table
    # (metric, measure(task, pipeline config, its artifact dirs) -> value or None): a number the
    # summary measures after the stage ran when a task judges the run and the metric is missing
    task_metric: tuple[str, Callable[..., float | None]] | None = None
    exports: tuple[summary.Export, ...] = ()  # the artifacts the closing lines offer to export
    example: str = "train.max_steps=20"  # an override its command accepts, for `rlhf <stage> --help`


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


def _sft_in_pipeline(cfg: SFTConfig) -> None:
    # the later stages' LoRAs start from or beside the SFT LoRA on one shared base
    if cfg.finetune == "full":
        raise ConfigError(
            "sft.finetune: full fine-tuning in a pipeline is run as its own stage (`rlhf sft`), then used as "
            "model.name_or_path of a LoRA pipeline; the one-base-many-adapters PPO needs a shared base"
        )


def _ppo_reward_model(data: dict, stages: tuple[str, ...]) -> None:
    # only fn/http rewards: no reward model is loaded, none is needed before PPO
    try:
        uses_rm = any(src.kind == "rm" for src in parse_reward_sources(data.get("rewards", [])))
    except ConfigError as e:
        raise ConfigError(f"ppo: {e}") from None
    if not uses_rm:
        data.pop("reward_adapter", None)
    elif "ppo" in stages and "reward" not in stages[: stages.index("ppo")]:
        raise ConfigError(f"stages: ppo scores with the reward model (ppo.rewards has {{rm: reward}}, the default), "
                          f"so reward must be listed before ppo (got {list(stages)}); with only fn/http rewards "
                          "and a critic-free estimator, [sft, ppo] needs no reward stage")


def _reward_gold_accuracy(task: Task, pipe, dirs: dict) -> float | None:
    # the reward model's accuracy on the task's noiseless pairs (a task without them: none)
    if not callable(getattr(task, "response_pairs", None)):
        return None
    from rlhf.resolve import resolve_base
    from rlhf.tasks import gold_rm_accuracy

    model = pipe.model
    from rlhf.reward_sources import stage_members

    # an ensemble (reward.ensemble > 1) by its members' mean score, as the gate reads it
    members = stage_members(dirs["adapter"])
    return gold_rm_accuracy(task, resolve_base(model.name_or_path, seed=pipe.seed), model.dtype, members,
                            chat_template=model.chat_template)


def _kto(cfg: KTOConfig, *, group: str | None, resume: bool, task: Task | None,
         registration: Registration | None) -> StageResult:
    from rlhf.stages.kto import run_kto

    # as for DPO: the gold reward judges the sampled evaluation only
    return run_kto(cfg, group=group, resume=resume, gold_fn=task.evaluate if task is not None else None,
                   registration=registration)




# The rows of the offline preference stages (DPO, KTO): a policy trained from the SFT adapter on
# the preference store, sampled like PPO (same prompts, lengths, temperature) so the policies
# compare; the RM score and win rate of their evaluation need the reward model when one ran before.
_OFFLINE_PREFERENCE_STAGE = dict(
    requires=("sft",),
    inputs={"dataset": Input("preferences"), "sft_adapter": Input("adapter", required=False),
            "reward_adapter": Input("adapter", required=False), "eval_prompts": Input("data", required=False)},
    wired={"sft_adapter": "sft/adapter"},
    wired_if_run={"reward_adapter": "reward/adapter"},
    task_files={"dataset": "pairs", "eval_prompts": "eval_prompts"},
    task_files_are_defaults=True,
    inherits={"eval_prompts": "ppo.eval_prompts", "eval_max_prompt_length": "ppo.max_prompt_length",
              "eval_response_length": "ppo.response_length", "eval_temperature": "ppo.temperature",
              "eval_batch_size": "ppo.rollout_batch_size"},
    outputs=("adapter",),
)

STAGES: dict[str, Stage] = {
    "sft": Stage(
        SFTConfig, _sft, "run the supervised fine-tuning stage alone",
        inputs={"dataset": Input("data")},
        task_files={"dataset": "sft"},
        outputs=("adapter",),
        check=_sft_in_pipeline,
        summary=summary.SFT,
    ),
    "reward": Stage(
        RewardConfig, _reward, "run the reward-model stage alone",
        requires=("sft",),
        inputs={"dataset": Input("preferences")},
        task_files={"dataset": "pairs"},
        outputs=("adapter",),
        summary=summary.REWARD_MODEL,
        task_metric=("gold_accuracy", _reward_gold_accuracy),
        exports=(summary.Export("adapter", "the reward model as a sequence classifier"),),
    ),
    "ppo": Stage(
        PPOConfig, _ppo, "run the PPO stage alone",
        # the reward stage too when ppo.rewards scores with the reward model (the default); with
        # only function or HTTP rewards it needs none (_ppo_reward_model checks which)
        requires=("sft",),
        inputs={"sft_adapter": Input("adapter", required=False), "reward_adapter": Input("adapter", required=False),
                "prompts": Input("data"), "eval_prompts": Input("data", required=False)},
        wired={"sft_adapter": "sft/adapter"},
        wired_if_run={"reward_adapter": "reward/adapter"},
        task_files={"prompts": "ppo_prompts", "eval_prompts": "eval_prompts"},
        outputs=("policy", "value"),
        gated=True,
        example="total_episodes=512",
        code_refs={"rewards.fn": True, "watchdog_judge": False},
        prepare=_ppo_reward_model,
        summary=summary.PPO,
        exports=(summary.Export("policy", "the policy as a standalone HF model", sample="the trained policy"),),
    ),
    "dpo": Stage(
        DPOConfig, _dpo, "run the DPO stage alone (TRL's DPOTrainer from the SFT adapter)",
        **_OFFLINE_PREFERENCE_STAGE,
        summary=summary.offline_policy("dpo"),
        exports=(summary.Export("adapter", "the DPO policy as a standalone HF model", sample="the DPO policy"),),
    ),
    "kto": Stage(
        KTOConfig, _kto, "run the KTO stage alone (TRL's KTOTrainer on labelled completions, from the SFT adapter)",
        **_OFFLINE_PREFERENCE_STAGE,
        summary=summary.offline_policy("kto"),
        exports=(summary.Export("adapter", "the KTO policy as a standalone HF model", sample="the KTO policy"),),
    ),
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
              task: Task | None = None, registration: Registration | None = None,
              fingerprint: str | None = None) -> StageResult:
    """Resolve ``cfg``'s inputs, then run stage ``name`` on it, holding its output directory's lock.

    Only one process at a time writes an output directory (:class:`rlhf.runs.RunLock`; a
    second one fails at once). The checkpoints folder is made to hold only checkpoints of
    this config (:func:`rlhf.runs.prepare_checkpoints`, with ``fingerprint``, by default
    :func:`rlhf.runs.config_fingerprint` of ``cfg``): a fresh start moves old ones aside,
    a resume from another config's checkpoint is refused. The stage's step logs are trimmed
    next: a resumed stage logs again every step after the checkpoint it resumes from, a
    stage started afresh every step, so no row repeats. With a ``registration`` (rank 0 of
    a pipeline), publishing registers the artifacts.

    Raises:
        RunDirLocked: another process is writing ``cfg.output_dir``.
        ConfigError: ``resume`` and the newest checkpoint belongs to another config.
    """
    from rlhf import distributed as dist
    from rlhf.config import ConfigError, to_dict
    from rlhf.resolve import resolve_inputs
    from rlhf.runs import config_fingerprint, locked, prepare_checkpoints, trim_logs

    make_reproducible()
    resolved = resolve_inputs(cfg, STAGES[name].inputs, name)  # may build the tiny base: after the thread count is fixed
    with locked(cfg.output_dir):
        error = None
        if dist.is_main():
            try:
                resume = prepare_checkpoints(cfg.output_dir, fingerprint or config_fingerprint(to_dict(cfg)), resume)
                trim_logs(cfg.output_dir, resume)
            except ConfigError as e:
                error = str(e)
        error, resume = dist.broadcast_object((error, resume))
        if error is not None:
            raise ConfigError(error)
        return STAGES[name].run(resolved, group=group, resume=resume, task=task, registration=registration)
