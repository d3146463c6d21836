"""Distributed training seam: the only module that creates process groups or wraps models (DDP, FSDP2).

A finished `GLMModel` is wrapped from outside in torchtitan's order: activation checkpointing, then
`torch.compile`, then FSDP2 (`fully_shard` per block, then the root) or DDP. Works with gloo on CPU and NCCL
on GPUs; launched by `torchrun`, which sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group described by torchrun's environment, or run as a single process.

    Args:
        device: `auto` (this rank's GPU when CUDA is available, else CPU), `cpu`, `cuda` or `cuda:N`.
        timeout_s: collective timeout; a rank that dies makes the others fail instead of hanging forever.

    Returns:
        The `DistEnv` of this process. Backend: NCCL on GPUs, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device a `--device` value names, checked against this machine.

    Args:
        device: `auto` (GPU `local_rank` when CUDA is available, else CPU), `cpu`, `cuda` (GPU `local_rank`),
            `cuda:N`, or another torch device string (`mps`).
        local_rank: this process's GPU under torchrun.

    Raises:
        ValueError: one line naming the value, for a malformed name or a GPU this machine does not have.
    """
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device {str(device)!r}: not a device name (cpu, cuda, cuda:N, mps, auto)"
        ) from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r}: openglm runs on cpu, cuda or mps, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r}: CUDA is not available here (a CPU build of torch, or no GPU visible); "
                "use cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device {str(device)!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available here; use cpu")
    return dev


def is_main() -> bool:
    """Whether this process is rank 0 of its torchrun job (or runs alone); usable before the group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def teardown() -> None:
    """Leave the process group (no-op when none was created)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, env: DistEnv) -> str:
    """`auto` means DDP on several ranks and no wrapping on one."""
    if strategy == "auto":
        return "ddp" if env.distributed else "none"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected auto or one of {STRATEGIES}")
    return strategy


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.transformer.layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block in the backward pass, keeping parameter names (no wrapper module in the keys)."""
    for block in _blocks(model):
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (`Module.compile` keeps the state-dict keys unchanged)."""
    for block in _blocks(model):
        block.compile()


def wrap_model(
    model: nn.Module,
    env: DistEnv,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Move `model` to this rank's device and wrap it: checkpointing, then compile, then FSDP2 or DDP.

    Args:
        model: a finished `GLMModel` (fp32 weights; mixed precision is autocast in the loop).
        env: from `init_distributed`.
        strategy: `auto`, `none`, `ddp` or `fsdp`.
        activation_checkpointing: recompute blocks in the backward pass.
        compile: `torch.compile` each block.

    Returns:
        The module to train (the DDP wrapper, or `model` itself, sharded in place by FSDP2).
    """
    strategy = resolve_strategy(strategy, env)
    if strategy != "none" and not env.distributed:
        log.info("strategy %s requested on a single process; training unwrapped", strategy)
        strategy = "none"
    model.to(env.device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        # Gradients live in the communication buckets: no second copy of them (what `openglm plan` assumes).
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying `GLMModel` of a DDP wrapper (FSDP2 shards in place, so it is the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that are not the last of an accumulation step."""
    if enabled:
        yield
        return
    if hasattr(model, "no_sync") and not is_sharded(model):
        with model.no_sync():
            yield
        return
    if is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity on one process). Returns a new tensor."""
    out = values.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_metrics(
    metrics: dict[str, float], device: torch.device, average: bool = True
) -> dict[str, float]:
    """Sum (or average) a dict of scalar metrics over ranks; every rank must pass the same keys."""
    if not (dist.is_available() and dist.is_initialized()) or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if average:
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_map(fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """`fn(items)`, computed data-parallel: each rank applies `fn` to its share of `items` (every
    world_size-th item from its rank, so long and short items spread evenly) and every rank gets all results
    in input order. `fn` maps a sequence to one picklable result per item. Collective: every rank calls it
    with the same items, and the model `fn` runs must not be sharded (each rank runs a different number of
    forward passes). Alone, or before the group exists, it is just `fn(items)`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(fn(items))
    rank, world = dist.get_rank(), dist.get_world_size()
    share = list(items)[rank::world]
    mine = list(fn(share))
    if len(mine) != len(share):
        raise RuntimeError(f"shard_map: fn returned {len(mine)} results for {len(share)} items")
    gathered: list[list[R] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    out: list[R] = [None] * len(items)  # type: ignore[list-item]  # every slot is filled below
    for r, part in enumerate(gathered):
        out[r::world] = part  # type: ignore[assignment]  # each rank returned its whole share
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s object on every rank (identity on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete, unsharded model state dict on CPU (collective under FSDP2: call on every rank)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(unwrap(model), options=opts)
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a complete state dict into a (possibly sharded) model; every rank passes the full dict."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with unsharded tensors on CPU (collective under FSDP2)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(unwrap(model), optimizer, options=opts)
    return optimizer.state_dict()


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
        return
    optimizer.load_state_dict(state)
