"""Loading base models and tokenizers, and building the embedded tiny default.

One code path for every base: ``load_tokenizer`` / ``load_causal_lm`` /
``load_sequence_classifier`` call ``from_pretrained`` on a hub id or a local directory.
The tiny default ("builtin:tiny") is first materialised into a local directory (a saved
tokenizer and a randomly initialised 2-layer, 64-wide Llama), after which it is loaded
exactly like any other local model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf.paths import rlhf_home

BUILTIN_TINY = "builtin:tiny"

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# A chat template for the word-level tiny tokenizer. Each turn ends with <eos>, which is
# also the stop token of generation, so SFT teaches the policy to stop.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <eos> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a config dtype name to a torch dtype ("auto" passes through)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def build_tiny_tokenizer():
    """A word-level fast tokenizer over the synthetic task's vocabulary, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reward_data.synthetic import VOCABULARY

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Word pieces are whole words: decoding joins them with single spaces.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny default base model (tokenizer + random-init Llama) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **TINY_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _pretrain_tiny(model, tok, seed)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pretrain_tiny(model, tok, seed: int, steps: int = 300, batch: int = 32) -> None:
    """Give the tiny base what a real pretrained base has: knowledge of its language.

    A random-init model with frozen embeddings cannot be taught anything useful by a LoRA
    adapter, unlike a real pretrained base. So the tiny base is trained for a few seconds on
    generic text of the synthetic language: chat-shaped transcripts whose words are drawn
    uniformly from the whole vocabulary (no task preferences, random lengths). SFT then
    teaches the task's style on top, as with a real base.
    """
    import random

    from reward_data.synthetic import VOCABULARY

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()

    def transcript() -> str:
        turns = []
        for _ in range(rng.randint(1, 2)):
            for role in ("user", "assistant"):
                words = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 10)))
                turns.append(f"<|{role}|> {words} <eos>")
        return " ".join(turns)

    for _ in range(steps):
        enc = tok([transcript() for _ in range(batch)], padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del gen
    model.eval()


def resolve_base(name_or_path: str, seed: int = 0) -> str:
    """Turn a base-model reference into something ``from_pretrained`` accepts.

    ``builtin:tiny`` is materialised once under ``$RLHF_HOME/builtin/`` (keyed by its
    shape, vocabulary and seed) and its directory returned; hub ids and local directories
    pass through unchanged.
    """
    if name_or_path != BUILTIN_TINY:
        if name_or_path.startswith("builtin:"):
            raise ValueError(f"model.name_or_path: unknown builtin model {name_or_path!r}; only {BUILTIN_TINY!r} exists")
        return name_or_path
    from reward_data.synthetic import VOCABULARY

    key = hashlib.sha256(json.dumps([TINY_SHAPE, VOCABULARY, SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, seed]).encode()).hexdigest()[:12]
    out = rlhf_home() / "builtin" / f"tiny-{key}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_base(out, seed=seed)
    return str(out)


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
            f"tokenizer of {name_or_path!r} has no chat template; set sft.chat_template in the recipe "
            "or use an instruct/chat tokenizer"
        )
    return tok


def _model_kwargs(dtype: str, revision: str | None, trust_remote_code: bool, attn_implementation: str | None) -> dict:
    kw = dict(dtype=torch_dtype(dtype), revision=revision, trust_remote_code=trust_remote_code)
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
    config's), so that train-mode forwards are deterministic (ppo.md test 12)."""
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
