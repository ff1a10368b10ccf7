"""Loading base models and tokenizers.

One code path for every base: ``load_tokenizer`` / ``load_causal_lm`` /
``load_sequence_classifier`` call ``from_pretrained`` on a hub id or a local directory.
The tiny default ("builtin:tiny") is built into a local directory by ``rlhf.resolve``
before it gets here, and is then loaded like any other local model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a config dtype name to a torch dtype ("auto" passes through)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


# Built-in chat templates (``model.chat_template``). "plain" ends every turn with the
# tokenizer's EOS, the stop token of generation, so a base model without a template of its
# own learns in SFT to stop where PPO stops sampling.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{{ message['role'] + ': ' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    ),
}


def chat_template_text(spec: str) -> str:
    """The Jinja text of a ``model.chat_template`` value: a built-in name, a file, or Jinja.

    Raises:
        rlhf.config.ConfigError: an unknown name (with the closest built-in) or a missing file.
    """
    from pathlib import Path

    from rlhf.config import ConfigError, did_you_mean

    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix in (".jinja", ".j2", ".txt") or "/" in spec:
        raise ConfigError(f"model.chat_template: file not found: {spec}")
    raise ConfigError(f"model.chat_template: unknown built-in {spec!r}{did_you_mean(spec, CHAT_TEMPLATES)} "
                      f"(built-ins: {', '.join(CHAT_TEMPLATES)}; or give a Jinja string or file)")


def _special_ids(tok) -> dict[int, str]:
    """Every special token of ``tok``: id -> token (named ones and added tokens marked special)."""
    out = {i: t for t, i in zip(tok.all_special_tokens, tok.all_special_ids)}
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            out[int(i)] = str(added)
    return out


def end_of_turn_id(tok) -> int | None:
    """The special token the chat template writes to end an assistant turn, or None.

    ``<|im_end|>`` for ChatML (Qwen2.5 base, whose EOS is ``<|endoftext|>``, ends turns with
    it), the EOS for the "plain" template. Found by rendering a two-turn conversation and
    reading the first special token after the assistant's text.
    """
    if not tok.chat_template:
        return None
    sentinel = "rlhfturnsentinel"
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tok.apply_chat_template(msgs, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation has no known end
        return None
    special = _special_ids(tok)
    tail = tok(text[text.rindex(sentinel) + len(sentinel):], add_special_tokens=False).input_ids
    return next((i for i in tail if i in special), None)


def _generation_eos(name_or_path: str, revision: str | None) -> list[int]:
    """The EOS ids of the model's ``generation_config.json`` (Qwen2.5 Instruct lists two)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(name_or_path, revision=revision).eos_token_id
    except Exception:  # noqa: BLE001 - no generation config: nothing to add
        return []
    return [eos] if isinstance(eos, int) else list(eos or [])


def stop_token_ids(tok, model=None) -> list[int]:
    """The default stop set: the tokenizer's EOS, every EOS id of the model's generation
    config, and the chat template's end-of-turn token (:func:`end_of_turn_id`).

    PPO, DPO's evaluation, ``rlhf generate``/``chat`` and ``rlhf eval`` stop at any of them.
    """
    ids = [tok.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    ids.append(end_of_turn_id(tok))
    return list(dict.fromkeys(i for i in ids if i is not None))


# Tokens made to be a pad, preferred in this order when the tokenizer has one unused.
_PAD_NAMES = ("<|fim_pad|>", "<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|finetune_right_pad|>")

#: The token added when a tokenizer has no spare special token at all (e.g. GPT-2's).
ADDED_PAD = "<|rlhf_pad|>"


def _used_ids(tok, stops: list[int]) -> set[int]:
    """Ids a pad must never be: the stop set, BOS/EOS, and every token the chat template writes."""
    used = set(stops) | {i for i in (tok.bos_token_id, tok.eos_token_id) if i is not None}
    if tok.chat_template:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}]
        for gen in (False, True):
            try:
                text = tok.apply_chat_template(msgs[:2] if gen else msgs, tokenize=False, add_generation_prompt=gen)
            except Exception:  # noqa: BLE001 - e.g. a template refusing a system turn
                text = tok.apply_chat_template(msgs[1:2] if gen else msgs[1:], tokenize=False,
                                               add_generation_prompt=gen)
            used |= set(tok(text).input_ids)
    return used


def choose_pad(tok, stops: list[int]) -> str | None:
    """The pad token to use: the tokenizer's own when it is free, else an unused special token.

    A pad is always masked (attention, loss, response masks), so it needs no trained row:
    any special token works as long as it is never a real token of a sequence. It must not
    be a stop token (padding would read as a stop), BOS/EOS, or a token the chat template
    writes (a sequence classifier pools at the last non-pad token). Order: the tokenizer's
    pad, a token named like a pad, the unknown token, then the other special tokens by id.
    None when no special token is free (then one must be added).
    """
    used = _used_ids(tok, stops)
    special = _special_ids(tok)
    vocab = tok.get_vocab()
    candidates = [tok.pad_token] + [n for n in _PAD_NAMES if n in vocab] + [tok.unk_token]
    candidates += [special[i] for i in sorted(special)]
    for name in candidates:
        if name is None or name not in vocab:
            continue
        if vocab[name] not in used:
            return name
    return None


def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str = "", adapter_dir: str | Path | None = None):
    """The tokenizer every stage and command uses: left padding, a pad that is never a stop.

    Queries must be left-padded, and the pad token must differ from every stop token so
    that padding is never mistaken for a stop (N+ implementation details, arXiv 2403.17031).
    Bases whose pad is their EOS (SmolLM2, Llama-2, Mistral-7B-v0.1) or a second EOS
    (Qwen2.5 Instruct) get an unused special token as pad (:func:`choose_pad`), so the
    embeddings keep their size; only a tokenizer without a free special token gets
    :data:`ADDED_PAD` added (the model's embeddings then grow by one row, see
    :func:`load_causal_lm`). ``chat_template`` (``model.chat_template``) replaces the
    tokenizer's own template; a tokenizer without one gets the built-in "plain" template.

    Args:
        name_or_path: the base model (a directory or hub id).
        adapter_dir: an adapter directory; when it holds a tokenizer (every stage saves the
            one it trained with beside its adapter), that tokenizer is loaded instead of the
            base's, so generation, evaluation and export read exactly what training used.
    """
    from transformers import AutoTokenizer

    saved = adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").is_file()
    if saved:
        tok = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False)
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = chat_template_text(chat_template)
    elif tok.chat_template is None:
        import warnings

        warnings.warn(f"tokenizer of {name_or_path!r} has no chat template; using the built-in 'plain' one "
                      "(set model.chat_template to choose another)", stacklevel=2)
        tok.chat_template = CHAT_TEMPLATES["plain"]
    stops = [tok.eos_token_id, end_of_turn_id(tok)] + _generation_eos(name_or_path, revision)
    pad = choose_pad(tok, [i for i in stops if i is not None])
    if pad is None:
        tok.add_special_tokens({"pad_token": ADDED_PAD})
    elif pad != tok.pad_token:
        tok.pad_token = pad
    tok.padding_side = "left"
    return tok


def tokenizer_for(model_cfg):
    """:func:`load_tokenizer` for a stage's ``model`` config section (its base, revision,
    ``trust_remote_code`` and ``chat_template``): the one call every stage makes."""
    return load_tokenizer(model_cfg.name_or_path, model_cfg.revision, model_cfg.trust_remote_code,
                          model_cfg.chat_template)


def save_tokenizer(tok, directory: str | Path) -> None:
    """Write ``tok`` (its chat template and pad choice included) beside an adapter or model."""
    tok.save_pretrained(str(directory))


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
    """Grow the embeddings to a tokenizer that had a pad added, and set the pad id.

    The new rows are zeros, not random (transformers' default), so every process that loads
    this base with this tokenizer (the stages, ``rlhf generate``, ``rlhf registry export``)
    builds the same model; the pad row is always masked and is never trained or saved in an
    adapter (the stages save adapters with ``save_embedding_layers=False``).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[rows:].zero_()
            out = model.get_output_embeddings()
            if out is not None and out.weight.shape[0] > rows:
                out.weight[rows:].zero_()
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
    magnitude (2e-2 in half precision, for kernel differences between the two forwards;
    1e-4 in fp32). Both post-process in the head's dtype.
    """
    was_training = model.training
    model.eval()
    try:
        emb = model.get_input_embeddings().weight
        n = vocab_size or emb.shape[0]
        ids = torch.randint(0, n, (1, 8), generator=torch.Generator().manual_seed(0)).to(emb.device)
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = transform.apply(model.get_output_embeddings()(hidden)).float()  # in the head's dtype, as the model
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


def first_layers(model_dir: Path, out: Path, layers: int) -> Path:
    """``model_dir`` cut to its first ``layers`` decoder layers: the real tokenizer, embeddings
    (tied), layers, final norm and generation config, at a fraction of the compute.

    The real-model tests run their stage pipelines on this cut of SmolLM2 (30 layers cost
    minutes per stage on a busy 2-core CPU; templates, pad and stop tokens, adapter contents,
    export and score positions do not depend on the depth), and scripts/compare_reward_trl.py
    may train on it. A ``gguf_source.json`` beside the weights is copied (the lineage).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    config.num_hidden_layers = layers
    full = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cut = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    keep = {k: v for k, v in full.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    cut.load_state_dict(keep, strict=True)
    cut.tie_weights()
    cut.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    cut.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    if (model_dir / "gguf_source.json").is_file():
        (out / "gguf_source.json").write_text((model_dir / "gguf_source.json").read_text())
    return out
