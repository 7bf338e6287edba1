"""One epoch of training: every batch of one shard through a `Stepper`, in plain PyTorch.

It works on plain or DDP-wrapped networks and never asks for a rank: the caller hands it this
rank's indices and averages the returned sums across ranks itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from gan.step import STAT_NAMES
from gan.stepper import Stepper

__all__ = ["STAT_NAMES", "EpochTotals", "train_epoch"]


@dataclass(frozen=True)
class EpochTotals:
    """What one epoch on one shard adds up to; its mean over steps is `sums / steps`."""

    sums: torch.Tensor  # (len(STAT_NAMES),) per-step stats summed, still on the device
    steps: int  # optimizer steps taken


def train_epoch(
    stepper: Stepper,  # the networks, optimizers, EMA and training images, eager or graphed
    indices: torch.Tensor,  # this shard's image indices, in this epoch's order
    batch_size: int,  # images per step on this shard; the last batch may be smaller, but not a single image
    on_step: Callable[[int], None] | None = None,  # called with the steps done so far; None = silent
) -> EpochTotals:
    """Update G and D once per batch of `indices`; returns the summed step stats without waiting on the device."""
    # Slices of a device tensor are views: the batches are cut on the device, with no host sync.
    indices = indices.to(stepper.images_u8.device)
    stepper.sums.zero_()  # from zero, whatever an interrupted epoch left there
    steps = 0
    for start in range(0, indices.shape[0], batch_size):
        if indices.shape[0] - start == 1:
            break  # one image left: BatchNorm cannot train on a batch of one, so it waits for the next epoch
        stepper.step(indices[start : start + batch_size])
        steps += 1
        if on_step is not None:
            on_step(steps)
    return EpochTotals(stepper.take_sums(), steps)
