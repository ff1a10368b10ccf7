"""FSDP2 on CPU (gloo, 2 processes): the PPO update, checkpoints and memory per rank
(rlhf/fsdp.py), and the SFT -> reward -> PPO pipeline under pipelines/accelerate/fsdp2.yaml.

`-k fsdp` selects these. The update test launches one worker script with 1 process and
with 2 (FSDP2) on the same global batch and compares the adapters after the update.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.launch import accelerate_command

ROOT = Path(__file__).resolve().parents[2]
FSDP2 = ROOT / "pipelines" / "accelerate" / "fsdp2.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, fsdp: bool) -> dict:
    env = dict(os.environ, RLHF_HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    for key in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    if fsdp:
        env["ACCELERATE_USE_FSDP"] = "true"  # what accelerate launch sets for fsdp2.yaml
    return env


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A random 2-layer, 64-wide Llama with tied embeddings (as builtin:tiny), a random
    SFT adapter and a reward adapter with a score head (no training: fast)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.tasks.synthetic import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("fsdp_base")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    base_dir = out / "base"
    LlamaForCausalLM(cfg).save_pretrained(base_dir, safe_serialization=True)
    tok.save_pretrained(base_dir)
    dirs = []
    for name in ("sft", "reward"):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                          lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)  # non-zero, so the roles differ from the base
        model.save_pretrained(out / name)
        if name == "reward":
            save_file({"weight": torch.randn(1, 64) * 0.1, "bias": torch.zeros(1)}, str(out / name / "head.safetensors"))
        dirs.append(out / name)
    return base_dir, dirs[0], dirs[1]


WORKER = r'''
import json, sys
import torch
from safetensors.torch import save_file

from rlhf import distributed as dist
from rlhf import fsdp
from rlhf.config import ModelConfig, PPOConfig
from rlhf import estimators, generation, scoring
from rlhf.stages import ppo as P

base, sft, rm, out = sys.argv[1:5]
G = 8  # global batch
world, rank = dist.world_size(), dist.rank()
cfg = PPOConfig(model=ModelConfig(name_or_path=base), sft_adapter=sft, reward_adapter=rm,
                rollout_batch_size=G // world, num_mini_batches=2, per_device_train_batch_size=1, num_ppo_epochs=2,
                response_length=8, max_prompt_length=32, learning_rate=1e-3, seed=3, max_grad_norm=1.0)


def build():
    torch.manual_seed(cfg.seed)
    model, tok, _ = P._build_model(cfg, torch.device("cpu"))  # shards under FSDP
    return model, tok, P.build_optimization(model, cfg, num_updates=2)


model, tok, opt = build()
stop_ids, pad_id = generation.stop_token_ids(tok, cfg, model.base_lm), tok.pad_token_id
suffix = generation.score_suffix(tok, stop_ids)
frozen_bytes = fsdp.parameter_bytes(model, trainable=False)

# The same global batch as one process: every rank samples all G rows with one seed (with
# the gathered policy), then keeps its slice. Prompts of different lengths: left padding.
prompts = [[{"role": "user", "content": "write about " + " ".join(["rain", "tea", "cats", "snow"][: 1 + i % 4])}]
           for i in range(G)]
ids, mask = generation.left_pad(generation.encode_prompts(tok, prompts, cfg.max_prompt_length), pad_id, "cpu")
gen = generation.generation_config(cfg, stop_ids, pad_id)
torch.manual_seed(123)
with fsdp.full_params_for_generation(model):
    full = generation.generate(model, ids, mask, gen, stop_ids, pad_id, cfg.response_length)
lo, hi = dist.shard_bounds(G)
local = full.index(torch.arange(lo, hi))
# each rank trims its slice's prompt padding, as run_ppo's per-rank left_pad does
keep = int(local.prompt_mask.sum(0).nonzero()[0])
local = type(local)(local.prompt_ids[:, keep:], local.prompt_mask[:, keep:], local.response_ids,
                    local.response_mask, local.has_stop)


def one_update(model, opt, update):
    batch = scoring.score_rollout(model, local, cfg, chunk=2, suffix=suffix)
    scores, kl, rewards = P.shaped_rewards(batch, cfg, 0.05, all_reduce=dist.all_reduce_sum)
    adv, returns = estimators.advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None, all_reduce=dist.all_reduce_sum)
    stats = P._ppo_update(model, opt.optimizer, opt.scheduler, batch, adv, returns, cfg, 0.05, update=update,
                          rank=rank, world=world)
    return batch, stats


def full_trainable(model, opt):
    with fsdp.full_state(model, opt.optimizer):
        return {f"{r}.{i}": p.detach().clone() for r in ("policy", "value")
                for i, p in enumerate(model.trainable_parameters(r))}


before = full_trainable(model, opt)
batch, stats = one_update(model, opt, 0)
after = full_trainable(model, opt)
tensors = {"logprobs": dist.gather_rows(batch.logprobs).contiguous(),
           "scores": dist.gather_rows(batch.scores).contiguous()}
tensors.update({f"delta.{k}": (after[k] - before[k]).contiguous() for k in after})

# checkpoint after update 1 (rank 0 writes full tensors), resume into a fresh sharded model:
# adapters and Adam's state (gathered back to full tensors) must equal the uninterrupted run's
ckpt = out + "_ckpt"
with fsdp.full_state(model, opt.optimizer):
    if dist.is_main():
        P.save_checkpoint(P.Path(ckpt), model, opt, cfg, 1)
dist.barrier()
model2, _, opt2 = build()
with fsdp.full_state(model2, opt2.optimizer):
    found = P.load_checkpoint(P.Path(ckpt), model2, opt2)
resumed = full_trainable(model2, opt2)


def full_adam_state(opt):
    with fsdp.full_state(model if opt is opt1 else model2, opt.optimizer):
        return [(k, v.detach().clone()) for p in opt.params for k, v in sorted(opt.optimizer.state[p].items())]


opt1 = opt
s1, s2 = full_adam_state(opt), full_adam_state(opt2)
assert len(s1) == len(s2) and len(s1) >= 3 * len(opt.params)  # step, exp_avg, exp_avg_sq per parameter
resume_err = max(float((a - b).abs().max()) for (_, a), (_, b) in zip(s1, s2))
reload_err = max(float((after[k] - resumed[k]).abs().max()) for k in after)
state_types = sorted({type(v).__name__ for p in opt2.params for k, v in opt2.optimizer.state[p].items() if k != "step"})
sharded = [type(p).__name__ for p in opt.params]
bytes_all = dist.gather_objects(frozen_bytes)
if dist.is_main():
    save_file(tensors, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"stats": stats, "world": world, "sharded": fsdp.is_sharded(model), "param_types": sorted(set(sharded)),
                   "frozen_bytes": bytes_all, "state_types": state_types, "resume_err": resume_err, "reload_err": reload_err,
                   "found": found[0] if found else None}, f)
'''


def _launch_script(script: Path, args: list[str], n: int, env: dict, timeout: int = 300):
    cmd = accelerate_command([], None, n, _free_port())
    cmd = cmd[: cmd.index("-m", 3)] + [str(script), *args]  # a script instead of `-m rlhf`
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def fsdp_update_runs(adapters, tmp_path_factory):
    """One PPO update (+ checkpoint and resume) from 1 process and from 2 under FSDP2."""
    from safetensors.torch import load_file

    base, sft, rm = adapters
    tmp = tmp_path_factory.mktemp("fsdp_update")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    results = {}
    for n in (1, 2):
        out = tmp / f"w{n}"
        args, env = [str(base), str(sft), str(rm), str(out)], _env(tmp / f"home{n}", fsdp=True)
        if n == 1:  # one process needs no launcher (saves its start-up time)
            p = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                               timeout=900, cwd=ROOT)
        else:
            p = _launch_script(script, args, n, env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-8000:]
        results[n] = (load_file(str(out) + ".safetensors"), json.loads(Path(str(out) + ".json").read_text()))
    return results


def test_fsdp_ppo_update_on_two_processes_equals_one(fsdp_update_runs):
    (t1, j1), (t2, j2) = fsdp_update_runs[1], fsdp_update_runs[2]
    assert (j1["world"], j2["world"]) == (1, 2)
    assert (j1["sharded"], j2["sharded"]) == (False, True)
    assert j2["param_types"] == ["DTensor"]  # every trainable parameter is sharded
    # scoring with the sharded model equals one process (frozen base, reward and reference roles)
    torch.testing.assert_close(t2["scores"], t1["scores"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2["logprobs"], t1["logprobs"], atol=1e-5, rtol=1e-5)
    deltas = [k for k in t1 if k.startswith("delta.")]
    assert deltas and any(t1[k].abs().max() > 1e-4 for k in deltas)  # the update moved the weights
    assert any(k.startswith("delta.value") for k in deltas) and any(k.startswith("delta.policy") for k in deltas)
    for k in deltas:  # 4 Adam steps (2 epochs x 2 minibatches) on the adapters
        torch.testing.assert_close(t2[k], t1[k], atol=1e-5, rtol=0, msg=k)
    for k, v in j1["stats"].items():
        assert j2["stats"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_fsdp_checkpoint_resume_equals_uninterrupted(fsdp_update_runs):
    for n in (1, 2):
        j = fsdp_update_runs[n][1]
        assert j["found"] == 1
        assert j["reload_err"] == 0.0  # the checkpoint holds the full adapters
        assert j["resume_err"] == 0.0, (n, j["resume_err"])  # Adam's state restored into the shards
    assert fsdp_update_runs[2][1]["state_types"] == ["DTensor"]  # ... as shards, not full copies


def test_fsdp_base_bytes_per_rank_shrink(fsdp_update_runs):
    (_, j1), (_, j2) = fsdp_update_runs[1], fsdp_update_runs[2]
    (one,), (r0, r1) = j1["frozen_bytes"], j2["frozen_bytes"]
    assert r0 + r1 == one  # the shards partition the frozen weights
    assert max(r0, r1) <= 0.51 * one, (one, r0, r1)
    print(f"frozen parameter bytes per rank: 1 process {one}, 2 processes {r0} / {r1}")


# SFT/reward 2 steps on a global batch of 16 (8 per process x 2, or 16 in one process); PPO 2 updates.
# Both steps must be full batches: with fewer than 32 training pairs the second batch is short,
# and 2 processes fill it up to an even 8 + 8 by repeating a pair (accelerate's even_batches)
# while 1 process takes it short, so the reward models differ by design (with 64 pairs, the
# 64-pair test split minimum left 31 training pairs: that was this test's failure).
PIPELINE = [
    "task.num_sft=64", "task.num_pairs=96", "task.num_ppo_prompts=32", "task.num_eval_prompts=8",
    "reward.min_eval_pairs=16",
    "sft.eval_fraction=0.0", "sft.train.max_steps=2", "sft.train.logging_steps=1", "reward.train.max_steps=2",
    "ppo.total_episodes=16", "ppo.rollout_batch_size=4", "ppo.num_mini_batches=2", "ppo.per_device_train_batch_size=2",
    "ppo.num_ppo_epochs=1", "ppo.response_length=8", "ppo.max_prompt_length=32", "ppo.eval_steps=0",
    "ppo.save_steps=1", "ppo.guard_max_length_fraction=1.01",
    "reward_gate.enabled=false",  # a few reward steps leave the reward model at chance; not under test here
]


def _pipeline(tmp: Path, base: Path, n: int) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp / f"run{n}"
    per_device = 16 // n
    cmd = [sys.executable, "-m", "rlhf", "run", str(ROOT / "pipelines" / "tiny.yaml"), "--output-dir", str(run_dir),
           f"model.name_or_path={base}", f"sft.train.per_device_train_batch_size={per_device}", f"reward.train.per_device_train_batch_size={per_device}",
           *PIPELINE]
    if n > 1:
        cmd += ["--launcher", "accelerate", "--accelerate-config", str(FSDP2), "--num-processes", str(n)]
    env = _env(tmp / f"home{n}", fsdp=False)
    env["MASTER_PORT"] = str(_free_port())
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT), run_dir


@pytest.mark.slow
def test_fsdp2_pipeline_adapters_equal_one_process(adapters, tmp_path):
    """`rlhf run --accelerate-config fsdp2.yaml --num-processes 2`: every stage completes, the
    SFT and reward adapters written by rank 0 are complete and equal the 1-process run's."""
    from safetensors.torch import load_file

    base = adapters[0]
    (p2, run2), (p1, run1) = _pipeline(tmp_path, base, 2), _pipeline(tmp_path, base, 1)
    assert p2.returncode == 0, p2.stdout[-2000:] + p2.stderr[-6000:]
    assert p1.returncode == 0, p1.stdout[-2000:] + p1.stderr[-6000:]
    train_pairs = json.loads((run1 / "reward" / "metrics.json").read_text())["train_pairs"]
    assert train_pairs >= 32, train_pairs  # two full global batches (see PIPELINE)
    for d in ("sft/adapter", "reward/adapter"):
        w1, w2 = (load_file(str(r / d / "adapter_model.safetensors")) for r in (run1, run2))
        assert sorted(w2) == sorted(w1) and w1, d  # complete: every LoRA tensor, full shapes
        for k in w1:
            assert w2[k].shape == w1[k].shape, (d, k)
            torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3, msg=f"{d}:{k}")
    h1, h2 = (load_file(str(r / "reward/adapter/head.safetensors")) for r in (run1, run2))
    torch.testing.assert_close(h2["weight"], h1["weight"], atol=1e-4, rtol=1e-3)
    for d in ("ppo/policy", "ppo/value"):
        assert (run2 / d / "adapter_model.safetensors").is_file()
    assert (run2 / "ppo" / "checkpoints" / "update-2").is_dir()


def test_fsdp_generation_engine_falls_back_to_hf_or_refuses():
    """Under FSDP2 only the hf engine runs inside the gather context: auto falls back to it,
    an explicit static or merged engine is refused before any rollout."""
    import torch

    from rlhf.config import ConfigError
    from rlhf.generation import choose_engine

    cuda = torch.device("cuda")
    assert choose_engine("auto", cuda, sharded=False) == "static"
    assert choose_engine("auto", cuda, sharded=True) == "hf"
    assert choose_engine("hf", cuda, sharded=True) == "hf"
    for name in ("static", "merged"):
        assert choose_engine(name, torch.device("cpu"), sharded=False) == name
        with pytest.raises(ConfigError, match="ppo.generation"):
            choose_engine(name, cuda, sharded=True)
