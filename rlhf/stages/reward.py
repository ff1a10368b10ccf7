"""Stage 2: Bradley-Terry reward model with TRL's RewardTrainer (LoRA + score head).

Preference data comes from the reward_data store (canonical conversational
prompt/chosen/rejected records): ``cfg.dataset`` arrives as a pinned ``NAME:VERSION``
reference (:func:`rlhf.resolve.resolve_inputs` ingests a file first), so every run trains
on an immutable, versioned dataset. The reward LoRA sits on the same base
as the SFT adapter (one base, many adapters). Writes ``<output_dir>/adapter`` with
the score head (``rlhf.adapters.HEAD_FILE``) beside the LoRA weights.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.config import ConfigError, RewardConfig, to_dict
from rlhf.stages.common import (
    Registration,
    StageResult,
    begin,
    count_long_pairs,
    filter_supported,
    finish,
    fit_pair,
    peft_lora_config,
    publish_trained,
    stage_tokenizer,
    stage_tracker,
    train,
    trl_training_kwargs,
)


def read_pairs(data_ref: str, split: str) -> list[dict]:
    """The Bradley-Terry rows of split ``split`` of store entry ``data_ref`` (ties left out)."""
    import reward_data

    rows = []
    for rec in reward_data.read_split(data_ref, split):
        if rec.get("tie"):
            continue  # a tie carries no Bradley-Terry preference
        row = {"prompt": rec["prompt"], "chosen": rec["chosen"], "rejected": rec["rejected"]}
        if rec.get("margin") is not None:
            row["margin"] = float(rec["margin"])
        rows.append(row)
    if rows and any("margin" in r for r in rows) and not all("margin" in r for r in rows):
        for r in rows:  # TRL's collator needs a margin on every row or on none
            r.pop("margin", None)
    return rows


def ensure_test_split(train_rows: list[dict], test_rows: list[dict], minimum: int,
                      where: str) -> tuple[list[dict], list[dict]]:
    """Top up a held-out split smaller than ``minimum`` pairs with whole prompts from the
    training pairs (in a fixed hash order, so the split is the same every run), with a
    warning; never takes more than half of the training pairs.

    Without it a small dataset's test fraction can round to no pairs at all, and the reward
    model would go into PPO unmeasured.
    """
    import hashlib
    import json
    import warnings

    if len(test_rows) >= minimum or not train_rows:
        return train_rows, test_rows
    by_prompt: dict[str, list[dict]] = {}
    for r in train_rows:
        by_prompt.setdefault(hashlib.sha256(json.dumps(r["prompt"], sort_keys=True).encode()).hexdigest(), []).append(r)
    moved, keep = list(test_rows), []
    budget = len(train_rows) // 2
    for key in sorted(by_prompt):
        group = by_prompt[key]
        if len(moved) < minimum and len(moved) - len(test_rows) + len(group) <= budget:
            moved.extend(group)
        else:
            keep.extend(group)
    warnings.warn(f"{where}: the test split has {len(test_rows)} pairs, fewer than reward.min_eval_pairs={minimum}; "
                  f"holding out {len(moved) - len(test_rows)} training pairs more ({len(moved)} in all)", stacklevel=2)
    return keep, moved


def member_seeds(cfg: RewardConfig, member: int) -> tuple[int, int | None]:
    """``(seed, resample seed)`` of ensemble member ``member``: the stage's seed plus the
    member index, and the seed of its bootstrap resample of the training pairs (None for a
    single reward model, which trains on the pairs as they are)."""
    if cfg.ensemble == 1:
        return cfg.seed, None
    return cfg.seed + member, cfg.seed + 10_007 * (member + 1)


def bootstrap(rows: list[dict], seed: int) -> list[dict]:
    """As many pairs as ``rows``, drawn from them with replacement (seeded): one bootstrap
    resample, so that the members of an ensemble see different data (Lakshminarayanan et
    al. 2017, arXiv 1612.01474)."""
    import random

    rng = random.Random(seed)
    return [rows[rng.randrange(len(rows))] for _ in rows]


def ensemble_accuracy(chosen, rejected) -> float:
    """Held-out accuracy of an ensemble's mean score: the share of pairs where the members'
    mean score of the chosen response is above that of the rejected one (a tie counts as
    wrong, as in TRL's RewardTrainer).

    Args:
        chosen, rejected: (members, pairs) each member's score of each pair's two responses.
    """
    return float((chosen.mean(0) > rejected.mean(0)).float().mean())


def run_reward(cfg: RewardConfig, *, group: str | None = None, resume: bool = False,
               registration: Registration | None = None) -> StageResult:
    """Train the reward model; its artifact is ``adapter`` (LoRA + score head). With
    ``reward.ensemble: N`` > 1, N members (artifacts ``adapter``, ``adapter-1``, ...), each
    with its own seed and bootstrap resample of the training pairs, and the held-out
    accuracy of each member and of the ensemble's mean score in the metrics.

    The steps of a TRL-trainer stage (:mod:`rlhf.stages.common`): under accelerate launch
    every process runs this function; TRL shards the pairs and syncs gradients, and only the
    main process writes files or logs."""
    import torch

    from rlhf.resolve import is_store_ref

    out, main = begin(cfg)

    # 1. preference data: a versioned store entry, split by prompt hash
    data_ref = cfg.dataset
    if not is_store_ref(data_ref):
        raise ConfigError(f"reward.dataset: {data_ref!r} is not a data-store reference; resolve the inputs first "
                          "(rlhf.resolve.resolve_inputs, as `rlhf reward` and `rlhf run` do)")
    train_rows, test_rows = read_pairs(data_ref, "train"), read_pairs(data_ref, "test")
    if not train_rows:
        raise ValueError(f"reward.dataset {data_ref}: no training pairs")
    train_rows, test_rows = ensure_test_split(train_rows, test_rows, cfg.min_eval_pairs, f"reward.dataset {data_ref}")
    tok = stage_tokenizer(cfg)
    too_long = count_long_pairs("reward", tok, train_rows, test_rows, cfg.train.max_length, "drops")
    metrics: dict = {"train_pairs": len(train_rows), "test_pairs": len(test_rows), **too_long}
    if cfg.ensemble == 1:  # one reward model, trained on the pairs as they are
        path = _train_member(cfg, 0, train_rows, test_rows, tok, out, main, group, resume, registration, metrics)
        return finish(cfg, out, main, "reward", {"adapter": path}, metrics, {"dataset": data_ref})

    # 2-4. an ensemble: member N-1 first, member 0 (``adapter``, listing the others) last
    artifacts: dict[str, str] = {}
    listed: list[dict] = []
    chosen, rejected = [], []
    for j in reversed(range(cfg.ensemble)):
        member_metrics: dict = {}
        _, resample = member_seeds(cfg, j)
        name = "adapter" if j == 0 else f"adapter-{j}"
        ensemble = [{"member": 0, "dir": "adapter", "ref": None}] + listed[::-1] if j == 0 else None
        artifacts[name] = _train_member(cfg, j, bootstrap(train_rows, resample), test_rows, tok,
                                        out if j == 0 else out / f"member-{j}", main, group, resume, registration,
                                        member_metrics, ensemble=ensemble, scores=(chosen, rejected))
        listed.append({"member": j, "dir": name,
                       "ref": registration.outputs.get(name) if registration is not None else None})
        metrics.update({f"member{j}_{k}": v for k, v in member_metrics.items() if k.startswith(("eval_", "heldout_"))})
        if j == 0:  # TRL's evaluation of member 0 stays for the training log
            metrics.update({k: v for k, v in member_metrics.items() if k.startswith("eval_")})
    if test_rows:  # each member's and the ensemble's accuracy on the same held-out pairs
        c, r = torch.stack(chosen[::-1]), torch.stack(rejected[::-1])  # (members, pairs), member 0 first
        for j in range(cfg.ensemble):
            metrics[f"member{j}_accuracy"] = ensemble_accuracy(c[j: j + 1], r[j: j + 1])
        metrics["ensemble_accuracy"] = ensemble_accuracy(c, r)
        # the stage's held-out numbers (the gate's and the summary's) are the ensemble's mean
        # score, the reward PPO optimises (less its disagreement penalty)
        metrics.update(heldout_metrics(c.mean(0), r.mean(0), metrics["member0_heldout_truncated"]))
        if main:
            print(f"[reward] ensemble of {cfg.ensemble} (mean score) held-out accuracy {metrics['heldout_accuracy']:.3f}: "
                  f"{metrics['heldout_correct']} of {metrics['heldout_pairs']} pairs; margin "
                  f"{metrics['heldout_margin']:.3f}", flush=True)
    metrics["ensemble_members"] = cfg.ensemble
    return finish(cfg, out, main, "reward", dict(reversed(artifacts.items())), metrics, {"dataset": data_ref})


def _train_member(cfg: RewardConfig, member: int, train_rows: list[dict], test_rows: list[dict], tok, out: Path,
                  main: bool, group: str | None, resume: bool, registration: Registration | None, metrics: dict,
                  ensemble: list[dict] | None = None, scores: tuple[list, list] | None = None) -> str:
    """Steps 2-4 for one reward model (member ``member`` of the ensemble, trained in ``out``):
    build, train, evaluate into ``metrics``, publish; returns the artifact's path. With
    ``scores`` (two lists), its held-out chosen and rejected scores (pairs,) are appended."""
    import datasets
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    from rlhf.adapters import save_head
    from rlhf.models import disable_dropout, load_sequence_classifier, save_tokenizer

    seed, resample = member_seeds(cfg, member)
    data_ref = cfg.dataset
    if member > 0 and main:  # member 0's checkpoints are prepared by rlhf.stages.run_stage
        from rlhf.runs import config_fingerprint, prepare_checkpoints

        out.mkdir(parents=True, exist_ok=True)
        resume = prepare_checkpoints(out, f"{config_fingerprint(to_dict(cfg))}-member{member}", resume)
    # the score head and the LoRA matrices are drawn from the global RNG when the model is
    # built, before the Trainer seeds it: seed here so a fixed seed gives one reward model
    set_seed(seed)

    # 2. base as a 1-output classifier, LoRA on the decoder, the score head trained fully
    base = cfg.model.name_or_path
    model = load_sequence_classifier(base, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                                     trust_remote_code=cfg.model.trust_remote_code,
                                     attn_implementation=cfg.model.attn_implementation)
    disable_dropout(model)
    model = get_peft_model(model, peft_lora_config(cfg.lora, model, "SEQ_CLS", modules_to_save=["score"]))

    # 3. train with TRL's Bradley-Terry loss; eval reports accuracy and margin on held-out pairs
    kw = trl_training_kwargs(cfg.train, out, seed, has_eval=bool(test_rows))
    kw.update(center_rewards_coefficient=cfg.center_rewards_coefficient, disable_dropout=True,
              dataset_num_proc=None, eos_token=tok.eos_token)
    if cfg.keep_best and test_rows:
        # evaluate at every checkpoint and reload the most accurate one when training ends
        kw.update(eval_strategy="steps", eval_steps=cfg.train.save_steps, load_best_model_at_end=True,
                  metric_for_best_model="accuracy", greater_is_better=True)
    args = TRLRewardConfig(**filter_supported(TRLRewardConfig, kw))
    tracker = stage_tracker(cfg, out, group, main, base=base, dataset=data_ref)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(test_rows) if test_rows else None,
        processing_class=tok,
    )
    train(trainer, tracker, out, resume)
    if test_rows:
        # TRL's evaluation (eval_*) sees only the held-out pairs that fit train.max_length: it
        # stays for the training log and keep_best. The accuracy the gate and the summary read
        # (heldout_*) is scored here on every held-out pair.
        ev = trainer.evaluate()
        metrics.update(eval_accuracy=float(ev["eval_accuracy"]), eval_margin=float(ev["eval_margin"]),
                       eval_loss=float(ev["eval_loss"]))
        chosen, rejected, truncated = heldout_pair_scores(trainer, tok, test_rows, cfg.train.max_length)
        metrics.update(heldout_metrics(chosen, rejected, truncated))
        if scores is not None:
            scores[0].append(chosen)
            scores[1].append(rejected)
        if main:  # the member's own label, as its progress records have (rlhf.tracking: its folder's name)
            label = "reward" if member == 0 else f"member-{member}"
            print(f"[{label}] held-out accuracy {metrics['heldout_accuracy']:.3f}: {metrics['heldout_correct']} of "
                  f"{metrics['heldout_pairs']} pairs, every held-out pair ({metrics['heldout_truncated']} shortened "
                  f"to reward.train.max_length={cfg.train.max_length}); margin {metrics['heldout_margin']:.3f}", flush=True)
        tracker.log({k: metrics[k] for k in ("eval_accuracy", "eval_margin", "eval_loss", "heldout_accuracy",
                                             "heldout_margin")}, step=trainer.state.global_step)
    tracker.finish()

    # 4. publish: LoRA weights (peft format) + score head, atomically
    def write(tmp: Path, state: dict | None) -> None:
        trainer.model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False,
                                      **({"state_dict": state} if state else {}))
        save_tokenizer(tok, tmp)
        score = trainer.model.base_model.model.score
        # peft wraps the fully trained head as modules_to_save; its trained copy is the "default" one
        head = score.modules_to_save["default"] if hasattr(score, "modules_to_save") else score
        if state:  # sharded: the module holds a shard only, the gathered copy is complete
            head = _head_from_state(state)
        save_head(head, tmp)

    # an ensemble member's lineage: its index, seed and resample seed; member 0 lists the others
    lineage = {} if cfg.ensemble == 1 else {"member": member, "seed": seed, "resample_seed": resample}
    if ensemble is not None:
        lineage["ensemble"] = ensemble
    stage_out = out if member == 0 else out.parent
    return publish_trained(trainer, stage_out, "adapter" if member == 0 else f"adapter-{member}", write,
                           role="reward", base=base, config=to_dict(cfg), registration=registration,
                           entry="reward" if member == 0 else f"reward-{member}", dataset=data_ref, **lineage)


def heldout_pair_scores(trainer, tok, rows: list[dict], max_length: int):
    """The reward model's scores of the chosen and of the rejected response of every pair of
    ``rows``, none left out.

    Each side is tokenized as TRL's RewardTrainer does and batched by its collator (right
    padding, the score read at the last real token); a pair longer than ``max_length``, which
    the trainer would drop, is shortened by :func:`rlhf.stages.common.fit_pair` (whole early
    prompt turns first, then the left end) and counted. Every process scores every pair (a
    sharded model needs all of them in each forward pass).

    Returns:
        ``(chosen, rejected, truncated)``: two (pairs,) float tensors in the order of ``rows``
        and the number of pairs shortened to fit.
    """
    import torch
    from trl.trainer.reward_trainer import DataCollatorForPreference

    fitted = [fit_pair(tok, r, max_length) for r in rows]
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    batch_size, was_training = trainer.args.per_device_eval_batch_size, model.training
    chosen, rejected = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(fitted), batch_size):
            batch = collate([{"chosen_ids": c, "rejected_ids": r} for c, r, _ in fitted[start:start + batch_size]])
            with trainer.autocast_smart_context_manager():
                scores = model(input_ids=batch["input_ids"].to(trainer.args.device),
                               attention_mask=batch["attention_mask"].to(trainer.args.device), use_cache=False)
            c, r = scores.logits[:, 0].float().cpu().chunk(2)  # (pairs,) each
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected), sum(cut for *_, cut in fitted)


def heldout_metrics(chosen, rejected, truncated: int) -> dict:
    """Accuracy and margin of held-out pair scores (a tie counts as wrong, as in TRL's accuracy).

    Returns:
        ``heldout_pairs``, ``heldout_correct`` (chosen scored above rejected),
        ``heldout_accuracy``, ``heldout_margin`` (mean score(chosen) - score(rejected)) and
        ``heldout_truncated`` (pairs shortened to fit).
    """
    margins = (chosen - rejected).tolist()
    correct = sum(m > 0 for m in margins)
    return {"heldout_pairs": len(margins), "heldout_correct": correct, "heldout_accuracy": correct / len(margins),
            "heldout_margin": sum(margins) / len(margins), "heldout_truncated": truncated}


def score_heldout(trainer, tok, rows: list[dict], max_length: int) -> dict:
    """:func:`heldout_metrics` of :func:`heldout_pair_scores`: the accuracy and margin on
    every pair of ``rows``."""
    return heldout_metrics(*heldout_pair_scores(trainer, tok, rows, max_length))


def _head_from_state(state: dict):
    """The trained score head rebuilt from a gathered (FSDP / ZeRO-3) state dict."""
    import torch

    key = next((k for k in state if k.endswith("score.modules_to_save.default.weight")), None) or next(
        (k for k in state if k.endswith("score.weight")), None)
    if key is None:
        raise KeyError("reward: the gathered state dict holds no score head weight")
    weight = state[key]
    bias = state.get(key[: -len("weight")] + "bias")
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head
