"""Every accelerate config in pipelines/accelerate/ is loaded and validated the way
`accelerate launch` does it, documents itself, and PPO is refused where unsupported."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import distributed as dist
from rlhf.config import ConfigError
from rlhf.launch import accelerate_command, launch
from rlhf.fsdp import check_engine_supported

ACCEL = Path(__file__).resolve().parents[2] / "pipelines" / "accelerate"
CONFIGS = sorted(ACCEL.glob("*.yaml"))
# file -> (engine the launched processes see, whether PPO runs under it)
EXPECTED = {
    "single_gpu.yaml": ("none", True),
    "ddp.yaml": ("ddp", True),
    "fsdp2.yaml": ("fsdp", True),
    "deepspeed_zero2.yaml": ("deepspeed-zero2", True),
    "deepspeed_zero3.yaml": ("deepspeed-zero3", False),
}


def test_the_expected_configs_exist():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


def _launch_env(path: Path) -> dict:
    """Parse and validate ``path`` with accelerate's own launcher code and return the
    environment its processes would get."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "rlhf", "run", "x.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults is not None
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        env = {}
    if args.num_processes > 1:
        env["WORLD_SIZE"] = str(args.num_processes)
    return env


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # unknown or mistyped keys raise here
    assert cfg.num_machines == 1 and cfg.num_processes >= 1
    assert cfg.mixed_precision == "no"  # precision comes from the recipe, not the launcher
    env = _launch_env(path)
    for key in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        if key in env:
            monkeypatch.setenv(key, str(env[key]))
    engine, ppo_ok = EXPECTED[path.name]
    assert dist.engine() == engine
    if ppo_ok:
        check_engine_supported()
    else:
        with pytest.raises(ConfigError, match=engine):
            check_engine_supported()
    if path.name == "fsdp2.yaml":
        assert str(cfg.fsdp_config["fsdp_version"]) == "2"
    if path.name.startswith("deepspeed_zero"):
        assert cfg.deepspeed_config["zero_stage"] == int(path.stem[-1])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_when_to_use_and_the_command(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert "Use when:" in text
    rel = f"pipelines/accelerate/{path.name}"
    assert f"--launcher accelerate --accelerate-config {rel}" in text
    assert f"accelerate launch --config_file {rel}" in text
    if not EXPECTED[path.name][1]:
        assert "NOT supported: PPO" in text
        assert "fsdp2.yaml" in text  # where to go instead


def test_accelerate_command_line(tmp_path):
    cfg = ACCEL / "ddp.yaml"
    cmd = accelerate_command(["run", "pipelines/tiny.yaml", "ppo.total_episodes=64"], cfg, 2)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(cfg)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-5:] == ["-m", "rlhf", "run", "pipelines/tiny.yaml", "ppo.total_episodes=64"]
    with pytest.raises(ConfigError, match="not found"):
        launch(["run", "x.yaml"], tmp_path / "missing.yaml", 2)


def test_single_process_helpers():
    import torch

    from rlhf import ppo as F

    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.is_distributed()) == (0, 1, True, False)
    assert dist.rank_seed(5, 0) == 5 and dist.rank_seed(5, 1) != dist.rank_seed(5, 0)
    assert dist.shard_bounds(8, 1, 2) == (4, 8)
    with pytest.raises(ValueError, match="evenly"):
        dist.shard_bounds(7, 0, 2)
    x, m = torch.randn(3, 5), torch.ones(3, 5)
    m[0, 3:] = 0
    torch.testing.assert_close(F.masked_whiten(x, m, all_reduce=dist.all_reduce_sum), F.masked_whiten(x, m), rtol=0, atol=0)


def test_deepspeed_configs_without_deepspeed_fail_before_launching(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        with pytest.raises(ConfigError, match=r"deepspeed_zero.\.yaml: .*not installed.*rlhf\[deepspeed\]"):
            launch(["run", "x.yaml"], ACCEL / name, 2)


def test_ppo_under_zero3_points_to_fsdp2(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="fsdp2.yaml"):
        check_engine_supported()
