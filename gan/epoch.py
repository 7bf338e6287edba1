"""One epoch of training: every batch of one shard through `train_step`, in plain PyTorch.

It works on plain or DDP-wrapped networks and never asks for a rank: the caller hands it this
rank's indices and averages the returned sums across ranks itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gan.data import iterate_batches
from gan.step import GeneratorEMA, train_step

STAT_NAMES = ("loss_d", "loss_g", "d_real_prob", "d_fake_prob")  # the order of `EpochTotals.sums`


@dataclass(frozen=True)
class EpochTotals:
    """What one epoch on one shard adds up to; its mean over steps is `sums / steps`."""

    sums: torch.Tensor  # (len(STAT_NAMES),) per-step stats summed, still on the device
    steps: int  # optimizer steps taken


def train_epoch(
    generator: nn.Module,  # plain or DDP-wrapped
    discriminator: nn.Module,  # plain or DDP-wrapped
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    images_u8: torch.Tensor,  # (N, 1, 28, 28) uint8, on the networks' device
    indices: torch.Tensor,  # this shard's image indices, in this epoch's order
    batch_size: int,  # images per step on this shard; the last batch may be smaller
    noise_dim: int,  # length of each noise vector
    amp_dtype: torch.dtype | None = None,  # autocast dtype; None = float32 throughout
    ema: GeneratorEMA | None = None,  # updated after each step; None = no EMA
    on_step: Callable[[int], None] | None = None,  # called with the steps done so far; None = silent
    labels: torch.Tensor | None = None,  # (N,) class of each image, on the images' device; None = unconditional networks
) -> EpochTotals:
    """Update G and D once per batch of `indices`; returns the summed step stats without waiting on the device."""
    device = images_u8.device
    sums = torch.zeros(len(STAT_NAMES), device=device)
    steps = 0
    # Conditional: each batch comes with its labels; unconditional: None for them all the way down.
    if labels is not None:
        batches = iterate_batches(images_u8, indices, batch_size, labels)
    else:
        batches = ((images, None) for images in iterate_batches(images_u8, indices, batch_size))
    for real_images, real_labels in batches:
        noise = torch.randn(real_images.shape[0], noise_dim, device=device)
        stats = train_step(generator, discriminator, optimizer_g, optimizer_d, real_images, noise, amp_dtype, labels=real_labels)
        if ema is not None:  # the average follows the plain module, never the DDP wrapper
            ema.update(generator.module if isinstance(generator, DistributedDataParallel) else generator)
        sums += torch.stack([stats[name] for name in STAT_NAMES])
        steps += 1
        if on_step is not None:
            on_step(steps)
    return EpochTotals(sums, steps)
