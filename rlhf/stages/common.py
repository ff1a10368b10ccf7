"""Plain functions shared by the stages: TRL argument mapping, checkpoints, artifact metadata."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from rlhf.config import LoraConfigSpec, TrainArgs


def trl_training_kwargs(train: TrainArgs, output_dir: Path, seed: int, has_eval: bool) -> dict:
    """Map our TrainArgs onto transformers/TRL TrainingArguments keyword arguments.

    Trackers are driven by rlhf.tracking through a callback, so TRL's own report_to is off.
    """
    kw = dict(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_ratio=train.warmup_ratio,
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        save_safetensors=True,
        eval_strategy=("steps" if train.eval_steps > 0 else "no") if has_eval else "no",
        eval_steps=train.eval_steps if train.eval_steps > 0 else None,
        gradient_checkpointing=train.gradient_checkpointing,
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


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move a fully written directory into place (replacing an old one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def final_log_value(log_history: list[dict], key: str) -> float | None:
    for entry in reversed(log_history):
        if key in entry:
            return float(entry[key])
    return None
