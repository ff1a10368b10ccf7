"""A PPO run killed mid-update and resumed from its last checkpoint repeats
an uninterrupted run with the same seed, update for update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.stages.ppo import run_ppo

REPO = Path(__file__).resolve().parents[3]

# Runs PPO and parks inside the third update (after checkpoint update-2 was written) until
# it is killed, so the kill always lands mid-update, never between files of a checkpoint.
CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from rlhf.config import PPOConfig, from_dict
    from rlhf.stages import ppo

    cfg = from_dict(PPOConfig, json.loads(sys.argv[1]))
    marker = sys.argv[2]
    update_fn = ppo._ppo_update

    def parked(*args, **kwargs):
        update = kwargs["update"] if "update" in kwargs else args[8]
        if update == 2:
            with open(marker, "w") as f:
                f.write("inside update 3")
            time.sleep(600)
        return update_fn(*args, **kwargs)

    ppo._ppo_update = parked
    ppo.run_ppo(cfg)
""")

VOLATILE = ("time", "time/generate_s", "time/score_s", "time/update_s", "episodes_per_s")


def _metrics_by_step(out: Path) -> dict[int, dict]:
    """metrics.jsonl of a run as step -> record (a later line for a step wins)."""
    by_step: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by_step.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k not in VOLATILE})
    return by_step


def _kill_after_checkpoint(cfg, tmp_path: Path) -> None:
    marker = tmp_path / "parked"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cfg_json = json.dumps(asdict(cfg))
    child = subprocess.Popen([sys.executable, "-c", CHILD, cfg_json, str(marker)], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 1800  # a hang guard only: a loaded machine may take many minutes
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"PPO child exited early ({child.returncode}): {child.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("PPO child did not reach update 3 within 30 minutes (hung?)")
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL


def test_killed_and_resumed_run_matches_uninterrupted(ppo_config, ppo_assets, tmp_path):
    common = dict(total_episodes=16, rollout_batch_size=4, save_steps=1, save_total_limit=2, kl_controller="adaptive",
                  kl_coef=0.1, kl_horizon=100, eval_prompts=str(ppo_assets.eval_prompts), eval_steps=2,
                  response_length=6, learning_rate=3e-3)
    killed = ppo_config(output_dir=str(tmp_path / "killed" / "ppo"), **common)
    _kill_after_checkpoint(killed, tmp_path)
    out = Path(killed.output_dir)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["update-1", "update-2"], ckpts
    assert not (out / "policy").exists()
    assert sorted(_metrics_by_step(out)) == [0, 1, 2]  # initial eval, updates 1 and 2

    resumed = run_ppo(killed, resume=True)
    straight = run_ppo(ppo_config(output_dir=str(tmp_path / "straight" / "ppo"), **common))
    assert resumed.finished and straight.finished

    got, want = _metrics_by_step(out), _metrics_by_step(Path(straight.output_dir))
    assert sorted(got) == sorted(want) == [0, 1, 2, 3, 4]
    for step in want:
        assert set(got[step]) == set(want[step]), step
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, key)
    # the adaptive KL coefficient moved, so its state really was restored
    assert want[4]["kl/coef"] != want[1]["kl/coef"]

    for role in ("policy", "value"):
        a = load_file(str(out / role / "adapter_model.safetensors"))
        b = load_file(str(Path(straight.artifacts[role]) / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-6, (role, k)
    assert (out / "value" / "head.safetensors").is_file()
