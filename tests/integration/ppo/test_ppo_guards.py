"""Guards stop a PPO run on NaN, KL explosion, entropy collapse and length collapse or
blow-up, naming the metric and its value, and leave the last good checkpoint untouched."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

import rlhf.checkpoint
from rlhf.adapters import RoleModel
from rlhf.stages.ppo import GuardTripped, run_ppo


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_until_guard(cfg, monkeypatch, arm) -> tuple[GuardTripped, Path, dict]:
    """Run 2 updates with a checkpoint after each; ``arm(cfg)`` is called once update-1 is
    on disk, so update 2 is the one that trips. Returns the error, update-1's directory
    and its file digests taken right after it was written."""
    written: dict = {}
    original = rlhf.checkpoint.write_checkpoint_dir

    def spy(root, name, writer):
        d = original(root, name, writer)
        written[name] = (d, _tree_digest(d))
        if name == "update-1":
            arm(cfg)
        return d

    monkeypatch.setattr(rlhf.checkpoint, "write_checkpoint_dir", spy)
    with pytest.raises(GuardTripped) as err:
        run_ppo(cfg)
    assert list(written) == ["update-1"], "the guard must trip on update 2, before its checkpoint"
    d, digest = written["update-1"]
    return err.value, d, digest


def _assert_stopped_cleanly(cfg, ckpt: Path, digest: dict) -> None:
    out = Path(cfg.output_dir)
    assert _tree_digest(ckpt) == digest  # the last good checkpoint, byte for byte
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["update-1"]  # no update-2, no temp dirs
    assert not (out / "policy").exists() and not (out / "metrics.json").exists()  # nothing published


def _set(**values):
    def arm(cfg):
        for k, v in values.items():
            setattr(cfg, k, v)
    return arm


@pytest.mark.parametrize("arm, metric, words", [
    (_set(guard_min_entropy=1e9), "entropy/mean", "below guard_min_entropy"),
    (_set(guard_min_length=1e6), "response/length_mean", "below guard_min_length"),
    (_set(guard_max_length_fraction=0.01, guard_length_patience=1), "response/length_mean", "above"),
], ids=["entropy_collapse", "length_collapse", "length_blowup"])
def test_guard_stops_run_and_keeps_checkpoint(arm, metric, words, ppo_config, monkeypatch):
    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, save_steps=1, response_length=6)
    err, ckpt, digest = _run_until_guard(cfg, monkeypatch, arm)
    assert err.metric == metric
    assert metric in str(err) and words in str(err) and f"{err.value:.6g}" in str(err)
    _assert_stopped_cleanly(cfg, ckpt, digest)


def test_kl_explosion_guard(ppo_config, monkeypatch):
    """KL is exactly 0 on update 1 (policy == sft) and positive once the policy moved."""
    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, save_steps=1, response_length=6, kl_estimator="k3",
                     learning_rate=1e-2, guard_max_kl=1e-6)
    err, ckpt, digest = _run_until_guard(cfg, monkeypatch, lambda cfg: None)
    assert err.metric == "kl/mean" and err.value > 1e-6
    assert "kl/mean" in str(err) and "guard_max_kl" in str(err)
    _assert_stopped_cleanly(cfg, ckpt, digest)


def test_nan_reward_stops_run(ppo_config, monkeypatch):
    """A reward head that starts returning NaN stops the run before any weight is updated
    with it; the message names the non-finite metric."""
    armed = {"on": False}
    original = RoleModel.values

    def values(self, role, hidden):
        out = original(self, role, hidden)
        return torch.full_like(out, math.nan) if armed["on"] and role == "reward" else out

    monkeypatch.setattr(RoleModel, "values", values)
    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, save_steps=1, response_length=6)
    err, ckpt, digest = _run_until_guard(cfg, monkeypatch, lambda cfg: armed.update(on=True))
    assert math.isnan(err.value)
    assert err.metric in str(err) and "nan" in str(err) and "not finite" in str(err)
    _assert_stopped_cleanly(cfg, ckpt, digest)


def test_length_guard_default_lets_a_run_that_hits_the_limit_train(ppo_config):
    """A policy whose responses nearly all run to response_length (2 tokens here) is healthy:
    the default length guard must not stop it at its first update. The premise is checked
    (mean length above 95% of the limit, the old default's trip point)."""
    from test_ppo_update import read_metrics

    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, response_length=2)
    assert run_ppo(cfg).finished
    lengths = [m["response/length_mean"] for m in read_metrics(Path(cfg.output_dir))]
    assert len(lengths) == 2 and min(lengths) > 0.95 * cfg.response_length


@pytest.mark.parametrize("patience, trips", [(2, True), (3, False)])
def test_length_guard_trips_only_when_sustained(patience, trips, ppo_config):
    """Set, the guard trips once the excess lasted ``guard_length_patience`` updates in a row."""
    cfg = ppo_config(total_episodes=8, rollout_batch_size=4, response_length=2, guard_max_length_fraction=0.5,
                     guard_length_patience=patience)
    if trips:
        with pytest.raises(GuardTripped, match="2 updates in a row"):
            run_ppo(cfg)
    else:
        assert run_ppo(cfg).finished


@pytest.mark.parametrize("keep, expected", [(0, ["update-1", "update-2", "update-3"]), (1, ["update-3"]),
                                            (2, ["update-2", "update-3"])])
def test_keep_checkpoints(keep, expected, ppo_config):
    """save_total_limit N keeps the newest N checkpoints; 0 keeps every one (as its help says)."""
    from rlhf.config import PPOConfig

    assert "0 keeps every checkpoint" in PPOConfig.__dataclass_fields__["save_total_limit"].metadata["help"]
    cfg = ppo_config(total_episodes=12, rollout_batch_size=4, response_length=2, save_steps=1, save_total_limit=keep)
    run_ppo(cfg)
    root = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == expected


def test_length_guard_count_survives_resume(ppo_config):
    """The count of updates in a row above the length limit is checkpointed: one update,
    stop, resume; with patience 2 the guard trips on update 2 (a fresh count would wait
    for update 3), before update 2's checkpoint."""
    cfg = ppo_config(total_episodes=12, rollout_batch_size=4, response_length=2, save_steps=1,
                     guard_max_length_fraction=0.5, guard_length_patience=2)
    assert not run_ppo(cfg, stop_after=1).finished
    with pytest.raises(GuardTripped, match="2 updates in a row"):
        run_ppo(cfg, resume=True)
    assert sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir()) == ["update-1"]
