"""The DPO stage on a tiny model: the reference is the frozen SFT adapter (not the base), it
never changes while the policy trains, and the stage runs alone from the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml


def _pairs(n: int, seed: int) -> list[dict]:
    from rlhf.tasks.synthetic import gold_reward, sample_prompt, sample_response

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = sample_prompt(rng)
        a, b = sample_response(rng, prompt), sample_response(rng, prompt)
        chosen, rejected = (a, b) if gold_reward(prompt, a) >= gold_reward(prompt, b) else (b, a)
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


@pytest.fixture(scope="module")
def sft_adapter(ppo_assets, tmp_path_factory) -> Path:
    """An SFT adapter far from the bare base: random LoRA weights large enough that its
    log-probs differ from the base's by whole nats (the shared fixture's adapter is close to
    the identity, which could not tell the two references apart)."""
    from peft import LoraConfig, get_peft_model

    from rlhf.adapters import linear_target_modules
    from rlhf.models import load_causal_lm, load_tokenizer

    base = load_causal_lm(str(ppo_assets.base), load_tokenizer(str(ppo_assets.base)))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=linear_target_modules(base),
                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("dpo_sft") / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture
def dpo_setup(ppo_assets, sft_adapter, tmp_path):
    """``make(**overrides) -> (trainer, cfg)``: the stage's own trainer on the shared tiny base
    and the SFT adapter above."""
    from rlhf.config import DPOConfig, from_dict
    from rlhf.models import load_tokenizer
    from rlhf.stages.dpo import build_trainer

    def make(**overrides):
        kw = dict(model={"name_or_path": str(ppo_assets.base)}, sft_adapter=str(sft_adapter), beta=0.1,
                  output_dir=str(tmp_path / "dpo"),
                  train={"per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 5e-3, "max_length": 48, "logging_steps": 1,
                         "save_steps": 100})
        kw.update(overrides)
        cfg = from_dict(DPOConfig, kw, prefix="dpo")
        tok = load_tokenizer(str(ppo_assets.base))
        return build_trainer(cfg, str(ppo_assets.base), tok, _pairs(16, seed=3), []), cfg

    return make


def _batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _logps_with(adapter_dir: Path | None, base_dir: Path, batch: dict):
    """Sequence log-probs under a freshly loaded base (+ adapter), independent of the trainer."""
    from peft import PeftModel

    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.stages.dpo import sequence_logps

    model = load_causal_lm(str(base_dir), load_tokenizer(str(base_dir)))
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return torch.cat(sequence_logps(model, batch))


def test_reference_is_the_sft_adapter_not_the_base(dpo_setup, ppo_assets, sft_adapter):
    trainer, _ = dpo_setup()
    batch = _batch(trainer)
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))  # what TRL's loss uses
    sft = _logps_with(sft_adapter, ppo_assets.base, batch)
    bare = _logps_with(None, ppo_assets.base, batch)
    torch.testing.assert_close(ref, sft, atol=1e-4, rtol=1e-5)
    # the check has teeth: on this batch the SFT adapter and the bare base differ clearly
    assert (sft - bare).abs().min() > 0.5


def test_a_base_reference_is_refused(dpo_setup, monkeypatch):
    """A TRL that computes the reference with adapters disabled (its PEFT path before the DPO
    refactor) is caught when the trainer is built, not after a silently wrong run."""
    import contextlib

    import trl.trainer.dpo_trainer as dpo_trainer

    @contextlib.contextmanager
    def adapters_disabled(model, adapter_name):
        with model.disable_adapter():
            yield

    monkeypatch.setattr(dpo_trainer, "use_adapter", adapters_disabled)
    with pytest.raises(RuntimeError, match="not the SFT adapter"):
        dpo_setup()


def test_reference_never_changes_while_the_policy_trains(dpo_setup, ppo_assets, sft_adapter):
    from trl.trainer.utils import use_adapter

    trainer, _ = dpo_setup()
    model = trainer.model
    batch = _batch(trainer)

    def logits(adapter: str) -> torch.Tensor:
        with torch.no_grad(), use_adapter(model, adapter):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.clone()

    ref_before, policy_before = logits("ref"), logits("default")
    trl_ref_before = torch.cat(trainer.compute_ref_log_probs(model, batch))
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    trainer.train()
    assert trainer.state.global_step == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert torch.equal(logits("ref"), ref_before)  # bit for bit
    assert torch.equal(torch.cat(trainer.compute_ref_log_probs(model, batch)), trl_ref_before)
    assert (logits("default") - policy_before).abs().max() > 1e-3  # while the policy did move
    torch.testing.assert_close(torch.cat(trainer.compute_ref_log_probs(model, batch)),
                               _logps_with(sft_adapter, ppo_assets.base, batch), atol=1e-4, rtol=1e-5)


def test_dpo_stage_alone_from_the_command_line(ppo_assets, sft_adapter, tmp_path, capfd):
    """``rlhf dpo --config F``: trains, publishes a reloadable policy adapter that differs from
    the SFT adapter, and compares SFT and DPO samples (RM score, KL, win rate)."""
    from safetensors.torch import load_file

    from rlhf.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _pairs(48, seed=5)))
    cfg_file = tmp_path / "dpo.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(ppo_assets.base)},
        "sft_adapter": str(sft_adapter),
        "dataset": str(pairs),
        "eval_fraction": 0.25,
        "loss_type": "ipo",
        "train": {"per_device_train_batch_size": 8, "max_steps": 3, "learning_rate": 5e-3, "max_length": 48, "logging_steps": 1},
        "eval_prompts": str(ppo_assets.eval_prompts),
        "reward_adapter": str(ppo_assets.reward_adapter),
        "eval_response_length": 6,
    }))
    out = tmp_path / "dpo"
    assert main(["dpo", "--config", str(cfg_file), f"output_dir={out}", "beta=0.2"]) == 0
    printed = "".join(capfd.readouterr())
    assert "[dpo] step 3/3 (100%)" in printed  # the project's progress line, as SFT and reward print
    assert "{'loss'" not in printed  # not TRL's log dicts (they go to metrics.jsonl and log.txt)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["beta"] == 0.2 and saved["loss_type"] == "ipo"
    adapter = out / "adapter"
    assert json.loads((adapter / "rlhf_adapter.json").read_text())["role"] == "policy"
    new, sft = load_file(str(adapter / "adapter_model.safetensors")), load_file(
        str(sft_adapter / "adapter_model.safetensors"))
    assert new.keys() == sft.keys()  # the SFT adapter's shape, trained further
    assert any(not torch.equal(new[k], sft[k]) for k in new)
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_pairs"] > 0 and "eval_loss" in m
    # the summary convention (rlhf.summary): SFT as the initial evaluation, DPO as the final one
    assert m["initial/eval/kl_mean"] == 0.0  # the SFT policy against itself
    assert m["final/eval/kl_mean"] != 0.0
    assert 0.0 <= m["final/eval/win_rate_mean"] <= 1.0 and "final/eval/score_mean" in m
    assert not any("win_rate" in k for k in m if k.startswith("initial/"))
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in logged) == 3
    # the SFT policy's evaluation at step 0, DPO's at its last step: the curves the dashboard reads
    evals = {r["step"]: r for r in logged if "eval/score_mean" in r}
    assert sorted(evals) == [0, 3] and evals[0]["eval/kl_mean"] == 0.0 and "eval/win_rate_mean" in evals[3]
    # each policy's sample completions, the table every tracker gets (wandb, trackio, MLflow)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in samples} == {0, 3} and all(r["prompt"] and "completion" in r for r in samples)
    assert 0 < sum(r["step"] == 3 for r in samples) <= 8
    # the pairs went through the data store, as for the reward stage
    import reward_data

    assert reward_data.versions("pairs") == [1]


def test_bad_dataset_is_named(ppo_assets, tmp_path, capsys):
    from rlhf.cli import main

    assert main(["dpo", f"sft_adapter={ppo_assets.sft_adapter}", "dataset=no-such-data:3",
                 f"output_dir={tmp_path / 'x'}"]) == 2
    assert "dpo.dataset" in capsys.readouterr().err


def test_evaluation_without_a_reward_model(ppo_assets, sft_adapter):
    """[sft, dpo] has no reward stage: the roles hold no reward or value adapter, scores are
    skipped (not made up), and the gold reward alone decides the win rate. Evaluating the SFT
    adapter against itself (same weights, same sampling seed) gives identical samples: zero
    KL for both and every prompt a tie, a win rate of exactly 1/2."""
    from rlhf.config import DPOConfig, from_dict
    from rlhf.evaluation import evaluate_against_sft
    from rlhf.tasks.synthetic import gold_reward

    cfg = from_dict(DPOConfig, {"model": {"name_or_path": str(ppo_assets.base)}, "sft_adapter": str(sft_adapter),
                                "eval_prompts": str(ppo_assets.eval_prompts), "eval_response_length": 6},
                    prefix="dpo")
    sft, dpo, _ = evaluate_against_sft(cfg, str(sft_adapter), gold_reward)
    assert not any("score" in k or k.startswith("eval/win_rate") for k in {**sft, **dpo}), sorted(dpo)
    assert sft["eval/kl_mean"] == 0.0 and dpo["eval/kl_mean"] == 0.0
    assert dpo["eval/gold_mean"] == sft["eval/gold_mean"]
    assert dpo["eval/gold_win_rate_mean"] == 0.5 and dpo["eval/gold_win_rate_se"] == 0.0
