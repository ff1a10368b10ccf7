"""FSDP2 for our own PPO loop: shard the role model, gather it for generation and checkpoints.

SFT and reward run under accelerate's FSDP2 plugin (TRL's trainers prepare the model); PPO
is our own loop, so it shards its :class:`rlhf.adapters.RoleModel` here with torch's
``fully_shard`` (FSDP2) on the process group of ``rlhf.distributed``:

* :func:`shard_model` -- every decoder layer is one FSDP unit (its frozen base weights and
  the LoRA weights of all four roles), the rest (embeddings, final norm, LM head, score
  heads) is the root unit. Each process keeps ``1/world`` of every weight; a layer's full
  weights exist only while that layer runs. Gradients are summed over processes, not
  averaged, because the PPO losses are already normalised by the global token count
  (the same contract as :func:`rlhf.distributed.sum_gradients` under DDP).
* :func:`full_params_for_generation` -- ``generate`` runs a data-dependent number of decode
  steps per process (rows stop at different lengths), so per-layer all-gathers inside it
  would deadlock. The context all-gathers every unit once, keeps them unsharded for the
  whole rollout (one full copy per process, never more), and reshards on exit.
* :func:`full_state` -- checkpoints and adapters are written from full tensors on rank 0 and
  loaded as full tensors on every rank: inside the context parameters and Adam's state are
  plain full tensors; on exit each process writes its own chunk back into its shard.
* :func:`even_share` / :func:`gather_rollout` -- every FSDP forward and backward is a
  collective, so in the PPO update every process must run the same number of
  micro-batches. The rollout rows are gathered and each process takes an equal slice of
  each global minibatch; the summed gradient is the same as with DDP's uneven split.

Everything here is a no-op on a model that was not sharded, so the PPO stage calls it
unconditionally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import fields, replace

import torch
from torch import Tensor

from rlhf import distributed as dist

__all__ = ["is_sharded", "shard_model", "full_params_for_generation", "full_state", "even_share",
           "gather_rollout", "parameter_bytes"]


def _fsdp_units(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    """True when :func:`shard_model` has sharded ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module) -> None:
    """Shard a :class:`rlhf.adapters.RoleModel` over all processes with FSDP2, in place.

    Every process must hold the same weights before the call (each keeps its own chunk of
    its own copy), so the trainable LoRA roles and heads are broadcast from rank 0 first;
    the frozen base is loaded from the same files everywhere.

    After the call the parameters are DTensors (``Shard(0)``); build the optimizer on them
    afterwards (Adam's state is then sharded too).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_distributed():
        raise RuntimeError("shard_model needs several processes (launch with accelerate / torchrun)")
    dist.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    for layer in model.base_lm.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    # RoleModel's forwards are methods, not forward(): register them so the root unit
    # (embeddings, norm, LM head, score heads) is gathered when they run.
    for name in ("hidden_states", "lm_logits", "token_logprobs", "values"):
        register_fsdp_forward_method(model, name)
    for unit in _fsdp_units(model):
        # sum over processes (losses use the global token count); a plain SUM collective,
        # as gloo has no pre-multiplied sum
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # FSDP initialises its units on the first forward through the root; do it now, so that
    # full_params_for_generation may unshard the layers before any scoring forward ran.
    with torch.no_grad():
        one = torch.ones(1, 1, dtype=torch.long, device=next(model.parameters()).device)
        model.hidden_states(one, one)


@contextlib.contextmanager
def full_params_for_generation(model: torch.nn.Module) -> Iterator[None]:
    """Keep every FSDP unit unsharded inside the block (a collective on entry; call it on
    every process), so that ``generate`` and rank-0-only evaluation run without
    collectives; reshard on exit. A no-op for a model that is not sharded.

    Holds one full copy of the weights per process while inside.
    """
    if not is_sharded(model):
        yield
        return
    units = _fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True)
            unit.reshard()


def _local_chunk(full: Tensor, like) -> Tensor:
    """This process's chunk of ``full`` laid out as the DTensor ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Inside the block the model's parameters and ``optimizer``'s state are full, plain
    tensors on every process (a collective on entry; call it on every process).

    For checkpoints: rank 0 saves adapters and ``optimizer.state_dict()`` as in one
    process; loading writes into the full tensors, and on exit every process copies its
    chunk back into its shard (parameters and any optimizer state of a parameter's shape,
    including state created by ``optimizer.load_state_dict`` inside the block). Tied
    weights (embeddings and LM head) stay one tensor. A no-op for a model that is not sharded.
    """
    from torch.distributed.tensor import DTensor

    if not is_sharded(model):
        yield
        return
    full_of: dict[int, torch.nn.Parameter] = {}
    swapped: list[tuple[torch.nn.Module, str, DTensor]] = []
    for module in model.modules():  # same order on every process: the gathers line up
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full_of:
                    full_of[id(p)] = torch.nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                module._parameters[name] = full_of[id(p)]
                swapped.append((module, name, p))
    # FSDP's state-dict hooks expect its own sharded parameters on the modules; with full
    # tensors in place they must sleep (the shards are rewritten below instead).
    hooks = ("_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    stashed = [(m, h, getattr(m, h)) for m in model.modules() for h in hooks if getattr(m, h, None)]
    for m, h, _ in stashed:
        setattr(m, h, type(getattr(m, h))())
    sharded_params = [p for g in (optimizer.param_groups if optimizer else []) for p in g["params"]]

    def state_to(convert) -> None:
        for p in sharded_params:
            st = optimizer.state.get(p, {})
            for k, v in list(st.items()):
                st[k] = convert(p, v)

    state_to(lambda p, v: v.full_tensor() if isinstance(v, DTensor) else v)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, p in swapped:
                p.to_local().copy_(_local_chunk(full_of[id(p)], p).to_local())
                module._parameters[name] = p
        for m, h, saved in stashed:
            setattr(m, h, saved)
        state_to(lambda p, v: _local_chunk(v, p)
                 if isinstance(p, DTensor) and isinstance(v, Tensor) and not isinstance(v, DTensor)
                 and tuple(v.shape) == tuple(p.shape) else v)


def even_share(mb_idx: Tensor, rank: int, world: int) -> Tensor:
    """This rank's equal, contiguous slice of a global minibatch's row indices.

    Raises:
        ValueError: if the minibatch does not split evenly (every process must run the same
            number of forwards under FSDP).
    """
    lo, hi = dist.shard_bounds(mb_idx.numel(), rank, world)
    return mb_idx[lo:hi]


def gather_rollout(batch, *tensors: Tensor):
    """Every process's rollout rows, in rank order, on every process.

    Args:
        batch: this rank's :class:`rlhf.ppo.rollout.ScoredRollout` (rows ``[rank*B, (rank+1)*B)``
            of the global batch). Prompts are left-padded to the widest prompt over all
            processes first (positions come from the attention mask, so extra left padding
            does not change any forward).
        tensors: further per-row tensors ``(B, ...)`` (advantages, returns).

    Returns:
        The global batch and the gathered ``tensors`` (rows ``world*B``).
    """
    width = int(dist.all_reduce_max(torch.tensor(batch.prompt_ids.shape[1])))
    pad = width - batch.prompt_ids.shape[1]
    if pad:
        batch = replace(
            batch,
            prompt_ids=torch.nn.functional.pad(batch.prompt_ids, (pad, 0), value=0),
            prompt_mask=torch.nn.functional.pad(batch.prompt_mask, (pad, 0), value=0),
        )
    gathered = replace(batch, **{f.name: dist.gather_rows(getattr(batch, f.name)) for f in fields(batch)
                                 if getattr(batch, f.name) is not None})
    return (gathered, *(dist.gather_rows(t) for t in tensors))


def parameter_bytes(model: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of parameters this process holds (its shards when sharded).

    Args:
        trainable: True: only trainable (LoRA roles, value head); False: only frozen (the
            base, frozen roles); None: all.
    """
    from torch.distributed.tensor import DTensor

    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen or (trainable is not None and p.requires_grad != trainable):
            continue
        seen.add(id(p))
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def check_engine_supported(config_name: str = "ppo") -> None:
    """Refuse PPO under DeepSpeed ZeRO-3.

    PPO samples from the policy role between updates, which needs the sharded weights
    gathered; this loop does that with FSDP2 (``rlhf/fsdp.py``), not with DeepSpeed.
    Supported: one process, DDP, FSDP2 and ZeRO-1/2 configs (the LoRA loop then runs data
    parallel with summed gradients; LoRA optimizer state is small, so sharding it would
    save little).

    Raises:
        rlhf.config.ConfigError: naming the engine and what is supported.
    """
    from rlhf.config import ConfigError
    from rlhf.distributed import engine

    eng = engine()
    if eng == "deepspeed-zero3":
        raise ConfigError(
            f"{config_name}: PPO is not supported under {eng} (the policy samples between updates and this loop "
            "gathers sharded weights for generation only under FSDP2). To shard the base, launch PPO with "
            "pipelines/accelerate/fsdp2.yaml (or ddp.yaml / deepspeed_zero2.yaml if it fits on one device); "
            "SFT and reward run under every config in pipelines/accelerate/."
        )
