"""Plain functions shared by the stages: publishing an artifact, TRL argument mapping,
TRL checkpoints, and gathering sharded weights from a TRL trainer."""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.atomic import write_dir, write_json
from rlhf.config import LoraConfigSpec, TrainArgs


def trl_training_kwargs(train: TrainArgs, output_dir: Path, seed: int, has_eval: bool) -> dict:
    """Map our TrainArgs onto transformers/TRL TrainingArguments keyword arguments.

    Trackers are driven by rlhf.tracking through a callback, so TRL's own report_to is off.
    Options are spelled the way the installed transformers wants them, so that it warns
    about nothing: ``activation_checkpointing`` where ``gradient_checkpointing`` is a
    deprecated alias (transformers 5), and pinned memory only where there is a GPU to pin for.
    """
    import dataclasses

    import torch
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in known else "gradient_checkpointing"
    kw = dict(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        warmup_ratio=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler_type,
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        save_safetensors=True,
        eval_strategy=("steps" if train.eval_steps > 0 else "no") if has_eval else "no",
        eval_steps=train.eval_steps if train.eval_steps > 0 else None,
        **{checkpointing: train.gradient_checkpointing},
        dataloader_pin_memory=torch.cuda.is_available(),
        bf16=train.bf16,
        report_to="none",
        seed=seed,
        data_seed=seed,
        max_length=train.max_length,
        dataloader_num_workers=0,
        disable_tqdm=None,
    )
    return kw


def filter_supported(cls, kwargs: dict) -> dict:
    """Drop keyword arguments that this transformers/TRL version does not know (e.g. renamed
    options between releases), so one code path works across the supported version range."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}


def peft_lora_config(spec: LoraConfigSpec, model, task_type: str, modules_to_save: list[str] | None = None):
    """A peft LoraConfig; 'all-linear' is resolved to the decoder's linear layers so that every
    stage's adapter on one base has the same shape (see rlhf.adapters.linear_target_modules)."""
    from peft import LoraConfig

    from rlhf.adapters import linear_target_modules

    targets = linear_target_modules(model) if spec.target_modules == "all-linear" else spec.target_modules
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
        bias="none",
    )


def policy_from_sft(cfg, base: str, tok):
    """The trainable policy of a preference stage (DPO, KTO) and its LoRA config for TRL:
    ``(model, peft_config, sft_dir)``.

    With an SFT adapter, the base carries it as the trainable "default" adapter and
    ``peft_config`` is None (TRL then copies "default" into a "ref" adapter, which the stage
    pins to the frozen SFT weights). Without one, the base is the SFT model (full fine-tuning):
    a fresh LoRA, whose disabled state is the reference.
    """
    from peft import PeftModel

    from rlhf.models import disable_dropout, load_causal_lm

    model = load_causal_lm(base, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                           trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation)
    disable_dropout(model)
    sft_dir = cfg.sft_adapter or None
    if sft_dir is not None:
        return PeftModel.from_pretrained(model, sft_dir, is_trainable=True), None, sft_dir
    return model, peft_lora_config(cfg.lora, model, "CAUSAL_LM"), None


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete ``checkpoint-N`` directory under ``output_dir/checkpoints``."""
    ckpt_root = output_dir / "checkpoints"
    if not ckpt_root.is_dir():
        return None
    found = []
    for d in ckpt_root.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        # trainer_state.json is written last by transformers' checkpoint save
        if m and (d / "trainer_state.json").exists():
            found.append((int(m.group(1)), d))
    return str(max(found)[1]) if found else None


@dataclass(frozen=True)
class StageResult:
    """What a stage produced; the same shape for every stage."""

    stage: str  # a name in rlhf.stages.STAGES: "sft", "reward", "ppo", "dpo", ...
    output_dir: str  # everything the stage wrote is under here
    base: str  # the resolved base model (directory or hub id)
    artifacts: dict[str, str]  # published directory per artifact, e.g. {"adapter": ...} or {"policy": ..., "value": ...}
    metrics: dict[str, float]  # final numbers
    inputs: dict[str, str] = field(default_factory=dict)  # resolved data references read, e.g. {"dataset": "pairs:1"}
    finished: bool = True  # False when stopped early (PPO's stop_after); nothing was published then


@dataclass
class Registration:
    """Where :func:`publish` records a stage's artifacts in the model registry.

    The pipeline builds one per stage on global rank 0 (every other process, and a stage run
    alone, passes None). Lineage comes from the stage's resolved inputs: a config value that
    is the directory of an artifact registered earlier (``known``) and the ``dataset`` the
    stage names become the new entry's parents.
    """

    registry: Any  # an open rlhf.registry.Registry
    prefix: str  # entries are named "<prefix>-<role>"
    run: str | None  # the registry run that produces the artifacts
    known: dict[str, tuple[str, str]] = field(default_factory=dict)  # artifact dir -> (input key, registry ref)
    base: str | None = None  # the base model's ref; registered by the first publish when None
    outputs: dict[str, str] = field(default_factory=dict)  # filled by publish: artifact name -> ref
    inputs: dict[str, str] = field(default_factory=dict)  # filled by publish: input key -> ref


def publish(out_dir: Path, name: str, write: Callable[[Path], None], *, role: str, base: str, config: dict,
            registration: Registration | None = None, entry: str | None = None, **provenance) -> str:
    """Publish one artifact of a stage as ``out_dir/name``, atomically; returns its path.

    ``write(tmp)`` fills a temporary directory inside ``out_dir`` (adapter weights, head...);
    the resolved stage config (``config.yaml``) and the metadata (``rlhf_adapter.json``:
    role, base model and ``provenance`` such as the dataset) are added beside them, and the
    directory is renamed into place, so a reader never sees half an artifact. With a
    ``registration`` the artifact is then recorded in the registry with its lineage, as
    ``<prefix>-<entry>`` (``entry`` defaults to the role; DPO's policy is ``<prefix>-dpo``, apart
    from PPO's) with the ``provenance`` other than the dataset (a parent) as metadata. Call it
    on the main process only.

    Raises:
        OSError: ``ENOSPC`` naming ``out_dir/name`` when the disk fills up; nothing
            temporary is left behind and an earlier ``out_dir/name`` stays intact.
    """
    from rlhf.adapters import CONFIG_FILE, METADATA_FILE
    from rlhf.config import save_yaml

    final = out_dir / name

    def fill(tmp: Path) -> None:
        write(tmp)
        save_yaml(config, tmp / CONFIG_FILE)
        write_json(tmp / METADATA_FILE, {"role": role, "base_path": base, **provenance})

    try:
        write_dir(final, fill)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, f"no space left on the device of {out_dir} while publishing {final} "
                                    f"({e.filename or e}); free space and rerun with --resume") from None
    if registration is not None:
        _register(registration, final, role, entry or role, base, config, provenance)
    return str(final)


def _register(reg: Registration, path: Path, role: str, entry: str, base: str, config: dict,
              provenance: dict) -> None:
    """Record a published artifact in the registry: base, dataset and parent adapters first."""
    if reg.base is None:
        reg.base = reg.registry.register_base(safe_name(Path(base).name), base).ref
    reg.inputs["base"] = reg.base
    parents = []
    for value in config.values():  # the stage's resolved inputs that are registered artifacts
        if isinstance(value, str) and value and str(Path(value).resolve()) in reg.known:
            from rlhf.reward_sources import stage_members

            key, ref = reg.known[str(Path(value).resolve())]
            reg.inputs[key] = ref
            parents.append(ref)
            # a reward-model ensemble is named by member 0; the members it lists score with it,
            # so they are parents too
            parents += [reg.known[m][1] for m in (str(Path(d).resolve()) for d in stage_members(value)[1:])
                        if m in reg.known]
    dataset = provenance.get("dataset")
    if dataset:  # a pinned data-store version the stage trained on
        if "dataset" not in reg.outputs:
            import reward_data

            reg.outputs["dataset"] = reg.registry.register_dataset(
                safe_name(dataset.split(":")[0]), str(reward_data.resolve(dataset))).ref
        reg.inputs["dataset"] = reg.outputs["dataset"]
        parents.append(reg.outputs["dataset"])
    metadata = {k: v for k, v in provenance.items() if k != "dataset"}
    registered = reg.registry.register_adapter(f"{reg.prefix}-{entry}", role, str(path), base=reg.base,
                                               parents=parents, run=reg.run, metadata=metadata or None)
    reg.outputs[path.name] = registered.ref


def safe_name(s: str) -> str:
    """``s`` as a registry name: other characters become '-', at most 100 long."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in s).strip("-.") or "run"
    return cleaned[:100]


def final_log_value(log_history: list[dict], key: str) -> float | None:
    for entry in reversed(log_history):
        if key in entry:
            return float(entry[key])
    return None


def full_state_dict(trainer) -> dict | None:
    """The whole model's state dict of a TRL/transformers trainer whose weights are sharded.

    Under FSDP or DeepSpeed ZeRO-3 each process holds a shard only, so saving from the
    module would write empty tensors; accelerate gathers the full weights instead. This is
    a collective: call it on every process. (ZeRO-3 needs
    ``zero3_save_16bit_model: true`` in the accelerate config, as deepspeed_zero3.yaml has.)

    Returns:
        The gathered state dict (complete on rank 0), or None when nothing is sharded, in
        which case the model's own parameters are complete on every process.
    """
    from rlhf.distributed import engine

    eng = engine()
    if eng == "fsdp":
        return trainer.accelerator.get_state_dict(trainer.model)
    if eng == "deepspeed-zero3":
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


#: Above this fraction of preference pairs longer than ``train.max_length``, a stage warns.
LONG_PAIRS_WARNING = 0.05


def pair_ids(tok, row: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt + chosen and of prompt + rejected, built as TRL's RewardTrainer
    builds them: a conversation through the chat template, plain text with the EOS appended
    to the completion (when it lacks one) and the tokenizer's special tokens."""
    def ids(completion) -> list[int]:
        if isinstance(row["prompt"], list):
            return list(tok.apply_chat_template(row["prompt"] + completion, tokenize=True,
                                                return_dict=True)["input_ids"])
        if not completion.endswith(tok.eos_token):
            completion = completion + tok.eos_token
        return list(tok(row["prompt"] + completion).input_ids)

    return ids(row["chosen"]), ids(row["rejected"])


def fit_pair(tok, row: dict, max_length: int) -> tuple[list[int], list[int], bool]:
    """:func:`pair_ids` of ``row``, each at most ``max_length`` tokens, and whether the pair
    had to be shortened.

    TRL's RewardTrainer drops a longer pair; a held-out evaluation must not (the long pairs
    are the hard ones), so it shortens them by PPO's prompt rule instead
    (:func:`rlhf.generation.shorter_prompts`): whole early prompt turns go, the system turn
    and the last prompt turn stay, both sides lose the same turns. Only when that is not
    enough (or the prompt is plain text) are the ids cut from the left, keeping the last
    ``max_length`` tokens: the token the reward model scores, the conversation's last, always
    stays."""
    from rlhf.generation import shorter_prompts

    chosen, rejected = pair_ids(tok, row)
    if max(len(chosen), len(rejected)) <= max_length:
        return chosen, rejected, False
    if isinstance(row["prompt"], list):
        for prompt in shorter_prompts(row["prompt"]):
            chosen, rejected = pair_ids(tok, dict(row, prompt=prompt))
            if max(len(chosen), len(rejected)) <= max_length:
                break
    return chosen[-max_length:], rejected[-max_length:], True


def count_long_pairs(stage: str, tok, train_rows: list[dict], test_rows: list[dict], max_length: int,
                     what_trl_does: str) -> dict:
    """Count the pairs longer than ``max_length`` tokens (either side), say so at stage start,
    and warn above :data:`LONG_PAIRS_WARNING` of them.

    TRL drops such pairs from the reward model's training and held-out sets (RewardTrainer)
    or truncates them (DPOTrainer) without a word; on real HH data at 256 tokens a quarter of
    the pairs, the longest and hardest, left the held-out accuracy that way.

    Returns:
        ``{"train_pairs_too_long": n, "test_pairs_too_long": m}`` for the stage's metrics.
    """
    import warnings

    counts = {f"{split}_pairs_too_long": sum(max(map(len, pair_ids(tok, r))) > max_length for r in rows)
              for split, rows in (("train", train_rows), ("test", test_rows))}
    a, b = counts["train_pairs_too_long"], counts["test_pairs_too_long"]
    if a or b:
        line = (f"{stage}: {a} of {len(train_rows)} training and {b} of {len(test_rows)} held-out pairs are longer than "
                f"{stage}.train.max_length={max_length} tokens; TRL {what_trl_does} them")
        print(f"[{stage}] {line}", flush=True)
        if (a + b) > LONG_PAIRS_WARNING * max(1, len(train_rows) + len(test_rows)):
            warnings.warn(f"{line}: raise {stage}.train.max_length, or the held-out numbers describe the shorter "
                          "pairs only", stacklevel=2)
    return counts


# ---------------------------------------------------------------------------------------
# The skeleton of a stage that wraps a TRL trainer (SFT, reward, DPO; KTO next). Each such
# stage is one file that reads top to bottom as these steps, with its own data, model and
# trainer in between:
#
#   out, main = begin(cfg)                                  # 0. output dir, resolved config beside it
#   ...its data...                                          # 1.
#   set_seed(cfg.seed); tok = stage_tokenizer(cfg)          # 2. seed (LoRA init), the recipe's chat template
#   ...its model, LoRA and TRL trainer...                   #    model, LoRA
#   tracker = stage_tracker(cfg, out, group, main, base=...)
#   train(trainer, tracker, out, resume)                    # 3. train (resumable), the console via the tracker
#   ...its held-out evaluation...; tracker.finish()         #    evaluate
#   publish_trained(trainer, out, "adapter", write, ...)    # 4. publish (gathered when sharded), every rank
#   return finish(cfg, out, main, metrics, ...)             #    metrics.json, the StageResult
#
# Plain functions rather than a base class: a stage stays readable top to bottom, and one
# that needs another order (DPO evaluates after publishing) just calls them in its order.


def begin(cfg) -> tuple[Path, bool]:
    """Step 0 of a stage: its output directory, with the resolved config written beside the
    artifacts (``config.yaml``) by the main process. Returns ``(out, is_main)``: under accelerate
    launch every process runs the stage, only the main one writes files or logs."""
    from rlhf import distributed as dist
    from rlhf.config import save_yaml, to_dict

    main = dist.is_main()
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), out / "config.yaml")
    return out, main


def stage_tokenizer(cfg):
    """The base model's tokenizer with the recipe's chat template (``model.chat_template``), so
    that every stage formats conversations alike."""
    from rlhf.models import tokenizer_for

    return tokenizer_for(cfg.model)


def stage_tracker(cfg, out: Path, group: str | None, main: bool, **refs: str):
    """The stage's :class:`rlhf.tracking.Tracker` (``<run_dir>/<stage>/``), with the registry
    references it reads (``base=...``, ``dataset=...``) logged beside its config."""
    from rlhf.config import to_dict
    from rlhf.tracking import Tracker

    return Tracker(out.parent, out.name, config=to_dict(cfg), report_to=cfg.report_to, group=group, refs=refs,
                   is_main_process=main)


def train(trainer, tracker, out: Path, resume: bool, *, attach: bool = True) -> float | None:
    """Step 3: train, from the stage's last complete checkpoint when ``resume``. With ``attach``
    the trainer's log dicts go to the tracker and the console shows one progress line
    (a trainer built with ``tracker.callback()`` passes False).

    Returns:
        The mean training loss of this call's steps; None when it trained none (resumed
        from the checkpoint of the last step: transformers' ``train_loss`` is then 0/0).
    """
    from rlhf.runs import checkpoint_record

    if attach:
        tracker.attach(trainer)
    trainer.add_callback(_stamp_checkpoints_callback(trainer))  # every checkpoint carries the config fingerprint
    # with resume, rlhf.stages.run_stage has checked that the newest checkpoint is this config's
    checkpoint = last_checkpoint(out) if resume else None
    if checkpoint is not None and hasattr(trainer, "_total_train_tokens"):
        # TRL's running token count (the num_tokens charts) is no part of transformers' state
        tokens = checkpoint_record(checkpoint).get("counters", {}).get("total_train_tokens")
        if isinstance(tokens, (int, float)):
            trainer._total_train_tokens = tokens
    if checkpoint is not None and _load_finished_checkpoint(trainer, checkpoint):
        return None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    start = int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0
    return result.training_loss if trainer.state.global_step > start else None


def _load_finished_checkpoint(trainer, checkpoint: str) -> bool:
    """Load the checkpoint of the last step (a stage killed after it, say while publishing)
    without training; False for any other checkpoint.

    transformers' ``train()`` checks ``max_steps`` only after a step: resumed from the last
    step's checkpoint mid-epoch it trains one step more. Under FSDP or DeepSpeed, whose
    weights load only once the model is wrapped, ``train()`` still does the loading.
    """
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if not state.max_steps or state.global_step < state.max_steps or trainer.is_fsdp_enabled \
            or trainer.is_deepspeed_enabled:
        return False
    trainer.state = state
    trainer._load_from_checkpoint(checkpoint)
    best = state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()  # what train() ends with
    return True


def _stamp_checkpoints_callback(trainer):
    from transformers import TrainerCallback

    from rlhf.runs import stamp_checkpoint

    class StampCheckpoints(TrainerCallback):
        """Copies ``checkpoints/``'s config fingerprint into each ``checkpoint-N`` it saves,
        with the log row counts and TRL's token count a resume continues from."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                tokens = getattr(trainer, "_total_train_tokens", None)
                stamp_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                                 {"total_train_tokens": tokens} if isinstance(tokens, (int, float)) else None)

    return StampCheckpoints()


def publish_trained(trainer, out: Path, name: str, write: Callable[[Path, dict | None], None], **publish_kwargs) -> str:
    """Step 4: publish the trained artifact ``out/name`` atomically (:func:`publish`).

    Call it on every process: sharded weights (FSDP, ZeRO-3) are gathered first (a
    collective), ``write(tmp, state)`` writes them (``state`` is the gathered state dict, or
    None when the model's own parameters are complete), the main process publishes, and the
    others wait until the artifact exists."""
    from rlhf import distributed as dist

    state = full_state_dict(trainer)
    if dist.is_main():
        publish(out, name, lambda tmp: write(tmp, state), **publish_kwargs)
    dist.barrier()
    return str(out / name)


def publish_policy_adapter(trainer, out: Path, tok, *, stage: str, base: str, cfg, registration, data_ref: str) -> str:
    """Publish a preference stage's policy adapter (DPO, KTO) atomically: the "default"
    adapter only ("ref" is the unchanged SFT adapter), its LoRA weights without embeddings,
    and the tokenizer beside it (what generate, eval and export load)."""
    from rlhf.config import to_dict
    from rlhf.models import save_tokenizer

    def write(tmp: Path, state: dict | None) -> None:
        trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"],
                                      save_embedding_layers=False, **({"state_dict": state} if state else {}))
        save_tokenizer(tok, tmp)

    return publish_trained(trainer, out, "adapter", write, role="policy", base=base, config=to_dict(cfg),
                           registration=registration, entry=stage, method=stage, sft_adapter=cfg.sft_adapter,
                           dataset=data_ref)


# Sample completions of each policy logged per evaluation: ppo.num_samples_logged's default.
SAMPLES_LOGGED = 8


def evaluate_policy_against_sft(cfg, path: str, gold_fn, metrics: dict, tracker, step: int) -> None:
    """Sample the SFT and the trained policy (adapter ``path``) on the held-out prompts with
    the PPO stage's sampler; their metrics go into ``metrics`` by the summary convention
    (rlhf.summary: SFT as the initial evaluation at step 0, the trained policy as the final
    one at ``step``), as PPO logs and reports its own, and the first :data:`SAMPLES_LOGGED`
    completions of each go to the trackers as sample tables (wandb, trackio, MLflow...)."""
    from rlhf import summary
    from rlhf.evaluation import evaluate_against_sft

    sft_eval, trained_eval, rows = evaluate_against_sft(cfg, path, gold_fn)
    metrics.update({**summary.prefixed(summary.REFERENCE, sft_eval), **summary.prefixed(summary.TRAINED, trained_eval)})
    for at, numbers, samples in ((0, sft_eval, rows["sft"]), (step, trained_eval, rows["policy"])):
        tracker.log(numbers, step=at)
        tracker.log_samples(at, [dict(r, step=at) for r in samples[:SAMPLES_LOGGED]])


def finish(cfg, out: Path, main: bool, stage: str, artifacts: dict[str, str], metrics: dict,
           inputs: dict[str, str]) -> StageResult:
    """The last step: the final metrics beside the artifacts (``metrics.json``) and the
    :class:`StageResult` every stage returns."""
    if main:
        write_json(out / "metrics.json", metrics)
    return StageResult(stage=stage, output_dir=str(out), base=cfg.model.name_or_path, artifacts=artifacts,
                       metrics=metrics, inputs=inputs)
