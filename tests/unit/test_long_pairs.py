"""Preference pairs longer than train.max_length are counted, said at stage start, and
warned about above a fraction (TRL drops them from the reward model's sets, or truncates
them for DPO, without a word)."""

from __future__ import annotations

import warnings

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
