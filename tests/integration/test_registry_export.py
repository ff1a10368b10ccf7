"""Export: a merged, standalone model gives the same outputs as base + adapter (+ head).

A tiny Llama (2 layers, 64 wide) and a word-level tokenizer are built locally; LoRA
weights are randomly initialised (not the zero-B default) so that merging matters.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rlhf.registry import Registry, RegistryError
from rlhf.registry.cli import main

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "big", "small", "red", "blue"]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _build_base(d: Path, tie: bool) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return _build_base(tmp_path_factory.mktemp("tiny-llama"), tie=False)


@pytest.fixture(scope="module")
def tiny_tied_base(tmp_path_factory) -> Path:
    """Like the lead's builtin tiny model: input and output embeddings tied."""
    return _build_base(tmp_path_factory.mktemp("tiny-llama-tied"), tie=True)


def _lora_config(task_type: str):
    from peft import LoraConfig

    # init_lora_weights=False: random A and B, so the adapter actually changes the outputs.
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                      task_type=task_type, init_lora_weights=False)


def _batch():
    tok = _tokenizer()
    tok.padding_side = "left"
    return tok(["the cat sat on the mat", "a big red dog ran"], return_tensors="pt", padding=True)


def _write_meta(d: Path, role: str) -> None:
    (d / "rlhf_adapter.json").write_text(json.dumps({"role": role, "base": "tiny"}))


@pytest.mark.parametrize("role,tied", [("sft", False), ("policy", True)])
def test_export_causal_lm_matches_base_plus_adapter(request, tmp_path, role, tied):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_base = request.getfixturevalue("tiny_tied_base" if tied else "tiny_base")
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), _lora_config("CAUSAL_LM")).eval()
    src = tmp_path / "adapter"
    peft_model.save_pretrained(src)
    _write_meta(src, role)
    batch = _batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(**batch).logits
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter is not a no-op

    with Registry.open() as reg:
        reg.register_base("tiny", str(tiny_base))
        reg.register_adapter("lm", role, src, base="tiny")
        out = reg.export("lm", tmp_path / "exported")

    assert json.loads((out / "rlhf_export.json").read_text())["adapter"] == "lm:1"
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat")["input_ids"] == _tokenizer()("the cat")["input_ids"]


def _reward_adapter(tiny_base, dst: Path, bias: float | None, role: str = "reward"):
    """A SEQ_CLS LoRA with a random score head saved as head.safetensors; returns the peft model."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(2)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    clf.config.pad_token_id = 0
    if bias is not None:  # a value head with a bias (the Llama score layer has none)
        clf.score = torch.nn.Linear(64, 1, bias=True)
    peft_model = get_peft_model(clf, _lora_config("SEQ_CLS")).eval()
    score = peft_model.base_model.model.score
    score = getattr(score, "modules_to_save", {"default": score})["default"]
    with torch.no_grad():
        score.weight.normal_()
        if bias is not None:
            score.bias.fill_(bias)
    peft_model.save_pretrained(dst)
    head = {"weight": score.weight.detach().clone()}
    if bias is not None:
        head["bias"] = score.bias.detach().clone()
    save_file(head, str(dst / "head.safetensors"))
    _write_meta(dst, role)
    return peft_model


@pytest.mark.parametrize("bias", [None, 0.0])
def test_export_sequence_classifier_matches_base_plus_adapter_plus_head(tiny_base, tmp_path, bias):
    from transformers import AutoModelForSequenceClassification

    peft_model = _reward_adapter(tiny_base, tmp_path / "adapter", bias)
    batch = _batch()
    with torch.no_grad():
        expected = peft_model(**batch).logits
    assert expected.shape == (2, 1)

    with Registry.open() as reg:
        reg.register_base("tiny", str(tiny_base))
        reg.register_adapter("rm", "reward", tmp_path / "adapter", base="tiny")
        assert main(["export", "rm", str(tmp_path / "exported")]) == 0

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported", use_safetensors=True).eval()
    assert model.config.num_labels == 1
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_export_refuses_a_head_bias_the_architecture_cannot_hold(tiny_base, tmp_path):
    _reward_adapter(tiny_base, tmp_path / "adapter", bias=0.5, role="value")
    with Registry.open() as reg:
        reg.register_base("tiny", str(tiny_base))
        reg.register_adapter("vh", "value", tmp_path / "adapter", base="tiny")
        with pytest.raises(RegistryError, match="non-zero bias"):
            reg.export("vh", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_export_refuses_tampered_adapter_and_existing_output(tiny_base, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), _lora_config("CAUSAL_LM"))
    src = tmp_path / "adapter"
    peft_model.save_pretrained(src)
    with Registry.open() as reg:
        reg.register_base("tiny", str(tiny_base))
        e = reg.register_adapter("lm", "sft", src, base="tiny")
        busy = tmp_path / "busy"
        busy.mkdir()
        (busy / "x").write_text("x")
        with pytest.raises(FileExistsError):
            reg.export("lm", busy)
        with open(e.path / "adapter_model.safetensors", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\0\0\0\1")
        with pytest.raises(RegistryError, match="fails verification"):
            reg.export("lm", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        with pytest.raises(ValueError, match="only adapters"):
            reg.export("tiny", tmp_path / "out")


def test_export_value_adapter_trained_on_the_causal_lm(tiny_tied_base, tmp_path):
    """The PPO value role is a LoRA on the causal LM's decoder plus a linear head on the last
    token's final hidden state; exported as a sequence classifier it must score the same."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_tied_base), _lora_config("CAUSAL_LM")).eval()
    src = tmp_path / "value"
    peft_model.save_pretrained(src)
    w = torch.randn(1, 64)
    save_file({"weight": w}, str(src / "head.safetensors"))
    batch = _batch()  # left padded: the last position is the last real token of every row
    with torch.no_grad():
        hidden = peft_model.base_model.model.model(**batch).last_hidden_state  # (batch, seq, hidden)
        expected = hidden[:, -1] @ w.T  # (batch, 1)

    with Registry.open() as reg:
        reg.register_base("tiny", str(tiny_tied_base))
        reg.register_adapter("critic", "value", src, base="tiny")
        out = reg.export("critic", tmp_path / "exported")
    model = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True).eval()
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_follows_the_umask(tiny_base, tmp_path, umask):
    """An export is a model to share: its directory and files get the modes the user's umask
    gives anything else they create, not mkdtemp's private 0700."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), _lora_config("CAUSAL_LM"))
    src = tmp_path / "adapter"
    peft_model.save_pretrained(src)
    old = os.umask(umask)
    try:
        with Registry.open() as reg:
            reg.register_base("tiny", str(tiny_base))
            reg.register_adapter("lm", "sft", src, base="tiny")
            out = reg.export("lm", tmp_path / "exported")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
