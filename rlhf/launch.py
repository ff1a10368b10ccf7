"""``rlhf ... --launcher accelerate``: re-run an rlhf command line under ``accelerate launch``.

The CLI calls :func:`launch` when asked for several processes; each launched process then
runs the same command, and ``rlhf.distributed`` turns the stages' helpers into collectives.

Several machines: run the same command on every machine with ``--num-machines N``,
``--machine-rank R`` (0 .. N-1, 0 on the machine at ``--main-process-ip``),
``--main-process-ip IP`` and ``--main-process-port P``; ``--num-processes`` is then the total
over all machines (accelerate's convention). Only global rank 0 writes artifacts and
registers them, so the run directory and ``$RLHF_HOME`` must be on a filesystem every
machine sees (see README, "Several machines", and scripts/slurm_example.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch


def accelerate_command(args: Sequence[str], config_file: str | os.PathLike | None = None,
                       num_processes: int | None = None, main_process_port: int | None = None,
                       num_machines: int | None = None, machine_rank: int | None = None,
                       main_process_ip: str | None = None) -> list[str]:
    """The ``accelerate launch ... -m rlhf ARGS`` command line for :func:`launch`.

    Without CUDA, ``--multi_gpu`` selects accelerate's torchrun launcher (one process per
    rank on this machine; ``--cpu`` would start a single process) and the processes then
    run on CPU with gloo. ``num_processes`` counts processes on all machines.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
        if config_file is None:
            cmd += ["--num_machines", str(num_machines or 1), "--mixed_precision", "no", "--dynamo_backend", "no"]
            if num_processes > 1:
                cmd += ["--multi_gpu"]
    if num_machines is not None and (config_file is not None or num_processes is None):
        cmd += ["--num_machines", str(num_machines)]
    if machine_rank is not None:
        cmd += ["--machine_rank", str(machine_rank)]
    if main_process_ip is not None:
        cmd += ["--main_process_ip", main_process_ip]
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", "rlhf", *args]


def launch(args: Sequence[str], config_file: str | os.PathLike | None = None, num_processes: int | None = None,
           env: dict[str, str] | None = None, main_process_port: int | None = None, num_machines: int | None = None,
           machine_rank: int | None = None, main_process_ip: str | None = None) -> int:
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
        num_machines: machines taking part (each runs this same command); overrides the config's.
        machine_rank: this machine's rank, 0 .. num_machines - 1 (0 hosts the rendezvous).
        main_process_ip: address of machine 0, reachable from every machine.

    Raises:
        rlhf.config.ConfigError: if the config file does not exist or the machine options
            are inconsistent (named in the message).
    """
    from rlhf.config import ConfigError

    if config_file is not None and not Path(config_file).is_file():
        raise ConfigError(f"--accelerate-config: file not found: {config_file}")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if num_machines is not None and num_machines < 1:
        raise ConfigError(f"--num-machines must be at least 1, got {num_machines}")
    if num_machines is not None and num_machines > 1:
        if machine_rank is None or main_process_ip is None:
            raise ConfigError("--num-machines > 1 needs --machine-rank and --main-process-ip (the address of machine 0)")
        if num_processes is not None and num_processes % num_machines:
            raise ConfigError(f"--num-processes {num_processes} (the total over all machines) must be a multiple of "
                              f"--num-machines {num_machines}")
    if machine_rank is not None and not 0 <= machine_rank < (num_machines or 1):
        raise ConfigError(f"--machine-rank must be in 0..{(num_machines or 1) - 1}, got {machine_rank}")
    _check_engine_installed(config_file)
    cmd = accelerate_command(args, config_file, num_processes, main_process_port, num_machines, machine_rank,
                             main_process_ip)
    child_env = dict(os.environ, **(env or {}))
    if not torch.cuda.is_available():
        child_env["ACCELERATE_USE_CPU"] = "true"
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(cmd, env=child_env).returncode


def _check_engine_installed(config_file: str | os.PathLike | None) -> None:
    """Fail before launching when the config's engine is not installed (DeepSpeed is an
    optional extra), instead of one traceback per process."""
    import importlib.util

    import yaml

    from rlhf.config import ConfigError

    if config_file is None:
        return
    cfg = yaml.safe_load(Path(config_file).read_text()) or {}
    if cfg.get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{config_file}: distributed_type DEEPSPEED needs deepspeed, which is not installed "
                          "(pip install 'rlhf[deepspeed]', CUDA only); on CPU, or to shard without DeepSpeed, use "
                          "pipelines/accelerate/fsdp2.yaml")
