"""Tokenizer layouts of real bases, built locally (nothing is downloaded).

Each builder writes a folder with a byte-level BPE tokenizer (no merges: one token per
byte, so whitespace such as the newline after ``<|im_end|>`` is a token of its own, as in
the real vocabularies), the base's special tokens with their roles (bos / eos / pad /
unk), its chat template, a ``generation_config.json`` with its EOS ids, and a 2-layer,
64-wide Llama with untied embeddings. The special-token roles follow the table in
docs/real-models.md (checked by tests/real/test_tokenizer_layouts.py):

| base | eos | pad | chat turns end with | generation config eos |
| Qwen2.5 base | <|endoftext|> | <|endoftext|> | <|im_end|> | <|endoftext|> |
| Qwen2.5 Instruct | <|im_end|> | <|endoftext|> | <|im_end|> | <|im_end|>, <|endoftext|> |
| Llama-2 | </s> | none | </s> | </s> |
"""

from __future__ import annotations

from pathlib import Path

# ChatML with a default system turn, as Qwen2.5 ships it (base and instruct share it)
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 chat: [INST] blocks, the system turn folded into the first, each answer ends with </s>
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\n' + system + '\n<</SYS>>\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5 also has these as added, non-special tokens
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>"]

LAYOUTS = {
    "qwen2.5-base": dict(prefix=[], specials=QWEN_SPECIALS, added=QWEN_ADDED, bos=None, eos="<|endoftext|>",
                         pad="<|endoftext|>", unk=None, template=QWEN_TEMPLATE, gen_eos=["<|endoftext|>"],
                         turn_end="<|im_end|>"),
    "qwen2.5-instruct": dict(prefix=[], specials=QWEN_SPECIALS, added=QWEN_ADDED, bos=None, eos="<|im_end|>",
                             pad="<|endoftext|>", unk=None, template=QWEN_TEMPLATE,
                             gen_eos=["<|im_end|>", "<|endoftext|>"], turn_end="<|im_end|>"),
    "llama-2": dict(prefix=["<unk>", "<s>", "</s>"], specials=[], added=[], bos="<s>", eos="</s>", pad=None,
                    unk="<unk>", template=LLAMA2_TEMPLATE, gen_eos=["</s>"], turn_end="</s>"),
}


def _byte_vocab() -> list[str]:
    """The 256 printable stand-ins a byte-level BPE uses for bytes (GPT-2's mapping)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def build_layout(name: str, out: Path, seed: int = 0) -> Path:
    """Write the tokenizer and a tiny untrained Llama of layout ``name`` to ``out``."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = LAYOUTS[name]
    vocab = {t: i for i, t in enumerate(spec["prefix"])}
    for ch in _byte_vocab():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=spec["unk"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["prefix"] + spec["specials"]])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token=spec["pad"], unk_token=spec["unk"], chat_template=spec["template"],
                                  add_bos_token=False, add_eos_token=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    ids = [tok.convert_tokens_to_ids(t) for t in spec["gen_eos"]]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=ids,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=ids if len(ids) > 1 else ids[0],
                                               bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    return out
