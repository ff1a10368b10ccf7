"""Fixtures for the registry unit tests: small fake model, adapter and dataset directories.

The unit tests exercise bookkeeping only (versions, hashes, lineage), so the "model" here
is a config.json plus a small safetensors file; the export tests under tests/integration
build a real tiny Llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhf.registry import Registry

HIDDEN = 16


@pytest.fixture
def reg():
    r = Registry.open()  # $RLHF_HOME is a fresh tmp dir per test (tests/conftest.py)
    yield r
    r.close()


@pytest.fixture
def base_dir(tmp_path) -> Path:
    d = tmp_path / "base-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    save_file({"w": torch.arange(8, dtype=torch.float32)}, str(d / "model.safetensors"))
    (d / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture
def make_adapter(tmp_path):
    """make_adapter(role, seed=0, hidden=HIDDEN) -> a directory shaped like a stage's output."""
    counter = iter(range(10_000))

    def _make(role: str = "sft", seed: int = 0, hidden: int = HIDDEN, head: bool | None = None) -> Path:
        d = tmp_path / f"adapter-{role}-{next(counter)}"
        d.mkdir()
        g = torch.Generator().manual_seed(seed)
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
            "task_type": "CAUSAL_LM",
        }))
        save_file({"base_model.model.layer.q_proj.lora_A.weight": torch.randn(2, hidden, generator=g)},
                  str(d / "adapter_model.safetensors"))
        if head if head is not None else role in ("reward", "value"):
            save_file({"weight": torch.randn(1, hidden, generator=g)}, str(d / "head.safetensors"))
        (d / "rlhf_adapter.json").write_text(json.dumps({"role": role, "note": "written by the stage"}))
        return d

    return _make


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    d = tmp_path / "prefs" / "v1"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (d / "manifest.json").write_text(json.dumps({
        "sources": [{"path": "/data/raw.jsonl", "sha256": "0" * 64}], "format": "jsonl", "options": {},
        "counts": {"train": 1}, "schema_version": 1, "created": "2026-01-01T00:00:00Z",
        "content_hash": "ab" * 32,
    }))
    return d
