"""One epoch of training: every batch of one shard through a `Stepper`, in plain PyTorch.

It works on plain or DDP-wrapped networks and never asks for a rank: the caller hands it this
rank's indices (or batches) and averages the returned sums across ranks itself. `EpochShape` is the
one rule of how an epoch's images fall into each rank's batches, whether they are held in memory or streamed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from gan.step import STAT_NAMES
from gan.stepper import Stepper

__all__ = ["STAT_NAMES", "EpochShape", "EpochTotals", "index_batches", "step_batches", "train_epoch"]


@dataclass(frozen=True)
class EpochShape:
    """One rank's share of an epoch, the same on every rank: its images (`gan.data.shard_indices`), cut into batches
    of `batch_per_rank` with a smaller last one, except that a last batch of one image is left for the next epoch
    (BatchNorm cannot train on it)."""

    num_images: int  # the images of the data set an epoch draws from
    world_size: int
    multiple: int  # an epoch's images are a multiple of this (every world size an elastic run may take)
    batch_per_rank: int

    @property
    def per_rank(self) -> int:
        """Images of this rank's shard."""
        return (self.num_images - self.num_images % self.multiple) // self.world_size

    @property
    def used(self) -> int:
        """Images a rank trains on per epoch."""
        return self.per_rank - (1 if self.per_rank % self.batch_per_rank == 1 else 0)

    @property
    def steps(self) -> int:
        """Batches per rank and epoch: the same on every rank."""
        return math.ceil(self.used / self.batch_per_rank)

    @property
    def dropped(self) -> int:
        """Images of the data set no rank trains on this epoch (a different few each epoch)."""
        return self.num_images - self.used * self.world_size

    def batch_at(self, step: int) -> tuple[int, int]:
        """(first position in the shard, images) of the batch of 0-based `step`."""
        first = step * self.batch_per_rank
        return first, min(self.batch_per_rank, self.used - first)


def index_batches(indices: torch.Tensor, shape: EpochShape, first_step: int = 0) -> Iterator[torch.Tensor]:
    """The batches of a rank's `indices` (in the epoch's order, on the device) from `first_step` on."""
    for step in range(first_step, shape.steps):
        start, size = shape.batch_at(step)
        yield indices[start : start + size]


def step_batches(
    stepper: Stepper,
    batches: Iterable[torch.Tensor],  # each batch's indices into the stepper's images, on its device
    on_step: Callable[[int], None] | None = None,  # called with the epoch's steps done so far
    done: int = 0,  # steps of the epoch already done (a run resumed in the middle of it)
) -> int:
    """One step per batch, its stats added to `stepper.sums` (not zeroed here); the epoch's steps done after."""
    for batch in batches:
        stepper.step(batch)
        done += 1
        if on_step is not None:
            on_step(done)
    return done


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
    shape = EpochShape(indices.shape[0], world_size=1, multiple=1, batch_per_rank=batch_size)
    steps = step_batches(stepper, index_batches(indices, shape), on_step)
    return EpochTotals(stepper.take_sums(), steps)
