"""The tiny pipeline end to end: each stage trains, writes reloadable artifacts, registers
them with lineage; reruns skip, --from reruns, a SIGKILLed run resumes with --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.pipeline import Pipeline, plan

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "pipelines" / "tiny.yaml"
# A smaller version of the tiny default, so the suite stays fast; the full default (and its
# "PPO beats SFT by 3 standard errors" claim) is checked by test_tiny_default_full below.
SMALL = [
    "task.num_sft=256", "task.num_pairs=512", "task.num_ppo_prompts=64", "task.num_eval_prompts=32",
    "sft.train.num_train_epochs=1", "sft.train.save_steps=4", "sft.train.logging_steps=2", "reward.train.logging_steps=4", "reward.train.num_train_epochs=1", "reward.train.save_steps=8",
    "ppo.total_episodes=64", "ppo.rollout_batch_size=32", "ppo.per_device_train_batch_size=8", "ppo.save_steps=1",
    "ppo.eval_steps=0", "ppo.response_length=12",
]


@pytest.fixture(scope="module")
def home(module_home):
    return module_home


@pytest.fixture(scope="module")
def run(run_recipe):
    return run_recipe(RECIPE, SMALL, "tiny")


@pytest.fixture(autouse=True)
def _module_home(home, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(home))


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "pipeline.json").read_text())


def test_every_stage_completes_and_summary_is_written(run):
    p, summary = run
    state = _state(p.run_dir)
    assert [state["stages"][s]["status"] for s in ("sft", "reward", "ppo")] == ["completed"] * 3
    on_disk = json.loads((p.run_dir / "summary.json").read_text())
    for key in ("rm_accuracy_gold", "gold_reward_sft", "gold_reward_sft_se", "gold_reward_ppo",
                "gold_reward_ppo_se", "kl_ppo_sft"):
        assert isinstance(on_disk[key], float), key
        assert on_disk[key] == on_disk[key], f"{key} is NaN"
    assert 0.0 <= on_disk["rm_accuracy_gold"] <= 1.0


def test_sft_stage_trained_and_logged(run):
    p, summary = run
    state = json.loads((p.run_dir / "sft" / "adapter" / "rlhf_adapter.json").read_text())
    assert state["role"] == "sft"
    weights = load_file(str(p.run_dir / "sft" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    # peft initialises lora_B to zero: non-zero means training changed the parameters
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    logged = [json.loads(line) for line in (p.run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in logged) and summary["sft_loss"] is not None


def test_reward_stage_artifacts_and_metrics(run):
    p, summary = run
    adapter = p.run_dir / "reward" / "adapter"
    head = load_file(str(adapter / "head.safetensors"))
    assert head["weight"].shape == (1, 64)
    metrics = json.loads((p.run_dir / "reward" / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_margin" in metrics
    assert metrics["train_pairs"] + metrics["test_pairs"] <= 512


def test_artifacts_reload_as_roles(run):
    from rlhf.adapters import RoleModel
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.resolve import resolve_base

    p, _ = run
    base_path = resolve_base("builtin:tiny")
    tok = load_tokenizer(base_path)
    model = RoleModel(load_causal_lm(base_path, tok), str(p.run_dir / "sft" / "adapter"),
                      str(p.run_dir / "reward" / "adapter"))
    ppo_policy = load_file(str(p.run_dir / "ppo" / "policy" / "adapter_model.safetensors"))
    sft = load_file(str(p.run_dir / "sft" / "adapter" / "adapter_model.safetensors"))
    changed = [k for k in sft if not torch.equal(sft[k], ppo_policy[k])]
    assert changed, "PPO did not change the policy adapter"
    ids = tok("<|user|> tell me about cats <eos> <|assistant|> warm cats <eos>", return_tensors="pt")
    with torch.no_grad(), model.role("reward"):
        h = model.hidden_states(ids.input_ids, ids.attention_mask)
    assert torch.isfinite(model.values("reward", h[:, -1])).all()


def test_registry_records_lineage(run):
    from rlhf.registry import Registry

    p, _ = run
    state = _state(p.run_dir)
    reg = Registry.open()
    policy_ref = state["stages"]["ppo"]["outputs"]["policy"]
    entry = reg.resolve(policy_ref)
    assert entry.kind == "adapter" and entry.role == "policy"
    lineage = json.dumps(reg.lineage(policy_ref))
    for ref in (state["stages"]["sft"]["outputs"]["adapter"], state["stages"]["reward"]["outputs"]["adapter"],
                state["stages"]["reward"]["outputs"]["dataset"]):
        assert ref in lineage
    runs = [e for e in reg.list(kind="run")]
    assert {e.metadata["stage"] for e in runs} >= {"sft", "reward", "ppo"}
    assert not reg.verify()


def test_rerun_skips_unchanged_stages_and_from_reruns(run, capsys):
    p, _ = run
    before = _state(p.run_dir)["stages"]
    Pipeline(plan(RECIPE, p.run_dir, SMALL)).run()
    out = capsys.readouterr().out
    assert out.count("unchanged since its last run, skipped") == 3
    assert _state(p.run_dir)["stages"]["ppo"]["finished"] == before["ppo"]["finished"]

    Pipeline(plan(RECIPE, p.run_dir, SMALL)).run(from_stage="ppo")
    after = _state(p.run_dir)["stages"]
    assert after["sft"]["finished"] == before["sft"]["finished"]
    assert after["reward"]["finished"] == before["reward"]["finished"]
    assert after["ppo"]["status"] == "completed"

    # a changed PPO setting reruns PPO only
    Pipeline(plan(RECIPE, p.run_dir, SMALL + ["ppo.kl_coef=0.1"])).run()
    out = capsys.readouterr().out
    assert "sft: unchanged" in out and "reward: unchanged" in out and "ppo: running" in out


@pytest.mark.reliability
def test_killed_run_resumes_from_its_last_checkpoint(run, tmp_path, home):
    """SIGKILL mid-PPO, then --resume continues from the last checkpoint, not from scratch."""
    p, _ = run
    run_dir = tmp_path / "killed"
    # reuse the finished SFT and reward stages: copy their state, then force PPO to run
    import shutil

    shutil.copytree(p.run_dir, run_dir)
    shutil.rmtree(run_dir / "ppo")
    overrides = [o for o in SMALL if not o.startswith("ppo.total_episodes")] + ["ppo.total_episodes=256"]
    env = dict(os.environ, RLHF_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rlhf", "run", str(RECIPE), "--output-dir", str(run_dir), "--from", "ppo", *overrides]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    ckpt = run_dir / "ppo" / "checkpoints" / "update-2" / "COMPLETE"
    deadline = time.time() + 1800  # a hang guard only: a loaded machine may take many minutes
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no checkpoint within 30 minutes (hung?)"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _state(run_dir)["stages"]["ppo"]["status"] == "running"
    killed_run = _state(run_dir)["stages"]["ppo"]["run"]

    out = subprocess.run(cmd[:-len(overrides)] [:-2] + ["--resume", *overrides], env=env, capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[ppo] resumed from" in out.stdout
    assert "sft: unchanged" in out.stdout and "reward: unchanged" in out.stdout
    state = _state(run_dir)
    assert state["stages"]["ppo"]["status"] == "completed"
    steps = [json.loads(line)["step"] for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
             if "kl/mean" in line]
    assert steps[-1] == 8  # 256 episodes / 32 per rollout
    # the rows logged after the checkpoint by the killed process were dropped on resume
    assert steps == sorted(set(steps)), steps
    from rlhf.registry import Registry

    assert Registry.open().resolve(killed_run).metadata["status"] == "killed"


# README's tiny table: mean and standard deviation over seeds 0, 1, 2 (2 threads; torch 2.13.0+cpu,
# transformers 5.25.0, trl 1.16.0, peft 0.21.2; seed 0 gave exactly its column of the table)
TINY_RANGE = {  # README's tiny table: mean and sd over seeds 0-2, safe defaults (issue 30)
    "rm_accuracy": (0.7382, 0.0124),
    "rm_accuracy_lower": (0.6898, 0.0129),
    "rm_accuracy_gold": (0.8001, 0.0318),
    "gold_reward_sft": (0.1319, 0.0090),
    "gold_reward_ppo": (0.2738, 0.0049),
    "gold_improvement": (0.1420, 0.0133),
    "win_rate_gold": (0.6816, 0.0197),
    "win_rate_rm": (0.7871, 0.0312),
    "kl_ppo_sft": (0.5792, 0.0766),
}


@pytest.mark.slow
def test_tiny_default_full(tmp_path):
    """The README's main job, as README reports it: PPO beats SFT on gold reward by at least 3
    standard errors, and every number of README's tiny table lies within 3 standard deviations
    of its mean over 3 seeds (the default seed 0 runs here)."""
    p = plan(RECIPE, tmp_path / "tiny")
    s = Pipeline(p).run()
    assert s["gold_improvement_in_se"] >= 3.0, s
    outside = {k: (s[k], mean, sd) for k, (mean, sd) in TINY_RANGE.items() if abs(s[k] - mean) > 3 * sd}
    assert not outside, outside


def test_ppo_stage_alone_resolves_registry_refs(run, tmp_path, capsys):
    """A stage takes its inputs by registry reference (name:version or an alias)."""
    from rlhf.cli import main
    from rlhf.registry import Registry

    p, _ = run
    state = _state(p.run_dir)
    sft_ref = state["stages"]["sft"]["outputs"]["adapter"]
    rm_ref = state["stages"]["reward"]["outputs"]["adapter"]
    Registry.open().tag(rm_ref, "prod")
    rm_alias = rm_ref.split(":")[0] + ":prod"
    out = tmp_path / "ppo"
    assert main(["ppo", f"sft_adapter={sft_ref}", f"reward_adapter={rm_alias}", f"prompts={p.task_files['ppo_prompts']}",
                 f"output_dir={out}", "total_episodes=16", "rollout_batch_size=16", "per_device_train_batch_size=8",
                 "response_length=8", "eval_steps=0", "save_steps=0"]) == 0
    assert (out / "policy" / "adapter_model.safetensors").is_file()
    # an unknown reference fails before any model loads, naming the key and the reference
    assert main(["ppo", "sft_adapter=no-such-adapter:1", f"reward_adapter={rm_alias}",
                 f"prompts={p.task_files['ppo_prompts']}", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "ppo.sft_adapter: 'no-such-adapter:1'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was written
