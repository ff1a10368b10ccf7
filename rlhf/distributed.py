"""Multi-process helpers around accelerate's process group: rank, barriers, reductions.

Every stage runs unchanged in one process; under ``accelerate launch`` (or ``torchrun``)
the same code runs once per process and these helpers turn into collectives. Nothing here
starts processes (``rlhf.launch`` re-executes a command line under ``accelerate launch``);
the distribution engine (DDP, FSDP, DeepSpeed) is accelerate's.

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
Under ``pipelines/accelerate/fsdp2.yaml`` PPO shards its model itself with FSDP2
(``rlhf/fsdp.py``: ``shard_model``, ``full_params_for_generation``, ``full_state``); the
helpers here then skip the sharded parameters, whose gradients FSDP has already summed.

Several machines: the same helpers work across machines (ranks are global; only global
rank 0 writes), see ``rlhf.launch`` for the launch options.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
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
    "all_reduce_max",
    "gather_rows",
    "broadcast_object",
    "gather_objects",
    "sum_gradients",
    "clip_grad_norm",
    "broadcast_parameters",
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


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum of ``x`` over all processes (a new tensor)."""
    out = x.detach().clone()
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(out, op=dist.ReduceOp.MAX)
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

    Parameters sharded by FSDP2 (DTensors, see ``rlhf.fsdp``) are skipped: their gradients
    were already summed by FSDP's reduce-scatter in the backward.
    """
    if not is_distributed():
        return
    params = [p for p in params if not _is_dtensor(p)]
    if not params:
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
            if not _is_dtensor(p):  # FSDP shards were cut from equal weights (rlhf.fsdp.shard_model)
                dist.broadcast(p.data, src=src)


def clip_grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes FSDP2-sharded parameters; returns
    the total norm before clipping as a plain 0-dim tensor on the parameters' device, the
    same on every process (no host sync, so callers can batch it with other statistics).

    With sharded gradients torch computes the norm of the whole (global) gradient from
    the shards; all parameters must then be sharded alike (``rlhf.fsdp.shard_model``
    shards every parameter of the role model).
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if _is_dtensor(norm):
        norm = norm.full_tensor()
    return norm


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)
