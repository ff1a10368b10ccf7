"""rlhf.generation: the helpers around every sampler and the engine table (no model runs here;
the engines' sampling is tested against each other in tests/integration/ppo)."""

from __future__ import annotations

import typing

import pytest
import torch

from rlhf import generation as G
from rlhf.config import ConfigError, PPOConfig
from rlhf.ppo.rollout import finish_responses
from rlhf.tasks.synthetic import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_left_pad_right_aligns_prompts_and_masks_the_padding():
    ids, mask = G.left_pad([[5, 6, 7], [8], []], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_encode_prompts_applies_the_chat_template_and_keeps_the_last_tokens(tok):
    prompts = [[{"role": "user", "content": "write about cats"}]]
    (full,) = G.encode_prompts(tok, prompts, max_len=1000)
    text = tok.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
    assert full == tok(text, add_special_tokens=False).input_ids
    assert G.encode_prompts(tok, prompts, max_len=3) == [full[-3:]]  # the end holds the generation prompt


def test_stop_tokens_and_the_score_suffix(tok):
    cfg = PPOConfig()
    stops = G.stop_token_ids(tok, cfg)
    assert stops == [tok.eos_token_id]
    # the tokens the template writes after the stop token are what the reward model scored
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "cats"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False).input_ids
    suffix = G.score_suffix(tok, stops)
    assert ids[len(ids) - len(suffix) - 1] in stops and ids[len(ids) - len(suffix):] == suffix
    with pytest.raises(ValueError, match="not a single token"):
        G.stop_token_ids(tok, PPOConfig(stop_token="no such token"))


def test_generation_config_sets_every_knob():
    gen = G.generation_config(PPOConfig(temperature=0.7, response_length=9), [3, 4], pad_id=0)
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens) == (True, 0.7, 0, 1.0, 9)
    assert (gen.eos_token_id, gen.pad_token_id, gen.repetition_penalty, gen.num_beams) == ([3, 4], 0, 1.0, 1)


def test_finish_responses_truncates_after_the_first_stop_and_pads():
    """Stop id 2, pad 0: row 0 stops at position 1 (kept, the rest padded); row 1 has no stop
    (all kept); row 2 stops at once. Sampler logprobs after the stop are 0. A batch that
    finished early (width 3 < T = 4) is padded to T."""
    resp = torch.tensor([[5, 2, 7], [5, 6, 7], [2, 9, 9]])
    prompt = (torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))
    b = finish_responses(resp, [2], 0, 3, *prompt, torch.full((3, 3), -1.0))
    assert b.response_ids.tolist() == [[5, 2, 0], [5, 6, 7], [2, 0, 0]]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert b.has_stop.tolist() == [True, False, True]
    assert b.sampler_logprobs.tolist() == [[-1, -1, 0], [-1, -1, -1], [-1, 0, 0]]
    stopped = finish_responses(torch.tensor([[5, 2, 9], [2, 9, 9]]), [2], 0, 4, *(t[:2] for t in prompt))
    assert stopped.response_ids.tolist() == [[5, 2, 0, 0], [2, 0, 0, 0]] and stopped.sampler_logprobs is None


def test_decode_responses_reads_only_the_real_tokens(tok):
    ids = tok("warm cats", add_special_tokens=False).input_ids
    batch = finish_responses(torch.tensor([ids + [tok.eos_token_id, ids[0]]]), [tok.eos_token_id], tok.pad_token_id,
                             len(ids) + 2, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
    assert G.decode_responses(tok, batch) == ["warm cats"]


def test_the_engine_table_drives_the_choice(monkeypatch):
    # the config offers the table's engines
    assert typing.get_args(typing.get_type_hints(PPOConfig)["generation"]) == ("auto", *G.ENGINES)
    assert G.choose_engine("auto", torch.device("cpu"), sharded=False) == "hf"
    assert G.choose_engine("auto", torch.device("cuda"), sharded=True) == "hf"  # only hf runs sharded
    with pytest.raises(ConfigError, match="'static' is not supported under FSDP2"):
        G.choose_engine("static", torch.device("cuda"), sharded=True)
    from rlhf import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(ConfigError, match="'vllm' runs in one process only"):
        G.choose_engine("vllm", torch.device("cuda"), sharded=False)
    with pytest.raises(ValueError, match="must be one of auto, hf, static, merged, vllm"):
        G.resolve_engine("fast", "cpu")


def test_a_new_engine_is_a_class_and_a_row(monkeypatch):
    built = {}

    class Echo:
        def __init__(self, model, cfg, **kw):
            built.update(kw, cfg=cfg)

        def sample(self, prompt_ids, prompt_mask):
            return finish_responses(prompt_ids, [1], 0, 2, prompt_ids, prompt_mask)

    monkeypatch.setitem(G.ENGINES, "echo", G.EngineSpec(Echo))
    cfg = PPOConfig()
    object.__setattr__(cfg, "generation", "echo")  # a config whose Literal were extended with the row
    engine = G.build_engine(cfg, None, gen_cfg="g", stop_ids=[1], pad_id=0, device=torch.device("cpu"), base_path="b")
    assert isinstance(engine, Echo) and built["gen_cfg"] == "g" and built["base_path"] == "b"
    assert engine.sample(torch.tensor([[4, 1]]), torch.ones(1, 2)).response_ids.tolist() == [[4, 1]]
