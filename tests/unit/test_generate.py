"""``rlhf generate`` / ``rlhf chat`` / ``rlhf eval`` sample a loaded policy through the evaluation
module's sampler (rlhf.evaluation.sample_completions) with the hf engine PPO uses: what it
draws is what transformers' ``generate`` draws with the same seed and knobs, cut at the stop."""

from __future__ import annotations

import pytest
import torch


def _reference(policy, prompts, *, temperature: float, seed: int, max_new_tokens: int, batch_size: int) -> list[str]:
    """transformers' generate on the policy itself, every knob given, each row cut before its
    first stop token."""
    from transformers import GenerationConfig

    from rlhf.generation import encode_prompts, left_pad
    from rlhf.models import stop_token_ids

    tok, model = policy.tok, policy.model
    stop = stop_token_ids(tok, model)
    gen = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                           top_k=0 if temperature > 0 else None, top_p=1.0 if temperature > 0 else None,
                           max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(encode_prompts(tok, prompts[s: s + batch_size], 512), tok.pad_token_id, "cpu")
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for row in seqs[:, ids.shape[1]:].tolist():
            ends = [row.index(i) for i in stop if i in row]
            out.append(tok.decode(row[: min(ends)] if ends else row, skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("adapter, temperature", [(False, 0.7), (False, 0.0), (True, 1.0)])
def test_generate_samples_what_transformers_generate_draws(tiny_assets, adapter, temperature):
    from peft import PeftModel

    from rlhf.generate import Policy, sample
    from rlhf.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_assets.base))
    model = load_causal_lm(str(tiny_assets.base), tok)
    if adapter:
        model = PeftModel.from_pretrained(model, str(tiny_assets.sft_adapter))
    model.eval()
    policy = Policy(model, tok, "tiny", str(tiny_assets.base), tiny_assets.sft_adapter if adapter else None)
    prompts = [[{"role": "user", "content": text}] for text in ("write about cats", "a note on rain", "books")]
    got = sample(policy, prompts, max_new_tokens=8, temperature=temperature, seed=4, batch_size=2)
    assert got == _reference(policy, prompts, temperature=temperature, seed=4, max_new_tokens=8, batch_size=2)
    assert len(got) == 3 and all(isinstance(t, str) for t in got)
