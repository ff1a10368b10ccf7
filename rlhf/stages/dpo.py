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

import math
from pathlib import Path
from typing import Callable

import torch

from rlhf.config import ConfigError, DPOConfig, PPOConfig, save_yaml, to_dict
from rlhf.stages import StageResult
from rlhf.stages.common import (
    Registration,
    count_long_pairs,
    filter_supported,
    final_log_value,
    full_state_dict,
    last_checkpoint,
    peft_lora_config,
    publish,
    trl_training_kwargs,
    write_json,
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
    from rlhf import distributed as dist
    from rlhf.models import save_tokenizer, tokenizer_for
    from rlhf.resolve import is_store_ref
    from rlhf.tracking import Tracker

    # Under accelerate launch every process runs this function; TRL shards the pairs and
    # syncs gradients, and only the main process writes files or logs.
    main = dist.is_main()
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), out / "config.yaml")

    # 1. preference data: the versioned store entry the reward stage reads too
    data_ref = cfg.dataset
    if not is_store_ref(data_ref):
        raise ConfigError(f"dpo.dataset: {data_ref!r} is not a data-store reference; resolve the inputs first "
                          "(rlhf.resolve.resolve_inputs, as `rlhf dpo` and `rlhf run` do)")
    train_rows, test_rows = _pairs(data_ref, "train"), _pairs(data_ref, "test")
    if not train_rows:
        raise ValueError(f"dpo.dataset {data_ref}: no training pairs")

    # 2. base + the SFT adapter as the policy's start; 3. TRL's trainer with the SFT reference
    base = cfg.model.name_or_path
    tok = tokenizer_for(cfg.model)  # model.chat_template included, as in every stage
    too_long = count_long_pairs("dpo", tok, train_rows, test_rows, cfg.train.max_length, "truncates")
    tracker = Tracker(out.parent, out.name, config=to_dict(cfg), report_to=cfg.report_to, group=group,
                      refs={"base": base, "dataset": data_ref, "sft_adapter": cfg.sft_adapter}, is_main_process=main)
    trainer = build_trainer(cfg, base, tok, train_rows, test_rows)
    tracker.attach(trainer)  # the project's progress line, as SFT and reward; TRL's log dicts go to metrics.jsonl
    ckpt = last_checkpoint(out) if resume else None
    trainer.train(resume_from_checkpoint=ckpt)
    metrics: dict = {"train_pairs": len(train_rows), "test_pairs": len(test_rows), **too_long,
                     "train_loss": final_log_value(trainer.state.log_history, "train_loss")}
    if test_rows:
        ev = trainer.evaluate()
        for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            if k in ev:
                metrics[k.replace("/", "_")] = float(ev[k])
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step=trainer.state.global_step)

    # 4. publish the policy adapter ("default" only; "ref" is the unchanged SFT adapter), atomically
    state = full_state_dict(trainer)  # FSDP / ZeRO-3: gathered by every process; else None

    def write(tmp: Path) -> None:
        trainer.model.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"],
                                      save_embedding_layers=False, **({"state_dict": state} if state else {}))
        save_tokenizer(tok, tmp)

    if main:
        publish(out, "adapter", write, role="policy", base=base, config=to_dict(cfg), registration=registration,
                entry="dpo", method="dpo", sft_adapter=cfg.sft_adapter, dataset=data_ref)
    dist.barrier()

    # 5. sample SFT and DPO policies on held-out prompts (the PPO stage's sampler and metrics);
    # the training model is freed first, the evaluation loads the base once more
    del trainer
    if cfg.eval_prompts and main:
        metrics.update(evaluate_against_sft(cfg, str(out / "adapter"), gold_fn))
        tracker.log({k: v for k, v in metrics.items() if k.startswith(("sft/", "dpo/"))}, step=0)
    tracker.finish()
    if main:
        write_json(out / "metrics.json", metrics)
    metrics = dist.broadcast_object(metrics)
    return StageResult(stage="dpo", output_dir=str(out), base=base, artifacts={"adapter": str(out / "adapter")},
                       metrics=metrics, inputs={"dataset": data_ref})


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
    from peft import PeftModel
    from trl import DPOTrainer

    from rlhf.models import disable_dropout, load_causal_lm

    model = load_causal_lm(base, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                           trust_remote_code=cfg.model.trust_remote_code,
                           attn_implementation=cfg.model.attn_implementation)
    disable_dropout(model)
    sft_dir = cfg.sft_adapter or None
    if sft_dir is not None:
        model = PeftModel.from_pretrained(model, sft_dir, is_trainable=True)
        peft_config = None  # TRL then clones "default" into a "ref" adapter: see pin_sft_reference
    else:
        # the base is the SFT model (full fine-tuning): a fresh LoRA, whose disabled state is the reference
        peft_config = peft_lora_config(cfg.lora, model, "CAUSAL_LM")
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


def evaluate_against_sft(cfg: DPOConfig, dpo_adapter: str, gold_fn: Callable[[str, str], float] | None,
                         name: str = "dpo") -> dict:
    """Sample the SFT and the DPO policy once per held-out prompt and compare them.

    ``name`` prefixes the trained policy's keys (``dpo``; the KTO stage, whose config has the
    same model, adapter and eval_* fields, passes ``kto``).

    Reuses the PPO stage's roles and ``evaluate`` (same sampler, stop handling, KL and standard
    errors, same evaluation seed), so DPO's numbers compare with PPO's: a RoleModel whose
    policy role holds first the SFT weights, then the DPO adapter. Win rates count a prompt
    where DPO's response scores higher than SFT's as 1, a tie as 1/2.

    Returns:
        ``sft/eval/*`` and ``dpo/eval/*`` (score when a reward adapter is given, gold when
        ``gold_fn`` is, kl to SFT, entropy, length; means and standard errors) and
        ``dpo/win_rate_*`` with standard errors.
    """
    from peft import set_peft_model_state_dict

    from rlhf import distributed as dist
    from rlhf.adapters import RoleModel, read_lora_weights
    from rlhf.data import load_prompts
    from rlhf.models import load_causal_lm, tokenizer_for
    from rlhf.stages.ppo import _stop_ids, encode_prompts, evaluate, generation_config, score_suffix

    # the PPO stage's evaluation settings, from DPO's eval_* keys; a critic-free estimator, so
    # that scoring skips the value role (evaluation uses no values)
    pcfg = PPOConfig(model=cfg.model, response_length=cfg.eval_response_length, temperature=cfg.eval_temperature,
                     max_prompt_length=cfg.eval_max_prompt_length, rollout_batch_size=cfg.eval_batch_size,
                     num_minibatches=1, micro_batch_size=min(16, cfg.eval_batch_size), seed=cfg.seed,
                     advantage_estimator="reinforce++")
    base_path = cfg.model.name_or_path
    tok = tokenizer_for(cfg.model)
    base = load_causal_lm(base_path, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                          trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
    dpo_state, dpo_cfg = read_lora_weights(dpo_adapter)
    model = RoleModel(base, cfg.sft_adapter or None, cfg.reward_adapter or None,
                      policy_lora={k: dpo_cfg[k] for k in ("r", "lora_alpha", "target_modules")}, with_value=False)
    device = dist.device()
    model.to(device).eval()
    prompts = load_prompts(cfg.eval_prompts, split="test")
    eval_ids = encode_prompts(tok, prompts, pcfg.max_prompt_length)
    eval_texts = [p[-1]["content"] for p in prompts]
    stop_ids, pad_id = _stop_ids(tok, pcfg, model.base_lm), tok.pad_token_id
    gen_cfg = generation_config(pcfg, stop_ids, pad_id)
    suffix = score_suffix(tok, stop_ids)  # the reward model scores where it was trained to, as in PPO
    engine = None  # the hf engine
    if cfg.eval_generation == "vllm":  # samples the policy role: first the SFT weights, then DPO's
        from rlhf.generation_vllm import check_vllm, make_vllm_engine

        check_vllm("dpo.eval_generation: vllm")
        engine = make_vllm_engine(model, pcfg, base_path, stop_ids, pad_id, device, lora_rank=dpo_cfg["r"])
    seed = cfg.seed + 1_000_003  # the PPO stage's evaluation seed: same random stream for both methods

    out: dict = {}
    rows = {}
    trained = name
    for name in ("sft", trained):
        if name == trained:
            result = set_peft_model_state_dict(model.peft, dpo_state, adapter_name="policy")
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if bad:
                raise ValueError(f"{dpo_adapter}: does not fit the SFT adapter's shape: unexpected keys {bad[:3]}")
        ev, rows[name] = evaluate(model, tok, eval_ids, eval_texts, pcfg, gen_cfg, stop_ids, pad_id, device, gold_fn,
                                  seed=seed, suffix=suffix, engine=engine)
        out.update({f"{name}/{k}": v for k, v in ev.items()})
    for key, name in (("score", "rm"), ("gold", "gold")):
        pairs = [(d[key], s[key]) for d, s in zip(rows[trained], rows["sft"]) if d[key] is not None and s[key] is not None]
        if pairs:
            out[f"{trained}/win_rate_{name}"], out[f"{trained}/win_rate_{name}_se"] = win_rate(*zip(*pairs))
    return out


def win_rate(new: list[float], old: list[float]) -> tuple[float, float]:
    """Fraction of prompts where ``new`` scores above ``old`` (a tie counts 1/2), with its
    standard error over prompts. ``new[i]`` and ``old[i]`` are two policies' scores on prompt i."""
    wins = torch.tensor([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(new, old, strict=True)],
                        dtype=torch.float64)
    se = float(wins.std() / math.sqrt(len(wins))) if len(wins) > 1 else 0.0
    return float(wins.mean()), se
