"""Multi-process helpers around accelerate's process group: rank, barriers, reductions.

Every stage runs unchanged in one process; under ``accelerate launch`` (or ``torchrun``)
the same code runs once per process and these helpers turn into collectives. Nothing here
starts processes itself except :func:`launch`, which re-executes a command line under
``accelerate launch`` -- the distribution engine (DDP, FSDP, DeepSpeed) is accelerate's.

The process group is created lazily by ``accelerate.PartialState`` the first time a helper
needs it, and only when the environment says there are several processes (``WORLD_SIZE``
> 1, as set by torchrun / accelerate launch). On a machine without CUDA the processes use
the gloo backend on CPU (``ACCELERATE_USE_CPU`` is set so that TRL's trainers agree).

PPO under data parallelism (see ``rlhf/stages/ppo.py`` and ``pipelines/accelerate/``):
each process generates its own share of the rollout, advantages are whitened with global
statistics (``rlhf.ppo.masked_whiten`` with
:func:`all_reduce_sum`), and the trainable LoRA gradients are summed across
processes (:func:`sum_gradients`) with every loss normalised by the global token count,
so one optimizer step equals the single-process step on the same global minibatch.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "rank",
    "world_size",
    "is_main",
    "is_distributed",
    "barrier",
    "main_first",
    "device",
    "engine",
    "rank_seed",
    "shard_bounds",
    "all_reduce_sum",
    "gather_rows",
    "broadcast_object",
    "gather_objects",
    "sum_gradients",
    "broadcast_parameters",
    "check_ppo_supported",
    "launch",
    "accelerate_command",
]

# Ranks are far apart in seed space so that rank r's generation seed for update u never
# equals another rank's seed for another update (updates stay well below this stride).
_RANK_SEED_STRIDE = 1_000_000_007


def _env_world_size() -> int:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key):
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 1


def _state():
    """The accelerate ``PartialState`` of a multi-process run, or None in a single process.

    Creating it initialises the process group (nccl on GPUs, gloo on CPU).
    """
    import torch.distributed as dist

    if _env_world_size() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return None
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        # TRL/transformers create their own PartialState from TrainingArguments; this flag
        # makes them pick the same CPU + gloo setup instead of a silent single process.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=cpu)


def is_distributed() -> bool:
    """True when this process is one of several (a process group exists)."""
    import torch.distributed as dist

    st = _state()
    return st is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Global rank of this process (0 in a single process)."""
    st = _state()
    return 0 if st is None else int(st.process_index)


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    st = _state()
    return 1 if st is None else int(st.num_processes)


def is_main() -> bool:
    """True on the process that writes files, registers artifacts and logs."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process reaches this point (no-op in a single process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the body on the main process first, then on the others.

    For work that writes a shared file once and reads it after (building the tiny base,
    ingesting preference data): the others find it done instead of racing to write it.
    """
    if not is_distributed():
        yield
        return
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


def device() -> torch.device:
    """This process's device: its own GPU under a multi-GPU launch, else cuda:0 or CPU."""
    st = _state()
    if st is not None:
        return torch.device(st.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def engine() -> str:
    """The distribution engine accelerate was launched with.

    Returns:
        ``"none"`` (one process), ``"ddp"`` (plain data parallel, GPU or CPU),
        ``"fsdp"``, or ``"deepspeed-zero<N>"``.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return f"deepspeed-zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    return "ddp" if _env_world_size() > 1 else "none"


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """A per-process seed: equal to ``seed`` on rank 0 (so one process reproduces the
    single-process run), different on every other rank (so ranks sample different data)."""
    r = rank() if rank_ is None else rank_
    return seed + r * _RANK_SEED_STRIDE


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of this rank's contiguous share of ``n`` items, which must divide evenly.

    Raises:
        ValueError: if ``n`` is not a multiple of the world size (a share would be lost
            or duplicated otherwise).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n % w:
        raise ValueError(f"{n} items cannot be split evenly over {w} processes")
    per = n // w
    return r * per, (r + 1) * per


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over all processes (a new tensor; ``x`` itself is untouched)."""
    out = x.detach().clone()
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate every process's ``x`` along dim 0, in rank order.

    Args:
        x: ``(rows, ...)`` with the same shape on every process.

    Returns:
        ``(world_size * rows, ...)``; ``x`` itself in a single process.
    """
    if not is_distributed():
        return x.detach()
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (JSON-like values; pickled in transit only)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every parameter's ``.grad`` by its sum over all processes, in place.

    The PPO loop normalises each loss by the global minibatch token count, so the sum
    of the per-process gradients is the gradient of the global minibatch. A process whose
    share of a minibatch was empty has no gradient; it takes part with zeros, and a
    parameter without a gradient on every process keeps ``grad=None`` (Adam then skips
    it, as it would in one process). One flat buffer, one all-reduce.
    """
    if not is_distributed():
        return
    dev = next(iter(params)).device
    has = all_reduce_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev))
    numel = sum(p.numel() for p in params)
    flat = torch.zeros(numel, dtype=torch.float32, device=dev)
    offset = 0
    for p in params:
        if p.grad is not None:
            flat[offset: offset + p.numel()] = p.grad.reshape(-1).float()
        offset += p.numel()
    import torch.distributed as dist

    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, h in zip(params, has.tolist()):
        if h > 0:
            p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def broadcast_parameters(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every process (start from equal weights)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def full_state_dict(trainer) -> dict[str, Tensor] | None:
    """The whole model's state dict of a TRL/transformers trainer whose weights are sharded.

    Under FSDP or DeepSpeed ZeRO-3 each process holds a shard only, so saving from the
    module would write empty tensors; accelerate gathers the full weights instead. This is
    a collective: call it on every process. (ZeRO-3 needs
    ``zero3_save_16bit_model: true`` in the accelerate config, as deepspeed_zero3.yaml has.)

    Returns:
        The gathered state dict (complete on rank 0), or None when nothing is sharded, in
        which case the model's own parameters are complete on every process.
    """
    eng = engine()
    if eng == "fsdp":
        return trainer.accelerator.get_state_dict(trainer.model)
    if eng == "deepspeed-zero3":
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def check_ppo_supported(config_name: str = "ppo") -> None:
    """Refuse PPO under an engine that shards the base weights.

    PPO samples from the policy role between updates; with FSDP or ZeRO-3 every
    generation step would need the full weights gathered, which this loop does not do.
    Supported: one process, DDP, and ZeRO-1/2 configs (the LoRA loop then runs data
    parallel with summed gradients; LoRA optimizer state is small, so sharding it would
    save little).

    Raises:
        rlhf.config.ConfigError: naming the engine and what is supported.
    """
    from rlhf.config import ConfigError

    eng = engine()
    if eng == "fsdp" or eng == "deepspeed-zero3":
        raise ConfigError(
            f"{config_name}: PPO is not supported under {eng} (the policy samples between updates and this loop does "
            "not gather sharded weights for generation). Launch PPO with pipelines/accelerate/ddp.yaml or "
            "deepspeed_zero2.yaml; SFT and reward run under every config in pipelines/accelerate/."
        )


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
