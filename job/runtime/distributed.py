"""torch.distributed helpers for the per-worker loop: device, backend, DDP, cross-rank values.

Nothing here imports Ray: Ray Train sets up the process group; these only use it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from job.console import say
from job.errors import UsageError


def backend_for(use_gpu: bool) -> str:
    """NCCL between GPUs, gloo between CPU workers."""
    return "nccl" if use_gpu else "gloo"


def select_device(use_gpu: bool, gpu_index: int = 0) -> torch.device:
    """The device a worker trains on; asking for a GPU where none is visible is an error."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError("--use-gpu was given but this worker sees no CUDA GPU; drop --use-gpu or add GPUs")
    return torch.device("cuda", gpu_index)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(message: str) -> None:
    """One status line from rank 0 only (the only rank in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        say(message)


def wrap_ddp(
    model: nn.Module, device: torch.device, stream: torch.cuda.Stream | None = None, force: bool = False
) -> nn.Module:
    """DDP across the ranks (gradients averaged every step); the plain model on one rank.

    `stream`: a CUDA side stream to build DDP on, the one that later warms up and captures the
    step as a CUDA graph (PyTorch's CUDA notes, "Usage with DistributedDataParallel").
    `force`: wrap at world size 1 too, to check the multi-rank path on one GPU.
    """
    if not (force or is_distributed()):
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    on_stream = contextlib.nullcontext()
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))  # the weights were made on the default stream
        on_stream = torch.cuda.stream(stream)
    with on_stream:
        # Gradients as views of DDP's buckets: no gradient-sized copy into them after each backward.
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks (itself on one rank)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def gather_objects(value: object) -> list:
    """`value` from every rank, in rank order (a list of one on one rank)."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: object) -> object:
    """Rank 0's `value` on every rank (itself on one rank)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
