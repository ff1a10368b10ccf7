"""``rlhf ... --launcher accelerate``: re-run an rlhf command line under ``accelerate launch``.

The CLI calls :func:`launch` when asked for several processes; each launched process then
runs the same command, and ``rlhf.distributed`` turns the stages' helpers into collectives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def accelerate_command(args: Sequence[str], config_file: str | os.PathLike | None = None,
                       num_processes: int | None = None, main_process_port: int | None = None) -> list[str]:
    """The ``accelerate launch ... -m rlhf ARGS`` command line for :func:`launch`.

    Without CUDA, ``--multi_gpu`` selects accelerate's torchrun launcher (one process per
    rank on this machine; ``--cpu`` would start a single process) and the processes then
    run on CPU with gloo.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
        if config_file is None:
            cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            if num_processes > 1:
                cmd += ["--multi_gpu"]
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", "rlhf", *args]


def launch(args: Sequence[str], config_file: str | os.PathLike | None = None, num_processes: int | None = None,
           env: dict[str, str] | None = None, main_process_port: int | None = None) -> int:
    """Run ``rlhf ARGS`` under ``accelerate launch`` and return its exit status.

    accelerate's launcher (torchrun underneath) stops every process when one fails and
    shows that process's traceback, so a failure on any rank ends the run with the error.

    Args:
        args: the rlhf command line without the launcher options, e.g.
            ``["run", "pipelines/tiny.yaml", "ppo.total_episodes=64"]``.
        config_file: one of ``pipelines/accelerate/*.yaml`` (None: accelerate's defaults).
        num_processes: overrides the config's process count.
        env: extra environment variables for the processes.
        main_process_port: rendezvous port (defaults to accelerate's, 29500).

    Raises:
        rlhf.config.ConfigError: if the config file does not exist.
    """
    from rlhf.config import ConfigError

    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--accelerate-config: file not found: {config_file}")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    cmd = accelerate_command(args, config_file, num_processes, main_process_port)
    child_env = dict(os.environ, **(env or {}))
    if not torch.cuda.is_available():
        child_env["ACCELERATE_USE_CPU"] = "true"
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(cmd, env=child_env).returncode
