"""The KTO stage on a tiny model: labelled completions (unpaired records, or pairs split in two),
the frozen SFT adapter as reference (not the base), and the stage run alone from the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml


def _rows(n: int, seed: int) -> list[dict]:
    """KTO-style unpaired rows: a sampled response, desirable when its gold reward is positive."""
    from rlhf.tasks.synthetic import gold_reward, sample_prompt, sample_response

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = sample_prompt(rng)
        response = sample_response(rng, prompt)
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "completion": [{"role": "assistant", "content": response}],
                     "label": bool(i % 2) if gold_reward(prompt, response) == 0 else gold_reward(prompt, response) > 0})
    return rows


@pytest.fixture(scope="module")
def sft_adapter(ppo_assets, tmp_path_factory) -> Path:
    """An SFT adapter whose log-probs differ from the bare base's by whole nats, so that a base
    reference cannot pass for the SFT one."""
    from peft import LoraConfig, get_peft_model

    from rlhf.adapters import linear_target_modules
    from rlhf.models import load_causal_lm, load_tokenizer

    base = load_causal_lm(str(ppo_assets.base), load_tokenizer(str(ppo_assets.base)))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=linear_target_modules(base),
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(19)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("kto_sft") / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture
def kto_setup(ppo_assets, sft_adapter, tmp_path):
    from rlhf.config import KTOConfig, from_dict
    from rlhf.models import load_tokenizer
    from rlhf.stages.kto import build_trainer

    def make(**overrides):
        kw = dict(model={"name_or_path": str(ppo_assets.base)}, sft_adapter=str(sft_adapter), beta=0.1,
                  output_dir=str(tmp_path / "kto"),
                  train={"per_device_train_batch_size": 4, "max_steps": 3, "learning_rate": 5e-3, "max_length": 48, "logging_steps": 1,
                         "save_steps": 100})
        kw.update(overrides)
        cfg = from_dict(KTOConfig, kw, prefix="kto")
        tok = load_tokenizer(str(ppo_assets.base))
        return build_trainer(cfg, str(ppo_assets.base), tok, _rows(16, seed=3), []), cfg

    return make


def _logps_with(adapter_dir: Path | None, base_dir: Path, batch: dict) -> torch.Tensor:
    from peft import PeftModel

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.stages.kto import completion_logps

    model = load_causal_lm(str(base_dir), load_tokenizer(str(base_dir)))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return completion_logps(model, batch)


def test_reference_is_the_sft_adapter_and_stays_frozen(kto_setup, ppo_assets, sft_adapter):
    trainer, _ = kto_setup()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ref, _ = trainer.compute_ref_log_probs(trainer.model, batch)  # what TRL's loss uses
    sft = _logps_with(sft_adapter, ppo_assets.base, batch)
    bare = _logps_with(None, ppo_assets.base, batch)
    torch.testing.assert_close(ref, sft, atol=1e-4, rtol=1e-5)
    assert (sft - bare).abs().min() > 0.5  # the check has teeth on this batch
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    ref_after, _ = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(ref_after, sft, atol=1e-4, rtol=1e-5)


def test_a_base_reference_is_refused(kto_setup, monkeypatch):
    import contextlib

    import trl.trainer.kto_trainer as kto_trainer

    @contextlib.contextmanager
    def adapters_disabled(model, adapter_name):
        with model.disable_adapter():
            yield

    monkeypatch.setattr(kto_trainer, "use_adapter", adapters_disabled)
    with pytest.raises(RuntimeError, match="not the SFT adapter"):
        kto_setup()


def test_pairs_feed_kto_as_one_desirable_and_one_undesirable(tmp_path):
    import reward_data
    from rlhf.stages.kto import labelled_completions

    u = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    a = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps({"prompt": "p1", "chosen": "good", "rejected": "bad"}) + "\n")
    info = reward_data.ingest([src], "kto-pairs", test_fraction=0.0)
    assert labelled_completions(info.ref, "train") == [
        {"prompt": u("p1"), "completion": a("good"), "label": True},
        {"prompt": u("p1"), "completion": a("bad"), "label": False}]
    ties = tmp_path / "ties.jsonl"
    ties.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 2, "score_rejected": 2})
                    + "\n" + json.dumps({"prompt": "q", "chosen": "c", "rejected": "r"}) + "\n")
    info = reward_data.ingest([ties], "kto-ties", ties="keep", test_fraction=0.0)
    assert [r["prompt"] for r in labelled_completions(info.ref, "train")] == [u("q"), u("q")]  # the tie is skipped


def test_kto_stage_alone_from_the_command_line(ppo_assets, sft_adapter, tmp_path):
    """``rlhf kto --config F`` on an unpaired file: ingested as its own record kind, trained,
    a reloadable policy adapter published, SFT and KTO samples compared with DPO's keys."""
    from safetensors.torch import load_file

    import reward_data
    from rlhf.cli import main

    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(64, seed=5)))
    cfg_file = tmp_path / "kto.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(ppo_assets.base)},
        "sft_adapter": str(sft_adapter),
        "dataset": str(data),
        "eval_fraction": 0.25,
        "train": {"per_device_train_batch_size": 8, "max_steps": 3, "learning_rate": 5e-3, "max_length": 48, "logging_steps": 1},
        "eval_prompts": str(ppo_assets.eval_prompts),
        "reward_adapter": str(ppo_assets.reward_adapter),
        "eval_response_length": 6,
    }))
    out = tmp_path / "kto"
    assert main(["kto", "--config", str(cfg_file), f"output_dir={out}", "beta=0.2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.2
    adapter = out / "adapter"
    assert json.loads((adapter / "rlhf_adapter.json").read_text())["role"] == "policy"
    new, sft = load_file(str(adapter / "adapter_model.safetensors")), load_file(
        str(sft_adapter / "adapter_model.safetensors"))
    assert new.keys() == sft.keys() and any(not torch.equal(new[k], sft[k]) for k in new)
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_desirable"] > 0 and m["train_undesirable"] > 0 and m["test_completions"] > 0
    assert "eval_loss" in m and "eval_rewards_margins" in m
    # the summary convention (rlhf.summary): SFT as the initial evaluation, KTO as the final one
    assert m["initial/eval/kl_mean"] == 0.0 and m["final/eval/kl_mean"] != 0.0
    assert 0.0 <= m["final/eval/win_rate_mean"] <= 1.0 and "final/eval/score_mean" in m
    assert reward_data.load_version("feedback").manifest["kind"] == "unpaired"
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    steps = {r["step"] for r in samples}  # each policy's completions: SFT at 0, KTO at its last step
    assert len(steps) == 2 and 0 in steps and all(r["prompt"] and "completion" in r for r in samples)


def test_batch_size_one_is_refused():
    from rlhf.config import ConfigError, KTOConfig, from_dict

    with pytest.raises(ConfigError, match="kto.train.per_device_train_batch_size"):
        from_dict(KTOConfig, {"train": {"per_device_train_batch_size": 1}}, prefix="kto")
