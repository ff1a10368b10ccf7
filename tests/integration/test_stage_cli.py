"""Each stage runs alone from the command line: a YAML config plus key=value overrides."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors.torch import load_file

from rlhf.tasks import write_task_files
from rlhf.tasks.synthetic import SyntheticTask, SyntheticTaskConfig
from rlhf.cli import main


def test_sft_and_reward_stages_alone(tmp_path, capsys):
    files = write_task_files(SyntheticTask(SyntheticTaskConfig(num_sft=96, num_pairs=128, num_ppo_prompts=8,
                                                               num_eval_prompts=8)), tmp_path / "task")
    sft_yaml = tmp_path / "sft.yaml"
    sft_yaml.write_text(yaml.safe_dump({"dataset": str(files["sft"]), "train": {"per_device_train_batch_size": 16, "max_length": 64}}))
    out = tmp_path / "sft"
    assert main(["sft", "--config", str(sft_yaml), f"output_dir={out}", "train.max_steps=3",
                 "train.logging_steps=1", "train.learning_rate=2e-3"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 3
    logged = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in m for m in logged) == 3

    rm_out = tmp_path / "rm"
    assert main(["reward", f"dataset={files['pairs']}", f"output_dir={rm_out}", "train.max_steps=3",
                 "train.per_device_train_batch_size=16", "train.max_length=64", "eval_fraction=0.2"]) == 0
    head = load_file(str(rm_out / "adapter" / "head.safetensors"))["weight"]
    assert head.shape == (1, 64)
    metrics = json.loads((rm_out / "metrics.json").read_text())
    assert metrics["test_pairs"] > 0 and 0 <= metrics["eval_accuracy"] <= 1
    # the gate's accuracy: the stage's own, on every held-out pair (none too long here)
    assert metrics["heldout_pairs"] == metrics["test_pairs"] and metrics["heldout_truncated"] == 0
    assert metrics["heldout_accuracy"] == metrics["heldout_correct"] / metrics["heldout_pairs"]
    out = capsys.readouterr().out
    # the default ensemble of three: each member's line (member 0's as [reward]), then the ensemble's,
    # whose mean score is the stage's held-out accuracy
    assert (f"[reward] held-out accuracy {metrics['member0_heldout_accuracy']:.3f}: "
            f"{metrics['member0_heldout_correct']} of {metrics['heldout_pairs']} pairs, every held-out pair "
            "(0 shortened") in out
    assert (f"[reward] ensemble of 3 (mean score) held-out accuracy {metrics['heldout_accuracy']:.3f}: "
            f"{metrics['heldout_correct']} of {metrics['heldout_pairs']} pairs") in out
    assert "[member-1] held-out accuracy" in out and "[member-2] held-out accuracy" in out
    # the preference file went through the data store: a versioned, canonical dataset
    import reward_data

    assert reward_data.versions("pairs") == [1]
    # rerunning on identical bytes reuses that version instead of ingesting again
    assert main(["reward", f"dataset={files['pairs']}", f"output_dir={tmp_path / 'rm2'}", "train.max_steps=1",
                 "train.per_device_train_batch_size=16", "train.max_length=64", "eval_fraction=0.2"]) == 0
    assert reward_data.versions("pairs") == [1]


def test_stage_rejects_unknown_key(tmp_path, capsys):
    assert main(["sft", "dataset=x.jsonl", "trian.max_steps=3"]) == 2
    assert "unknown key sft.trian" in capsys.readouterr().err
