"""Shared fixtures of the integration tests: a tiny base model with SFT and reward adapters.

The PPO tests need a base model and two adapters, but not the SFT and reward *stages*:
training them would cost minutes and prove nothing about PPO. So one session-scoped
fixture builds the tiny base once (the builtin shape and tokenizer, briefly pretrained so
that it samples the stop token and responses have different lengths), and writes an SFT
adapter and a reward adapter (peft LoRA + ``head.safetensors``) with random non-zero
weights, so that every role computes a different function of the same base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass(frozen=True)
class PPOAssets:
    """Paths of the shared tiny-model artifacts (read-only: tests must not modify them)."""

    base: Path  # model + tokenizer directory, loadable with from_pretrained
    sft_adapter: Path  # peft LoRA directory
    reward_adapter: Path  # peft LoRA directory + head.safetensors
    prompts: Path  # JSONL of {"prompt": [user message]}
    eval_prompts: Path  # JSONL, disjoint prompts for evaluation


def _randomise_lora(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Give every LoRA matrix random non-zero values (peft initialises lora_B to zero, which
    would make an adapter the identity and every role the same function)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _write_adapter(base_dir: Path, out: Path, seed: int, with_head: bool) -> None:
    from peft import LoraConfig, get_peft_model

    from rlhf.adapters import linear_target_modules, save_head
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(base_dir))
    base = load_causal_lm(str(base_dir), tok)
    # lora_dropout > 0 on purpose: PPO must turn it off.
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=linear_target_modules(base),
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    _randomise_lora(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    if with_head:
        gen = torch.Generator().manual_seed(seed + 1)
        head = torch.nn.Linear(base.config.hidden_size, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.5)
            head.bias.fill_(0.25)
        save_head(head, out)


def build_test_base(out: Path, seed: int = 0, pretrain_steps: int = 40, **shape) -> Path:
    """The builtin tiny shape and tokenizer, pretrained for a few steps only.

    ``rlhf.tasks.synthetic.build_tiny_base`` pretrains for 300 steps (about 30 s on two busy cores);
    40 are enough for the base to end responses with <eos> now and then, which is what the
    PPO tests need (variable response lengths, padding after the stop token). The config
    also carries attention dropout, which PPO must switch off. ``shape`` overrides entries of
    the builtin shape (the vLLM tests need heads of 32 or more dimensions).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.tasks.synthetic import TINY_SHAPE, build_tiny_tokenizer, pretrain_tiny

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, attention_dropout=0.1, **(TINY_SHAPE | shape))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    pretrain_tiny(model, tok, seed, steps=pretrain_steps)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def _write_prompts(path: Path, n: int, seed: int) -> None:
    import random

    from rlhf.tasks.synthetic import sample_prompt

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": [{"role": "user", "content": sample_prompt(rng)}]}) + "\n")


@pytest.fixture(scope="session")
def tiny_shape() -> dict:
    """Overrides of the builtin tiny shape for the shared base (a test folder's conftest may
    override this fixture; tests/integration/vllm does)."""
    return {}


@pytest.fixture(scope="session")
def ppo_assets(tmp_path_factory, tiny_shape) -> PPOAssets:
    # One intra-op thread: the models are 64 wide, so threads buy nothing, and on a shared
    # machine with busy cores a second spinning OpenMP thread made training ~10x slower.
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_assets")
    base = build_test_base(root / "base", **tiny_shape)
    sft, reward = root / "sft", root / "reward"
    _write_adapter(base, sft, seed=11, with_head=False)
    _write_adapter(base, reward, seed=23, with_head=True)
    prompts, eval_prompts = root / "prompts.jsonl", root / "eval_prompts.jsonl"
    _write_prompts(prompts, 32, seed=1)
    _write_prompts(eval_prompts, 4, seed=2)
    return PPOAssets(base, sft, reward, prompts, eval_prompts)


@pytest.fixture
def ppo_config(ppo_assets, tmp_path):
    """Factory of small fp32 PPOConfigs on the shared assets: ``ppo_config(**overrides)``."""
    from rlhf.config import PPOConfig

    def make(**overrides) -> PPOConfig:
        kw = dict(
            model={"name_or_path": str(ppo_assets.base)},
            sft_adapter=str(ppo_assets.sft_adapter),
            reward_adapter=str(ppo_assets.reward_adapter),
            prompts=str(ppo_assets.prompts),
            eval_prompts="",
            total_episodes=8,
            rollout_batch_size=8,
            response_length=8,
            num_ppo_epochs=1,
            num_mini_batches=2,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            eval_steps=0,
            save_steps=0,
            output_dir=str(tmp_path / "ppo"),
        )
        kw.update(overrides)
        from rlhf.config import from_dict

        return from_dict(PPOConfig, kw)

    return make


@pytest.fixture
def role_model(ppo_config):
    """``(model, tokenizer, cfg)`` built by the PPO stage's own builder from ``ppo_config()``."""
    from rlhf.stages.ppo import _build_model

    cfg = ppo_config()
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    return model, tok, cfg


@pytest.fixture
def make_rollout():
    """Factory: ``make_rollout(model, tok, cfg, n=8, seed=0)`` samples ``n`` responses to the
    first ``n`` training prompts (different lengths, so left padding) and scores them."""
    from rlhf.data import load_prompts
    from rlhf.generation import encode_prompts, generate, generation_config, left_pad
    from rlhf.scoring import score_rollout

    def make(model, tok, cfg, n: int = 8, seed: int = 0, stop_id: int | None = None):
        stop_id = tok.eos_token_id if stop_id is None else stop_id
        ids = encode_prompts(tok, load_prompts(cfg.prompts)[:n], cfg.max_prompt_length)
        prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id, "cpu")
        torch.manual_seed(seed)
        gen_cfg = generation_config(cfg, stop_id, tok.pad_token_id)
        batch = generate(model, prompt_ids, prompt_mask, gen_cfg, stop_id, tok.pad_token_id, cfg.response_length)
        return score_rollout(model, batch, cfg, chunk=cfg.per_device_train_batch_size)

    return make


# ---------------------------------------------------------------------------------------
# a tiny recipe run once per test module (test_pipeline*.py, test_byo_task.py)


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    """An ``RLHF_HOME`` (registry and data store) of the test module's own, set for the whole
    module, so a module-scoped pipeline run and the tests reading it share one registry."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("home")
        mp.setenv("RLHF_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def run_recipe(module_home, tmp_path_factory):
    """``run_recipe(recipe, overrides, name) -> (plan, summary)``: plan a recipe with overrides
    into a fresh run directory ``<tmp>/<name>`` and run it through, under the module's home.
    A module fixture calls it once and its tests read the one run."""
    import os

    from rlhf.pipeline import Pipeline, plan

    def run(recipe: Path, overrides: list[str] = (), name: str | None = None):
        os.environ["RLHF_HOME"] = str(module_home)
        p = plan(recipe, tmp_path_factory.mktemp("runs") / (name or Path(recipe).stem), list(overrides))
        return p, Pipeline(p).run()

    return run
