"""Stage 1: supervised fine-tuning with TRL's SFTTrainer (LoRA by default).

Reads prompt-completion (or messages) examples, applies the tokenizer's chat template and
trains on completion tokens only. Writes ``<output_dir>/adapter`` (peft safetensors, or
``<output_dir>/model`` for full fine-tuning) with the resolved config beside it. Inputs
arrive resolved (:func:`rlhf.resolve.resolve_inputs`): a base directory or hub id, and a
file, hub id or pinned data-store reference.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf.config import SFTConfig, to_dict
from rlhf.resolve import is_store_ref
from rlhf.stages.common import (
    Registration,
    StageResult,
    begin,
    filter_supported,
    final_log_value,
    finish,
    peft_lora_config,
    publish_trained,
    stage_tokenizer,
    stage_tracker,
    train,
    trl_training_kwargs,
)


def _examples(cfg: SFTConfig) -> list[dict]:
    """The SFT rows as conversations: plain-string prompts and completions become one user
    and one assistant turn (:func:`rlhf.data.as_messages`), so SFT trains on the chat
    template's layout, the one PPO samples in."""
    from rlhf.data import as_messages, load_rows

    if is_store_ref(cfg.dataset):
        # a preference dataset from the store: fine-tune on the preferred responses
        import reward_data

        return [{"prompt": r["prompt"], "completion": r["chosen"]}
                for r in reward_data.read_split(cfg.dataset, cfg.dataset_train_split) if not r.get("tie")]
    rows = load_rows(cfg.dataset, cfg.dataset_train_split)
    if not rows:
        raise ValueError(f"sft.dataset {cfg.dataset}: no rows")
    keys = set(rows[0])
    if {"prompt", "completion"} <= keys:
        return [{"prompt": as_messages(r["prompt"], "user", f"{cfg.dataset} row {i}", "prompt"),
                 "completion": as_messages(r["completion"], "assistant", f"{cfg.dataset} row {i}", "completion")}
                for i, r in enumerate(rows)]
    if "messages" in keys:
        return [{"messages": as_messages(r["messages"], "user", f"{cfg.dataset} row {i}", "messages")}
                for i, r in enumerate(rows)]
    raise ValueError(
        f"sft.dataset {cfg.dataset}: rows need 'prompt' and 'completion' (or 'messages'); found {sorted(keys)}"
    )


def run_sft(cfg: SFTConfig, *, group: str | None = None, resume: bool = False,
            registration: Registration | None = None) -> StageResult:
    """Train the SFT stage; its artifact is ``adapter`` (LoRA) or ``model`` (full fine-tuning).

    The steps of a TRL-trainer stage (:mod:`rlhf.stages.common`): under accelerate launch
    every process runs this function; TRL shards the data and syncs gradients, and only the
    main process writes files or logs."""
    import datasets
    from transformers import set_seed
    from trl import SFTConfig as TRLSFTConfig, SFTTrainer

    from rlhf.models import load_causal_lm, save_tokenizer

    out, main = begin(cfg)

    # 1. data: deterministic held-out split for eval loss
    rows = _examples(cfg)
    random.Random(cfg.seed).shuffle(rows)
    n_eval = int(len(rows) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and n_eval < cfg.min_eval_examples:
        import warnings

        # a small dataset's fraction rounds to (almost) nothing: keep a minimum held out
        want = min(cfg.min_eval_examples, len(rows) // 2)
        warnings.warn(f"sft.dataset {cfg.dataset}: eval_fraction {cfg.eval_fraction} of {len(rows)} rows is {n_eval}; "
                      f"holding out {want} (sft.min_eval_examples)", stacklevel=2)
        n_eval = want
    train_ds = datasets.Dataset.from_list(rows[n_eval:])
    eval_ds = datasets.Dataset.from_list(rows[:n_eval]) if n_eval else None

    # 2. model and tokenizer (same path for hub ids, local dirs and the builtin tiny base);
    # seeded first, as LoRA's initial matrices come from the global RNG
    set_seed(cfg.seed)
    base = cfg.model.name_or_path
    tok = stage_tokenizer(cfg)
    model = load_causal_lm(base, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                           trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation)

    # 3. train; completion_only_loss masks the prompt tokens out of the loss
    kw = trl_training_kwargs(cfg.train, out, cfg.seed, has_eval=eval_ds is not None)
    kw.update(completion_only_loss=True, packing=False, dataset_num_proc=None, eos_token=tok.eos_token)
    args = TRLSFTConfig(**filter_supported(TRLSFTConfig, kw))
    tracker = stage_tracker(cfg, out, group, main, base=base)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        peft_config=peft_lora_config(cfg.lora, model, "CAUSAL_LM") if cfg.finetune == "lora" else None,
    )
    metrics = {"train_loss": train(trainer, tracker, out, resume)}
    last = final_log_value(trainer.state.log_history, "loss")
    metrics["loss"] = last if last is not None else metrics["train_loss"]  # runs shorter than logging_steps
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = float(ev["eval_loss"])
        tracker.log({"eval_loss": metrics["eval_loss"]}, step=trainer.state.global_step)
    tracker.finish()

    # 4. publish the artifact atomically: adapter (LoRA) or whole model (full)
    kind = "adapter" if cfg.finetune == "lora" else "model"

    def write(tmp: Path, state: dict | None) -> None:
        # the adapter holds LoRA weights only (never the embeddings: a pad row added by
        # load_tokenizer is rebuilt as zeros by every loader); the tokenizer goes beside it
        extra = {"save_embedding_layers": False} if kind == "adapter" else {}
        trainer.model.save_pretrained(tmp, safe_serialization=True, **extra, **({"state_dict": state} if state else {}))
        save_tokenizer(tok, tmp)

    path = publish_trained(trainer, out, kind, write, role="sft", base=base, config=to_dict(cfg),
                           registration=registration, finetune=cfg.finetune)
    return finish(cfg, out, main, "sft", {kind: path}, metrics, {"dataset": cfg.dataset})
