"""Stage 2: Bradley-Terry reward model with TRL's RewardTrainer (LoRA + score head).

Preference data comes from the reward_data store (canonical conversational
prompt/chosen/rejected records); a file or directory given instead is ingested first, so
every run trains on an immutable, versioned dataset. The reward LoRA sits on the same base
as the SFT adapter (one base, many adapters). Writes ``<output_dir>/adapter`` with
``head.safetensors`` (the score head) beside the LoRA weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rlhf.config import ConfigError, RewardConfig, save_yaml, to_dict
from rlhf.stages.common import (
    filter_supported,
    last_checkpoint,
    peft_lora_config,
    publish_dir,
    trl_training_kwargs,
    write_json,
)


def resolve_preferences(cfg: RewardConfig, key: str = "reward.dataset") -> tuple[str, Path]:
    """Return ``(reference, version_dir)`` of the preference data.

    A store reference is used as is. A file or directory is ingested into the store first,
    unless the newest version of that name was ingested from identical bytes with the same
    options, in which case that version is reused (reruns do not pile up copies). ``cfg`` is
    any stage config with dataset, dataset_format and test_fraction; ``key`` names it in errors.
    """
    import hashlib

    import reward_data

    src = Path(cfg.dataset)
    if src.exists():
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in src.stem.split(".")[0]) or "preferences"
        if src.is_file() and reward_data.versions(name):
            digest = hashlib.sha256(src.read_bytes()).hexdigest()
            latest = reward_data.load_version(name)
            opts = latest.manifest.get("options", {})
            if ([s_.get("sha256") for s_ in latest.manifest.get("sources", [])] == [digest]
                    and opts.get("test_fraction") == cfg.test_fraction and opts.get("format") == cfg.dataset_format):
                return f"{latest.name}:{latest.version}", Path(latest.path)
        info = reward_data.ingest([src], name, format=cfg.dataset_format, test_fraction=cfg.test_fraction)
        return f"{info.name}:{info.version}", Path(info.path)
    try:
        return cfg.dataset, Path(reward_data.resolve(cfg.dataset))
    except Exception as e:  # noqa: BLE001 - re-raised with the config key named
        raise ConfigError(f"{key}: {cfg.dataset!r} is neither a file nor a data-store reference ({e})") from None


def _records(version_dir: Path, split: str) -> list[dict]:
    import reward_data

    rows = []
    for rec in reward_data.read_split(version_dir, split):
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


def run_reward(cfg: RewardConfig, *, run_dir: Path | None = None, stage_name: str = "reward", group: str | None = None,
               resume: bool = False) -> dict:
    """Train the reward model and return ``{"adapter": dir, "dataset": ref, "metrics": {...}}``."""
    import datasets
    from peft import get_peft_model
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    from rlhf import distributed as dist
    from rlhf.adapters import save_head
    from rlhf.models import disable_dropout, load_sequence_classifier, load_tokenizer, resolve_base
    from rlhf.tracking import Tracker

    # Under accelerate launch every process runs this function; TRL shards the pairs and
    # syncs gradients, and only the main process writes files, ingests data or logs.
    main = dist.is_main()
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(to_dict(cfg), out / "config.yaml")

    # 1. preference data: a versioned store entry, split by prompt hash (ingested once, by
    # the main process; the others read the same version)
    data_ref, version_dir = dist.broadcast_object(resolve_preferences(cfg) if main else None)
    train_rows, test_rows = _records(version_dir, "train"), _records(version_dir, "test")
    if not train_rows:
        raise ValueError(f"reward.dataset {data_ref}: no training pairs")

    # 2. base as a 1-output classifier, LoRA on the decoder, the score head trained fully
    with dist.main_first():  # the builtin base is materialised once, by the main process
        base = resolve_base(cfg.model.name_or_path, seed=cfg.seed)
    tok = load_tokenizer(base, cfg.model.revision, cfg.model.trust_remote_code)
    model = load_sequence_classifier(base, tok, dtype=cfg.model.dtype, revision=cfg.model.revision,
                                     trust_remote_code=cfg.model.trust_remote_code,
                                     attn_implementation=cfg.model.attn_implementation)
    disable_dropout(model)
    model = get_peft_model(model, peft_lora_config(cfg.lora, model, "SEQ_CLS", modules_to_save=["score"]))

    # 3. train with TRL's Bradley-Terry loss; eval reports accuracy and margin on held-out pairs
    kw = trl_training_kwargs(cfg.train, out, cfg.seed, has_eval=bool(test_rows))
    kw.update(center_rewards_coefficient=cfg.center_rewards_coefficient, disable_dropout=True,
              dataset_num_proc=None, eos_token=tok.eos_token, pad_token=tok.pad_token)
    args = TRLRewardConfig(**filter_supported(TRLRewardConfig, kw))
    tracker = Tracker(run_dir or out.parent, stage_name if run_dir else out.name, config=to_dict(cfg), report_to=cfg.report_to, group=group,
                      refs={"base": base, "dataset": data_ref}, is_main_process=main)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(test_rows) if test_rows else None,
        processing_class=tok,
        callbacks=[tracker.callback()],
    )
    ckpt = last_checkpoint(out) if resume else None
    trainer.train(resume_from_checkpoint=ckpt)
    metrics: dict = {"train_pairs": len(train_rows), "test_pairs": len(test_rows)}
    if test_rows:
        ev = trainer.evaluate()
        metrics.update(eval_accuracy=float(ev["eval_accuracy"]), eval_margin=float(ev["eval_margin"]),
                       eval_loss=float(ev["eval_loss"]))
        tracker.log({k: metrics[k] for k in ("eval_accuracy", "eval_margin", "eval_loss")}, step=trainer.state.global_step)
    tracker.finish()

    # 4. publish: LoRA weights (peft format) + head.safetensors, atomically
    state = dist.full_state_dict(trainer)  # FSDP / ZeRO-3: gathered by every process; else None
    if main:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=out))
        trainer.model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state} if state else {}))
        score = trainer.model.base_model.model.score
        # peft wraps the fully trained head as modules_to_save; its trained copy is the "default" one
        head = score.modules_to_save["default"] if hasattr(score, "modules_to_save") else score
        if state:  # sharded: the module holds a shard only, the gathered copy is complete
            head = _head_from_state(state)
        save_head(head, tmp)
        save_yaml(to_dict(cfg), tmp / "config.yaml")
        write_json(tmp / "rlhf_adapter.json", {"role": "reward", "base_path": base, "dataset": data_ref})
        publish_dir(tmp, out / "adapter")
        write_json(out / "metrics.json", metrics)
    dist.barrier()  # the others return once the artifact exists
    return {"adapter": str(out / "adapter"), "dataset": data_ref, "dataset_dir": str(version_dir), "base": base,
            "metrics": metrics}


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
