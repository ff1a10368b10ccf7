"""Fixtures of the unit tests that need a model: a random-init tiny base and two adapters.

Random weights (no pretraining) keep this to a second or two; the tests that use it check
plumbing (saving, loading, resolving), not what a model learned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


@dataclass(frozen=True)
class TinyAssets:
    base: Path  # model + tokenizer directory
    sft_adapter: Path  # peft LoRA directory
    reward_adapter: Path  # peft LoRA directory + score head


def _adapter(base_dir: Path, out: Path, seed: int, with_head: bool) -> Path:
    from peft import LoraConfig, get_peft_model

    from rlhf.adapters import linear_target_modules, save_head
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(base_dir))
    base = load_causal_lm(str(base_dir), tok)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=linear_target_modules(base),
                                            bias="none", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero LoRA B, so every adapter is a different function
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    if with_head:
        head = torch.nn.Linear(base.config.hidden_size, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
            head.bias.fill_(0.5)
        save_head(head, out)
    return out


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> TinyAssets:
    """A tiny Llama with the synthetic task's tokenizer, an SFT and a reward adapter (read-only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.tasks.synthetic import TINY_SHAPE, build_tiny_tokenizer

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_assets")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=None, **TINY_SHAPE))
    model.save_pretrained(str(root / "base"), safe_serialization=True)
    tok.save_pretrained(str(root / "base"))
    return TinyAssets(root / "base", _adapter(root / "base", root / "sft", 1, with_head=False),
                      _adapter(root / "base", root / "reward", 2, with_head=True))
