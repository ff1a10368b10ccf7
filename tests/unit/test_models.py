"""Loading bases and tokenizers: padding for generation, dtypes, dropout off."""

from __future__ import annotations

import pytest
import torch

from rlhf.models import disable_dropout, load_causal_lm, load_tokenizer, torch_dtype


def test_tokenizer_pads_left_with_a_token_that_is_not_eos(tiny_assets):
    tok = load_tokenizer(str(tiny_assets.base))
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    batch = tok(["warm", "warm cats kind"], padding=True)
    assert batch.input_ids[0][0] == tok.pad_token_id and batch.attention_mask[0][0] == 0


def test_a_pad_token_equal_to_eos_is_replaced(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_assets.base))
    tok.pad_token = tok.eos_token
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.pad_token_id != again.eos_token_id and again.pad_token == "<pad>"


def test_causal_lm_takes_the_tokenizer_pad_id(tiny_assets):
    tok = load_tokenizer(str(tiny_assets.base))
    model = load_causal_lm(str(tiny_assets.base), tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="float64"):
        torch_dtype("float64")


def test_disable_dropout_reaches_modules_float_attributes_and_config():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_dropout = 0.1  # read at forward time, as Llama attention does
            self.drop = torch.nn.Dropout(0.3)

    class Config:
        attention_dropout = 0.1
        hidden_dropout_prob = 0.2

    model = torch.nn.Sequential(Attn())
    model.config = Config()
    disable_dropout(model)
    assert model[0].attention_dropout == 0.0 and model[0].drop.p == 0.0
    assert model.config.attention_dropout == 0.0 and model.config.hidden_dropout_prob == 0.0
    x = torch.ones(100)
    model.train()
    assert torch.equal(model[0].drop(x), x)
