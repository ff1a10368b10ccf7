"""Pickle-free training state: nested states round-trip, checkpoints appear whole or not at all."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rlhf.checkpoint import (
    complete_checkpoints,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
    write_checkpoint_dir,
)


def test_nested_state_round_trips(tmp_path):
    state = {"a": torch.arange(3.0), "b": {"c": (1, 2.5, None, "x"), 7: [torch.ones(2, 2), True]}, "n": 4}
    save_state(state, tmp_path, "state")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    got = load_state(tmp_path, "state")
    assert torch.equal(got["a"], state["a"]) and got["n"] == 4
    assert got["b"]["c"] == (1, 2.5, None, "x")  # a tuple stays a tuple
    assert torch.equal(got["b"][7][0], torch.ones(2, 2)) and got["b"][7][1] is True  # int keys stay ints


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="set"):
        save_state({"bad": {1, 2}}, tmp_path, "state")


def test_optimizer_state_restores_the_same_next_step(tmp_path):
    """Adam's state (step counts, moments) saved and loaded into a fresh optimizer: the next
    step is bit-identical to the uninterrupted one."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    save_state({"optimizer": opt.state_dict(), "w": w.detach()}, tmp_path, "s")

    opt.zero_grad()
    (w ** 2).sum().backward()
    opt.step()
    want = w.detach().clone()

    state = load_state(tmp_path, "s")
    w2 = torch.nn.Parameter(state["w"].clone())
    opt2 = torch.optim.Adam([w2], lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    opt2.zero_grad()
    (w2 ** 2).sum().backward()
    opt2.step()
    assert torch.equal(w2.detach(), want)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_state({"rng": rng_state()}, tmp_path, "s")
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_state(tmp_path, "s")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_a_failed_writer_leaves_no_checkpoint(tmp_path):
    write_checkpoint_dir(tmp_path, "update-2", lambda d: (d / "x").write_text("2"))
    write_checkpoint_dir(tmp_path, "update-10", lambda d: (d / "x").write_text("10"))

    def dies(d):
        (d / "x").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_checkpoint_dir(tmp_path, "update-12", dies)
    (tmp_path / "update-11").mkdir()  # a directory without COMPLETE is not a checkpoint
    found = complete_checkpoints(tmp_path, "update")
    assert [n for n, _ in found] == [2, 10]  # numeric order, not string order
    assert (found[-1][1] / "x").read_text() == "10"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
