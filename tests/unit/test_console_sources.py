"""The console's known warnings are fixed where they arise; artifacts follow the umask;
the final table names registry refs; PPO's explained variance, by hand."""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from rlhf.config import TrainArgs


def test_trl_arguments_raise_no_deprecation_and_pin_only_with_a_gpu(tmp_path):
    from trl import RewardConfig as TRLRewardConfig, SFTConfig as TRLSFTConfig

    from rlhf.stages.common import filter_supported, trl_training_kwargs

    for gradient_checkpointing in (False, True):
        kw = trl_training_kwargs(TrainArgs(gradient_checkpointing=gradient_checkpointing), tmp_path, 0, has_eval=True)
        assert kw["dataloader_pin_memory"] is torch.cuda.is_available()
        for cls in (TRLSFTConfig, TRLRewardConfig):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                args = cls(**filter_supported(cls, dict(kw, eos_token="<eos>")))
            assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
            assert args.gradient_checkpointing is gradient_checkpointing  # the option still takes effect


def test_loading_a_reward_model_prints_no_load_report_for_its_new_head(tiny_assets, caplog):
    from rlhf.models import load_sequence_classifier, load_tokenizer

    tok = load_tokenizer(str(tiny_assets.base))
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the head is the only missing weight
        model = load_sequence_classifier(str(tiny_assets.base), tok)
    assert model.score.weight.shape == (1, 64)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage() or "not sharded" in r.getMessage()]
    # transformers' own check of tensor-parallel plans keeps its (unchanged) logger level
    assert logging.getLogger("transformers.modeling_utils").filters == []


def test_a_missing_weight_other_than_the_head_is_still_reported(tiny_assets, tmp_path):
    from safetensors.torch import load_file, save_file

    from rlhf.models import classifier_from_pretrained

    broken = tmp_path / "base"
    broken.mkdir()
    for f in tiny_assets.base.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    dropped = next(k for k in state if k.endswith("layers.0.mlp.up_proj.weight"))
    del state[dropped]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(RuntimeWarning, match="up_proj"):
        classifier_from_pretrained(str(broken))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_published_artifacts_follow_the_umask(tmp_path, umask, mode):
    from rlhf.stages.common import publish

    old = os.umask(umask)
    try:
        path = publish(tmp_path, "adapter", lambda tmp: (tmp / "w.bin").write_bytes(b"x"), role="sft", base="b",
                       config={"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path(path).stat().st_mode) == mode
    assert stat.S_IMODE((Path(path) / "w.bin").stat().st_mode) == mode & 0o666
    assert json.loads((Path(path) / "rlhf_adapter.json").read_text())["role"] == "sft"


def test_explained_variance_by_hand():
    from rlhf.stages.ppo import explained_variance

    # real tokens: returns [1, 3] (mean 2, variance 1); errors returns - values = [0, 1]
    # (mean 0.5, variance 0.25): 1 - 0.25 / 1 = 0.75. The padded token (return 9) is ignored.
    values = torch.tensor([[1.0, 2.0, 0.0]])
    returns = torch.tensor([[1.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert explained_variance(values, returns, mask) == {"value/explained_variance": pytest.approx(0.75)}
    assert explained_variance(returns, returns, mask)["value/explained_variance"] == pytest.approx(1.0)
    assert explained_variance(values, torch.full_like(returns, 2.0), mask) == {}  # constant returns: undefined


def test_final_table_names_refs_and_next_commands(tmp_path, capsys):
    from rlhf.pipeline import print_summary

    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    stages = {
        "sft": {"outputs": {"adapter": "r-sft:3"}, "dirs": {"adapter": str(run_dir / "sft/adapter")}, "run": "r-sft-run:3"},
        "reward": {"outputs": {"adapter": "r-reward:2", "dataset": "pairs:1"},
                   "dirs": {"adapter": str(run_dir / "reward/adapter")}, "run": "r-reward-run:2"},
        "ppo": {"outputs": {"policy": "r-policy:5"}, "dirs": {"policy": str(run_dir / "ppo/policy")}, "run": "r-ppo-run:5"},
    }
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": stages, "registry_home": str(tmp_path / "h")}))
    print_summary({"sft_loss": 1.5}, run_dir)
    out = capsys.readouterr().out
    for ref in ("r-sft:3", "r-sft-run:3", "r-reward:2", "pairs:1", "r-policy:5", "r-ppo-run:5"):
        assert ref in out
    assert out.index("│ sft") < out.index("│ reward") < out.index("│ ppo")  # pipeline order
    home = f"--home {tmp_path / 'h'}"  # not the default home: the commands must name it
    assert f"rlhf registry export r-policy:5 exports/r-policy-5 {home}" in out
    assert f"rlhf generate r-policy:5 --prompt 'Hello' {home}" in out
    assert f"rlhf registry export r-reward:2 exports/r-reward-2 {home}" in out
    assert f"rlhf report '{run_dir}' --out '{run_dir / 'report.html'}'" in out  # quoted: the path has a space
    assert f"rlhf dashboard --runs-root {tmp_path}" in out


def test_pipeline_runs_are_registered_under_the_pipeline_name(tmp_path):
    from rlhf.registry import Registry

    reg = Registry.open(home=tmp_path)
    assert reg.start_run("sft", {}, inputs=[], pipeline="tiny", name="tiny-sft-run") == "tiny-sft-run:1"
    assert reg.start_run("sft", {}, inputs=[]) == "run-sft:1"
    with pytest.raises(ValueError):
        reg.start_run("sft", {}, inputs=[], name="bad/name")
