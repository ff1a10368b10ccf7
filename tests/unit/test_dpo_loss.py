"""TRL's DPO losses, as our DPO stage configures them, on hand-worked log-probabilities.

The trainer's loss is fed given sequence log-probs: the policy's through a stand-in model
whose forward returns per-token log-probs, the reference's as precomputed columns. So the
numbers below are TRL's own loss code, with beta and loss_type set from our DPOConfig.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

# Two pairs; each completion has 2 tokens, whose log-probs split the sequence log-prob evenly.
#   pair 1: policy chosen -3, rejected -5; reference chosen -4, rejected -4
#   pair 2: policy chosen -6, rejected -2; reference chosen -5, rejected -3
POLICY_CHOSEN, POLICY_REJECTED = [-3.0, -6.0], [-5.0, -2.0]
REF_CHOSEN, REF_REJECTED = [-4.0, -5.0], [-4.0, -3.0]


def _trainer(tmp_path, **dpo):
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOTrainer

    from rlhf.config import DPOConfig, from_dict
    from rlhf.tasks.synthetic import build_tiny_tokenizer
    from rlhf.stages.dpo import trl_args

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id))
    cfg = from_dict(DPOConfig, {"output_dir": str(tmp_path / "dpo"), **dpo}, prefix="dpo")
    rows = [{"prompt": [{"role": "user", "content": "tell me about cats"}],
             "chosen": [{"role": "assistant", "content": "warm kind cats"}],
             "rejected": [{"role": "assistant", "content": "cold"}]}]
    trainer = DPOTrainer(model=model, ref_model=LlamaForCausalLM(model.config), args=trl_args(cfg, has_eval=False),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.precompute_ref_logps = True  # read the reference log-probs from the batch (given below)
    return trainer


def _loss(trainer) -> float:
    """TRL's loss on the two hand-made pairs above."""
    seq = torch.tensor(POLICY_CHOSEN + POLICY_REJECTED)  # (2B,): the B chosen rows first, then the rejected
    per_token = (seq / 2).unsqueeze(1).repeat(1, 2)  # (2B, 2): two completion tokens each

    def policy(**_):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {
        "input_ids": torch.ones(4, 3, dtype=torch.long),  # one prompt token, two completion tokens
        "attention_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1, 1]] * 4),
        "ref_chosen_logps": torch.tensor(REF_CHOSEN),
        "ref_rejected_logps": torch.tensor(REF_REJECTED),
    }
    return float(trainer._compute_loss(policy, inputs, return_outputs=False))


def test_sigmoid_loss_is_the_dpo_closed_form(tmp_path):
    beta = 0.5
    # -log sigmoid(beta * ((lc - rc) - (lr - rr))):
    #   pair 1: (-3 - -5) - (-4 - -4) = 2,  beta*2 = 1   -> log(1 + e^-1) = 0.313262
    #   pair 2: (-6 - -2) - (-5 - -3) = -2, beta*-2 = -1 -> log(1 + e^1)  = 1.313262
    #   mean over pairs: 0.813262
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert expected == pytest.approx(0.813262, abs=1e-6)
    assert _loss(_trainer(tmp_path, beta=beta, loss_type="sigmoid")) == pytest.approx(expected, abs=1e-5)


def test_ipo_loss_is_the_closed_form(tmp_path):
    beta = 0.25
    # IPO (Azar et al. 2023, eq. 17) as TRL computes it: log-ratios averaged per completion
    # token (2 tokens each here), then (delta - 1/(2 beta))^2 with 1/(2 beta) = 2:
    #   pair 1: chosen (-3 - -4)/2 = 0.5,  rejected (-5 - -4)/2 = -0.5, delta = 1  -> (1 - 2)^2 = 1
    #   pair 2: chosen (-6 - -5)/2 = -0.5, rejected (-2 - -3)/2 = 0.5,  delta = -1 -> (-1 - 2)^2 = 9
    #   mean: 5
    assert _loss(_trainer(tmp_path, beta=beta, loss_type="ipo")) == pytest.approx(5.0, abs=1e-5)


def test_hinge_loss_is_the_closed_form(tmp_path):
    beta = 1.0
    # SLiC hinge: relu(1 - beta * delta): pair 1 delta 2 -> relu(-1) = 0; pair 2 delta -2 -> 3; mean 1.5
    assert _loss(_trainer(tmp_path, beta=beta, loss_type="hinge")) == pytest.approx(1.5, abs=1e-5)


def test_win_rate_counts_ties_as_half():
    """DPO's win rate over SFT is the shared evaluation's (rlhf.evaluation), as PPO's."""
    from rlhf.evaluation import mean_se, win_rates

    def win_rate(new, old):
        return mean_se(win_rates([{"score": a} for a in new], [{"score": b} for b in old], "score"))

    # prompt 1: 1 > 0 win; prompt 2: 2 == 2 tie (1/2); prompt 3: 3 < 4 loss -> (1 + 0.5 + 0) / 3 = 0.5
    # s.e.: sample std of (1, 0.5, 0) is 0.5, over sqrt(3)
    mean, se = win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.5 / math.sqrt(3))
    assert win_rate([1.0, 1.0], [0.0, 0.5]) == (1.0, 0.0)
    # a prompt without a value on either side is left out, not counted as a loss
    assert win_rates([{"score": 1.0}, {"score": None}], [{"score": 0.0}, {"score": 5.0}], "score") == [1.0]
