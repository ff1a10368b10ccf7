"""Tiny random-init bases of the architectures real runs use, built from configs (never
downloaded), with SFT and reward adapters: the assets of the real-path PPO tests.

Architectures and what each one exercises:
  * ``llama``        the plain case (word-level tokenizer, tied embeddings);
  * ``qwen2_tied`` / ``qwen2_untied``  a ChatML template and two EOS ids (<|im_end|> and
                     <|endoftext|>, as Qwen2.5 ships), tied and untied embeddings;
  * ``gemma2``       final logit soft-capping (a small cap, so that it changes the logits);
  * ``granite``      logits divided by ``logits_scaling``;
  * ``llama_fullsft`` no SFT adapter: the base is the SFT model, the policy a fresh LoRA.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
ARCHS = ("llama", "qwen2_tied", "qwen2_untied", "gemma2", "granite", "llama_fullsft")


def chatml_tokenizer():
    """A small byte-level BPE tokenizer (Qwen2's kind: transformers loads it as a Qwen2
    tokenizer) with a ChatML template and Qwen's two EOS tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf.tasks.synthetic import VOCABULARY

    specials = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(VOCABULARY), "user\n assistant\n system\n"] + [f" {w}\n" for w in VOCABULARY]
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.padding_side = "left"
    return tok


def build_base(arch: str, out: Path, seed: int = 0) -> Path:
    """Write tokenizer + random-init model of ``arch`` to ``out``."""
    import transformers as tf

    from rlhf.tasks.synthetic import build_tiny_tokenizer

    chatml = arch.startswith("qwen2")
    tok = chatml_tokenizer() if chatml else build_tiny_tokenizer()
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")] if chatml else tok.eos_token_id
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=eos, bos_token_id=None, **SHAPE)
    if arch in ("llama", "llama_fullsft"):
        config = tf.LlamaConfig(tie_word_embeddings=True, **common)
        cls = tf.LlamaForCausalLM
    elif chatml:
        config = tf.Qwen2Config(tie_word_embeddings=arch == "qwen2_tied", **common)
        cls = tf.Qwen2ForCausalLM
    elif arch == "gemma2":
        # a cap of 0.5 bends these random-init logits (|x| up to ~1) strongly; real Gemma-2
        # uses 30 on logits that reach it
        config = tf.Gemma2Config(head_dim=16, final_logit_softcapping=0.5, query_pre_attn_scalar=16, sliding_window=64,
                                 **common)
        cls = tf.Gemma2ForCausalLM
    elif arch == "granite":
        config = tf.GraniteConfig(logits_scaling=0.5, tie_word_embeddings=True, **common)  # logits x 2
        cls = tf.GraniteForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # larger logits than the default init, so the temperature and transforms matter
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def write_adapter(base_dir: Path, out: Path, seed: int, with_head: bool) -> None:
    """A LoRA on every decoder linear layer with random non-zero weights (+ a score head)."""
    from peft import LoraConfig, get_peft_model

    from rlhf.adapters import linear_target_modules, save_head
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(base_dir))
    base = load_causal_lm(str(base_dir), tok)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=linear_target_modules(base), bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(out), safe_serialization=True)
    if with_head:
        head = torch.nn.Linear(base.config.hidden_size, 1, bias=True)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.5)
            head.bias.fill_(0.25)
        save_head(head, out)


def build_assets(arch: str, root: Path) -> dict:
    """Base, adapters and prompts of ``arch`` under ``root``; returns PPOConfig overrides."""
    from rlhf.tasks.synthetic import sample_prompt

    base = build_base(arch, root / "base")
    sft = None
    if arch != "llama_fullsft":
        sft = root / "sft"
        write_adapter(base, sft, seed=11, with_head=False)
    reward = root / "reward"
    write_adapter(base, reward, seed=23, with_head=True)
    rng = random.Random(1)
    prompts = root / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as f:
        for _ in range(16):
            f.write(json.dumps({"prompt": [{"role": "user", "content": sample_prompt(rng)}]}) + "\n")
    return dict(model={"name_or_path": str(base)}, sft_adapter=str(sft) if sft else "", reward_adapter=str(reward),
                prompts=str(prompts))
