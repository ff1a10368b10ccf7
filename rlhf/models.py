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
    model = classifier_from_pretrained(
        name_or_path, **_model_kwargs(dtype, revision, trust_remote_code, attn_implementation)
    )
    _align_with_tokenizer(model, tokenizer)
    return model


class _DropLoadReport:
    """A logging filter dropping transformers' state-dict "LOAD REPORT" (checked by hand after)."""

    def filter(self, record) -> bool:
        return "LOAD REPORT" not in record.getMessage()


#: Head layers a sequence classifier gets on top of a causal-LM checkpoint.
HEAD_PREFIXES = ("score.", "classifier.")


def classifier_from_pretrained(name_or_path: str, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`` without the
    load report for the head it creates.

    A causal-LM checkpoint has no score head, so transformers prints a "score.weight
    MISSING" table on every reward-model load; that head is new by design (it is trained,
    or replaced by head.safetensors). Any other missing weight is still reported, as a
    warning naming the keys.
    """
    import logging
    import warnings

    from transformers import AutoModelForSequenceClassification

    # a filter, not a level: transformers reads this logger's level to decide other checks
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = _DropLoadReport()
    logger.addFilter(drop_report)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, output_loading_info=True, **kwargs
        )
    finally:
        logger.removeFilter(drop_report)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in info.get("unexpected_keys", []) if "lm_head" not in k]
    if missing or unexpected:
        warnings.warn(f"{name_or_path}: loading as a sequence classifier, missing weights {missing[:5]}, "
                      f"unexpected weights {unexpected[:5]}", RuntimeWarning, stacklevel=2)
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


# What each architecture's CausalLM forward does to the LM head's output (transformers'
# modeling_*.py). Sampling sees the post-processed logits, so PPO's logprobs must too.
_DIVIDE_BY_LOGITS_SCALING = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa")
_SOFTCAPPED = ("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "vaultgemma",
               "nanochat")


def logit_transform(model):
    """The :class:`rlhf.ppo.LogitTransform` of ``model``'s architecture, read from its config.

    Granite divides the head's output by ``logits_scaling`` (HyperCLOVA X multiplies by
    it), Cohere multiplies by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``, the
    Gemma-2/3 family and Recurrent-Gemma soft-cap. :func:`check_logit_transform` verifies
    the result against the model's own forward, so an architecture missing here is refused
    rather than trained on the wrong distribution.
    """
    from rlhf.ppo import LogitTransform

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kind = getattr(cfg, "model_type", "")
    if kind in _DIVIDE_BY_LOGITS_SCALING:
        return LogitTransform(scale=1.0 / float(cfg.logits_scaling))
    if kind == "hyperclovax":
        return LogitTransform(scale=float(cfg.logits_scaling))
    if kind.startswith("cohere"):
        return LogitTransform(scale=float(cfg.logit_scale))
    if kind == "falcon_h1":
        return LogitTransform(scale=float(cfg.lm_head_multiplier))
    if kind in _SOFTCAPPED and getattr(cfg, "final_logit_softcapping", None):
        return LogitTransform(softcap=float(cfg.final_logit_softcapping))
    if kind == "recurrent_gemma":
        return LogitTransform(softcap=float(cfg.logits_soft_cap))
    return LogitTransform()


@torch.no_grad()
def check_logit_transform(model, transform, vocab_size: int | None = None) -> None:
    """Refuse a model whose own forward's logits differ from ``transform(lm_head(hidden))``.

    Two forwards of 8 random tokens in eval mode; the tolerance is relative to the logits'
    magnitude (2e-2 in half precision, where the model post-processes in bf16 and we in
    fp32; 1e-4 in fp32).
    """
    was_training = model.training
    model.eval()
    try:
        emb = model.get_input_embeddings().weight
        n = vocab_size or emb.shape[0]
        ids = torch.randint(0, n, (1, 8), generator=torch.Generator().manual_seed(0)).to(emb.device)
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = transform.apply(model.get_output_embeddings()(hidden).float())
        theirs = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    scale = theirs.abs().max().clamp(min=1e-6)
    tol = 1e-4 if emb.dtype == torch.float32 else 2e-2
    err = float((ours - theirs).abs().max() / scale)
    if not err <= tol:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"model type {kind!r}: its forward post-processes logits in a way rlhf does not reproduce "
            f"(relative difference {err:.3g}); PPO would train on a different distribution than it samples "
            "from. Add the architecture to rlhf.models.logit_transform.")
