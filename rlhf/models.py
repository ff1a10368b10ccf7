"""Loading base models and tokenizers.

One code path for every base: ``load_tokenizer`` / ``load_causal_lm`` /
``load_sequence_classifier`` call ``from_pretrained`` on a hub id or a local directory.
The tiny default ("builtin:tiny") is built into a local directory by ``rlhf.resolve``
before it gets here, and is then loaded like any other local model directory.
"""

from __future__ import annotations

import torch


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a config dtype name to a torch dtype ("auto" passes through)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer for generation: left padding and a pad token that is not EOS.

    Queries must be left-padded, and the pad token must differ from EOS so that padding
    is never mistaken for a stop (N+ implementation details, arXiv 2403.17031).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # Prefer an existing dedicated pad-like token; add one only if none exists.
        for candidate in ("<|fim_pad|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>"):
            if candidate in tok.get_vocab() and tok.convert_tokens_to_ids(candidate) != tok.eos_token_id:
                tok.pad_token = candidate
                break
        else:
            tok.add_special_tokens({"pad_token": "<|rlhf_pad|>"})
    tok.padding_side = "left"
    if tok.chat_template is None:
        raise ValueError(
            f"tokenizer of {name_or_path!r} has no chat template; use an instruct/chat tokenizer"
        )
    return tok


def _model_kwargs(dtype: str, revision: str | None, trust_remote_code: bool, attn_implementation: str | None) -> dict:
    # use_safetensors: a hub model stored only as a pickled .bin fails here instead of being unpickled
    kw = dict(dtype=torch_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    return kw


def load_causal_lm(name_or_path: str, tokenizer, *, dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Load a causal LM and align its pad/eos ids and embedding size with the tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, **_model_kwargs(dtype, revision, trust_remote_code, attn_implementation)
    )
    _align_with_tokenizer(model, tokenizer)
    return model


def load_sequence_classifier(name_or_path: str, tokenizer, *, dtype: str = "float32", revision: str | None = None,
                             trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Load the base as a 1-output sequence classifier (the reward model's shape)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=1, **_model_kwargs(dtype, revision, trust_remote_code, attn_implementation)
    )
    _align_with_tokenizer(model, tokenizer)
    return model


def _align_with_tokenizer(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# Attributes under which model code keeps a dropout probability as a plain float read at
# forward time: e.g. Llama/Qwen2 attention copies ``config.attention_dropout`` into
# ``self.attention_dropout`` when built, so zeroing the config afterwards does not reach it.
_DROPOUT_FLOAT_ATTRS = ("attention_dropout", "attn_dropout", "dropout", "dropout_p", "hidden_dropout",
                        "resid_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout of ``model`` (``nn.Dropout`` modules, float dropout attributes and the
    config's), so that train-mode forwards are deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in _DROPOUT_FLOAT_ATTRS:
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key in _DROPOUT_FLOAT_ATTRS + ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
