"""Kahneman-Tversky optimisation with TRL's KTOTrainer, on the SFT adapter (LoRA).

KTO (Ethayarajh et al. 2024, arXiv 2402.01306) learns from labelled completions, not pairs:
each completion is desirable or undesirable (a thumbs-up/down log), and the loss pushes the
policy/reference log-ratio of a desirable completion above, an undesirable one below, a
reference point z0 (a batch estimate of KL(policy || reference), from each prompt paired with
another row's completion). As in the DPO stage, the policy adapter starts as a copy of the SFT
adapter and the reference is the frozen SFT adapter itself (TRL clones it into a "ref" adapter;
the clone is reloaded from the SFT files and checked, see ``pin_sft_reference``).

Reads the preference store: an ``unpaired`` dataset (``rlhf data ingest`` of KTO-style rows)
gives its labelled completions; a pair dataset gives each pair's chosen response as desirable
and its rejected one as undesirable (ties are skipped). Writes ``<output_dir>/adapter`` (a policy
adapter, peft safetensors); with ``eval_prompts`` it samples the SFT and the KTO policy with the
PPO stage's sampler and reports the same ``initial/eval/*``, ``final/eval/*`` and win-rate keys as
DPO reports for itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from rlhf.config import ConfigError, KTOConfig
from rlhf.stages.common import (
    Registration,
    StageResult,
    begin,
    evaluate_policy_against_sft,
    filter_supported,
    finish,
    policy_from_sft,
    publish_policy_adapter,
    stage_tokenizer,
    stage_tracker,
    train,
    trl_training_kwargs,
)

REF_ADAPTER = "ref"  # the adapter name TRL's KTOTrainer gives its copy of a pre-trained adapter


def labelled_completions(data_ref: str, split: str) -> list[dict]:
    """TRL's unpaired rows ``{"prompt", "completion", "label"}`` of one store split.

    An unpaired dataset's records are taken as they are; a pair becomes two rows, its chosen
    response desirable and its rejected one undesirable (a tie says neither is better: skipped).
    """
    import reward_data

    kind = reward_data.load_version(data_ref).manifest.get("kind", "pairs")
    rows = []
    for r in reward_data.read_split(data_ref, split):
        if kind == "unpaired":
            rows.append({"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]})
        elif not r.get("tie"):
            rows.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            rows.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


def run_kto(cfg: KTOConfig, *, group: str | None = None, resume: bool = False,
            gold_fn: Callable[[str, str], float] | None = None,
            registration: Registration | None = None) -> StageResult:
    """Train the KTO policy; its artifact is ``adapter`` (the policy LoRA).

    Args:
        gold_fn: optional ``(prompt, response) -> float`` for the evaluation only (a task's
            gold reward).
        registration: where publishing records the adapter in the registry, or None.
    """
    from transformers import set_seed

    from rlhf import distributed as dist
    from rlhf.resolve import is_store_ref

    out, main = begin(cfg)

    # 1. labelled completions from the versioned store (unpaired records, or pairs split in two)
    data_ref = cfg.dataset
    if not is_store_ref(data_ref):
        raise ConfigError(f"kto.dataset: {data_ref!r} is not a data-store reference; resolve the inputs first "
                          "(rlhf.resolve.resolve_inputs, as `rlhf kto` and `rlhf run` do)")
    train_rows, test_rows = labelled_completions(data_ref, "train"), labelled_completions(data_ref, "test")
    labels = {r["label"] for r in train_rows}
    if labels != {True, False}:
        raise ValueError(f"kto.dataset {data_ref}: the train split needs desirable and undesirable completions, "
                         f"got {len(train_rows)} rows labelled {sorted(labels)}")

    # 2. base + the SFT adapter as the policy's start (seeded: without an SFT adapter the LoRA
    # is new); 3. TRL's trainer with the SFT reference
    set_seed(cfg.seed)
    base = cfg.model.name_or_path
    tok = stage_tokenizer(cfg)
    tracker = stage_tracker(cfg, out, group, main, base=base, dataset=data_ref, sft_adapter=cfg.sft_adapter)
    trainer = build_trainer(cfg, base, tok, train_rows, test_rows, callbacks=[tracker.callback()])
    train_loss = train(trainer, tracker, out, resume, attach=False)
    n_desirable = sum(r["label"] for r in train_rows)
    metrics: dict = {"train_completions": len(train_rows), "train_desirable": n_desirable,
                     "train_undesirable": len(train_rows) - n_desirable, "test_completions": len(test_rows),
                     "train_loss": train_loss}
    if test_rows:
        ev = trainer.evaluate()
        for k in ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_kl"):
            if k in ev:
                metrics[k.replace("/", "_")] = float(ev[k])
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step=trainer.state.global_step)

    # 4. publish the policy adapter ("default" only; "ref" is the unchanged SFT adapter), atomically
    path = publish_policy_adapter(trainer, out, tok, stage="kto", base=base, cfg=cfg, registration=registration,
                                  data_ref=data_ref)

    # 5. sample SFT and KTO policies on held-out prompts (DPO's evaluation), reported by the
    # summary convention (rlhf.summary): SFT as the initial evaluation, KTO as the final one
    step = trainer.state.global_step
    del trainer
    if cfg.eval_prompts and main:
        evaluate_policy_against_sft(cfg, path, gold_fn, metrics, tracker, step)
    tracker.finish()
    return finish(cfg, out, main, "kto", {"adapter": path}, dist.broadcast_object(metrics), {"dataset": data_ref})


def trl_args(cfg: KTOConfig, has_eval: bool):
    """TRL's KTOConfig for our stage config (TrainArgs mapping plus the KTO loss settings)."""
    from trl import KTOConfig as TRLKTOConfig

    kw = trl_training_kwargs(cfg.train, Path(cfg.output_dir), cfg.seed, has_eval=has_eval)
    kw.update(beta=cfg.beta, loss_type=cfg.loss_type, desirable_weight=cfg.desirable_weight,
              undesirable_weight=cfg.undesirable_weight, disable_dropout=True, dataset_num_proc=None,
              precompute_ref_log_probs=False)
    return TRLKTOConfig(**filter_supported(TRLKTOConfig, kw))


def build_trainer(cfg: KTOConfig, base: str, tok, train_rows: list[dict], test_rows: list[dict], callbacks=()):
    """TRL's KTOTrainer on ``base`` with the SFT adapter as the trainable "default" adapter and the
    frozen SFT adapter as the reference (checked, see ``pin_sft_reference``)."""
    import datasets
    from trl import KTOTrainer

    model, peft_config, sft_dir = policy_from_sft(cfg, base, tok)
    trainer = KTOTrainer(
        model=model,
        args=trl_args(cfg, has_eval=bool(test_rows)),
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(test_rows) if test_rows else None,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=list(callbacks),
    )
    if sft_dir is not None:
        pin_sft_reference(trainer, sft_dir)
    return trainer


def pin_sft_reference(trainer, sft_dir: str) -> None:
    """Make the trainer's reference the frozen SFT adapter, and check that it is.

    The DPO stage's check (rlhf.stages.dpo.pin_sft_reference) for KTO's batches: the "ref"
    weights are reloaded from the SFT adapter's files and frozen, and on one training batch
    TRL's reference logprobs must equal those of the untrained policy (the SFT weights).

    Raises:
        RuntimeError: the installed TRL made no "ref" adapter or computes the reference otherwise.
    """
    import trl
    from peft import set_peft_model_state_dict

    from rlhf.adapters import read_lora_weights

    model = trainer.accelerator.unwrap_model(trainer.model)
    if REF_ADAPTER not in model.peft_config:
        raise RuntimeError(f"trl {trl.__version__}: KTOTrainer made no {REF_ADAPTER!r} adapter, so its reference "
                           "would be the bare base, not the SFT adapter")
    state, _ = read_lora_weights(sft_dir)
    result = set_peft_model_state_dict(model, state, adapter_name=REF_ADAPTER)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{sft_dir}: adapter does not fit the base model: unexpected keys {bad[:3]}")
    for name, p in model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            p.requires_grad_(False)

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trl_ref, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    sft = completion_logps(model, batch)  # the "default" adapter: the SFT weights, untrained
    with model.disable_adapter():
        bare = completion_logps(model, batch)
    err_sft, err_base = (trl_ref - sft).abs().max().item(), (trl_ref - bare).abs().max().item()
    rel = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if err_sft > rel * (1.0 + sft.abs().max().item()):
        raise RuntimeError(f"trl {trl.__version__}: KTOTrainer's reference logprobs are not the SFT adapter's "
                           f"(max diff {err_sft:.4g} to the SFT adapter, {err_base:.4g} to the bare base)")


@torch.no_grad()
def completion_logps(model, batch: dict) -> torch.Tensor:
    """Summed completion logprobs of a KTO batch under the active adapter.

    Args:
        batch: TRL's KTO collator output: ``input_ids``, ``attention_mask``, ``completion_mask`` (B, L).

    Returns:
        (B,) summed logprobs of the completion tokens.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(logp, 2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    return (tok * batch["completion_mask"][:, 1:]).sum(1)
