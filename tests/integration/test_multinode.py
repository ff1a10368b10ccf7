"""Two "machines" of one process each on the loopback address (`-k multinode`).

Each machine runs the same `rlhf ... --launcher accelerate --num-machines 2 --machine-rank R
--main-process-ip 127.0.0.1 --main-process-port P` command, as on a cluster (see
scripts/slurm_example.sh); the run directory and RLHF_HOME are shared, as a shared
filesystem would make them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    env = dict(os.environ, RLHF_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_PORT", "MASTER_ADDR", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    return env


def _two_machines(args: list[str], env: dict, timeout: int) -> list[subprocess.CompletedProcess]:
    """Start ``rlhf ARGS`` as machine 0 and machine 1 of 2 (1 process each) and wait for both."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "rlhf", *args, "--launcher", "accelerate", "--num-processes", "2",
               "--num-machines", "2", "--machine-rank", str(rank), "--main-process-ip", "127.0.0.1",
               "--main-process-port", port]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def test_multinode_launch_options_are_checked():
    from rlhf.cli import main

    recipe = str(ROOT / "pipelines" / "tiny.yaml")
    # machine options without the launcher, a second machine without the rendezvous address,
    # a machine rank out of range, and processes that do not split over the machines
    assert main(["run", recipe, "--num-machines", "2", "--validate-only"]) == 2
    assert main(["run", recipe, "--launcher", "accelerate", "--num-machines", "2", "--machine-rank", "1"]) == 2
    assert main(["run", recipe, "--launcher", "accelerate", "--num-machines", "2", "--machine-rank", "2",
                 "--main-process-ip", "127.0.0.1"]) == 2
    assert main(["run", recipe, "--launcher", "accelerate", "--num-processes", "3", "--num-machines", "2",
                 "--machine-rank", "0", "--main-process-ip", "127.0.0.1"]) == 2


def test_multinode_command_line():
    from rlhf.launch import accelerate_command

    cmd = accelerate_command(["run", "r.yaml"], None, 16, 29501, num_machines=2, machine_rank=1,
                             main_process_ip="10.0.0.1")
    opts = dict(zip(cmd[3::1], cmd[4::1]))
    assert (opts["--num_processes"], opts["--num_machines"], opts["--machine_rank"]) == ("16", "2", "1")
    assert (opts["--main_process_ip"], opts["--main_process_port"]) == ("10.0.0.1", "29501")
    assert cmd.count("--num_machines") == 1
    cfg = ROOT / "pipelines" / "accelerate" / "ddp.yaml"
    cmd = accelerate_command(["run", "r.yaml"], cfg, None, None, num_machines=2, machine_rank=0, main_process_ip="h0")
    assert cmd[cmd.index("--num_machines") + 1] == "2" and cmd.count("--num_machines") == 1


PROBE = r'''
import json, os, sys
from rlhf import distributed as dist
import torch

x = dist.all_reduce_sum(torch.tensor([float(dist.rank() + 1)]))
row = {"rank": dist.rank(), "world": dist.world_size(), "main": dist.is_main(), "sum": float(x),
       "node_rank": os.environ.get("GROUP_RANK"), "local_rank": os.environ.get("LOCAL_RANK")}
rows = dist.gather_objects(row)
if dist.is_main():
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f)
# leave the group together: a gloo group torn down at interpreter exit can abort the process
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


def test_multinode_two_machines_form_one_process_group(tmp_path):
    """The rendezvous across machines: 2 machines x 1 process form one group of 2."""
    from rlhf.launch import accelerate_command

    script, out = tmp_path / "probe.py", tmp_path / "ranks.json"
    script.write_text(PROBE)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        cmd = accelerate_command([], None, 2, port, num_machines=2, machine_rank=rank, main_process_ip="127.0.0.1")
        cmd = cmd[: cmd.index("-m", 3)] + [str(script), str(out)]
        procs.append(subprocess.Popen(cmd, env=_env(tmp_path / "home"), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-4000:]
    rows = json.loads(out.read_text())
    assert [r["rank"] for r in rows] == [0, 1] and all(r["world"] == 2 for r in rows)
    assert [r["node_rank"] for r in rows] == ["0", "1"]  # one process on each machine
    assert [r["local_rank"] for r in rows] == ["0", "0"]
    assert [r["main"] for r in rows] == [True, False]  # only global rank 0 writes
    assert rows[0]["sum"] == 3.0


@pytest.mark.slow
def test_multinode_tiny_pipeline(tmp_path):
    """The tiny pipeline on 2 machines x 1 process, shared run dir and registry."""
    from rlhf.registry import Registry

    run_dir, home = tmp_path / "run", tmp_path / "home"
    overrides = [
        "task.num_sft=64", "task.num_pairs=64", "task.num_ppo_prompts=32", "task.num_eval_prompts=8",
        "sft.eval_fraction=0.0", "sft.train.max_steps=2", "sft.train.per_device_train_batch_size=8", "sft.train.logging_steps=1",
        "reward.train.max_steps=2", "reward.train.per_device_train_batch_size=8",
        "ppo.total_episodes=16", "ppo.rollout_batch_size=4", "ppo.num_mini_batches=2", "ppo.per_device_train_batch_size=2",
        "ppo.num_ppo_epochs=1", "ppo.response_length=8", "ppo.max_prompt_length=32", "ppo.eval_steps=0",
        "ppo.guard_max_length_fraction=1.01", "reward_gate.enabled=false",  # 2 reward steps: at chance
    ]
    m0, m1 = _two_machines(["run", str(ROOT / "pipelines" / "tiny.yaml"), "--output-dir", str(run_dir), *overrides],
                           _env(home), timeout=900)
    assert m0.returncode == 0, m0.stdout[-2000:] + m0.stderr[-6000:]
    assert m1.returncode == 0, m1.stdout[-2000:] + m1.stderr[-6000:]
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert all(state["stages"][s]["status"] == "completed" for s in ("sft", "reward", "ppo"))
    for d in ("sft/adapter", "reward/adapter", "ppo/policy", "ppo/value"):
        assert (run_dir / d / "adapter_model.safetensors").is_file(), d
    # machine 1 (global rank 1) printed and registered nothing
    assert "summary written to" in m0.stdout and "summary written to" not in m1.stdout
    ppo_rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ppo_rows if "reward/score_mean" in r] == [1, 2]  # 16 // (4 x 2 processes)
    reg = Registry.open(home=home)
    try:
        # the default reward ensemble registers its three members
        assert sorted(e.role for e in reg.list("adapter")) == ["policy", "reward", "reward", "reward", "sft", "value"]
        assert len(reg.list("run")) == 3
    finally:
        reg.close()
