"""Real bases end to end: SmolLM2-135M-Instruct and the Qwen2.5 base / instruct and Llama-2
tokenizer layouts (tests/real/layouts.py), each through a few optimizer steps of SFT,
reward, PPO and DPO (tests/real/conftest.py runs them once per session).

What each test pins down, on every base:
  * the tokenizer: an unused special token as pad (never a stop token, no new embedding
    row), the chat template's end-of-turn token in the stop set;
  * one chat template: the stages, the adapters' saved tokenizers, ``rlhf generate`` and
    ``rlhf registry export`` render a conversation identically;
  * PPO's first update: KL 0 at step 0 and a first-minibatch ratio of 1;
  * adapters hold LoRA weights only (no embedding or LM-head copy), with the tokenizer beside;
  * the reward PPO reads is the score the exported reward model gives the chat-templated
    conversation (the token it was trained to score);
  * ``rlhf registry export`` of every role loads in plain transformers and generates / scores;
  * the frozen roles score the same in one mixed-adapter batch and one forward each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BASES
from layouts import LAYOUTS
from safetensors import safe_open

CONVERSATION = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."}]


def _base_tokenizer(base_dir: Path, chat_template: str = ""):
    from rlhf.config import ModelConfig
    from rlhf.models import tokenizer_for

    return tokenizer_for(ModelConfig(name_or_path=str(base_dir), chat_template=chat_template))


@pytest.mark.parametrize("name", BASES)
def test_pad_is_a_free_special_token_and_the_turn_end_stops(name, base_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.config import PPOConfig
    from rlhf.models import end_of_turn_id, stop_token_ids
    from rlhf.generation import stop_token_ids as ppo_stop_ids

    raw = AutoTokenizer.from_pretrained(str(base_dirs[name]))
    tok = _base_tokenizer(base_dirs[name])
    model = AutoModelForCausalLM.from_pretrained(str(base_dirs[name]))
    stops = stop_token_ids(tok, model)
    turn_end = "<|im_end|>" if name != "llama-2" else "</s>"
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == turn_end
    assert tok.convert_tokens_to_ids(turn_end) in stops
    assert tok.pad_token_id not in stops and tok.pad_token_id not in (tok.bos_token_id, tok.eos_token_id)
    assert len(tok) == len(raw) == model.get_input_embeddings().weight.shape[0]  # reused, nothing added
    rendered = tok(tok.apply_chat_template(CONVERSATION, tokenize=False)).input_ids
    assert tok.pad_token_id not in rendered
    assert ppo_stop_ids(tok, PPOConfig(), model) == stops  # PPO starts (Qwen2.5 Instruct's pad was a second EOS)
    expected_pad = {"smollm2": "<|endoftext|>", "qwen2.5-base": "<|fim_pad|>", "qwen2.5-instruct": "<|fim_pad|>",
                    "llama-2": "<unk>"}[name]
    assert tok.pad_token == expected_pad


def test_smollm2_is_the_model_real_models_md_describes(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(smollm2_dir))
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert cfg.tie_word_embeddings and getattr(cfg, "quantization_config", None) is None
    raw = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert (raw.bos_token, raw.eos_token, raw.pad_token, raw.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    source = json.loads((smollm2_dir / "gguf_source.json").read_text())
    assert source["gguf_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(source["gguf_sha256"]) == 64
    assert source["gguf_sha256"].startswith(smollm2_dir.name.rsplit("-", 1)[1])


def test_smollm2_answers_and_stops_at_im_end(smollm2_dir):
    """Greedy, through `rlhf generate`'s path (prompts encoded as PPO encodes them): the answer, then <|im_end|>."""
    from rlhf.generate import load_policy, sample
    from rlhf.models import stop_token_ids

    policy = load_policy(str(smollm2_dir))
    tok = policy.tok
    assert stop_token_ids(tok, policy.model) == [tok.convert_tokens_to_ids("<|im_end|>")]
    prompt = [[{"role": "user", "content": "What is the capital of France?"}]]
    # sample() cuts each completion at its first stop token: the exact sentence means it stopped
    # at <|im_end|> right after the answer (16 new tokens would leave room to run on)
    assert sample(policy, prompt, max_new_tokens=16, temperature=0) == ["The capital of France is Paris."]


def _adapters(run_dir: Path) -> dict[str, Path]:
    return {"sft": run_dir / "sft" / "adapter", "reward": run_dir / "reward" / "adapter",
            "policy": run_dir / "ppo" / "policy", "value": run_dir / "ppo" / "value", "dpo": run_dir / "dpo" / "adapter"}


@pytest.mark.parametrize("name", BASES)
def test_every_stage_and_command_renders_one_chat_template(name, base_dirs, real_runs):
    from rlhf.generate import load_policy
    from rlhf.models import load_tokenizer

    import yaml

    _, runs = real_runs
    run_dir = runs[name][0]
    template = yaml.safe_load((run_dir / "sft" / "config.yaml").read_text())["model"]["chat_template"]
    want = _base_tokenizer(base_dirs[name], template).apply_chat_template(CONVERSATION, tokenize=False)
    if name == "smollm2":  # the recipe's model.chat_template, not SmolLM2's own (with its default system turn)
        assert template == "chatml" and "SmolLM" not in want
        assert want != _base_tokenizer(base_dirs[name]).apply_chat_template(CONVERSATION, tokenize=False)
    for role, adapter in _adapters(run_dir).items():
        saved = load_tokenizer(str(base_dirs[name]), adapter_dir=adapter)
        assert saved.apply_chat_template(CONVERSATION, tokenize=False) == want, role
    assert load_policy(str(_adapters(run_dir)["dpo"])).tok.apply_chat_template(CONVERSATION, tokenize=False) == want
    for stage in ("sft", "reward", "ppo", "dpo"):  # every stage ran with the recipe's template
        assert yaml.safe_load((run_dir / stage / "config.yaml").read_text())["model"]["chat_template"] == template


@pytest.mark.parametrize("name", BASES)
def test_first_ppo_update_starts_at_kl_0_and_ratio_1(name, real_runs):
    _, runs = real_runs
    rows = [json.loads(line) for line in (runs[name][0] / "ppo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "kl/mean" in r)
    assert first["kl/mean"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as a copy of the SFT adapter
    assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one minibatch, one epoch: the first
    assert first["policy/approxkl"] == pytest.approx(0.0, abs=1e-6)
    for stage in ("sft", "reward"):
        assert any("loss" in json.loads(line) for line in (runs[name][0] / stage / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("name", BASES)
def test_adapters_hold_only_lora_weights_and_their_tokenizer(name, real_runs):
    _, runs = real_runs
    for role, adapter in _adapters(runs[name][0]).items():
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and all("lora_" in k or ".score." in k for k in keys), (role, [k for k in keys if "lora_" not in k][:3])
        assert not any("embed_tokens" in k or "lm_head" in k for k in keys), role
        assert (adapter / "tokenizer_config.json").is_file(), role


@pytest.mark.parametrize("name", BASES)
def test_export_of_every_role_loads_in_plain_transformers(name, real_runs, tmp_path, monkeypatch):
    """`rlhf registry export` per role; the result needs neither rlhf nor peft to load and run.
    The exported reward model scores the conversation exactly where PPO reads the reward."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.cli import main

    home, runs = real_runs
    monkeypatch.setenv("RLHF_HOME", str(home))
    stages = runs[name][1]["stages"]
    refs = {"sft": stages["sft"]["outputs"]["adapter"], "reward": stages["reward"]["outputs"]["adapter"],
            "policy": stages["ppo"]["outputs"]["policy"], "value": stages["ppo"]["outputs"]["value"],
            "dpo": stages["dpo"]["outputs"]["adapter"]}
    for role, ref in refs.items():
        out = tmp_path / role
        assert main(["registry", "export", ref, str(out)]) == 0, role
        tok = AutoTokenizer.from_pretrained(str(out))
        text = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        if role in ("reward", "value"):
            model = AutoModelForSequenceClassification.from_pretrained(str(out))
            assert model.config.pad_token_id == tok.pad_token_id
            assert torch.isfinite(model(**enc).logits).all() and model(**enc).logits.shape == (1, 1)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(out))
            gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
            assert gen.shape[1] > enc.input_ids.shape[1], role
    _check_reward_position(name, refs["reward"], tmp_path / "reward", runs[name][0])


def _check_reward_position(name: str, ref: str, exported: Path, run_dir: Path) -> None:
    """PPO's reward of a response that stopped (prompt + response + the template's suffix)
    equals the exported sequence classifier's score of the chat-templated conversation."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.adapters import RoleModel
    from rlhf.models import load_causal_lm, load_tokenizer, stop_token_ids
    from rlhf.ppo.rollout import Sampled
    from rlhf.generation import encode_prompts, left_pad, score_suffix
    from rlhf.scoring import last_token_scores

    adapter = run_dir / "reward" / "adapter"
    base = json.loads((adapter / "rlhf_adapter.json").read_text())["base_path"]
    tok = load_tokenizer(base, adapter_dir=adapter)
    lm = load_causal_lm(base, tok)
    stops = stop_token_ids(tok, lm)
    model = RoleModel(lm, None, str(adapter))
    model.eval()
    prompt_ids = encode_prompts(tok, [CONVERSATION[:1]], 128)
    full = tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False).input_ids
    suffix = score_suffix(tok, stops)
    response = full[len(prompt_ids[0]): len(full) - len(suffix)]
    assert response[-1] in stops  # the turn ends with a stop token, then the suffix
    p_ids, p_mask = left_pad(prompt_ids, tok.pad_token_id, "cpu")
    r_ids = torch.tensor([response])
    batch = Sampled(p_ids, p_mask, r_ids, torch.ones_like(r_ids, dtype=torch.float), torch.tensor([True]))
    with torch.no_grad():
        ours = float(last_token_scores(model, "reward", batch, suffix)[0])
        clf = AutoModelForSequenceClassification.from_pretrained(str(exported))
        theirs = float(clf(input_ids=torch.tensor([full])).logits[0, 0])
    assert ours == pytest.approx(theirs, abs=1e-4), name


def test_a_gguf_reference_resolves_to_the_cached_folder_and_registers_its_sha256(smollm2_dir):
    from conftest import SMOLLM2

    from rlhf.registry import Registry
    from rlhf.resolve import resolve_base

    assert Path(resolve_base(SMOLLM2)) == smollm2_dir  # converted once, then found by the file's sha256
    sha = json.loads((smollm2_dir / "gguf_source.json").read_text())["gguf_sha256"]
    entry = Registry.open().register_base("smollm2", str(smollm2_dir))
    assert entry.kind == "base" and entry.metadata["gguf"]["gguf_sha256"] == sha


def test_layouts_follow_the_table():
    """The special-token roles of the locally built layouts are those of real-models.md's table."""
    import tempfile

    from transformers import AutoTokenizer, GenerationConfig

    from layouts import build_layout

    with tempfile.TemporaryDirectory() as d:
        for name, spec in LAYOUTS.items():
            out = build_layout(name, Path(d) / name)
            tok = AutoTokenizer.from_pretrained(str(out))
            gen = GenerationConfig.from_pretrained(str(out)).eos_token_id
            gen = [gen] if isinstance(gen, int) else gen
            assert (tok.eos_token, tok.pad_token) == (spec["eos"], spec["pad"]), name
            assert tok.convert_ids_to_tokens(gen) == spec["gen_eos"], name
            text = tok.apply_chat_template(CONVERSATION, tokenize=False)
            assert text.rstrip().endswith(spec["turn_end"]), name


@pytest.mark.parametrize("name", BASES)
def test_the_frozen_roles_score_the_same_mixed_and_apart(name, real_runs):
    """The mixed-adapter batch (ppo.mixed_adapter_scoring's CUDA default) and one forward per
    role (the CPU default) give one reference and one score on each real base's trained
    adapters, its responses sampled by the run's own setup (the chat template's score suffix
    included)."""
    import yaml

    from rlhf.config import PPOConfig, from_dict
    from rlhf.scoring import frozen_role_scores
    from rlhf.stages import ppo as stage

    _, runs = real_runs
    cfg = from_dict(PPOConfig, yaml.safe_load((runs[name][0] / "ppo" / "config.yaml").read_text()), prefix="ppo")
    s = stage.setup(cfg)
    batch, _ = stage.sample(s, cfg, 0)
    with torch.no_grad():
        ref_mixed, scores_mixed = frozen_role_scores(s.model, batch, cfg.temperature, s.score_suffix, mixed=True)
        ref_apart, scores_apart = frozen_role_scores(s.model, batch, cfg.temperature, s.score_suffix, mixed=False)
    m = batch.response_mask.bool()
    assert (ref_mixed - ref_apart)[m].abs().max() < 1e-5
    assert (scores_mixed - scores_apart).abs().max() < 1e-5
    assert scores_apart.abs().max() > 0  # a reward head that scored something
