"""Every stage under accelerate with 2 CPU processes (gloo), on a 1-layer, 32-wide Llama.

One module-scoped pipeline run (`rlhf run ... --launcher accelerate --num-processes 2`)
backs the stage, logging and registry tests; the PPO-equivalence test launches a small
worker script once with 1 process and once with 2 on the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf import distributed as dist
from rlhf.launch import accelerate_command

ROOT = Path(__file__).resolve().parents[2]
DDP = ROOT / "pipelines" / "accelerate" / "ddp.yaml"

# Small enough for 2 busy cores: SFT/reward 2 steps each, PPO 2 updates of 2 x 4 episodes.
OVERRIDES = [
    "task.num_sft=64", "task.num_pairs=64", "task.num_ppo_prompts=32", "task.num_eval_prompts=8",
    "sft.eval_fraction=0.0", "sft.train.max_steps=2", "sft.train.per_device_train_batch_size=8", "sft.train.logging_steps=1",
    "reward.train.max_steps=2", "reward.train.per_device_train_batch_size=8",
    "ppo.total_episodes=16", "ppo.rollout_batch_size=4", "ppo.num_mini_batches=2", "ppo.per_device_train_batch_size=2",
    "ppo.num_ppo_epochs=1", "ppo.response_length=8", "ppo.max_prompt_length=32", "ppo.eval_steps=0",
    # random weights rarely emit the stop token: every response runs to full length
    "ppo.guard_max_length_fraction=1.01",
    # two reward steps leave the reward model at chance: these tests are about running the
    # stages distributed, not about reward quality, so the quality gate is off
    "reward_gate.enabled=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    env = dict(os.environ, RLHF_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    return env


def _launch_script(script: Path, args: list[str], n: int, env: dict, timeout: int = 300):
    """Run a python script on ``n`` processes the way `accelerate launch` does (torchrun)."""
    cmd = accelerate_command([], None, n, _free_port())
    cmd = cmd[: cmd.index("-m", 3)] + [str(script), *args]  # a script instead of `-m rlhf`
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random-init tiny Llama with the synthetic task's tokenizer (no pretraining: fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.tasks.synthetic import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("base")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, base_dir):
    """`rlhf run pipelines/tiny.yaml --launcher accelerate` on 2 processes, through the CLI."""
    tmp = tmp_path_factory.mktemp("ddp")
    home, run_dir = tmp / "home", tmp / "run"
    cmd = [sys.executable, "-m", "rlhf", "run", str(ROOT / "pipelines" / "tiny.yaml"), "--output-dir", str(run_dir),
           "--launcher", "accelerate", "--accelerate-config", str(DDP), "--num-processes", "2",
           f"model.name_or_path={base_dir}", *OVERRIDES]
    env = _env(home)
    env["MASTER_PORT"] = str(_free_port())
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, run_dir, home


def test_every_stage_completes_under_ddp(ddp_run):
    proc, run_dir, _ = ddp_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    state = json.loads((run_dir / "pipeline.json").read_text())
    assert {s: state["stages"][s]["status"] for s in ("sft", "reward", "ppo")} == dict.fromkeys(
        ("sft", "reward", "ppo"), "completed")
    for d in ("sft/adapter", "reward/adapter", "ppo/policy", "ppo/value"):
        assert (run_dir / d / "adapter_model.safetensors").is_file(), d
    assert (run_dir / "reward" / "adapter" / "head.safetensors").is_file()

    # SFT really ran on 2 processes: 2 steps x 8 rows x 2 ranks = 32 of the 64 rows = epoch 0.5
    # (one process would be at 0.25), i.e. TRL sharded the data instead of duplicating it.
    sft_rows = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in sft_rows if "epoch" in r]
    assert epochs and max(epochs) == pytest.approx(0.5)

    # PPO: total_episodes counts all processes -> 16 // (4 x 2) = 2 updates, logged once each
    ppo_rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in ppo_rows if "reward/score_mean" in r]
    assert train_steps == [1, 2]


def test_logging_happens_once(ddp_run):
    proc, run_dir, _ = ddp_run
    assert proc.returncode == 0
    out = proc.stdout
    for stage in ("sft", "reward", "ppo"):
        assert out.count(f"[pipeline] {stage}: running") == 1, out
    assert out.count("summary written to") == 1
    # one metrics line per logged update and per evaluation (two writers would duplicate them)
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/score_mean" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/score_mean" in r] == [0, 2]


def test_only_rank0_registered_artifacts(ddp_run):
    from rlhf.registry import Registry

    proc, _, home = ddp_run
    assert proc.returncode == 0
    reg = Registry.open(home=home)
    try:
        adapters = reg.list("adapter")
        roles = sorted(e.role for e in adapters)
        # once each (the default ensemble's three reward members), not once per rank
        assert roles == ["policy", "reward", "reward", "reward", "sft", "value"], roles
        assert all(e.version == 1 for e in adapters)
        assert len(reg.list("run")) == 3
        assert len(reg.list("base")) == 1
    finally:
        reg.close()


WORKER = r'''
import json, sys
import torch
from safetensors.torch import save_file

from rlhf import distributed as dist
from rlhf.launch import accelerate_command
from rlhf import ppo as F
from rlhf.config import ModelConfig, PPOConfig
from rlhf.data import load_prompts
from rlhf import estimators, generation, scoring
from rlhf.stages import ppo as P

base, sft, rm, prompts_file, out = sys.argv[1:6]
G = 8  # global batch
world, rank = dist.world_size(), dist.rank()
cfg = PPOConfig(model=ModelConfig(name_or_path=base), sft_adapter=sft, reward_adapter=rm,
                rollout_batch_size=G // world, num_mini_batches=2, per_device_train_batch_size=1, num_ppo_epochs=2,
                response_length=8, max_prompt_length=32, learning_rate=1e-3, seed=3, max_grad_norm=1.0)
torch.manual_seed(cfg.seed)
model, tok, _ = P._build_model(cfg, torch.device("cpu"))
params = model.trainable_parameters("policy") + model.trainable_parameters("value")
dist.broadcast_parameters(params)
stop_id, pad_id = generation.stop_token_ids(tok, cfg, model.base_lm), tok.pad_token_id

# The same global batch as one process: every rank samples all G rows with one seed, then
# keeps its slice (run_ppo instead samples only its slice, with a per-rank seed).
ids, mask = generation.left_pad(generation.encode_prompts(tok, load_prompts(prompts_file)[:G], cfg.max_prompt_length), pad_id, "cpu")
torch.manual_seed(123)
full = generation.generate(model, ids, mask, generation.generation_config(cfg, stop_id, pad_id), stop_id, pad_id, cfg.response_length)
lo, hi = dist.shard_bounds(G)
batch = scoring.score_rollout(model, full.index(torch.arange(lo, hi)), cfg, chunk=4)
scores, kl, rewards = P.shaped_rewards(batch, cfg, 0.05, all_reduce=dist.all_reduce_sum)
adv, returns = estimators.advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None, all_reduce=dist.all_reduce_sum)

opt = torch.optim.Adam(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
before = [p.detach().clone() for p in params]
stats = P._ppo_update(model, opt, sched, batch, adv, returns, cfg, 0.05, update=0, rank=rank, world=world)

# what run_ppo derives per rank: generation seeds (must differ) and the shuffle (must agree)
seeds = dist.gather_objects(dist.rank_seed(cfg.seed * 1_000_003 + 0))
perm = F.ppo_minibatch_indices(G, cfg.num_mini_batches, torch.Generator().manual_seed(cfg.seed * 104_729 + 0))
perms = dist.gather_objects([t.tolist() for t in perm])

tensors = {"adv": dist.gather_rows(adv).contiguous(), "returns": dist.gather_rows(returns).contiguous()}
for i, (p, b) in enumerate(zip(params, before)):
    tensors[f"delta.{i}"] = (p.detach() - b).contiguous()
    tensors[f"grad.{i}"] = p.grad.detach().contiguous()  # the last step's (summed, clipped) gradient
gathered = dist.gather_objects([p.detach() for p in params])
ranks_equal = all(torch.equal(x, y) for x, y in zip(gathered[0], gathered[-1]))
if dist.is_main():
    save_file(tensors, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"stats": stats, "seeds": seeds, "perms": perms, "world": world, "ranks_equal": ranks_equal}, f)
'''


@pytest.fixture(scope="module")
def update_runs(ddp_run, base_dir, tmp_path_factory):
    """The PPO update on one global batch of 8, from 1 process and from 2."""
    from safetensors.torch import load_file

    proc, run_dir, _ = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("update")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    results = {}
    for n in (1, 2):
        out = tmp / f"w{n}"
        args = [str(base_dir), str(run_dir / "sft" / "adapter"), str(run_dir / "reward" / "adapter"),
                str(next((run_dir / "task").glob("*ppo_prompts.jsonl"))), str(out)]
        p = _launch_script(script, args, n, _env(tmp / f"home{n}"))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
        results[n] = (load_file(str(out) + ".safetensors"), json.loads(Path(str(out) + ".json").read_text()))
    return results


def test_ppo_update_from_two_processes_matches_one(update_runs):
    (t1, j1), (t2, j2) = update_runs[1], update_runs[2]
    assert (j1["world"], j2["world"]) == (1, 2)
    # advantages whitened with global statistics equal the single-process whitening
    torch.testing.assert_close(t2["adv"], t1["adv"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2["returns"], t1["returns"], atol=1e-5, rtol=1e-5)
    grads = [k for k in t1 if k.startswith("grad.")]
    deltas = [k for k in t1 if k.startswith("delta.")]
    assert grads and len(grads) == len(deltas)
    assert any(t1[k].abs().max() > 1e-4 for k in deltas)  # the update moved the weights
    for k in grads:
        torch.testing.assert_close(t2[k], t1[k], atol=1e-6, rtol=1e-4)
    for k in deltas:  # 4 optimizer steps (2 epochs x 2 minibatches) of Adam
        torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=0)
    for k, v in j1["stats"].items():
        assert j2["stats"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert j2["ranks_equal"]  # both ranks hold the same weights after the update


def test_rank_seeds_differ_and_shuffles_agree(update_runs):
    _, j2 = update_runs[2]
    assert len(set(j2["seeds"])) == 2
    assert j2["seeds"][0] == update_runs[1][1]["seeds"][0]  # rank 0 reproduces one process
    assert j2["perms"][0] == j2["perms"][1]


FAILING = r'''
import sys, time
from rlhf import distributed as dist
from rlhf.launch import accelerate_command

if dist.rank() == 1:
    raise RuntimeError("rank 1 failed on purpose")
dist.barrier()  # rank 0 would wait here forever if the launcher did not stop it
time.sleep(3600)  # returning at all means the launcher stopped this rank
'''


def test_failure_on_one_rank_stops_all_with_the_error(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING)
    p = _launch_script(script, [], 2, _env(tmp_path / "home"), timeout=900)
    assert p.returncode != 0
    assert "rank 1 failed on purpose" in p.stderr + p.stdout


def test_launcher_options_need_the_accelerate_launcher(tmp_path):
    from rlhf.cli import main

    assert main(["run", str(ROOT / "pipelines" / "tiny.yaml"), "--num-processes", "2", "--validate-only"]) == 2
    assert main(["run", str(ROOT / "pipelines" / "tiny.yaml"), "--launcher", "accelerate",
                 "--accelerate-config", str(tmp_path / "missing.yaml"), "--validate-only"]) == 2
