"""Minibatch index plans."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import ppo_minibatch_indices


def test_minibatches_partition_the_batch():
    parts = ppo_minibatch_indices(64, 4, torch.Generator().manual_seed(0))
    assert len(parts) == 4
    assert all(p.shape == (16,) and p.dtype == torch.long for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(64))
    assert not torch.equal(torch.cat(parts), torch.arange(64))  # shuffled


def test_seeded_generator_replays_and_epochs_differ():
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    epoch1_a, epoch1_b = ppo_minibatch_indices(32, 4, gen_a), ppo_minibatch_indices(32, 4, gen_b)
    assert all(torch.equal(x, y) for x, y in zip(epoch1_a, epoch1_b))
    epoch2_a = ppo_minibatch_indices(32, 4, gen_a)
    assert not all(torch.equal(x, y) for x, y in zip(epoch1_a, epoch2_a))


def test_indivisible_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="10 is not divisible by num_minibatches 4"):
        ppo_minibatch_indices(10, 4)
    with pytest.raises(ValueError, match=">= 1"):
        ppo_minibatch_indices(8, 0)
