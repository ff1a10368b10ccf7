"""PPO consistency on the path real runs take: real architectures (tiny, random-init, built
from configs), gradient checkpointing on and off, fp32 and bf16, the full-SFT base.

ppo.md tests 4 (logprobs are those sampled from), 5 (frozen reference, KL 0 at step 0),
6 (critic = reward model at step 0), 7 (score placement), 11 (exact accumulation), 12 (no
dropout) and 14 (resume), plus: gradients with checkpointing equal those without; several
stop tokens; PPO scores where the reward model was trained to score (ChatML).

bf16 tolerances. Where both sides run the same kernels on the same shapes (rollout scoring
vs the training forward of the same rows, checkpointed vs plain recomputation, repeated
forwards) results are bit-identical in bf16 too, and the fp32 tolerances apply. Where the
shapes differ (generate() decodes one token at a time with a KV cache; a padded batch vs a
row alone; one micro-batch of 8 vs 4 of 2), bf16 rounds differently: a bf16 value carries
8 bits of mantissa (relative error 2^-9 ~ 2e-3 per rounding), a 2-layer model compounds a
few such roundings in its hidden states, and logprobs scale the logits' error by up to 1/T
and the logit size (|logits| ~ 3 here), so we allow 0.1 nats on logprobs and 5% relative
on gradients and scores. A real bug (a wrong role, a missing transform, a stale cache) is
off by whole nats, far beyond that.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf.estimators import advantages_and_returns
from rlhf import ppo as F
from rlhf.ppo.rollout import Sampled
from rlhf.generation import encode_prompts, generation_config, left_pad, score_suffix, stop_token_ids
from rlhf.scoring import last_token_scores, response_logprobs, response_values, score_rollout, train_mode
from rlhf.stages.ppo import _build_model, _ppo_update, shaped_rewards
from real_path import build_assets

BF16_LOGPROB_TOL, BF16_REL_TOL = 0.1, 0.05


@pytest.fixture(scope="session")
def arch_assets(tmp_path_factory):
    """``arch_assets(arch)`` -> PPOConfig overrides of that architecture's tiny assets (built once)."""
    cache: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in cache:
            torch.set_num_threads(1)
            cache[arch] = build_assets(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]

    return get


@pytest.fixture
def arch_model(arch_assets, tmp_path):
    """``arch_model(arch, dtype, checkpointing, **overrides)`` -> (model, tok, cfg, stop_ids)."""
    from rlhf.config import PPOConfig, from_dict

    def make(arch: str, dtype: str = "float32", checkpointing: bool = False, **overrides):
        kw = dict(arch_assets(arch), eval_prompts="", total_episodes=8, rollout_batch_size=8, response_length=8,
                  num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8, learning_rate=1e-3, eval_steps=0, save_steps=0,
                  gradient_checkpointing=checkpointing, output_dir=str(tmp_path / "ppo"))
        kw["model"] = dict(kw["model"], dtype=dtype)
        kw.update(overrides)
        cfg = from_dict(PPOConfig, kw)
        torch.manual_seed(0)
        model, tok, _ = _build_model(cfg, torch.device("cpu"))
        return model, tok, cfg, stop_token_ids(tok, cfg, model.base_lm)

    return make


def _perturb(model, roles=("policy", "value"), scale=0.05, seed=7):
    """Move trainable roles away from their sources, so every loss term has a gradient and a
    role mix-up shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.peft.named_parameters():
            if "lora_" in n and any(f".{r}." in n for r in roles):
                p.add_((torch.randn(p.shape, generator=gen) * scale).to(p.dtype))


def _sample(model, tok, cfg, stop_ids, n=8, seed=0):
    """Sample ``n`` responses (eval mode, as generate() does) keeping the logits sampled from;
    then write stop tokens into some rows (random-init models rarely sample one), cycling
    through all stop ids, and truncate after the first stop of any kind. The logits at a
    position depend only on the tokens before it, so they stay the sampled-from logits."""
    from rlhf.data import load_prompts

    ids = encode_prompts(tok, load_prompts(cfg.prompts)[:n], cfg.max_prompt_length)
    prompt_ids, prompt_mask = left_pad(ids, tok.pad_token_id, "cpu")
    gen_cfg = generation_config(cfg, stop_ids, tok.pad_token_id)
    gen_cfg.return_dict_in_generate, gen_cfg.output_logits = True, True
    gen_cfg.min_new_tokens = cfg.response_length  # full-length rows; stops are written below
    torch.manual_seed(seed)
    with torch.no_grad(), train_mode(model, False), model.role("policy"):
        out = model.base_lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen_cfg)
    resp = out.sequences[:, prompt_ids.shape[1]:].clone()
    T = resp.shape[1]
    assert T == cfg.response_length
    for i in range(0, n, 2):  # even rows stop early, odd rows run to the limit
        resp[i, 1 + (i // 2) % (T - 2)] = stop_ids[(i // 2) % len(stop_ids)]
    if len(stop_ids) > 1:  # a later stop of the other kind must not matter: the first one ends the row
        resp[0, T - 1] = stop_ids[1]
    ids_, mask, has_stop = F.first_stop_truncate(resp, stop_ids, tok.pad_token_id)
    logits = torch.stack(out.logits, dim=1).float()
    sampled_lp = torch.log_softmax(logits / cfg.temperature, -1).gather(-1, resp[..., None]).squeeze(-1)
    return Sampled(prompt_ids, prompt_mask, ids_, mask.float(), has_stop), sampled_lp


def _trim(batch, i: int) -> Sampled:
    p = batch.prompt_mask[i].bool()
    n = int(batch.response_mask[i].sum())
    return Sampled(batch.prompt_ids[i:i + 1, p], batch.prompt_mask[i:i + 1, p], batch.response_ids[i:i + 1, :n],
                   batch.response_mask[i:i + 1, :n], batch.has_stop[i:i + 1])


def _grads(model, batch, adv, returns, cfg):
    """Gradients at the one optimizer step of an update with lr 0 (nothing moves)."""
    params = model.trainable_parameters("policy") + model.trainable_parameters("value")
    opt = torch.optim.Adam(params, lr=0.0)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.detach().float().clone() for p in params]))
    _ppo_update(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), batch, adv, returns, cfg, 0.05, 0)
    assert len(seen) == 1
    return seen[0], len(model.trainable_parameters("policy"))


def _rel(a: list, b: list) -> float:
    num = max(float((x - y).abs().max()) for x, y in zip(a, b))
    return num / max(float(x.abs().max()) for x in a)


# --------------------------------------------------------------------------- test 4


@pytest.mark.parametrize("arch, dtype", [(a, "float32") for a in ("llama", "qwen2_tied", "qwen2_untied", "gemma2",
                                                                    "granite", "llama_fullsft")]
                         + [("gemma2", "bfloat16"), ("qwen2_untied", "bfloat16")])
def test_logprobs_are_those_sampled_from(arch, dtype, arch_model):
    """Rollout logprobs equal log_softmax(logits / T) of the logits generate() sampled from
    (the model's own post-processing included), the training forward's logprobs (train
    mode, checkpointing on) and those of each row alone without padding."""
    model, tok, cfg, stop_ids = arch_model(arch, dtype, checkpointing=True)
    _perturb(model, ("policy",))
    sampled, sampled_lp = _sample(model, tok, cfg, stop_ids)
    batch = score_rollout(model, sampled, cfg, chunk=3)
    m = batch.response_mask.bool()
    assert (~m).any() and (batch.prompt_mask == 0).any() and batch.has_stop.any() and not batch.has_stop.all()
    fp32 = dtype == "float32"
    assert (sampled_lp - batch.logprobs)[m].abs().max() < (1e-5 if fp32 else BF16_LOGPROB_TOL)
    with train_mode(model, True), model.role("policy"):
        train_lp, _ = response_logprobs(model, "policy", batch, cfg.temperature)
    assert train_lp.requires_grad
    # same rows, same kernels: equal in bf16 as well (first minibatch: ratio 1, clipfrac 0)
    assert (train_lp.detach() - batch.logprobs)[m].abs().max() < 1e-5
    for i in (0, 1):
        alone = score_rollout(model, _trim(batch, i), cfg, chunk=1)
        n = alone.response_ids.shape[1]
        assert (alone.logprobs[0] - batch.logprobs[i, :n]).abs().max() < (1e-5 if fp32 else BF16_LOGPROB_TOL)
    # the check is sharp: the reference role's logprobs differ
    assert (batch.ref_logprobs - batch.logprobs)[m].abs().max() > (1e-2 if fp32 else 0.3)


def test_transforms_are_real(arch_model):
    """The premise of the Gemma-2 and Granite cases: their post-processing changes the
    logits a lot, so a head without it would be caught above."""
    for arch in ("gemma2", "granite"):
        model, tok, cfg, stop_ids = arch_model(arch)
        sampled, sampled_lp = _sample(model, tok, cfg, stop_ids, n=2)
        P, T = sampled.prompt_ids.shape[1], sampled.response_ids.shape[1]
        with torch.no_grad(), model.role("policy"):
            hidden = model.hidden_states(sampled.input_ids, sampled.attention_mask)[:, P - 1:P - 1 + T]
            raw = model.base_lm.get_output_embeddings()(hidden)
        raw_lp = torch.log_softmax(raw / cfg.temperature, -1).gather(-1, sampled.response_ids[..., None]).squeeze(-1)
        m = sampled.response_mask.bool()
        assert (raw_lp - sampled_lp)[m].abs().max() > 0.5, arch


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("arch, dtype", [("llama", "float32"), ("qwen2_untied", "float32"), ("gemma2", "float32"),
                                         ("granite", "float32"), ("llama_fullsft", "float32"), ("gemma2", "bfloat16")])
def test_gradient_checkpointing_gives_the_same_gradients(arch, dtype, arch_model):
    """Policy and value LoRA gradients with checkpointing on equal those with it off (1e-5;
    the recomputation runs the same kernels on the same shapes, so bf16 too). With one base
    and many adapters, a backward outside its role recomputes the forward under another
    adapter and the gradients come out wrong (relative error above 1)."""
    model, tok, cfg, stop_ids = arch_model(arch, dtype, checkpointing=False, per_device_train_batch_size=4)
    _perturb(model)
    batch = score_rollout(model, _sample(model, tok, cfg, stop_ids)[0], cfg, chunk=4)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None)
    plain, n_policy = _grads(model, batch, adv, returns, cfg)
    model.base_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt, _ = _grads(model, batch, adv, returns, cfg)
    for part in (slice(0, n_policy), slice(n_policy, None)):  # policy, value
        assert max(float(g.abs().max()) for g in plain[part]) > 0
        assert _rel(plain[part], ckpt[part]) < 1e-5


# --------------------------------------------------------------------------- tests 5, 6, 7, 11, 12


@pytest.mark.parametrize("arch, dtype, checkpointing", [
    ("llama", "float32", True), ("qwen2_tied", "float32", False), ("qwen2_untied", "float32", True),
    ("gemma2", "float32", False), ("gemma2", "bfloat16", True), ("granite", "float32", True),
    ("granite", "bfloat16", False), ("llama_fullsft", "float32", True), ("llama_fullsft", "bfloat16", False)])
def test_roles_on_the_real_path(arch, dtype, checkpointing, arch_model):
    model, tok, cfg, stop_ids = arch_model(arch, dtype, checkpointing=checkpointing)
    fp32 = dtype == "float32"
    sampled, _ = _sample(model, tok, cfg, stop_ids)
    # several stop ids: each row ends at its first stop token of any kind
    for row, n, has in zip(sampled.response_ids.tolist(), sampled.response_mask.sum(1).long().tolist(), sampled.has_stop):
        assert bool(has) == (row[n - 1] in stop_ids) and not set(row[:n - 1]) & set(stop_ids)
    if arch.startswith("qwen2"):
        assert len(stop_ids) == 2 and {r[int(n) - 1] for r, n, h in zip(
            sampled.response_ids.tolist(), sampled.response_mask.sum(1), sampled.has_stop) if h} == set(stop_ids)
    batch = score_rollout(model, sampled, cfg, chunk=3)
    # 5. the policy starts as the reference: KL exactly 0
    assert torch.equal(batch.logprobs, batch.ref_logprobs)
    # 6. the critic starts as the reward model, at the last real token
    with torch.no_grad():
        assert (last_token_scores(model, "value", batch) - batch.scores).abs().max() < 1e-5
    # 7. the score is the reward head on the last real token of the unpadded sequence
    for i in (0, 2):
        seq = _trim(batch, i)
        with torch.no_grad(), model.role("reward"):
            manual = model.values("reward", model.hidden_states(seq.input_ids, seq.attention_mask)[0, -1])
        assert (batch.scores[i] - manual).abs() < (1e-5 if fp32 else BF16_REL_TOL * max(1.0, float(manual.abs())))
    # 12. train-mode forwards are repeatable bit for bit
    with train_mode(model, True):
        for role in ("sft", "policy", "value"):
            with model.role(role):
                assert torch.equal(model.hidden_states(batch.input_ids, batch.attention_mask),
                                   model.hidden_states(batch.input_ids, batch.attention_mask)), role
    # 11. one micro-batch of 8 = 4 micro-batches of 2 (policy and value moved first)
    _perturb(model)
    batch = score_rollout(model, sampled, cfg, chunk=8)
    scores, kl, rewards = shaped_rewards(batch, cfg, 0.05)
    adv, returns = advantages_and_returns(batch, rewards, scores, kl, cfg, 0.05, None)
    whole, _ = _grads(model, batch, adv, returns, cfg)
    micro, _ = _grads(model, batch, adv, returns, replace(cfg, per_device_train_batch_size=2))
    assert _rel(whole, micro) < (1e-5 if fp32 else BF16_REL_TOL)
    # 5. updates never move the reference (nor the reward role); they move the policy
    with torch.no_grad(), model.role("sft"):
        sft0 = model.hidden_states(batch.input_ids, batch.attention_mask)
    with torch.no_grad(), model.role("policy"):
        pol0 = model.hidden_states(batch.input_ids, batch.attention_mask)
    params = model.trainable_parameters("policy") + model.trainable_parameters("value")
    opt = torch.optim.Adam(params, lr=1e-2)
    _ppo_update(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), batch, adv, returns, cfg, 0.05, 0)
    with torch.no_grad(), model.role("sft"):
        assert torch.equal(model.hidden_states(batch.input_ids, batch.attention_mask), sft0)
    with torch.no_grad(), model.role("policy"):
        assert (model.hidden_states(batch.input_ids, batch.attention_mask) - pol0).abs().max() > 1e-3


def test_fresh_policy_on_a_full_sft_base_adapts_every_linear_layer(arch_model):
    """No SFT adapter: the policy is a new LoRA with lora.target_modules 'all-linear'
    resolved like the other roles', not peft's default (q_proj, v_proj)."""
    from rlhf.adapters import linear_target_modules

    from rlhf.models import load_causal_lm

    model, tok, cfg, _ = arch_model("llama_fullsft")
    assert not model.has_sft_adapter
    want = set(linear_target_modules(load_causal_lm(cfg.model.name_or_path, tok)))
    assert {"q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"} <= want
    assert set(model.peft.peft_config["policy"].target_modules) == want
    assert set(model.peft.peft_config["policy"].target_modules) == set(model.peft.peft_config["value"].target_modules)


# --------------------------------------------------------------------------- test 14


def test_resume_with_checkpointing_matches_uninterrupted(arch_model, arch_assets, tmp_path):
    """Gemma-2 with gradient checkpointing: 1 update, stop, resume for the second = 2 updates
    straight (adapters to 1e-6)."""
    from safetensors.torch import load_file

    from rlhf.config import PPOConfig, from_dict
    from rlhf.stages.ppo import run_ppo

    def cfg(name):
        return from_dict(PPOConfig, dict(arch_assets("gemma2"), eval_prompts="", total_episodes=8, rollout_batch_size=4,
                                         response_length=6, num_ppo_epochs=2, num_mini_batches=2, per_device_train_batch_size=2,
                                         learning_rate=3e-3, eval_steps=0, save_steps=1, gradient_checkpointing=True,
                                         output_dir=str(tmp_path / name / "ppo")))

    killed = cfg("killed")
    assert not run_ppo(killed, stop_after=1).finished
    resumed = run_ppo(killed, resume=True)
    straight = run_ppo(cfg("straight"))
    for role in ("policy", "value"):
        a = load_file(f"{resumed.artifacts[role]}/adapter_model.safetensors")
        b = load_file(f"{straight.artifacts[role]}/adapter_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


# --------------------------------------------------------------------------- score position


def test_ppo_scores_where_the_reward_model_was_trained_to_score(arch_assets):
    """ChatML: the reward stage (TRL's RewardTrainer tokenization, the sequence classifier
    with the reward LoRA and head) scores the last token of the templated conversation, the
    newline after <|im_end|>. PPO's score of the same text (prompt, response ending at
    <|im_end|>, then the template's suffix) is the same number (1e-5)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from trl.trainer.reward_trainer import _tokenize

    from rlhf.adapters import read_head, read_lora_weights
    from rlhf.config import PPOConfig, from_dict
    from rlhf.models import load_sequence_classifier, load_tokenizer

    assets = arch_assets("qwen2_tied")
    cfg = from_dict(PPOConfig, dict(assets, eval_prompts="", rollout_batch_size=8, num_mini_batches=1, per_device_train_batch_size=8))
    torch.manual_seed(0)
    model, tok, _ = _build_model(cfg, torch.device("cpu"))
    stop_ids = stop_token_ids(tok, cfg, model.base_lm)
    suffix = score_suffix(tok, stop_ids)
    assert tok.decode(suffix) == "\n"

    # the reward stage's model: the base as a classifier, the reward LoRA and its head
    base = assets["model"]["name_or_path"]
    rtok = load_tokenizer(base)
    clf = load_sequence_classifier(base, rtok)
    state, lcfg = read_lora_weights(assets["reward_adapter"])
    clf = get_peft_model(clf, LoraConfig(r=lcfg["r"], lora_alpha=lcfg["lora_alpha"], target_modules=lcfg["target_modules"],
                                         lora_dropout=0.0))
    set_peft_model_state_dict(clf, state)
    head = read_head(assets["reward_adapter"])
    with torch.no_grad():
        score_layer = clf.base_model.model.score
        score_layer = score_layer.modules_to_save["default"] if hasattr(score_layer, "modules_to_save") else score_layer
        score_layer.weight.copy_(head["weight"])
    clf.eval()

    pairs = [([{"role": "user", "content": "write about cats"}], [{"role": "assistant", "content": "calm warm kind"}]),
             ([{"role": "user", "content": "a note"}], [{"role": "assistant", "content": "soft"}])]
    for prompt, chosen in pairs:
        ids = _tokenize(rtok, prompt + chosen)["input_ids"]
        with torch.no_grad():
            trl_score = clf(input_ids=torch.tensor([ids])).logits[0, 0] + float(head.get("bias", torch.zeros(1))[0])
        prompt_ids = encode_prompts(tok, [prompt], cfg.max_prompt_length)[0]
        assert ids[:len(prompt_ids)] == prompt_ids
        response = ids[len(prompt_ids): len(ids) - len(suffix)]
        assert response[-1] == tok.convert_tokens_to_ids("<|im_end|>")
        batch = Sampled(torch.tensor([prompt_ids]), torch.ones(1, len(prompt_ids), dtype=torch.long),
                        torch.tensor([response]), torch.ones(1, len(response)), torch.tensor([True]))
        with torch.no_grad():
            ppo_score = last_token_scores(model, "reward", batch, suffix)[0]
            at_stop = last_token_scores(model, "reward", batch)[0]
        assert (ppo_score - trl_score).abs() < 1e-5
        assert (at_stop - trl_score).abs() > 1e-3  # scoring the stop token instead is a different number


def test_an_unknown_logit_post_processing_is_refused(arch_model, monkeypatch):
    """An architecture whose forward post-processes logits in a way rlhf.models does not
    know is refused when the role model is built (here: Granite with its entry removed),
    instead of training on a distribution it does not sample from."""
    import rlhf.models
    from rlhf.ppo import LogitTransform

    monkeypatch.setattr(rlhf.models, "logit_transform", lambda model: LogitTransform())
    with pytest.raises(ValueError, match="'granite'.*post-processes logits"):
        arch_model("granite")
