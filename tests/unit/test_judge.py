"""The default judge (rlhf/judge.py): the policy's agreement with the reward model's held-out pairs."""

from __future__ import annotations

import json
import types

import pytest
import torch
import yaml

from rlhf.config import ConfigError, PPOConfig
from rlhf.judge import PairJudge, agreement, heldout_pairs


def test_agreement_counts_ties_as_half():
    # chosen gained more, less, as much, more: (1 + 0 + 0.5 + 1) / 4
    assert agreement(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)
    assert agreement(torch.zeros(5)) == 0.5  # the SFT policy against itself


def _pairs(n: int) -> list[dict]:
    words = ["warm", "kind", "dull", "cold", "very", "then"]
    return [{"prompt": [{"role": "user", "content": f"describe {t}"}],
             "chosen": [{"role": "assistant", "content": f"{words[i % 2]} {words[(i + 1) % 2]} {t}" + " very" * (i // 8)}],
             "rejected": [{"role": "assistant", "content": f"{words[2 + i % 2]} very {t} then"}]}
            for i, t in enumerate(["cats", "dogs", "rain", "coffee", "music", "trains", "books", "gardens"] * (n // 8))]


def test_heldout_pairs_are_the_test_split_of_the_adapters_dataset(tmp_path):
    import reward_data

    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in _pairs(64)))
    info = reward_data.ingest([src], "judge-pairs", test_fraction=0.25)
    ref = f"{info.name}:{info.version}"
    adapter = tmp_path / "reward"
    adapter.mkdir()
    assert heldout_pairs(str(adapter), 100) == []  # no config.yaml: no pairs
    (adapter / "config.yaml").write_text(yaml.safe_dump({"dataset": ref}))
    test = [r for r in reward_data.read_split(ref, "test")]
    got = heldout_pairs(str(adapter), 100)
    assert 0 < len(got) == len(test) < 64
    assert [g["chosen"] for g in got] == [t["chosen"] for t in test]
    train_prompts = {json.dumps(r["prompt"]) for r in reward_data.read_split(ref, "train")}
    assert not any(json.dumps(g["prompt"]) in train_prompts for g in got)  # held out by prompt
    assert len(heldout_pairs(str(adapter), 3)) == 3


def test_pair_judge_follows_the_policys_shift_and_is_the_default_without_an_objective(tiny_assets):
    """The policy starts as the SFT policy: agreement exactly 0.5, margin 0. Trained to raise
    its chosen responses' log-probabilities over the rejected ones, it agrees with the pairs;
    trained the other way, it disagrees (a judge that swapped chosen and rejected fails)."""
    from rlhf.adapters import RoleModel
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.scoring import response_logprobs
    from rlhf.watchdog import watchdog_judge

    tok = load_tokenizer(str(tiny_assets.base))
    pairs = _pairs(16)
    results = {}
    for direction in (1.0, -1.0):
        model = RoleModel(load_causal_lm(str(tiny_assets.base), tok), str(tiny_assets.sft_adapter),
                          str(tiny_assets.reward_adapter))
        model.eval()
        judge = PairJudge.build(tok, pairs, max_prompt_length=32, response_length=16, temperature=0.7,
                                device=torch.device("cpu"), chunk=8)
        start = judge(model)
        assert (start["judge/pairs_agreement"], start["judge/pairs_margin"], start["judge/pairs"]) == (0.5, 0.0, 16.0)
        params = model.trainable_parameters("policy")
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(10):
            loss = 0.0
            with model.role("policy"):
                for c, r in judge.batches:
                    lc, _ = response_logprobs(model, "policy", c, 0.7)
                    lr_, _ = response_logprobs(model, "policy", r, 0.7)
                    loss = loss - direction * ((lc * c.response_mask).sum() - (lr_ * r.response_mask).sum())
            loss.backward()
            opt.step()
            opt.zero_grad()
        results[direction] = judge(model)
    assert results[1.0]["judge/pairs_agreement"] > 0.8 and results[1.0]["judge/pairs_margin"] > 0
    assert results[-1.0]["judge/pairs_agreement"] < 0.2 and results[-1.0]["judge/pairs_margin"] < 0

    # which judge the watchdog takes: the objective first, the pairs without one
    s = types.SimpleNamespace(model=model, tok=tok, device=torch.device("cpu"))
    cfg = PPOConfig(reward_adapter="/nonexistent", response_length=16, max_prompt_length=32)
    assert watchdog_judge(cfg, lambda p, c: 0.0, s) == "gold"
    assert watchdog_judge(cfg, None, s) is None  # no pairs recorded: no judge under auto
    with pytest.raises(ConfigError, match="watchdog_judge: pairs"):
        watchdog_judge(PPOConfig(reward_adapter="/nonexistent", watchdog_judge="pairs"), lambda p, c: 0.0, s)


def test_summary_reports_the_judge_and_kl_per_judge_gain():
    from rlhf.summary import _judge as _judge_summary

    m = {"initial/watchdog/judge": 0.5, "final/watchdog/judge": 0.6, "initial/judge/pairs_agreement": 0.5}
    out = _judge_summary(m, "", kl=0.8)
    assert out["judge"] == "pairs" and out["judge_gain"] == pytest.approx(0.1)
    assert out["kl_per_judge_gain"] == pytest.approx(8.0)  # 0.8 nats per 0.1 of agreement
    worse = _judge_summary({**m, "final/watchdog/judge": 0.4}, "", kl=0.8)
    assert worse["judge_gain"] == pytest.approx(-0.1) and worse["kl_per_judge_gain"] is None  # no KL buys a loss
    objective = _judge_summary({"initial/watchdog/judge": 0.1, "final/watchdog/judge": 0.3}, "", kl=0.5)
    assert objective["judge"] == "objective" and objective["kl_per_judge_gain"] == pytest.approx(2.5)
    assert _judge_summary({"initial/watchdog/judge": 0.1, "final/watchdog/judge": 0.3}, "f.py:j", 0.5)["judge"] == "function"
    assert _judge_summary({}, "", kl=0.8) == {}


def test_the_watchdog_sees_the_pairs_agreement_as_its_judge():
    """With the pairs judge, watch_metrics' judge is the agreement (not the rows' gold), and the
    judge's numbers are logged beside it."""
    from rlhf.watchdog import watch_metrics

    class Scored(PairJudge):
        def __call__(self, model):
            return {"judge/pairs_agreement": 0.625, "judge/pairs_margin": 0.3, "judge/pairs": 8.0}

    s = types.SimpleNamespace(sources=[], eval_prompts=[[{"role": "user", "content": "p"}]] * 2,
                              eval_metadata=[{}, {}], model=None)
    rows = [{"prompt": "p", "completion": "c", "stopped": True, "score": s_, "gold": -5.0} for s_ in (1.0, 2.0)]
    ev = watch_metrics(s, PPOConfig(), rows, Scored([], 0.7))
    assert ev == {"watchdog/reward": 1.5, "watchdog/judge": 0.625, "judge/pairs_agreement": 0.625,
                  "judge/pairs_margin": 0.3, "judge/pairs": 8.0}
