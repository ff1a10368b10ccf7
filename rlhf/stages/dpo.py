"""Direct preference optimisation with TRL's DPOTrainer, on the SFT adapter (LoRA).

DPO (Rafailov et al. 2023, arXiv 2305.18290) trains the policy on the preference pairs
directly: no reward model, no sampling. Its loss compares the policy's log-ratio to a
reference on the chosen and the rejected response,
``-log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))``, so the reference decides what
the policy is pulled away from. Here the policy adapter starts as a copy of the SFT adapter
and the reference is the frozen SFT adapter itself, not the bare base with adapters disabled
(the mistake of TRL's PEFT path for pre-trained adapters: trl issues 1340, 495; fixed for
DPO by cloning the adapter, trl PR 4723). Both are LoRA adapters on one base model.

Reads the same preference store as the reward stage (any ingested dataset, its train split
for training and its test split for eval loss and reward accuracy). Inputs arrive resolved
(:func:`rlhf.resolve.resolve_inputs`): a pinned ``NAME:VERSION`` store reference (a file is
ingested there first), adapter directories and a base directory or hub id. Writes
``<output_dir>/adapter`` (a policy adapter, peft safetensors, published by
:func:`rlhf.stages.common.publish`); with ``eval_prompts`` it also samples the SFT and the
DPO policy on those prompts with the PPO stage's sampler and reports gold/RM score, KL to
SFT and the win rate over SFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from rlhf.config import ConfigError, DPOConfig
from rlhf.stages.common import (
    Registration,
    StageResult,
    begin,
    count_long_pairs,
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

REF_ADAPTER = "ref"  # the adapter name TRL's DPOTrainer uses for the reference (trl >= 1.x refactor)


def _pairs(data_ref: str, split: str) -> list[dict]:
    """Conversational prompt/chosen/rejected rows of one split; ties carry no preference."""
    import reward_data

    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in reward_data.read_split(data_ref, split) if not r.get("tie")]


def run_dpo(cfg: DPOConfig, *, group: str | None = None, resume: bool = False,
            gold_fn: Callable[[str, str], float] | None = None,
            registration: Registration | None = None) -> StageResult:
    """Train the DPO policy; its artifact is ``adapter`` (the policy LoRA).

    Args:
        gold_fn: optional ``(prompt, response) -> float`` for the evaluation only (a task's
            gold reward).
        registration: where publishing records the adapter in the registry (a pipeline's
            rank 0), or None.
    """
    from transformers import set_seed

    from rlhf import distributed as dist
    from rlhf.resolve import is_store_ref

    out, main = begin(cfg)

    # 1. preference data: the versioned store entry the reward stage reads too
    data_ref = cfg.dataset
    if not is_store_ref(data_ref):
        raise ConfigError(f"dpo.dataset: {data_ref!r} is not a data-store reference; resolve the inputs first "
                          "(rlhf.resolve.resolve_inputs, as `rlhf dpo` and `rlhf run` do)")
    train_rows, test_rows = _pairs(data_ref, "train"), _pairs(data_ref, "test")
    if not train_rows:
        raise ValueError(f"dpo.dataset {data_ref}: no training pairs")

    # 2. base + the SFT adapter as the policy's start (seeded: without an SFT adapter the LoRA
    # is new); 3. TRL's trainer with the SFT reference
    set_seed(cfg.seed)
    base = cfg.model.name_or_path
    tok = stage_tokenizer(cfg)
    too_long = count_long_pairs("dpo", tok, train_rows, test_rows, cfg.train.max_length, "truncates")
    tracker = stage_tracker(cfg, out, group, main, base=base, dataset=data_ref, sft_adapter=cfg.sft_adapter)
    trainer = build_trainer(cfg, base, tok, train_rows, test_rows)
    # the project's progress line, as SFT and reward; TRL's log dicts go to metrics.jsonl
    train_loss = train(trainer, tracker, out, resume)
    metrics: dict = {"train_pairs": len(train_rows), "test_pairs": len(test_rows), **too_long, "train_loss": train_loss}
    if test_rows:
        ev = trainer.evaluate()
        for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            if k in ev:
                metrics[k.replace("/", "_")] = float(ev[k])
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step=trainer.state.global_step)

    # 4. publish the policy adapter ("default" only; "ref" is the unchanged SFT adapter), atomically
    path = publish_policy_adapter(trainer, out, tok, stage="dpo", base=base, cfg=cfg, registration=registration,
                                  data_ref=data_ref)

    # 5. sample SFT and DPO policies on held-out prompts (the PPO stage's sampler and metrics);
    # the training model is freed first, the evaluation loads the base once more
    step = trainer.state.global_step
    del trainer
    if cfg.eval_prompts and main:
        evaluate_policy_against_sft(cfg, path, gold_fn, metrics, tracker, step)
    tracker.finish()
    return finish(cfg, out, main, "dpo", {"adapter": path}, dist.broadcast_object(metrics), {"dataset": data_ref})


def trl_args(cfg: DPOConfig, has_eval: bool):
    """TRL's DPOConfig for our stage config (TrainArgs mapping plus the DPO loss settings)."""
    from trl import DPOConfig as TRLDPOConfig

    kw = trl_training_kwargs(cfg.train, Path(cfg.output_dir), cfg.seed, has_eval=has_eval)
    kw.update(beta=cfg.beta, loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing, disable_dropout=True,
              dataset_num_proc=None, precompute_ref_log_probs=False, truncation_mode="keep_start")
    return TRLDPOConfig(**filter_supported(TRLDPOConfig, kw))


def build_trainer(cfg: DPOConfig, base: str, tok, train_rows: list[dict], test_rows: list[dict], callbacks=()):
    """TRL's DPOTrainer on ``base`` with the SFT adapter as the trainable "default" adapter and
    the frozen SFT adapter as the reference (checked, see ``pin_sft_reference``)."""
    import datasets
    from trl import DPOTrainer

    model, peft_config, sft_dir = policy_from_sft(cfg, base, tok)
    trainer = DPOTrainer(
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

    Handed a PeftModel whose "default" adapter is pre-trained, TRL's DPOTrainer clones it into
    a "ref" adapter and computes reference logprobs with it active (trl PR 4723); earlier
    versions disabled the adapters instead, i.e. used the bare base. We do not take the clone
    on trust: the "ref" weights are reloaded from the SFT adapter's own files and frozen, and on
    one training batch TRL's reference logprobs must equal the SFT adapter's (the untrained
    policy, loaded from the same files). A base reference fails this unless the SFT adapter
    does not change the base on that batch, in which case the two references agree anyway.

    Raises:
        RuntimeError: the installed TRL made no "ref" adapter or computes the reference otherwise.
    """
    import trl
    from peft import set_peft_model_state_dict

    from rlhf.adapters import read_lora_weights

    model = trainer.accelerator.unwrap_model(trainer.model)
    if REF_ADAPTER not in model.peft_config:
        raise RuntimeError(f"trl {trl.__version__}: DPOTrainer made no {REF_ADAPTER!r} adapter, so its reference "
                           "would be the bare base, not the SFT adapter; use a trl release with the DPO refactor")
    state, _ = read_lora_weights(sft_dir)
    result = set_peft_model_state_dict(model, state, adapter_name=REF_ADAPTER)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{sft_dir}: adapter does not fit the base model: unexpected keys {bad[:3]}")
    for name, p in model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            p.requires_grad_(False)

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trl_ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    sft = torch.cat(sequence_logps(model, batch))  # the "default" adapter: the SFT weights, untrained
    with model.disable_adapter():
        bare = torch.cat(sequence_logps(model, batch))
    err_sft, err_base = (trl_ref - sft).abs().max().item(), (trl_ref - bare).abs().max().item()
    # fp32 forwards agree to rounding; half-precision ones (GPU recipes) to a few per cent
    rel = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2
    if err_sft > rel * (1.0 + sft.abs().max().item()):
        raise RuntimeError(f"trl {trl.__version__}: DPOTrainer's reference logprobs are not the SFT adapter's "
                           f"(max diff {err_sft:.4g} to the SFT adapter, {err_base:.4g} to the bare base)")


@torch.no_grad()
def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion logprobs of a DPO batch under the active adapter.

    Args:
        batch: TRL's DPO collator output: ``input_ids``, ``attention_mask``, ``completion_mask``
            (2B, L), the B chosen sequences first, then the B rejected ones.

    Returns:
        ``(chosen, rejected)`` logprobs, each (B,).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(logp, 2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)  # (2B, L-1)
    summed = (tok * batch["completion_mask"][:, 1:]).sum(1)
    return summed.chunk(2, dim=0)


