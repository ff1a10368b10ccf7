"""Preference pairs longer than train.max_length are counted, said at stage start, and
warned about above a fraction (TRL drops them from the reward model's sets, or truncates
them for DPO, without a word)."""

from __future__ import annotations

import warnings

import pytest

from rlhf.models import load_tokenizer
from rlhf.stages.common import count_long_pairs


def _row(n_words: int) -> dict:
    return {"prompt": [{"role": "user", "content": "tell me about cats"}],
            "chosen": [{"role": "assistant", "content": " ".join(["warm"] * n_words)}],
            "rejected": [{"role": "assistant", "content": "kind"}]}


def test_long_pairs_are_counted_printed_and_warned_above_the_threshold(tiny_assets, capsys):
    tok = load_tokenizer(str(tiny_assets.base))
    short, long = _row(2), _row(40)
    limit = len(tok(tok.apply_chat_template(short["prompt"] + short["chosen"], tokenize=False),
                    add_special_tokens=False).input_ids) + 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = count_long_pairs("reward", tok, [short] * 7 + [long] * 3, [long, short], limit, "drops")
    assert counts == {"train_pairs_too_long": 3, "test_pairs_too_long": 1}
    said = capsys.readouterr().out
    assert "[reward] reward: 3 of 10 training and 1 of 2 held-out pairs are longer than reward.train.max_length" in said
    assert len(caught) == 1 and "raise reward.train.max_length" in str(caught[0].message)
    # one long pair in 40: counted and said, under the warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counts = count_long_pairs("dpo", tok, [short] * 39 + [long], [], limit, "truncates")
    assert counts == {"train_pairs_too_long": 1, "test_pairs_too_long": 0}
    assert "TRL truncates them" in capsys.readouterr().out
    # nothing long: nothing said
    assert count_long_pairs("dpo", tok, [short], [short], limit, "truncates") == {
        "train_pairs_too_long": 0, "test_pairs_too_long": 0}
    assert capsys.readouterr().out == ""


def _conversation(words: list[str], n_exchanges: int, last_len: int) -> list[dict]:
    turns = [{"role": "system", "content": " ".join(words[:3])}]
    for i in range(n_exchanges):
        turns += [{"role": "user", "content": " ".join(words[i: i + 8])},
                  {"role": "assistant", "content": " ".join(words[i + 1: i + 9])}]
    return turns + [{"role": "user", "content": " ".join((words * 4)[20: 20 + last_len])}]


def test_a_long_held_out_pair_loses_early_turns_then_its_left_end(tiny_assets):
    from rlhf.stages.common import fit_pair, pair_ids
    from rlhf.tasks.synthetic import VOCABULARY

    tok = load_tokenizer(str(tiny_assets.base))
    words = list(VOCABULARY)
    prompt = _conversation(words, 6, 4)
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "warm kind"}],
           "rejected": [{"role": "assistant", "content": " ".join(words[:6])}]}
    kept = [prompt[0], *prompt[-5:]]  # the system turn, two exchanges, the last turn
    limit = max(map(len, pair_ids(tok, dict(row, prompt=kept))))
    assert max(map(len, pair_ids(tok, dict(row, prompt=[prompt[0], *prompt[-7:]])))) > limit
    chosen, rejected, cut = fit_pair(tok, row, limit)
    assert cut and (chosen, rejected) == pair_ids(tok, dict(row, prompt=kept))  # both sides lose the same turns
    # a pair that fits is untouched
    assert fit_pair(tok, row, 10_000) == (*pair_ids(tok, row), False)
    # the system and the last turn alone are too long: the last tokens stay (the scored one among them)
    long_last = dict(row, prompt=_conversation(words, 1, 60))
    full_chosen, full_rejected = pair_ids(tok, long_last)
    chosen, rejected, cut = fit_pair(tok, long_last, 20)
    assert cut and (chosen, rejected) == (full_chosen[-20:], full_rejected[-20:])


def test_held_out_scoring_keeps_every_pair_and_scores_as_trl_does(tiny_assets, tmp_path):
    """TRL's RewardTrainer drops the held-out pairs longer than max_length; score_heldout
    scores all of them (the long ones shortened), batched by TRL's collator exactly as one
    pair at a time, on the ids TRL builds."""
    import datasets
    import torch
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    from rlhf.models import load_sequence_classifier
    from rlhf.stages.common import fit_pair, pair_ids
    from rlhf.stages.reward import score_heldout
    from rlhf.tasks.synthetic import VOCABULARY

    tok = load_tokenizer(str(tiny_assets.base))
    torch.manual_seed(0)
    model = load_sequence_classifier(str(tiny_assets.base), tok)
    words = list(VOCABULARY)
    rows = [{"prompt": [{"role": "user", "content": " ".join(words[i: i + 3])}],
             "chosen": [{"role": "assistant", "content": " ".join(words[i + 3: i + 5 + i % 3])}],
             "rejected": [{"role": "assistant", "content": " ".join(words[i + 7: i + 8])}]} for i in range(9)]
    rows += [{"prompt": _conversation(words[i:], 6, 4), "chosen": rows[i]["chosen"], "rejected": rows[i]["rejected"]}
             for i in range(3)]
    limit = 40
    assert [max(map(len, pair_ids(tok, r))) > limit for r in rows] == [False] * 9 + [True] * 3
    args = TRLRewardConfig(output_dir=str(tmp_path), per_device_eval_batch_size=4, max_length=limit, report_to="none",
                           use_cpu=True, dataset_num_proc=None)
    data = datasets.Dataset.from_list(rows)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    kept = trainer.eval_dataset
    assert len(kept) == 9  # what TRL's own evaluation sees
    assert [list(x) for x in kept["chosen_ids"]] == [pair_ids(tok, r)[0] for r in rows[:9]]
    assert [list(x) for x in kept["rejected_ids"]] == [pair_ids(tok, r)[1] for r in rows[:9]]

    got = score_heldout(trainer, tok, rows, limit)

    def score(ids: list[int]) -> float:  # one sequence, no padding
        with torch.no_grad():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

    margins = [score(c) - score(r) for c, r, _ in (fit_pair(tok, row, limit) for row in rows)]
    assert got["heldout_pairs"] == 12 and got["heldout_truncated"] == 3
    assert got["heldout_correct"] == sum(m > 0 for m in margins)
    assert got["heldout_accuracy"] == got["heldout_correct"] / 12
    assert abs(got["heldout_margin"] - sum(margins) / 12) < 1e-5
    # TRL's own evaluation: the 9 pairs that fit, in order, in batches of 4, 4 and 1, its
    # accuracy and margin the mean of the batch means (the last pair weighs a third)
    ev = trainer.evaluate()
    batches = [margins[0:4], margins[4:8], margins[8:9]]
    assert ev["eval_accuracy"] == pytest.approx(sum(sum(m > 0 for m in b) / len(b) for b in batches) / 3)
    assert ev["eval_margin"] == pytest.approx(sum(sum(b) / len(b) for b in batches) / 3, rel=0.02)  # float32 sums
